"""CPU tests of fx_mla::mla_decode_fp8: the CPU reference vs float64 (ragged and empty sequences, block sizes 16
and 64, H 16 and 128, e4m3/e5m2/bf16/fp16 caches, fp8 queries), opcheck, argument errors, and the Triton kernels
under TRITON_INTERPRET=1 in a subprocess (the flag must be set before triton is imported). Run as a script with
TRITON_INTERPRET=1 it performs the interpreter checks itself; test_triton_kernels_interpreted does exactly that.
"""
import itertools
import os
import subprocess
import sys

import pytest
import torch
import triton

from fx_mla.ops import mla_decode_fp8 as dmod  # registers the op
from tests.ops.mla_decode_fp8_cases import check_close, make_problem, reference_f64

OP = torch.ops.fx_mla.mla_decode_fp8.default
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


# ---------------------------------------------------------------- CPU reference vs float64

@pytest.mark.parametrize("cache_dtype,q_dtype", [(E4M3, torch.bfloat16), (E5M2, torch.bfloat16),
                                                 (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                                 (E4M3, E4M3), (torch.bfloat16, E4M3), (E4M3, E5M2)])
@pytest.mark.parametrize("block_size", [16, 64])
def test_cpu_op_matches_float64_h16(cache_dtype, q_dtype, block_size):
    p = make_problem([70, 0, 129, 1], 16, block_size, cache_dtype, q_dtype, seed=block_size)
    out, lse = OP(*p.args(torch.bfloat16))
    assert out.shape == (4, 16, 512) and out.dtype == torch.bfloat16
    assert lse.shape == (4, 16) and lse.dtype == torch.float32
    check_close(out, lse, *reference_f64(p), what=f"{cache_dtype}/{q_dtype}/bs{block_size}")


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cpu_op_matches_float64_h128(out_dtype):
    p = make_problem([33, 5], 128, 16, E4M3, torch.bfloat16, seed=3, seq_dtype=torch.int64)
    out, lse = OP(*p.args(out_dtype))
    assert out.dtype == out_dtype
    check_close(out, lse, *reference_f64(p), lse_tol=1e-4 if out_dtype == torch.float32 else 1e-3)


def test_cpu_op_all_empty_gives_zero_and_minus_inf():
    p = make_problem([0, 0], 16, 16, E4M3)
    out, lse = OP(*p.args())
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isinf(lse).all() and (lse < 0).all()


def test_cpu_op_general_head_dims():
    # D = L + R other than 576/512, non-power-of-two L, and no rope part at all.
    for lat, rope in ((48, 16), (64, 0), (96, 40)):
        p = make_problem([9, 20], 16, 16, E5M2, kv_lora_rank=lat, rope=rope, seed=lat)
        out, lse = OP(*p.args(torch.float32))
        assert out.shape == (2, 16, lat)
        check_close(out, lse, *reference_f64(p), lse_tol=1e-4)


def test_cpu_reference_is_bitwise_the_op():
    p = make_problem([40, 3], 16, 16, E4M3, seed=5)
    out, lse = OP(*p.args())
    ref_out, ref_lse = dmod.mla_decode_fp8_reference(*p.args())
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


def test_cpu_op_strided_block_table_is_the_contiguous_one():
    """A block table with other strides (eager's cache[block_table] takes one) gives the same bits."""
    p = make_problem([40, 3, 17], 16, 16, E4M3, seed=6)
    args = list(p.args())
    out, lse = OP(*args)
    args[2] = args[2].t().contiguous().t()
    assert not args[2].is_contiguous()
    out_s, lse_s = OP(*args)
    assert torch.equal(out_s, out) and torch.equal(lse_s, lse)


def test_cpu_op_dcp_partials_merge_to_the_whole():
    """Tokens split over 2 ranks (interleave 1): the partial (out, lse) of each rank, merged with the
    DCP formula, equal attention over the whole sequence."""
    p = make_problem([37, 8], 16, 16, E4M3, seed=11, extra_columns=0)
    ref_out, ref_lse = reference_f64(p)
    outs, lses = [], []
    for rank in range(2):
        lens = [len(range(rank, n, 2)) for n in p.seq_lens.tolist()]
        part = make_problem(lens, 16, 16, E4M3, seed=11)  # layout only: fill below from the whole problem
        kv = p.kv_cache.new_zeros(part.kv_cache.shape)
        for b, n in enumerate(p.seq_lens.tolist()):
            whole = p.kv_cache[p.block_table[b, :-(-n // 16)].long()].reshape(-1, 576)[:n]
            mine = whole[rank::2]
            for i in range(mine.shape[0]):
                kv[int(part.block_table[b, i // 16]), i % 16] = mine[i]
        o, l = OP(p.q, kv, part.block_table, part.seq_lens, p.k_scale, None, p.sm_scale, 512, torch.float32)
        outs.append(o.double())
        lses.append(l.double())
    lse = torch.logsumexp(torch.stack(lses), 0)
    out = sum(torch.exp(l - lse)[..., None] * o for o, l in zip(outs, lses))
    check_close(out.float(), lse.float(), ref_out, ref_lse, lse_tol=1e-4)


# ---------------------------------------------------------------- opcheck

@pytest.mark.parametrize("case", ["bf16_cache", "fp8_cache", "fp8_query"])
def test_opcheck(case):
    cache_dtype, q_dtype = {"bf16_cache": (torch.bfloat16, torch.bfloat16), "fp8_cache": (E4M3, torch.bfloat16),
                            "fp8_query": (E4M3, E4M3)}[case]
    p = make_problem([20, 0, 7], 16, 16, cache_dtype, q_dtype, kv_lora_rank=64, rope=32, seed=2)
    # test_schema compares inputs before/after with ops torch lacks for fp8 tensors on CPU.
    utils = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    if case == "bf16_cache":
        utils = ("test_schema",) + utils
    torch.library.opcheck(OP, p.args(torch.bfloat16), test_utils=utils)


# ---------------------------------------------------------------- argument errors

def _bad_cases():
    def mutate(**kw):
        def f(p):
            args = dict(zip(("q", "kv_cache", "block_table", "seq_lens", "k_scale", "q_scale", "sm_scale",
                             "kv_lora_rank", "out_dtype"), p.args()))
            args.update({k: (v(args) if callable(v) else v) for k, v in kw.items()})
            return tuple(args.values())
        return f
    return [
        ("q_fp32", mutate(q=lambda a: a["q"].float()), TypeError, r"q must be bf16"),
        ("q_2d", mutate(q=lambda a: a["q"][0]), ValueError, r"q must be \[B, H, D\]"),
        ("cache_2d", mutate(kv_cache=lambda a: a["kv_cache"][0]), ValueError, r"kv_cache must be \[num_blocks"),
        ("cache_fp32", mutate(kv_cache=lambda a: a["kv_cache"].float()), TypeError, r"kv_cache must be float8"),
        ("cache_fp16_q_bf16", mutate(kv_cache=lambda a: a["kv_cache"].half()), TypeError, r"needs q of the same"),
        ("d_mismatch", mutate(kv_cache=lambda a: a["kv_cache"][..., :560]), ValueError, r"must equal q's head dim"),
        ("rank_too_big", mutate(kv_lora_rank=600), ValueError, r"kv_lora_rank must be an int in \[1, D=576\]"),
        ("rank_zero", mutate(kv_lora_rank=0), ValueError, r"kv_lora_rank"),
        ("table_int64", mutate(block_table=lambda a: a["block_table"].long()), TypeError, r"block_table must be int32"),
        ("table_rows", mutate(block_table=lambda a: a["block_table"][:1]), ValueError, r"block_table must be \[B=2"),
        ("lens_float", mutate(seq_lens=lambda a: a["seq_lens"].float()), TypeError, r"seq_lens must be int32"),
        ("lens_shape", mutate(seq_lens=lambda a: a["seq_lens"][:1]), ValueError, r"seq_lens must be \[B=2\]"),
        ("k_scale_bf16", mutate(k_scale=lambda a: a["k_scale"].bfloat16()), TypeError, r"k_scale must be a one-elem"),
        ("k_scale_two", mutate(k_scale=lambda a: a["k_scale"].repeat(2)), TypeError, r"k_scale must be a one-elem"),
        ("q_scale_with_bf16_q", mutate(q_scale=lambda a: a["k_scale"]), ValueError, r"q_scale must be None"),
        ("out_fp8", mutate(out_dtype=E4M3), TypeError, r"out_dtype must be bf16, fp16 or fp32"),
        ("lens_too_long", mutate(seq_lens=lambda a: a["seq_lens"] + 10_000), ValueError, r"seq_lens\[0\] = .* must be"),
        ("lens_negative", mutate(seq_lens=lambda a: a["seq_lens"] - 100), ValueError, r"seq_lens\[0\] = .* must be"),
        ("block_id", mutate(block_table=lambda a: a["block_table"] + 1000), ValueError, r"block_table\[0, 0\]"),
        ("scale_device", mutate(k_scale=lambda a: a["k_scale"].to("meta")), ValueError, r"k_scale must be on q's"),
    ]


@pytest.mark.parametrize("name,mutate,exc,pattern", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_arguments_raise_clear_errors(name, mutate, exc, pattern):
    p = make_problem([20, 3], 16, 16, E4M3, seed=1)
    with pytest.raises(exc, match=pattern):
        OP(*mutate(p))


def test_fp8_query_needs_q_scale():
    p = make_problem([5], 16, 16, E4M3, E4M3)
    with pytest.raises(TypeError, match="q_scale .* is required with an fp8 query"):
        OP(p.q, p.kv_cache, p.block_table, p.seq_lens, p.k_scale, None, p.sm_scale, 512, torch.bfloat16)


def test_kernel_unsupported_reason():
    ok = dmod.kernel_unsupported_reason
    assert ok(torch.bfloat16, E4M3, 576, 512, (9, 0)) is None
    assert ok(E4M3, E4M3, 576, 512, (9, 0)) is None
    assert "compute capability" in ok(E4M3, E4M3, 576, 512, (8, 0))
    assert "compute capability" in ok(torch.bfloat16, E4M3, 576, 512, (8, 6))
    assert ok(torch.bfloat16, torch.bfloat16, 576, 512, (8, 0)) is None
    assert "kv_lora_rank" in ok(torch.bfloat16, E4M3, 1152, 1024)
    assert "rope width" in ok(torch.bfloat16, E4M3, 512 + 300, 512)
    assert "same dtype" in ok(torch.float16, torch.bfloat16, 576, 512)


def test_choose_config():
    c = dmod.choose_config
    assert c(16) == dmod.DecodeConfig(16, 64, 8, 1, 1, prefetch=True)
    assert c(128) == dmod.DecodeConfig(64, 128, 8, 1, 1)
    assert c(128, fp8_dot=True) == dmod.DecodeConfig(64, 64, 8, 2, 1)  # 128-token FP8 tiles overflow 227 KiB
    assert c(128, max_shared=100 * 1024).block_h == 32 and c(16, max_shared=100 * 1024).block_n == 32


def test_split_count_from_static_bounds():
    # aims at occupancy * SMs programs, never more splits than 4-tile chunks of the longest possible sequence
    # and no split left empty at the longest length (66 would give 64 chunks of 16 tiles and two empty splits)
    assert dmod._num_splits(1, 2, 65536, 64, 132, 1) == 64
    assert dmod._num_splits(128, 1, 8192, 64, 132, 1) == 1
    assert dmod._num_splits(32, 1, 16384, 64, 132, 2) == 8
    assert dmod._num_splits(8, 2, 16384, 64, 132, 1) == 8
    assert dmod._num_splits(1, 1, 100, 64, 132, 1) == 1
    assert dmod._num_splits(1, 1, 0, 64, 132, 1) == 1
    for batch, groups, max_len, block_n in itertools.product((1, 3, 8, 33), (1, 2), (64, 1000, 65536, 70001),
                                                             (32, 64)):
        splits = dmod._num_splits(batch, groups, max_len, block_n, 132, 1)
        tiles = -(-max_len // block_n)
        chunk = -(-tiles // splits)
        assert 1 <= splits <= max(1, 132 // (batch * groups)) and (splits - 1) * chunk < tiles, \
            (batch, groups, max_len, block_n, splits)


# ---------------------------------------------------------------- Triton kernels under the interpreter

def test_triton_kernels_interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "interpreter checks passed" in r.stdout


def _run_kernel(p, out_dtype=torch.bfloat16, **kw):
    batch, heads, _ = p.q.shape
    out = torch.full((batch, heads, p.kv_lora_rank), float("nan"), dtype=out_dtype)
    lse = torch.full((batch, heads), float("nan"), dtype=torch.float32)
    res = dmod.launch_mla_decode_fp8(*p.args(out_dtype), out=out, lse=lse, poison_workspace=True, **kw)
    assert res[0] is out and res[1] is lse
    return out, lse


def _interpreter_checks():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    n = 0
    h16 = dmod.DecodeConfig(16, 32, 4, 1, 1)
    h16_prefetch = dmod.DecodeConfig(16, 16, 4, 1, 1, prefetch=True)
    h128_cfgs = (dmod.choose_config(128), dmod.DecodeConfig(32, 16, 4, 1, 1, prefetch=True))
    # dtypes x block sizes x split counts, 16 heads, ragged lengths with an empty request
    for cache_dtype, q_dtype in ((E4M3, torch.bfloat16), (E5M2, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                 (torch.float16, torch.float16), (E4M3, E4M3), (torch.bfloat16, E4M3),
                                 (E4M3, E5M2)):
        for block_size, splits in ((16, 1), (64, 3), (16, None)):
            p = make_problem([45, 0] if block_size == 16 else [100, 0], 16, block_size, cache_dtype, q_dtype,
                             seed=n)
            cfg = {1: h16, 3: h16_prefetch, None: None}[splits]  # None: choose_config's
            out, lse = _run_kernel(p, config=cfg, num_splits=splits)
            check_close(out, lse, *reference_f64(p), what=f"{cache_dtype}/{q_dtype}/bs{block_size}/splits{splits}")
            n += 1
    # 128 heads at a tiny context, the default config and a 32-head-group one
    for cfg in h128_cfgs:
        for splits in (1, 2):
            p = make_problem([19, 3], 128, 16, E4M3, seed=100 + splits)
            out, lse = _run_kernel(p, config=cfg, num_splits=splits)
            check_close(out, lse, *reference_f64(p), what=f"h128 {cfg} splits{splits}")
            n += 1
    # other head dims, fp32 / fp16 outputs
    for lat, rope, out_dtype in ((48, 16, torch.float32), (64, 0, torch.float16), (96, 40, torch.float32)):
        p = make_problem([30, 17], 16, 16, E4M3, seed=lat, kv_lora_rank=lat, rope=rope)
        out, lse = _run_kernel(p, out_dtype, config=h16, num_splits=2)
        check_close(out, lse, *reference_f64(p), what=f"L{lat} R{rope}")
        n += 1
    # the kernel agrees with the op's CPU reference too (both fp32 math; P rounds to fp16 in the kernel)
    p = make_problem([50, 7], 16, 16, E4M3, seed=7)
    out, lse = _run_kernel(p, torch.float32, config=h16)
    ref_out, ref_lse = dmod.mla_decode_fp8_reference(*p.args(torch.float32))
    assert float((out - ref_out).norm() / ref_out.norm()) < 2e-3 and float((lse - ref_lse).abs().max()) < 1e-4
    n += 1
    # bad metadata never reads out of bounds: lengths past the table and block ids past the cache are clamped
    p = make_problem([20, 5], 16, 16, E4M3, seed=9)
    p.seq_lens += 1000
    p.block_table[1, 0] = 10_000
    p.block_table[0, 1] = -5
    raw = p.kv_cache.view(torch.uint8)
    raw[raw == 0x7F] = 1  # no NaN slots: every clamped read lands on finite data
    out, lse = _run_kernel(p, config=h16)
    assert torch.isfinite(lse).all() and torch.isfinite(out.float()).all()
    n += 1
    n += _combine_checks()
    n += _bf16_partial_checks()
    print(f"interpreter checks passed ({n})")


def _bf16_partial_checks():
    """PARTIAL_BF16: a bf16 output's split partials in bf16 (the workspace dtype the launch uses), still within the
    bf16 tolerance of the float64 reference; an fp32 output keeps fp32 partials."""
    from fx_mla.ops import _decode_launch as launch_mod
    n = 0
    launch_mod.PARTIAL_BF16 = True
    try:
        p = make_problem([100, 0, 37], 16, 16, E4M3, torch.bfloat16, seed=21)
        out = torch.empty(3, 16, 512, dtype=torch.bfloat16)
        part_o, part_lse = launch_mod.split_workspace(p.q, 3, 512, out, torch.empty(3, 16), poison=True)
        assert part_o.dtype == torch.bfloat16 and part_lse.dtype == torch.float32
        assert launch_mod.split_workspace(p.q, 3, 512, out.float(), torch.empty(3, 16), True)[0].dtype == torch.float32
        for splits in (3, 5):
            o, lse = _run_kernel(p, config=dmod.DecodeConfig(16, 32, 4, 1, 1), num_splits=splits)
            check_close(o, lse, *reference_f64(p), what=f"bf16 partials, splits {splits}")
            n += 1
    finally:
        launch_mod.PARTIAL_BF16 = False
    return n


def _combine_checks():
    """The split merge on its own: random partials (some splits empty: lse = -inf, o = 0; one request with every
    split empty) against a float64 merge, the chooser's config and explicit (BLOCK_L, BLOCK_S) ones (several latent
    chunks, one; one split a step, all at once), outputs poisoned with NaN."""
    from fx_mla.ops._decode_launch import combine_config, combine_splits
    n = 0
    for batch, heads, splits, lat in ((1, 8, 66, 512), (3, 5, 7, 40), (2, 16, 3, 512), (2, 4, 5, 96)):
        g = torch.Generator().manual_seed(splits)
        part_o = torch.randn(batch, splits, heads, lat, generator=g)
        part_lse = torch.randn(batch, splits, heads, generator=g) * 4
        part_lse[0, 1] = float("-inf")
        part_o[0, 1] = 0.0
        part_lse[-1] = float("-inf") if batch > 1 else part_lse[-1]
        if batch > 1:
            part_o[-1] = 0.0
        lse64 = torch.logsumexp(part_lse.double(), dim=1)
        w = torch.exp(part_lse.double() - torch.where(torch.isinf(lse64), 0.0, lse64)[:, None])
        ref = (w[..., None] * part_o.double()).sum(1)
        chosen = combine_config(batch, heads, splits, lat)[:2]
        # (64, 4) at L = 96: a second latent chunk, half masked
        for cfg in (None, (64, 1), (64, 128), (triton.next_power_of_2(lat), 8), (128, 4), (64, 4)):
            out = torch.full((batch, heads, lat), float("nan"), dtype=torch.float32)
            lse = torch.full((batch, heads), float("nan"), dtype=torch.float32)
            combine_splits(part_o, part_lse, out, lse, splits, lat, config=cfg)
            assert not out.isnan().any() and not lse.isnan().any(), (batch, heads, splits, cfg)
            assert torch.equal(torch.isinf(lse), torch.isinf(lse64)), cfg
            fin = ~torch.isinf(lse64)
            assert float((lse.double() - lse64)[fin].abs().max()) < 1e-5, cfg
            assert float((out.double() - ref).norm() / ref.norm()) < 1e-6, (batch, heads, splits, cfg, chosen)
            assert float(out[~fin].abs().max()) == 0.0 if (~fin).any() else True
            n += 1
    return n



if __name__ == "__main__":
    _interpreter_checks()
