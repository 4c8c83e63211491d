"""Adversarial inputs to the op front ends (mla_decode_fp8, gather_dequant_cache{,_paged}, quant_fp8*) and to the
launchers a benchmark or test calls directly: a clear error naming the argument, or the documented result, never an
obscure error from deep inside, a fake (meta) output that disagrees with the real one, or a kernel indexing past a
tensor. CPU only; the Triton checks run under TRITON_INTERPRET=1 in a subprocess (the flag must be set before triton
is imported). Run as a script with TRITON_INTERPRET=1 it performs those checks itself.
"""
import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fx_mla.ops import gather_dequant_cache as gmod  # registers the ops
from fx_mla.ops import mla_decode_fp8 as dmod
from fx_mla.ops import quant_fp8 as qmod  # noqa: F401
from tests.ops.gather_dequant_cache_cases import random_cache, random_scale, token_problem
from tests.ops.mla_decode_fp8_cases import make_problem

OPS = torch.ops.fx_mla
DECODE = OPS.mla_decode_fp8.default
E4M3 = torch.float8_e4m3fn
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fake_and_real(op, *args):
    """(shapes and dtypes of the real outputs, of the fake ones) of op(*args)."""
    def summary(res):
        res = res if isinstance(res, (tuple, list)) else (res,)
        return [(tuple(t.shape), t.dtype) for t in res]
    real = summary(op(*args))
    mode = FakeTensorMode()
    fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode:
        fake = summary(op(*fake_args))
    return real, fake


def _decode_problem(lengths, q_dtype=torch.bfloat16, seed=0):
    return make_problem(lengths, 8, 16, E4M3, q_dtype, kv_lora_rank=48, rope=16, seed=seed)


# ---------------------------------------------------------------- mla_decode_fp8

def test_decode_edge_shapes_fake_matches_real():
    # gather_pages viewed an empty batch as [0, -1, D]: "cannot reshape tensor of 0 elements" on CPU only
    p = _decode_problem([9, 30], seed=11)
    args = list(p.args(torch.float16))
    args[0], args[2], args[3] = p.q[:0], p.block_table[:0], p.seq_lens[:0]
    real, fake = _fake_and_real(DECODE, *args)
    assert real == fake == [((0, 8, 48), torch.float16), ((0, 8), torch.float32)]
    ref_out, ref_lse = dmod.mla_decode_fp8_reference(*args)
    assert ref_out.shape == (0, 8, 48) and ref_lse.shape == (0, 8)
    one = _decode_problem([1], seed=12)
    real, fake = _fake_and_real(DECODE, *one.args(torch.float32))
    assert real == fake == [((1, 8, 48), torch.float32), ((1, 8), torch.float32)]


@pytest.mark.parametrize("q_dtype", [torch.bfloat16, E4M3])
def test_decode_one_element_scales_of_any_rank_act_as_0dim(q_dtype):
    # a [1, 1, 1, 1] k_scale / q_scale broadcast the CPU outputs to 4 dims (or failed in a matmul); fake said [B, H, L]
    p = _decode_problem([21, 5], q_dtype, seed=13)
    want_out, want_lse = DECODE(*p.args())
    args = list(p.args())
    args[4] = p.k_scale.reshape(1, 1, 1, 1)
    if q_dtype == E4M3:
        args[5] = p.q_scale.reshape(1, 1, 1, 1)
    real, fake = _fake_and_real(DECODE, *args)
    assert real == fake == [((2, 8, 48), torch.bfloat16), ((2, 8), torch.float32)]
    out, lse = DECODE(*args)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)


def test_decode_rejects_non_finite_sm_scale_and_takes_a_negative_one():
    # NaN / inf gave NaN outputs without a word
    p = _decode_problem([17, 4], seed=14)
    args = list(p.args(torch.float32))
    for bad in (float("nan"), float("inf"), float("-inf")):
        args[6] = bad
        with pytest.raises(ValueError, match=rf"sm_scale must be finite, got {bad}"):
            DECODE(*args)
        with pytest.raises(ValueError, match="sm_scale must be finite"):
            _fake_and_real(DECODE, *args)
    args[6] = -abs(p.sm_scale)  # finite: the math of any scale (the kernels scale before their running max)
    out, lse = DECODE(*args)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    q = p.q.float()[0]
    kv = p.kv_cache[p.block_table[0, :2].long()].reshape(-1, 64)[:17].float() * p.k_scale
    s = q @ kv.T * args[6]
    assert torch.allclose(lse[0], torch.logsumexp(s, -1), atol=1e-4)


def test_decode_rejects_cache_strided_in_its_last_dim_on_cpu_and_fake():
    # CPU: "view size is not compatible with input tensor's size and stride" from gather_pages; fake: accepted it
    p = _decode_problem([12, 3], seed=16)
    args = list(p.args())
    args[1] = p.kv_cache.transpose(1, 2).contiguous().transpose(1, 2)
    for call in (lambda: DECODE(*args), lambda: _fake_and_real(DECODE, *args)):
        with pytest.raises(ValueError, match=r"kv_cache must be contiguous in its last dim \(D\)"):
            call()


def _launch(p, **kw):
    return dmod.launch_mla_decode_fp8(*p.args(torch.bfloat16), **kw)


def test_triton_decode_launcher_checks_a_direct_call():
    # these reached the kernels unchecked: the interpreter wrote past `out` (heap corruption) and read past the table
    p = _decode_problem([10, 2], seed=17)
    with pytest.raises(ValueError, match=r"out must be a \[B=2, H=8, L=48\] tensor, got \(1, 8, 48\)"):
        _launch(p, out=torch.empty(1, 8, 48, dtype=torch.bfloat16), lse=torch.empty(1, 8))
    with pytest.raises(ValueError, match=r"lse must be a contiguous float32 \[B=2, H=8\] tensor"):
        _launch(p, out=torch.empty(2, 8, 48, dtype=torch.bfloat16), lse=torch.empty(8, 2).t())
    with pytest.raises(ValueError, match=r"out must be a \[B=2, H=8, L=48\] tensor, got NoneType"):
        _launch(p, lse=torch.empty(2, 8))
    short = make_problem([10, 2], 8, 16, E4M3, kv_lora_rank=48, rope=16, seed=17)
    short.block_table = short.block_table[:1]
    with pytest.raises(ValueError, match=r"block_table must be \[B=2, max_blocks\]"):
        _launch(short)
    fp8q = _decode_problem([10, 2], E4M3, seed=18)
    fp8q.q_scale = None
    with pytest.raises(TypeError, match=r"q_scale .* is required with an fp8 query"):
        _launch(fp8q)


# ---------------------------------------------------------------- gather_dequant_cache

def _gather_inputs(seed, lengths=(6, 0, 11)):
    g = torch.Generator().manual_seed(seed)
    p = token_problem(list(lengths), 4, g, starts=[2, 1, 3], padding=2)
    return random_cache(p.num_blocks, 4, 40, E4M3, g), p, random_scale(g)


def test_gather_launcher_checks_a_direct_calls_out():
    cache, p, scale = _gather_inputs(22)
    n = p.token_to_seq.numel()
    args = (cache, p.block_table, p.cu_seq_lens, p.token_to_seq, p.seq_starts, scale)
    for bad in (torch.empty(n + 3, 40, dtype=torch.bfloat16), torch.empty(n, 48, dtype=torch.bfloat16),
                torch.empty(40, n, dtype=torch.bfloat16).t(), torch.empty(n, 40, dtype=torch.float64)):
        with pytest.raises(ValueError, match=rf"out must be a contiguous bf16, fp16 or fp32 tensor of shape "
                                             rf"\({n}, 40\) on cpu"):
            gmod.launch_gather_dequant_cache(*args, bad, "plain", (8, 4, 0))
    paged = torch.empty(p.block_table.shape[0] + 1, p.block_table.shape[1] * 4, 40, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"out must be a contiguous .* of shape \(3, "):
        gmod.launch_gather_dequant_cache(cache, p.block_table, None, None, None, scale, paged, "plain", (8, 4, 0))


def test_triton_checks_interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "interpreter checks passed" in r.stdout


def _strided(x, gen):
    """x as every other element of a buffer whose other elements are random junk (what a contiguous read sees)."""
    buf = torch.randint(-7, 50, (x.shape[0], 2), generator=gen, dtype=x.dtype)
    buf[:, 0] = x
    return buf[:, 0]


def _interpreter_checks():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    n = 0
    # strided metadata vectors: the kernels read them as contiguous arrays (wrong rows, reads past their ends); no
    # empty request, whose cu_seq_lens entry would repeat the next one's
    cache, p, scale = _gather_inputs(31, (6, 3, 11))
    g = torch.Generator().manual_seed(32)
    for name in ("token_to_seq", "cu_seq_lens", "seq_starts"):
        meta = dict(cu_seq_lens=p.cu_seq_lens, token_to_seq=p.token_to_seq, seq_starts=p.seq_starts)
        meta[name] = _strided(meta[name], g)
        assert not meta[name].is_contiguous()
        args = (cache, p.block_table, meta["cu_seq_lens"], meta["token_to_seq"], meta["seq_starts"], scale)
        out = torch.full((p.token_to_seq.numel(), 40), float("nan"), dtype=torch.bfloat16)
        gmod.launch_gather_dequant_cache(*args, out, "plain", (4, 4, 0))
        ref = gmod.gather_dequant_cache_reference(*args, torch.bfloat16)
        assert torch.equal(out.view(torch.int16), ref.view(torch.int16)), f"strided {name}"
        n += 1
    print(f"interpreter checks passed ({n})")


if __name__ == "__main__":
    _interpreter_checks()
