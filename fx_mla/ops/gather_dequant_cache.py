"""torch.ops.fx_mla.gather_dequant_cache{,_paged}: gather a paged latent cache, dequantize, write contiguous.

Ops (registered on import):
  gather_dequant_cache_paged(Tensor cache, Tensor block_table, Tensor? scale, ScalarType out_dtype,
                             str layout="plain", bool checked=False) -> Tensor          [B, max_blocks*bs, D_out]
  gather_dequant_cache(Tensor cache, Tensor block_table, Tensor cu_seq_lens, Tensor token_to_seq,
                       Tensor? seq_starts, Tensor? scale, ScalarType out_dtype, str layout="plain",
                       bool checked=False) -> Tensor                                      [num_tokens, D_out]

Semantics (bitwise the plain PyTorch below whenever that runs without an index error):
- paged:  x = cache[block_table].view(B, max_blocks * bs, D)
- token:  b = max(token_to_seq[t], 0); off = t - cu_seq_lens[b] + seq_starts[b] (0 for a padding token,
          token_to_seq[t] < 0: it reads request 0's first slot); x[t] = cache[block_table[b, off // bs], off % bs]
          (// and % round toward -inf, as torch's do; seq_starts None means zeros)
- layout "plain" (cache [num_blocks, bs, D] of float8_e4m3fn, float8_e5m2, bfloat16, float16 or float32):
  out = round_out(fp32(x) * scale) for an fp8 cache with a scale, round_out(fp32(x)) otherwise (a cast).
  round_out is one round-to-nearest-even to out_dtype; fp8 -> fp32 is exact. This is what CPU eager and
  Inductor compute for `x.to(out_dtype) * k_scale` with a 0-dim fp32 k_scale (and for a 1-element k_scale
  with out_dtype=float32). (Eager CUDA first casts a 0-dim CUDA k_scale to bf16/fp16; we follow CPU and Inductor.)
  A scale is accepted only with fp8 caches (for others `x.to(dt) * s` would round twice: not this op).
- layout "fp8_ds_mla" (cache uint8 [num_blocks, bs, 656]: 512 e4m3 | 4 fp32 scales | 64 bf16 rope), D_out=576:
  out[i] = round_out(fp32(e4m3[i]) * scale_i // 128) for i < 512; out[512 + k] = round_out(rope[k]).
  There is no per-tensor scale on top (as in vLLM: the 4 group scales are the whole dequant); scale must be None.
- Indices as torch takes them: a negative block id or block-table column wraps once (x + size). Anything still
  out of range (request id >= B, block id outside the cache, column outside the row) reads nothing: that token's
  row of the output is zeros. The kernels never form an address outside the cache, block table or metadata.
- checked=True validates on the host first (syncs; not for CUDA graphs) and raises ValueError naming the
  request and index; strict: negative block ids and out-of-row positions are errors there.
The CPU implementation is the plain-torch reference (the test oracle); CUDA launches the Triton kernels of
fx_mla/ops/kernels/gather_dequant_cache.py, reading the scale and all indices on the device (no host sync:
the unchecked op is CUDA-graph capturable).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from fx_mla.ops._decode_launch import device_index, max_shared, max_shared_per_sm, sm_count
from fx_mla.ops._device import on_input_device
from fx_mla.ops._fp8 import FP8_DTYPES, fp8_supported

__all__ = ["gather_dequant_cache", "gather_dequant_cache_paged", "gather_dequant_cache_reference",
           "gather_dequant_cache_paged_reference", "launch_gather_dequant_cache", "LAYOUTS"]

LAYOUTS = ("plain", "fp8_ds_mla")
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CACHE_DTYPES = FP8_DTYPES + OUT_DTYPES
INDEX_DTYPES = (torch.int32, torch.int64)
DS_MLA_ROW_BYTES, DS_MLA_LATENT, DS_MLA_GROUP, DS_MLA_ROPE = 656, 512, 128, 64
DS_MLA_D_OUT = DS_MLA_LATENT + DS_MLA_ROPE

# Launch configuration, in one place: (BLOCK_T tokens a program, num_warps, programs per SM for a persistent
# grid, 0 = one tile a program[, flags[, maxnreg]]). maxnreg: a register cap a thread (0: the compiler's own; at
# 48 registers, 10 programs of 4 warps fit an SM, at 32 all 16). flags, a string of letters (kernels' docstring):
# "v" = loads as wide as the output stores (no shared-memory layout change between load and store), "s" = streaming
# output stores (.cs), "p" = programmatic dependent launch (sm_90+ CUDA only; ignored elsewhere), "e" = with "p",
# each program prefetches its rows into L2 before the PDL wait, by indices read then (kernels' docstring: EARLY),
# "r" = fp8_ds_mla only (the plain kernel's rows are read that way already): a row's 512 latent bytes loaded as one
# contiguous vector (a warp reads 512 bytes of one row, not four 128-byte groups of four rows; ROW_LOAD; with "v" the
# latent then still changes layout through shared memory, offline Triton 3.6 sm_90: "vr" keeps "r"'s loads, not "v"'s
# saving).
# Small tiles keep registers low (~32-48 a thread), so many programs share an SM and many independent index chains
# (token_to_seq -> cu_seq_lens/seq_starts -> block_table -> cache) are in flight. From bench_cache_gather.py
# --sweep on an H100 80GB HBM3 (16 configs, bit-identical): (8, 4, 0) best or within 0.1 % of best, both layouts,
# 64K and 1M tokens; "v" cost ds_mla 6-7 %, "s"/"p" moved <= 1 %, 2 warps and persistent grids were slower; register
# caps of 40 / 32 (more programs an SM) were no faster, 32 much slower (spills) (session 5, RESULTS.md); reading
# cu_seq_lens / seq_starts whole and selecting in registers (one dependent load less) was 11-28 points slower at 64K
# tokens and was removed (session 6).
# Session 11 (RESULTS.md, 1x H100, two sweeps in one run): "p" +1.1 point of copy at 64K tokens (both layouts), the
# same at 1M; index loads marked evict_last did nothing, output stores marked evict_first cost 0.7 at 64K (both
# flags removed after that run); smaller tiles or more warps a tile (fewer bytes resident an SM) and a flat-vector
# tiling were no faster. PDL only overlaps the launch with the previous
# kernel's tail: every program waits for that kernel (griddepcontrol.wait) before it reads anything.
# Session 14 (RESULTS.md, 1x H100, s33): "e" on top of "p" (the first wave's rows into L2 before the PDL wait, by
# L1-bypassing index reads) +1.4 points of copy at 64K tokens on e4m3 576 (88.5 -> 89.9, twice) and +1.2 on ds_mla
# (88.2 -> 89.4), even at 1M; (4, 4, 0, "pe") and (16, 8, 0, "pe") no better. "pe" the default since then. All its GPU
# tests (bitwise, PDL chains incl. indices written by the previous kernel) passed.
# Session 17 (RESULTS.md, 1x H100, s44): "r" on fp8_ds_mla +0.2 points of copy at 64K tokens and +0.4 at 1M, the same
# in two interleaved repeats (89.9 -> 90.1, 94.6 -> 95.0); plain unchanged (its rows load that way already).
CONFIG = {"plain": (8, 4, 0, "pe"), "fp8_ds_mla": (8, 4, 0, "per")}
EARLY_WAVE = 16  # flag "e": programs an SM that prefetch before the PDL wait (an SM holds at most 16 of 4 warps)
# Config flag "a": the Gluon cp.async kernel (kernels/gather_dequant_cache_async.py), a config (BLOCK_T, consumer
# warps, CTAs an SM, flags[, stages[, group]]) (stages: shared-memory buffers, default 4; group: tiles an index
# chain, default 4); "p" there: PDL, "e" (with "p"): the first group's rows into L2 before the PDL wait; "x" / "y":
# development diagnostics, WRONG results (no output stores / no cache reads), refused unless FX_MLA_DEV_DIAG=1.
# The Gluon kernel ignores "v", "s" and "r" (its loads and stores have their own layouts). Where it cannot run
# (async_unsupported) the call takes the Triton kernels with the layout's ASYNC_FALLBACK. Its producer
# warp's registers: ASYNC_PRODUCER_REGS (no spills at BLOCK_T 32 in the offline sm_90 compile,
# benchmarks/dev_offline_sm90.py --kernel gather).
ASYNC_FALLBACK = dict(CONFIG)  # CONFIG's Triton defaults, copied at import (bench_cache_gather.py --config may put an
# async config in CONFIG itself)
ASYNC_PRODUCER_REGS = 96
MAX_COLUMNS = 1024  # a plain entry wider than this is gathered in column slices (keeps tiles in registers)


# ---------------------------------------------------------------- validation

def _tensor(name, t, dtypes, ndim, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {tuple(str(d) for d in dtypes)}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on the cache's device {device}, got {t.device}")


def _check_common(cache, block_table, scale, out_dtype, layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    if layout == "plain":
        _tensor("cache", cache, CACHE_DTYPES, 3, None)
    else:
        _tensor("cache", cache, (torch.uint8,), 3, None)
        if cache.shape[2] != DS_MLA_ROW_BYTES:
            raise ValueError(f"cache must be [num_blocks, block_size, {DS_MLA_ROW_BYTES}] bytes for layout "
                             f"'fp8_ds_mla', got shape {tuple(cache.shape)}")
    if cache.shape[1] == 0:
        raise ValueError(f"cache must have block_size >= 1, got shape {tuple(cache.shape)}")
    if cache.shape[2] > 1 and cache.stride(2) != 1:
        raise ValueError(f"cache's last dim must be contiguous (stride 1), got strides {cache.stride()}")
    _tensor("block_table", block_table, INDEX_DTYPES, 2, cache.device)
    if scale is not None:
        if layout == "fp8_ds_mla":
            raise ValueError("scale must be None for layout 'fp8_ds_mla': each row carries its own group scales")
        if cache.dtype not in FP8_DTYPES:
            raise ValueError(f"scale is only accepted with an fp8 cache, got cache dtype {cache.dtype}")
        _tensor("scale", scale, (torch.float32,), None, cache.device)
        if scale.numel() != 1:
            raise ValueError(f"scale must hold exactly one element, got shape {tuple(scale.shape)}")


def _check_token(cache, block_table, cu_seq_lens, token_to_seq, seq_starts):
    _tensor("cu_seq_lens", cu_seq_lens, INDEX_DTYPES, 1, cache.device)
    _tensor("token_to_seq", token_to_seq, INDEX_DTYPES, 1, cache.device)
    if seq_starts is not None:
        _tensor("seq_starts", seq_starts, INDEX_DTYPES, 1, cache.device)


def _check_sizes(cache, block_table, cu_seq_lens, seq_starts, layout):
    """Size relations and alignment of real (not fake) tensors."""
    batch = block_table.shape[0]
    if cu_seq_lens is not None and cu_seq_lens.shape[0] != batch + 1:
        raise ValueError(f"cu_seq_lens must be [{batch + 1}] (block_table rows + 1), got {tuple(cu_seq_lens.shape)}")
    if seq_starts is not None and seq_starts.shape[0] != batch:
        raise ValueError(f"seq_starts must be [{batch}] (block_table rows), got {tuple(seq_starts.shape)}")
    if layout == "fp8_ds_mla" and (cache.stride(0) % 16 or cache.stride(1) % 16 or cache.data_ptr() % 16):
        raise ValueError("an 'fp8_ds_mla' cache must have 16-byte aligned rows (strides and data pointer "
                         f"multiples of 16), got strides {cache.stride()}")


def _d_out(cache, layout):
    return DS_MLA_D_OUT if layout == "fp8_ds_mla" else cache.shape[2]


# ---------------------------------------------------------------- plain-torch references (the CPU impl)

def _wrap(idx, size):
    """torch's indexing: one wrap of negative indices; returns (index made safe, in-range mask)."""
    idx = torch.where(idx < 0, idx + size, idx)
    ok = (idx >= 0) & (idx < size)
    return torch.where(ok, idx, torch.zeros_like(idx)), ok


def _token_slots(num_blocks, block_size, block_table, cu_seq_lens, token_to_seq, seq_starts):
    """(block id, slot in block, ok) of every output token, the chain of the module docstring."""
    batch, max_blocks = block_table.shape
    tts = token_to_seq.long()
    valid = tts >= 0
    b = tts.clamp_min(0)
    ok = b < batch
    b = torch.where(ok, b, torch.zeros_like(b))
    ok &= batch > 0
    t = torch.arange(tts.shape[0], device=tts.device)
    if batch == 0:  # nothing to index; every token reads nothing
        zero = torch.zeros_like(tts)
        return zero, zero, ok
    off = t - cu_seq_lens.long()[b]
    if seq_starts is not None:
        off = off + seq_starts.long()[b]
    off = torch.where(valid, off, torch.zeros_like(off))
    col, col_ok = _wrap(torch.div(off, block_size, rounding_mode="floor"), max_blocks)
    blk = block_table.long()[b, col] if max_blocks > 0 else torch.zeros_like(b)
    blk, blk_ok = _wrap(blk, num_blocks)
    return blk, off % block_size, ok & col_ok & blk_ok


def _dequant(x, scale, out_dtype, layout):
    """Rows x [..., D] (or [..., 656] bytes) to out_dtype: fp32 upcast, times the scale, one rounding."""
    if layout == "fp8_ds_mla":
        lat = x[..., :DS_MLA_LATENT].view(torch.float8_e4m3fn).to(torch.float32)
        sc = x[..., DS_MLA_LATENT:DS_MLA_LATENT + 16].view(torch.float32)
        lat = lat.unflatten(-1, (4, DS_MLA_GROUP)) * sc.unsqueeze(-1)
        rope = x[..., DS_MLA_LATENT + 16:].view(torch.bfloat16)
        return torch.cat([lat.flatten(-2).to(out_dtype), rope.to(out_dtype)], dim=-1)
    if scale is not None:
        return (x.to(torch.float32) * scale.to(torch.float32).reshape(())).to(out_dtype)
    return x.to(out_dtype)


def gather_dequant_cache_paged_reference(cache, block_table, scale, out_dtype, layout="plain"):
    batch, max_blocks = block_table.shape
    bs = cache.shape[1]
    d_out = _d_out(cache, layout)
    if cache.shape[0] == 0 or batch * max_blocks == 0:
        return torch.zeros(batch, max_blocks * bs, d_out, dtype=out_dtype, device=cache.device)
    blk, ok = _wrap(block_table.long(), cache.shape[0])
    x = cache[blk].view(batch, max_blocks * bs, cache.shape[-1])
    y = _dequant(x, scale, out_dtype, layout)
    mask = ok.repeat_interleave(bs, dim=1).unsqueeze(-1)
    return torch.where(mask, y, torch.zeros((), dtype=out_dtype, device=y.device))


def gather_dequant_cache_reference(cache, block_table, cu_seq_lens, token_to_seq, seq_starts, scale,
                                   out_dtype, layout="plain"):
    n = token_to_seq.shape[0]
    d_out = _d_out(cache, layout)
    if cache.shape[0] == 0 or n == 0:
        return torch.zeros(n, d_out, dtype=out_dtype, device=cache.device)
    blk, slot, ok = _token_slots(cache.shape[0], cache.shape[1], block_table, cu_seq_lens, token_to_seq,
                                 seq_starts)
    y = _dequant(cache[blk, slot], scale, out_dtype, layout)
    return torch.where(ok.unsqueeze(-1), y, torch.zeros((), dtype=out_dtype, device=y.device))


# ---------------------------------------------------------------- checked mode (host-side, syncs)

def _first(mask):
    return [int(i) for i in mask.nonzero()[0].tolist()]


def _check_block_ids(block_table, num_blocks, used=None, who=""):
    bad = (block_table < 0) | (block_table >= num_blocks)
    if used is not None:
        bad &= used
    if bool(bad.any()):
        b, j = _first(bad)
        raise ValueError(f"block_table[{b}, {j}] = {int(block_table[b, j])} is out of range for "
                         f"num_blocks={num_blocks}{who}")


def _check_indices_token(cache, block_table, cu_seq_lens, token_to_seq, seq_starts):
    batch, max_blocks = block_table.shape
    bs, capacity = cache.shape[1], block_table.shape[1] * cache.shape[1]
    cu, tts = cu_seq_lens.long(), token_to_seq.long()
    ss = seq_starts.long() if seq_starts is not None else torch.zeros(batch, dtype=torch.long, device=cu.device)
    if bool((cu[1:] < cu[:-1]).any()):
        b = _first(cu[1:] < cu[:-1])[0]
        raise ValueError(f"cu_seq_lens must be nondecreasing: cu_seq_lens[{b + 1}] = {int(cu[b + 1])} < "
                         f"cu_seq_lens[{b}] = {int(cu[b])}")
    if bool((ss < 0).any()):
        b = _first(ss < 0)[0]
        raise ValueError(f"seq_starts[{b}] = {int(ss[b])} is negative")
    if batch > 0:
        over = (cu[:-1] < cu[1:]) & (ss + (cu[1:] - cu[:-1]) > capacity)
        if bool(over.any()):
            b = _first(over)[0]
            raise ValueError(f"seq_starts[{b}] + length = {int(ss[b])} + {int(cu[b + 1] - cu[b])} exceeds the pages "
                             f"request {b} holds: {max_blocks} blocks x {bs} = {capacity} slots")
    if tts.numel() == 0:
        return
    if bool((tts >= batch).any()):
        t = _first(tts >= batch)[0]
        raise ValueError(f"token_to_seq[{t}] = {int(tts[t])} is out of range for {batch} requests "
                         f"(block_table rows)")
    pad = tts < 0
    if bool(pad.any()):
        t = _first(pad)[0]
        if batch == 0 or max_blocks == 0:
            raise ValueError(f"padding token {t} (token_to_seq[{t}] = {int(tts[t])}) reads request 0's first slot, "
                             f"but block_table has shape {tuple(block_table.shape)}")
        _check_block_ids(block_table[:1, :1], cache.shape[0], who=f" (read by padding token {t})")
    b = tts.clamp_min(0)
    t = torch.arange(tts.shape[0], device=tts.device)
    outside = ~pad & ((t < cu[b]) | (t >= cu[b + 1]))
    if bool(outside.any()):
        i = _first(outside)[0]
        r = int(tts[i])
        raise ValueError(f"token {i} is assigned to request {r} (token_to_seq[{i}] = {r}) but lies outside "
                         f"[cu_seq_lens[{r}], cu_seq_lens[{r + 1}]) = [{int(cu[r])}, {int(cu[r + 1])})")
    off = t - cu[b] + ss[b]
    col = torch.where(pad, torch.zeros_like(off), off // bs)
    used = torch.zeros(block_table.shape, dtype=torch.bool, device=block_table.device)
    used[b[~pad], col[~pad]] = True
    _check_block_ids(block_table, cache.shape[0], used, who=" (a token of that request reads it)")


# ---------------------------------------------------------------- Triton launcher

def _split_entry(d):
    """D as up to three power-of-two-wide parts (P1, P2, P3): P1 + P2 <= D, the masked P3 >= the rest."""
    p1 = 1 << (d.bit_length() - 1)
    rest = d - p1
    p2 = 1 << (rest.bit_length() - 1) if rest else 0
    rest -= p2
    p3 = 1 << (rest - 1).bit_length() if rest else 0
    return p1, p2, p3


def launch_gather_dequant_cache(cache, block_table, cu_seq_lens, token_to_seq, seq_starts, scale, out,
                                layout="plain", config=None, check_out=True):
    """Fill out ([n, D_out], or [B, T, D_out] when token_to_seq is None: the paged form). Device-agnostic
    (CPU tensors run under TRITON_INTERPRET=1). config: (BLOCK_T, num_warps, programs_per_sm[, flags[, maxnreg]])
    override. The op checks the other arguments before the call and passes its own `out` (check_out=False); a direct
    call has `out` checked here (_check_out). The kernels read the metadata vectors as contiguous arrays: strided
    ones are copied first (on the device: no host sync)."""
    from fx_mla.ops.kernels.gather_dequant_cache import (_gather_dequant_cache_fp8_ds_mla_kernel,
                                                         _gather_dequant_cache_kernel)
    paged = token_to_seq is None
    if check_out:
        _check_out(out, cache, block_table, token_to_seq, layout)
    n_tokens = out.shape[0] * out.shape[1] if paged else out.shape[0]
    if n_tokens == 0 or out.shape[-1] == 0:
        return out
    if n_tokens >= 2 ** 31:
        raise ValueError(f"the output has {n_tokens} tokens; the kernels number tokens in int32 (below 2**31)")
    if not paged:
        token_to_seq, cu_seq_lens = token_to_seq.contiguous(), cu_seq_lens.contiguous()
        seq_starts = seq_starts.contiguous() if seq_starts is not None else None
    config = config or CONFIG[layout]
    block_t, warps, per_sm, *rest = config
    flags = rest[0] if rest else ""
    if set(flags) - set("vspeaxyr"):
        raise ValueError(f"config flags must be letters of 'vspeaxyr', got {flags!r}")
    if "e" in flags and "p" not in flags:
        raise ValueError(f"config flag 'e' (prefetch before the PDL wait) needs 'p', got {flags!r}")
    if set(flags) & set("xy") and ("a" not in flags or os.environ.get("FX_MLA_DEV_DIAG") != "1"):
        raise ValueError(f"config flags 'x' / 'y' are development diagnostics of flag 'a' that write WRONG outputs; "
                         f"they need 'a' and FX_MLA_DEV_DIAG=1, got {flags!r}")
    if "a" in flags:
        if async_unsupported(cache, out, layout, config) is None:
            return _launch_async(cache, block_table, cu_seq_lens, token_to_seq, seq_starts, scale, out, layout,
                                 n_tokens, config)
        block_t, warps, per_sm, flags, rest = *ASYNC_FALLBACK[layout], []  # (why: async_unsupported's reason)
    maxnreg = rest[1] if len(rest) > 1 else 0
    if not isinstance(maxnreg, int) or maxnreg < 0:
        raise ValueError(f"config maxnreg must be an int >= 0 (0: the compiler's choice), got {maxnreg!r}")
    n_tiles = -(-n_tokens // block_t)
    grid = n_tiles
    sms = sm_count(device_index(cache.device)) if cache.is_cuda else 1
    if per_sm:  # persistent: per_sm programs per SM (per "SM" of the CPU interpreter: one) stride over tiles
        grid = min(n_tiles, per_sm * sms)
    batch, max_blocks = block_table.shape
    dummy = block_table  # metadata pointers the paged form never reads
    args = (token_to_seq if not paged else dummy, cu_seq_lens if not paged else dummy,
            seq_starts if seq_starts is not None else dummy, block_table,
            n_tokens, batch, max_blocks, cache.shape[0], block_table.stride(0), block_table.stride(1),
            cache.stride(0), cache.stride(1), max(max_blocks * cache.shape[1], 1), n_tiles,
            EARLY_WAVE * sms)  # early_programs: the programs that flag "e" lets prefetch (one wave's worth)
    common = dict(BLOCK_SIZE=cache.shape[1], BLOCK_T=block_t, PAGED=paged,
                  HAS_SEQ_STARTS=seq_starts is not None, PERSISTENT=grid < n_tiles,
                  ROUND_BY_BITS=os.environ.get("TRITON_INTERPRET") == "1", num_warps=warps,
                  VEC=16 // out.element_size() if "v" in flags else 0, STREAM="s" in flags, PDL=False)
    if "p" in flags and cache.is_cuda and _capability(cache.device)[0] >= 9:
        common.update(PDL=True, launch_pdl=True, EARLY="e" in flags)
    if maxnreg and cache.is_cuda:  # register cap (more programs an SM); the interpreter has no registers
        common.update(maxnreg=maxnreg)
    if layout == "fp8_ds_mla":
        _gather_dequant_cache_fp8_ds_mla_kernel[(grid,)](cache, out, *args, ROW_LOAD="r" in flags, **common)
        return out
    d = cache.shape[2]
    for c0 in range(0, d, MAX_COLUMNS):  # wide entries: one launch per MAX_COLUMNS columns (576 takes one)
        width = min(MAX_COLUMNS, d - c0)
        p1, p2, p3 = _split_entry(width)
        _gather_dequant_cache_kernel[(grid,)](cache[..., c0:], out[..., c0:], scale if scale is not None else dummy,
                                              *args, D=width, OUT_STRIDE=d, P1=p1, P2=p2, P3=p3,
                                              HAS_SCALE=scale is not None, **common)
    return out


def _check_out(out, cache, block_table, token_to_seq, layout):
    """out of a launch: the op's output shape ([num_tokens, D_out], or [B, max_blocks * block_size, D_out] for the
    paged form) and dtype, contiguous (the kernels index its rows as token * D_out)."""
    if token_to_seq is None:
        shape = _paged_shape(cache, block_table, layout)
    else:
        shape = (token_to_seq.shape[0], _d_out(cache, layout))
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape or out.dtype not in OUT_DTYPES \
            or not out.is_contiguous() or out.device != cache.device:
        raise ValueError(f"out must be a contiguous bf16, fp16 or fp32 tensor of shape {shape} on {cache.device}, "
                         f"got {getattr(out, 'dtype', type(out).__name__)} {tuple(getattr(out, 'shape', ()))} "
                         f"on {getattr(out, 'device', None)}")


def _async_shape(config):
    """An async config (BLOCK_T, warps, CTAs an SM, flags[, stages[, group]]) with its defaults filled in."""
    block_t, warps, per_sm, flags, *more = config
    stages, group = (list(more) + [4, 4][len(more):])[:2]
    return block_t, warps, per_sm, flags, stages, group


def async_unsupported(cache, out, layout, config):
    """Why the Gluon cp.async kernel cannot take this call with this config (flag "a"; the call then runs the layout's
    ASYNC_FALLBACK on the Triton kernels), or None.
    It needs a CUDA device of compute capability >= 9.0 (warp specialization, setmaxnreg), Triton's Gluon, an fp8
    "plain" entry of D bytes with D % 16 == 0 and D <= MAX_COLUMNS or the fp8_ds_mla layout, 16-byte aligned rows
    (cache pointer and both strides) for 16-byte copies, a launch shape it was written for, and the registers and
    shared memory of config's CTAs an SM."""
    block_t, warps, per_sm, _, stages, group = _async_shape(config)
    if not cache.is_cuda:
        return "not a CUDA tensor"
    if _capability(cache.device)[0] < 9:
        return f"compute capability {_capability(cache.device)} < 9.0"
    if layout == "plain":
        if cache.dtype not in FP8_DTYPES:
            return f"a {cache.dtype} cache (fp8 only)"
        if cache.shape[2] % 16 or cache.shape[2] > MAX_COLUMNS:
            return f"entry size {cache.shape[2]} (a multiple of 16 up to {MAX_COLUMNS})"
    esize = cache.element_size()
    if cache.data_ptr() % 16 or (cache.stride(0) * esize) % 16 or (cache.stride(1) * esize) % 16:
        return f"cache rows not 16-byte aligned (data_ptr % 16 = {cache.data_ptr() % 16}, strides {cache.stride()})"
    if not out.is_contiguous() or out.data_ptr() % 16:
        return "output not contiguous and 16-byte aligned"
    if (block_t not in (8, 16, 32) or warps not in (4, 8) or per_sm not in (1, 2, 3) or not 2 <= stages <= 8
            or group not in (1, 2, 4, 8)):
        return (f"launch shape (BLOCK_T {block_t}, warps {warps}, CTAs an SM {per_sm}, stages {stages}, "
                f"group {group})")
    if _async_maxnreg(per_sm, warps) < 80:
        return f"{per_sm} CTAs of {warps} consumer warps an SM leave too few registers a thread"
    smem = _async_smem_bytes(cache, layout, stages, block_t, group)
    limit = max_shared(cache.device) or 232448
    per_sm_limit = max_shared_per_sm(cache.device) or 233472
    if smem > limit or per_sm * (smem + 1024) > per_sm_limit:
        return (f"shared memory: {per_sm} CTA(s) an SM of {smem} bytes (limits {limit} a block, {per_sm_limit} an "
                f"SM)")
    try:
        from fx_mla.ops.kernels import gather_dequant_cache_async  # noqa: F401 (Gluon: Triton >= 3.5)
    except Exception as e:  # pragma: no cover - depends on the installed Triton
        return f"Gluon kernel unavailable ({type(e).__name__}: {e})"
    return None


def _async_maxnreg(per_sm, warps):
    """Registers a thread for per_sm CTAs an SM: a CTA is the consumer warps, the producer warp and padding to whole
    warpgroups (warps + 4 warps)."""
    return min(256, 65536 // (per_sm * 32 * (warps + 4))) // 8 * 8


def _async_smem_bytes(cache, layout, stages, block_t, group):
    """The async kernel's shared memory a CTA: the stage buffers (its _split_entry parts, a 16-byte stand-in for an
    absent part), the rows of a group of tiles and the barriers."""
    if layout == "fp8_ds_mla":
        row = DS_MLA_ROW_BYTES
    else:
        p1, p2, p3 = _split_entry(cache.shape[2])
        row = p1 + (p2 or 16) + (p3 or 16)
    return stages * block_t * row + group * block_t * 8 + stages * 16


def _launch_async(cache, block_table, cu_seq_lens, token_to_seq, seq_starts, scale, out, layout, n_tokens, config):
    """The Gluon cp.async kernel (kernels/gather_dequant_cache_async.py): a persistent grid of per_sm CTAs an SM
    (at most one a tile), each CTA an equal contiguous range of tokens; registers capped so per_sm CTAs fit; the
    producer's index chain runs for `group` tiles at once."""
    from fx_mla.ops.kernels.gather_dequant_cache_async import _gather_dequant_cache_async_kernel
    block_t, warps, per_sm, flags, stages, group = _async_shape(config)
    pdl = "p" in flags
    paged = token_to_seq is None
    sms = sm_count(device_index(cache.device))
    grid = max(1, min(per_sm * sms, -(-n_tokens // block_t)))
    batch, max_blocks = block_table.shape
    dummy = block_table
    d_out = out.shape[-1]
    p1, p2, p3 = _split_entry(d_out) if layout == "plain" else (512, 64, 0)
    kw = dict(D_OUT=d_out, P1=p1, P2=p2, P3=p3, DS_MLA=layout == "fp8_ds_mla", BLOCK_SIZE=cache.shape[1],
              BLOCK_T=block_t, STAGES=stages, PAGED=paged, HAS_SEQ_STARTS=seq_starts is not None,
              HAS_SCALE=scale is not None, PDL=pdl, PRODUCER_REGS=ASYNC_PRODUCER_REGS, num_warps=warps, GROUP=group,
              DIAG=1 if "x" in flags else 2 if "y" in flags else 0)  # x / y: FX_MLA_DEV_DIAG=1 only (the launcher)
    if pdl:
        kw.update(launch_pdl=True, EARLY="e" in flags, ROW_BYTES=cache.shape[2] * cache.element_size())
    if per_sm > 1:  # registers capped so that per_sm CTAs fit (_async_maxnreg)
        kw.update(maxnreg=_async_maxnreg(per_sm, warps))
    _gather_dequant_cache_async_kernel[(grid,)](
        cache, out, scale if scale is not None else dummy, token_to_seq if not paged else dummy,
        cu_seq_lens if not paged else dummy, seq_starts if seq_starts is not None else dummy, block_table,
        n_tokens, batch, max_blocks, cache.shape[0], block_table.stride(0), block_table.stride(1), cache.stride(0),
        cache.stride(1), max(max_blocks * cache.shape[1], 1), **kw)
    return out


_CAPABILITY = {}  # device index -> (major, minor), looked up once


def _capability(device):
    cap = _CAPABILITY.get(device.index)
    if cap is None:
        cap = _CAPABILITY[device.index] = torch.cuda.get_device_capability(device)
    return cap


def _check_cuda(cache, layout):
    fp8 = torch.float8_e4m3fn if layout == "fp8_ds_mla" else cache.dtype
    if fp8 in FP8_DTYPES:
        reason = fp8_supported(fp8, _capability(cache.device))
        if reason is not None:
            raise RuntimeError(f"gather_dequant_cache cannot run on {cache.device}: {reason}")


# ---------------------------------------------------------------- registration
# torch.library.Library + register_fake rather than @custom_op: the dispatcher calls these functions directly,
# which keeps the per-call host cost of the CUDA path to the checks and the Triton launch (custom_op's Python
# wrapping added tens of microseconds a call, as much as the kernel itself at 64K tokens).

_LIB = torch.library.Library("fx_mla", "FRAGMENT")
_LIB.define("gather_dequant_cache_paged(Tensor cache, Tensor block_table, Tensor? scale, ScalarType out_dtype, "
            "str layout=\"plain\", bool checked=False) -> Tensor")
_LIB.define("gather_dequant_cache(Tensor cache, Tensor block_table, Tensor cu_seq_lens, Tensor token_to_seq, "
            "Tensor? seq_starts, Tensor? scale, ScalarType out_dtype, str layout=\"plain\", bool checked=False) "
            "-> Tensor")


def _paged_shape(cache, block_table, layout):
    return (block_table.shape[0], block_table.shape[1] * cache.shape[1], _d_out(cache, layout))


def _check_paged_call(cache, block_table, scale, out_dtype, layout, checked):
    _check_common(cache, block_table, scale, out_dtype, layout)
    _check_sizes(cache, block_table, None, None, layout)
    if checked:
        _check_block_ids(block_table, cache.shape[0])


def _check_token_call(cache, block_table, cu_seq_lens, token_to_seq, seq_starts, scale, out_dtype, layout, checked):
    _check_common(cache, block_table, scale, out_dtype, layout)
    _check_token(cache, block_table, cu_seq_lens, token_to_seq, seq_starts)
    _check_sizes(cache, block_table, cu_seq_lens, seq_starts, layout)
    if checked:
        _check_indices_token(cache, block_table, cu_seq_lens, token_to_seq, seq_starts)


def _paged_cpu(cache, block_table, scale, out_dtype, layout="plain", checked=False):
    _check_paged_call(cache, block_table, scale, out_dtype, layout, checked)
    return gather_dequant_cache_paged_reference(cache, block_table, scale, out_dtype, layout)


def _paged_cuda(cache, block_table, scale, out_dtype, layout="plain", checked=False):
    _check_paged_call(cache, block_table, scale, out_dtype, layout, checked)
    _check_cuda(cache, layout)
    out = torch.empty(_paged_shape(cache, block_table, layout), dtype=out_dtype, device=cache.device)
    return launch_gather_dequant_cache(cache, block_table, None, None, None, scale, out, layout, check_out=False)


def _paged_fake(cache, block_table, scale, out_dtype, layout="plain", checked=False):
    _check_common(cache, block_table, scale, out_dtype, layout)
    return cache.new_empty(_paged_shape(cache, block_table, layout), dtype=out_dtype)


def _token_cpu(cache, block_table, cu_seq_lens, token_to_seq, seq_starts, scale, out_dtype, layout="plain",
               checked=False):
    _check_token_call(cache, block_table, cu_seq_lens, token_to_seq, seq_starts, scale, out_dtype, layout, checked)
    return gather_dequant_cache_reference(cache, block_table, cu_seq_lens, token_to_seq, seq_starts, scale,
                                          out_dtype, layout)


def _token_cuda(cache, block_table, cu_seq_lens, token_to_seq, seq_starts, scale, out_dtype, layout="plain",
                checked=False):
    _check_token_call(cache, block_table, cu_seq_lens, token_to_seq, seq_starts, scale, out_dtype, layout, checked)
    _check_cuda(cache, layout)
    out = torch.empty((token_to_seq.shape[0], _d_out(cache, layout)), dtype=out_dtype, device=cache.device)
    return launch_gather_dequant_cache(cache, block_table, cu_seq_lens, token_to_seq, seq_starts, scale, out,
                                       layout, check_out=False)


def _token_fake(cache, block_table, cu_seq_lens, token_to_seq, seq_starts, scale, out_dtype, layout="plain",
                checked=False):
    _check_common(cache, block_table, scale, out_dtype, layout)
    _check_token(cache, block_table, cu_seq_lens, token_to_seq, seq_starts)
    return cache.new_empty((token_to_seq.shape[0], _d_out(cache, layout)), dtype=out_dtype)


_LIB.impl("gather_dequant_cache_paged", _paged_cpu, "CPU")
_LIB.impl("gather_dequant_cache_paged", on_input_device(_paged_cuda), "CUDA")
torch.library.register_fake("fx_mla::gather_dequant_cache_paged", _paged_fake, lib=_LIB)
_LIB.impl("gather_dequant_cache", _token_cpu, "CPU")
_LIB.impl("gather_dequant_cache", on_input_device(_token_cuda), "CUDA")
torch.library.register_fake("fx_mla::gather_dequant_cache", _token_fake, lib=_LIB)


def gather_dequant_cache_paged(cache: torch.Tensor, block_table: torch.Tensor, scale: Optional[torch.Tensor],
                               out_dtype: torch.dtype, layout: str = "plain", checked: bool = False) -> torch.Tensor:
    """Every page of each request: cache[block_table] as [B, max_blocks * block_size, D_out], dequantized."""
    return torch.ops.fx_mla.gather_dequant_cache_paged.default(cache, block_table, scale, out_dtype, layout, checked)


def gather_dequant_cache(cache: torch.Tensor, block_table: torch.Tensor, cu_seq_lens: torch.Tensor,
                         token_to_seq: torch.Tensor, seq_starts: Optional[torch.Tensor],
                         scale: Optional[torch.Tensor], out_dtype: torch.dtype, layout: str = "plain",
                         checked: bool = False) -> torch.Tensor:
    """Token-parallel gather (chunked-prefill context): [token_to_seq.numel(), D_out], dequantized."""
    return torch.ops.fx_mla.gather_dequant_cache.default(cache, block_table, cu_seq_lens, token_to_seq, seq_starts,
                                                         scale, out_dtype, layout, checked)
