"""CPU tests of fx_mla::gather_dequant_cache{,_paged}: the reference vs the literal plain-PyTorch chains
(bitwise), float64 sanity, opcheck, argument errors, checked-mode errors, out-of-range indices in unchecked
mode, and the Triton kernels under TRITON_INTERPRET=1 (in a subprocess, so the flag is set before triton is
imported whatever the rest of the suite imported). Run as a script with TRITON_INTERPRET=1 it performs the
interpreter checks itself; test_triton_kernels_interpreted_bitwise does exactly that.
"""
import os
import subprocess
import sys

import pytest
import torch

from fx_mla.ops import gather_dequant_cache as gmod  # registers the ops
from tests.ops.gather_dequant_cache_cases import (FP8, NAN_BYTE, OUT_DTYPES, assert_bitwise, float64_ds_mla,
                                                  plain_ds_mla_dequant, plain_paged, plain_token, plain_token_rows,
                                                  ragged_lengths, random_cache, random_scale, rel_err,
                                                  token_problem)

OPS = torch.ops.fx_mla
CACHE_DTYPES = FP8 + (torch.bfloat16, torch.float16, torch.float32)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _token_inputs(seed, d, cache_dtype, layout="plain", bs=16, total=70, batch=5, padding=3, starts=True):
    g = _gen(seed)
    lengths = ragged_lengths(total, batch, g, empty=1)
    st = torch.randint(0, 2 * bs, (batch,), generator=g).tolist() if starts else None
    p = token_problem(lengths, bs, g, starts=st, padding=padding)
    cache = random_cache(p.num_blocks, bs, d, cache_dtype, g, layout)
    scale = random_scale(g) if (layout == "plain" and cache_dtype in FP8) else None
    return cache, p, scale


# ---------------------------------------------------------------- reference == literal plain chain

@pytest.mark.parametrize("d", [576, 320, 288])
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES, ids=str)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
def test_token_form_bitwise_vs_plain_chain(d, cache_dtype, out_dtype):
    cache, p, scale = _token_inputs(d + len(str(cache_dtype)), d, cache_dtype)
    out = OPS.gather_dequant_cache(cache, p.block_table, p.cu_seq_lens, p.token_to_seq, p.seq_starts, scale,
                                   out_dtype)
    assert_bitwise(out, plain_token(cache, p.block_table, p.cu_seq_lens, p.token_to_seq, p.seq_starts, scale,
                                    out_dtype), "token form")
    ref64 = plain_token_rows(cache, p.block_table, p.cu_seq_lens, p.token_to_seq, p.seq_starts).double()
    if scale is not None:
        ref64 = ref64 * scale.double()
    assert rel_err(out, ref64) < {torch.float32: 1e-7, torch.float16: 1e-3, torch.bfloat16: 8e-3}[out_dtype]


@pytest.mark.parametrize("d", [576, 288])
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES, ids=str)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
def test_paged_form_bitwise_vs_plain_chain(d, cache_dtype, out_dtype):
    g = _gen(d)
    cache = random_cache(9, 8, d, cache_dtype, g)
    bt = torch.randint(0, 9, (3, 4), generator=g, dtype=torch.int32)
    scale = random_scale(g) if cache_dtype in FP8 else None
    out = OPS.gather_dequant_cache_paged(cache, bt, scale, out_dtype)
    assert out.shape == (3, 32, d)
    assert_bitwise(out, plain_paged(cache, bt, scale, out_dtype), "paged form")


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
def test_fp8_ds_mla_layout_bitwise_vs_plain_chain(out_dtype):
    cache, p, _ = _token_inputs(7, 656, None, layout="fp8_ds_mla")
    out = OPS.gather_dequant_cache(cache, p.block_table, p.cu_seq_lens, p.token_to_seq, p.seq_starts, None,
                                   out_dtype, "fp8_ds_mla")
    rows = plain_token_rows(cache, p.block_table, p.cu_seq_lens, p.token_to_seq, p.seq_starts)
    assert out.shape == (p.token_to_seq.numel(), 576)
    assert_bitwise(out, plain_ds_mla_dequant(rows, out_dtype), "fp8_ds_mla token")
    assert rel_err(out, float64_ds_mla(rows)) < {torch.float32: 1e-7, torch.float16: 1e-3,
                                                 torch.bfloat16: 8e-3}[out_dtype]
    bt = p.block_table[:, :2]
    paged = OPS.gather_dequant_cache_paged(cache, bt, None, out_dtype, "fp8_ds_mla")
    assert_bitwise(paged, plain_ds_mla_dequant(cache[bt].flatten(1, 2), out_dtype), "fp8_ds_mla paged")


def test_one_element_scale_with_dims_same_as_0dim():
    cache, p, scale = _token_inputs(3, 576, torch.float8_e4m3fn)
    args = (cache, p.block_table, p.cu_seq_lens, p.token_to_seq, p.seq_starts)
    a = OPS.gather_dequant_cache(*args, scale, torch.float32)
    b = OPS.gather_dequant_cache(*args, scale.reshape(1), torch.float32)
    assert_bitwise(b, a)
    # torch promotes x.to(bf16) * scale[1] to fp32: the same values as out_dtype=float32
    assert_bitwise(a, plain_token(*args, scale.reshape(1), torch.bfloat16))


def test_without_seq_starts_and_with_int64_metadata():
    cache, p, scale = _token_inputs(4, 320, torch.float8_e5m2, starts=False)
    out = OPS.gather_dequant_cache(cache, p.block_table.long(), p.cu_seq_lens.long(), p.token_to_seq.long(), None,
                                   scale, torch.bfloat16)
    assert_bitwise(out, plain_token(cache, p.block_table, p.cu_seq_lens, p.token_to_seq, None, scale,
                                    torch.bfloat16))


def test_fp8_cache_without_scale_is_a_cast():
    cache, p, _ = _token_inputs(5, 288, torch.float8_e4m3fn)
    args = (cache, p.block_table, p.cu_seq_lens, p.token_to_seq, p.seq_starts)
    assert_bitwise(OPS.gather_dequant_cache(*args, None, torch.float16), plain_token_rows(*args).to(torch.float16))


def test_empty_outputs_and_only_empty_requests():
    g = _gen(0)
    cache = random_cache(4, 8, 64, torch.float8_e4m3fn, g)
    scale = random_scale(g)
    p = token_problem([0, 0], 8, g)
    out = OPS.gather_dequant_cache(cache, p.block_table, p.cu_seq_lens, p.token_to_seq, None, scale, torch.bfloat16)
    assert out.shape == (0, 64)
    assert OPS.gather_dequant_cache_paged(cache, p.block_table[:0], scale, torch.bfloat16).shape == (0, 16, 64)


def test_padding_tokens_read_request0_first_slot():
    cache, p, scale = _token_inputs(6, 576, torch.float8_e4m3fn, padding=4)
    out = OPS.gather_dequant_cache(cache, p.block_table, p.cu_seq_lens, p.token_to_seq, p.seq_starts, scale,
                                   torch.bfloat16)
    first = (cache[int(p.block_table[0, 0]), 0].to(torch.bfloat16) * scale)
    for t in range(p.token_to_seq.numel() - 4, p.token_to_seq.numel()):
        assert_bitwise(out[t], first, f"padding token {t}")


# ---------------------------------------------------------------- out-of-range indices, unchecked and checked

def _oob_problem():
    g = _gen(11)
    p = token_problem([5, 0, 9], 4, g, starts=[1, 0, 2], padding=2)
    cache = random_cache(p.num_blocks, 4, 64, torch.float8_e4m3fn, g)
    return cache, p, random_scale(g)


def test_unchecked_out_of_range_indices_write_zeros_and_wrap_like_torch():
    cache, p, scale = _oob_problem()
    n_blocks = cache.shape[0]
    bt = p.block_table.clone()
    bt[2, 0] = 9001            # tokens of request 2 in its first page: out of range -> zeros
    bt[2, 1] = -1              # wraps to the last block, as cache[-1] does
    tts = p.token_to_seq.clone()
    tts[0] = 7                 # request id past the batch -> zeros
    args = (cache, bt, p.cu_seq_lens, tts, p.seq_starts, scale, torch.bfloat16)
    out = OPS.gather_dequant_cache(*args)
    ref = gmod.gather_dequant_cache_reference(*args)
    assert_bitwise(out, ref)
    assert bool((out[0] == 0).all())
    req2 = torch.arange(p.token_to_seq.numel())[p.token_to_seq == 2]
    first_page = req2[:2]      # seq_starts[2] = 2, block_size 4: positions 2, 3 are in column 0
    assert bool((out[first_page] == 0).all())
    second = req2[2]           # position 4: column 1 = block -1 = the last block, slot 0
    assert_bitwise(out[second], (cache[n_blocks - 1, 0].to(torch.bfloat16) * scale))
    paged = OPS.gather_dequant_cache_paged(cache, bt, scale, torch.bfloat16)
    assert bool((paged[2, :4] == 0).all())
    assert_bitwise(paged[2, 4:8], cache[-1].to(torch.bfloat16) * scale)


def _expect_error(match, *args, paged=False):
    with pytest.raises(ValueError, match=match):
        if paged:
            OPS.gather_dequant_cache_paged(*args, checked=True)
        else:
            OPS.gather_dequant_cache(*args, checked=True)


def test_checked_mode_errors_name_the_request_and_index():
    cache, p, scale = _oob_problem()
    n = cache.shape[0]
    base = dict(bt=p.block_table, cu=p.cu_seq_lens, tts=p.token_to_seq, ss=p.seq_starts)

    def call(match, **kw):
        a = {**base, **kw}
        _expect_error(match, cache, a["bt"], a["cu"], a["tts"], a["ss"], scale, torch.bfloat16)

    OPS.gather_dequant_cache(cache, p.block_table, p.cu_seq_lens, p.token_to_seq, p.seq_starts, scale,
                             torch.bfloat16, checked=True)  # valid inputs pass
    bt = p.block_table.clone()
    bt[2, 1] = 9001
    call(rf"block_table\[2, 1\] = 9001 is out of range for num_blocks={n}", bt=bt)
    bt = p.block_table.clone()
    bt[2, 1] = -1
    call(r"block_table\[2, 1\] = -1 is out of range", bt=bt)
    bt = p.block_table.clone()
    bt[1, :] = 9001            # request 1 is empty: its row is never read
    OPS.gather_dequant_cache(cache, bt, p.cu_seq_lens, p.token_to_seq, p.seq_starts, scale, torch.bfloat16,
                             checked=True)
    tts = p.token_to_seq.clone()
    tts[3] = 5
    call(r"token_to_seq\[3\] = 5 is out of range for 3 requests", tts=tts)
    ss = p.seq_starts.clone()
    ss[2] = 8                  # 4 columns x 4 slots = 16 < 8 + 9
    call(r"seq_starts\[2\] \+ length = 8 \+ 9 exceeds the pages request 2 holds: 4 blocks x 4 = 16", ss=ss)
    ss[2] = -1
    call(r"seq_starts\[2\] = -1 is negative", ss=ss)
    cu = p.cu_seq_lens.clone()
    cu[2] = 1
    call(r"cu_seq_lens must be nondecreasing: cu_seq_lens\[2\] = 1 < cu_seq_lens\[1\] = 5", cu=cu)
    tts = p.token_to_seq.clone()
    tts[6] = 0
    call(r"token 6 is assigned to request 0 .* outside \[cu_seq_lens\[0\], cu_seq_lens\[1\]\) = \[0, 5\)", tts=tts)
    bt = p.block_table.clone()
    bt[0, 0] = n
    call(r"block_table\[0, 0\] = .* \(read by padding token 14\)|block_table\[0, 0\]", bt=bt)
    bt = p.block_table.clone()
    bt[1, 3] = n + 5
    _expect_error(rf"block_table\[1, 3\] = {n + 5} is out of range for num_blocks={n}", cache, bt, scale,
                  torch.bfloat16, paged=True)


def test_checked_padding_without_rows():
    g = _gen(1)
    cache = random_cache(3, 4, 32, torch.float8_e4m3fn, g)
    _expect_error(r"padding token 0 .* reads request 0's first slot", cache, torch.zeros(0, 2, dtype=torch.int32),
                  torch.zeros(1, dtype=torch.int32), torch.full((2,), -1, dtype=torch.int32), None, None,
                  torch.float32)
    out = OPS.gather_dequant_cache(cache, torch.zeros(0, 2, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                                   torch.full((2,), -1, dtype=torch.int32), None, None, torch.float32)
    assert bool((out == 0).all())  # unchecked: nothing to read, zeros


# ---------------------------------------------------------------- argument errors

def test_bad_arguments_raise_clear_errors():
    cache, p, scale = _token_inputs(2, 64, torch.float8_e4m3fn)
    a = [cache, p.block_table, p.cu_seq_lens, p.token_to_seq, p.seq_starts, scale, torch.bfloat16]

    def bad(exc, match, i, v, layout="plain"):
        b = list(a)
        b[i] = v
        with pytest.raises(exc, match=match):
            OPS.gather_dequant_cache(*b, layout)

    bad(TypeError, "cache must have dtype", 0, cache.view(torch.uint8))
    bad(ValueError, "cache must have 3 dims", 0, cache.flatten(0, 1))
    bad(TypeError, "block_table must have dtype", 1, p.block_table.to(torch.int16))
    bad(ValueError, r"cu_seq_lens must be \[", 2, p.cu_seq_lens[:-1])
    bad(ValueError, "token_to_seq must have 1 dims", 3, p.token_to_seq[None])
    bad(ValueError, r"seq_starts must be \[", 4, p.seq_starts[:-1])
    bad(TypeError, "scale must have dtype", 5, scale.double())
    bad(ValueError, "scale must hold exactly one element", 5, torch.ones(2))
    bad(TypeError, "out_dtype must be", 6, torch.int8)
    bad(ValueError, "layout must be one of", 6, torch.bfloat16, layout="fp4")
    bad(TypeError, "cache must have dtype", 0, cache, layout="fp8_ds_mla")
    bad(ValueError, r"cache must be \[num_blocks, block_size, 656\]", 0, cache.view(torch.uint8),
        layout="fp8_ds_mla")
    bad(ValueError, "scale is only accepted with an fp8 cache", 0, cache.to(torch.bfloat16))
    rows = random_cache(2, 4, 656, None, _gen(0), "fp8_ds_mla")
    with pytest.raises(ValueError, match="scale must be None for layout 'fp8_ds_mla'"):
        OPS.gather_dequant_cache_paged(rows, p.block_table, scale, torch.bfloat16, "fp8_ds_mla")
    with pytest.raises(ValueError, match="last dim must be contiguous"):
        OPS.gather_dequant_cache_paged(cache.transpose(1, 2), p.block_table, scale, torch.bfloat16)


# ---------------------------------------------------------------- opcheck

@pytest.mark.parametrize("case", ["fp8_seq_starts", "auto_no_starts", "ds_mla"])
def test_opcheck(case):
    layout = "fp8_ds_mla" if case == "ds_mla" else "plain"
    cache_dtype = {"fp8_seq_starts": torch.float8_e4m3fn, "auto_no_starts": torch.bfloat16}.get(case)
    cache, p, scale = _token_inputs(9, 656 if layout != "plain" else 64, cache_dtype, layout, bs=4, total=12,
                                    batch=3, padding=1, starts=case != "auto_no_starts")
    # test_schema compares inputs before/after with ops torch lacks for fp8 tensors ("mul_cpu_reduced_float"
    # not implemented for Float8_e4m3fn): it runs on the bf16 and uint8 (fp8_ds_mla) caches only.
    utils = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic") \
        if cache.dtype in FP8 else ("test_schema", "test_faketensor", "test_autograd_registration",
                                    "test_aot_dispatch_dynamic")
    torch.library.opcheck(OPS.gather_dequant_cache.default,
                          (cache, p.block_table, p.cu_seq_lens, p.token_to_seq, p.seq_starts, scale,
                           torch.float16, layout), test_utils=utils)
    torch.library.opcheck(OPS.gather_dequant_cache_paged.default,
                          (cache, p.block_table, scale, torch.float32, layout), test_utils=utils)


def test_launch_config_flags_are_checked():
    cache, p, scale = _token_inputs(11, 576, torch.float8_e4m3fn)
    out = torch.empty(p.token_to_seq.numel(), 576, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="config flags must be letters of 'vspeaxyr', got 'vz'"):
        gmod.launch_gather_dequant_cache(cache, p.block_table, p.cu_seq_lens, p.token_to_seq, p.seq_starts, scale,
                                         out, "plain", (8, 4, 0, "vz"))
    with pytest.raises(ValueError, match="config flag 'e' .* needs 'p', got 've'"):
        gmod.launch_gather_dequant_cache(cache, p.block_table, p.cu_seq_lens, p.token_to_seq, p.seq_starts, scale,
                                         out, "plain", (8, 4, 0, "ve"))
    with pytest.raises(ValueError, match="config flag 'e' .* needs 'p', got 'ae'"):
        gmod.launch_gather_dequant_cache(cache, p.block_table, p.cu_seq_lens, p.token_to_seq, p.seq_starts, scale,
                                         out, "plain", (32, 4, 1, "ae", 4))
    with pytest.raises(ValueError, match="'x' / 'y' are development diagnostics"):
        gmod.launch_gather_dequant_cache(cache, p.block_table, p.cu_seq_lens, p.token_to_seq, p.seq_starts, scale,
                                         out, "plain", (32, 4, 1, "apx", 4))
    with pytest.raises(ValueError, match="config maxnreg must be an int >= 0"):
        gmod.launch_gather_dequant_cache(cache, p.block_table, p.cu_seq_lens, p.token_to_seq, p.seq_starts, scale,
                                         out, "plain", (8, 4, 0, "", -1))


@pytest.mark.parametrize("layout", ["plain", "fp8_ds_mla"])
@pytest.mark.parametrize("paged", [False, True])
def test_early_prefetch_flag_compiles_to_prefetches_before_the_pdl_wait(layout, paged):
    """Flag "e" (kernels' EARLY), compiled for sm_90 without a GPU (Triton ships ptxas): before
    griddepcontrol.wait only L1-bypassing index loads (.cg: token_to_seq, cu_seq_lens, seq_starts, block_table;
    the paged form the block table alone) and predicated prefetch.global.L2, no other global load; after it no
    .cg load; without EARLY none of them at all."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fx_mla.ops.kernels import gather_dequant_cache as kmod
    ints = {n: "i32" for n in ("n_tokens", "n_req", "max_blocks", "n_blocks", "bt_s0", "bt_s1", "c_s0", "c_s1",
                               "row_len", "n_tiles", "early_programs")}
    meta = dict(tts_ptr="*i32", cu_ptr="*i32", ss_ptr="*i32", bt_ptr="*i32")
    common = dict(BLOCK_SIZE=64, BLOCK_T=8, PAGED=paged, HAS_SEQ_STARTS=True, PERSISTENT=False, ROUND_BY_BITS=False,
                  VEC=0, STREAM=False, PDL=True)
    if layout == "plain":
        fn, sig = kmod._gather_dequant_cache_kernel, dict(cache_ptr="*fp8e4nv", out_ptr="*bf16", scale_ptr="*fp32")
        common.update(D=576, OUT_STRIDE=576, P1=512, P2=64, P3=0, HAS_SCALE=True)
        variants = [dict(EARLY=False), dict(EARLY=True)]
    else:
        fn, sig = kmod._gather_dequant_cache_fp8_ds_mla_kernel, dict(cache_ptr="*u8", out_ptr="*bf16")
        variants = [dict(EARLY=e, ROW_LOAD=r) for e in (False, True) for r in (False, True)]  # ROW_LOAD: flag "r"
    for var in variants:
        early = var["EARLY"]
        src = ASTSource(fn=fn, signature={**sig, **meta, **ints}, constexprs={**common, **var})
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4)).asm["ptx"]
        before, wait, after = ptx.partition("griddepcontrol.wait")
        assert wait and "griddepcontrol.launch_dependents" in after
        loads_before = re.findall(r"ld\.global[.\w]*", before)
        if not early:
            assert not loads_before and "prefetch" not in ptx and ".cg" not in ptx
            continue
        assert loads_before == ["ld.global.cg.b32"] * (1 if paged else 4), loads_before
        assert re.search(r"@p prefetch\.global\.L2 \[", before) and "prefetch" not in after
        assert "ld.global.cg" not in after


def test_async_launch_budgets():
    """The async kernel's register cap a thread and shared memory a CTA (async_unsupported declines past them)."""
    assert gmod._async_maxnreg(1, 4) == 256 and gmod._async_maxnreg(2, 4) == 128 and gmod._async_maxnreg(3, 4) == 80
    assert gmod._async_maxnreg(3, 8) < 80
    c576 = torch.empty(2, 64, 576, dtype=torch.float8_e4m3fn)
    assert gmod._async_smem_bytes(c576, "plain", 4, 32, 4) == 4 * 32 * (576 + 16) + 4 * 32 * 8 + 4 * 16  # P3 stand-in
    c1024 = torch.empty(2, 64, 1024, dtype=torch.float8_e4m3fn)
    assert gmod._async_smem_bytes(c1024, "plain", 8, 32, 4) > 232448       # one part: two 16-byte stand-ins
    ds = torch.empty(2, 64, 656, dtype=torch.uint8)
    assert gmod._async_smem_bytes(ds, "fp8_ds_mla", 4, 32, 4) == 4 * 32 * 656 + 4 * 32 * 8 + 4 * 16


def test_launch_config_covers_every_layout():
    assert set(gmod.CONFIG) == set(gmod.LAYOUTS)
    for layout, (block_t, warps, per_sm, *flags) in gmod.CONFIG.items():
        assert block_t >= 1 and block_t & (block_t - 1) == 0, (layout, block_t)
        assert warps in (1, 2, 4, 8, 16) and per_sm >= 0 and len(flags) <= 1 and set("".join(flags)) <= set("vsper")
    assert gmod.ASYNC_FALLBACK == gmod.CONFIG  # the async kernel's fallback: the Triton defaults


@pytest.mark.parametrize("config,row_load", [((8, 4, 0, "per"), True), ((8, 4, 0, "pe"), False), (None, True),
                                             ((32, 4, 2, "ap", 3), True)], ids=str)
def test_launcher_passes_row_load_to_the_ds_mla_kernel_only(monkeypatch, config, row_load):
    """Flag "r" reaches the fp8_ds_mla kernel as ROW_LOAD (None: CONFIG's; an async config on CPU: ASYNC_FALLBACK's,
    even with CONFIG itself replaced by an async config of five entries, as bench_cache_gather.py --config does); the
    plain kernel never gets it (kernels replaced by recorders: no launch)."""
    from fx_mla.ops.kernels import gather_dequant_cache as kmod
    seen = {}

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kw: seen.setdefault(self.name, kw)

    monkeypatch.setattr(kmod, "_gather_dequant_cache_fp8_ds_mla_kernel", Recorder("ds"))
    monkeypatch.setattr(kmod, "_gather_dequant_cache_kernel", Recorder("plain"))
    if config is not None and "a" in config[3]:
        monkeypatch.setitem(gmod.CONFIG, "fp8_ds_mla", config)
        monkeypatch.setitem(gmod.CONFIG, "plain", config)
    cache, p, _ = _token_inputs(12, 656, torch.uint8, "fp8_ds_mla")
    out = torch.empty(p.token_to_seq.numel(), 576, dtype=torch.bfloat16)
    gmod.launch_gather_dequant_cache(cache, p.block_table, p.cu_seq_lens, p.token_to_seq, p.seq_starts, None, out,
                                     "fp8_ds_mla", config)
    assert seen["ds"]["ROW_LOAD"] is row_load
    c2, p2, s2 = _token_inputs(12, 576, torch.float8_e4m3fn)
    out2 = torch.empty(p2.token_to_seq.numel(), 576, dtype=torch.bfloat16)
    gmod.launch_gather_dequant_cache(c2, p2.block_table, p2.cu_seq_lens, p2.token_to_seq, p2.seq_starts, s2, out2,
                                     "plain", config)
    assert "ROW_LOAD" not in seen["plain"]


# ---------------------------------------------------------------- Triton kernels under the interpreter

def test_triton_kernels_interpreted_bitwise():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "interpreter checks passed" in r.stdout


def _poisoned(cache, block_table, poison_block):
    """The cache inside a larger buffer whose first and last blocks are NaN, and the block table inside a
    wider one whose extra columns name `poison_block` (filled with NaN here): any read outside the cache or
    a block-table row, or of a column the index math should not touch, shows up as NaN in the output."""
    big = torch.empty((cache.shape[0] + 2,) + tuple(cache.shape[1:]), dtype=torch.uint8)
    big.view(-1).fill_(NAN_BYTE[torch.float8_e4m3fn])
    inner = big[1:-1].view(cache.dtype)
    inner.copy_(cache)
    inner[poison_block].view(torch.uint8).fill_(NAN_BYTE[torch.float8_e4m3fn])
    wide = torch.full((block_table.shape[0], block_table.shape[1] + 2), poison_block, dtype=block_table.dtype)
    wide[:, 1:-1] = block_table
    return inner, wide[:, 1:-1]


def _interpreter_checks():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    launch = gmod.launch_gather_dequant_cache
    n_checks = 0

    def check(cache, p, scale, out_dtype, layout="plain", config=None, paged=False, what=""):
        nonlocal n_checks
        d_out = 576 if layout == "fp8_ds_mla" else cache.shape[2]
        if paged:
            out = torch.full((p.block_table.shape[0], p.block_table.shape[1] * cache.shape[1], d_out), float("nan"),
                             dtype=out_dtype)
            launch(cache, p.block_table, None, None, None, scale, out, layout, config)
            ref = gmod.gather_dequant_cache_paged_reference(cache, p.block_table, scale, out_dtype, layout)
        else:
            out = torch.full((p.token_to_seq.numel(), d_out), float("nan"), dtype=out_dtype)
            launch(cache, p.block_table, p.cu_seq_lens, p.token_to_seq, p.seq_starts, scale, out, layout, config)
            ref = gmod.gather_dequant_cache_reference(cache, p.block_table, p.cu_seq_lens, p.token_to_seq,
                                                      p.seq_starts, scale, out_dtype, layout)
        assert_bitwise(out, ref, what)
        n_checks += 1
        return out

    small = dict(bs=4, total=13, batch=3, padding=2)
    for cache_dtype in CACHE_DTYPES:
        for out_dtype in OUT_DTYPES:
            cache, p, scale = _token_inputs(1, 576, cache_dtype, **small)
            check(cache, p, scale, out_dtype, config=(8, 4, 0), what=f"576 {cache_dtype}->{out_dtype}")
            check(cache, p, scale, out_dtype, config=(8, 4, 0, "vs"), what=f"576 {cache_dtype}->{out_dtype} vs")
    for d, cache_dtype in [(320, torch.float8_e4m3fn), (288, torch.float8_e5m2), (40, torch.float16),
                           (100, torch.float32), (1100, torch.float8_e4m3fn)]:  # 3 parts; 2 column slices
        cache, p, scale = _token_inputs(2, d, cache_dtype, **small)
        check(cache, p, scale, torch.bfloat16, config=(4, 4, 0, "vsp"), what=f"D={d}")
    cache, p, scale = _token_inputs(3, 576, torch.float8_e4m3fn, starts=False, **small)
    check(cache, p, scale, torch.bfloat16, config=(4, 4, 2), what="persistent, no seq_starts")
    check(cache, p, scale, torch.float16, config=(8, 4, 0), paged=True, what="paged")
    check(cache, p, None, torch.float32, config=(16, 4, 1), paged=True, what="paged persistent, no scale")
    for out_dtype in OUT_DTYPES:
        cache, p, _ = _token_inputs(4, 656, None, "fp8_ds_mla", **small)
        check(cache, p, None, out_dtype, "fp8_ds_mla", config=(8, 4, 0), what=f"ds_mla {out_dtype}")
        check(cache, p, None, out_dtype, "fp8_ds_mla", config=(8, 2, 0, "vs"), what=f"ds_mla {out_dtype} vs")
        check(cache, p, None, out_dtype, "fp8_ds_mla", config=(8, 4, 0, "r"), what=f"ds_mla {out_dtype} r")
        check(cache, p, None, out_dtype, "fp8_ds_mla", config=(8, 2, 0, "vr"), what=f"ds_mla {out_dtype} vr")
    check(cache, p, None, torch.bfloat16, "fp8_ds_mla", what="ds_mla CONFIG")  # config None: CONFIG's
    c5, p5, s5 = _token_inputs(5, 576, torch.float8_e4m3fn, **small)
    check(c5, p5, s5, torch.bfloat16, what="576 CONFIG")
    check(cache, p, None, torch.bfloat16, "fp8_ds_mla", config=(4, 4, 1), paged=True, what="ds_mla paged")
    # config flag "a" (the Gluon cp.async kernel, CUDA sm_90+ only): CPU tensors take ASYNC_FALLBACK (Triton)
    assert gmod.async_unsupported(cache, cache, "fp8_ds_mla", (32, 4, 2, "ap", 3)) == "not a CUDA tensor"
    check(cache, p, None, torch.bfloat16, "fp8_ds_mla", config=(32, 4, 2, "ap", 3), what="async config on CPU")
    check(c5, p5, s5, torch.float16, config=(32, 4, 1, "a", 4), paged=True, what="async config on CPU, paged")
    # out-of-range indices: zeros, wrap like torch, and no read outside the cache or a block-table row
    cache, p, scale = _oob_problem()
    poison = cache.shape[0] - 1
    bt = p.block_table.clone()
    bt[p.block_table == poison] = 0  # valid entries never name the poison block
    bt[2, 0] = cache.shape[0]        # first block past the cache (the NaN block of the larger buffer)
    bt[0, 1] = -cache.shape[0] - 1   # wraps to -1: still out of range (the NaN block before the cache)
    bt[2, 1] = -2                    # wraps to the block before last
    tts = p.token_to_seq.clone()
    tts[1] = 3                       # request id == batch
    ss = p.seq_starts.clone()
    ss[2] = 3 * 4                    # pushes request 2's last tokens past its row (into the poison columns)
    inner, bt_view = _poisoned(cache, bt, poison)
    bad = type(p)(bt_view, p.cu_seq_lens, tts, ss, p.num_blocks)
    for paged, cfg in ((False, (4, 4, 0)), (True, (4, 4, 0)), (False, (4, 2, 0, "vs")), (True, (8, 4, 0, "vs"))):
        out = check(inner, bad, scale, torch.bfloat16, config=cfg, paged=paged, what=f"out of range {paged} {cfg}")
        assert not bool(out.isnan().any()), "a read outside the cache or a block-table row"
        assert bool((out == 0).all(-1).any()), "out-of-range tokens write zeros"
    print(f"interpreter checks passed: {n_checks} launches")


if __name__ == "__main__":
    _interpreter_checks()
