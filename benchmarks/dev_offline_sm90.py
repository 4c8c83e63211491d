"""Compile the 128-head Gluon decode kernels for sm_90 without a GPU (and without torch): registers, spills, shared
memory, setmaxnreg values, and optionally the SASS. Needs a Triton 3.6 install (the Gluon kernels' validated
version; it ships ptxas), e.g. `python3 -m venv /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0`:

    /tmp/t36/bin/python benchmarks/dev_offline_sm90.py --kernel scorer [--sass /tmp/scorer.sass]
    /tmp/t36/bin/python benchmarks/dev_offline_sm90.py --kernel seesaw --set PRODUCER=True,WORKER_REGS=200
    /tmp/t36/bin/python benchmarks/dev_offline_sm90.py --kernel rs --set BALANCED=True,B_POW2=128
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
GATHER_ARGS = [("cache_ptr", "*fp8e4nv"), ("out_ptr", "*bf16"), ("scale_ptr", "*fp32"), ("tts_ptr", "*i32"),
               ("cu_ptr", "*i32"), ("ss_ptr", "*i32"), ("bt_ptr", "*i32")] + [
    (n, "i32") for n in ("n_tokens", "n_req", "max_blocks", "n_blocks", "bt_s0", "bt_s1", "c_s0", "c_s1", "row_len")]
GATHER = dict(D_OUT=576, P1=512, P2=64, P3=0, DS_MLA=False, BLOCK_SIZE=64, BLOCK_T=32, STAGES=4, PAGED=False,
              HAS_SEQ_STARTS=True, HAS_SCALE=True, PDL=True, PRODUCER_REGS=64, num_warps=4)
# the 16-head "rs" kernel (its TMA descriptors' signatures are filled in from PAGE and DT by _rs_signature)
RS_ARGS = [("q_ptr", "*bf16"), ("lat_desc", None), ("rope_desc", None), ("block_table_ptr", "*i32"),
           ("seq_lens_ptr", "*i32"), ("k_scale_ptr", "*fp32"), ("q_scale_ptr", "*fp32"), ("out_ptr", "*bf16"),
           ("lse_ptr", "*fp32"), ("part_o_ptr", "*fp32"), ("part_lse_ptr", "*fp32"), ("sm_scale", "fp32")] + [
    (n, "i32") for n in ("num_heads", "num_splits", "num_blocks", "max_blocks", "stride_q_b", "stride_q_h",
                         "stride_bt_b", "stride_o_b", "stride_o_h", "batch")] + [("tile_prefix_ptr", "*i32")]
RS = dict(PAGE=64, L=512, R=64, BLOCK_H=16, BLOCK_N=64, Q_SHIFT=8, HAS_Q_SCALE=False, E5M2=False, SINGLE_SPLIT=False,
          NUM_STAGES=4, DIM_MAJOR_STORE=False, BALANCED=False, B_POW2=32, SCORER_REGS=232, LOADER_REGS=40,
          num_warps=4)
# name: (module, kernel, constexprs, signature; None = the decode kernels' COMMON / ARGS)
KERNELS = {
    "scorer": ("fx_mla.ops.kernels.mla_decode_scorer", "_mla_decode_scorer_kernel",
               dict(TILE=64, HELPER_REGS=160, PRODUCER_REGS=112), None),
    "seesaw": ("fx_mla.ops.kernels.mla_decode_seesaw", "_mla_decode_seesaw_kernel",
               dict(BLOCK_N=32, WORKER_REGS=256), None),
    # the cp.async gather (issue 5); --set DS_MLA=True needs CACHE=u8 (the signature: --sig cache_ptr=*u8)
    "gather": ("fx_mla.ops.kernels.gather_dequant_cache_async", "_gather_dequant_cache_async_kernel", GATHER,
               GATHER_ARGS),
    # --set BALANCED=True,B_POW2=128 for the balanced schedule; E5M2=True for an e5m2 cache
    "rs": ("fx_mla.ops.kernels.mla_decode_gluon16_rs", "_mla_decode_gluon16_rs_kernel", RS, RS_ARGS),
}


def _rs_signature(sig, consts):
    """The rs kernel's TMA descriptor types (box rows min(PAGE, 64); 128-byte latent boxes, 64-byte rope boxes) and
    its shared-memory views as constexprs."""
    from fx_mla.ops.kernels import mla_decode_gluon16_rs as rmod
    box = min(consts["PAGE"], 64)
    dt = "fp8e5" if consts.get("E5M2") else "fp8e4nv"
    for name, width in (("lat_desc", 128), ("rope_desc", 64)):
        sig[name] = (f"tensordesc<{dt}[{box}, {width}],NVMMASharedLayout(swizzle_byte_width={width}, "
                     "element_bitwidth=8, rank=2, transposed=False, fp4_padded=False, cga_layout=[])>")
    consts.update(rmod.views(consts["BLOCK_N"], consts["BLOCK_H"], consts["L"], consts["R"]))


def _value(v: str):
    return {"True": True, "False": False}.get(v, int(v) if v.lstrip("-").isdigit() else v)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", default="scorer", choices=sorted(KERNELS))
    ap.add_argument("--set", default="", help="constexpr overrides, NAME=value,...")
    ap.add_argument("--sass", default="", help="write the SASS here (nvdisasm of the cubin)")
    ap.add_argument("--ptx", default="", help="write the PTX here")
    ap.add_argument("--maxnreg", type=int, default=0, help="the launch option maxnreg (0: none)")
    ap.add_argument("--div", default=None, help="arguments specialized as multiples of 16 (as the JIT does for "
                    "aligned pointers and ints), comma-separated; default: the gather's pointers, c_s0, c_s1")
    ap.add_argument("--sig", default="", help="argument type overrides, name=type,... (e.g. cache_ptr=*u8)")
    args = ap.parse_args()
    _stub_packages()
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    modname, fname, extra, sig_list = KERNELS[args.kernel]
    fn = getattr(importlib.import_module(modname), fname)
    consts = dict(COMMON, **extra) if sig_list is None else dict(extra)
    for kv in filter(None, args.set.split(",")):
        k, v = kv.split("=", 1)
        consts[k] = _value(v)
    num_warps = consts["num_warps"]
    sig = dict(ARGS if sig_list is None else sig_list)
    for kv in filter(None, args.sig.split(",")):
        k, v = kv.split("=", 1)
        sig[k] = v
    if args.kernel == "rs":
        _rs_signature(sig, consts)
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
    div = args.div if args.div is not None else (
        "cache_ptr,out_ptr,scale_ptr,tts_ptr,cu_ptr,ss_ptr,bt_ptr,c_s0,c_s1" if args.kernel == "gather" else "")
    attrs = {(fn.arg_names.index(n), ): [["tt.divisibility", 16]] for n in filter(None, div.split(","))}
    src = GluonASTSource(fn, sig, constexprs=consts, attrs=attrs)
    opts = dict(num_warps=num_warps)
    if args.maxnreg:
        opts["maxnreg"] = args.maxnreg
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    meta = k.metadata
    ptx = k.asm.get("ptx", "")
    if args.ptx:
        with open(args.ptx, "w") as f:
            f.write(ptx)
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
