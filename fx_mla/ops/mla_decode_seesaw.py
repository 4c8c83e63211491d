"""Launcher of the Hopper Gluon kernels of the 64-head-group MLA decode: the scorer kernel (the default, VARIANT
"auto"; fx_mla/ops/kernels/mla_decode_scorer.py) and the "seesaw" kernel and its producer form
(fx_mla/ops/kernels/mla_decode_seesaw.py).

Same contract as launch_mla_decode_gluon (fx_mla/ops/mla_decode_gluon.py) without its `variant`: bf16/fp16 query
(or FP8 with its q_scale) [B, H, 576] with H a multiple of 64, FP8 e4m3/e5m2 paged cache [num_blocks, block_size,
576], kv_lora_rank 512; writes out [B, H, 512] and lse [B, H] (fp32, natural log) into the caller's tensors;
splits go through the same split workspace (_decode_launch.gluon_launch_args) and the same Triton combine kernel,
or (the scorer kernel, SCORER_MERGE, merge_plan) are merged inside the scorer kernel itself.
No host sync; bad block ids / lengths are clamped in the kernel.

The kernels differ in their schedules only. The seesaw kernel: two warp-specialized warpgroups on alternating
32-token tiles that exchange row statistics, so one warpgroup's softmax overlaps the other's MMAs (230,732 bytes of
shared memory a block, Triton 3.6, sm_90). The scorer kernel: 64-token tiles, one warpgroup scoring, one helping with
P V, one converting (230,176 bytes). Gluon is imported lazily: this module imports on any Triton.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from fx_mla.ops._decode_launch import (check_launch_args, check_num_splits, combine_splits, device_index, fill_empty,
                                       gluon_launch_args, gluon_unsupported, no_tokens, num_splits_for,
                                       sm_count)
from fx_mla.ops.mla_decode_gluon import _heads_reason

__all__ = ["launch_mla_decode_seesaw", "seesaw_unsupported_reason", "merge_plan", "BLOCK_H", "BLOCK_N", "SMEM_NEEDED",
           "VARIANTS", "VARIANT"]

BLOCK_H = 64         # heads a CTA: the warpgroup MMA height
BLOCK_N = 32         # tokens a tile; a pair (one tile a warpgroup) is 64 tokens, the split granularity
NUM_WARPS = 4        # the default partition (warpgroup 0); the worker partition adds warpgroup 1
WORKER_REGS = 256    # setmaxnreg of the worker: 8 warps x 256 fill the register file (no spills at 255)
# How a converting warp's lanes cover a tile (kernels/mla_decode_gluon.lat_layout): "1x32" = sessions 2-4 (2-way
# conflicted fp16 tile stores), "8x4" / "q2x4" conflict-free. 1x H100 (RESULTS.md, session 5): "q2x4" 11-13 % faster
# than "1x32" on three 128-head shapes, the same on 64 x 128 x 4096 (where "8x4" is 5 % faster).
LANES = "q2x4"
# "seesaw": each warpgroup loads and converts its own tiles; "producer": a third, 4-warp partition loads and converts
# all tiles (kernels/mla_decode_seesaw.py, PRODUCER=True), the warpgroups at PRODUCER_WORKER_REGS registers, the
# producer at PRODUCER_REGS (no spills, Triton 3.6 sm_90). Sessions 6-11 "auto" took the producer form for launches
# of one split a request, the seesaw kernel otherwise (now "auto" is the scorer kernel). 1x H100, session 6
# (RESULTS.md): the producer form 8.6 % faster on 64 x 128 x 4096 (one split), 1.5-2.3 % slower on the three
# 128-head shapes with 4-66 splits. A producer keeping two tiles in flight (176 / 136 registers) was 13-21 % slower
# everywhere and was dropped.
# A 64-token-tile producer form ("tile64", session 7) passed its GPU tests but was 3-16 % slower on the four 128-head
# shapes (1x H100, session 8, RESULTS.md): removed (git history has it).
# "scorer" (session 12): kernels/mla_decode_scorer.py, 64-token tiles, one warpgroup computes all the scores and the
# softmax (and output columns 256..511), a helper warpgroup the other half of P V, a producer the conversions; its
# registers: helper SCORER_HELPER_REGS, producer SCORER_PRODUCER_REGS, the scorer the rest (no spills, Triton 3.6
# sm_90: benchmarks/dev_offline_sm90.py). Its output plan: SCORER_STAGED below. 1x H100 (RESULTS.md,
# session 12): with its late schedule and an L2 prefetch 2 tiles ahead 10-17 % faster than the seesaw kernel / its
# producer form on the four 128-head shapes (1 x 64K 56.5 vs 62.5 us, 8 x 16K 87.4 vs 105.1, 16 x 32K 302.9 vs
# 354.9, 64 x 4K 157.1 vs 188.1). "auto" (default) launches it; "seesaw" / "producer" stay selectable.
VARIANTS = ("auto", "seesaw", "producer", "scorer")
VARIANT = "auto"
PRODUCER_WORKER_REGS, PRODUCER_REGS = 200, 104
SCORER_HELPER_REGS, SCORER_PRODUCER_REGS = 160, 112
# The scorer's producer prefetches the cache rows SCORER_PREFETCH tiles ahead into L2 (cp.async.bulk.prefetch; 0: off;
# only for a 16-byte aligned cache). 1x H100, session 12: with the late schedule 2 tiles ahead -7 to -10 % on the four
# 128-head shapes (without it, in the first schedule, no gain: the producer then waited for buffers, not for memory).
SCORER_PREFETCH = 2
# The scorer's options for its fixed cost (kernels/mla_decode_scorer.py): SCORER_EARLY_Q, the query loaded inside the
# warp-specialized region (under the producer's first tile); SCORER_STAGED, its output through shared memory in whole
# rows: False, True, or "plan" (the seesaw kernel's output_plan: staged for one split, and with bf16 partials for many
# short splits of a bf16 output). 1x H100, session 13 (RESULTS.md): "plan" -4.7 % on 1 x 128 x 65536 (64 splits of
# 16 tiles: staged, bf16 partials) and -3 % on 64 x 128 x 4096 (one split: staged); on 8 x 16K and 16 x 32K (8 / 4
# splits) it launches the same kernel as False. EARLY_Q on top of "plan" (session 13, s30): -2.1 % at 1 x 64K,
# -1.6 % at 8 x 16K, -5.5 % at 2 x 128 x 8192 (32 splits of 4 tiles), even on 16 x 32K and 64 x 4K. Both on.
# A two-warpgroup producer (session 12) was 7-10 % slower on all four shapes (session 13): removed.
SCORER_EARLY_Q = True
SCORER_STAGED = "plan"
# SCORER_PDL: the scorer and its split merge as programmatic dependent launches (sm_90): the scorer's CTAs wait
# (griddepcontrol.wait) for the previous kernel before touching global memory and then let the merge launch early;
# the merge waits for the scorer's grid, then lets the next kernel launch early. Only launch latency and CTA
# scheduling overlap the previous kernel's tail (a decode step's kernels back to back). "early": also, before its
# wait, each CTA prefetches its first tile into L2 by its split range and page ids as read then (L1-bypassing loads,
# used for nothing else; a 16-byte aligned cache only). 1x H100, session 14 (RESULTS.md): its GPU tests pass, but
# True / "early" are 1-4 % slower than False on all four 128-head shapes (a scorer CTA needs nearly all of an SM's
# shared memory, so an early grid cannot start beside the combine's CTAs anyway): off.
# A form "trigger" (only the merge a PDL launch, scheduled as the scorer starts) was 2-3 % slower at B = 1 and ~1.5 %
# at B = 8 (session 15, s37, RESULTS.md) and was removed (git history).
SCORER_PDL = False  # False, True or "early"
# SCORER_MERGE: the split merge inside the scorer kernel instead of the combine kernel after it (kernels/
# mla_decode_scorer.py, MERGE): the grid is launched cooperatively (every CTA co-resident, one an SM), each output
# warpgroup arrives at a grid-wide barrier after its epilogue (an int32 counter zeroed for each launch) and then
# merges its columns of its CTA's share of the heads. Where merge_plan allows (several splits, the grid within one CTA
# an SM, a head's splits in one merge step) and SCORER_PDL is off; elsewhere the combine kernel as before. Aims at
# the combine's ~6-7 us and its kernel boundary at 1 x 128 x 64K (session 14's timelines).
# 1x H100, session 15 (s38, RESULTS.md): its 7 GPU tests pass (against float64 and the combine, ragged and empty
# requests, bf16 / fp16 / fp32 outputs, 4-40 splits; three merging launches in a CUDA graph, 20 replays, bitwise the
# eager launch; three cases at MERGE_MIN_SPLITS' rule, 32-40 splits, were added after the last GPU run and have not
# run on a GPU yet). In the op, against the combine: 1 x 128 x 64K 50.9 / 51.3 against 52.2 / 52.2 us and 51.2 against
# 52.1 (second A/B), 2 x 128 x 32K 51.3 / 51.8 against 53.8 / 54.0 and 51.6 against 53.9; but 8 x 128 x 16K (8
# splits of fp32 partials, two merge steps a CTA) 91.7 / 92.3 against 86.6 / 88.2: hence MERGE_MIN_SPLITS (at 32,
# the second A/B: 4 x 128 x 16K (16 splits) and 8 x 16K as before). On.
SCORER_MERGE = True
MERGE_MIN_SPLITS = 32  # fewer splits a request: the combine kernel (see above)
# SCORER_PROBE: development only (benchmarks/dev_scorer_probe.py), None in the op: an int64 CUDA tensor of at least
# 16 entries a CTA; the scorer kernel then records timestamps at fixed points of each CTA's life into it.
SCORER_PROBE = None
SMEM_NEEDED_SCORER = 230216  # bytes of the compiled scorer kernel, its largest form (Triton 3.6, sm_90; the defaults:
# 230,176, staged one-split launches 230,208)
SMEM_NEEDED_PRODUCER = 230912  # bytes of the compiled producer variant: 8 barriers more (+ STAGED_O's one)
SMEM_NEEDED = 230764  # bytes the compiled kernel uses (Triton 3.6, sm_90): Q, 2 x 2 tiles, P_A, P_B, statistics,
# barriers (STAGED_O's included)
# STAGED_O: the kernel writes the output through shared memory in whole rows (kernels/mla_decode_seesaw._pair_epilogue)
# instead of from the MMA layout (32 bytes of 8 rows a warp store; 16 for a 16-bit output). Nsight Compute of a
# launch with no tokens (1x H100, session 8): 13.3 us against ~2.5 us for a trivial kernel, the L2 its busiest unit.
# Measured (1x H100, session 8, RESULTS.md): 2.2 % faster at 64 x 128 x 4096 (one split, bf16 output), but 7-11 %
# slower on the three shapes with 4-64 splits and fp32 partials (the staged epilogue makes ptxas schedule the loop
# worse). With bf16 partials (half the bytes, written in whole rows) it wins where the loop is short: 1 x 128 x 65536
# (16 pairs a split) -3.3 % (session 8) and, in the producer form, -1.6 % (session 9); with 32 or more pairs a split
# (8 x 128 x 16384, 16 x 128 x 32768) every staged form loses 4-7 %. Session 10 (1x H100, both forced on, against
# both off): it wins only with many splits: 64 splits of 4 / 8 / 16 pairs -8 / -6 / -2 to -3 %, 32 splits of 4 pairs
# -5 %, 32 of 16 even; with fewer splits it is even (16 of 4, 22 of 12) or loses (16 of 16 +7 %, 8 of 16 +3 %), and
# with 32 pairs it loses 1.5-2.5 % even at 32-64 splits.
# "auto" (default, output_plan): staged for one-split launches, and for launches of a bf16 output with at least
# STAGED_MIN_SPLITS splits of at most STAGED_MAX_PAIRS pairs, whose partials are then bf16; True / False: always /
# never (partials as _decode_launch.PARTIAL_BF16 says). A choice from shapes and dtypes only: every rank makes the same.
STAGED_O = "auto"
STAGED_MAX_PAIRS = 16
STAGED_MIN_SPLITS = 32


def output_plan(num_splits: int, capacity: int, out_dtype: torch.dtype):
    """(staged, bf16 partials) of a launch of `num_splits` splits a request (checked) over a block table of
    `capacity` tokens (max_blocks x block_size), into an `out_dtype` output (STAGED_O). A split is at most
    cdiv(cdiv(capacity, 64), num_splits) pairs long. bf16 partials: True, or None for _decode_launch.PARTIAL_BF16's
    choice. Lean (staged, bf16 partials): a bf16 output, >= STAGED_MIN_SPLITS splits, <= STAGED_MAX_PAIRS pairs."""
    check_num_splits(num_splits)
    if STAGED_O != "auto":
        return bool(STAGED_O), None
    if num_splits == 1:
        return True, None
    pairs = triton.cdiv(triton.cdiv(capacity, 2 * BLOCK_N), num_splits)
    lean = out_dtype == torch.bfloat16 and num_splits >= STAGED_MIN_SPLITS and pairs <= STAGED_MAX_PAIRS
    return lean, lean or None


def merge_plan(batch: int, groups: int, num_splits: int, part_bytes: int, num_sms: int) -> Optional[int]:
    """MERGE_ROWS (partial rows a merge step) of the scorer's in-kernel split merge for a launch of batch x groups x
    num_splits CTAs with partials of part_bytes bytes an entry, or None where it does not apply: fewer than
    MERGE_MIN_SPLITS splits (the combine kernel is faster there; one split has nothing to merge), more CTAs than SMs
    (a cooperative grid must be co-resident, and the scorer's shared memory allows one CTA an SM), or more splits than
    one merge step holds (next_power_of_2(num_splits) <= 64 rows of bf16 partials, 32 of fp32: 64 registers a
    thread). Shapes and dtypes only: every rank decides the same."""
    check_num_splits(num_splits)
    if num_splits < MERGE_MIN_SPLITS or batch * groups * num_splits > num_sms:
        return None
    pow2 = triton.next_power_of_2(num_splits)
    rows = max(32, pow2) if part_bytes == 2 else 32
    return rows if pow2 <= min(rows, 64) else None


def seesaw_unsupported_reason(q: torch.Tensor, kv_cache: torch.Tensor, kv_lora_rank: int,
                              device: Optional[torch.device] = None, variant: Optional[str] = None) -> Optional[str]:
    """None when `variant`'s kernel (None: VARIANT) covers these inputs on `device` (default: q's device), else why
    not. Same coverage as the Gluon kernel (capability (9, 0), Triton 3.6, shapes, dtypes); each kernel's own shared
    memory (the scorer's, the least of the three, for "auto")."""
    variant = VARIANT if variant is None else variant
    if variant not in VARIANTS:
        return f"variant must be one of {VARIANTS}, got {variant!r}"
    smem = {"producer": SMEM_NEEDED_PRODUCER, "seesaw": SMEM_NEEDED}.get(variant, SMEM_NEEDED_SCORER)
    return gluon_unsupported(q, kv_cache, kv_lora_rank, device, kernel="the seesaw Gluon kernel",
                             heads_reason=_heads_reason, row_align=4, smem_needed=smem)


def resolved_variant(variant: Optional[str] = None) -> str:
    """The kernel a launch with `variant` (None: VARIANT) runs: "auto" is the scorer kernel."""
    variant = VARIANT if variant is None else variant
    return "scorer" if variant == "auto" else variant


def launch_mla_decode_seesaw(q, kv_cache, block_table, seq_lens, k_scale, q_scale, sm_scale, kv_lora_rank, out,
                             lse, num_splits: Optional[int] = None, poison_workspace: bool = False,
                             one_page: bool = True, checked: bool = False, variant: Optional[str] = None):
    """Fill out / lse with the decode attention of q over the paged cache; returns (out, lse).

    num_splits: splits per request (None: the Triton path's rule with 64-token pairs, about one CTA per SM).
    poison_workspace fills the split workspace with NaN first (tests). one_page: one block-table read a tile
    (applies where block_size % 32 == 0; same numerics).
    checked: the caller (torch.ops.fx_mla.mla_decode_fp8) validated the inputs and picked this kernel with its
    support check, so neither runs again here (the op's hot path).
    variant: one of VARIANTS (None: VARIANT); "auto" is the scorer kernel.
    """
    variant = VARIANT if variant is None else variant
    if not checked:
        reason = seesaw_unsupported_reason(q, kv_cache, kv_lora_rank, variant=variant)
        if reason is not None:
            raise ValueError(f"the seesaw MLA decode kernel does not cover these inputs: {reason}")
        check_launch_args(q, kv_cache, kv_lora_rank, out, lse, block_table, seq_lens, k_scale, q_scale,
                          "the seesaw kernel")
    if no_tokens(q, kv_cache, block_table):  # B = 0, no cache block or no table column: out = 0, lse = -inf
        return fill_empty(out, lse)

    batch, heads, _ = q.shape
    page = kv_cache.shape[1]
    max_blocks = block_table.shape[1]
    groups = heads // BLOCK_H
    if num_splits is None:  # pairs of tiles (64 tokens) are the split granularity
        num_splits = num_splits_for(batch, groups, max_blocks * page, 2 * BLOCK_N, sm_count(device_index(q.device)),
                                    1)
    variant = resolved_variant(variant)
    if variant == "scorer" and SCORER_STAGED != "plan":
        staged, bf16_partials = bool(SCORER_STAGED), None
    else:
        staged, bf16_partials = output_plan(num_splits, max_blocks * page, out.dtype)
    args, consts, workspace = gluon_launch_args(q, kv_cache, block_table, seq_lens, k_scale, q_scale, sm_scale, out,
                                                lse, num_splits, poison_workspace, bf16_partials)
    # ONE_PAGE: the kernels load 32-token tiles (the scorer 32-token halves of its tiles), each in one page
    common = dict(BLOCK_H=BLOCK_H, ONE_PAGE=bool(one_page) and page % BLOCK_N == 0, LANES=str(LANES),
                  num_warps=NUM_WARPS, **consts)
    if variant == "scorer":  # gluon: Triton 3.6 only
        from fx_mla.ops.kernels.mla_decode_scorer import _mla_decode_scorer_kernel as kernel_fn
        aligned = all(v % 16 == 0 for v in (kv_cache.stride(0), kv_cache.stride(1), kv_cache.data_ptr()))
        common.update(TILE=2 * BLOCK_N, HELPER_REGS=SCORER_HELPER_REGS, PRODUCER_REGS=SCORER_PRODUCER_REGS,
                      EARLY_Q=bool(SCORER_EARLY_Q), STAGED=staged, PREFETCH=int(SCORER_PREFETCH) if aligned else 0,
                      # a half tile: 32 rows one row apart in one page (one prefetch)
                      PF_CONTIG=common["ONE_PAGE"] and kv_cache.stride(1) == kv_cache.shape[2])
        if SCORER_PDL:  # sm_90 CUDA already: the scorer's own requirement
            if SCORER_PDL not in (True, "early"):
                raise ValueError(f"SCORER_PDL must be False, True or 'early', got {SCORER_PDL!r}")
            common.update(PDL=True, launch_pdl=True, PDL_EARLY=SCORER_PDL == "early" and common["PREFETCH"] > 0)
        if SCORER_PROBE is not None:
            ctas = groups * num_splits * batch
            probe = SCORER_PROBE
            if probe.dtype != torch.int64 or probe.numel() < 16 * ctas or not probe.is_contiguous() \
                    or probe.device != q.device:
                raise ValueError(f"SCORER_PROBE must be a contiguous int64 tensor on {q.device} of at least "
                                 f"{16 * ctas} entries (16 a CTA), got {probe.dtype} with {probe.numel()} on "
                                 f"{probe.device}{'' if probe.is_contiguous() else ', not contiguous'}")
            common.update(probe_ptr=SCORER_PROBE, PROBE=True)
        if SCORER_MERGE and not SCORER_PDL:
            sms = sm_count(device_index(q.device)) if q.device.type == "cuda" else 132
            rows = merge_plan(batch, groups, num_splits, workspace[0].element_size(), sms)
            if rows is not None:  # the counter: zeroed for this launch (a memset in a captured graph)
                common.update(merge_ctr_ptr=torch.zeros(1, dtype=torch.int32, device=q.device), MERGE=True,
                              SPLITS_POW2=triton.next_power_of_2(num_splits), MERGE_ROWS=rows,
                              launch_cooperative_grid=True)
    else:
        from fx_mla.ops.kernels.mla_decode_seesaw import _mla_decode_seesaw_kernel as kernel_fn
        common.update(BLOCK_N=BLOCK_N, STAGED_O=staged)
        if variant == "producer":
            common.update(WORKER_REGS=PRODUCER_WORKER_REGS, PRODUCER=True, PRODUCER_REGS=PRODUCER_REGS)
        else:
            common.update(WORKER_REGS=WORKER_REGS)
    kernel = kernel_fn[(groups, num_splits, batch)](*args, **common)
    launch_mla_decode_seesaw.last_kernel = kernel  # the dev script reads its register / spill counts
    if common.get("MERGE"):  # the scorer merged its splits itself
        return out, lse
    # the combine waits for a PDL scorer's grid as a PDL launch itself (None: COMBINE_PDL)
    combine_splits(*workspace, out, lse, num_splits, kv_lora_rank, pdl=True if common.get("PDL") else None)
    return out, lse
