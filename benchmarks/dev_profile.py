"""Driver for Nsight Compute: one warm launch of each kernel the issue-5/6 targets hinge on, one GPU.

    ncu --clock-control none --profile-from-start off --set full -o prof python3 benchmarks/dev_profile.py \
        [--which decode16,decode128,b1,gather] [--seesaw-variants seesaw,producer]

Cases (block 64, e4m3 cache, bf16 query, full-length requests over permuted pages, as bench_decode.py):
  decode16   32 x 16 x 16384 through torch.ops.fx_mla.mla_decode_fp8 (gluon16 ws8p2 + combine)
  decode128  16 x 128 x 8192 (seesaw + combine; fewer tokens than the benchmark's 32K, same per-tile loop)
  b1         1 x 128 x 65536 (seesaw, 64 splits (66 before session 7), + combine)
  gather     65536 tokens, token form, e4m3 576 -> bf16 (fx_mla::gather_dequant_cache)
  b8, b64    8 x 128 x 16384 (8 splits) and 64 x 128 x 4096 (one split): where the seesaw kernel and its producer
             form trade places (RESULTS.md, session 6)
  b8e, b64e  the same launches with every seq_len 0 (each CTA: query load, no pair, out = 0 / lse = -inf written):
             the ~12 us an empty launch costs (dev_fixed_cost.py, session 7) against ~2.7 us for a trivial kernel
  b8p2       8 x 128 x 16384 with seq_lens 1024 (two pairs a CTA at 8 splits)
--seesaw-variants: the 128-head cases run once with each mla_decode_seesaw.VARIANT named (default: the module's).
--gluon16-variants: decode16 runs once with each mla_decode_gluon16.VARIANT named (e.g. ws8p2,rs).
Every case runs twice (compile + warm) before a final launch, the only one profiled.
No timing here: ncu replays each kernel with its own clocks off (--clock-control none keeps them as they are).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import bench_decode as bd  # noqa: E402
from fx_mla.ops import gather_dequant_cache as gmod  # noqa: E402,F401  (registers the op)
from fx_mla.ops import mla_decode_fp8 as dmod  # noqa: E402,F401
from tests.ops.gather_dequant_cache_cases import bench_token_problem, device_random_cache  # noqa: E402


def _profile(on):
    """Only the third (warm) launch of each case is profiled (ncu --profile-from-start off)."""
    torch.cuda.synchronize()
    (torch.cuda.profiler.start if on else torch.cuda.profiler.stop)()


def _decode(batch, heads, ctx, seq_len=None):
    cache, tables, lens, k_scale, q, _, _ = bd.make_inputs(batch, heads, ctx, 1)
    if seq_len is not None:
        lens.fill_(seq_len)
    for i in range(3):
        _profile(i == 2)
        out, lse = torch.ops.fx_mla.mla_decode_fp8(q, cache, tables[0], lens, k_scale, None, bd.SM_SCALE, bd.LAT,
                                                   torch.bfloat16)
        _profile(False)
    print(f"decode {batch}x{heads}x{ctx} (seq_len {seq_len}): out finite {bool(torch.isfinite(out).all())}", flush=True)


def _gather(n):
    gen = torch.Generator(device="cuda").manual_seed(0)
    cgen = torch.Generator().manual_seed(0)
    num_blocks, bt, cu, tts, ss = bench_token_problem(n, "cuda", cgen)
    cache = device_random_cache(num_blocks, "plain", "cuda", gen)
    scale = torch.tensor(0.03, device="cuda")
    for i in range(3):
        _profile(i == 2)
        out = torch.ops.fx_mla.gather_dequant_cache(cache, bt, cu, tts, ss, scale, torch.bfloat16, "plain")
        _profile(False)
    print(f"gather {n}: out finite {bool(torch.isfinite(out).all())}", flush=True)


def main():
    from fx_mla.ops import mla_decode_gluon16 as g16
    from fx_mla.ops import mla_decode_seesaw as smod
    ap = argparse.ArgumentParser()
    ap.add_argument("--which", default="decode16,decode128,b1,gather")
    ap.add_argument("--seesaw-variants", default="")
    ap.add_argument("--gluon16-variants", default="")
    args = ap.parse_args()
    which = args.which.split(",")
    variants = args.seesaw_variants.split(",") if args.seesaw_variants else [smod.VARIANT]
    if "decode16" in which:
        default16 = g16.VARIANT
        for variant16 in args.gluon16_variants.split(",") if args.gluon16_variants else [default16]:
            g16.VARIANT = variant16
            print(f"gluon16 variant {variant16}", flush=True)
            _decode(32, 16, 16384)
        g16.VARIANT = default16
    for variant in variants:
        smod.VARIANT = variant
        print(f"seesaw variant {variant}", flush=True)
        for case, shape in (("decode128", (16, 128, 8192)), ("b1", (1, 128, 65536)), ("b8", (8, 128, 16384)),
                            ("b64", (64, 128, 4096)), ("b8e", (8, 128, 16384, 0)), ("b64e", (64, 128, 4096, 0)),
                            ("b8p2", (8, 128, 16384, 1024))):
            if case in which:
                _decode(*shape)
    if "gather" in which:
        _gather(65536)


if __name__ == "__main__":
    main()
