"""Issue 5 benchmark: fx_mla::gather_dequant_cache vs the plain PyTorch it replaces (eager and Inductor).

    PYTHONPATH=. python benchmarks/bench_cache_gather.py [--sizes 4096,16384,65536,262144,1048576] [--no-compile]
    PYTHONPATH=. python benchmarks/bench_cache_gather.py --sweep     # launch configs only, 64K and 1M, < 150 s

Token-parallel form (chunked-prefill context gather): ragged requests (block size 64, random seq_starts, scattered
pages), for D = 576 fp8 e4m3 -> bf16 with a per-tensor scale, and the 656-byte fp8_ds_mla layout -> bf16.
Paged decode form ([B, max_blocks * 64, D]) at 64K tokens. Bytes = cache bytes read (576 or 656 a token) +
output bytes written (1152 a token); index bytes (~4 a token) are not counted. FLOPs = one multiply a latent
element (negligible: this op is a copy).

Time columns (medians of triton.testing.do_bench):
- call us: one Python call of the op (host launch cost included; do_bench clears L2 before each call).
- graph us: one CUDA-graph replay holding one call (GPU time, but the graph launch, the kernel's ramp and
  tail, and the dirty L2 lines do_bench's cache clear leaves behind all weigh on a ~30 us kernel).
- device us: K calls captured back to back in one CUDA graph, replay time / K: the device time of a call as
  a decode step runs it. The calls rotate over R distinct caches and every call writes its own output, with
  R * (cache + output bytes) >= 4x the L2 size, so a call never finds its inputs in L2 (R = 1 once one set
  is that large). The metadata (block table, cu_seq_lens, ...; ~4 bytes a token) is shared, as a real step
  shares it, and is not counted.
The ceilings are measured in the same run and the same way (device us): K copies of a 1 GiB buffer
(device-to-device, bytes read + written; "copy ceiling"), and a copy moving the same bytes as the op
(rotated like the op). %copy = op GB/s (device us) / copy ceiling GB/s; summary.pct_of_copy_at_64k is that
column's value for the token form at 65536 tokens, the worse of the two layouts.
Baselines: the literal plain chain (tests/ops/gather_dequant_cache_cases.py) in eager mode and under
torch.compile(backend="inductor", dynamic=True). Also records whether the op's output is bitwise equal to
each baseline's. --sweep times only launch configurations (BLOCK_T, num_warps, programs per SM, flags; see
gather_dequant_cache.CONFIG) of the token form at 64K and 1M tokens for both layouts (device us), checks each
one's output bits against the op's, and writes cache_gather_sweep.json. JSON goes to benchmarks/results/ and,
when the environment variable OUT is set, to $OUT as well. Without --sweep: cache_gather.json (with
summary.pct_of_copy_at_64k).
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
from tests.ops.gather_dequant_cache_cases import (plain_ds_mla_dequant, plain_paged, plain_token,  # noqa: E402
                                                  plain_token_rows)

BS, D, OUT = 64, 576, torch.bfloat16
RESULTS = os.path.join(ROOT, "benchmarks", "results")
SWEEP = [(8, 4, 0), (8, 2, 0), (8, 4, 0, "s"), (8, 4, 0, "v"), (8, 2, 0, "v"), (4, 2, 0, "v"), (16, 4, 0, "v"),
         (8, 4, 0, "vs"), (8, 2, 0, "vs"), (4, 2, 0, "vs"), (4, 1, 0, "vs"), (16, 8, 0, "vs"), (8, 4, 4, "vs"),
         (8, 4, 0, "vsp"), (8, 2, 0, "vsp"), (4, 2, 0, "vsp")]  # PDL last: a capture it broke could not spoil others
SWEEP_SIZES = (65536, 1048576)
MIN_CALLS = 8          # calls a graph holds for the device-us column (at least)
ROTATE_L2 = 4          # distinct bytes touched between two uses of a buffer, in L2 sizes


def _median_ms(fn, rep=100):
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))


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
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    ms = _median_ms(graph.replay)
    del graph, out
    return ms * 1e3


def _copy_calls(nbytes, dev):
    """K closures copying nbytes // 2 bytes each (nbytes moved: read + written), rotated like the op."""
    half = nbytes // 2
    r, k = _rotation(nbytes, dev)
    pairs = [(torch.randint(0, 255, (half,), dtype=torch.uint8, device=dev), torch.empty(half, dtype=torch.uint8,
              device=dev)) for _ in range(r)]
    return [(lambda p=pairs[i % r]: p[1].copy_(p[0])) for i in range(k)], 2 * half


def _copy_gbs(nbytes, dev):
    calls, moved = _copy_calls(nbytes, dev)
    us = _device_us(calls)
    del calls
    torch.cuda.empty_cache()
    return moved / us / 1e3


def _random_cache(num_blocks, layout, dev, gen):
    """Fresh random entries generated on the device: every finite fp8 code; ds_mla scales and rope random."""
    if layout == "fp8_ds_mla":
        rows = torch.randint(0, 256, (num_blocks, BS, 656), dtype=torch.uint8, device=dev, generator=gen)
        lat = rows[..., :512]
        lat[(lat & 0x7F) == 0x7F] = 0x7E  # no NaN codes
        sc = torch.exp(torch.rand(num_blocks, BS, 4, device=dev, generator=gen) * 8 - 7)
        rows[..., 512:528] = sc.view(torch.uint8)
        rows[..., 528:] = torch.randn(num_blocks, BS, 64, device=dev, generator=gen).to(torch.bfloat16) \
            .view(torch.uint8)
        return rows
    b = torch.randint(0, 256, (num_blocks, BS, D), dtype=torch.uint8, device=dev, generator=gen)
    b[(b & 0x7F) == 0x7F] = 0x7E
    return b.view(torch.float8_e4m3fn)


def _token_problem(n, dev, gen):
    """About n / 2048 ragged requests summing to n tokens, random seq_starts, distinct scattered pages."""
    batch = max(1, n // 2048)
    w = torch.rand(batch, generator=gen) + 0.5
    lengths = (w / w.sum() * n).floor().long()
    lengths[0] += n - int(lengths.sum())
    starts = torch.randint(0, 4 * BS, (batch,), generator=gen)
    pages = ((starts + lengths + BS - 1) // BS)
    max_blocks = int(pages.max())
    num_blocks = int(pages.sum()) + 16
    perm = torch.randperm(num_blocks, generator=gen)
    bt = torch.zeros(batch, max_blocks, dtype=torch.int64)
    used = 0
    for b in range(batch):
        p = int(pages[b])
        bt[b, :p] = perm[used:used + p]
        used += p
    cu = torch.zeros(batch + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(lengths, 0)
    tts = torch.repeat_interleave(torch.arange(batch), lengths)
    i32 = (lambda x: x.to(torch.int32).to(dev))
    return num_blocks, i32(bt), i32(cu), i32(tts), i32(starts)


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


def _row(name, n, nbytes, copy_gbs, call_ms=None, graph_us=None, device_us=None, same_copy_gbs=None, **extra):
    r = {"case": name, "tokens": n, "bytes": nbytes, "flops": n * 512 if "ds_mla" in name else n * D, **extra}
    msg = f"  {name} {n}:"
    if call_ms is not None:
        r.update(call_us=call_ms * 1e3)
        msg += f" call {call_ms * 1e3:.1f} us"
    if graph_us is not None:
        r.update(graph_us=graph_us, graph_pct_of_copy=100 * nbytes / graph_us / 1e3 / copy_gbs)
        msg += f" | graph {graph_us:.1f} us {r['graph_pct_of_copy']:.1f}%"
    if device_us is not None:
        gbs = nbytes / device_us / 1e3
        r.update(device_us=device_us, GB_s=gbs, pct_of_copy=100 * gbs / copy_gbs)
        msg += f" | device {device_us:.1f} us {gbs:.0f} GB/s {r['pct_of_copy']:.1f}% of copy"
        if same_copy_gbs is not None:
            r["pct_of_same_size_copy"] = 100 * gbs / same_copy_gbs
            msg += f" ({r['pct_of_same_size_copy']:.1f}% of a same-size copy)"
    print(msg, flush=True)
    return r


def _same(a, b):
    return bool(torch.equal(a.view(torch.int16), b.view(torch.int16)))


def _try_device_us(calls):
    try:
        return _device_us(calls)
    except Exception as e:  # a baseline that cannot be captured is reported without the column
        print(f"    (not capturable: {type(e).__name__}: {str(e)[:200]})")
        return None


def _baselines(res, name, n, nbytes, copy_gbs, plain, compiled, sets, k, out):
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
        res[base] = _row(f"{name} {base}", n, nbytes, copy_gbs, call_ms=_median_ms(lambda: f(*a)),
                         device_us=_try_device_us(calls))


def _info(dev, copy_gbs):
    import triton
    props = torch.cuda.get_device_properties(dev)
    return {"card": torch.cuda.get_device_name(dev), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"), "sms": props.multi_processor_count, "l2_bytes": _l2_bytes(dev),
            "copy_GB_s": copy_gbs, "copy_ceiling": "K copies of a 1 GiB buffer in one CUDA graph, device us",
            "config": {k: list(v) for k, v in gmod.CONFIG.items()}}


def _write(name, payload):
    text = json.dumps(payload, indent=1)
    dirs = [RESULTS] + ([os.environ["OUT"]] if os.environ.get("OUT") else [])
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, name), "w") as f:
            f.write(text)
    print(f"wrote {name} to {', '.join(dirs)}")


LAYOUTS = [("plain", D + 2 * D, "fp8_e4m3_576"), ("fp8_ds_mla", 656 + 2 * D, "fp8_ds_mla_656")]


def _token_sets(n, layout, per_token, dev, gen, cgen, scale):
    """R argument tuples (distinct caches, shared metadata) and K for the device-us column."""
    num_blocks, bt, cu, tts, ss = _token_problem(n, dev, cgen)
    r, k = _rotation(n * per_token, dev)
    s = scale if layout == "plain" else None
    return [(_random_cache(num_blocks, layout, dev, gen), bt, cu, tts, ss, s) for _ in range(r)], k


def run_sweep(dev, gen, cgen, scale, copy_gbs, info):
    """Launch configurations of the token form at 64K and 1M tokens, both layouts, device us."""
    rows = []
    for layout, per_token, name in LAYOUTS:
        for n in SWEEP_SIZES:
            sets, k = _token_sets(n, layout, per_token, dev, gen, cgen, scale)
            same = _copy_gbs(n * per_token, dev)
            ref = torch.ops.fx_mla.gather_dequant_cache(*sets[0], OUT, layout)
            print(f"{name} {n}: {len(sets)} caches, {k} calls a graph, same-size copy {same:.0f} GB/s", flush=True)
            for cfg in SWEEP:
                bufs = [torch.full_like(ref, float("nan")) for _ in sets]
                launch = gmod.launch_gather_dequant_cache
                calls = [(lambda a=sets[i % len(sets)], o=bufs[i % len(sets)]: launch(*a, o, layout, cfg))
                         for i in range(k)]
                try:
                    us = _device_us(calls)
                except Exception as e:  # a config that fails to compile or launch is reported, not fatal
                    print(f"  cfg {cfg} failed: {type(e).__name__}: {str(e)[:300]}")
                    continue
                rows.append(_row(f"token {name} cfg{cfg}", n, n * per_token, copy_gbs, device_us=us,
                                 same_copy_gbs=same, config=list(cfg), layout=layout,
                                 bitwise_vs_op=_same(bufs[0], ref)))
                del bufs, calls
            del sets, ref
            torch.cuda.empty_cache()
            _write("cache_gather_sweep.json", {"info": info, "partial": True, "rows": rows})  # if cut short
    heads = [f"{nm[4:].rsplit('_', 1)[0]} {n // 1024}K" for _, _, nm in LAYOUTS for n in SWEEP_SIZES]
    print(f"\n{'config':28s} " + " ".join(f"{h:>16s}" for h in heads) + "   (% of copy ceiling, device us)")
    best = {}
    for cfg in SWEEP:
        cells = []
        for _, _, nm in LAYOUTS:
            for n in SWEEP_SIZES:
                r = next((x for x in rows if x["case"] == f"token {nm} cfg{cfg}" and x["tokens"] == n), None)
                cells.append(f"{r['pct_of_copy']:9.1f} {'ok' if r['bitwise_vs_op'] else 'DIFF':>6s}" if r else
                             f"{'-':>16s}")
                if r and r["bitwise_vs_op"] and r["pct_of_copy"] > best.get((nm, n), (0, None))[0]:
                    best[(nm, n)] = (r["pct_of_copy"], list(cfg))
        print(f"{str(cfg):28s} " + " ".join(cells))
    summary = {f"best_{nm}_{n // 1024}k": {"pct_of_copy": v[0], "config": v[1]} for (nm, n), v in best.items()}
    summary["all_bitwise_vs_op"] = bool(rows) and all(r["bitwise_vs_op"] for r in rows)
    print(json.dumps(summary, indent=1))
    _write("cache_gather_sweep.json", {"info": info, "summary": summary, "rows": rows})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4096,16384,65536,262144,1048576")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    cgen = torch.Generator().manual_seed(0)
    copy_gbs = _copy_gbs(1 << 31, dev)  # 1 GiB read + 1 GiB written a call
    info = _info(dev, copy_gbs)
    print(f"{info['card']}  torch {info['torch']}  triton {info['triton']}  L2 {info['l2_bytes'] >> 20} MiB  "
          f"copy ceiling {copy_gbs:.0f} GB/s (device us)  config {info['config']}", flush=True)
    scale = torch.tensor(0.0173, device=dev)
    if args.sweep:
        return run_sweep(dev, gen, cgen, scale, copy_gbs, info)
    compiled = {}
    if not args.no_compile:
        compiled = {f.__name__: torch.compile(f, backend="inductor", dynamic=True)
                    for f in (_plain_token_fp8, _plain_token_ds_mla, _plain_paged_fp8, _plain_paged_ds_mla)}
    rows = []
    # host cost of one call of the op (tiny problem), per layout
    for layout in ("plain", "fp8_ds_mla"):
        nb, bt, cu, tts, ss = _token_problem(64, dev, cgen)
        c = _random_cache(nb, layout, dev, gen)
        s = scale if layout == "plain" else None
        info[f"host_us_per_call_{layout}"] = _host_us(
            lambda: torch.ops.fx_mla.gather_dequant_cache(c, bt, cu, tts, ss, s, OUT, layout))
        info[f"host_us_per_launch_{layout}"] = _host_us(
            lambda: gmod.launch_gather_dequant_cache(c, bt, cu, tts, ss, s, torch.empty(64, D, dtype=OUT, device=dev),
                                                     layout))
    print({k: round(v, 1) for k, v in info.items() if k.startswith("host")})
    plains = {"token": (_plain_token_fp8, _plain_token_ds_mla), "paged": (_plain_paged_fp8, _plain_paged_ds_mla)}
    for li, (layout, per_token, name) in enumerate(LAYOUTS):
        for n in [int(x) for x in args.sizes.split(",")]:
            sets, k = _token_sets(n, layout, per_token, dev, gen, cgen, scale)
            op = torch.ops.fx_mla.gather_dequant_cache
            out = op(*sets[0], OUT, layout)
            calls = [(lambda a=sets[i % len(sets)]: op(*a, OUT, layout)) for i in range(k)]
            res = {"op": _row(f"token {name} op", n, n * per_token, copy_gbs,
                              call_ms=_median_ms(lambda: op(*sets[0], OUT, layout)),
                              graph_us=_graph_us(lambda: op(*sets[0], OUT, layout)), device_us=_device_us(calls),
                              same_copy_gbs=_copy_gbs(n * per_token, dev), rotation=[len(sets), k])}
            _baselines(res, f"token {name}", n, n * per_token, copy_gbs, plains["token"][li], compiled, sets, k, out)
            rows.extend(res.values())
            del sets, out, calls
            torch.cuda.empty_cache()
    # paged decode form at 64K tokens: 64 requests x 16 pages x 64
    for li, (layout, per_token, name) in enumerate(LAYOUTS):
        s = scale if layout == "plain" else None
        batch, mb = 64, 16
        n = batch * mb * BS
        r, k = _rotation(n * per_token, dev)
        bt = torch.randperm(batch * mb + 16, generator=cgen)[:batch * mb].view(batch, mb).to(torch.int32).to(dev)
        sets = [(_random_cache(batch * mb + 16, layout, dev, gen), bt, s) for _ in range(r)]
        op = torch.ops.fx_mla.gather_dequant_cache_paged
        out = op(*sets[0], OUT, layout)
        calls = [(lambda a=sets[i % r]: op(*a, OUT, layout)) for i in range(k)]
        res = {"op": _row(f"paged {name} op", n, n * per_token, copy_gbs,
                          call_ms=_median_ms(lambda: op(*sets[0], OUT, layout)),
                          graph_us=_graph_us(lambda: op(*sets[0], OUT, layout)), device_us=_device_us(calls),
                          same_copy_gbs=_copy_gbs(n * per_token, dev), rotation=[r, k])}
        _baselines(res, f"paged {name}", n, n * per_token, copy_gbs, plains["paged"][li], compiled, sets, k, out)
        rows.extend(res.values())
        del sets, out, calls
    print(f"\n{'case':34s} {'tokens':>8s} {'MB':>7s} {'call us':>8s} {'graph us':>9s} {'device us':>9s} "
          f"{'GB/s':>6s} {'%copy':>6s} {'%same':>6s}  bitwise vs eager,inductor")
    fmt = (lambda r, key, f: format(r[key], f) if r.get(key) is not None else "-")
    for r in rows:
        bw = f"  {r['bitwise_vs_eager_cuda']},{r.get('bitwise_vs_inductor', '-')}" \
            if "bitwise_vs_eager_cuda" in r else ""
        print(f"{r['case']:34s} {r['tokens']:8d} {r['bytes'] / 1e6:7.1f} {fmt(r, 'call_us', '8.1f'):>8s} "
              f"{fmt(r, 'graph_us', '9.1f'):>9s} {fmt(r, 'device_us', '9.1f'):>9s} {fmt(r, 'GB_s', '6.0f'):>6s} "
              f"{fmt(r, 'pct_of_copy', '6.1f'):>6s} {fmt(r, 'pct_of_same_size_copy', '6.1f'):>6s}{bw}")
    summary = {"copy_GB_s": copy_gbs, "pct_of_copy_column": "device us (K calls a CUDA graph, rotated inputs)"}
    find = (lambda case, n: next((x for x in rows if x["case"] == case and x["tokens"] == n), None))
    for form in ("token", "paged"):
        for _, _, name in LAYOUTS:
            for n in (65536, 1048576):
                o = find(f"{form} {name} op", n)
                if o is None:
                    continue
                key = f"{form}_{name}_{n // 1024}k"
                summary[f"pct_of_copy_{key}"] = o["pct_of_copy"]
                summary[f"pct_of_copy_{key}_single_graph_replay"] = o["graph_pct_of_copy"]
                if "pct_of_same_size_copy" in o:
                    summary[f"pct_of_same_size_copy_{key}"] = o["pct_of_same_size_copy"]
                for base in ("eager", "inductor"):
                    b = find(f"{form} {name} {base}", n)
                    if b is not None and b.get("device_us"):
                        summary[f"device_speedup_vs_{base}_{key}"] = b["device_us"] / o["device_us"]
    at64 = [summary.get(f"pct_of_copy_token_{name}_64k") for _, _, name in LAYOUTS]
    if all(v is not None for v in at64):
        summary["pct_of_copy_at_64k"] = min(at64)  # device us column, the worse of the two layouts
    print(json.dumps(summary, indent=1))
    _write("cache_gather.json", {"info": info, "summary": summary, "rows": rows})


if __name__ == "__main__":
    main()
