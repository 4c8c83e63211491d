"""Where the split-K overhead of the 128-head decode goes (issue 6: B = 1 and B = 8 lose ~16-22 us to it), one GPU.

For 1 x 128 x 65536 and 8 x 128 x 16384 (block 64, e4m3 cache, bf16 query), medians of CUDA-graph replays
(bench_decode.time_us, rotated block tables) of the seesaw kernel as the op launches it:
  op            the whole step (split kernel + combine), automatic split count;
  kernel        the split kernel alone (the launcher's combine replaced by a no-op: partials written, never merged);
  single        one split a request (no partials, no combine; fewer CTAs: the per-CTA rate without split overhead);
  op_bf16part   the whole step with bf16 partials (_decode_launch.PARTIAL_BF16);
  kernel_bf16   the split kernel alone writing bf16 partials;
  op_pdl        the whole step with the combine as a programmatic dependent launch (_decode_launch.COMBINE_PDL).
Derived: combine = op - kernel (in place, partials hot in L2), partial-write cost = kernel - the single-split rate
scaled to the same tokens a CTA. Each variant's output is checked against the fp32 reference first (rel err, lse).

  PYTHONPATH=. python3 benchmarks/dev_split_overhead.py     # JSON to $OUT/dev_split_overhead.json, else results/
"""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import bench_decode as bd  # noqa: E402
from fx_mla.ops import _decode_launch as launch_mod  # noqa: E402
from fx_mla.ops import mla_decode_fp8 as dmod  # noqa: E402
from fx_mla.ops import mla_decode_seesaw as smod  # noqa: E402

SHAPES = [(1, 128, 65536), (8, 128, 16384)]


def _variant(name):
    """(launcher kwargs, PARTIAL_BF16, COMBINE_PDL, skip the combine)."""
    return {"op": ({}, False, False, False), "kernel": ({}, False, False, True),
            "single": ({"num_splits": 1}, False, False, False), "op_bf16part": ({}, True, False, False),
            "kernel_bf16": ({}, True, False, True), "op_pdl": ({}, False, True, False)}[name]


def main():
    rows = []
    real_combine = smod.combine_splits
    for batch, heads, ctx in SHAPES:
        cache, tables, lens, k_scale, q, _, _ = bd.make_inputs(batch, heads, ctx, 3)
        ref_o, ref_l = dmod.mla_decode_fp8_reference(q, cache, tables[0], lens, k_scale, None, bd.SM_SCALE, bd.LAT,
                                                     torch.float32)
        out = torch.empty(batch, heads, bd.LAT, dtype=torch.bfloat16, device="cuda")
        lse = torch.empty(batch, heads, device="cuda")
        row = dict(batch=batch, heads=heads, context=ctx,
                   auto_splits=launch_mod.num_splits_for(batch, heads // smod.BLOCK_H, ctx, 2 * smod.BLOCK_N,
                                                         torch.cuda.get_device_properties(0).multi_processor_count, 1))
        for name in ("op", "kernel", "single", "op_bf16part", "kernel_bf16", "op_pdl"):
            kw, bf16part, pdl, skip = _variant(name)
            launch_mod.PARTIAL_BF16, launch_mod.COMBINE_PDL = bf16part, pdl
            smod.combine_splits = (lambda *a, **k: None) if skip else real_combine
            call = lambda t, kw=kw: smod.launch_mla_decode_seesaw(  # noqa: E731
                q, cache, t, lens, k_scale, None, bd.SM_SCALE, bd.LAT, out, lse, **kw)
            try:
                call(tables[0])
                torch.cuda.synchronize()
                entry = {}
                if not skip:
                    entry.update(rel_err=float((out.float() - ref_o).norm() / ref_o.norm()),
                                 lse_err=float((lse - ref_l).abs().max()))
                entry["us"] = bd.time_us(call, tables)[0]
            except Exception as e:  # noqa: BLE001  (report, keep going)
                entry = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
            finally:
                smod.combine_splits = real_combine
                launch_mod.PARTIAL_BF16, launch_mod.COMBINE_PDL = False, False
            row[name] = entry
            print(f"{batch}x{heads}x{ctx} {name:>12}: {entry}", flush=True)
        us = {k: v.get("us") for k, v in row.items() if isinstance(v, dict)}
        if us.get("op") and us.get("kernel"):
            row["combine_in_place_us"] = us["op"] - us["kernel"]
        if us.get("single") and us.get("kernel"):
            row["single_split_us"] = us["single"]
        rows.append(row)
        del cache, tables
        torch.cuda.empty_cache()
    res = dict(name="dev_split_overhead", device=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=__import__("triton").__version__, rows=rows)
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    with open(os.path.join(out_dir, "dev_split_overhead.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
