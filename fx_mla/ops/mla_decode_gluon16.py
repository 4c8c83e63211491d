"""Launcher of the Hopper Gluon kernel of the memory-bound 16-head MLA decode
(swap-AB wgmma, one CTA per request and split with all 16 heads): by default kernels/mla_decode_gluon16_rs.py (a TMA
ring of raw FP8 tiles, both MMAs with their A operand in registers); kernels/mla_decode_gluon16.py's warp-specialized
producer loading two FP8 tiles ahead (ws8p2, the fallback for caches the TMA boxes cannot address) or cp.async ring.

Same semantics and outputs as ``torch.ops.fx_mla.mla_decode_fp8`` (fx_mla/ops/mla_decode_fp8.py) for the inputs the
kernel covers: bf16/fp16 query, or FP8 with a per-tensor q_scale, [B, 16, 576], FP8 e4m3/e5m2 paged cache
[num_blocks, block_size, 576] with 16-byte aligned rows, kv_lora_rank 512 (rope 64). Writes (out [B, 16, 512],
lse [B, 16] fp32, natural log) into the caller's tensors; splits go through the same workspace (fp32, or bf16
partials under _decode_launch.PARTIAL_BF16) and the same Triton combine kernel as the Triton path.
No host sync (CUDA-graph capturable); bad block ids / lengths are clamped in the kernel, never read out of bounds.

Gluon is imported lazily: this module imports on any Triton (CPU CI runs 3.9); the kernel runs only where
``gluon16_unsupported_reason`` returns None: compute capability exactly (9, 0) and Triton 3.6.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton

from fx_mla.ops._decode_launch import (GLUON_LATENT, GLUON_ROPE, GLUON_TRITON_VERSION, balanced_workspace,
                                       check_launch_args, check_num_splits, combine_balanced, combine_splits,
                                       device_index, fill_empty, gluon_launch_args, gluon_unsupported, no_tokens,
                                       num_splits_for, sm_count)

__all__ = ["launch_mla_decode_gluon16", "gluon16_unsupported_reason", "smem_needed", "GLUON_TRITON_VERSION",
           "HEADS", "BLOCK_N", "NUM_STAGES", "EARLY_READ", "VARIANTS", "VARIANT"]

HEADS = 16          # the wgmma N side (all heads of a request in one CTA)
BLOCK_N = 64        # tokens a tile: the wgmma M side of S^T = K Q^T (one warpgroup)
NUM_WARPS = 4       # one warpgroup
NUM_STAGES = 3      # raw FP8 tiles in the shared-memory ring (NUM_STAGES - 1 in flight during the compute)
EARLY_READ = True  # read the ring while the last P V still runs: 3-5 % faster on 1x H100 (RESULTS.md)
LATENT, ROPE = GLUON_LATENT, GLUON_ROPE
# Kernels: "ring" (the cp.async ring kernel, one warpgroup does everything) and the warp-specialized kernel with a
# 4- or 8-warp producer partition loading FP8 words into registers and converting them into two fp16 tiles ("ws4",
# "ws8": one tile ahead; "ws8p2" / "ws8p3": two / three tiles ahead). On 1x H100 (RESULTS.md) ws4 / ws8 ran 5-6 %
# slower than the ring kernel from HBM but 16-20 % faster with the cache hot in L2 (too few bytes in flight);
# ws8p2 runs 9-12 % faster than the ring kernel from HBM (62-67 % of copy; 70-77 % with LANES "q2x4", session 5) and
# is the default; ws8p3 2-3 % slower.
# "ws8p2o": ws8p2 whose consumer leaves each tile's P V in flight behind the next tile's scores (1x H100, session 4:
# within noise of ws8p2).
# Measured and removed (session 5, RESULTS.md; git history): "dc8" / "dc4", two consumer warpgroups on alternate
# tiles fed by an 8- / 4-warp producer, 9-36 % slower than ws8p2 from HBM (1x H100).
# "rs" (kernels/mla_decode_gluon16_rs.py): TMA of the raw FP8 tile into a ring, both wgmmas with their A operand read
# from it straight into registers (no fp16 tile in shared memory: ~140 instead of ~250 KB of shared-memory traffic a
# 64-token tile); needs block sizes 16, 32 or a multiple of 64 and pages laid out as [block_size, row] slices. The
# default since session 21: on 1x H100 (RESULTS.md) 9 / 16 % less time than ws8p2 (78 / 90 % of the roofline at
# 32 x 16 x 16K / 128 x 16 x 8K against 71 / 76 %); other caches fall back to RS_FALLBACK.
VARIANTS = ("ring", "ws4", "ws8", "ws8p2", "ws8p3", "ws8p2o", "rs")
VARIANT = "rs"
RS_FALLBACK = "ws8p2"  # where VARIANT is "rs" and the rs kernel declines the cache (block size, block strides)
# How a producer warp's lanes cover a tile (kernels/mla_decode_gluon.lat_layout): "1x32" = sessions 2-4 (2-way
# conflicted fp16 tile stores), "8x4" / "q2x4" conflict-free. 1x H100 (RESULTS.md, session 5): "q2x4" 9-11 % faster
# than "1x32", "8x4" 5-7 % slower (twice the L1 wavefronts a load in this memory-bound kernel).
LANES = "q2x4"
RS_STAGES = 4       # "rs": raw FP8 tiles in the TMA ring (36 KB each)
RS_REGS = (232, 40)  # "rs": scorer and loader registers (setmaxnreg); the P V partition gets the rest
RS_DIM_MAJOR_STORE = False  # "rs": the output stored as 16-byte vectors of 16 consecutive dims (off: 4-byte stores
# by rows); off until measured on a GPU (gpu_suite.sh s50 A/Bs both)
# "rs" with the balanced schedule (opt-in, not yet run on a GPU): one CTA an SM, each taking an equal share of all
# requests' tiles laid end to end, so that ragged batches keep every SM busy (the split form cuts every request into
# the same number of splits: CTAs of short requests end early while those of the longest run on). Parts of requests
# go through a [(B + G) x 16, 512] fp32 workspace and _decode_launch.combine_balanced. Batches above
# RS_BALANCED_MAX_BATCH keep the split form (each CTA scans all lengths), as do tables whose B x (tiles a row) reach
# 2**31 (the schedule's int32 tile counts).
RS_BALANCED = False
RS_BALANCED_MAX_BATCH = 4096
# producer warps, producer registers (setmaxnreg), tiles ahead, consumer overlap; all compile without spills
# (Triton 3.6, sm_90)
_WS = {"ws4": (4, 232, 1, False), "ws8": (8, 152, 1, False), "ws8p2": (8, 152, 2, False),
       "ws8p3": (8, 184, 3, False), "ws8p2o": (8, 152, 2, True)}


def smem_needed(num_stages: int = NUM_STAGES, variant: str = "ring") -> int:
    """Shared memory of the compiled kernel (Triton 3.6, sm_90: ring 205,056 bytes at 3 stages, 168,192 at 2;
    ws4 168,228, ws8* 168,232): fp16 query + raw FP8 ring + one fp16 tile + P + 256 bytes of scratch (ring); fp16
    query + two fp16 tiles + P + barriers and scratch (ws)."""
    d = LATENT + ROPE
    if variant == "rs":  # query + TMA ring + two P^T buffers + (alpha, l) + barriers and scratch: 170,760 at 4
        # stages (the Triton 3.6 sm_90 compile takes 170,600)
        return HEADS * d * 2 + RS_STAGES * BLOCK_N * d + 2 * HEADS * BLOCK_N * 2 + 4 * HEADS * 4 + 520
    if variant != "ring":
        return HEADS * d * 2 + 2 * BLOCK_N * d * 2 + HEADS * BLOCK_N * 2 + 296
    return HEADS * d * 2 + num_stages * BLOCK_N * d + BLOCK_N * d * 2 + HEADS * BLOCK_N * 2 + 256


def gluon16_unsupported_reason(q: torch.Tensor, kv_cache: torch.Tensor, kv_lora_rank: int,
                               device: Optional[torch.device] = None, num_stages: int = NUM_STAGES,
                               variant: Optional[str] = None) -> Optional[str]:
    """None when the 16-head Gluon kernel covers these inputs on `device` (default: q's device), else why not (the
    ring kernel copies 16-byte vectors: 16-byte aligned cache rows)."""
    if variant is None:
        variant = _variant_for(kv_cache)  # "rs" only where its TMA boxes can address this cache
    elif variant == "rs":
        reason = _rs_cache_reason(kv_cache)
        if reason is not None:
            return reason
    if variant not in VARIANTS:
        return f"variant must be one of {VARIANTS}, got {variant!r}"
    if num_stages not in (2, 3):
        return f"num_stages must be 2 or 3 (4 exceeds the shared memory), got {num_stages}"
    return gluon_unsupported(q, kv_cache, kv_lora_rank, device, kernel="the Gluon kernel", heads_reason=_heads_reason,
                             row_align=16, smem_needed=smem_needed(num_stages, variant))


def _rs_cache_reason(kv_cache: torch.Tensor) -> Optional[str]:
    """None when the "rs" kernel's TMA boxes can address this cache, else why not."""
    if kv_cache.dim() != 3:
        return None  # gluon_unsupported names the rank
    page = kv_cache.shape[1]
    if not (page in (16, 32) or page % BLOCK_N == 0):
        return f"variant 'rs' takes block sizes 16, 32 or a multiple of {BLOCK_N}, got {page}"
    if kv_cache.shape[0] > 1 and kv_cache.stride(0) != page * kv_cache.stride(1):
        return "variant 'rs' needs the cache's blocks back to back (stride(0) == block_size * stride(1))"
    if kv_cache.shape[0] * page >= 2 ** 31:
        return "variant 'rs' addresses cache rows with 32-bit TMA coordinates"
    return None


def _variant_for(kv_cache: torch.Tensor) -> str:
    """VARIANT, or RS_FALLBACK where VARIANT is "rs" and that kernel cannot address this cache."""
    if VARIANT == "rs" and _rs_cache_reason(kv_cache) is not None:
        return RS_FALLBACK
    return VARIANT


def _heads_reason(heads: int) -> Optional[str]:
    return None if heads == HEADS else f"the head count must be {HEADS}, got {heads}"


def balanced_applies(batch: int, max_blocks: int, block_size: int, balanced: Optional[bool] = None) -> bool:
    """Whether an rs launch takes the balanced schedule: `balanced` (None: RS_BALANCED), at most
    RS_BALANCED_MAX_BATCH requests, and B x (tiles a block-table row) below 2**31 (the schedule counts tiles in
    int32)."""
    return bool(RS_BALANCED if balanced is None else balanced) and batch <= RS_BALANCED_MAX_BATCH \
        and batch * -(-max_blocks * block_size // BLOCK_N) < 2 ** 31


def default_num_splits(batch: int, max_len: int, index: int) -> int:
    """About one CTA per SM (the kernel takes ~200 KB of shared memory: one CTA an SM), at least 4 tiles a split."""
    return num_splits_for(batch, 1, max_len, BLOCK_N, sm_count(index), 1)


def launch_mla_decode_gluon16(q, kv_cache, block_table, seq_lens, k_scale, q_scale, sm_scale, kv_lora_rank, out, lse,
                              num_splits: Optional[int] = None, num_stages: int = NUM_STAGES,
                              early_read: bool = EARLY_READ, poison_workspace: bool = False,
                              variant: Optional[str] = None, checked: bool = False,
                              balanced: Optional[bool] = None):
    """Fill out / lse with the decode attention of q over the paged cache; returns (out, lse).

    num_splits: splits per request (None: default_num_splits). variant: one of VARIANTS (None: VARIANT);
    num_stages / early_read: options of the ring kernel (see the kernel module). poison_workspace fills the split
    workspace with NaN first (tests: every element the combine reads must have been written). B = 0, an empty cache
    or a table without columns: out = 0, lse = -inf without a kernel.
    checked: the caller (torch.ops.fx_mla.mla_decode_fp8) validated the inputs and picked this kernel with its
    support check, so neither runs again here (the op's hot path).
    balanced: the rs kernel's balanced schedule (None: RS_BALANCED; rs only, batches up to RS_BALANCED_MAX_BATCH);
    num_splits is then the CTA count (None: the SM count).
    """
    variant = _variant_for(kv_cache) if variant is None else variant
    if not checked:
        reason = gluon16_unsupported_reason(q, kv_cache, kv_lora_rank, num_stages=num_stages, variant=variant)
        if reason is not None:
            raise ValueError(f"the 16-head Gluon MLA decode kernel does not cover these inputs: {reason}")
        check_launch_args(q, kv_cache, kv_lora_rank, out, lse, block_table, seq_lens, k_scale, q_scale,
                          "the Gluon kernel")
    if no_tokens(q, kv_cache, block_table):  # B = 0, no cache block or no table column: out = 0, lse = -inf
        return fill_empty(out, lse)
    from fx_mla.ops.kernels import mla_decode_gluon16 as kmod  # gluon: Triton 3.6 only

    batch, heads, _ = q.shape
    page = kv_cache.shape[1]
    max_blocks = block_table.shape[1]
    if variant == "rs" and balanced_applies(batch, max_blocks, page, balanced):
        return _launch_rs_balanced(q, kv_cache, block_table, seq_lens, k_scale, q_scale, sm_scale, kv_lora_rank, out,
                                   lse, num_splits, poison_workspace)
    if num_splits is None:
        num_splits = default_num_splits(batch, max_blocks * page, device_index(q.device))
    args, consts, workspace = gluon_launch_args(q, kv_cache, block_table, seq_lens, k_scale, q_scale, sm_scale, out,
                                                lse, num_splits, poison_workspace)
    common = dict(consts, BLOCK_H=HEADS, BLOCK_N=BLOCK_N, ONE_PAGE=page % BLOCK_N == 0, num_warps=NUM_WARPS)
    if variant == "rs":
        kernel = _launch_rs(kv_cache, args, consts, num_splits, batch, page)
    elif variant == "ring":
        kernel = kmod._mla_decode_gluon16_kernel[(num_splits, batch)](
            *args, NUM_STAGES=num_stages, EARLY_READ=bool(early_read), **common)
    else:
        pw, regs, ahead, overlap = _WS[variant]
        kernel = kmod._mla_decode_gluon16_ws_kernel[(num_splits, batch)](
            *args, PRODUCER_WARPS=pw, PRODUCER_REGS=regs, PREFETCH=ahead, OVERLAP=overlap, LANES=str(LANES), **common)
    launch_mla_decode_gluon16.last_kernel = kernel  # the dev script reads its register / spill counts
    combine_splits(*workspace, out, lse, num_splits, kv_lora_rank)
    return out, lse


def _launch_rs(kv_cache, args, consts, num_splits: int, batch: int, page: int, tile_prefix=None):
    """The "rs" kernel: TMA descriptors of the cache seen as [num_blocks * block_size, row] bytes (latent boxes of
    [box, 128] with the 128-byte swizzle, rope boxes [box, 64] with the 64-byte swizzle, box = min(block_size, 64)
    rows), the shared-memory views of kernels/mla_decode_gluon16_rs.views() as constexprs."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from fx_mla.ops.kernels import mla_decode_gluon16_rs as rmod

    box = min(page, BLOCK_N)
    rows = kv_cache.shape[0] * page
    width = LATENT + ROPE
    lat = TensorDescriptor(kv_cache, [rows, width], [kv_cache.stride(1), 1], [box, 128],
                           gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2))
    rope = TensorDescriptor(kv_cache, [rows, width], [kv_cache.stride(1), 1], [box, ROPE],
                            gl.NVMMASharedLayout(swizzle_byte_width=64, element_bitwidth=8, rank=2))
    # (q, lat, rope, block_table, seq_lens, k_scale, q_scale, out, lse, part_o, part_lse, sm_scale, heads, splits,
    #  num_blocks, max_blocks, stride_q_b, stride_q_h, stride_bt_b, stride_o_b, stride_o_h, batch, tile_prefix:
    #  the balanced schedule's [B + 1] int32, written by its CTA 0; unused by the split form, which gets seq_lens)
    balanced = tile_prefix is not None
    rs_args = (args[0], lat, rope) + tuple(args[2:17]) + tuple(args[19:]) + (
        batch, tile_prefix if balanced else args[3])
    scorer_regs, loader_regs = RS_REGS
    grid = (num_splits, ) if balanced else (num_splits, batch)
    return rmod._mla_decode_gluon16_rs_kernel[grid](
        *rs_args, **consts, **_rs_views(), BLOCK_H=HEADS, BLOCK_N=BLOCK_N, NUM_STAGES=RS_STAGES,
        DIM_MAJOR_STORE=bool(RS_DIM_MAJOR_STORE), BALANCED=balanced,
        B_POW2=max(2, triton.next_power_of_2(batch)) if balanced else 1, SCORER_REGS=scorer_regs,
        LOADER_REGS=loader_regs, num_warps=NUM_WARPS)


def _launch_rs_balanced(q, kv_cache, block_table, seq_lens, k_scale, q_scale, sm_scale, kv_lora_rank, out, lse,
                        num_ctas: Optional[int], poison: bool):
    """The rs kernel with the balanced schedule (RS_BALANCED): num_ctas CTAs (None: one an SM), the segment
    workspace, then combine_balanced (which also writes the requests without tokens)."""
    batch = q.shape[0]
    page = kv_cache.shape[1]
    if num_ctas is None:
        num_ctas = sm_count(device_index(q.device))
    check_num_splits(num_ctas)
    args, consts, _ = gluon_launch_args(q, kv_cache, block_table, seq_lens, k_scale, q_scale, sm_scale, out, lse, 1,
                                        poison)
    part_o, part_lse, prefix = balanced_workspace(q, num_ctas, kv_lora_rank, poison)
    args = args[:8] + (part_o, part_lse) + args[10:12] + (num_ctas, ) + args[13:]
    kernel = _launch_rs(kv_cache, args, dict(consts, SINGLE_SPLIT=False), num_ctas, batch, page, prefix)
    launch_mla_decode_gluon16.last_kernel = kernel
    combine_balanced(part_o, part_lse, out, lse, prefix, num_ctas, kv_lora_rank)
    return out, lse


@functools.cache
def _rs_views():
    from fx_mla.ops.kernels import mla_decode_gluon16_rs as rmod
    return rmod.views(BLOCK_N, HEADS, LATENT, ROPE)
