"""Compile the 128-head Gluon decode kernels for sm_90 without a GPU (and without torch): registers, spills, shared
memory, setmaxnreg values, and optionally the SASS. Needs a Triton 3.6 install (the Gluon kernels' validated
version; it ships ptxas), e.g. `python3 -m venv /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0`:

    /tmp/t36/bin/python benchmarks/dev_offline_sm90.py --kernel scorer [--sass /tmp/scorer.sass]
    /tmp/t36/bin/python benchmarks/dev_offline_sm90.py --kernel seesaw --set PRODUCER=True,WORKER_REGS=200
    /tmp/t36/bin/python benchmarks/dev_offline_sm90.py --set MERGE=True,SPLITS_POW2=64,STAGED=True,PART_BF16=True
        (PART_BF16: bf16 split partials; not a kernel constexpr)

The fx_mla packages are stubbed (their __init__ imports torch); only the kernel modules are imported.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stub_packages():
    for name, rel in (("fx_mla", "fx_mla"), ("fx_mla.ops", "fx_mla/ops"), ("fx_mla.ops.kernels", "fx_mla/ops/kernels")):
        mod = types.ModuleType(name)
        mod.__path__ = [os.path.join(ROOT, rel)]
        sys.modules[name] = mod


ARGS = [("q_ptr", "*bf16"), ("kv_ptr", "*fp8e4nv"), ("block_table_ptr", "*i32"), ("seq_lens_ptr", "*i32"),
        ("k_scale_ptr", "*fp32"), ("q_scale_ptr", "*fp32"), ("out_ptr", "*bf16"), ("lse_ptr", "*fp32"),
        ("part_o_ptr", "*fp32"), ("part_lse_ptr", "*fp32"), ("sm_scale", "fp32"), ("num_heads", "i32"),
        ("num_splits", "i32"), ("num_blocks", "i32"), ("max_blocks", "i32"), ("stride_q_b", "i32"),
        ("stride_q_h", "i32"), ("blk_words", "i32"), ("tok_words", "i32"), ("stride_bt_b", "i32"),
        ("stride_o_b", "i32"), ("stride_o_h", "i32")]
COMMON = dict(PAGE=64, L=512, R=64, BLOCK_H=64, Q_SHIFT=8, HAS_Q_SCALE=False, E5M2=False, SINGLE_SPLIT=False,
              ONE_PAGE=True, LANES="q2x4", num_warps=4)
KERNELS = {
    "scorer": ("fx_mla.ops.kernels.mla_decode_scorer", "_mla_decode_scorer_kernel",
               dict(TILE=64, HELPER_REGS=160, PRODUCER_REGS=112)),
    "seesaw": ("fx_mla.ops.kernels.mla_decode_seesaw", "_mla_decode_seesaw_kernel",
               dict(BLOCK_N=32, WORKER_REGS=256)),
}


def _value(v: str):
    return {"True": True, "False": False}.get(v, int(v) if v.lstrip("-").isdigit() else v)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", default="scorer", choices=sorted(KERNELS))
    ap.add_argument("--set", default="", help="constexpr overrides, NAME=value,...")
    ap.add_argument("--sass", default="", help="write the SASS here (nvdisasm of the cubin)")
    args = ap.parse_args()
    _stub_packages()
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    modname, fname, extra = KERNELS[args.kernel]
    fn = getattr(importlib.import_module(modname), fname)
    consts = dict(COMMON, **extra)
    for kv in filter(None, args.set.split(",")):
        k, v = kv.split("=", 1)
        consts[k] = _value(v)
    num_warps = consts["num_warps"]
    sig = dict(ARGS)
    if consts.pop("PART_BF16", False):
        sig["part_o_ptr"] = "*bf16"
    for name in fn.arg_names:
        if name not in sig:
            sig[name] = "constexpr"
    import inspect
    for name, par in inspect.signature(fn.fn).parameters.items():  # the kernel's own constexpr defaults
        if par.default is not inspect.Parameter.empty:
            consts.setdefault(name, par.default)
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    if consts.get("PROBE"):  # the scorer's development probe: an int64 buffer
        sig["probe_ptr"] = "*i64"
        consts.pop("probe_ptr", None)
    if consts.get("MERGE"):  # the scorer's in-kernel split merge: its int32 barrier counter
        sig["merge_ctr_ptr"] = "*i32"
        consts.pop("merge_ctr_ptr", None)
    src = GluonASTSource(fn, sig, constexprs=consts)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
    meta = k.metadata
    ptx = k.asm.get("ptx", "")
    regs = sorted(set(re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", ptx)))
    print(f"{args.kernel}: shared {meta.shared} B, setmaxnreg {regs}, consts {consts}")
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(k.asm["cubin"])
        bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
        res = subprocess.run([os.path.join(bindir, "cuobjdump"), "-res-usage", cubin], capture_output=True, text=True)
        print(res.stdout.strip().splitlines()[-1] if res.stdout.strip() else res.stderr)
        if args.sass:
            sass = subprocess.run([os.path.join(bindir, "nvdisasm"), "-c", cubin], capture_output=True, text=True)
            with open(args.sass, "w") as f:
                f.write(sass.stdout)
            print(f"SASS: {args.sass} ({sass.stdout.count(chr(10))} lines)")
    # ptxas' spill report is in the compile log when there are any
    for line in (getattr(k, "asm", {}).get("ptxas_log", "") or "").splitlines():
        print(line)


if __name__ == "__main__":
    main()
