"""Is issue 5's 90 %-of-copy target reachable for a stream that reads 1 byte for every 2 it writes? One GPU.

The gather reads 576 FP8 bytes a token and writes 1152 bf16 bytes (1 : 2), a device-to-device copy reads and
writes equal bytes (1 : 1). This times, at the same byte counts and with bench_cache_gather's method (device us:
K calls in one CUDA graph rotating over R buffer sets >= 4x L2), streams with both mixes and no gather at all:
  copy      uint8 copy_ of the same total bytes (1 : 1; the same-size copy of bench_cache_gather.py)
  cast      a contiguous [n, 576] e4m3 tensor .to(bf16) (torch's elementwise kernel; 1 : 2, no index work)
  cast_tr   the same cast as a Triton kernel, 16 output bytes a thread, 4096 elements a program (1 : 2)
  op        torch.ops.fx_mla.gather_dequant_cache, token form, e4m3 576 -> bf16 with a scale (1 : 2 + indices)
and, to tell what the op's gap to cast_tr is made of (session 10; index chain: token -> request -> block table ->
page, three dependent loads, or the decode form's one; pages scattered or in cache order):
  op_ord    the op on the same requests with their pages in cache order (block table = consecutive blocks, no
            seq_starts): the same index chain, the rows of a request one contiguous stretch of the cache
  paged     the decode form (gather_dequant_cache_paged), 64 requests of n / 64 tokens, scattered pages: one load
  paged_ord the decode form with the block table in cache order (0, 1, 2, ...): one load, contiguous rows
Every figure is GB/s of bytes read + written, and % of the fastest copy of the run (1 GiB copies included).

    PYTHONPATH=. python3 benchmarks/dev_stream_mix.py     # JSON to $OUT/dev_stream_mix.json, else results/
"""
from __future__ import annotations

import json
import os
import sys

import torch
import triton
import triton.language as tl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import bench_cache_gather as bg  # noqa: E402
from tests.ops.gather_dequant_cache_cases import (bench_token_problem, device_random_cache, plain_paged,  # noqa: E402
                                                  plain_token)

SIZES = (65536, 262144, 1048576)


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, eviction_policy="evict_first")
    tl.store(y_ptr + offs, x.to(tl.float32).to(tl.bfloat16), mask=m)


def _cast_triton(x, y):
    n = x.numel()
    _cast_kernel[(triton.cdiv(n, 4096),)](x, y, n, BLOCK=4096, num_warps=8)
    return y


def main():
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    cgen = torch.Generator().manual_seed(0)
    bg._big_copy(dev, "start", warm_s=1.0)
    rows = []
    for n in SIZES:
        nbytes = n * (576 + 1152)
        row = {"tokens": n, "bytes": nbytes}
        row["copy"] = bg._copy_gbs(nbytes, dev)
        r, k = bg._rotation(nbytes, dev)
        xs = [device_random_cache(max(1, n // 64), "plain", dev, gen).view(n, 576) for _ in range(r)]
        ys = [torch.empty(n, 576, dtype=torch.bfloat16, device=dev) for _ in range(r)]
        ok = torch.equal(_cast_triton(xs[0], ys[0]), xs[0].to(torch.bfloat16))
        row["cast_triton_equal_torch"] = bool(ok)
        row["cast"] = nbytes / bg._device_us([(lambda i=i: ys[i % r].copy_(xs[i % r])) for i in range(k)]) / 1e3
        row["cast_tr"] = nbytes / bg._device_us([(lambda i=i: _cast_triton(xs[i % r], ys[i % r]))
                                                 for i in range(k)]) / 1e3
        del xs, ys
        torch.cuda.empty_cache()
        num_blocks, bt, cu, tts, ss = bench_token_problem(n, dev, cgen)
        scale = torch.tensor(0.03, device=dev)
        caches = [device_random_cache(num_blocks, "plain", dev, gen) for _ in range(r)]
        op = torch.ops.fx_mla.gather_dequant_cache
        row["op"] = nbytes / bg._device_us([(lambda i=i: op(caches[i % r], bt, cu, tts, ss, scale, torch.bfloat16,
                                                            "plain")) for i in range(k)]) / 1e3
        # the same requests with their pages in cache order: request b's pages are consecutive blocks
        pages = torch.div(cu.diff().long() + 63, 64, rounding_mode="floor")  # no seq_starts: at most as many pages
        first = torch.zeros_like(pages)
        first[1:] = torch.cumsum(pages, 0)[:-1]
        bt_ord = (first[:, None] + torch.arange(bt.shape[1], device=dev)[None, :]).clamp(max=num_blocks - 1)
        bt_ord = bt_ord.to(torch.int32)
        zero = torch.zeros_like(ss)
        # the plain reference takes the scale as a Python float: eager CUDA rounds a 0-dim fp32 CUDA tensor to bf16
        # before a bf16 multiply, the op (like its CPU reference) multiplies by the fp32 scale
        row["op_ord_equal_plain"] = bg._same(op(caches[0], bt_ord, cu, tts, zero, scale, torch.bfloat16, "plain"),
                                             plain_token(caches[0], bt_ord, cu, tts, zero, float(scale), torch.bfloat16))
        row["op_ord"] = nbytes / bg._device_us([(lambda i=i: op(caches[i % r], bt_ord, cu, tts, zero, scale,
                                                                torch.bfloat16, "plain")) for i in range(k)]) / 1e3
        del caches
        torch.cuda.empty_cache()
        batch, mb = 64, max(1, n // (64 * 64))
        pcaches = [device_random_cache(batch * mb + 16, "plain", dev, gen) for _ in range(r)]
        paged = torch.ops.fx_mla.gather_dequant_cache_paged
        for name, table in (("paged", torch.randperm(batch * mb + 16, generator=cgen)[:batch * mb]),
                            ("paged_ord", torch.arange(batch * mb))):
            table = table.view(batch, mb).to(torch.int32).to(dev)
            row[f"{name}_equal_plain"] = bg._same(paged(pcaches[0], table, scale, torch.bfloat16, "plain"),
                                                  plain_paged(pcaches[0], table, float(scale), torch.bfloat16))
            row[name] = nbytes / bg._device_us([(lambda i=i, t=table: paged(pcaches[i % r], t, scale, torch.bfloat16,
                                                                             "plain")) for i in range(k)]) / 1e3
        del pcaches
        torch.cuda.empty_cache()
        rows.append(row)
        print(row, flush=True)
    bg._big_copy(dev, "end")
    ceil = bg._ceiling()[0]
    print(f"\nceiling (fastest copy of the run): {ceil:.0f} GB/s")
    cols = ("copy", "cast", "cast_tr", "op", "op_ord", "paged", "paged_ord")
    print("| tokens | MB | copy 1:1 GB/s (%) | cast 1:2 torch | cast 1:2 Triton | op | op, pages in order | "
          "decode form | decode form, pages in order |")
    print("|---:|---:|" + "---:|" * len(cols))
    for r_ in rows:
        cells = " | ".join(f"{r_[c]:.0f} ({100 * r_[c] / ceil:.1f})" for c in cols)
        print(f"| {r_['tokens']} | {r_['bytes'] / 1e6:.1f} | {cells} |")
    payload = {"ceiling_GB_s": ceil, "copies": bg.COPIES, "rows": rows,
               "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    out = os.path.join(os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results"), "dev_stream_mix.json")
    with open(out, "w") as f:
        json.dump(payload, f, indent=1)


if __name__ == "__main__":
    main()
