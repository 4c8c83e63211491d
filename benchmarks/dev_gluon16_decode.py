"""Device check + timing of the 16-head Hopper Gluon MLA decode kernel (fx_mla/ops/mla_decode_gluon16.py) vs the
Triton op, for each kernel variant (ring stages 3/2, early ring read on/off), each in its own subprocess so that a
crashing variant cannot stop the others (safest first; the Triton baseline and the ceilings in a child too).

Per variant: (1) correctness on random problems (tests/ops/mla_decode_fp8_cases.make_problem: ragged lengths incl.
0, NaN in every cache slot the length mask must skip, block sizes 16/32/64, e4m3/e5m2, bf16/fp16 query, forced
and automatic split counts), outputs and split workspace poisoned with NaN: rel err of out and max abs err of lse
vs mla_decode_fp8_reference (fp32) and vs the float64 reference, thresholds 1e-2 / 1e-3; (2) only if all checks
pass: median of CUDA-graph replays (benchmarks/bench_decode.time_us) on the issue-6 16-head shapes (block 64,
e4m3, bf16 query) with automatic and a few forced split counts, errors vs the Triton op's output, and an
L2-resident diagnostic (every token on one of 4 pages). % of copy bandwidth = FP8 KV bytes / copy BW (measured in
the same run, bench_decode.measure_ceilings) / time.
JSON to $OUT/dev_gluon16_decode.json (+ one file a child). One GPU, < 150 s.

  PYTHONPATH=. python3 benchmarks/dev_gluon16_decode.py [--budget 140] [--skip-timing]
Round 2 (warp-specialized kernels ws4 / ws8 vs the default ring kernel s3_early, 35 s a child, < 120 s):
  PYTHONPATH=. python3 benchmarks/dev_gluon16_decode.py --round2 --budget 180
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SHAPES16 = [(32, 16, 16384), (128, 16, 8192)]
# (tag, ring stages, early ring read, kernel variant); safest first
VARIANTS = [("s3", 3, False, "ring"), ("s3_early", 3, True, "ring"), ("s2", 2, False, "ring"),
            ("s2_early", 2, True, "ring"), ("ws4", 3, True, "ws4"), ("ws8", 3, True, "ws8"),
            ("ws8p2", 3, True, "ws8p2"), ("ws8p3", 3, True, "ws8p3"), ("ws8p2o", 3, True, "ws8p2o")]
ROUND1 = ["s3", "s3_early", "s2", "s2_early"]
ROUND2 = ["ws8p2", "ws8p2o", "s3_early"]  # --round2: the default (ws8p2), its consumer-overlap form, the ring kernel


def out_dir():
    d = os.environ.get("OUT") or os.path.join(REPO, "benchmarks", "results")
    os.makedirs(d, exist_ok=True)
    return d


def dump(obj, name):
    with open(os.path.join(out_dir(), name), "w") as f:
        json.dump(obj, f, indent=1)


# ------------------------------------------------------------------------------------------------ children
def child_baseline():
    import torch
    import triton
    from benchmarks import bench_decode as bd
    props = torch.cuda.get_device_properties(0)
    res = dict(device=props.name, capability=list(torch.cuda.get_device_capability(0)),
               sms=props.multi_processor_count, torch=torch.__version__, triton=triton.__version__, rows=[])
    copy_tbps, mm_tflops = bd.measure_ceilings()
    res.update(copy_tbps=copy_tbps, bf16_matmul_tflops=mm_tflops)
    print(f"[baseline] {props.name} torch {torch.__version__} triton {triton.__version__}: copy {copy_tbps:.2f} "
          f"TB/s, bf16 matmul {mm_tflops:.0f} TFLOP/s", flush=True)
    dump(res, "dev_gluon16_baseline.json")
    from fx_mla.ops import mla_decode_fp8 as dmod
    dmod.DECODE_KERNEL = "triton"  # the op would otherwise run the default Gluon kernel (it did in session 3's runs)
    op = torch.ops.fx_mla.mla_decode_fp8
    for batch, heads, ctx in SHAPES16:
        cache, tables, lens, k_scale, q, _, _ = bd.make_inputs(batch, heads, ctx, 1)
        tri = lambda t: op(q, cache, t, lens, k_scale, None, bd.SM_SCALE, bd.LAT, torch.bfloat16)  # noqa: E731
        us = bd.time_us(tri, tables)[0]
        hot = [(torch.arange(tables[0].numel(), device="cuda", dtype=torch.int32) % 4).view_as(tables[0])]
        hot_us = bd.time_us(tri, hot)[0]
        kv_bytes = batch * ctx * bd.D
        res["rows"].append(dict(batch=batch, heads=heads, context=ctx, kv_bytes=kv_bytes, triton_us=us,
                                triton_hot_l2_us=hot_us, floor_us=kv_bytes / (copy_tbps * 1e12) * 1e6,
                                triton_pct_of_copy=100 * kv_bytes / (copy_tbps * 1e12) * 1e6 / us))
        print(f"[baseline] {batch}x{heads}x{ctx}: triton {us:.1f} us ({res['rows'][-1]['triton_pct_of_copy']:.1f}% "
              f"of copy), hot L2 {hot_us:.1f} us", flush=True)
        dump(res, "dev_gluon16_baseline.json")
        del cache, tables
        torch.cuda.empty_cache()


def child_variant(tag, stages, early, variant, skip_timing):
    import torch
    from benchmarks import bench_decode as bd
    from fx_mla.ops import mla_decode_fp8 as dmod
    from fx_mla.ops import mla_decode_gluon16 as gmod
    from tests.ops.mla_decode_fp8_cases import make_problem, reference_f64, rel_err

    e4m3, e5m2, bf16, f16, f32 = (torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.float16,
                                  torch.float32)
    cases = [  # (lengths, block_size, cache dtype, q dtype, out dtype, num_splits)
        ([0, 1, 65, 1000, 333], 16, e4m3, bf16, bf16, None),
        ([0, 1, 65, 1000, 333], 16, e4m3, bf16, bf16, 1),
        ([0, 1, 65, 1000, 333], 16, e4m3, bf16, f32, 7),
        ([4096, 0, 77, 640], 64, e4m3, bf16, bf16, None),
        ([4096, 0, 77, 640], 64, e4m3, bf16, bf16, 1),
        ([130, 2, 64], 64, e5m2, bf16, f32, None),
        ([513, 9], 64, e4m3, f16, f16, 3),
        ([0, 0], 64, e4m3, bf16, bf16, 2),
        ([200, 3000, 64], 32, e4m3, bf16, bf16, 5),
    ]
    res = dict(variant=tag, kernel_variant=variant, num_stages=stages, early_read=early, checks=[], rows=[])
    name = f"dev_gluon16_{tag}.json"

    def kernel_info():
        k = getattr(gmod.launch_mla_decode_gluon16, "last_kernel", None)
        if k is None:
            return None
        return dict(n_regs=getattr(k, "n_regs", None), n_spills=getattr(k, "n_spills", None),
                    shared=getattr(getattr(k, "metadata", None), "shared", None))

    probe = torch.empty(1, 16, 576, dtype=bf16, device="cuda")
    res["unsupported_reason"] = gmod.gluon16_unsupported_reason(
        probe, torch.empty(1, 64, 576, dtype=e4m3, device="cuda"), 512, num_stages=stages, variant=variant)
    print(f"[{tag}] gluon16_unsupported_reason: {res['unsupported_reason']}", flush=True)
    for i, (lengths, block, cdt, qdt, odt, splits) in enumerate(cases):
        row = dict(lengths=lengths, block=block, cache=str(cdt), q=str(qdt), out=str(odt), splits=splits)
        try:
            p = make_problem(lengths, 16, block, cdt, qdt, seed=i, device="cuda")
            out = torch.full((len(lengths), 16, 512), float("nan"), dtype=odt, device="cuda")
            lse = torch.full((len(lengths), 16), float("nan"), dtype=f32, device="cuda")
            gmod.launch_mla_decode_gluon16(p.q, p.kv_cache, p.block_table, p.seq_lens, p.k_scale, None, p.sm_scale,
                                           512, out, lse, num_splits=splits, num_stages=stages, early_read=early,
                                           poison_workspace=True, variant=variant)
            torch.cuda.synchronize()
            ref_o, ref_l = dmod.mla_decode_fp8_reference(p.q, p.kv_cache, p.block_table, p.seq_lens, p.k_scale,
                                                         None, p.sm_scale, 512, f32)
            f64_o, f64_l = reference_f64(p)
            empty = torch.isinf(f64_l)
            fin = ~empty
            row.update(nan_out=bool(torch.isnan(out).any()), nan_lse=bool(torch.isnan(lse).any()),
                       inf_pattern_ok=bool(torch.equal(torch.isinf(lse), empty)),
                       empty_out_zero=bool((out[empty] == 0).all()) if empty.any() else True)
            ok = not row["nan_out"] and not row["nan_lse"] and row["inf_pattern_ok"] and row["empty_out_zero"]
            if fin.any():
                row.update(rel_err_out=rel_err(out[fin], ref_o[fin]),
                           lse_err=float((lse[fin] - ref_l[fin]).abs().max()),
                           rel_err_out_f64=rel_err(out[fin], f64_o[fin]),
                           lse_err_f64=float((lse[fin].double() - f64_l[fin]).abs().max()))
                ok = ok and row["rel_err_out"] <= 1e-2 and row["lse_err"] <= 1e-3 \
                    and row["rel_err_out_f64"] <= 1e-2 and row["lse_err_f64"] <= 1e-3
            row["ok"] = bool(ok)
        except Exception as e:  # noqa: BLE001 - report; a CUDA fault ends this child (the parent goes on)
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:1500]}")
            traceback.print_exc()
        res["checks"].append(row)
        print(f"[{tag}] check {i} lens {lengths} bs {block} {str(cdt)[-6:]} q {str(qdt)[6:]} out {str(odt)[6:]} "
              f"splits {splits}: ok={row['ok']} out {row.get('rel_err_out', float('nan')):.2e} (f64 "
              f"{row.get('rel_err_out_f64', float('nan')):.2e}) lse {row.get('lse_err', float('nan')):.1e} (f64 "
              f"{row.get('lse_err_f64', float('nan')):.1e}) {row.get('error', '')[:300]}", flush=True)
        dump(res, name)
    res["kernel"] = kernel_info()
    res["all_ok"] = all(r["ok"] for r in res["checks"])
    print(f"[{tag}] kernel {res['kernel']}; all checks ok: {res['all_ok']}", flush=True)
    dump(res, name)
    if skip_timing or not res["all_ok"]:
        return

    op = torch.ops.fx_mla.mla_decode_fp8
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for batch, heads, ctx in SHAPES16:
        cache, tables, lens, k_scale, q, _, _ = bd.make_inputs(batch, heads, ctx, 1)
        ref_o, ref_l = op(q, cache, tables[0], lens, k_scale, None, bd.SM_SCALE, bd.LAT, torch.bfloat16)
        out = torch.empty(batch, heads, bd.LAT, dtype=bf16, device="cuda")
        lse = torch.empty(batch, heads, dtype=f32, device="cuda")
        auto = gmod.default_num_splits(batch, ctx, 0)
        row = dict(batch=batch, heads=heads, context=ctx, kv_bytes=batch * ctx * bd.D, auto_splits=auto, gluon={})
        for splits in [auto] + sorted({s for s in (2 * auto, max(1, (2 * sms) // batch)) if s != auto}):
            try:
                out.fill_(float("nan"))
                lse.fill_(float("nan"))
                call = lambda t, s=splits: gmod.launch_mla_decode_gluon16(  # noqa: E731
                    q, cache, t, lens, k_scale, None, bd.SM_SCALE, bd.LAT, out, lse, num_splits=s,
                    num_stages=stages, early_read=early, variant=variant)
                call(tables[0])
                torch.cuda.synchronize()
                err, lerr = rel_err(out.float(), ref_o.float()), float((lse - ref_l).abs().max())
                us = bd.time_us(call, tables)[0]
                row["gluon"][str(splits)] = dict(us=us, rel_err_vs_triton=err, lse_err_vs_triton=lerr)
            except Exception as e:  # noqa: BLE001
                row["gluon"][str(splits)] = dict(error=f"{type(e).__name__}: {str(e)[:1500]}")
                traceback.print_exc()
        try:
            hot = [(torch.arange(tables[0].numel(), device="cuda", dtype=torch.int32) % 4).view_as(tables[0])]
            row["gluon_hot_l2_us"] = bd.time_us(lambda t: gmod.launch_mla_decode_gluon16(
                q, cache, t, lens, k_scale, None, bd.SM_SCALE, bd.LAT, out, lse, num_stages=stages,
                early_read=early, variant=variant), hot)[0]
        except Exception as e:  # noqa: BLE001
            row["hot_error"] = f"{type(e).__name__}: {str(e)[:500]}"
        row["kernel"] = kernel_info()
        res["rows"].append(row)
        print(f"[{tag}] {batch}x{heads}x{ctx}: " + " ".join(
            f"splits {k}: {v['us']:.1f} us (err {v['rel_err_vs_triton']:.1e}, lse {v['lse_err_vs_triton']:.1e})"
            if "us" in v else f"splits {k}: {v['error'][:200]}" for k, v in row["gluon"].items())
            + f" | hot L2 {row.get('gluon_hot_l2_us', float('nan')):.1f} us", flush=True)
        dump(res, name)
        del cache, tables
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ parent
def load(name):
    try:
        with open(os.path.join(out_dir(), name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _auto_us(variants):
    """{shape: {tag: us at the automatic split count}} for every variant whose checks all passed."""
    table = {}
    for tag, v in variants.items():
        for r in (v or {}).get("rows", []) if (v or {}).get("all_ok") else []:
            g = r["gluon"].get(str(r["auto_splits"]), {})
            if "us" in g:
                table.setdefault(f"{r['batch']}x16x{r['context']}", {})[tag] = round(g["us"], 1)
    return table


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=140.0)
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--round2", action="store_true", help="only ROUND2: ws8p2 (default), ws8p2o, the ring kernel")
    ap.add_argument("--child-limit", type=float, default=None, help="seconds a child (default 60; --round2: 50)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "baseline":
        return child_baseline()
    if args.child is not None:
        tag, stages, early, variant = next(v for v in VARIANTS if v[0] == args.child)
        return child_variant(tag, stages, early, variant, args.skip_timing)

    t0 = time.time()
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    tags = ROUND2 if args.round2 else ROUND1
    jobs = [tags[0]] + ([] if args.skip_timing else ["baseline"]) + tags[1:]
    limit = args.child_limit or (50.0 if args.round2 else 60.0)
    status = {}
    for job in jobs:
        left = args.budget - (time.time() - t0)
        if left < 15:
            status[job] = "skipped: out of time budget"
            print(f"== {job}: skipped (budget)", flush=True)
            continue
        stale = os.path.join(out_dir(), f"dev_gluon16_{job}.json")
        if os.path.exists(stale):  # never merge a result of an earlier run
            os.remove(stale)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", job] + (["--skip-timing"] * args.skip_timing)
        print(f"== {job} (at {time.time() - t0:.0f} s, limit {min(limit, left):.0f} s)", flush=True)
        try:
            rc = subprocess.run(cmd, env=env, cwd=REPO, timeout=min(limit, left)).returncode
            status[job] = f"rc {rc}"
        except subprocess.TimeoutExpired:
            status[job] = "timeout"
        print(f"== {job}: {status[job]}", flush=True)

    base = load("dev_gluon16_baseline.json") or {}
    result = dict(name="dev_gluon16_decode", date="2026-11-27", status=status, baseline=base, variants={},
                  seconds=time.time() - t0)
    copy = base.get("copy_tbps")
    tri = {(r["batch"], r["context"]): r for r in base.get("rows", [])}
    best = {}
    print(f"\n{base.get('device')} torch {base.get('torch')} triton {base.get('triton')} copy "
          f"{copy if copy is None else round(copy, 2)} TB/s")
    print(f"{'variant':>9} {'checks':>7} {'shape':>13} {'splits':>6} {'us':>8} {'%copy':>6} {'x triton':>8} "
          f"{'err':>8} {'regs':>5}")
    for tag in tags:
        v = load(f"dev_gluon16_{tag}.json")
        result["variants"][tag] = v
        if v is None:
            print(f"{tag:>9} no result ({status.get(tag)})")
            continue
        n_ok = sum(r["ok"] for r in v["checks"])
        regs = (v.get("kernel") or {}).get("n_regs")
        if not v.get("rows"):
            print(f"{tag:>9} {n_ok:>3}/{len(v['checks']):<3} (no timing; {status.get(tag)})")
        for r in v.get("rows", []):
            for s, g in r["gluon"].items():
                if "us" not in g:
                    continue
                t = tri.get((r["batch"], r["context"]), {})
                pct = 100 * r["kv_bytes"] / (copy * 1e12) * 1e6 / g["us"] if copy else float("nan")
                sp = t["triton_us"] / g["us"] if "triton_us" in t else float("nan")
                g.update(pct_of_copy=pct, speedup_vs_triton=sp)
                key = (r["batch"], r["context"])
                if v["all_ok"] and (key not in best or g["us"] < best[key]["us"]):
                    best[key] = dict(variant=tag, splits=int(s), us=g["us"], pct_of_copy=pct, speedup_vs_triton=sp)
                print(f"{tag:>9} {n_ok:>3}/{len(v['checks']):<3} {r['batch']:>4}x16x{r['context']:<6} {s:>6} "
                      f"{g['us']:8.1f} {pct:6.1f} {sp:8.2f} {g['rel_err_vs_triton']:8.1e} {regs}")
    for (b, c), t in tri.items():
        print(f"{'triton':>9} {'':>7} {b:>4}x16x{c:<6} {'':>6} {t['triton_us']:8.1f} {t['triton_pct_of_copy']:6.1f}")
    result["summary"] = dict(
        checks_ok={tag: (v or {}).get("all_ok") for tag, v in result["variants"].items()},
        best={f"{b}x16x{c}": x for (b, c), x in best.items()},
        min_pct_of_copy_best=min((x["pct_of_copy"] for x in best.values()), default=None),
        min_speedup_vs_triton_best=min((x["speedup_vs_triton"] for x in best.values()), default=None),
        auto_splits_us=_auto_us(result["variants"]))
    result["seconds"] = time.time() - t0
    dump(result, "dev_gluon16_decode.json")
    print("summary:", json.dumps(result["summary"]))


if __name__ == "__main__":
    main()
