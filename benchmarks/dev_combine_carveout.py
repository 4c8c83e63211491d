"""Does the split combine pay for a shared-memory carve-out change? (issue 6), one GPU.

The scorer kernel uses ~225 KiB of shared memory a block, so Triton's loader marks it CU_FUNC_CACHE_PREFER_SHARED;
the combine kernel (little shared memory) keeps the driver's default, under which the SM may run it with a larger L1
split. Between kernels of different carve-outs an SM reconfigures its L1 / shared memory. This times the op
(bench_decode's CUDA-graph method: scorer, combine, next scorer, ...) with the combine kernel's compiled functions
left as loaded and set to prefer shared memory (cuFuncSetCacheConfig PREFER_SHARED and a 100 % preferred carve-out,
through the driver API), alternating, after checking each output against the fp32 reference.

    PYTHONPATH=. python3 benchmarks/dev_combine_carveout.py [--shapes 1x128x65536,8x128x16384]
    # JSON to $OUT/dev_combine_carveout.json, else benchmarks/results/
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import bench_decode as bd  # noqa: E402
from fx_mla.ops import _decode_launch as launch_mod  # noqa: E402
from fx_mla.ops import mla_decode_fp8 as dmod  # noqa: E402
from fx_mla.ops.kernels.mla_decode_fp8 import _mla_decode_fp8_combine_kernel as combine_kernel  # noqa: E402

def set_preference(jit_fn, shared: bool) -> int:
    """Every compiled function of `jit_fn`: prefer shared memory (100 % carve-out) or the driver's default."""
    if not shared:
        launch_mod.reset_shared_preference()
        return 0
    n = 0
    for kernel_cache, *_ in jit_fn.device_caches.values():
        for k in kernel_cache.values():
            k._init_handles()
            launch_mod.prefer_shared_memory(k)
            n += 1
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1x128x65536,8x128x16384")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}", flush=True)
    rows = []
    for shp in args.shapes.split(","):
        b, h, c = (int(v) for v in shp.split("x"))
        cache, tables, lens, k_scale, q, _, _ = bd.make_inputs(b, h, c, 3)
        ref_o, _ = dmod.mla_decode_fp8_reference(q, cache, tables[0], lens, k_scale, None, bd.SM_SCALE, bd.LAT,
                                                 torch.float32)
        op = (lambda t: torch.ops.fx_mla.mla_decode_fp8(q, cache, t, lens, k_scale, None, bd.SM_SCALE, bd.LAT,
                                                        torch.bfloat16))
        op(tables[0])
        torch.cuda.synchronize()
        row = dict(batch=b, heads=h, context=c, default=[], prefer_shared=[])
        for _ in range(args.reps):
            for key, shared in (("default", False), ("prefer_shared", True)):
                n = set_preference(combine_kernel, shared)
                o, _ = op(tables[0])
                torch.cuda.synchronize()
                err = bd.rel_err(o, ref_o)
                us, how = bd.time_us(op, tables)
                row[key].append(dict(us=us, err=err, functions=n, how=how))
        set_preference(combine_kernel, False)
        rows.append(row)
        print(f"{b} x {h} x {c}: default " + " / ".join(f"{r['us']:.1f}" for r in row["default"])
              + " us | combine prefers shared " + " / ".join(f"{r['us']:.1f}" for r in row["prefer_shared"])
              + f" us | err {max(r['err'] for r in row['default'] + row['prefer_shared']):.1e}", flush=True)
        del cache, tables
        torch.cuda.empty_cache()
    path = os.path.join(os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                        "dev_combine_carveout.json")
    with open(path, "w") as f:
        json.dump(dict(name="dev_combine_carveout", device=torch.cuda.get_device_name(), torch=torch.__version__,
                       triton=triton.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
