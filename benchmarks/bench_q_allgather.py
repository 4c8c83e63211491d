"""Issue 4 benchmark: DCP query all-gather, bf16-gather-then-quantize vs quantize-then-FP8-gather.

  PYTHONPATH=. python benchmarks/bench_q_allgather.py --world-size 2            # NCCL, one GPU a rank
  PYTHONPATH=. python benchmarks/bench_q_allgather.py --world-size 4
  PYTHONPATH=. python benchmarks/bench_q_allgather.py --world-size 2 --device cpu   # gloo smoke test
  PYTHONPATH=. python benchmarks/bench_q_allgather.py --single                  # one GPU: quant kernels

Multi-rank: each rank holds q [B, 128/N, 576] bf16; both paths end with the gathered FP8 query
[B, 128, 576] (gather along the head dim: all_gather_into_tensor on dim 0, split, cat on dim 1) and
quantize with the same op (fx_mla::quant_fp8, static scale identical on every rank), so the time
difference is the bytes on the wire. FP8 travels as a uint8 view (gloo cannot gather float8).
Timing: a fixed iteration count on every rank (never do_bench around collectives: its adaptive repeat
count differs per rank and hangs), a barrier before each repetition, CUDA events, the median of the
repetitions, then the max over ranks; two ways, both reported:
  eager loop: `iters` calls from Python (host launch cost included: at small B the host bounds it);
  CUDA graph (NCCL only): `iters` calls of each path captured in one CUDA graph on every rank (warmed up
  on a side stream first, so NCCL's communicator exists before capture), replayed after a barrier:
  device time a call. The summary's headline ratio uses the CUDA-graph time on GPUs (the eager loop on
  CPU) and gives both ratios at the largest B. Writes benchmarks/results/q_allgather.json.

--single: fx_mla::quant_fp8 (static, dynamic, per-token) vs the same chain in eager torch and under
Inductor, do_bench medians, bytes and % of a device-to-device copy measured in the same run.
Writes benchmarks/results/quant_fp8.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import fx_mla.ops.quant_fp8  # noqa: E402,F401  (registers torch.ops.fx_mla.quant_fp8*)
from fx_mla.ops._fp8 import FP8_MAX  # noqa: E402

HEADS, D = 128, 576
FP8 = torch.float8_e4m3fn
Q_SCALE = 0.0213  # static per-tensor query scale, the same on every rank
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def _env_info(device: str) -> dict:
    import triton
    info = {"torch": torch.__version__, "triton": triton.__version__, "date": time.strftime("%Y-%m-%d")}
    info["card"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return info


# ---------------------------------------------------------------- multi-rank all-gather

def _gather_heads(t, world_size, group=None):
    """[B, H_local, D] on each rank -> [B, H_local * N, D] (gathered on dim 0, moved to dim 1)."""
    import torch.distributed as dist
    out = torch.empty((world_size * t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    dist.all_gather_into_tensor(out, t.contiguous(), group=group)
    return torch.cat(out.split(t.shape[0]), dim=1)


def _bf16_gather_then_quant(q, scale, ws):
    return torch.ops.fx_mla.quant_fp8(_gather_heads(q, ws), scale, FP8)


def _quant_then_fp8_gather(q, scale, ws):
    q8 = torch.ops.fx_mla.quant_fp8(q, scale, FP8)
    return _gather_heads(q8.view(torch.uint8), ws).view(FP8)


def _time_fixed(fn, device, iters, reps, warmup):
    """Median per-iteration ms over `reps` repetitions of `iters` calls; same counts on every rank."""
    import torch.distributed as dist
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        if device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(times)


def _time_graph(fn, iters, reps, warmup):
    """Median per-call ms of `iters` calls captured in one CUDA graph, replayed `reps` times after barriers;
    also the graph's last output (to check it against the eager result). Every rank captures the same calls."""
    import torch.distributed as dist
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream (torch.cuda.graphs docs)
        for _ in range(max(warmup, 3)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            last = fn()
    torch.cuda.synchronize()
    dist.barrier()
    graph.replay()  # first replay: uploads the graph
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    out = last.clone()
    del graph
    return statistics.median(times), out


def _allgather_rank(rank, ws, device, batches, iters, reps, warmup):
    import warnings

    import torch.distributed as dist
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    if HEADS % ws:
        raise ValueError(f"--world-size must divide {HEADS} heads, got {ws}")
    dev = torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")
    h_local = HEADS // ws
    scale = torch.tensor(Q_SCALE, dtype=torch.float32, device=dev)
    rows = []
    for b in batches:
        g = torch.Generator(device=dev).manual_seed(1000 * rank + b)
        q = torch.randn((b, h_local, D), generator=g, device=dev, dtype=torch.float32).mul_(3).to(torch.bfloat16)
        ref = _bf16_gather_then_quant(q, scale, ws)
        new = _quant_then_fp8_gather(q, scale, ws)
        equal = bool(torch.equal(ref.view(torch.uint8), new.view(torch.uint8)))
        paths = (lambda: _bf16_gather_then_quant(q, scale, ws), lambda: _quant_then_fp8_gather(q, scale, ws))
        t_bf16, t_fp8 = (_time_fixed(fn, device, iters, reps, warmup) for fn in paths)
        g_bf16 = g_fp8 = float("nan")
        if device == "cuda":
            (g_bf16, out_bf16), (g_fp8, out_fp8) = (_time_graph(fn, iters, reps, warmup) for fn in paths)
            equal = equal and all(torch.equal(o.view(torch.uint8), ref.view(torch.uint8))
                                  for o in (out_bf16, out_fp8))
        # the slowest rank bounds a collective step; every rank sends the same reduction
        stats = torch.tensor([t_bf16, t_fp8, g_bf16, g_fp8, 0.0 if equal else 1.0], device=dev,
                             dtype=torch.float64)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        t_bf16, t_fp8, g_bf16, g_fp8, unequal = stats.tolist()
        graphed = device == "cuda"
        gathered = b * HEADS * D
        rows.append({"B": b, "t_bf16_gather_quant_us": t_bf16 * 1e3, "t_quant_fp8_gather_us": t_fp8 * 1e3,
                     "ratio": t_fp8 / t_bf16,
                     "graph_bf16_gather_quant_us": g_bf16 * 1e3 if graphed else None,
                     "graph_quant_fp8_gather_us": g_fp8 * 1e3 if graphed else None,
                     "graph_ratio": g_fp8 / g_bf16 if graphed else None,
                     "gathered_bytes_bf16": 2 * gathered,
                     "gathered_bytes_fp8": gathered,
                     "received_bytes_per_rank_bf16": 2 * gathered * (ws - 1) // ws,
                     "received_bytes_per_rank_fp8": gathered * (ws - 1) // ws,
                     "bitwise_equal_all_ranks": unequal == 0.0})
    return rows


def run_allgather(args):
    from fx_mla.launch import run_ranks
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # the lent hosts require NVLink multicast off
    if args.device == "cuda" and torch.cuda.device_count() < args.world_size:
        raise SystemExit(f"--world-size {args.world_size} needs {args.world_size} GPUs, "
                         f"found {torch.cuda.device_count()}")
    backend = "nccl" if args.device == "cuda" else "gloo"
    results = run_ranks(_allgather_rank, args.world_size, args.device, args.batches, args.iters,
                        args.reps, args.warmup, backend=backend, timeout=args.timeout)
    rows = results[0]
    print(f"\nQ all-gather, {args.world_size} ranks ({backend}), {HEADS} gathered heads x D={D}, "
          f"bf16 in, fp8 e4m3 out; us a call, median of {args.reps} x {args.iters} iters, max over ranks. "
          f"loop: Python loop (host launch cost included); graph: {args.iters} calls in one CUDA graph "
          f"(device time)")
    print(f"{'B':>5} {'loop bf16+q':>12} {'loop q+fp8':>11} {'ratio':>6} {'graph bf16+q':>13} "
          f"{'graph q+fp8':>12} {'ratio':>6} {'wire B bf16':>12} {'wire B fp8':>11} {'bitwise':>8}")
    na = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        print(f"{r['B']:>5} {r['t_bf16_gather_quant_us']:>12.1f} {r['t_quant_fp8_gather_us']:>11.1f} "
              f"{r['ratio']:>6.3f} {na(r['graph_bf16_gather_quant_us'], '13.1f'):>13} "
              f"{na(r['graph_quant_fp8_gather_us'], '12.1f'):>12} {na(r['graph_ratio'], '6.3f'):>6} "
              f"{r['gathered_bytes_bf16']:>12} {r['gathered_bytes_fp8']:>11} "
              f"{str(r['bitwise_equal_all_ranks']):>8}")
    info = _env_info(args.device)
    if args.device == "cuda":
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(args.world_size)]
    largest = max(rows, key=lambda r: r["B"])
    graphed = largest["graph_ratio"] is not None
    out = {"benchmark": "q_allgather", "world_size": args.world_size, "backend": backend,
           "device": args.device, "heads": HEADS, "D": D, "fp8_dtype": str(FP8), **info,
           "iters": args.iters, "reps": args.reps, "rows": rows,
           "summary": {"ratio_at_largest_B": largest["graph_ratio"] if graphed else largest["ratio"],
                       "headline_timing": "cuda_graph" if graphed else "eager_loop",
                       "ratio_cuda_graph_at_largest_B": largest["graph_ratio"],
                       "ratio_eager_loop_at_largest_B": largest["ratio"], "largest_B": largest["B"],
                       "bitwise_equal_all": all(r["bitwise_equal_all_ranks"] for r in rows),
                       "target_ratio_at_large_B": 0.6}}
    _write_json(out, args.out or f"q_allgather{'' if args.device == 'cuda' else '_cpu_smoke'}.json")


# ---------------------------------------------------------------- single GPU: quant kernels

def _copy_ceiling_tbs():
    import triton.testing
    src = torch.empty(1 << 29, dtype=torch.float16, device="cuda").normal_()  # 1 GiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e12


def _chains():
    fmax = FP8_MAX[FP8]

    def static(x, s):
        return (x / s).clamp(-fmax, fmax).to(FP8)

    def dynamic(x):
        s = x.abs().amax().float().clamp(min=1e-12) / fmax
        return (x / s).clamp(-fmax, fmax).to(FP8), s

    def per_token(x):
        s = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / fmax
        return (x / s).clamp(-fmax, fmax).to(FP8), s
    return {"static": static, "dynamic": dynamic, "per_token": per_token}


GRAPH_CALLS = 20  # calls captured in one CUDA graph: its replay time / calls = device time a call


def _graph_us(fn, call_args):
    """Device time of one call: GRAPH_CALLS calls captured in a CUDA graph, replay timed."""
    import triton.testing
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(*call_args)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(GRAPH_CALLS):
            fn(*call_args)
    ms = triton.testing.do_bench(g.replay, warmup=10, rep=50, return_mode="median")
    return ms * 1e3 / GRAPH_CALLS


def run_single(args):
    import triton.testing
    torch.manual_seed(0)
    ceiling = _copy_ceiling_tbs()
    chains = _chains()
    compiled = {k: torch.compile(f, dynamic=True) for k, f in chains.items()}
    ops = {"static": lambda x, s: torch.ops.fx_mla.quant_fp8(x, s, FP8),
           "dynamic": lambda x: torch.ops.fx_mla.quant_fp8_dynamic(x, FP8),
           "per_token": lambda x: torch.ops.fx_mla.quant_fp8_per_token(x, FP8)}
    rows = []
    for b in args.single_batches:
        x = (torch.randn((b, HEADS, D), device="cuda") * 3).to(torch.bfloat16)
        s = torch.tensor(Q_SCALE, device="cuda")
        n = x.numel()
        min_bytes = 3 * n  # read bf16 once, write fp8 once (scales are negligible)
        for kind in ("static", "dynamic", "per_token"):
            call_args = (x, s) if kind == "static" else (x,)
            q_ours, q_eager = ops[kind](*call_args), chains[kind](*call_args)
            q_ours = q_ours if kind == "static" else q_ours[0]
            q_eager = q_eager if kind == "static" else q_eager[0]
            diff_eager = int((q_ours.view(torch.uint8) != q_eager.view(torch.uint8)).sum())
            for impl, fn in (("fx_mla", ops[kind]), ("torch_eager", chains[kind]),
                             ("inductor", compiled[kind])):
                ms = triton.testing.do_bench(lambda: fn(*call_args), warmup=25, rep=100,
                                             return_mode="median")
                dev_us = _graph_us(fn, call_args)
                tbs = min_bytes / (dev_us * 1e-6) / 1e12
                rows.append({"B": b, "kind": kind, "impl": impl, "us": ms * 1e3, "graph_us": dev_us,
                             "elements": n, "min_bytes": min_bytes, "flops": 3 * n, "TB_s": tbs,
                             "pct_copy": 100 * tbs / ceiling, "bytes_differing_from_eager": diff_eager})
    print(f"\nquant_fp8 single GPU ({torch.cuda.get_device_name()}), x [B, {HEADS}, {D}] bf16 -> e4m3; "
          f"copy ceiling {ceiling:.2f} TB/s (read+write). us: do_bench median of single calls "
          f"(host launch cost included); graph us: device time a call ({GRAPH_CALLS} calls in a "
          f"CUDA graph); TB/s from graph us and 3 bytes/element (bf16 in, fp8 out)")
    print(f"{'B':>5} {'kind':>10} {'impl':>12} {'us':>9} {'graph us':>9} {'TB/s':>7} {'% copy':>7}")
    for r in rows:
        print(f"{r['B']:>5} {r['kind']:>10} {r['impl']:>12} {r['us']:>9.2f} {r['graph_us']:>9.2f} "
              f"{r['TB_s']:>7.3f} {r['pct_copy']:>7.1f}")
    big = max(args.single_batches)
    pick = {(r["kind"], r["impl"]): r for r in rows if r["B"] == big}
    summary = {"largest_B": big, "copy_ceiling_TB_s": ceiling}
    for kind in ("static", "dynamic", "per_token"):
        ours = pick[(kind, "fx_mla")]
        summary[f"{kind}_device_speedup_vs_eager"] = pick[(kind, "torch_eager")]["graph_us"] / ours["graph_us"]
        summary[f"{kind}_device_speedup_vs_inductor"] = pick[(kind, "inductor")]["graph_us"] / ours["graph_us"]
        summary[f"{kind}_pct_copy"] = ours["pct_copy"]
    out = {"benchmark": "quant_fp8_single", **_env_info("cuda"), "heads": HEADS, "D": D,
           "rows": rows, "summary": summary}
    _write_json(out, args.out or "quant_fp8.json")


def _write_json(obj, name):
    os.makedirs(RESULTS, exist_ok=True)
    path = name if os.path.isabs(name) else os.path.join(RESULTS, name)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--single", action="store_true", help="one GPU: quant kernels vs torch eager/inductor")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128, 256])
    p.add_argument("--single-batches", type=int, nargs="+", default=[1, 8, 32, 128, 256, 2048])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--reps", type=int, default=11)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--out", default=None, help="JSON file name under benchmarks/results/ (or absolute)")
    args = p.parse_args(argv)
    if args.single:
        run_single(args)
    else:
        run_allgather(args)


if __name__ == "__main__":
    main()
