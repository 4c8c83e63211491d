"""Device timing of the split merge (the combine kernel of every decode launcher) on its own, one GPU.

For the split counts the launchers pick on the issue-6 shapes (128 heads: B = 1 -> 64 splits (66 before session 7), B = 8 -> 8;
16 heads: B = 32 -> 4), the first version's launch (one program a (request, head), 8 splits a step) against
combine_config's (latent chunks, up to 8192 values a step), and the bytes moved (fp32 partials read, output written)
as GB/s. Median of CUDA-graph replays (bench_decode.time_us over 8 distinct workspaces, so nothing stays in L2 from
the previous replay more than it would after the split kernel). Numerics: both configs against a float64 merge.
Session 14: --bf16 (bf16 partials, the op's plan at many short splits), --hot (one workspace re-read by every call,
as in L2 right after the split kernel wrote it).

  PYTHONPATH=. python3 benchmarks/dev_combine.py      # JSON to $OUT/dev_combine.json, else benchmarks/results/
  PYTHONPATH=. python3 benchmarks/dev_combine.py --extra 64x64,128x32,256x32 --shapes 1x128x64,8x128x8
      # more (BLOCK_L x BLOCK_S) configs timed beside the two, on the shapes named (B x H x splits)
"""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import bench_decode as bd  # noqa: E402
from fx_mla.ops._decode_launch import combine_config, combine_splits  # noqa: E402

L = 512
SHAPES = [(1, 128, 66), (1, 128, 64), (1, 128, 33), (8, 128, 8), (32, 16, 4), (16, 128, 4)]


def main():
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--extra", default="", help="more BLOCK_LxBLOCK_S configs, e.g. 64x64,128x32")
    ap.add_argument("--shapes", default="", help="BxHxSPLITS,... (default: SHAPES)")
    ap.add_argument("--bf16", action="store_true", help="bf16 partials (the op's plan at many short splits)")
    ap.add_argument("--hot", action="store_true",
                    help="one workspace, re-read every call (in L2, as right after the split kernel wrote it)")
    args = ap.parse_args()
    extra = [tuple(int(v) for v in c.split("x")) for c in args.extra.split(",") if c]
    shapes = [tuple(int(v) for v in c.split("x")) for c in args.shapes.split(",") if c] or SHAPES
    rows = []
    for batch, heads, splits in shapes:
        ws = []
        for i in range(1 if args.hot else 8):
            g = torch.Generator(device="cuda").manual_seed(i)
            po = torch.randn(batch, splits, heads, L, device="cuda", generator=g)
            po = po.bfloat16() if args.bf16 else po
            pl = torch.randn(batch, splits, heads, device="cuda", generator=g) * 3
            ws.append((po, pl))
        ws = ws * 8 if args.hot else ws  # eight calls a graph either way (a graph's own launch cost spread as before)
        po, pl = ws[0]
        lse64 = torch.logsumexp(pl.double(), 1)
        ref = (torch.exp(pl.double() - lse64[:, None])[..., None] * po.double()).sum(1)
        row = dict(batch=batch, heads=heads, splits=splits, partials=str(po.dtype), hot=args.hot,
                   bytes=batch * splits * heads * (L * po.element_size() + 4) + batch * heads * (L * 2 + 4))
        chosen = combine_config(batch, heads, splits, L, torch.cuda.get_device_properties(0).multi_processor_count)
        configs = [("first", (512, min(8, 1 << (splits - 1).bit_length()))), ("chosen", chosen[:2])]
        configs += [(f"{bl}x{bs}", (bl, bs)) for bl, bs in extra]
        for name, cfg in configs:
            out = torch.full((batch, heads, L), float("nan"), device="cuda", dtype=torch.bfloat16)
            lse = torch.full((batch, heads), float("nan"), device="cuda")
            combine_splits(po, pl, out, lse, splits, L, config=cfg)
            err = float((out.double() - ref).norm() / ref.norm())
            lerr = float((lse.double() - lse64).abs().max())
            us, how = bd.time_us(lambda w: combine_splits(w[0], w[1], out, lse, splits, L, config=cfg), ws)
            row[name] = dict(config=list(cfg), us=us, timing=how, gbps=row["bytes"] / us / 1e3, rel_err=err,
                             lse_err=lerr)
        row["speedup"] = row["first"]["us"] / row["chosen"]["us"]
        for name, _ in configs[2:]:
            print(f"   {name}: {row[name]['us']:7.2f} us ({row[name]['gbps']:6.0f} GB/s) err {row[name]['rel_err']:.1e}",
                  flush=True)
        rows.append(row)
        print(f"B={batch:3d} H={heads:3d} splits={splits:3d}  first {row['first']['us']:7.2f} us "
              f"({row['first']['gbps']:6.0f} GB/s)  chosen {tuple(row['chosen']['config'])} {row['chosen']['us']:7.2f} us "
              f"({row['chosen']['gbps']:6.0f} GB/s)  x{row['speedup']:.2f}  err {row['chosen']['rel_err']:.1e}",
              flush=True)
    res = dict(name="dev_combine", device=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=__import__("triton").__version__, rows=rows)
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    with open(os.path.join(out_dir, "dev_combine_hot.json" if args.hot else "dev_combine.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
