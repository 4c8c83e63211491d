"""Launcher of the Hopper Gluon kernel of the MLA decode (fx_mla/ops/kernels/mla_decode_gluon.py).

Same semantics and outputs as ``torch.ops.fx_mla.mla_decode_fp8`` (fx_mla/ops/mla_decode_fp8.py) for the shapes the
kernel covers: bf16/fp16 query (or FP8 with its q_scale) [B, H, 576] with H a multiple of 64, FP8 e4m3/e5m2 paged
cache [num_blocks, block_size, 576], kv_lora_rank 512 (rope 64). Writes (out [B, H, 512], lse [B, H] fp32,
natural log) into the caller's tensors; splits go through the same split workspace and Triton combine kernel as the
Triton path.
No host sync (CUDA-graph capturable); bad block ids / lengths are clamped in the kernel, never read out of bounds.

Gluon is imported lazily: this module imports on any Triton (CPU CI runs 3.9), and the kernel only runs where
``gluon_unsupported_reason`` returns None: compute capability exactly (9, 0) and Triton 3.6 (the only version the
kernel is validated on; Gluon's API changes between releases).
"""
from __future__ import annotations

from typing import Optional

import torch

from fx_mla.ops._decode_launch import (GLUON_TRITON_VERSION, check_launch_args, combine_splits, device_index,
                                       fill_empty, gluon_launch_args, gluon_unsupported, no_tokens, num_splits_for,
                                       sm_count)

__all__ = ["launch_mla_decode_gluon", "gluon_unsupported_reason", "GLUON_TRITON_VERSION", "BLOCK_H", "BLOCK_N"]

BLOCK_H = 64        # heads a CTA: the warpgroup MMA height
BLOCK_N = 64        # tokens a tile (double-buffered fp16 tiles + the query fill 225 KiB of shared memory)
NUM_WARPS = 8       # two warpgroups: token halves of QK^T, column halves of PV
SMEM_NEEDED = 225 * 1024  # the compiled kernel uses 229,888 bytes (Triton 3.6, sm_90)
# Kernel variants (round 2, issue 6), all compiled for sm_90 without spills; the default stays the round-1 kernel
# until a device run (benchmarks/dev_gluon_decode.py --variants) shows a variant correct and faster.
#   one_page:     a 64-token tile of a block_size % 64 == 0 cache is one page: one block-table read a tile and
#                 contiguous rows (the loop body shrinks from 826 to 722 instructions a thread); same numerics.
#   trim_barrier: drops the barrier before P is rewritten (the row-max reduction already synchronised); same
#                 numerics.
#   lazy_rescale: keeps the running max until a tile's max passes it by 2**8, skipping the 128-register rescale
#                 of the accumulator on most tiles; the same softmax, rounded differently.
VARIANT_FLAGS = ("one_page", "trim_barrier", "lazy_rescale")
DEFAULT_VARIANT = dict(one_page=True, trim_barrier=True, lazy_rescale=False)  # fastest on 1x H100 (RESULTS.md)


def gluon_unsupported_reason(q: torch.Tensor, kv_cache: torch.Tensor, kv_lora_rank: int,
                             device: Optional[torch.device] = None) -> Optional[str]:
    """None when the Gluon kernel covers these inputs on `device` (default: q's device), else why not (the kernel
    loads cache rows as 32-bit words: 4-byte alignment)."""
    return gluon_unsupported(q, kv_cache, kv_lora_rank, device, kernel="the Gluon kernel", heads_reason=_heads_reason,
                             row_align=4, smem_needed=SMEM_NEEDED)


def _heads_reason(heads: int) -> Optional[str]:
    if heads % BLOCK_H != 0 or heads == 0:
        return f"the head count must be a positive multiple of {BLOCK_H}, got {heads}"
    return None


def launch_mla_decode_gluon(q, kv_cache, block_table, seq_lens, k_scale, q_scale, sm_scale, kv_lora_rank, out, lse,
                            num_splits: Optional[int] = None, poison_workspace: bool = False,
                            variant: Optional[dict] = None, checked: bool = False):
    """Fill out / lse with the decode attention of q over the paged cache; returns (out, lse).

    num_splits: splits per request (None: the Triton path's rule, about one CTA per SM). poison_workspace fills
    the split workspace with NaN first (tests: every element the combine reads must have been written).
    variant: kernel flags (VARIANT_FLAGS) overriding DEFAULT_VARIANT; one_page applies only where
    block_size % BLOCK_N == 0.
    checked: the caller (torch.ops.fx_mla.mla_decode_fp8) validated the inputs and picked this kernel with its
    support check, so neither runs again here (the op's hot path).
    """
    if not checked:
        reason = gluon_unsupported_reason(q, kv_cache, kv_lora_rank)
        if reason is not None:
            raise ValueError(f"the Gluon MLA decode kernel does not cover these inputs: {reason}")
        check_launch_args(q, kv_cache, kv_lora_rank, out, lse, block_table, seq_lens, k_scale, q_scale,
                          "the Gluon kernel")
    flags = dict(DEFAULT_VARIANT)
    if variant:
        unknown = sorted(set(variant) - set(VARIANT_FLAGS))
        if unknown:
            raise ValueError(f"variant: unknown flags {unknown}, expected some of {VARIANT_FLAGS}")
        flags.update({k: bool(v) for k, v in variant.items()})
    if no_tokens(q, kv_cache, block_table):  # B = 0, no cache block or no table column: out = 0, lse = -inf
        return fill_empty(out, lse)
    from fx_mla.ops.kernels.mla_decode_gluon import _mla_decode_gluon_kernel  # gluon: Triton 3.6 only

    batch, heads, _ = q.shape
    page = kv_cache.shape[1]
    max_blocks = block_table.shape[1]
    groups = heads // BLOCK_H
    if num_splits is None:
        num_splits = num_splits_for(batch, groups, max_blocks * page, BLOCK_N, sm_count(device_index(q.device)), 1)
    args, consts, workspace = gluon_launch_args(q, kv_cache, block_table, seq_lens, k_scale, q_scale, sm_scale, out,
                                                lse, num_splits, poison_workspace)
    kernel = _mla_decode_gluon_kernel[(groups, num_splits, batch)](
        *args, BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, ONE_PAGE=flags["one_page"] and page % BLOCK_N == 0,
        TRIM_BARRIER=flags["trim_barrier"], LAZY_RESCALE=flags["lazy_rescale"], num_warps=NUM_WARPS, **consts)
    launch_mla_decode_gluon.last_kernel = kernel  # the dev script reads its register / spill counts
    combine_splits(*workspace, out, lse, num_splits, kv_lora_rank)
    return out, lse
