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
SWEEP = [(16, 4, 0), (32, 4, 0), (32, 8, 0), (64, 4, 0), (64, 8, 0), (32, 4, 4), (32, 4, 8)]


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


def _row(name, n, nbytes, ms, copy_gbs):
    gbs = nbytes / ms / 1e6
    return {"case": name, "tokens": n, "bytes": nbytes, "flops": n * 512 if "ds_mla" in name else n * D,
            "ms": ms, "GB_s": gbs, "pct_of_copy": 100 * gbs / copy_gbs}


def _same(a, b):
    return bool(torch.equal(a.view(torch.int16), b.view(torch.int16)))


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
            "date": time.strftime("%Y-%m-%d"), "copy_GB_s": copy_gbs, "config": {k: list(v) for k, v in
                                                                               gmod.CONFIG.items()}}
    print(f"{info['card']}  torch {info['torch']}  triton {info['triton']}  copy ceiling {copy_gbs:.0f} GB/s")
    compiled = {}
    if not args.no_compile:
        compiled = {f.__name__: torch.compile(f, backend="inductor", dynamic=True)
                    for f in (_plain_token_fp8, _plain_token_ds_mla, _plain_paged_fp8, _plain_paged_ds_mla)}
    rows, sweep = [], []
    scale = torch.tensor(0.0173, device=dev)
    for layout, per_token, plain, name in [("plain", D + 2 * D, _plain_token_fp8, "fp8_e4m3_576"),
                                           ("fp8_ds_mla", 656 + 2 * D, _plain_token_ds_mla, "fp8_ds_mla_656")]:
        s = scale if layout == "plain" else None
        for n in [int(x) for x in args.sizes.split(",")]:
            num_blocks, bt, cu, tts, ss = _token_problem(n, dev, cgen)
            cache = _random_cache(num_blocks, layout, dev, gen)
            a = (cache, bt, cu, tts, ss)
            op = (lambda: torch.ops.fx_mla.gather_dequant_cache(*a, s, OUT, layout))
            out = op()
            res = {"op": _row(f"token {name} op", n, n * per_token, _median_ms(op), copy_gbs)}
            eager_out = plain(*a, s)
            res["eager"] = _row(f"token {name} eager", n, n * per_token, _median_ms(lambda: plain(*a, s)), copy_gbs)
            res["op"]["bitwise_vs_eager_cuda"] = _same(out, eager_out)
            del eager_out
            if plain.__name__ in compiled:
                cf = compiled[plain.__name__]
                try:
                    cout = cf(*a, s)
                    res["inductor"] = _row(f"token {name} inductor", n, n * per_token,
                                           _median_ms(lambda: cf(*a, s)), copy_gbs)
                    res["op"]["bitwise_vs_inductor"] = _same(out, cout)
                    del cout
                except Exception as e:  # a baseline that fails to compile is reported, not fatal
                    print(f"inductor failed on token {name}: {type(e).__name__}: {str(e)[:300]}")
                    compiled.pop(plain.__name__)
            if args.sweep and n in (65536, 1048576):
                for cfg in SWEEP:
                    buf = torch.empty_like(out)
                    fn = (lambda: gmod.launch_gather_dequant_cache(cache, bt, cu, tts, ss, s, buf, layout, cfg))
                    fn()
                    r = _row(f"token {name} cfg{cfg}", n, n * per_token, _median_ms(fn), copy_gbs)
                    r["bitwise_vs_op"] = _same(buf, out)
                    sweep.append(r)
            for r in res.values():
                rows.append(r)
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
        rows.append(_row(f"paged {name} op", n, n * per_token, _median_ms(op), copy_gbs))
        rows[-1]["bitwise_vs_eager_cuda"] = _same(out, plain(cache, bt, s))
        rows.append(_row(f"paged {name} eager", n, n * per_token, _median_ms(lambda: plain(cache, bt, s)), copy_gbs))
        if plain.__name__ in compiled:
            cf = compiled[plain.__name__]
            try:
                rows[-2]["bitwise_vs_inductor"] = _same(out, cf(cache, bt, s))
                rows.append(_row(f"paged {name} inductor", n, n * per_token, _median_ms(lambda: cf(cache, bt, s)),
                                 copy_gbs))
            except Exception as e:
                print(f"inductor failed on paged {name}: {type(e).__name__}: {str(e)[:300]}")
    print(f"{'case':44s} {'tokens':>8s} {'MB':>8s} {'ms':>9s} {'GB/s':>7s} {'%copy':>6s}  bitwise(eager,inductor)")
    for r in rows + sweep:
        bw = "" if "bitwise_vs_eager_cuda" not in r else \
            f"  {r['bitwise_vs_eager_cuda']},{r.get('bitwise_vs_inductor', '-')}"
        if "bitwise_vs_op" in r:
            bw = f"  same as op: {r['bitwise_vs_op']}"
        print(f"{r['case']:44s} {r['tokens']:8d} {r['bytes'] / 1e6:8.1f} {r['ms']:9.4f} {r['GB_s']:7.0f} "
              f"{r['pct_of_copy']:6.1f}{bw}")
    pick = (lambda case: next((r for r in rows if r["case"] == case), None))
    summary = {"copy_GB_s": copy_gbs}
    for name in ("fp8_e4m3_576", "fp8_ds_mla_656"):
        for n in (65536, 1048576):
            r = next((x for x in rows if x["case"] == f"token {name} op" and x["tokens"] == n), None)
            if r is not None:
                summary[f"pct_of_copy_{name}_{n // 1024}k"] = r["pct_of_copy"]
        e = next((x for x in rows if x["case"] == f"token {name} eager" and x["tokens"] == 65536), None)
        o = next((x for x in rows if x["case"] == f"token {name} op" and x["tokens"] == 65536), None)
        if e and o:
            summary[f"speedup_vs_eager_{name}_64k"] = e["ms"] / o["ms"]
        c = next((x for x in rows if x["case"] == f"token {name} inductor" and x["tokens"] == 65536), None)
        if c and o:
            summary[f"speedup_vs_inductor_{name}_64k"] = c["ms"] / o["ms"]
    if "pct_of_copy_fp8_e4m3_576_64k" in summary:
        summary["pct_of_copy_at_64k"] = min(summary["pct_of_copy_fp8_e4m3_576_64k"],
                                            summary.get("pct_of_copy_fp8_ds_mla_656_64k", math.inf))
    for name in ("fp8_e4m3_576", "fp8_ds_mla_656"):
        r = pick(f"paged {name} op")
        if r:
            summary[f"pct_of_copy_paged_{name}_64k"] = r["pct_of_copy"]
    print(json.dumps(summary, indent=1))
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "cache_gather.json"), "w") as f:
        json.dump({"info": info, "summary": summary, "rows": rows, "sweep": sweep}, f, indent=1)


if __name__ == "__main__":
    main()
