"""Issue 5 benchmark: fx_mla::gather_dequant_cache vs the plain PyTorch it replaces (eager and Inductor).

    PYTHONPATH=. python benchmarks/bench_cache_gather.py [--sizes 4096,...,1048576] [--rep 100] [--budget-s S]
    PYTHONPATH=. python benchmarks/bench_cache_gather.py --sweep     # launch configs only, 64K and 1M, < 150 s

Token-parallel form (chunked-prefill context gather): ragged requests (block size 64, random seq_starts, scattered
pages), D = 576 fp8 e4m3 -> bf16 with a per-tensor scale, and the 656-byte fp8_ds_mla layout -> bf16; paged
decode form ([64, max_blocks * 64, D]). Bytes = cache bytes read (576 or 656 a token) + output written (1152 a
token); index bytes (~4 a token) not counted. FLOPs = one multiply a latent element (negligible: a copy).
Time columns (medians of triton.testing.do_bench, --rep ms):
- call us: one Python call of the op (host launch cost included; do_bench clears L2 before each call).
- graph us: one CUDA-graph replay holding one call (GPU time plus graph launch, ramp and tail).
- device us: K calls back to back in one CUDA graph, replay time / K: a call's device time as a decode step
  runs it. Calls rotate over R distinct caches, each writes its own output, R * (cache + output bytes) >=
  4x L2 (R = 1 once one set is that large); the metadata is shared, as a real step shares it.
Copy ceiling: the fastest device-to-device copy measured in this run (bytes read + written): a 1 GiB -> 1 GiB
copy timed as do_bench of one copy and as device us (K copies, one graph), at the start after ~1 s of copies
(a GPU out of idle clocks up slower than do_bench's warm-up) and again at the end, and every same-size copy
(the op's bytes, rotated like the op, device us); all are in info.copies. %copy = op GB/s (device us) /
ceiling; %same = op GB/s / its same-size copy's. summary.pct_of_copy_at_64k: %copy of the token form at
65536 tokens, the worse layout. Baselines: the literal plain chain (tests/ops/gather_dequant_cache_cases.py)
eager and under torch.compile(backend="inductor", dynamic=True), with the op's bitwise equality to each.
--budget-s: rows started after that many seconds skip the baselines. cache_gather.json is rewritten after
every row ("partial": true until the end). --sweep: launch configurations (gather_dequant_cache.CONFIG's
form) of the token form at 64K and 1M, both layouts, device us, output bits checked against the op's ->
cache_gather_sweep.json. JSON goes to benchmarks/results/ and, when OUT is set, to $OUT too.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from fx_mla.ops import gather_dequant_cache as gmod  # noqa: E402  (registers the ops)
from tests.ops.gather_dequant_cache_cases import (bench_token_problem, device_random_cache,  # noqa: E402
                                                  plain_ds_mla_dequant, plain_paged, plain_token, plain_token_rows)

BS, D, OUT = 64, 576, torch.bfloat16
RESULTS = os.path.join(ROOT, "benchmarks", "results")
SWEEP = [(8, 4, 0), (8, 2, 0), (8, 4, 0, "s"), (8, 4, 0, "v"), (8, 2, 0, "v"), (4, 2, 0, "v"), (16, 4, 0, "v"),
         (8, 4, 0, "vs"), (8, 2, 0, "vs"), (4, 2, 0, "vs"), (4, 1, 0, "vs"), (16, 8, 0, "vs"), (8, 4, 4, "vs"),
         (8, 4, 0, "vsp"), (8, 2, 0, "vsp"), (4, 2, 0, "vsp"),
         (8, 4, 0, "p"), (8, 4, 0, "sp"), (4, 2, 0, "p")]  # PDL last: a capture it broke could not spoil others. Session 3 added
# (8, 4, 0) with PDL alone / with streaming stores (not yet run): 'p' added ~1 point to 'vs' at 64K, and 'v' costs.
SWEEP_SIZES = (65536, 1048576)
MIN_CALLS = 8          # calls a graph holds for the device-us column (at least)
ROTATE_L2 = 4          # distinct bytes touched between two uses of a buffer, in L2 sizes
REP_MS = 100           # do_bench rep (--rep)
DEVICE = "cuda"
COPIES = []            # every copy measured in this run; the copy ceiling is the fastest


def _median_ms(fn):
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=25, rep=REP_MS, return_mode="median"))


def _l2_bytes(dev):
    return int(getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or 50 << 20)


def _rotation(set_bytes, dev):
    """(R distinct buffer sets, K calls a graph): R sets touch >= ROTATE_L2 x L2; K a multiple of R."""
    r = max(1, min(32, math.ceil(ROTATE_L2 * _l2_bytes(dev) / max(set_bytes, 1))))
    return r, r * math.ceil(MIN_CALLS / r)


def _device_us(calls):
    """calls: K closures; all captured in one CUDA graph, median replay time / K in microseconds."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in calls[:2]:
            fn()  # compile / warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    keep = []
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            keep.append(fn())  # outputs stay alive: every call writes its own buffer
    ms = _median_ms(graph.replay)
    del graph, keep
    return ms * 1e3 / len(calls)


def _graph_us(fn):
    """One call captured in a CUDA graph, median replay time (the previous session's 'graph' column)."""
    return _device_us([fn])


def _note_copy(what, moved, method, gbs):
    COPIES.append({"what": what, "bytes": moved, "method": method, "GB_s": gbs})
    return gbs


def _ceiling():
    """(GB/s, the copy that gave it): the fastest copy measured so far in this run."""
    best = max(COPIES, key=lambda c: c["GB_s"])
    return best["GB_s"], best


def _copy_gbs(nbytes, dev):
    """Same-size copy: K closures copying nbytes // 2 bytes each (nbytes moved), rotated like the op."""
    half = nbytes // 2
    r, k = _rotation(nbytes, dev)
    pairs = [(torch.randint(0, 255, (half,), dtype=torch.uint8, device=dev), torch.empty(half, dtype=torch.uint8,
              device=dev)) for _ in range(r)]
    us = _device_us([(lambda p=pairs[i % r]: p[1].copy_(p[0])) for i in range(k)])
    del pairs
    torch.cuda.empty_cache()
    return _note_copy(f"same-size {2 * half}", 2 * half, "device us", 2 * half / us / 1e3)


def _big_copy(dev, when, warm_s=0.0):
    """1 GiB -> 1 GiB device-to-device copy (2 GiB moved), timed as do_bench of one copy a call and as device
    us. warm_s seconds of copies first: from idle, a GPU may need longer than do_bench's 25 ms to clock up."""
    half = 1 << 30
    src = torch.randint(0, 255, (half,), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    cp = (lambda: dst.copy_(src))
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < warm_s:
        for _ in range(20):
            cp()
        torch.cuda.synchronize()
    one = _note_copy(f"1 GiB, {when}", 2 * half, "do_bench, one copy a call", 2 * half / _median_ms(cp) / 1e6)
    graph = _note_copy(f"1 GiB, {when}", 2 * half, "device us", 2 * half / _device_us([cp] * MIN_CALLS) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    print(f"copy 1 GiB ({when}): {one:.0f} GB/s (do_bench, one copy) | {graph:.0f} GB/s (device us)", flush=True)


def _plain_token_ds_mla(cache, bt, cu, tts, ss, scale):
    return plain_ds_mla_dequant(plain_token_rows(cache, bt, cu, tts, ss), OUT)


def _plain_token_fp8(cache, bt, cu, tts, ss, scale):
    return plain_token(cache, bt, cu, tts, ss, scale, OUT)


def _plain_paged_ds_mla(cache, bt, scale):
    return plain_ds_mla_dequant(cache[bt].view(bt.shape[0], -1, 656), OUT)


def _plain_paged_fp8(cache, bt, scale):
    return plain_paged(cache, bt, scale, OUT)


def _host_us(fn, calls=300):
    """Host microseconds a call (tiny problem: the GPU never holds the CPU back)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def _row(name, n, nbytes, call_ms=None, graph_us=None, device_us=None, same_copy_gbs=None, **extra):
    """A result row; its %copy columns are filled in by _finish (the ceiling is known only at the end)."""
    r = {"case": name, "tokens": n, "bytes": nbytes, "flops": n * 512 if "ds_mla" in name else n * D, **extra}
    msg = f"  {name} {n}:"
    if call_ms is not None:
        r.update(call_us=call_ms * 1e3)
        msg += f" call {call_ms * 1e3:.1f} us"
    if graph_us is not None:
        r.update(graph_us=graph_us, graph_GB_s=nbytes / graph_us / 1e3)
        msg += f" | graph {graph_us:.1f} us"
    if device_us is not None:
        gbs = nbytes / device_us / 1e3
        r.update(device_us=device_us, GB_s=gbs)
        msg += f" | device {device_us:.1f} us {gbs:.0f} GB/s"
        if same_copy_gbs is not None:
            r.update(same_size_copy_GB_s=same_copy_gbs, pct_of_same_size_copy=100 * gbs / same_copy_gbs)
            msg += f" ({r['pct_of_same_size_copy']:.1f}% of a same-size copy at {same_copy_gbs:.0f} GB/s)"
    print(msg, flush=True)
    return r


def _finish(rows):
    """%copy of every row against the ceiling: the fastest copy measured so far."""
    ceil, _ = _ceiling()
    for r in rows:
        if r.get("GB_s") is not None:
            r["pct_of_copy"] = 100 * r["GB_s"] / ceil
        if r.get("graph_GB_s") is not None:
            r["graph_pct_of_copy"] = 100 * r["graph_GB_s"] / ceil
    return ceil


def _same(a, b):
    return bool(torch.equal(a.view(torch.int16), b.view(torch.int16)))


def _try_device_us(calls):
    try:
        return _device_us(calls)
    except Exception as e:  # a baseline that cannot be captured is reported without the column
        print(f"    (not capturable: {type(e).__name__}: {str(e)[:200]})")
        return None


def _baselines(res, name, n, nbytes, plain, compiled, sets, k, out):
    a = sets[0]
    res["op"]["bitwise_vs_eager_cuda"] = _same(out, plain(*a))
    fns = {"eager": plain}
    cf = compiled.get(plain.__name__)
    if cf is not None:
        try:
            res["op"]["bitwise_vs_inductor"] = _same(out, cf(*a))
            fns["inductor"] = cf
        except Exception as e:  # a baseline that fails to compile is reported, not fatal
            print(f"inductor failed on {name}: {type(e).__name__}: {str(e)[:300]}")
            compiled.pop(plain.__name__)
    for base, f in fns.items():
        calls = [(lambda s=sets[i % len(sets)]: f(*s)) for i in range(k)]
        res[base] = _row(f"{name} {base}", n, nbytes, call_ms=_median_ms(lambda: f(*a)),
                         device_us=_try_device_us(calls))


def _info(dev):
    import triton
    props = torch.cuda.get_device_properties(dev)
    return {"card": torch.cuda.get_device_name(dev), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"), "sms": props.multi_processor_count, "l2_bytes": _l2_bytes(dev),
            "rep_ms": REP_MS, "copies": COPIES, "config": {k: list(v) for k, v in gmod.CONFIG.items()}}


def _write(name, payload):
    text = json.dumps(payload, indent=1)
    dirs = [RESULTS] + ([os.environ["OUT"]] if os.environ.get("OUT") else [])
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, name), "w") as f:
            f.write(text)
    print(f"wrote {name} to {', '.join(dirs)}", flush=True)


LAYOUTS = [("plain", D + 2 * D, "fp8_e4m3_576"), ("fp8_ds_mla", 656 + 2 * D, "fp8_ds_mla_656")]


def _token_sets(n, layout, per_token, dev, gen, cgen, scale):
    """R argument tuples (distinct caches, shared metadata) and K for the device-us column."""
    num_blocks, bt, cu, tts, ss = bench_token_problem(n, dev, cgen)
    r, k = _rotation(n * per_token, dev)
    s = scale if layout == "plain" else None
    return [(device_random_cache(num_blocks, layout, dev, gen), bt, cu, tts, ss, s) for _ in range(r)], k


def _paged_sets(n, layout, per_token, dev, gen, cgen, scale):
    """Decode form: 64 requests x n / (64 * 64) pages of 64, distinct scattered pages."""
    batch = 64
    mb = max(1, n // (batch * BS))
    r, k = _rotation(n * per_token, dev)
    bt = torch.randperm(batch * mb + 16, generator=cgen)[:batch * mb].view(batch, mb).to(torch.int32).to(dev)
    s = scale if layout == "plain" else None
    return [(device_random_cache(batch * mb + 16, layout, dev, gen), bt, s) for _ in range(r)], k


def run_sweep(dev, gen, cgen, scale, info, configs=None):
    """Launch configurations of the token form at 64K and 1M tokens, both layouts, device us. configs: a subset of
    SWEEP (default all)."""
    rows = []
    for layout, per_token, name in LAYOUTS:
        for n in SWEEP_SIZES:
            sets, k = _token_sets(n, layout, per_token, dev, gen, cgen, scale)
            same = _copy_gbs(n * per_token, dev)
            ref = torch.ops.fx_mla.gather_dequant_cache(*sets[0], OUT, layout)
            print(f"{name} {n}: {len(sets)} caches, {k} calls a graph, same-size copy {same:.0f} GB/s", flush=True)
            for cfg in (configs or SWEEP):
                bufs = [torch.full_like(ref, float("nan")) for _ in sets]
                launch = gmod.launch_gather_dequant_cache
                calls = [(lambda a=sets[i % len(sets)], o=bufs[i % len(sets)]: launch(*a, o, layout, cfg))
                         for i in range(k)]
                try:
                    us = _device_us(calls)
                except Exception as e:  # a config that fails to compile or launch is reported, not fatal
                    print(f"  cfg {cfg} failed: {type(e).__name__}: {str(e)[:300]}")
                    continue
                extra = {}
                if len(cfg) > 3 and "a" in cfg[3]:  # did the Gluon kernel run, or its Triton fallback?
                    extra["async_reason"] = gmod.async_unsupported(sets[0][0], bufs[0], layout, cfg)
                rows.append(_row(f"token {name} cfg{cfg}", n, n * per_token, device_us=us, same_copy_gbs=same,
                                 config=list(cfg), layout=layout, bitwise_vs_op=_same(bufs[0], ref), **extra))
                del bufs, calls
            del sets, ref
            torch.cuda.empty_cache()
            _finish(rows)
            _write("cache_gather_sweep.json", {"info": info, "partial": True, "rows": rows})  # if cut short
    _big_copy(dev, "end")
    ceil, src = _ceiling()
    _finish(rows)
    heads = [f"{nm[4:].rsplit('_', 1)[0]} {n // 1024}K" for _, _, nm in LAYOUTS for n in SWEEP_SIZES]
    print(f"\ncopy ceiling {ceil:.0f} GB/s ({src['what']}, {src['method']})\n{'config':20s} "
          + " ".join(f"{h:>18s}" for h in heads) + "   (%copy %same, device us)")
    best = {}
    for cfg in (configs or SWEEP):
        cells = []
        for _, _, nm in LAYOUTS:
            for n in SWEEP_SIZES:
                r = next((x for x in rows if x["case"] == f"token {nm} cfg{cfg}" and x["tokens"] == n), None)
                cells.append(f"{r['pct_of_copy']:6.1f} {r['pct_of_same_size_copy']:6.1f} "
                             f"{'ok' if r['bitwise_vs_op'] else 'DIFF':>4s}" if r else f"{'-':>18s}")
                if r and r["bitwise_vs_op"] and r["pct_of_copy"] > best.get((nm, n), (0, None))[0]:
                    best[(nm, n)] = (r["pct_of_copy"], list(cfg), r["pct_of_same_size_copy"])
        print(f"{str(cfg):20s} " + " ".join(cells))
    summary = {f"best_{nm}_{n // 1024}k": {"pct_of_copy": v[0], "config": v[1], "pct_of_same_size_copy": v[2]}
               for (nm, n), v in best.items()}
    summary.update(copy_ceiling_GB_s=ceil, copy_ceiling_from=src,
                   all_bitwise_vs_op=bool(rows) and all(r["bitwise_vs_op"] for r in rows))
    print(json.dumps(summary, indent=1))
    _write("cache_gather_sweep.json", {"info": info, "summary": summary, "rows": rows})


def _measure(form, li, n, dev, gen, cgen, scale, compiled, with_baselines):
    """The op's rows (and the baselines') for one form, layout and size."""
    layout, per_token, name = LAYOUTS[li]
    if form == "token":
        sets, k = _token_sets(n, layout, per_token, dev, gen, cgen, scale)
        op, plain = torch.ops.fx_mla.gather_dequant_cache, (_plain_token_fp8, _plain_token_ds_mla)[li]
    else:
        sets, k = _paged_sets(n, layout, per_token, dev, gen, cgen, scale)
        op, plain = torch.ops.fx_mla.gather_dequant_cache_paged, (_plain_paged_fp8, _plain_paged_ds_mla)[li]
    n = sets[0][1].numel() * BS if form == "paged" else n
    first = (lambda: op(*sets[0], OUT, layout))
    out = first()
    calls = [(lambda a=sets[i % len(sets)]: op(*a, OUT, layout)) for i in range(k)]
    res = {"op": _row(f"{form} {name} op", n, n * per_token, call_ms=_median_ms(first), graph_us=_graph_us(first),
                      device_us=_device_us(calls), same_copy_gbs=_copy_gbs(n * per_token, dev),
                      rotation=[len(sets), k])}
    if with_baselines:
        _baselines(res, f"{form} {name}", n, n * per_token, plain, compiled, sets, k, out)
    else:
        res["op"]["baselines"] = "skipped (time budget)"
    del sets, out, calls
    torch.cuda.empty_cache()
    return list(res.values())


def _summary(rows):
    ceil, src = _ceiling()
    summary = {"copy_ceiling_GB_s": ceil, "copy_ceiling_from": src,
               "pct_of_copy_column": "device us (K calls a CUDA graph, rotated inputs) / copy ceiling"}
    find = (lambda case, n: next((x for x in rows if x["case"] == case and x["tokens"] == n), None))
    for o in (r for r in rows if r["case"].endswith(" op")):
        form, name, _ = o["case"].split(" ")
        key = f"{form}_{name}_{o['tokens'] // 1024}k"
        summary[f"pct_of_copy_{key}"] = o["pct_of_copy"]
        summary[f"pct_of_same_size_copy_{key}"] = o["pct_of_same_size_copy"]
        for base in ("eager", "inductor"):
            b = find(f"{form} {name} {base}", o["tokens"])
            if b is not None and b.get("device_us"):
                summary[f"device_speedup_vs_{base}_{key}"] = b["device_us"] / o["device_us"]
    for what in ("pct_of_copy", "pct_of_same_size_copy"):
        at64 = [summary.get(f"{what}_token_{name}_64k") for _, _, name in LAYOUTS]
        if all(v is not None for v in at64):
            summary[f"{what}_at_64k"] = min(at64)  # device us column, the worse of the two layouts
    return summary


def _table(rows):
    print(f"\n{'case':34s} {'tokens':>8s} {'MB':>7s} {'call us':>8s} {'graph us':>9s} {'device us':>9s} "
          f"{'GB/s':>6s} {'%copy':>6s} {'%same':>6s}  bitwise vs eager,inductor")
    fmt = (lambda r, key, f: format(r[key], f) if r.get(key) is not None else "-")
    for r in rows:
        bw = f"  {r['bitwise_vs_eager_cuda']},{r.get('bitwise_vs_inductor', '-')}" \
            if "bitwise_vs_eager_cuda" in r else ""
        print(f"{r['case']:34s} {r['tokens']:8d} {r['bytes'] / 1e6:7.1f} {fmt(r, 'call_us', '8.1f'):>8s} "
              f"{fmt(r, 'graph_us', '9.1f'):>9s} {fmt(r, 'device_us', '9.1f'):>9s} {fmt(r, 'GB_s', '6.0f'):>6s} "
              f"{fmt(r, 'pct_of_copy', '6.1f'):>6s} {fmt(r, 'pct_of_same_size_copy', '6.1f'):>6s}{bw}")


def main():
    global REP_MS
    t0 = time.perf_counter()
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4096,16384,65536,262144,1048576", help="token form, tokens")
    ap.add_argument("--paged-sizes", default="65536", help="paged form, tokens (64 requests)")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-configs", default="", help="with --sweep: only these, e.g. '8,4,0;8,4,0,p;8,4,0,sp'")
    ap.add_argument("--config", default="", help="the op's launch config for both layouts, e.g. '8,4,0,pe' "
                    "(default: gather_dequant_cache.CONFIG)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--rep", type=float, default=100, help="do_bench rep in ms")
    ap.add_argument("--budget-s", type=float, default=None, help="after this many seconds, no more baselines")
    args = ap.parse_args()
    REP_MS = args.rep
    if args.config:
        cfg = tuple(int(x) if x.isdigit() else x for x in args.config.split(","))
        gmod.CONFIG = {layout: cfg for layout in gmod.CONFIG}
    dev = torch.device(DEVICE)
    gen = torch.Generator(device=dev).manual_seed(0)
    cgen = torch.Generator().manual_seed(0)
    _big_copy(dev, "start", warm_s=1.0)
    info = _info(dev)
    print(f"{info['card']}  torch {info['torch']}  triton {info['triton']}  L2 {info['l2_bytes'] >> 20} MiB  "
          f"config {info['config']}", flush=True)
    scale = torch.tensor(0.0173, device=dev)
    if args.sweep:
        configs = [tuple(int(x) if x.isdigit() else x for x in c.split(","))
                   for c in args.sweep_configs.split(";") if c.strip()]
        return run_sweep(dev, gen, cgen, scale, info, configs or None)
    compiled = {}
    if not args.no_compile:
        compiled = {f.__name__: torch.compile(f, backend="inductor", dynamic=True)
                    for f in (_plain_token_fp8, _plain_token_ds_mla, _plain_paged_fp8, _plain_paged_ds_mla)}
    # host cost of one call of the op (tiny problem), per layout
    for layout in ("plain", "fp8_ds_mla"):
        nb, bt, cu, tts, ss = bench_token_problem(64, dev, cgen)
        c = device_random_cache(nb, layout, dev, gen)
        s = scale if layout == "plain" else None
        info[f"host_us_per_call_{layout}"] = _host_us(
            lambda: torch.ops.fx_mla.gather_dequant_cache(c, bt, cu, tts, ss, s, OUT, layout))
        info[f"host_us_per_launch_{layout}"] = _host_us(
            lambda: gmod.launch_gather_dequant_cache(c, bt, cu, tts, ss, s, torch.empty(64, D, dtype=OUT, device=dev),
                                                     layout))
    print({k: round(v, 1) for k, v in info.items() if k.startswith("host")})
    # smallest sizes first (a --budget-s cut drops the baselines of the biggest); results in table order
    jobs = sorted([(int(n), 0, li) for li in range(len(LAYOUTS)) for n in args.sizes.split(",") if n] +
                  [(int(n), 1, li) for li in range(len(LAYOUTS)) for n in args.paged_sizes.split(",") if n])
    groups = {}
    for n, paged, li in jobs:
        late = args.budget_s is not None and time.perf_counter() - t0 > args.budget_s
        groups[(paged, li, n)] = _measure(("token", "paged")[paged], li, n, dev, gen, cgen, scale, compiled, not late)
        rows = [r for key in sorted(groups) for r in groups[key]]
        _finish(rows)
        info["elapsed_s"] = time.perf_counter() - t0
        print(f"  [{info['elapsed_s']:.0f} s]", flush=True)
        _write("cache_gather.json", {"info": info, "partial": True, "summary": _summary(rows), "rows": rows})
    _big_copy(dev, "end")
    ceil, src = _ceiling()
    _finish(rows)
    print(f"\ncopy ceiling {ceil:.0f} GB/s: {src['what']}, {src['method']} (every copy: info.copies in the JSON)")
    _table(rows)
    summary = _summary(rows)
    print(json.dumps(summary, indent=1))
    info["elapsed_s"] = time.perf_counter() - t0
    _write("cache_gather.json", {"info": info, "summary": summary, "rows": rows})


if __name__ == "__main__":
    main()
