"""Gluon (Hopper, sm_90) kernel of the 64-heads-per-CTA MLA decode: split-K over a paged FP8 (e4m3/e5m2) cache.

Import this module only where triton.experimental.gluon is the validated Triton 3.6 version (the launcher in
fx_mla/ops/mla_decode_gluon.py imports it lazily, after gluon_unsupported_reason returned None).

One CTA per (64-head group, split, request), 8 warps = two warpgroups, BLOCK_N tokens per tile. Same numerics as
the Triton kernel of fx_mla/ops/kernels/mla_decode_fp8.py (its docstring): a bf16 query is scaled by 2**-Q_SHIFT
and rounded to fp16 as it is loaded (an fp16 query is used as is, an FP8 query converts to fp16 exactly and its
q_scale joins the score scale); the FP8 cache is converted to fp16 exactly; k_scale and 2**Q_SHIFT are folded
into the base-2 score scale and k_scale into the output; online softmax in fp32; the same (o, lse) outputs
and split workspace, so the Triton combine kernel merges the splits.

Work split (the reason this kernel exists; plain Triton gives both warpgroups the same 64 rows of QK^T):
* S = Q K^T [64 heads, BLOCK_N tokens]: accumulator layout warps [4, 2], so warpgroup w computes the scores of
  tokens [w*BLOCK_N/2, (w+1)*BLOCK_N/2) over the whole 576-wide reduction; no product is computed twice. Q
  (fp16, [64, 512] + [64, 64]) stays in shared memory for the whole CTA.
* Row max / sum of the online softmax combine the two warpgroups' halves (a small cross-warp reduction).
* O += P V [64, 512]: warps [4, 2] again, so warpgroup w owns output columns [256w, 256w + 256) (128 fp32
  registers a thread); P goes through shared memory (64 x BLOCK_N fp16) because both warpgroups need all of it.
* The cache tile is loaded into registers one tile ahead (FP8: BLOCK_N * 576 / 256 bytes a thread), converted to
  fp16 and stored into one of two shared-memory buffers while the tensor cores run P V of the previous tile,
  then S of the new tile is issued; both are waited for together.
* Sequence lengths are clamped to the block-table row, page ids to the cache: bad metadata can give wrong
  numbers, never an out-of-bounds read. Tokens past the split's end are loaded as 0 and masked to -inf.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

RESCALE_LOG2 = gl.constexpr(8.0)  # LAZY_RESCALE: how far (base 2) a new row max may pass the kept one


@gluon.constexpr_function
def lat_layout(lanes, warps, rows):
    """Register layout of a tile's latent words [rows, L / 4] (16 bytes, four words, a thread along the row) as the
    loaders of a group of `warps` warps hold them before the FP8 -> fp16 store into a 128-byte-swizzled tile, where a
    thread's 16 fp16 entries are two 16-byte chunks of one 128-byte swizzle row, the 8 swizzle columns of a tile row
    lie 8 KB apart (the same banks), and a 16-byte shared store is served a quarter warp (8 lanes) at a time: it is
    conflict-free when each 8 consecutive lanes hit 8 different chunk positions. `lanes`, a warp's lanes:
    "1x32": one row (512-byte loads); a quarter warp writes 2 swizzle columns of one row: 2-way conflicts on every
            conversion store (Nsight Compute, 1x H100: 8.5-8.9 wavefronts a store request, a third of all shared-store
            wavefronts, in the seesaw and gluon16 kernels);
    "2x16": 2 rows x 16 lanes, blocked (256-byte loads); a quarter warp still lies in one row: as "1x32" by the
            quarter-warp rule (tests/ops/test_lat_layout.py models it; not timed on a GPU);
    "8x4":  8 rows x 4 lanes (64-byte loads): a quarter warp = 2 rows of one swizzle column, conflict-free, but a
            load touches 8 cache lines (twice the L1 wavefronts);
    "q2x4": 2 rows x 16 lanes (256-byte loads) with lane bit 2 selecting the row, so each quarter warp is 2 rows x 4
            lanes of one swizzle column: conflict-free stores and 256-byte loads (a linear layout)."""
    lanes = getattr(lanes, "value", lanes)
    warps = getattr(warps, "value", warps)
    rows = getattr(rows, "value", rows)
    if lanes == "8x4":
        return gl.BlockedLayout([1, 4], [8, 4], [max(warps // 4, 1), min(warps, 4)], [1, 0])
    if lanes == "2x16":
        return gl.BlockedLayout([1, 4], [2, 16], [warps, 1], [1, 0])
    if lanes == "q2x4":
        # [rows, 128 words]: registers = 4 words, the second 64-word half, then further row blocks; lanes (bits 0, 1,
        # 3, 4) along the row in 4-word steps and bit 2 across two rows; warps down the rows
        assert rows % (2 * warps) == 0, "q2x4: rows must be a multiple of 2 x warps"
        warp_bases = [[2 << k, 0] for k in range(warps.bit_length() - 1)]
        row_regs = [[2 * warps << k, 0] for k in range((rows // (2 * warps)).bit_length() - 1)]
        return gl.DistributedLinearLayout(reg_bases=[[0, 1], [0, 2], [0, 64]] + row_regs,
                                          lane_bases=[[0, 4], [0, 8], [1, 0], [0, 16], [0, 32]],
                                          warp_bases=warp_bases, block_bases=[], shape=[rows, 128])
    return gl.BlockedLayout([1, 4], [1, 32], [warps, 1], [1, 0])


@gluon.jit
def _load_words(kv_words, bt_row, n0, end, num_blocks, blk_words, tok_words, col0,
                PAGE: gl.constexpr, ROWS: gl.constexpr, WORDS: gl.constexpr, LAYOUT: gl.constexpr,
                ONE_PAGE: gl.constexpr):
    """32-bit words [col0, col0 + WORDS) of the cache rows of tokens [n0, n0 + ROWS) (four FP8 entries a word, as
    stored); tokens at or past `end` are 0 and cost no memory traffic; page ids are clamped into the cache.
    Words, not FP8 elements: a tile held in registers across the loop then takes one register per four entries
    (a loop-carried FP8 tensor becomes one 16-bit register per entry).
    ONE_PAGE: the rows lie in one page (PAGE % BLOCK_N == 0, tiles start at multiples of BLOCK_N), so one
    block-table entry (read only when n0 < end, i.e. inside the row) and contiguous rows: far less address math."""
    rows, ok = _row_words(bt_row, n0, end, num_blocks, blk_words, tok_words, col0, PAGE, ROWS, LAYOUT, ONE_PAGE)
    offs = gl.arange(0, WORDS, layout=gl.SliceLayout(0, LAYOUT))
    return gl.load(kv_words + rows[:, None] + offs[None, :], mask=ok[:, None], other=0)


@gluon.jit
def _row_words(bt_row, n0, end, num_blocks, blk_words, tok_words, col0,
               PAGE: gl.constexpr, ROWS: gl.constexpr, LAYOUT: gl.constexpr, ONE_PAGE: gl.constexpr):
    """(word offset of column word col0 in the cache row of each token in [n0, n0 + ROWS), the mask of tokens
    before `end`), as LAYOUT's row slice. Page ids are clamped into the cache (a masked row reads page 0)."""
    r = gl.arange(0, ROWS, layout=gl.SliceLayout(1, LAYOUT))
    pos = n0 + r
    ok = pos < end
    if ONE_PAGE:
        page = gl.load(bt_row + n0 // PAGE, mask=n0 < end, other=0)
        page = gl.minimum(gl.maximum(page, 0), num_blocks - 1)
        rows = page.to(gl.int64) * blk_words + ((n0 % PAGE) * tok_words + col0) + r * tok_words
    else:
        page = gl.load(bt_row + pos // PAGE, mask=ok, other=0)
        page = gl.minimum(gl.maximum(page, 0), num_blocks - 1)
        rows = page.to(gl.int64) * blk_words + (pos % PAGE) * tok_words + col0
    return rows, ok


@gluon.jit
def _load_tile(kv_words, bt_row, n0, end, num_blocks, blk_words, tok_words,
               PAGE: gl.constexpr, L: gl.constexpr, R: gl.constexpr, SUB: gl.constexpr,
               LAT_LAYOUT: gl.constexpr, ROPE_LAYOUT: gl.constexpr, ONE_PAGE: gl.constexpr):
    """A 4 * SUB-token tile as four latent row blocks [SUB, L / 4] and the rope part [4 * SUB, R / 4] of words:
    converted and stored one block at a time, so the fp16 copy of the whole tile never sits in registers."""
    lat0 = _load_words(kv_words, bt_row, n0, end, num_blocks, blk_words, tok_words, 0,
                       PAGE, SUB, L // 4, LAT_LAYOUT, ONE_PAGE)
    lat1 = _load_words(kv_words, bt_row, n0 + SUB, end, num_blocks, blk_words, tok_words, 0,
                       PAGE, SUB, L // 4, LAT_LAYOUT, ONE_PAGE)
    lat2 = _load_words(kv_words, bt_row, n0 + 2 * SUB, end, num_blocks, blk_words, tok_words, 0,
                       PAGE, SUB, L // 4, LAT_LAYOUT, ONE_PAGE)
    lat3 = _load_words(kv_words, bt_row, n0 + 3 * SUB, end, num_blocks, blk_words, tok_words, 0,
                       PAGE, SUB, L // 4, LAT_LAYOUT, ONE_PAGE)
    rope = _load_words(kv_words, bt_row, n0, end, num_blocks, blk_words, tok_words, L // 4,
                       PAGE, 4 * SUB, R // 4, ROPE_LAYOUT, ONE_PAGE)
    return lat0, lat1, lat2, lat3, rope


@gluon.jit
def _fp8_words_to_fp16_words(words, E5M2: gl.constexpr):
    """[M, W] words of four FP8 entries -> [M, 2W] words of two fp16 entries, same order (exact conversions:
    cvt.rn.f16x2.e4m3x2 / e5m2x2 take the low byte of a 16-bit pair into the low half)."""
    if E5M2:
        asm: gl.constexpr = ("{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; "
                             "cvt.rn.f16x2.e5m2x2 $0, lo; cvt.rn.f16x2.e5m2x2 $1, hi; }")
    else:
        asm: gl.constexpr = ("{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; "
                             "cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }")
    lo, hi = gl.inline_asm_elementwise(asm, "=r,=r,r", [words], dtype=(gl.int32, gl.int32), is_pure=True, pack=1)
    return gl.reshape(gl.join(lo, hi), [words.shape[0], 2 * words.shape[1]])


@gluon.jit
def _store_tile(tile, k_nope_words, k_pe_words, SUB: gl.constexpr, E5M2: gl.constexpr):
    """FP8 -> fp16 into the tile's shared-memory buffers (viewed as words of two fp16 entries)."""
    lat0, lat1, lat2, lat3, rope = tile
    k_nope_words.slice(0, SUB).store(_fp8_words_to_fp16_words(lat0, E5M2))
    k_nope_words.slice(SUB, SUB).store(_fp8_words_to_fp16_words(lat1, E5M2))
    k_nope_words.slice(2 * SUB, SUB).store(_fp8_words_to_fp16_words(lat2, E5M2))
    k_nope_words.slice(3 * SUB, SUB).store(_fp8_words_to_fp16_words(lat3, E5M2))
    k_pe_words.store(_fp8_words_to_fp16_words(rope, E5M2))


@gluon.jit
def _to_mma_dtype(q, Q_SHIFT: gl.constexpr):
    """The query as the fp16 MMA operand: a bf16 query times 2**-Q_SHIFT (exact) rounded to fp16; an fp16 query as
    is; an FP8 query (e4m3 / e5m2, Q_SHIFT 0) converts to fp16 exactly (its scale goes into the score scale)."""
    if Q_SHIFT > 0:
        return (q.to(gl.float32) * (1.0 / (1 << Q_SHIFT))).to(gl.float16)
    return q.to(gl.float16)


@gluon.jit
def _perm_k(k):
    """The 16-head "rs" kernel's reduction order: column k holds byte _perm_k(k) of a latent / rope row. Bits
    (k0, k3, k4, k5, k1, k2, k6, k7, k8) of k become bits 0..8 of the byte, so a thread's k-step entries k0, k3 and
    its four k-steps k4, k5 lie in 16 consecutive bytes and its lane bits k1, k2 pick the 16-byte group. Also run on
    ints (`_perm_k.fn`, kernels/mla_decode_gluon16_rs.perm_k) to build that kernel's shared-memory views."""
    return (k & ~63) | (((k >> 1) & 3) << 4) | (((k >> 4) & 3) << 2) | (((k >> 3) & 1) << 1) | (k & 1)


@gluon.jit
def _query_tiles(q_ptr, pid_b, head0, stride_q_b, stride_q_h, L: gl.constexpr, R: gl.constexpr,
                 BLOCK_H: gl.constexpr, Q_SHIFT: gl.constexpr, NUM_WARPS: gl.constexpr, PERM_K: gl.constexpr = False):
    """Heads [head0, head0 + BLOCK_H) of request pid_b as the fp16 MMA operands: latent [BLOCK_H, L] and rope
    [BLOCK_H, R] (16 bytes a thread along the row), for the callers' shared memory. PERM_K: columns in the "rs"
    kernel's order (column k = dim _perm_k(k) of the latent, of the rope)."""
    Q_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [NUM_WARPS, 1], [1, 0])
    ROPE_Q_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NUM_WARPS, 1], [1, 0])
    heads = head0 + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, Q_LAYOUT))
    q_rows = q_ptr + pid_b * stride_q_b + heads.to(gl.int64) * stride_q_h
    offs_ql = gl.arange(0, L, layout=gl.SliceLayout(0, Q_LAYOUT))
    if PERM_K:
        offs_ql = _perm_k(offs_ql)
    q_nope = _to_mma_dtype(gl.load(q_rows[:, None] + offs_ql[None, :]), Q_SHIFT)
    heads_r = head0 + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, ROPE_Q_LAYOUT))
    q_rows_r = q_ptr + pid_b * stride_q_b + heads_r.to(gl.int64) * stride_q_h
    offs_qr = gl.arange(0, R, layout=gl.SliceLayout(0, ROPE_Q_LAYOUT))
    if PERM_K:
        offs_qr = _perm_k(offs_qr)
    q_pe = _to_mma_dtype(gl.load(q_rows_r[:, None] + L + offs_qr[None, :]), Q_SHIFT)
    return q_nope, q_pe


@gluon.jit
def _score_scale(sm_scale, k_scale_ptr, q_scale_ptr, Q_SHIFT: gl.constexpr, HAS_Q_SCALE: gl.constexpr):
    """(k_scale, the one fp32 factor of a score in base 2): sm_scale * log2(e) * k_scale * 2**Q_SHIFT, times q_scale
    for an FP8 query (loaded as fp16 exactly, its per-tensor scale goes into the scores' scale)."""
    k_scale = gl.load(k_scale_ptr)
    qk_scale = sm_scale * 1.4426950408889634 * k_scale * (1 << Q_SHIFT)
    if HAS_Q_SCALE:
        qk_scale = qk_scale * gl.load(q_scale_ptr)
    return k_scale, qk_scale


@gluon.jit
def _split_range(seq_lens_ptr, pid_b, pid_s, num_splits, max_blocks, PAGE: gl.constexpr, GRAIN: gl.constexpr,
                 CG: gl.constexpr = False):
    """Tokens [start, end) of split pid_s of request pid_b: chunks of whole GRAIN-token units; the split length
    follows the request's own length (no host sync), clamped to the block-table row. CG: the seq_lens load bypasses
    L1 (a read before a PDL wait)."""
    seq_len = gl.load(seq_lens_ptr + pid_b, cache_modifier=".cg" if CG else "").to(gl.int32)
    seq_len = gl.minimum(gl.maximum(seq_len, 0), max_blocks * PAGE)
    chunk = gl.cdiv(gl.cdiv(seq_len, num_splits), GRAIN) * GRAIN
    start = pid_s * chunk
    return start, gl.minimum(start + chunk, seq_len)


@gluon.jit
def _cta_work(sm_scale, k_scale_ptr, q_scale_ptr, seq_lens_ptr, block_table_ptr, out_ptr, lse_ptr, part_o_ptr,
              part_lse_ptr, pid_b, pid_s, num_heads, num_splits, max_blocks, stride_bt_b, stride_o_b, stride_o_h,
              PAGE: gl.constexpr, L: gl.constexpr, BLOCK_N: gl.constexpr, Q_SHIFT: gl.constexpr,
              HAS_Q_SCALE: gl.constexpr, SINGLE_SPLIT: gl.constexpr):
    """What a CTA with all heads of request pid_b, split pid_s works on: (k_scale, qk_scale, start, end, bt_row,
    o_base, o_stride, lse_base) from _score_scale, _split_range and _output_rows."""
    k_scale, qk_scale = _score_scale(sm_scale, k_scale_ptr, q_scale_ptr, Q_SHIFT, HAS_Q_SCALE)
    start, end = _split_range(seq_lens_ptr, pid_b, pid_s, num_splits, max_blocks, PAGE, BLOCK_N)
    bt_row = block_table_ptr + pid_b * stride_bt_b
    o_base, o_stride, lse_base = _output_rows(out_ptr, lse_ptr, part_o_ptr, part_lse_ptr, pid_b, pid_s, 0, num_heads,
                                              num_splits, stride_o_b, stride_o_h, L, SINGLE_SPLIT)
    return k_scale, qk_scale, start, end, bt_row, o_base, o_stride, lse_base


@gluon.jit
def _output_rows(out_ptr, lse_ptr, part_o_ptr, part_lse_ptr, pid_b, pid_s, head0, num_heads, num_splits,
                 stride_o_b, stride_o_h, L: gl.constexpr, SINGLE_SPLIT: gl.constexpr):
    """(o_base, o_stride, lse_base): where a CTA of request pid_b, split pid_s writes the rows of heads head0.. of its
    (o, lse): straight into out / lse for a single split, else into the split workspace (rows of L fp32)."""
    if SINGLE_SPLIT:
        o_base = out_ptr + pid_b * stride_o_b + head0 * stride_o_h
        o_stride = stride_o_h
        lse_base = lse_ptr + pid_b * num_heads + head0
    else:
        row0 = (pid_b * num_splits + pid_s) * num_heads + head0
        o_base = part_o_ptr + row0 * L
        o_stride = L
        lse_base = part_lse_ptr + row0
    return o_base, o_stride, lse_base


@gluon.jit
def _mla_decode_gluon_kernel(
        q_ptr, kv_ptr, block_table_ptr, seq_lens_ptr, k_scale_ptr, q_scale_ptr,
        out_ptr, lse_ptr, part_o_ptr, part_lse_ptr,
        sm_scale, num_heads, num_splits, num_blocks, max_blocks,
        stride_q_b, stride_q_h, blk_words, tok_words, stride_bt_b, stride_o_b, stride_o_h,
        PAGE: gl.constexpr, L: gl.constexpr, R: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr,
        Q_SHIFT: gl.constexpr, HAS_Q_SCALE: gl.constexpr, E5M2: gl.constexpr, SINGLE_SPLIT: gl.constexpr,
        ONE_PAGE: gl.constexpr, TRIM_BARRIER: gl.constexpr, LAZY_RESCALE: gl.constexpr, num_warps: gl.constexpr):
    gl.static_assert(num_warps == 8, "two warpgroups")
    gl.static_assert(BLOCK_H == 64, "one warpgroup MMA height")
    gl.static_assert(BLOCK_N % 4 == 0, "tiles load as four row blocks")
    gl.static_assert((not ONE_PAGE) or PAGE % BLOCK_N == 0, "ONE_PAGE: a tile lies in one page")
    SUB: gl.constexpr = BLOCK_N // 4
    pid_g = gl.program_id(0)  # head group varies fastest: the groups of one tile run side by side and share L2
    pid_s = gl.program_id(1)
    pid_b = gl.program_id(2).to(gl.int64)

    # ---- layouts (hardware-specific choices live here)
    # Scores: warpgroup w takes the tokens [w*BLOCK_N/2, (w+1)*BLOCK_N/2) of the tile, all 64 heads.
    S_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                       instr_shape=[16, BLOCK_N // 2, 16])
    # Output: warpgroup w owns latent columns [w*L/2, (w+1)*L/2): the widest wgmma (n = 256).
    O_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                       instr_shape=[16, L // 2, 16])
    # Global loads: 16 consecutive bytes a thread (one 128-bit load) along the row; the cache as 32-bit words.
    LAT_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [num_warps, 1], [1, 0])   # [SUB, L / 4]
    ROPE_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [num_warps, 1], [1, 0])   # [BLOCK_N, R / 4]
    # 128-byte swizzle (rows of 128 B or more): the fp16 tiles the MMAs read, and the same bytes seen as words
    # of two fp16 entries for the converted cache stores (the swizzle is defined on bytes, so both views agree).
    SMEM_LAT: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    SMEM_ROPE: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    SMEM_WORDS: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)
    SMEM_P: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, BLOCK_N], gl.float16)

    # ---- query tile (fp16, bf16 scaled by 2**-Q_SHIFT) into shared memory, once
    q_nope, q_pe = _query_tiles(q_ptr, pid_b, pid_g * BLOCK_H, stride_q_b, stride_q_h, L, R, BLOCK_H, Q_SHIFT,
                                num_warps)
    q_nope_smem = gl.allocate_shared_memory(gl.float16, [BLOCK_H, L], SMEM_LAT, q_nope)
    q_pe_smem = gl.allocate_shared_memory(gl.float16, [BLOCK_H, R], SMEM_ROPE, q_pe)
    # Two fp16 cache-tile buffers (tile j is read by P V while tile j+1 is written) and the P tile.
    k_nope_smem = gl.allocate_shared_memory(gl.float16, [2, BLOCK_N, L], SMEM_LAT)
    k_pe_smem = gl.allocate_shared_memory(gl.float16, [2, BLOCK_N, R], SMEM_ROPE)
    p_smem = gl.allocate_shared_memory(gl.float16, [BLOCK_H, BLOCK_N], SMEM_P)
    k_nope_words = k_nope_smem._reinterpret(gl.int32, [2, BLOCK_N, L // 2], SMEM_WORDS)
    k_pe_words = k_pe_smem._reinterpret(gl.int32, [2, BLOCK_N, R // 2], SMEM_WORDS)
    kv_words = kv_ptr.to(gl.pointer_type(gl.int32), bitcast=True)

    # Everything that scales a score goes into one fp32 factor (base-2 exponent); this split's token range.
    k_scale, qk_scale = _score_scale(sm_scale, k_scale_ptr, q_scale_ptr, Q_SHIFT, HAS_Q_SCALE)
    start, end = _split_range(seq_lens_ptr, pid_b, pid_s, num_splits, max_blocks, PAGE, BLOCK_N)
    bt_row = block_table_ptr + pid_b * stride_bt_b

    # ---- prologue: tile 0 converted into buffer 0, its scores issued; tile 1 in flight to registers
    tile = _load_tile(kv_words, bt_row, start, end, num_blocks, blk_words, tok_words,
                      PAGE, L, R, SUB, LAT_LAYOUT, ROPE_LAYOUT, ONE_PAGE)
    _store_tile(tile, k_nope_words.index(0), k_pe_words.index(0), SUB, E5M2)
    tile = _load_tile(kv_words, bt_row, start + BLOCK_N, end, num_blocks, blk_words, tok_words,
                      PAGE, L, R, SUB, LAT_LAYOUT, ROPE_LAYOUT, ONE_PAGE)
    fence_async_shared()
    gl.thread_barrier()
    s = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, S_LAYOUT)
    s = warpgroup_mma(q_nope_smem, k_nope_smem.index(0).permute((1, 0)), s, use_acc=False, is_async=True)
    s = warpgroup_mma(q_pe_smem, k_pe_smem.index(0).permute((1, 0)), s, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s, ))

    m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, gl.SliceLayout(1, S_LAYOUT))
    l_i = gl.zeros([BLOCK_H], gl.float32, gl.SliceLayout(1, S_LAYOUT))
    acc = gl.zeros([BLOCK_H, L], gl.float32, O_LAYOUT)
    offs_sn = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_LAYOUT))
    buf = 0
    for n0 in range(start, end, BLOCK_N):
        # ---- online softmax of tile n0 (scores s, cache rows in buffer `buf`)
        s = gl.where((n0 + offs_sn < end)[None, :], s * qk_scale, float("-inf"))
        # The tile's first token is always valid, so the row maxima are finite and exp2(-inf - m) = 0.
        m_tile = gl.max(s, 1)
        if LAZY_RESCALE:
            # Keep the running max m_i (so p <= 2**RESCALE_LOG2 stays far inside fp16) until a row's tile max
            # exceeds it by more than RESCALE_LOG2: most tiles then skip the 128-register rescale of acc. The
            # result is the same softmax (o = acc / l, lse = m + log2 l hold for any reference m), rounded
            # differently. The test is CTA-uniform: both warpgroups hold every row.
            if gl.max((m_tile > m_i + RESCALE_LOG2).to(gl.int32), 0) > 0:
                m_new = gl.maximum(m_i, m_tile)
                alpha = gl.exp2(m_i - m_new)
                l_i = l_i * alpha
                acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, O_LAYOUT))[:, None]
                m_i = m_new
            p = gl.exp2(s - m_i[:, None])
            l_i = l_i + gl.sum(p, 1)
        else:
            m_new = gl.maximum(m_i, m_tile)
            alpha = gl.exp2(m_i - m_new)
            p = gl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + gl.sum(p, 1)
            m_i = m_new
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, O_LAYOUT))[:, None]
        # Each warpgroup's wait covers its own MMAs only: all of the last P V must be done before P is rewritten.
        # TRIM_BARRIER: the row max above already synchronised the CTA after both warpgroups' waits (its
        # cross-warpgroup reduction goes through shared memory between two barriers), so this one is redundant.
        if not TRIM_BARRIER:
            gl.thread_barrier()
        p_smem.store(p.to(gl.float16))
        fence_async_shared()
        gl.thread_barrier()
        # ---- O += P V on the tensor cores while the next tile is converted into the other buffer
        acc = warpgroup_mma(p_smem, k_nope_smem.index(buf), acc, is_async=True)
        nbuf = 1 - buf
        _store_tile(tile, k_nope_words.index(nbuf), k_pe_words.index(nbuf), SUB, E5M2)
        fence_async_shared()
        gl.thread_barrier()
        tile = _load_tile(kv_words, bt_row, n0 + 2 * BLOCK_N, end, num_blocks, blk_words, tok_words,
                          PAGE, L, R, SUB, LAT_LAYOUT, ROPE_LAYOUT, ONE_PAGE)
        # ---- scores of the next tile (all masked past the end: a wasted MMA on the last iteration, no loads)
        s = warpgroup_mma(q_nope_smem, k_nope_smem.index(nbuf).permute((1, 0)), s, use_acc=False, is_async=True)
        s = warpgroup_mma(q_pe_smem, k_pe_smem.index(nbuf).permute((1, 0)), s, is_async=True)
        acc, s = warpgroup_mma_wait(0, deps=(acc, s))
        buf = nbuf

    # ---- epilogue: o = acc * k_scale / l, lse natural log; an empty range gives lse = -inf, o = 0
    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, O_LAYOUT))
    has_tokens = l_o > 0.0
    o = acc * (k_scale / gl.where(has_tokens, l_o, 1.0))[:, None]
    has_tok_s = l_i > 0.0
    lse = gl.where(has_tok_s, (m_i + gl.log2(gl.where(has_tok_s, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    heads_o = pid_g * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, O_LAYOUT))
    offs_ol = gl.arange(0, L, layout=gl.SliceLayout(0, O_LAYOUT))
    heads_s = pid_g * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, S_LAYOUT))
    if SINGLE_SPLIT:
        o_rows = out_ptr + pid_b * stride_o_b + heads_o.to(gl.int64) * stride_o_h
        gl.store(o_rows[:, None] + offs_ol[None, :], o.to(out_ptr.dtype.element_ty))
        gl.store(lse_ptr + pid_b * num_heads + heads_s, lse)
    else:
        part = (pid_b * num_splits + pid_s) * num_heads + heads_o
        gl.store(part_o_ptr + part[:, None] * L + offs_ol[None, :], o.to(part_o_ptr.dtype.element_ty))
        part_s = (pid_b * num_splits + pid_s) * num_heads + heads_s
        gl.store(part_lse_ptr + part_s, lse)
