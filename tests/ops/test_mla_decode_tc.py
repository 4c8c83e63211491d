"""The tensor-core split-K kernels of fx_mla::mla_decode_fp8 ("wide": 64 heads a program with the delayed P.V;
"narrow": scores^T = K Q^T for few heads) under TRITON_INTERPRET=1 against the float64 reference: every query /
cache dtype pair, block sizes 16 and 64, split counts 1, 3 and the launcher's, empty requests, partial head groups,
latent widths that are not a multiple of the 128-entry chunk (and no rope), fp32 / fp16 outputs, and clamped bad
metadata. Run as a script with TRITON_INTERPRET=1 it performs the checks itself (the flag must be set before triton
is imported, hence the subprocess).
"""
import os
import subprocess
import sys

import torch

from fx_mla.ops import mla_decode_fp8 as dmod
from tests.ops.mla_decode_fp8_cases import check_close, make_problem, reference_f64

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
C = dmod.DecodeConfig


def test_tc_config_kinds():
    assert C(16, 64, 4, 1, 1, kind="narrow").kind == "narrow"
    assert C(64, 64, 8, 1, 1).kind == "base"
    try:
        C(16, 64, 4, 1, 1, kind="fast")
    except ValueError as e:
        assert "kind" in str(e)
    else:
        raise AssertionError("an unknown kind must raise")


def test_cuda_kernel_choice(monkeypatch):
    q = torch.zeros(2, 128, 576, dtype=torch.bfloat16)
    kv = torch.zeros(4, 64, 576, dtype=E4M3)
    assert dmod.cuda_kernel_choice(q, kv, 512) == "triton"  # CPU tensors: the Gluon kernel declines
    monkeypatch.setattr(dmod, "DECODE_KERNEL", "gluon")
    try:
        dmod.cuda_kernel_choice(q, kv, 512)
    except RuntimeError as e:
        assert "FX_MLA_DECODE_KERNEL=gluon" in str(e) and "CUDA" in str(e)
    else:
        raise AssertionError("a forced Gluon kernel that cannot run must raise")
    monkeypatch.setattr(dmod, "DECODE_KERNEL", "fastest")
    try:
        dmod.cuda_kernel_choice(q, kv, 512)
    except ValueError as e:
        assert "'auto', 'triton' or 'gluon'" in str(e)
    else:
        raise AssertionError("an unknown kernel choice must raise")


def test_wide_kind_declines_fp8_x_fp8():
    p = make_problem([5], 64, 16, E4M3, E4M3, seed=1)
    try:
        dmod.launch_mla_decode_fp8(*p.args(torch.bfloat16), config=C(64, 16, 8, 1, 1, kind="wide"))
    except ValueError as e:
        assert "'wide'" in str(e) and "FP8" in str(e)
    else:
        raise AssertionError("the wide kind must decline FP8 x FP8")


def test_tc_kernels_interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "tc interpreter checks passed" in r.stdout


def _run(p, cfg, splits, out_dtype=torch.bfloat16):
    batch, heads, _ = p.q.shape
    out = torch.full((batch, heads, p.kv_lora_rank), float("nan"), dtype=out_dtype)
    lse = torch.full((batch, heads), float("nan"), dtype=torch.float32)
    res = dmod.launch_mla_decode_fp8(*p.args(out_dtype), out=out, lse=lse, poison_workspace=True, config=cfg,
                                     num_splits=splits)
    assert res[0] is out and res[1] is lse
    return out, lse


def _checks():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    n = 0
    pairs = ((E4M3, torch.bfloat16), (E5M2, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
             (torch.float16, torch.float16), (E4M3, E4M3), (torch.bfloat16, E4M3), (E4M3, E5M2))
    narrow, narrow_n16 = C(16, 32, 4, 1, 1, kind="narrow"), C(16, 16, 4, 1, 1, kind="narrow")
    wide = C(64, 16, 8, 1, 1, kind="wide")
    # every dtype pair, both block sizes, splits 1 / 3 / launcher's, an empty request; narrow at 16 heads
    for i, (cache_dtype, q_dtype) in enumerate(pairs):
        for block_size, splits, cfg in ((16, 1, narrow), (64, 3, narrow_n16), (16, None, narrow)):
            p = make_problem([45, 0] if block_size == 16 else [100, 0], 16, block_size, cache_dtype, q_dtype,
                             seed=10 * i + block_size)
            check_close(*_run(p, cfg, splits), *reference_f64(p), what=f"narrow {cache_dtype}/{q_dtype}/"
                                                                        f"bs{block_size}/splits{splits}")
            n += 1
    # the wide kernel: 128 heads (two groups), a split whose first tile is its only one, and empty splits
    for cache_dtype, q_dtype in pairs[:1] + pairs[2:3] + pairs[5:6]:
        for lens, splits in (([19, 0, 40], 1), ([33, 5], 3)):
            p = make_problem(lens, 128, 16, cache_dtype, q_dtype, seed=n)
            check_close(*_run(p, wide, splits), *reference_f64(p), what=f"wide {cache_dtype}/{q_dtype}/{lens}")
            n += 1
    # partial head groups: 8 and 20 heads narrow, 80 heads wide
    for heads, cfg in ((8, narrow), (20, narrow), (80, wide)):
        p = make_problem([37, 12], heads, 16, E4M3, seed=heads)
        check_close(*_run(p, cfg, 2), *reference_f64(p), what=f"{heads} heads {cfg.kind}")
        n += 1
    # latent widths off the 128-entry chunk (3 chunks), no rope, other outputs
    for lat, rope, out_dtype in ((48, 16, torch.float32), (64, 0, torch.float16), (320, 40, torch.float32)):
        for cfg, heads in ((narrow, 16), (wide, 64)):
            p = make_problem([30, 17], heads, 16, E4M3, seed=lat, kv_lora_rank=lat, rope=rope)
            check_close(*_run(p, cfg, 2, out_dtype), *reference_f64(p), what=f"{cfg.kind} L{lat} R{rope}")
            n += 1
    # bad metadata never reads out of bounds: lengths past the table, block ids past the cache are clamped
    for cfg, heads in ((narrow, 16), (wide, 64)):
        p = make_problem([20, 5], heads, 16, E4M3, seed=9)
        p.seq_lens += 1000
        p.block_table[1, 0] = 10_000
        p.block_table[0, 1] = -5
        raw = p.kv_cache.view(torch.uint8)
        raw[raw == 0x7F] = 1  # no NaN slots: every clamped read lands on finite data
        out, lse = _run(p, cfg, 1)
        assert torch.isfinite(lse).all() and torch.isfinite(out.float()).all()
        n += 1
    print(f"tc interpreter checks passed ({n})")


if __name__ == "__main__":
    _checks()
