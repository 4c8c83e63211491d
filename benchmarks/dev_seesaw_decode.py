"""Device check + timing of the Hopper "seesaw" Gluon MLA decode kernel (fx_mla/ops/mla_decode_seesaw.py).

Each stage runs in its own subprocess with a timeout, so a crash or a hang (e.g. a barrier deadlock) cannot stop
the run; each child writes its JSON after every step.
(1) checks: random problems (tests/ops/mla_decode_fp8_cases.make_problem: ragged lengths incl. 0, NaN in every
    cache slot the length mask must skip, block sizes 16/64, 64/128 heads, e4m3/e5m2, bf16/fp16 query, odd tile
    counts, splits auto/1/3/7), outputs and split workspace poisoned with NaN: rel err of out and max abs err of
    lse vs mla_decode_fp8_reference (fp32) and the float64 reference, thresholds 1e-2 / 1e-3; simplest cases
    first (one pair, one CTA), so a failure points at its cause.
(2) timing (the seesaw rows only when every check passed): the 128-head issue-6 shapes (block 64, e4m3 cache,
    bf16 query), median of CUDA-graph replays (bench_decode.time_us) of torch.ops.fx_mla.mla_decode_fp8 (Triton),
    launch_mla_decode_gluon (round-1 kernel) and launch_mla_decode_seesaw (auto splits, one_page, half / double
    splits), all in the same run; % of the roofline floor max(FP8 KV bytes / copy BW, FLOPs / bf16 matmul rate),
    both ceilings measured in this run.
JSON to $OUT/dev_seesaw_decode.json (else benchmarks/results/). One GPU, < 150 s in all.

  PYTHONPATH=. python3 benchmarks/dev_seesaw_decode.py [--budget 145]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import bench_decode as bd  # noqa: E402
from fx_mla.ops import mla_decode_fp8 as dmod  # noqa: E402
from fx_mla.ops import mla_decode_gluon as gmod  # noqa: E402
from fx_mla.ops import mla_decode_seesaw as smod  # noqa: E402
from tests.ops.mla_decode_fp8_cases import make_problem, reference_f64, rel_err  # noqa: E402

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
CASES = [  # (lengths, heads, block_size, cache dtype, q dtype, out dtype, num_splits, one_page)
    ([64], 64, 64, E4M3, BF16, BF16, 1, False),                       # one pair, one CTA
    ([32, 96, 33, 1, 0], 64, 64, E4M3, BF16, FP32, 1, False),         # odd tile counts: fully masked B tiles
    ([200, 64, 31], 128, 16, E4M3, BF16, BF16, 3, False),             # splits ending mid-pair / empty splits
    ([0, 1, 65, 1000, 333], 128, 16, E4M3, BF16, BF16, None, False),
    ([0, 1, 65, 1000, 333], 128, 16, E4M3, BF16, BF16, 1, False),
    ([0, 1, 65, 1000, 333], 128, 16, E4M3, BF16, FP32, 7, False),
    ([4096, 0, 77, 640], 128, 64, E4M3, BF16, BF16, None, False),
    ([4096, 0, 77, 640], 128, 64, E4M3, BF16, BF16, 1, False),
    ([130, 2, 64], 64, 64, E5M2, BF16, FP32, None, False),
    ([513, 9], 128, 64, E4M3, FP16, FP16, 3, False),
    ([0, 0], 128, 64, E4M3, BF16, BF16, 2, False),
    ([4096, 0, 77, 640], 128, 64, E4M3, BF16, BF16, None, True),      # one_page
    ([0, 1, 95, 1000, 333], 128, 32, E4M3, BF16, BF16, 7, True),
]


def out_dir():
    d = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(d, exist_ok=True)
    return d


def dump(res, name):
    with open(os.path.join(out_dir(), name), "w") as f:
        json.dump(res, f, indent=1)


def check_case(lengths, heads, block, cache_dtype, q_dtype, out_dtype, splits, one_page, seed):
    p = make_problem(lengths, heads, block, cache_dtype, q_dtype, seed=seed, device="cuda")
    out = torch.full((len(lengths), heads, 512), float("nan"), dtype=out_dtype, device="cuda")
    lse = torch.full((len(lengths), heads), float("nan"), dtype=torch.float32, device="cuda")
    smod.launch_mla_decode_seesaw(p.q, p.kv_cache, p.block_table, p.seq_lens, p.k_scale, None, p.sm_scale, 512,
                                  out, lse, num_splits=splits, poison_workspace=True, one_page=one_page)
    torch.cuda.synchronize()
    ref_o, ref_l = dmod.mla_decode_fp8_reference(p.q, p.kv_cache, p.block_table, p.seq_lens, p.k_scale, None,
                                                 p.sm_scale, 512, torch.float32)
    f64_o, f64_l = reference_f64(p)
    empty = torch.isinf(f64_l)
    finite = ~empty
    row = dict(lengths=lengths, heads=heads, block=block, cache=str(cache_dtype), q=str(q_dtype), out=str(out_dtype),
               splits=splits, one_page=one_page, nan_out=bool(torch.isnan(out).any()),
               nan_lse=bool(torch.isnan(lse).any()), inf_pattern_ok=bool(torch.equal(torch.isinf(lse), empty)),
               empty_out_zero=bool((out[empty] == 0).all()) if empty.any() else True)
    if finite.any():
        row.update(rel_err_out=rel_err(out[finite], ref_o[finite]),
                   lse_err=float((lse[finite] - ref_l[finite]).abs().max()),
                   rel_err_out_f64=rel_err(out[finite], f64_o[finite]),
                   lse_err_f64=float((lse[finite].double() - f64_l[finite]).abs().max()))
        # per request: which one is off (diagnostic for the fix round)
        row["per_request_err"] = [None if not finite[b].any() else rel_err(out[b], f64_o[b])
                                  for b in range(len(lengths))]
    ok = not row["nan_out"] and not row["nan_lse"] and row["inf_pattern_ok"] and row["empty_out_zero"]
    if finite.any():
        ok = ok and row["rel_err_out"] <= 1e-2 and row["lse_err"] <= 1e-3 and row["rel_err_out_f64"] <= 1e-2 \
            and row["lse_err_f64"] <= 1e-3
    row["ok"] = ok
    return row


def kernel_info(launcher):
    k = getattr(launcher, "last_kernel", None)
    if k is None:
        return None
    return dict(n_regs=getattr(k, "n_regs", None), n_spills=getattr(k, "n_spills", None),
                shared=getattr(getattr(k, "metadata", None), "shared", None))


def child_checks(budget):
    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    probe = torch.empty(1, 128, 576, dtype=BF16, device="cuda")
    res = dict(stage="checks", device=props.name, torch=torch.__version__, triton=triton.__version__,
               unsupported_reason=smod.seesaw_unsupported_reason(probe, torch.empty(1, 64, 576, dtype=E4M3,
                                                                                       device="cuda"), 512),
               checks=[])
    print(f"{props.name} torch {torch.__version__} triton {triton.__version__}; seesaw_unsupported_reason: "
          f"{res['unsupported_reason']}", flush=True)
    for i, case in enumerate(CASES):
        if time.time() - t0 > budget:
            res["checks"].append(dict(case=i, ok=False, error="out of time budget"))
            break
        try:
            row = check_case(*case, seed=i)
        except Exception as e:  # noqa: BLE001 - report and go on
            row = dict(ok=False, error=f"{type(e).__name__}: {str(e)[:2500]}")
            traceback.print_exc()
        row["case"] = i
        res["checks"].append(row)
        res["kernel"] = kernel_info(smod.launch_mla_decode_seesaw)
        print(f"check {i} {case[0]} H{case[1]} bs{case[2]} {str(case[3])[-6:]} q {str(case[4])[6:]} out "
              f"{str(case[5])[6:]} splits {case[6]} one_page {case[7]}: ok={row['ok']} out "
              f"{row.get('rel_err_out', float('nan')):.2e} (f64 {row.get('rel_err_out_f64', float('nan')):.2e}) lse "
              f"{row.get('lse_err', float('nan')):.1e} (f64 {row.get('lse_err_f64', float('nan')):.1e}) nan "
              f"{row.get('nan_out')}/{row.get('nan_lse')} [{time.time() - t0:.0f} s] {row.get('error', '')[:300]}",
              flush=True)
        if not row["ok"] and "per_request_err" in row:
            print("   per-request rel err vs f64:", row["per_request_err"], flush=True)
        res["all_ok"] = all(r["ok"] for r in res["checks"])
        dump(res, "dev_seesaw_checks.json")
    res["all_ok"] = len(res["checks"]) == len(CASES) and all(r["ok"] for r in res["checks"])
    res["seconds"] = time.time() - t0
    print("kernel:", res.get("kernel"), " all checks ok:", res["all_ok"], flush=True)
    dump(res, "dev_seesaw_checks.json")


def child_timing(budget, with_seesaw):
    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    res = dict(stage="timing", device=props.name, torch=torch.__version__, triton=triton.__version__,
               seesaw_timed=with_seesaw, rows=[])
    copy_tbps, mm_tflops = bd.measure_ceilings()
    res.update(copy_tbps=copy_tbps, bf16_matmul_tflops=mm_tflops)
    print(f"copy {copy_tbps:.2f} TB/s, bf16 matmul {mm_tflops:.0f} TFLOP/s [{time.time() - t0:.0f} s]", flush=True)
    dmod.DECODE_KERNEL = "triton"  # the baseline: the op would otherwise run a Gluon kernel
    op = torch.ops.fx_mla.mla_decode_fp8
    for batch, heads, ctx in [s for s in bd.SHAPES if s[1] % smod.BLOCK_H == 0]:
        if time.time() - t0 > budget - 12:
            print("out of time budget", flush=True)
            break
        kv_bytes = batch * ctx * bd.D
        flops = 2 * batch * heads * ctx * (bd.D + bd.LAT)
        floor_us = max(kv_bytes / (copy_tbps * 1e12), flops / (mm_tflops * 1e12)) * 1e6
        rotations = max(1, min(8, -(-3 * props.L2_cache_size // kv_bytes)))
        cache, tables, lens, k_scale, q, _, _ = bd.make_inputs(batch, heads, ctx, rotations)
        ref_o, ref_l = dmod.mla_decode_fp8_reference(q, cache, tables[0], lens, k_scale, None, bd.SM_SCALE, bd.LAT,
                                                     torch.float32)
        row = dict(batch=batch, heads=heads, context=ctx, floor_us=floor_us, kv_bytes=kv_bytes, flops=flops,
                   kernels={})
        out = torch.empty(batch, heads, bd.LAT, dtype=BF16, device="cuda")
        lse = torch.empty(batch, heads, dtype=torch.float32, device="cuda")
        base = dmod._num_splits(batch, heads // 64, tables[0].shape[1] * bd.BLOCK, 2 * smod.BLOCK_N,
                                props.multi_processor_count, 1)
        cands = [("triton", lambda t: op(q, cache, t, lens, k_scale, None, bd.SM_SCALE, bd.LAT, BF16)),
                 ("gluon", lambda t: gmod.launch_mla_decode_gluon(q, cache, t, lens, k_scale, None, bd.SM_SCALE,
                                                                  bd.LAT, out, lse))]
        if with_seesaw:
            for name, kw in [("seesaw", dict(one_page=False)), ("seesaw_one_page", dict(one_page=True)),
                             (f"seesaw_s{max(1, base // 2)}", dict(num_splits=max(1, base // 2))),
                             (f"seesaw_s{2 * base}", dict(num_splits=2 * base))]:
                if name in (f"seesaw_s{base}",):
                    continue
                cands.append((name, lambda t, kw=kw: smod.launch_mla_decode_seesaw(
                    q, cache, t, lens, k_scale, None, bd.SM_SCALE, bd.LAT, out, lse, **kw)))
        for name, call in cands:
            if time.time() - t0 > budget - 6:
                break
            try:
                out.fill_(float("nan"))
                lse.fill_(float("nan"))
                r = call(tables[0])
                o, l_ = (r if name == "triton" else (out, lse))
                torch.cuda.synchronize()
                err, lerr = rel_err(o, ref_o), float((l_ - ref_l).abs().max())
                us = bd.time_us(call, tables)[0]
                row["kernels"][name] = dict(us=us, rel_err=err, lse_err=lerr, pct_of_roofline=100 * floor_us / us)
            except Exception as e:  # noqa: BLE001
                row["kernels"][name] = dict(error=f"{type(e).__name__}: {str(e)[:1500]}")
                traceback.print_exc()
        row["seesaw_auto_splits"] = base
        k = row["kernels"]
        print(f"{batch}x{heads}x{ctx}: floor {floor_us:.1f} us | " + " | ".join(
            f"{n} {v['us']:.1f} us ({v['pct_of_roofline']:.1f}%, err {v['rel_err']:.1e}/{v['lse_err']:.1e})"
            if "us" in v else f"{n} ERROR" for n, v in k.items()) + f" [{time.time() - t0:.0f} s]", flush=True)
        res["rows"].append(row)
        res["kernel"] = kernel_info(smod.launch_mla_decode_seesaw)
        del cache, tables, ref_o, ref_l
        torch.cuda.empty_cache()
        res["seconds"] = time.time() - t0
        dump(res, "dev_seesaw_timing.json")


def run_child(args, limit):
    cmd = [sys.executable, os.path.abspath(__file__)] + args
    try:
        r = subprocess.run(cmd, timeout=limit, capture_output=True, text=True, env=os.environ.copy())
        sys.stdout.write(r.stdout)
        if r.returncode:
            sys.stdout.write(r.stderr[-4000:])
        return f"rc {r.returncode}"
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        sys.stdout.write(out)
        return f"timeout after {limit:.0f} s"


def load(name):
    path = os.path.join(out_dir(), name)
    return json.load(open(path)) if os.path.exists(path) else {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=145.0)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-budget", type=float, default=60.0, help=argparse.SUPPRESS)
    ap.add_argument("--no-seesaw", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "checks":
        return child_checks(args.child_budget)
    if args.child == "timing":
        return child_timing(args.child_budget, not args.no_seesaw)
    t0 = time.time()
    for name in ("dev_seesaw_checks.json", "dev_seesaw_timing.json"):
        if os.path.exists(os.path.join(out_dir(), name)):
            os.remove(os.path.join(out_dir(), name))
    status = dict(checks=run_child(["--child", "checks", "--child-budget", "52"], 66))
    checks = load("dev_seesaw_checks.json")
    ok = bool(checks.get("all_ok"))
    print(f"== checks: {status['checks']}, all ok {ok} [{time.time() - t0:.0f} s]", flush=True)
    left = args.budget - (time.time() - t0)
    timing_args = ["--child", "timing", "--child-budget", str(left - 8)] + ([] if ok else ["--no-seesaw"])
    status["timing"] = run_child(timing_args, left - 2)
    timing = load("dev_seesaw_timing.json")
    result = dict(name="dev_seesaw_decode", device=checks.get("device") or timing.get("device"),
                  torch=torch.__version__, triton=triton.__version__, status=status, checks=checks, timing=timing)
    rows = timing.get("rows", [])
    names = sorted({n for r in rows for n in r["kernels"]}, key=lambda n: (not n.startswith("triton"),
                                                                           not n.startswith("gluon"), n))
    copy_tbps, mm = timing.get("copy_tbps"), timing.get("bf16_matmul_tflops")
    print(f"\n{result['device']} torch {torch.__version__} triton {triton.__version__} copy {copy_tbps} TB/s "
          f"bf16 mm {mm} TFLOP/s; us (% of roofline)")
    print(f"{'shape':>14} {'floor':>6} " + " ".join(f"{n[:18]:>18}" for n in names))
    for r in rows:
        cells = []
        for n in names:
            v = r["kernels"].get(n, {})
            cells.append(f"{v['us']:8.1f} ({v['pct_of_roofline']:5.1f}%)" if "us" in v else f"{'-':>18}")
        print(f"{r['batch']:>3}x{r['heads']}x{r['context']:<6} {r['floor_us']:6.1f} "
              + " ".join(f"{c:>18}" for c in cells))

    def col(n):
        return [r["kernels"][n] for r in rows if "us" in r["kernels"].get(n, {})]
    summary = dict(all_checks_ok=ok, shapes_timed=len(rows))
    for n in names:
        v = col(n)
        if v:
            summary[f"min_pct_of_roofline_{n}"] = min(x["pct_of_roofline"] for x in v)
    both = [r for r in rows if "us" in r["kernels"].get("seesaw", {}) and "us" in r["kernels"].get("gluon", {})]
    if both:
        summary["min_speedup_seesaw_vs_gluon"] = min(r["kernels"]["gluon"]["us"] / r["kernels"]["seesaw"]["us"]
                                                     for r in both)
        summary["min_speedup_seesaw_vs_triton"] = min((r["kernels"]["triton"]["us"] / r["kernels"]["seesaw"]["us"]
                                                       for r in both if "us" in r["kernels"].get("triton", {})),
                                                      default=None)
    result["summary"] = summary
    result["seconds"] = time.time() - t0
    dump(result, "dev_seesaw_decode.json")
    print("summary:", json.dumps(summary))


if __name__ == "__main__":
    main()
