"""Device check + timing of the Hopper Gluon MLA decode kernel (fx_mla/ops/mla_decode_gluon.py) vs the Triton op.

(1) Correctness on random problems (tests/ops/mla_decode_fp8_cases.make_problem: ragged lengths incl. 0, NaN in
    every cache slot the length mask must skip, block sizes 16/64, 64/128 heads, e4m3/e5m2, bf16/fp16 query,
    forced and automatic split counts), outputs poisoned with NaN before each launch: rel err of out and max abs
    err of lse vs mla_decode_fp8_reference (fp32) and vs the float64 reference; thresholds 1e-2 / 1e-3.
(2) Timing of the 128-head issue-6 shapes (block 64, e4m3 cache, bf16 query): median of CUDA-graph replays
    (benchmarks/bench_decode.time_us) of the Gluon launcher (automatic splits, and a few forced counts) and of
    torch.ops.fx_mla.mla_decode_fp8 (the Triton kernel) in the same run; % of the roofline floor
    max(FP8 KV bytes / copy BW, FLOPs / bf16 matmul rate), both ceilings measured in this run (bench_decode).
JSON to $OUT/dev_gluon_decode.json (else benchmarks/results/dev_gluon_decode.json). One GPU, < 150 s.

  PYTHONPATH=. python3 benchmarks/dev_gluon_decode.py [--budget 140] [--skip-timing]

--variants (round 2): the kernel variants of VARIANTS below, each in its own subprocess with a timeout (a crash
or hang of one cannot stop the others), round-1 kernel first: checks CHECKS_QUICK of the cases above (a variant
is timed only when all pass), then the automatic-split time of every 128-head shape; the round-1 child also
measures the ceilings and the Triton op. Writes $OUT/dev_gluon_variants.json and prints one table.

  PYTHONPATH=. python3 benchmarks/dev_gluon_decode.py --variants [--budget 145]
"""
from __future__ import annotations

import argparse
import json
import math
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
from tests.ops.mla_decode_fp8_cases import make_problem, reference_f64, rel_err  # noqa: E402

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
CASES = [  # (lengths, heads, block_size, cache dtype, q dtype, out dtype, num_splits)
    ([0, 1, 65, 1000, 333], 128, 16, E4M3, torch.bfloat16, torch.bfloat16, None),
    ([0, 1, 65, 1000, 333], 128, 16, E4M3, torch.bfloat16, torch.bfloat16, 1),
    ([0, 1, 65, 1000, 333], 128, 16, E4M3, torch.bfloat16, torch.float32, 7),
    ([4096, 0, 77, 640], 128, 64, E4M3, torch.bfloat16, torch.bfloat16, None),
    ([4096, 0, 77, 640], 128, 64, E4M3, torch.bfloat16, torch.bfloat16, 1),
    ([130, 2, 64], 64, 64, E5M2, torch.bfloat16, torch.float32, None),
    ([513, 9], 128, 64, E4M3, torch.float16, torch.float16, 3),
    ([0, 0], 128, 64, E4M3, torch.bfloat16, torch.bfloat16, 2),
]

CHECKS_QUICK = (0, 3, 4, 6, 7)
VARIANTS = [  # (name, flags of launch_mla_decode_gluon's `variant`), safest first
    ("r1", {}),
    ("one_page", dict(one_page=True)),
    ("one_page+trim", dict(one_page=True, trim_barrier=True)),
    ("one_page+trim+lazy", dict(one_page=True, trim_barrier=True, lazy_rescale=True)),
    ("lazy", dict(lazy_rescale=True)),
]


def check_case(lengths, heads, block, cache_dtype, q_dtype, out_dtype, splits, seed, variant=None):
    p = make_problem(lengths, heads, block, cache_dtype, q_dtype, seed=seed, device="cuda")
    out = torch.full((len(lengths), heads, 512), float("nan"), dtype=out_dtype, device="cuda")
    lse = torch.full((len(lengths), heads), float("nan"), dtype=torch.float32, device="cuda")
    gmod.launch_mla_decode_gluon(p.q, p.kv_cache, p.block_table, p.seq_lens, p.k_scale, None, p.sm_scale, 512,
                                 out, lse, num_splits=splits, poison_workspace=True, variant=variant)
    torch.cuda.synchronize()
    ref_o, ref_l = dmod.mla_decode_fp8_reference(p.q, p.kv_cache, p.block_table, p.seq_lens, p.k_scale, None,
                                                 p.sm_scale, 512, torch.float32)
    f64_o, f64_l = reference_f64(p)
    empty = torch.isinf(f64_l)
    finite = ~empty
    row = dict(lengths=lengths, heads=heads, block=block, cache=str(cache_dtype), q=str(q_dtype), out=str(out_dtype),
               splits=splits, nan_out=bool(torch.isnan(out).any()), nan_lse=bool(torch.isnan(lse).any()),
               inf_pattern_ok=bool(torch.equal(torch.isinf(lse), empty)),
               empty_out_zero=bool((out[empty] == 0).all()) if empty.any() else True)
    if finite.any():
        row.update(rel_err_out=rel_err(out[finite], ref_o[finite]),
                   lse_err=float((lse[finite] - ref_l[finite]).abs().max()),
                   rel_err_out_f64=rel_err(out[finite], f64_o[finite]),
                   lse_err_f64=float((lse[finite].double() - f64_l[finite]).abs().max()))
    ok = not row["nan_out"] and not row["nan_lse"] and row["inf_pattern_ok"] and row["empty_out_zero"]
    if finite.any():
        ok = ok and row["rel_err_out"] <= 1e-2 and row["lse_err"] <= 1e-3 and row["rel_err_out_f64"] <= 1e-2 \
            and row["lse_err_f64"] <= 1e-3
    row["ok"] = ok
    return row


def kernel_info():
    k = getattr(gmod.launch_mla_decode_gluon, "last_kernel", None)
    if k is None:
        return None
    return dict(n_regs=getattr(k, "n_regs", None), n_spills=getattr(k, "n_spills", None),
                shared=getattr(getattr(k, "metadata", None), "shared", None))


def shape_inputs(batch, heads, ctx, l2_bytes):
    kv_bytes = batch * ctx * bd.D
    rotations = max(1, min(8, math.ceil(3 * l2_bytes / kv_bytes)))
    return kv_bytes, bd.make_inputs(batch, heads, ctx, rotations)


def run_child(name, budget):
    """One variant: quick checks, then (all passing) the automatic-split time of each 128-head shape."""
    t0 = time.time()
    flags = dict(VARIANTS)[name]
    props = torch.cuda.get_device_properties(0)
    res = dict(variant=name, flags=flags, device=props.name, checks=[], rows=[])
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    path = os.path.join(out_dir, f"dev_gluon_variant_{name.replace('+', '_')}.json")

    def dump():
        res["seconds"] = time.time() - t0
        with open(path, "w") as f:
            json.dump(res, f, indent=1)

    for i in CHECKS_QUICK:
        try:
            row = check_case(*CASES[i], seed=i, variant=flags)
        except Exception as e:  # noqa: BLE001
            row = dict(case=i, ok=False, error=f"{type(e).__name__}: {str(e)[:1500]}")
        row["case"] = i
        res["checks"].append(row)
        print(f"[{name}] check {i}: ok={row['ok']} out {row.get('rel_err_out_f64', float('nan')):.2e} lse "
              f"{row.get('lse_err_f64', float('nan')):.1e} {row.get('error', '')[:200]}", flush=True)
        dump()
    res["kernel"] = kernel_info()
    res["all_ok"] = all(r["ok"] for r in res["checks"])
    dump()
    if not res["all_ok"]:
        return
    if name == "r1":
        res["copy_tbps"], res["bf16_matmul_tflops"] = bd.measure_ceilings()
        dump()
    dmod.DECODE_KERNEL = "triton"  # the baseline: the op would otherwise run a Gluon kernel
    op = torch.ops.fx_mla.mla_decode_fp8
    for batch, heads, ctx in [s for s in bd.SHAPES if s[1] % gmod.BLOCK_H == 0]:
        if time.time() - t0 > budget - 5:
            print(f"[{name}] out of time budget", flush=True)
            break
        kv_bytes, (cache, tables, lens, k_scale, q, _, _) = shape_inputs(batch, heads, ctx, props.L2_cache_size)
        ref_o, ref_l = dmod.mla_decode_fp8_reference(q, cache, tables[0], lens, k_scale, None, bd.SM_SCALE, bd.LAT,
                                                     torch.float32)
        row = dict(batch=batch, heads=heads, context=ctx, kv_bytes=kv_bytes,
                   flops=2 * batch * heads * ctx * (bd.D + bd.LAT))
        out = torch.full((batch, heads, bd.LAT), float("nan"), dtype=torch.bfloat16, device="cuda")
        lse = torch.full((batch, heads), float("nan"), dtype=torch.float32, device="cuda")
        call = lambda t: gmod.launch_mla_decode_gluon(  # noqa: E731
            q, cache, t, lens, k_scale, None, bd.SM_SCALE, bd.LAT, out, lse, variant=flags)
        call(tables[0])
        torch.cuda.synchronize()
        row.update(rel_err=rel_err(out, ref_o), lse_err=float((lse - ref_l).abs().max()))
        row["us"] = bd.time_us(call, tables)[0]
        if name == "r1":
            tri = lambda t: op(q, cache, t, lens, k_scale, None, bd.SM_SCALE, bd.LAT, torch.bfloat16)  # noqa: E731
            row["triton_us"] = bd.time_us(tri, tables)[0]
        print(f"[{name}] {batch}x{heads}x{ctx}: {row['us']:.1f} us (err {row['rel_err']:.1e}, lse "
              f"{row['lse_err']:.1e}) triton {row.get('triton_us', float('nan')):.1f} [{time.time() - t0:.0f} s]",
              flush=True)
        res["rows"].append(row)
        del cache, tables, ref_o, ref_l
        torch.cuda.empty_cache()
        dump()


def run_variants(budget):
    """Each variant in a subprocess with a timeout; merge the children's JSON, print one table."""
    t0 = time.time()
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    merged = dict(name="dev_gluon_variants", torch=torch.__version__, triton=triton.__version__, variants={})
    for name, flags in VARIANTS:
        left = budget - (time.time() - t0)
        if left < 20:
            print(f"skipping {name}: {left:.0f} s left", flush=True)
            continue
        limit = min(45.0, left - 2)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--budget", str(limit - 3)]
        try:
            r = subprocess.run(cmd, timeout=limit, capture_output=True, text=True, env=os.environ.copy())
            status = f"rc {r.returncode}"
            sys.stdout.write(r.stdout)
            if r.returncode:
                sys.stdout.write(r.stderr[-3000:])
        except subprocess.TimeoutExpired as e:
            status = f"timeout after {limit:.0f} s"
            sys.stdout.write((e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""))
        child = os.path.join(out_dir, f"dev_gluon_variant_{name.replace('+', '_')}.json")
        data = json.load(open(child)) if os.path.exists(child) else dict(variant=name, flags=flags)
        data["status"] = status
        merged["variants"][name] = data
        print(f"== {name}: {status}, checks ok {data.get('all_ok')}, kernel {data.get('kernel')} "
              f"[{time.time() - t0:.0f} s]", flush=True)
        with open(os.path.join(out_dir, "dev_gluon_variants.json"), "w") as f:
            json.dump(merged, f, indent=1)
    base = merged["variants"].get("r1", {})
    copy_tbps, mm = base.get("copy_tbps"), base.get("bf16_matmul_tflops")
    merged["device"] = base.get("device")
    print(f"\n{base.get('device')} torch {torch.__version__} triton {triton.__version__} copy {copy_tbps} TB/s "
          f"bf16 mm {mm} TFLOP/s; us (% of roofline), auto splits")
    names = [n for n, _ in VARIANTS if merged["variants"].get(n, {}).get("rows")]
    print(f"{'shape':>14} {'floor':>6} {'triton':>7} " + " ".join(f"{n:>20}" for n in names))
    summary = {}
    for i, r0 in enumerate(base.get("rows", [])):
        floor = max(r0["kv_bytes"] / (copy_tbps * 1e12), r0["flops"] / (mm * 1e12)) * 1e6 if copy_tbps else None
        cells = []
        for n in names:
            rows = merged["variants"][n]["rows"]
            us = rows[i]["us"] if i < len(rows) else None
            pct = 100 * floor / us if (us and floor) else None
            if us:
                summary.setdefault(n, []).append(pct)
            cells.append(f"{us:8.1f} ({pct:5.1f}%)" if us else f"{'-':>20}")
        print(f"{r0['batch']:>3}x{r0['heads']}x{r0['context']:<6} {floor or 0:6.1f} {r0.get('triton_us', 0):7.1f} "
              + " ".join(f"{c:>20}" for c in cells))
    merged["summary"] = {n: dict(min_pct_of_roofline=min(v), shapes=len(v)) for n, v in summary.items()}
    merged["seconds"] = time.time() - t0
    with open(os.path.join(out_dir, "dev_gluon_variants.json"), "w") as f:
        json.dump(merged, f, indent=1)
    print("summary:", json.dumps(merged["summary"]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=140.0)
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--variants", action="store_true", help="time the kernel variants, one subprocess each")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variants:
        return run_variants(args.budget)
    if args.child:
        return run_child(args.child, args.budget)
    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    result = dict(name="dev_gluon_decode", device=props.name, capability=list(torch.cuda.get_device_capability(0)),
                  sms=props.multi_processor_count, torch=torch.__version__, triton=triton.__version__,
                  checks=[], rows=[])
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "dev_gluon_decode.json")

    def dump():
        result["seconds"] = time.time() - t0
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    probe = torch.empty(1, 128, 576, dtype=torch.bfloat16, device="cuda")
    reason = gmod.gluon_unsupported_reason(probe, torch.empty(1, 64, 576, dtype=E4M3, device="cuda"), 512)
    result["unsupported_reason"] = reason
    print(f"{props.name} cap {torch.cuda.get_device_capability(0)} torch {torch.__version__} triton "
          f"{triton.__version__}; gluon_unsupported_reason: {reason}", flush=True)

    # ---- (1) correctness
    for i, case in enumerate(CASES):
        try:
            row = check_case(*case, seed=i)
        except Exception as e:  # noqa: BLE001 - report and go on
            row = dict(case=str(case), ok=False, error=f"{type(e).__name__}: {str(e)[:2000]}")
            traceback.print_exc()
        result["checks"].append(row)
        print(f"check {i} {case[:3]} {str(case[3])[-6:]} q {str(case[4])[6:]} out {str(case[5])[6:]} splits "
              f"{case[6]}: ok={row['ok']} out {row.get('rel_err_out', float('nan')):.2e} "
              f"(f64 {row.get('rel_err_out_f64', float('nan')):.2e}) lse {row.get('lse_err', float('nan')):.1e} "
              f"(f64 {row.get('lse_err_f64', float('nan')):.1e}) {row.get('error', '')[:300]}", flush=True)
        dump()
    result["kernel"] = kernel_info()
    result["all_ok"] = all(r["ok"] for r in result["checks"])
    print("kernel (last launch):", result["kernel"], " all checks ok:", result["all_ok"], flush=True)
    dump()
    if args.skip_timing:
        return

    # ---- (2) timing vs the Triton op, same run
    copy_tbps, mm_tflops = bd.measure_ceilings()
    result.update(copy_tbps=copy_tbps, bf16_matmul_tflops=mm_tflops)
    print(f"copy {copy_tbps:.2f} TB/s, bf16 matmul {mm_tflops:.0f} TFLOP/s", flush=True)
    dmod.DECODE_KERNEL = "triton"  # the baseline: the op would otherwise run a Gluon kernel
    op = torch.ops.fx_mla.mla_decode_fp8
    for batch, heads, ctx in [s for s in bd.SHAPES if s[1] % gmod.BLOCK_H == 0]:
        if time.time() - t0 > args.budget - 15:
            print("out of time budget", flush=True)
            break
        kv_bytes = batch * ctx * bd.D
        flops = 2 * batch * heads * ctx * (bd.D + bd.LAT)
        floor_us = max(kv_bytes / (copy_tbps * 1e12), flops / (mm_tflops * 1e12)) * 1e6
        rotations = max(1, min(8, math.ceil(3 * props.L2_cache_size / kv_bytes)))
        cache, tables, lens, k_scale, q, _, _ = bd.make_inputs(batch, heads, ctx, rotations)
        row = dict(batch=batch, heads=heads, context=ctx, floor_us=floor_us, kv_bytes=kv_bytes, flops=flops)
        ref_o, ref_l = dmod.mla_decode_fp8_reference(q, cache, tables[0], lens, k_scale, None, bd.SM_SCALE, bd.LAT,
                                                     torch.float32)
        tri = lambda t: op(q, cache, t, lens, k_scale, None, bd.SM_SCALE, bd.LAT, torch.bfloat16)  # noqa: E731
        o, l_ = tri(tables[0])
        row.update(triton_rel_err=rel_err(o, ref_o), triton_lse_err=float((l_ - ref_l).abs().max()))
        row["triton_us"] = bd.time_us(tri, tables)[0]
        out = torch.empty(batch, heads, bd.LAT, dtype=torch.bfloat16, device="cuda")
        lse = torch.empty(batch, heads, dtype=torch.float32, device="cuda")
        groups = heads // gmod.BLOCK_H
        base = dmod._num_splits(batch, groups, tables[0].shape[1] * bd.BLOCK, gmod.BLOCK_N, props.multi_processor_count, 1)
        variants = [None] + sorted({s for s in (max(1, base // 2), 2 * base) if s != base})
        for splits in variants:
            key = "auto" if splits is None else str(splits)
            try:
                out.fill_(float("nan"))
                lse.fill_(float("nan"))
                call = lambda t, s=splits: gmod.launch_mla_decode_gluon(  # noqa: E731
                    q, cache, t, lens, k_scale, None, bd.SM_SCALE, bd.LAT, out, lse, num_splits=s)
                call(tables[0])
                torch.cuda.synchronize()
                err, lerr = rel_err(out, ref_o), float((lse - ref_l).abs().max())
                us = bd.time_us(call, tables)[0]
                row.setdefault("gluon", {})[key] = dict(us=us, rel_err=err, lse_err=lerr,
                                                        pct_of_roofline=100 * floor_us / us,
                                                        splits=base if splits is None else splits)
            except Exception as e:  # noqa: BLE001
                row.setdefault("gluon", {})[key] = dict(error=f"{type(e).__name__}: {str(e)[:1500]}")
                traceback.print_exc()
        try:  # diagnostic: every token on one of 4 pages (L2-resident): the kernel's speed without DRAM traffic
            hot = [(torch.arange(t.numel(), device="cuda", dtype=torch.int32) % 4).view_as(t) for t in tables[:1]]
            row["gluon_hot_l2_us"] = bd.time_us(lambda t: gmod.launch_mla_decode_gluon(
                q, cache, t, lens, k_scale, None, bd.SM_SCALE, bd.LAT, out, lse), hot)[0]
            row["triton_hot_l2_us"] = bd.time_us(tri, hot)[0]
        except Exception as e:  # noqa: BLE001
            row["hot_error"] = f"{type(e).__name__}: {str(e)[:500]}"
        row["kernel"] = kernel_info()
        g = row.get("gluon", {}).get("auto", {})
        print(f"{batch}x{heads}x{ctx}: floor {floor_us:.1f} us | triton {row['triton_us']:.1f} us "
              f"({100 * floor_us / row['triton_us']:.1f}%) | gluon auto {g.get('us', float('nan')):.1f} us "
              f"({g.get('pct_of_roofline', float('nan')):.1f}%, err {g.get('rel_err', float('nan')):.1e}, lse "
              f"{g.get('lse_err', float('nan')):.1e}) | others "
              + " ".join(f"s={k}:{v.get('us', float('nan')):.1f}" for k, v in row.get("gluon", {}).items()
                         if k != "auto") + f" | hot L2: gluon {row.get('gluon_hot_l2_us', float('nan')):.1f} triton "
              f"{row.get('triton_hot_l2_us', float('nan')):.1f}  [{time.time() - t0:.0f} s]", flush=True)
        result["rows"].append(row)
        del cache, tables, ref_o, ref_l
        torch.cuda.empty_cache()
        dump()

    rows = [r for r in result["rows"] if "us" in r.get("gluon", {}).get("auto", {})]
    result["summary"] = dict(
        all_checks_ok=result["all_ok"],
        min_pct_of_roofline_gluon=min((r["gluon"]["auto"]["pct_of_roofline"] for r in rows), default=None),
        min_pct_of_roofline_triton=min((100 * r["floor_us"] / r["triton_us"] for r in rows), default=None),
        min_speedup_vs_triton=min((r["triton_us"] / r["gluon"]["auto"]["us"] for r in rows), default=None))
    dump()
    print(f"\n{props.name} torch {torch.__version__} triton {triton.__version__} copy {copy_tbps:.2f} TB/s "
          f"bf16 mm {mm_tflops:.0f} TFLOP/s")
    print(f"{'B':>4} {'H':>4} {'S':>6} | {'floor':>7} | {'triton':>8} {'%roof':>6} | {'gluon':>8} {'%roof':>6} "
          f"{'x tri':>6} {'err':>8} {'lse err':>8}")
    for r in rows:
        g = r["gluon"]["auto"]
        print(f"{r['batch']:>4} {r['heads']:>4} {r['context']:>6} | {r['floor_us']:7.1f} | {r['triton_us']:8.1f} "
              f"{100 * r['floor_us'] / r['triton_us']:6.1f} | {g['us']:8.1f} {g['pct_of_roofline']:6.1f} "
              f"{r['triton_us'] / g['us']:6.2f} {g['rel_err']:8.1e} {g['lse_err']:8.1e}")
    print("summary:", json.dumps(result["summary"]))


if __name__ == "__main__":
    main()
