"""Issue 5 experiment: does a "flat" tiling of the plain-layout gather close its gap to a plain 1:2 cast at 64K?

The op's kernel (fx_mla/ops/kernels/gather_dequant_cache.py) tiles BLOCK_T tokens x the entry, the entry split in
power-of-two parts (576 = 512 + 64): the 64-wide part is a [8, 64] tile (4 bytes a thread) and the loaded tile
changes layout before the bf16 stores. dev_stream_mix.py (session 11, H100) put the op at 87.6 % of copy at 64K
tokens against 92.6 % for a flat Triton cast of the same bytes, and the decode form with pages in cache order
(one index load, contiguous rows) still at 89.6 %: most of the gap is not the index chain or the scattered pages.

Here a program takes NV consecutive VW-element vectors of the flattened [n, D] output (D % VW == 0, so no vector
crosses a row): vector v is token v // (D / VW), columns VW * (v % (D / VW)) + [0, VW). Each vector computes its
token's index chain (the same chain as the op, cached loads), loads VW cache bytes and stores VW outputs; the
output of a program is one contiguous stretch, no masking but at the end, one layout for load and store when
VW * out bytes <= 16 (or a split store). Variants (VW, NV, num_warps) are timed against the op on the token form
(bench_cache_gather's ragged requests, scattered pages) and the decode form, 64K and 256K tokens, bench_cache_gather's
method (device us, one CUDA graph rotating over buffer sets >= 4x L2); outputs bitwise against the op's.

    PYTHONPATH=. python3 benchmarks/dev_flat_gather.py                 # GPU; JSON to $OUT or benchmarks/results/
    TRITON_INTERPRET=1 PYTHONPATH=. python3 benchmarks/dev_flat_gather.py --check   # CPU: bitwise at small sizes
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from fx_mla.ops import gather_dequant_cache as gmod  # noqa: E402  (registers the ops)
from fx_mla.ops.kernels.gather_dequant_cache import _round_fp32_to, _rows_of  # noqa: E402

VARIANTS = [(16, 256, 4), (16, 512, 4), (16, 512, 8), (16, 1024, 8), (8, 512, 4), (8, 1024, 8), (32, 256, 4),
            (32, 512, 8)]
DS_VARIANTS = [(16, 256, 4), (16, 512, 4), (16, 512, 8), (16, 1024, 8)]


@triton.jit
def _flat_kernel(cache_ptr, out_ptr, scale_ptr, tts_ptr, cu_ptr, ss_ptr, bt_ptr,
                 n_vec, n_req, max_blocks, n_blocks, bt_s0, bt_s1, c_s0, c_s1, row_len,
                 D: tl.constexpr, VW: tl.constexpr, NV: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 PAGED: tl.constexpr, HAS_SEQ_STARTS: tl.constexpr, HAS_SCALE: tl.constexpr,
                 ROUND_BY_BITS: tl.constexpr):
    DV: tl.constexpr = D // VW
    v = tl.program_id(0) * NV + tl.arange(0, NV)   # n_vec < 2**31
    live = v < n_vec
    t = (v // DV).to(tl.int64)
    col = (v - (v // DV) * DV) * VW
    row, ok = _rows_of(t, live, tts_ptr, cu_ptr, ss_ptr, bt_ptr, bt_s0, bt_s1, n_req, max_blocks, n_blocks, c_s0,
                       c_s1, row_len, BLOCK_SIZE, PAGED, HAS_SEQ_STARTS)
    src = row + col
    e = tl.arange(0, VW)
    x = tl.load(cache_ptr + src[:, None] + e[None, :], mask=ok[:, None], other=0.0, eviction_policy="evict_first")
    y = x.to(tl.float32)
    if HAS_SCALE:
        y = y * tl.load(scale_ptr)
    dst = v.to(tl.int64) * VW
    tl.store(out_ptr + dst[:, None] + e[None, :], _round_fp32_to(y, out_ptr.dtype.element_ty, ROUND_BY_BITS),
             mask=live[:, None])


@triton.jit
def _flat_ds_mla_kernel(cache_ptr, out_ptr, tts_ptr, cu_ptr, ss_ptr, bt_ptr,
                        n_vec, n_req, max_blocks, n_blocks, bt_s0, bt_s1, c_s0, c_s1, row_len,
                        NV: tl.constexpr, BLOCK_SIZE: tl.constexpr, PAGED: tl.constexpr,
                        HAS_SEQ_STARTS: tl.constexpr, ROUND_BY_BITS: tl.constexpr):
    """656-byte rows -> 576 outputs in 16-element vectors: 32 latent vectors (16 e4m3 bytes and their group's
    fp32 scale) and 4 rope vectors (16 bf16) a token; both loads are issued on the one [NV, 16] tile, each
    masked to its vectors, and merged by a select."""
    DV: tl.constexpr = 36
    v = tl.program_id(0) * NV + tl.arange(0, NV)
    live = v < n_vec
    t = (v // DV).to(tl.int64)
    cv = v - (v // DV) * DV
    row, ok = _rows_of(t, live, tts_ptr, cu_ptr, ss_ptr, bt_ptr, bt_s0, bt_s1, n_req, max_blocks, n_blocks, c_s0,
                       c_s1, row_len, BLOCK_SIZE, PAGED, HAS_SEQ_STARTS)
    is_lat = cv < 32
    lat_ok = ok & is_lat
    rope_ok = ok & (cv >= 32)
    e = tl.arange(0, 16)
    lat_p = (cache_ptr + row + tl.where(is_lat, cv, 0) * 16).to(tl.pointer_type(tl.float8e4nv))
    x = tl.load(lat_p[:, None] + e[None, :], mask=lat_ok[:, None], other=0.0, eviction_policy="evict_first")
    sc_p = (cache_ptr + row + 512 + tl.where(is_lat, cv // 8, 0) * 4).to(tl.pointer_type(tl.float32))
    sc = tl.load(sc_p, mask=lat_ok, other=0.0)
    rope_p = (cache_ptr + row + 528 + tl.where(is_lat, 0, cv - 32) * 32).to(tl.pointer_type(tl.bfloat16))
    rope = tl.load(rope_p[:, None] + e[None, :], mask=rope_ok[:, None], other=0.0, eviction_policy="evict_first")
    y = tl.where(is_lat[:, None], x.to(tl.float32) * sc[:, None], rope.to(tl.float32))
    dst = v.to(tl.int64) * 16
    tl.store(out_ptr + dst[:, None] + e[None, :], _round_fp32_to(y, out_ptr.dtype.element_ty, ROUND_BY_BITS),
             mask=live[:, None])


def flat_gather_ds_mla(cache, block_table, cu, tts, ss, out_dtype, variant, paged=False):
    _, nv, warps = variant
    if paged:
        out = torch.empty(block_table.shape[0], block_table.shape[1] * cache.shape[1], 576, dtype=out_dtype,
                          device=cache.device)
    else:
        out = torch.empty(tts.shape[0], 576, dtype=out_dtype, device=cache.device)
    n_vec = out.numel() // 16
    dummy = block_table
    _flat_ds_mla_kernel[(triton.cdiv(n_vec, nv),)](
        cache, out, dummy if paged else tts, dummy if paged else cu, ss if ss is not None else dummy, block_table,
        n_vec, block_table.shape[0], block_table.shape[1], cache.shape[0], block_table.stride(0),
        block_table.stride(1), cache.stride(0), cache.stride(1), max(block_table.shape[1] * cache.shape[1], 1),
        NV=nv, BLOCK_SIZE=cache.shape[1], PAGED=paged, HAS_SEQ_STARTS=ss is not None,
        ROUND_BY_BITS=os.environ.get("TRITON_INTERPRET") == "1", num_warps=warps)
    return out


def flat_gather(cache, block_table, cu, tts, ss, scale, out_dtype, variant, paged=False):
    vw, nv, warps = variant
    d = cache.shape[2]
    assert d % vw == 0 and cache.stride(2) == 1
    if paged:
        out = torch.empty(block_table.shape[0], block_table.shape[1] * cache.shape[1], d, dtype=out_dtype,
                          device=cache.device)
    else:
        out = torch.empty(tts.shape[0], d, dtype=out_dtype, device=cache.device)
    n_vec = out.numel() // vw
    dummy = block_table
    _flat_kernel[(triton.cdiv(n_vec, nv),)](
        cache, out, scale if scale is not None else dummy, dummy if paged else tts, dummy if paged else cu,
        ss if ss is not None else dummy, block_table, n_vec, block_table.shape[0], block_table.shape[1],
        cache.shape[0], block_table.stride(0), block_table.stride(1), cache.stride(0), cache.stride(1),
        max(block_table.shape[1] * cache.shape[1], 1), D=d, VW=vw, NV=nv, BLOCK_SIZE=cache.shape[1], PAGED=paged,
        HAS_SEQ_STARTS=ss is not None, HAS_SCALE=scale is not None,
        ROUND_BY_BITS=os.environ.get("TRITON_INTERPRET") == "1", num_warps=warps)
    return out


def _check_cpu():
    """Bitwise against the op's CPU reference on small ragged problems (TRITON_INTERPRET=1)."""
    from tests.ops.gather_dequant_cache_cases import ragged_lengths, random_cache, random_scale, token_problem
    g = torch.Generator().manual_seed(0)
    for d, bs in ((576, 16), (320, 64), (64, 16)):
        lengths = ragged_lengths(300, 5, g, empty=1)
        p = token_problem(lengths, bs, g, starts=[3, 0, 17, 40, 1], padding=7)
        cache = random_cache(p.num_blocks, bs, d, torch.float8_e4m3fn, g, "plain")
        scale = random_scale(g)
        ref = gmod.gather_dequant_cache_reference(cache, p.block_table, p.cu_seq_lens, p.token_to_seq, p.seq_starts,
                                                  scale, torch.bfloat16)
        pref = gmod.gather_dequant_cache_paged_reference(cache, p.block_table, scale, torch.bfloat16)
        for variant in ((16, 32, 4), (8, 64, 4), (32, 16, 4)):
            got = flat_gather(cache, p.block_table, p.cu_seq_lens, p.token_to_seq, p.seq_starts, scale,
                              torch.bfloat16, variant)
            assert torch.equal(got.view(torch.int16), ref.view(torch.int16)), (d, variant, "token")
            got = flat_gather(cache, p.block_table, None, None, None, scale, torch.bfloat16, variant, paged=True)
            assert torch.equal(got.view(torch.int16), pref.view(torch.int16)), (d, variant, "paged")
    for bs in (16, 64):
        lengths = ragged_lengths(300, 5, g, empty=1)
        p = token_problem(lengths, bs, g, starts=[3, 0, 17, 40, 1], padding=7)
        cache = random_cache(p.num_blocks, bs, 656, None, g, "fp8_ds_mla")
        ref = gmod.gather_dequant_cache_reference(cache, p.block_table, p.cu_seq_lens, p.token_to_seq, p.seq_starts,
                                                  None, torch.bfloat16, "fp8_ds_mla")
        pref = gmod.gather_dequant_cache_paged_reference(cache, p.block_table, None, torch.bfloat16, "fp8_ds_mla")
        for variant in ((16, 32, 4), (16, 128, 4)):
            got = flat_gather_ds_mla(cache, p.block_table, p.cu_seq_lens, p.token_to_seq, p.seq_starts,
                                     torch.bfloat16, variant)
            assert torch.equal(got.view(torch.int16), ref.view(torch.int16)), (bs, variant, "ds_mla token")
            got = flat_gather_ds_mla(cache, p.block_table, None, None, None, torch.bfloat16, variant, paged=True)
            assert torch.equal(got.view(torch.int16), pref.view(torch.int16)), (bs, variant, "ds_mla paged")
    print("flat ds_mla kernel bitwise equal to the reference (token and paged forms)")
    print("flat kernel bitwise equal to the reference (token and paged forms, D 576 / 320 / 64)")


def _time_forms(row, bg, prefix, base, nbytes, caches, variants, run_op, run_flat):
    """row[base]: GB/s of the op; row[prefix + 'flat_VW_NV_W']: each flat variant's, with its bitwise check against
    the op's output ('..._equal'). One call a graph entry, rotating over `caches` (bench_cache_gather's method);
    the caches are freed at the end."""
    r, k = len(caches), bg._rotation(nbytes, caches[0].device)[1]
    want = run_op(caches[0])
    row[base] = nbytes / bg._device_us([(lambda i=i: run_op(caches[i % r])) for i in range(k)]) / 1e3
    for var in variants:
        name = prefix + "flat_%d_%d_%d" % var
        row[name + "_equal"] = bool(torch.equal(run_flat(caches[0], var).view(torch.int16), want.view(torch.int16)))
        row[name] = nbytes / bg._device_us([(lambda i=i, v=var: run_flat(caches[i % r], v)) for i in range(k)]) / 1e3
    del want
    caches.clear()
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--sizes", default="65536,262144")
    ap.add_argument("--variants", default="", help="VW,NV,warps;... (plain layout; default VARIANTS)")
    ap.add_argument("--ds-variants", default="", help="16,NV,warps;... (fp8_ds_mla; default DS_VARIANTS)")
    args = ap.parse_args()
    global VARIANTS, DS_VARIANTS
    if args.variants:
        VARIANTS = [tuple(int(x) for x in v.split(",")) for v in args.variants.split(";")]
    if args.ds_variants:
        DS_VARIANTS = [tuple(int(x) for x in v.split(",")) for v in args.ds_variants.split(";")]
    if args.check:
        _check_cpu()
        return
    from benchmarks import bench_cache_gather as bg
    from tests.ops.gather_dequant_cache_cases import bench_token_problem, device_random_cache
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    cgen = torch.Generator().manual_seed(0)
    bg._big_copy(dev, "start", warm_s=1.0)
    rows = []
    op, paged_op = torch.ops.fx_mla.gather_dequant_cache, torch.ops.fx_mla.gather_dequant_cache_paged
    scale = torch.tensor(0.03, device=dev)
    for n in (int(x) for x in args.sizes.split(",")):
        nbytes = n * (576 + 1152)
        row = {"tokens": n, "bytes": nbytes, "copy": bg._copy_gbs(nbytes, dev)}
        r, _ = bg._rotation(nbytes, dev)
        num_blocks, bt, cu, tts, ss = bench_token_problem(n, dev, cgen)
        caches = [device_random_cache(num_blocks, "plain", dev, gen) for _ in range(r)]
        _time_forms(row, bg, "", "op", nbytes, caches, VARIANTS,
                    lambda c: op(c, bt, cu, tts, ss, scale, torch.bfloat16, "plain"),
                    lambda c, v: flat_gather(c, bt, cu, tts, ss, scale, torch.bfloat16, v))
        batch, mb = 64, max(1, n // (64 * 64))
        caches = [device_random_cache(batch * mb + 16, "plain", dev, gen) for _ in range(r)]
        table = torch.randperm(batch * mb + 16, generator=cgen)[:batch * mb].view(batch, mb).to(torch.int32).to(dev)
        _time_forms(row, bg, "paged_", "paged_op", nbytes, caches, VARIANTS,
                    lambda c: paged_op(c, table, scale, torch.bfloat16, "plain"),
                    lambda c, v: flat_gather(c, table, None, None, None, scale, torch.bfloat16, v, paged=True))
        dbytes = n * (656 + 1152)
        r, _ = bg._rotation(dbytes, dev)
        caches = [device_random_cache(num_blocks, "fp8_ds_mla", dev, gen) for _ in range(r)]
        _time_forms(row, bg, "ds_", "ds_op", dbytes, caches, DS_VARIANTS,
                    lambda c: op(c, bt, cu, tts, ss, None, torch.bfloat16, "fp8_ds_mla"),
                    lambda c, v: flat_gather_ds_mla(c, bt, cu, tts, ss, torch.bfloat16, v))
        rows.append(row)
        print(row, flush=True)
    bg._big_copy(dev, "end")
    ceil = bg._ceiling()[0]
    print(f"\nceiling (fastest copy of the run): {ceil:.0f} GB/s; GB/s (% of it); '!' = output not bitwise the op's")
    for row in rows:
        print(f"{row['tokens']} tokens: copy {row['copy']:.0f} ({100 * row['copy'] / ceil:.1f})")
        for form, base, variants in (("", "op", VARIANTS), ("paged_", "paged_op", VARIANTS),
                                     ("ds_", "ds_op", DS_VARIANTS)):
            cells = [f"{base} {row[base]:.0f} ({100 * row[base] / ceil:.1f})"]
            for var in variants:
                name = form + "flat_%d_%d_%d" % var
                mark = "" if row[name + "_equal"] else "!"
                cells.append(f"{var} {row[name]:.0f} ({100 * row[name] / ceil:.1f}){mark}")
            print("   " + " | ".join(cells))
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "ceiling_gbs": ceil, "copies": bg.COPIES, "variants": VARIANTS, "ds_variants": DS_VARIANTS, "rows": rows}
    out = os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results")
    with open(os.path.join(out, "dev_flat_gather.json"), "w") as f:
        json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
