"""Issue 5 benchmark: fx_mla::gather_dequant_cache vs the plain PyTorch it replaces (eager and Inductor).

    PYTHONPATH=. python benchmarks/bench_cache_gather.py [--sizes 4096,16384,65536,262144,1048576] [--sweep]

Token-parallel form (chunked-prefill context gather): ragged requests (block size 64, random seq_starts, scattered
pages), for D = 576 fp8 e4m3 -> bf16 with a per-tensor scale, and the 656-byte fp8_ds_mla layout -> bf16.
Paged decode form ([B, max_blocks * 64, D]) at 64K tokens. Bytes = cache bytes read (576 or 656 a token) +
output bytes written (1152 a token); index bytes (~4 a token) are not counted. FLOPs = one multiply a latent
element (negligible: this op is a copy). Medians of triton.testing.do_bench (it clears L2 before each call).
The ceiling is a device-to-device copy of a 1 GiB buffer measured in the same run (bytes read + written).
Baselines: the literal plain chain (tests/ops/gather_dequant_cache_cases.py) in eager mode and under
torch.compile(backend="inductor", dynamic=True). Also records whether the op's output is bitwise equal to
each baseline's. --sweep also times launch configurations (BLOCK_T, num_warps, programs per SM) at 64K and 1M.
Writes benchmarks/results/cache_gather.json (summary.pct_of_copy_at_64k).
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
SWEEP = [(8, 2, 0), (8, 4, 0), (16, 2, 0), (16, 4, 0), (32, 8, 0), (16, 4, 2), (16, 4, 4), (16, 4, 6), (32, 8, 2),
         (8, 4, 8)]


def _median_ms(fn):
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _copy_ceiling(dev):
    src = torch.randint(0, 255, (1 << 30,), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    del src, dst
    return 2 * (1 << 30) / ms / 1e6  # GB/s


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


def _graph_ms(fn):
    """Median ms of fn captured in a CUDA graph (GPU time without the Python call's host cost)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ms = _median_ms(graph.replay)
    del graph
    return ms


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


def _row(name, n, nbytes, ms, copy_gbs, graph_ms=None, same_copy_gbs=None):
    gbs = nbytes / ms / 1e6
    r = {"case": name, "tokens": n, "bytes": nbytes, "flops": n * 512 if "ds_mla" in name else n * D,
         "ms": ms, "GB_s": gbs, "pct_of_copy": 100 * gbs / copy_gbs}
    msg = f"  {name} {n}: {ms:.4f} ms {gbs:.0f} GB/s {r['pct_of_copy']:.1f}% of copy"
    if graph_ms is not None:
        r.update(graph_ms=graph_ms, graph_GB_s=nbytes / graph_ms / 1e6,
                 graph_pct_of_copy=100 * nbytes / graph_ms / 1e6 / copy_gbs)
        msg += f" | graph {graph_ms:.4f} ms {r['graph_pct_of_copy']:.1f}% of copy"
        if same_copy_gbs is not None:
            r["graph_pct_of_same_size_copy"] = 100 * nbytes / graph_ms / 1e6 / same_copy_gbs
            msg += f" ({r['graph_pct_of_same_size_copy']:.1f}% of a same-size copy)"
    print(msg, flush=True)
    return r


def _same_size_copy_gbs(nbytes, dev):
    """GB/s of a copy moving the same bytes (read + written) as a gather of nbytes, measured the same way."""
    src = torch.randint(0, 255, (nbytes // 2,), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return 2 * src.numel() / _median_ms(lambda: dst.copy_(src)) / 1e6


def _same(a, b):
    return bool(torch.equal(a.view(torch.int16), b.view(torch.int16)))


def _baselines(res, name, n, nbytes, copy_gbs, plain, compiled, a, out):
    eager_out = plain(*a)
    res["op"]["bitwise_vs_eager_cuda"] = _same(out, eager_out)
    del eager_out
    res["eager"] = _row(f"{name} eager", n, nbytes, _median_ms(lambda: plain(*a)), copy_gbs)
    cf = compiled.get(plain.__name__)
    if cf is None:
        return
    try:
        res["op"]["bitwise_vs_inductor"] = _same(out, cf(*a))
        res["inductor"] = _row(f"{name} inductor", n, nbytes, _median_ms(lambda: cf(*a)), copy_gbs)
    except Exception as e:  # a baseline that fails to compile is reported, not fatal
        print(f"inductor failed on {name}: {type(e).__name__}: {str(e)[:300]}")
        compiled.pop(plain.__name__)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4096,16384,65536,262144,1048576")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    import triton
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    cgen = torch.Generator().manual_seed(0)
    copy_gbs = _copy_ceiling(dev)
    info = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"), "copy_GB_s": copy_gbs,
            "config": {k: list(v) for k, v in gmod.CONFIG.items()}}
    print(f"{info['card']}  torch {info['torch']}  triton {info['triton']}  copy ceiling {copy_gbs:.0f} GB/s "
          f"config {info['config']}")
    compiled = {}
    if not args.no_compile:
        compiled = {f.__name__: torch.compile(f, backend="inductor", dynamic=True)
                    for f in (_plain_token_fp8, _plain_token_ds_mla, _plain_paged_fp8, _plain_paged_ds_mla)}
    rows, sweep = [], []
    scale = torch.tensor(0.0173, device=dev)
    same_copy = {}
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
    for layout, per_token, plain, name in [("plain", D + 2 * D, _plain_token_fp8, "fp8_e4m3_576"),
                                           ("fp8_ds_mla", 656 + 2 * D, _plain_token_ds_mla, "fp8_ds_mla_656")]:
        s = scale if layout == "plain" else None
        for n in [int(x) for x in args.sizes.split(",")]:
            num_blocks, bt, cu, tts, ss = _token_problem(n, dev, cgen)
            cache = _random_cache(num_blocks, layout, dev, gen)
            a = (cache, bt, cu, tts, ss, s)
            op = (lambda: torch.ops.fx_mla.gather_dequant_cache(cache, bt, cu, tts, ss, s, OUT, layout))
            out = op()
            if n not in same_copy:
                same_copy[n] = _same_size_copy_gbs(n * per_token, dev)
            res = {"op": _row(f"token {name} op", n, n * per_token, _median_ms(op), copy_gbs, _graph_ms(op),
                              same_copy[n])}
            _baselines(res, f"token {name}", n, n * per_token, copy_gbs, plain, compiled, a, out)
            if args.sweep and n in (65536, 1048576):
                for cfg in SWEEP:
                    buf = torch.empty_like(out)
                    fn = (lambda: gmod.launch_gather_dequant_cache(cache, bt, cu, tts, ss, s, buf, layout, cfg))
                    r = _row(f"token {name} cfg{cfg}", n, n * per_token, _median_ms(fn), copy_gbs, _graph_ms(fn))
                    r["bitwise_vs_op"] = _same(buf, out)
                    sweep.append(r)
            rows.extend(res.values())
            del cache, out
            torch.cuda.empty_cache()
    # paged decode form at 64K tokens: 64 requests x 16 pages x 64
    for layout, per_token, plain, name in [("plain", D + 2 * D, _plain_paged_fp8, "fp8_e4m3_576"),
                                           ("fp8_ds_mla", 656 + 2 * D, _plain_paged_ds_mla, "fp8_ds_mla_656")]:
        s = scale if layout == "plain" else None
        batch, mb = 64, 16
        n = batch * mb * BS
        cache = _random_cache(batch * mb + 16, layout, dev, gen)
        bt = torch.randperm(batch * mb + 16, generator=cgen)[:batch * mb].view(batch, mb).to(torch.int32).to(dev)
        op = (lambda: torch.ops.fx_mla.gather_dequant_cache_paged(cache, bt, s, OUT, layout))
        out = op()
        res = {"op": _row(f"paged {name} op", n, n * per_token, _median_ms(op), copy_gbs, _graph_ms(op))}
        _baselines(res, f"paged {name}", n, n * per_token, copy_gbs, plain, compiled, (cache, bt, s), out)
        rows.extend(res.values())
    print(f"\n{'case':40s} {'tokens':>8s} {'MB':>7s} {'call ms':>8s} {'%copy':>6s} {'graph ms':>9s} {'%copy':>6s} "
          f"{'%same':>6s}  bitwise vs eager,inductor")
    for r in rows + sweep:
        g = (f"{r['graph_ms']:9.4f} {r['graph_pct_of_copy']:6.1f} {r.get('graph_pct_of_same_size_copy', 0):6.1f}"
             if "graph_ms" in r else " " * 23)
        bw = f"  {r['bitwise_vs_eager_cuda']},{r.get('bitwise_vs_inductor', '-')}" \
            if "bitwise_vs_eager_cuda" in r else ""
        if "bitwise_vs_op" in r:
            bw = f"  same bits as op: {r['bitwise_vs_op']}"
        print(f"{r['case']:40s} {r['tokens']:8d} {r['bytes'] / 1e6:7.1f} {r['ms']:8.4f} {r['pct_of_copy']:6.1f} "
              f"{g}{bw}")
    summary = {"copy_GB_s": copy_gbs}
    find = (lambda case, n: next((x for x in rows if x["case"] == case and x["tokens"] == n), None))
    for form in ("token", "paged"):
        for name in ("fp8_e4m3_576", "fp8_ds_mla_656"):
            for n in (65536, 1048576):
                o = find(f"{form} {name} op", n)
                if o is None:
                    continue
                key = f"{form}_{name}_{n // 1024}k"
                summary[f"pct_of_copy_{key}"] = o["graph_pct_of_copy"]
                summary[f"pct_of_copy_{key}_eager_call"] = o["pct_of_copy"]
                for base in ("eager", "inductor"):
                    b = find(f"{form} {name} {base}", n)
                    if b is not None:
                        summary[f"speedup_vs_{base}_{key}"] = b["ms"] / o["ms"]
    at64 = [summary.get(f"pct_of_copy_token_{name}_64k") for name in ("fp8_e4m3_576", "fp8_ds_mla_656")]
    if all(v is not None for v in at64):
        summary["pct_of_copy_at_64k"] = min(at64)  # GPU time (CUDA-graph replay), the worse of the two layouts
    print(json.dumps(summary, indent=1))
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "cache_gather.json"), "w") as f:
        json.dump({"info": info, "summary": summary, "rows": rows, "sweep": sweep}, f, indent=1)


if __name__ == "__main__":
    main()
