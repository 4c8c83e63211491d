"""Which arithmetic does default Inductor's CUDA code use where fx_mla's passes must match it bitwise?

One GPU, under 2 minutes. For the graphs of the GPU xfail tests
(tests/gpu/test_quant_before_gather_gpu.py::test_quant_before_gather_bitwise_cuda_against_default_inductor and
the inductor-emulate case of tests/gpu/test_cache_gather_pass_gpu.py) it:
  1. compiles the unrewritten graph with Inductor and prints its generated Triton kernels that touch FP8;
  2. recomputes the FP8 bytes from the same input with candidate arithmetics (IEEE or Triton's approximate
     division, multiplication by an IEEE/approximate reciprocal, the scale rounded to x's dtype, the quotient
     rounded to x's dtype; for dynamic scales, amax / 448 or amax * fp32(1/448)) and prints the bytes each
     candidate gets wrong: 0 marks the arithmetic Inductor used;
  3. compiles the rewritten graph (the pass's current rule) and, where it differs, again with the exact candidate
     forced through the pass's diagnostic override, and prints the differing bytes of each.
Writes $OUT/diag_inductor.txt and prints it.

    PYTHONPATH=. python3 benchmarks/diag_inductor_rounding.py [--only qbg|cache]
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import sys
import time
import traceback

import torch
import torch.distributed as dist
import triton
import triton.language as tl

LINES: list = []


def log(*parts) -> None:
    line = " ".join(str(p) for p in parts)
    LINES.append(line)
    print(line, flush=True)


# ---------------------------------------------------------------------------------------------- candidate kernel
# Runtime mode switches (not constexpr): one compile per dtype pair serves every candidate.
DIV_MODES = {0: "x/s IEEE(div_rn)", 1: "x/s Triton '/' (div.full)", 2: "x*rcp(s) rcp IEEE", 3: "x*rcp(s) rcp '/'",
             4: "x*s (mul form)"}
SCALE_MODES = {0: "s fp32", 1: "s->x.dtype", 2: "rcp->x.dtype"}
Q_MODES = {0: "q fp32", 1: "q->x.dtype"}


@triton.jit
def _candidate_kernel(x_ptr, s_ptr, out_ptr, n, div_mode, scale_mode, q_mode, FMAX: tl.constexpr,
                      LOW: tl.constexpr, OUT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=1.0).to(tl.float32)
    s = tl.load(s_ptr + offs, mask=mask, other=1.0)
    s_low = s.to(LOW, fp_downcast_rounding="rtne").to(tl.float32)
    s = tl.where(scale_mode == 1, s_low, s)
    r_rn = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
    r_ap = 1.0 / s
    r_rn = tl.where(scale_mode == 2, r_rn.to(LOW, fp_downcast_rounding="rtne").to(tl.float32), r_rn)
    r_ap = tl.where(scale_mode == 2, r_ap.to(LOW, fp_downcast_rounding="rtne").to(tl.float32), r_ap)
    q = tl.where(div_mode == 0, tl.math.div_rn(x, s),
                 tl.where(div_mode == 1, x / s,
                          tl.where(div_mode == 2, x * r_rn, tl.where(div_mode == 3, x * r_ap, x * s))))
    q = tl.where(q_mode == 1, q.to(LOW, fp_downcast_rounding="rtne").to(tl.float32), q)
    q = tl.where(q != q, q, tl.minimum(tl.maximum(q, -FMAX), FMAX))
    tl.store(out_ptr + offs, q.to(OUT, fp_downcast_rounding="rtne"), mask=mask)


_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32,
       torch.float8_e4m3fn: tl.float8e4nv, torch.float8_e5m2: tl.float8e5}


def candidate(x, s_full, fp8, div_mode, scale_mode, q_mode):
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=fp8, device=x.device)
    n = x.numel()
    low = _TL[x.dtype] if x.dtype != torch.float32 else tl.float32
    _candidate_kernel[(triton.cdiv(n, 1024),)](x, s_full.contiguous(), out, n, div_mode, scale_mode, q_mode,
                                               FMAX=torch.finfo(fp8).max, LOW=low, OUT=_TL[fp8], BLOCK=1024)
    return out


def fp8_mismatches(got: torch.Tensor, want: torch.Tensor) -> int:
    """Differing bytes, NaN anywhere in ``want`` counted equal to any NaN in ``got``."""
    g, w = got.contiguous().view(-1), want.contiguous().view(-1)
    diff = g.view(torch.uint8) != w.view(torch.uint8)
    both_nan = g.float().isnan() & w.float().isnan()
    return int((diff & ~both_nan).sum())


# ---------------------------------------------------------------------------------------------- code capture
def fp8_kernels(codes, needles=("float8", "fp8")) -> list:
    out = []
    for code in codes:
        for name, src in re.findall(r"async_compile\.triton\('(\w+)', '''(.*?)'''", code, flags=re.S):
            if any(n in src for n in needles):
                body = src[src.find("def "):] if "def " in src else src
                out.append((name, body.strip()))
    return out


def print_kernels(title, codes, needles=("float8", "fp8"), limit=60):
    ks = fp8_kernels(codes, needles)
    log(f"  [{title}] {len(ks)} generated kernel(s) touching FP8:")
    for name, body in ks:
        lines = body.splitlines()
        log(f"  --- {name} ({len(lines)} lines)")
        for line in lines[:limit]:
            log("    | " + line)
        if len(lines) > limit:
            log(f"    | ... {len(lines) - limit} more lines")


# ---------------------------------------------------------------------------------------------- part A
def compile_fresh(module, passes, inner="inductor", **cfg):
    from tests.passes import quant_before_gather_cases as cases
    torch._dynamo.reset()
    reports: list = []
    return cases.compiled(module, passes, inner, reports), reports


def run_compiled(fn, args, get_code=False, **cfg):
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code
    with torch.no_grad(), inductor_config.patch(fx_graph_cache=False, **cfg), \
            functorch_config.patch(enable_autograd_cache=False):
        if get_code:
            return run_and_get_code(fn, *args)
        return fn(*args), None


def quant_cases():
    from tests.gpu.test_quant_before_gather_gpu import MODEL_INDUCTOR, VARIANTS_WS1
    return VARIANTS_WS1, MODEL_INDUCTOR


class TapQuery(torch.nn.Module):
    """DecodeQuery's graph, also returning the gathered query (the quantization's input)."""

    def __init__(self, decode):
        super().__init__()
        self.decode = decode

    def forward(self, q_nope, q_pe, q_scale):
        from fx_mla.mla.decode import all_gather_along
        m = self.decode
        q = torch.cat([torch.einsum("bhp,hpl->bhl", q_nope, m.w_uk), q_pe], dim=-1)
        q = all_gather_along(q, 1, m.cfg.dcp_size, m.group)
        fmax = torch.finfo(m.cfg.query_fp8_dtype).max
        return (q / q_scale).clamp(-fmax, fmax).to(m.cfg.query_fp8_dtype), q


def scale_candidates(v_scale, x, s):
    """{label: (fp32 scale or multiplier, is_multiplier)} for the chain's scale form (None: computed from x)."""
    if v_scale in ("dynamic", "per_token"):
        return None
    if v_scale == "input_div":
        return {"s": (s, False)}
    if v_scale == "buffer_div":
        return {"s=buffer 0.04": (torch.tensor(0.04, device=x.device), False)}
    if v_scale == "input_reciprocal":
        return {"s (graph: x*(1/s))": (s, False)}
    if v_scale == "input_inverse":
        return {"s as multiplier": (s, True)}
    if v_scale == "python_mul":
        return {"25.0 as multiplier": (torch.tensor(25.0, device=x.device), True)}
    if v_scale == "python_div_pow2":
        return {"0.03125": (torch.tensor(0.03125, device=x.device), False)}
    return None


def dynamic_scales(v_scale, x, fp8):
    fmax = torch.finfo(fp8).max
    if v_scale == "dynamic":
        amax = x.abs().amax().float().clamp(min=1e-12)
    else:
        amax = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12)
    return {"amax/fmax IEEE": (amax / torch.tensor(fmax, device=x.device), False),
            "amax*fp32(1/fmax)": (amax * torch.tensor(1.0 / fmax, dtype=torch.float32, device=x.device), False)}


def run_candidates(x, scales, fp8, want):
    """Mismatch count of every candidate; returns [(count, label, (div, scale, q, scale_label))] sorted."""
    rows = []
    for slabel, (s, is_mul) in scales.items():
        s_full = s.to(torch.float32).expand(x.shape).contiguous()
        div_modes = (4,) if is_mul else (0, 1, 2, 3)
        for d in div_modes:
            for sm in ((0, 1) if d in (0, 1, 4) else (0, 1, 2)):
                for qm in (0, 1):
                    got = candidate(x, s_full, fp8, d, sm, qm)
                    rows.append((fp8_mismatches(got, want),
                                 f"[{slabel}] {DIV_MODES[d]}, {SCALE_MODES[sm]}, {Q_MODES[qm]}", (d, sm, qm, slabel)))
    rows.sort(key=lambda r: r[0])
    return rows


def part_a():
    from fx_mla.passes import quant_before_gather as qbg
    from tests.passes import quant_before_gather_cases as cases
    from tests.mla.problems import make_problem, rank_inputs

    variants, model_cases = quant_cases()
    jobs = []
    for v in variants:
        module = cases.GatherQuant(v).to("cuda")
        x, s = cases.variant_inputs(v, 0, "cuda")
        jobs.append((str(v), module, (x, s), v.scale, cases.FP8[v.fp8], None, s))
    for i, (dtype, fp8, inner, _whole) in enumerate(model_cases):
        pb = make_problem(cases.model_config(1, dtype, fp8), cases.SEQ_LENS, seed=i)
        module, args = rank_inputs(pb, 0, device="cuda")
        jobs.append((f"DecodeQuery({dtype}, {fp8})", cases.DecodeQuery(module), (args[0], args[1], args[6]),
                     "input_div", cases.FP8[fp8], TapQuery(module), args[6]))
    summary = []
    for name, module, args, form, fp8, tap, s_in in jobs:
        t0 = time.time()
        log(f"\n=== quant_before_gather case {name}")
        try:
            plain, _ = compile_fresh(module, ())
            (want, codes) = run_compiled(plain, args, get_code=True)
            want = want[0] if isinstance(want, tuple) else want
            print_kernels("unrewritten, default Inductor", codes)
            if form in cases.DEQUANT_FORMS:
                x8, s = args
                dt = want.dtype
                cands = {"(fp32(x)*s).to(dt)": (x8.float() * s).to(dt),
                         "(fp32(x)*dt(s)).to(dt)": (x8.float() * s.to(dt).float()).to(dt),
                         "eager CUDA x.to(dt)*s": x8.to(dt) * s}
                for label, got in cands.items():
                    log(f"  candidate {label}: {int((got.view(torch.int16) != want.view(torch.int16)).sum())} "
                        f"of {want.numel()} differ")
                exact = None
            else:
                if tap is not None:
                    tplain, _ = compile_fresh(tap, ())
                    (tq, xin), _ = run_compiled(tplain, args)
                    log(f"  tap: FP8 bytes of the tapped compile differ from the plain one in "
                        f"{fp8_mismatches(tq, want)} bytes (0: its gathered tensor is the quantization's input)")
                else:
                    xin = args[0]  # world size 1: the all-gather (and its reorganisation) is the identity
                scales = scale_candidates(form, xin, s_in) or dynamic_scales(form, xin, fp8)
                rows = run_candidates(xin, scales, fp8, want)
                log(f"  candidates (x {xin.dtype} {tuple(xin.shape)} -> {fp8}; {want.numel()} bytes):")
                for count, label, _ in rows[:6] + [r for r in rows[6:] if r[0] == 0]:
                    log(f"    {count:6d} differ  {label}")
                log(f"    ... worst: {rows[-1][0]} differ ({rows[-1][1]})")
                exact = [r for r in rows if r[0] == 0]
            # the rewritten graph with the pass's rule
            new_fn, reports = compile_fresh(module, (cases.PASS,))
            got, _ = run_compiled(new_fn, args)
            got = got[0] if isinstance(got, tuple) else got
            rep = reports[-1].pass_report(cases.PASS)
            bad = fp8_mismatches(got, want) if got.element_size() == 1 else \
                int((got.view(torch.int16) != want.view(torch.int16)).sum())
            log(f"  rewritten (pass rule): {bad} of {want.numel()} differ; matches={[m.detail for m in rep.matches]}"
                f" declines={[d.reason for d in rep.declines]}")
            forced = None
            if bad and exact:
                for _, label, (d, sm, qm, _sl) in exact:
                    if d in (0, 1) and sm in (0, 1):
                        forced = qbg.Rounding(quotient=bool(qm), scale=bool(sm), approx_division=d == 1)
                        break
                if forced is not None:
                    qbg.INDUCTOR_CUDA_OVERRIDE = forced
                    try:
                        new_fn, reports = compile_fresh(module, (cases.PASS,))
                        got, _ = run_compiled(new_fn, args)
                    finally:
                        qbg.INDUCTOR_CUDA_OVERRIDE = None
                    got = got[0] if isinstance(got, tuple) else got
                    bad2 = fp8_mismatches(got, want)
                    log(f"  rewritten with INDUCTOR_CUDA_OVERRIDE={forced}: {bad2} of {want.numel()} differ")
                else:
                    log("  the exact candidate is a reciprocal multiplication: not expressible by Rounding yet")
            summary.append((name, bad, forced))
        except Exception:
            log("  FAILED:\n" + traceback.format_exc())
            summary.append((name, "error", None))
        log(f"  ({time.time() - t0:.1f} s)")
    log("\n=== quant_before_gather summary (bytes the rewritten graph gets wrong with the pass's rule)")
    for name, bad, forced in summary:
        log(f"  {bad!s:>6}  {name}" + (f"   exact candidate forced: {forced}" if forced else ""))


# ---------------------------------------------------------------------------------------------- part B
def part_b():
    from fx_mla.mla import MLAConfig
    from fx_mla.passes import cache_gather as cg
    from tests.mla.problems import make_problem, rank_inputs
    from tests.passes.cache_gather_cases import compile_fn, paged_index, paged_fp32_then_round, paged_inputs

    emulate = {"emulate_precision_casts": True}
    log("\n=== cache_gather: Inductor with emulate_precision_casts")
    cache, table, _ = paged_inputs(7, 576, torch.float8_e4m3fn, bs=64, lengths=(3000, 0, 1, 64, 700, 129),
                                   device="cuda")
    scale = torch.tensor(3.0 / 448, device="cuda")  # the decode step's k_scale: bf16(scale) changes products
    x8 = cache[table].view(table.shape[0], -1, 576)
    for fn in (paged_index, paged_fp32_then_round):
        t0 = time.time()
        try:
            torch._dynamo.reset()
            plain, _ = compile_fn(fn, [], "inductor")
            want, codes = run_compiled(plain, (cache, table, scale, torch.bfloat16), get_code=True, **emulate)
            print_kernels(f"{fn.__name__}, unrewritten, emulate", codes, needles=("fp8e4nv", "float8e4nv"))
            cands = {"round(fp32(x)*s)": (x8.float() * scale).to(torch.bfloat16),
                     "round(fp32(x)*bf16(s))": (x8.float() * scale.to(torch.bfloat16).float()).to(torch.bfloat16),
                     "eager CUDA": fn(cache, table, scale, torch.bfloat16)}
            for label, c in cands.items():
                log(f"  {fn.__name__} candidate {label}: "
                    f"{int((c.view(torch.int16) != want.view(torch.int16)).sum())} of {want.numel()} differ")
            # the pass's rule (rounds the scale where the multiply is bf16), and for x.to(bf16) * s the opposite
            for override in ((None, False) if fn is paged_index else (None,)):
                cg.EMULATE_SCALE_ROUNDING_OVERRIDE = override
                try:
                    torch._dynamo.reset()
                    new, reps = compile_fn(fn, ["cache_gather"], "inductor")
                    got, _ = run_compiled(new, (cache, table, scale, torch.bfloat16), **emulate)
                finally:
                    cg.EMULATE_SCALE_ROUNDING_OVERRIDE = None
                log(f"  {fn.__name__} rewritten (scale rounding {'rule' if override is None else override}): "
                    f"{int((got.view(torch.int16) != want.view(torch.int16)).sum())} differ; "
                    f"matches={len(reps[-1].pass_report('cache_gather').matches)}")
            # what eager CUDA does with this form (the pass's eager rule)
            eager = fn(cache, table, scale, torch.bfloat16)
            log(f"  {fn.__name__} eager CUDA vs round(fp32(x)*bf16(s)): "
                f"{int((eager.view(torch.int16) != cands['round(fp32(x)*bf16(s))'].view(torch.int16)).sum())}, "
                f"vs round(fp32(x)*s): {int((eager.view(torch.int16) != cands['round(fp32(x)*s)'].view(torch.int16)).sum())}")
        except Exception:
            log("  FAILED:\n" + traceback.format_exc())
        log(f"  ({time.time() - t0:.1f} s)")
    # the xfail test's graph: the whole decode step
    t0 = time.time()
    try:
        cfg = MLAConfig.deepseek_v2_lite(kv_cache_dtype="fp8", block_size=64)
        pb = make_problem(cfg, [1500, 0, 64, 3, 777, 2048, 1, 300], seed=1)
        module, args = rank_inputs(pb, 0, device="cuda")
        torch._dynamo.reset()
        plain, _ = compile_fn(module, [], "inductor")
        want, codes = run_compiled(plain, args, get_code=True, **emulate)
        print_kernels("decode step, unrewritten, emulate", codes, needles=("fp8e4nv", "float8e4nv"), limit=40)
        for override in (None, False):  # the rule rounds the scale here; False: it does not
            cg.EMULATE_SCALE_ROUNDING_OVERRIDE = override
            try:
                torch._dynamo.reset()
                new, reps = compile_fn(module, ["cache_gather"], "inductor")
                got, _ = run_compiled(new, args, **emulate)
            finally:
                cg.EMULATE_SCALE_ROUNDING_OVERRIDE = None
            n_bad = int((got.view(torch.int16) != want.view(torch.int16)).sum())
            rel = float((got.double() - want.double()).norm() / want.double().norm())
            log(f"  decode step rewritten (scale rounding {'rule' if override is None else override}): {n_bad} of "
                f"{want.numel()} output values differ (rel err {rel:.2e}); "
                f"matches={len(reps[-1].pass_report('cache_gather').matches)}")
    except Exception:
        log("  FAILED:\n" + traceback.format_exc())
    log(f"  ({time.time() - t0:.1f} s)")


# ---------------------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("qbg", "cache"), default=None)
    opts = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    from torch._inductor import config as ic
    t0 = time.time()
    log(f"card {torch.cuda.get_device_name()} cc {torch.cuda.get_device_capability()}, torch {torch.__version__}, "
        f"triton {triton.__version__}")
    numerics = getattr(ic, "eager_numerics", None)
    log("inductor: emulate_precision_casts", ic.emulate_precision_casts,
        "| eager_numerics.division_rounding", getattr(numerics, "division_rounding", "absent"),
        "| emulate_divison_rounding", getattr(ic, "emulate_divison_rounding", "absent"),
        "| emulate_division_rounding", getattr(ic, "emulate_division_rounding", "absent"),
        "| use_fast_math", getattr(ic, "use_fast_math", "absent"),
        "| codegen_upcast_to_fp32", getattr(ic.triton, "codegen_upcast_to_fp32", "absent"))
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        if opts.only in (None, "qbg"):
            part_a()
        if opts.only in (None, "cache"):
            part_b()
    finally:
        dist.destroy_process_group()
        log(f"\ntotal {time.time() - t0:.1f} s")
        out = os.path.join(os.environ.get("OUT", "/tmp"), "diag_inductor.txt")
        with open(out, "w") as f:
            f.write("\n".join(LINES) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
