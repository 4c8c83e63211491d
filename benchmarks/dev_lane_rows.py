"""Conflict-free conversion stores in the Gluon decode kernels: LANES "1x32" / "8x4" / "q2x4", one GPU (issue 6).

Nsight Compute on 1x H100 (session 5) showed the FP8 -> fp16 tile stores of the seesaw (128 heads) and gluon16
(16 heads) kernels 8.5-8.9-way bank-conflicted: a warp's lanes covered one tile row, whose 128-byte swizzle columns
lie 8 KB apart on the same banks. "8x4" (8 rows x 4 lanes) and "q2x4" (2 rows x 16 lanes, each quarter warp 2 rows
x 4 lanes) make them conflict-free (kernels/mla_decode_gluon.py, lat_layout). This times the op
(torch.ops.fx_mla.mla_decode_fp8: the kernel + its split combine) on the six issue-6 shapes with each setting (same
run, same inputs, alternating), after checking each output against the
fp32 reference (rel err of out, max abs err of lse), with bench_decode's method (block 64, e4m3 cache, bf16 query,
CUDA-graph medians over rotated block tables) and its roofline (copy and bf16 matmul measured here).

    PYTHONPATH=. python3 benchmarks/dev_lane_rows.py     # JSON to $OUT/dev_lane_rows.json, else benchmarks/results/
Any other module setting the same way, e.g. the seesaw kernel against its producer form:
    PYTHONPATH=. python3 benchmarks/dev_lane_rows.py --attr VARIANT --modules seesaw --values seesaw,producer \
        --shapes 1x128x65536,8x128x16384,16x128x32768,64x128x4096
"""
from __future__ import annotations

import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import bench_decode as bd  # noqa: E402
from fx_mla.ops import _decode_launch as launch_mod  # noqa: E402
from fx_mla.ops import mla_decode_fp8 as dmod  # noqa: E402
from fx_mla.ops import mla_decode_gluon16 as g16  # noqa: E402
from fx_mla.ops import mla_decode_seesaw as ss  # noqa: E402

SHAPES = [(1, 128, 65536), (8, 128, 16384), (16, 128, 32768), (64, 128, 4096), (32, 16, 16384), (128, 16, 8192)]


SETTINGS = ("1x32", "8x4", "q2x4")  # LANES: sessions 2-4; 8 rows x 4 lanes; 2 rows x 16 lanes, quarter-warp tiled
MODULES = {"seesaw": ss, "gluon16": g16, "launch": launch_mod}  # launch: the split workspace (PARTIAL_BF16)


def _key(value):
    """Row key part of a setting: "VARIANT=producer+LANES=8x4" -> "variant_producer_lanes_8x4"."""
    return value.replace("=", "_").replace("+", "_").lower() if "=" in value else value


def main():
    import argparse
    global SHAPES, SETTINGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2, help="timings of each setting, alternating")
    ap.add_argument("--attr", default="LANES", help="the module setting to vary (default LANES)")
    ap.add_argument("--modules", default="seesaw,gluon16", help="modules whose --attr is set: seesaw, gluon16")
    ap.add_argument("--values", default="",
                    help="comma-separated values of --attr (default: the LANES settings); a value of the form "
                         "ATTR=v+ATTR2=w sets several module settings at once, e.g. VARIANT=producer+LANES=8x4")
    ap.add_argument("--shapes", default="", help="BxHxS,... (default: the six issue-6 shapes)")
    ap.add_argument("--ragged", action="store_true",
                    help="request lengths drawn uniformly from [1, S] (seeded) instead of all S; the floor counts the "
                         "tokens there are")
    args = ap.parse_args()
    reps = args.reps
    if args.values:
        SETTINGS = tuple(args.values.split(","))
    if args.shapes:
        SHAPES = [tuple(int(v) for v in x.split("x")) for x in args.shapes.split(",")]
    mods = [MODULES[m] for m in args.modules.split(",")]

    def _pairs(value):
        if "=" not in value:
            return [(args.attr, value)]
        pairs = [kv.split("=", 1) for kv in value.split("+")]
        literal = {"True": True, "False": False}  # e.g. STAGED_O=False must be False, not the string "False"
        return [(a, int(v) if v.isdigit() else literal.get(v, v)) for a, v in pairs]  # e.g. PRODUCER_DEPTH=2

    attrs = sorted({a for v in SETTINGS for a, _ in _pairs(v)})
    for a in attrs:
        if not any(hasattr(m, a) for m in mods):
            raise SystemExit(f"--values: none of the modules {args.modules} has a setting {a}")
    # a setting goes to the modules that have it (e.g. --modules seesaw,launch: STAGED_O to the one, PARTIAL_BF16
    # to the other)
    defaults = {(i, a): getattr(m, a) for i, m in enumerate(mods) for a in attrs if hasattr(m, a)}

    def _set(value):
        for m in mods:
            for a, v in _pairs(value):
                if hasattr(m, a):
                    setattr(m, a, v)
        for (i, a), v in defaults.items():  # settings a value does not name keep their defaults
            if a not in dict(_pairs(value)):
                setattr(mods[i], a, v)

    pre = args.attr.lower()  # row keys: f"{pre}_{value}", e.g. lanes_q2x4
    copy_tbps, mm_tflops = bd.measure_ceilings()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}: copy "
          f"{copy_tbps:.2f} TB/s, bf16 matmul {mm_tflops:.0f} TFLOP/s", flush=True)
    rows = []
    for batch, heads, ctx in SHAPES:
        cache, tables, lens, k_scale, q, _, _ = bd.make_inputs(batch, heads, ctx, 3)
        if args.ragged:
            g = torch.Generator().manual_seed(batch * 7919 + ctx)
            lens = torch.randint(1, ctx + 1, (batch, ), generator=g, dtype=torch.int32).cuda()
        ref_o, ref_l = dmod.mla_decode_fp8_reference(q, cache, tables[0], lens, k_scale, None, bd.SM_SCALE, bd.LAT,
                                                     torch.float32)
        op = (lambda t: torch.ops.fx_mla.mla_decode_fp8(q, cache, t, lens, k_scale, None, bd.SM_SCALE, bd.LAT,
                                                        torch.bfloat16))
        tokens = int(lens.sum())
        kv_bytes = tokens * bd.D
        flops = 2 * heads * tokens * (bd.D + bd.LAT)
        floor_us = max(kv_bytes / (copy_tbps * 1e12), flops / (mm_tflops * 1e12)) * 1e6
        row = dict(batch=batch, heads=heads, context=ctx, floor_us=floor_us, ragged=args.ragged, tokens=tokens)
        for rep in range(reps):  # 1, 2, 8, 1, 2, 8: drift shows as a difference between the two runs of one setting
            for lanes in SETTINGS:
                _set(lanes)
                o, lse = op(tables[0])
                torch.cuda.synchronize()
                err = bd.rel_err(o, ref_o)
                lse_err = float((lse - ref_l).abs().max())
                us, how = bd.time_us(op, tables)
                key = f"{pre}_{_key(lanes)}"
                row.setdefault(key, []).append(dict(us=us, how=how, err=err, lse_err=lse_err))
        for key in (f"{pre}_{_key(x)}" for x in SETTINGS):
            best = min(r["us"] for r in row[key])
            row[f"{key}_us"] = best
            row[f"{key}_pct_roofline"] = 100 * floor_us / best
            row[f"{key}_ok"] = all(r["err"] < 1e-2 and r["lse_err"] < 1e-3 for r in row[key])
        rows.append(row)
        cells = " | ".join(f"{x}: " + "/".join("%.1f" % r["us"] for r in row[f"{pre}_{_key(x)}"])
                           + f" us ({row[f'{pre}_{_key(x)}_pct_roofline']:.1f} %)" for x in SETTINGS)
        err = max(r["err"] for x in SETTINGS for r in row[f"{pre}_{_key(x)}"])
        lse_err = max(r["lse_err"] for x in SETTINGS for r in row[f"{pre}_{_key(x)}"])
        ok = all(row[f"{pre}_{_key(x)}_ok"] for x in SETTINGS)
        print(f"{batch:>4}x{heads:<3}x{ctx:<6} floor {floor_us:7.1f} us | {cells} | err {err:.1e} lse {lse_err:.1e} "
              f"ok {ok}", flush=True)
        del cache, tables
        torch.cuda.empty_cache()
    for (i, a), v in defaults.items():
        setattr(mods[i], a, v)
    payload = dict(name="dev_lane_rows", attr=args.attr, modules=args.modules, settings=list(SETTINGS),
                   device=torch.cuda.get_device_name(), torch=torch.__version__,
                   triton=triton.__version__, copy_tbps=copy_tbps, mm_tflops=mm_tflops, rows=rows)
    out = os.path.join(os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                       "dev_settings.json" if any("=" in v for v in SETTINGS)
                       else "dev_lane_rows.json" if args.attr == "LANES" else f"dev_{pre}.json")
    with open(out, "w") as f:
        json.dump(payload, f, indent=1)


if __name__ == "__main__":
    main()
