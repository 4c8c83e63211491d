"""Gluon (Hopper, sm_90) kernel of the memory-bound few-head MLA decode: 16 heads, split-K over a paged FP8 cache.

Import this module only where triton.experimental.gluon is the validated Triton 3.6 version (the launcher in
fx_mla/ops/mla_decode_gluon16.py imports it lazily, after gluon16_unsupported_reason returned None).

One CTA per (split, request) with all 16 heads, one warpgroup (4 warps), BLOCK_N = 64 tokens a tile. With 16 heads
the step is memory-bound: every ~36 KB FP8 tile must stream at the copy bandwidth, so the design is about keeping
several tiles in flight while the warpgroup converts and multiplies the current one:

* A ring of NUM_STAGES raw FP8 tiles in shared memory (32-bit words, [BLOCK_N, L/4] + [BLOCK_N, R/4]) filled by
  cp.async (16 bytes a thread, commit/wait groups). Tile j + NUM_STAGES - 1 is issued before tile j is consumed,
  so NUM_STAGES - 1 tiles are in flight during the compute. Rows past the split's end are not read (predicated
  cp.async: zero fill, no memory traffic); page ids are clamped into the cache, lengths into the block-table row.
* Each thread reads back exactly the words it copied (same layout both ways), converts FP8 -> fp16 exactly
  (cvt.rn.f16x2.e4m3x2 / e5m2x2) and stores them into one fp16 tile [BLOCK_N, L] + [BLOCK_N, R] (128-byte swizzle).
* Swap-AB so the wgmma M side is tokens / latent and N = 16 heads:
  S^T [BLOCK_N, 16] = K Q^T   (A = fp16 tile, K-major; B = Q^T, the fp16 query [16, 576] kept in shared memory)
  O^T [L, 16]      += V^T P^T (A = the same fp16 tile seen MN-major, allowed for 16-bit types; B = P^T via smem)
  The accumulator O^T is 64 fp32 registers a thread.
* Same numerics as the Triton kernel (fx_mla/ops/kernels/mla_decode_fp8.py): a bf16 query is scaled by 2**-Q_SHIFT
  and rounded to fp16 (fp16 query as is), k_scale and 2**Q_SHIFT folded into the base-2 score scale and k_scale into
  the output, online softmax in fp32 with p rounded to fp16 for the P V product, (o, lse) written to out / lse or
  to the split workspace merged by the Triton combine kernel.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                              warpgroup_mma_wait)

from fx_mla.ops.kernels.mla_decode_gluon import (_cta_work, _load_tile, _query_tiles, _row_words,
                                                 _score_scale, _split_range, lat_layout)
from fx_mla.ops.kernels.mla_decode_gluon import _store_tile as _store_full_tile


@gluon.jit
def _issue_rows(dst, kv_words, bt_row, n0, end, num_blocks, blk_words, tok_words, col0,
                PAGE: gl.constexpr, ROWS: gl.constexpr, WORDS: gl.constexpr, LAYOUT: gl.constexpr,
                ONE_PAGE: gl.constexpr):
    """cp.async of the 32-bit words [col0, col0 + WORDS) of the cache rows of tokens [n0, n0 + ROWS) into `dst`
    ([ROWS, WORDS] int32). Rows at or past `end` are zero-filled without a memory access; page ids are clamped.
    ONE_PAGE: the rows lie in one page (one block-table entry, read only when n0 < end)."""
    rows, ok = _row_words(bt_row, n0, end, num_blocks, blk_words, tok_words, col0, PAGE, ROWS, LAYOUT, ONE_PAGE)
    offs = gl.arange(0, WORDS, layout=gl.SliceLayout(0, LAYOUT))
    async_copy.async_copy_global_to_shared(dst, kv_words + rows[:, None] + offs[None, :], mask=ok[:, None],
                                           cache_modifier=".cg")


@gluon.jit
def _issue_tile(lat_dst, rope_dst, kv_words, bt_row, n0, end, num_blocks, blk_words, tok_words,
                PAGE: gl.constexpr, L: gl.constexpr, R: gl.constexpr, BLOCK_N: gl.constexpr,
                LAT_LAYOUT: gl.constexpr, ROPE_LAYOUT: gl.constexpr, ONE_PAGE: gl.constexpr):
    """One tile's cp.asyncs (latent and rope words) as one commit group."""
    _issue_rows(lat_dst, kv_words, bt_row, n0, end, num_blocks, blk_words, tok_words, 0,
                PAGE, BLOCK_N, L // 4, LAT_LAYOUT, ONE_PAGE)
    _issue_rows(rope_dst, kv_words, bt_row, n0, end, num_blocks, blk_words, tok_words, L // 4,
                PAGE, BLOCK_N, R // 4, ROPE_LAYOUT, ONE_PAGE)
    async_copy.commit_group()


@gluon.jit
def _read_tile(lat_src, rope_src, SUB: gl.constexpr, LAT_LAYOUT: gl.constexpr, ROPE_LAYOUT: gl.constexpr):
    """The raw FP8 words of a ring slot into registers: latent as four row blocks [SUB, L / 4], rope [4 SUB, R / 4].
    The layouts are those of the cp.asyncs, so each thread reads back only the words it copied itself."""
    lat0 = lat_src.slice(0, SUB).load(LAT_LAYOUT)
    lat1 = lat_src.slice(SUB, SUB).load(LAT_LAYOUT)
    lat2 = lat_src.slice(2 * SUB, SUB).load(LAT_LAYOUT)
    lat3 = lat_src.slice(3 * SUB, SUB).load(LAT_LAYOUT)
    rope = rope_src.load(ROPE_LAYOUT)
    return lat0, lat1, lat2, lat3, rope


@gluon.jit
def _zero_rows(words, n0, end):
    """Rows of tokens at or past `end` set to 0 (a partial tile: stale or zero-filled slot rows never reach P V)."""
    r = n0 + gl.arange(0, words.shape[0], layout=gl.SliceLayout(1, words.type.layout))
    return gl.where((r < end)[:, None], words, 0)


@gluon.jit
def _store_tile(tile, lat_dst, rope_dst, n0, end, SUB: gl.constexpr, PARTIAL: gl.constexpr, E5M2: gl.constexpr):
    """FP8 words -> fp16 words into the MMA tile (shared memory viewed as words of two fp16 entries); PARTIAL: rows
    of tokens at or past `end` zeroed first."""
    if PARTIAL:
        lat0, lat1, lat2, lat3, rope = tile
        tile = (_zero_rows(lat0, n0, end), _zero_rows(lat1, n0 + SUB, end), _zero_rows(lat2, n0 + 2 * SUB, end),
                _zero_rows(lat3, n0 + 3 * SUB, end), _zero_rows(rope, n0, end))
    _store_full_tile(tile, lat_dst, rope_dst, SUB, E5M2)


@gluon.jit
def _mla_decode_gluon16_kernel(
        q_ptr, kv_ptr, block_table_ptr, seq_lens_ptr, k_scale_ptr, q_scale_ptr,
        out_ptr, lse_ptr, part_o_ptr, part_lse_ptr,
        sm_scale, num_heads, num_splits, num_blocks, max_blocks,
        stride_q_b, stride_q_h, blk_words, tok_words, stride_bt_b, stride_o_b, stride_o_h,
        PAGE: gl.constexpr, L: gl.constexpr, R: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr,
        NUM_STAGES: gl.constexpr, Q_SHIFT: gl.constexpr, HAS_Q_SCALE: gl.constexpr, E5M2: gl.constexpr,
        SINGLE_SPLIT: gl.constexpr, ONE_PAGE: gl.constexpr, EARLY_READ: gl.constexpr, num_warps: gl.constexpr):
    gl.static_assert(num_warps == 4, "one warpgroup")
    gl.static_assert(BLOCK_N == 64, "the wgmma M side of S^T: one warpgroup, 64 tokens")
    gl.static_assert(BLOCK_H % 8 == 0 and BLOCK_H <= 32, "wgmma N = heads")
    gl.static_assert(NUM_STAGES >= 2, "a ring of at least two raw tiles")
    gl.static_assert((not ONE_PAGE) or PAGE % BLOCK_N == 0, "ONE_PAGE: a tile lies in one page")
    SUB: gl.constexpr = BLOCK_N // 4
    pid_s = gl.program_id(0)  # the splits of one request run side by side
    pid_b = gl.program_id(1).to(gl.int64)

    # ---- layouts
    # S^T [BLOCK_N tokens, BLOCK_H heads] and O^T [L, BLOCK_H]: wgmma m64 nBLOCK_H, one warpgroup.
    S_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_H, 16])
    O_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_H, 16])
    # cp.async and read-back: 16 bytes (four words) a thread along the row.
    LAT_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [num_warps, 1], [1, 0])   # [*, L / 4]
    ROPE_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [num_warps, 1], [1, 0])   # [*, R / 4]
    RING: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
    SMEM_16: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    SMEM_WORDS: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)

    # ---- shared memory: query (fp16, once), raw FP8 ring, one fp16 tile, P
    q_nope, q_pe = _query_tiles(q_ptr, pid_b, 0, stride_q_b, stride_q_h, L, R, BLOCK_H, Q_SHIFT, num_warps)
    q_nope_smem = gl.allocate_shared_memory(gl.float16, [BLOCK_H, L], SMEM_16, q_nope)
    q_pe_smem = gl.allocate_shared_memory(gl.float16, [BLOCK_H, R], SMEM_16, q_pe)
    lat_ring = gl.allocate_shared_memory(gl.int32, [NUM_STAGES, BLOCK_N, L // 4], RING)
    rope_ring = gl.allocate_shared_memory(gl.int32, [NUM_STAGES, BLOCK_N, R // 4], RING)
    k_nope_smem = gl.allocate_shared_memory(gl.float16, [BLOCK_N, L], SMEM_16)
    k_pe_smem = gl.allocate_shared_memory(gl.float16, [BLOCK_N, R], SMEM_16)
    p_smem = gl.allocate_shared_memory(gl.float16, [BLOCK_H, BLOCK_N], SMEM_16)
    k_nope_words = k_nope_smem._reinterpret(gl.int32, [BLOCK_N, L // 2], SMEM_WORDS)
    k_pe_words = k_pe_smem._reinterpret(gl.int32, [BLOCK_N, R // 2], SMEM_WORDS)
    kv_words = kv_ptr.to(gl.pointer_type(gl.int32), bitcast=True)

    k_scale, qk_scale = _score_scale(sm_scale, k_scale_ptr, q_scale_ptr, Q_SHIFT, HAS_Q_SCALE)
    start, end = _split_range(seq_lens_ptr, pid_b, pid_s, num_splits, max_blocks, PAGE, BLOCK_N)
    bt_row = block_table_ptr + pid_b * stride_bt_b

    # ---- prologue: tiles 0 .. NUM_STAGES - 2 in flight (rows past the end: no traffic)
    for i in gl.static_range(NUM_STAGES - 1):
        _issue_tile(lat_ring.index(i), rope_ring.index(i), kv_words, bt_row, start + i * BLOCK_N, end, num_blocks,
                    blk_words, tok_words, PAGE, L, R, BLOCK_N, LAT_LAYOUT, ROPE_LAYOUT, ONE_PAGE)

    m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, gl.SliceLayout(0, S_LAYOUT))
    l_i = gl.zeros([BLOCK_H], gl.float32, gl.SliceLayout(0, S_LAYOUT))
    acc = gl.zeros([L, BLOCK_H], gl.float32, O_LAYOUT)
    s_zero = gl.zeros([BLOCK_N, BLOCK_H], gl.float32, S_LAYOUT)
    offs_tok = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, S_LAYOUT))
    slot = 0
    for n0 in range(start, end, BLOCK_N):
        # ---- keep NUM_STAGES - 1 tiles in flight: issue tile n0 + (NUM_STAGES - 1) BLOCK_N into the slot that
        # tile n0 - BLOCK_N left (each thread only ever reads the words it copied: no cross-thread hazard)
        nxt = (slot + NUM_STAGES - 1) % NUM_STAGES
        _issue_tile(lat_ring.index(nxt), rope_ring.index(nxt), kv_words, bt_row, n0 + (NUM_STAGES - 1) * BLOCK_N,
                    end, num_blocks, blk_words, tok_words, PAGE, L, R, BLOCK_N, LAT_LAYOUT, ROPE_LAYOUT, ONE_PAGE)
        async_copy.wait_group(NUM_STAGES - 1)  # this thread's copies of tile n0 have landed
        tile = _read_tile(lat_ring.index(slot), rope_ring.index(slot), SUB, LAT_LAYOUT, ROPE_LAYOUT)
        if EARLY_READ:  # the last tile's P V ran on the tensor cores while the ring was read
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            gl.thread_barrier()
        if n0 + BLOCK_N > end:
            _store_tile(tile, k_nope_words, k_pe_words, n0, end, SUB, True, E5M2)
        else:
            _store_tile(tile, k_nope_words, k_pe_words, n0, end, SUB, False, E5M2)
        fence_async_shared()
        gl.thread_barrier()
        # ---- S^T = K Q^T
        s = warpgroup_mma(k_nope_smem, q_nope_smem.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma(k_pe_smem, q_pe_smem.permute((1, 0)), s, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s, ))
        # ---- online softmax over the tokens (axis 0); the tile's first token is valid, so maxima are finite
        s = gl.where((n0 + offs_tok < end)[:, None], s * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 0))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - m_new[None, :])
        l_i = l_i * alpha + gl.sum(p, 0)
        m_i = m_new
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(0, O_LAYOUT))[None, :]
        p_smem.store(gl.permute(p.to(gl.float16), (1, 0)))
        fence_async_shared()
        gl.thread_barrier()
        # ---- O^T += V^T P^T (A: the fp16 tile seen MN-major; B: P^T, K-major)
        acc = warpgroup_mma(k_nope_smem.permute((1, 0)), p_smem.permute((1, 0)), acc, is_async=True)
        if EARLY_READ:  # leave it in flight (the next iteration waits for it after reading the ring)
            acc = warpgroup_mma_wait(1, deps=(acc, ))
        else:
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            gl.thread_barrier()
        slot = (slot + 1) % NUM_STAGES
    acc = warpgroup_mma_wait(0, deps=(acc, ))
    async_copy.wait_group(0)

    # ---- epilogue: o = acc * k_scale / l, lse natural log; an empty range gives lse = -inf, o = 0
    l_o = gl.convert_layout(l_i, gl.SliceLayout(0, O_LAYOUT))
    o = acc * (k_scale / gl.where(l_o > 0.0, l_o, 1.0))[None, :]
    has_tok = l_i > 0.0
    lse = gl.where(has_tok, (m_i + gl.log2(gl.where(has_tok, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    heads_o = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(0, O_LAYOUT))
    offs_ol = gl.arange(0, L, layout=gl.SliceLayout(1, O_LAYOUT))
    heads_s = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(0, S_LAYOUT))
    if SINGLE_SPLIT:
        o_cols = out_ptr + pid_b * stride_o_b + heads_o.to(gl.int64) * stride_o_h
        gl.store(o_cols[None, :] + offs_ol[:, None], o.to(out_ptr.dtype.element_ty))
        gl.store(lse_ptr + pid_b * num_heads + heads_s, lse)
    else:
        part = (pid_b * num_splits + pid_s) * num_heads + heads_o
        gl.store(part_o_ptr + part[None, :] * L + offs_ol[:, None], o.to(part_o_ptr.dtype.element_ty))
        part_s = (pid_b * num_splits + pid_s) * num_heads + heads_s
        gl.store(part_lse_ptr + part_s, lse)


# ------------------------------------------------------------------------------------------------------------------
# Round 2: warp-specialized variant. The ring kernel above runs convert -> S^T -> softmax -> P V one after another in
# its one warpgroup. Here a producer partition (PW warps) loads the FP8 words of tile j + 1 into registers (masked:
# no traffic past the end, zeros there), converts tile j to fp16 into one of two fp16 tiles and signals `full`; the
# consumer warpgroup (default partition) runs S^T, the softmax and O^T += V^T P^T on it and frees it (`empty`) once
# its P V completed. Conversion and loads of the next tile overlap the MMAs and the softmax of this one; shared
# memory drops the raw ring (no cp.async write + read-back): Q 18 KB + 2 x 72 KB fp16 tiles + P.
# Barrier phases: tile j uses buffer j % 2 for the (j // 2)-th time; the consumer waits full with parity
# (j // 2) & 1, the producer waits empty with parity ((j // 2) & 1) ^ 1 (a fresh barrier passes parity 1 at once).


@gluon.jit
def _ws_producer(k_nope, k_pe, full, empty, kv_ptr, bt_row, start, end, num_blocks, blk_words, tok_words,
                 PAGE: gl.constexpr, L: gl.constexpr, R: gl.constexpr, BLOCK_N: gl.constexpr, PW: gl.constexpr,
                 E5M2: gl.constexpr, ONE_PAGE: gl.constexpr, PREFETCH: gl.constexpr, LANES: gl.constexpr):
    """PREFETCH: tiles whose loads are in flight while a tile converts (1, 2 or 3; each tile ~36 KB an SM, 36
    registers a thread with 8 producer warps; HBM latency at this bandwidth share wants more than one)."""
    gl.static_assert(PREFETCH >= 1 and PREFETCH <= 3, "one to three tiles ahead")
    SUB: gl.constexpr = BLOCK_N // 4
    LAT_LAYOUT: gl.constexpr = lat_layout(LANES, PW, SUB)                                 # [SUB, L / 4] words
    ROPE_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [PW, 1], [1, 0])   # [BLOCK_N, R / 4] words
    SMEM_WORDS: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)
    nope_words = k_nope._reinterpret(gl.int32, [2, BLOCK_N, L // 2], SMEM_WORDS)
    pe_words = k_pe._reinterpret(gl.int32, [2, BLOCK_N, R // 2], SMEM_WORDS)
    kv_words = kv_ptr.to(gl.pointer_type(gl.int32), bitcast=True)
    n_tiles = gl.cdiv(end - start, BLOCK_N)
    tile = _load_tile(kv_words, bt_row, start, end, num_blocks, blk_words, tok_words,
                      PAGE, L, R, SUB, LAT_LAYOUT, ROPE_LAYOUT, ONE_PAGE)
    if PREFETCH >= 2:
        nxt = _load_tile(kv_words, bt_row, start + BLOCK_N, end, num_blocks, blk_words, tok_words,
                         PAGE, L, R, SUB, LAT_LAYOUT, ROPE_LAYOUT, ONE_PAGE)
    if PREFETCH == 3:
        nxt2 = _load_tile(kv_words, bt_row, start + 2 * BLOCK_N, end, num_blocks, blk_words, tok_words,
                          PAGE, L, R, SUB, LAT_LAYOUT, ROPE_LAYOUT, ONE_PAGE)
    for j in range(n_tiles):
        b = j % 2
        # the loads PREFETCH tiles ahead go out before waiting for a free buffer (rows past the end: no traffic)
        ahead = _load_tile(kv_words, bt_row, start + (j + PREFETCH) * BLOCK_N, end, num_blocks, blk_words,
                           tok_words, PAGE, L, R, SUB, LAT_LAYOUT, ROPE_LAYOUT, ONE_PAGE)
        mbarrier.wait(empty.index(b), ((j // 2) & 1) ^ 1)
        _store_full_tile(tile, nope_words.index(b), pe_words.index(b), SUB, E5M2)
        fence_async_shared()
        gl.thread_barrier()  # the partition's own warps
        mbarrier.arrive(full.index(b))
        if PREFETCH == 3:
            tile = nxt
            nxt = nxt2
            nxt2 = ahead
        elif PREFETCH == 2:
            tile = nxt
            nxt = ahead
        else:
            tile = ahead


@gluon.jit
def _ws_consumer(q_nope_smem, q_pe_smem, k_nope, k_pe, p_smem, full, empty, start, end, qk_scale, k_scale,
                 o_base, stride_o_h, lse_base,
                 L: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr, OVERLAP: gl.constexpr):
    """OVERLAP: leave tile j's P V in flight and issue tile j + 1's scores behind it (one wait for both; tile j's
    buffer goes back to the producer after it), instead of waiting for P V before releasing the buffer."""
    S_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_H, 16])
    O_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_H, 16])
    n_tiles = gl.cdiv(end - start, BLOCK_N)
    m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, gl.SliceLayout(0, S_LAYOUT))
    l_i = gl.zeros([BLOCK_H], gl.float32, gl.SliceLayout(0, S_LAYOUT))
    acc = gl.zeros([L, BLOCK_H], gl.float32, O_LAYOUT)
    s_zero = gl.zeros([BLOCK_N, BLOCK_H], gl.float32, S_LAYOUT)
    offs_tok = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, S_LAYOUT))
    for j in range(n_tiles):
        b = j % 2
        n0 = start + j * BLOCK_N
        kn = k_nope.index(b)
        mbarrier.wait(full.index(b), (j // 2) & 1)
        # ---- S^T = K Q^T
        s = warpgroup_mma(kn, q_nope_smem.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma(k_pe.index(b), q_pe_smem.permute((1, 0)), s, is_async=True)
        if OVERLAP:
            # groups complete in order: this also waits for tile j - 1's P V (acc, P and its buffer are free)
            s, acc = warpgroup_mma_wait(0, deps=(s, acc))
            if j > 0:
                gl.thread_barrier()
                mbarrier.arrive(empty.index(1 - b))
        else:
            s = warpgroup_mma_wait(0, deps=(s, ))
        # ---- online softmax over the tokens (axis 0); the tile's first token is valid, so maxima are finite
        s = gl.where((n0 + offs_tok < end)[:, None], s * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 0))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - m_new[None, :])
        l_i = l_i * alpha + gl.sum(p, 0)
        m_i = m_new
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(0, O_LAYOUT))[None, :]
        p_smem.store(gl.permute(p.to(gl.float16), (1, 0)))
        fence_async_shared()
        gl.thread_barrier()
        # ---- O^T += V^T P^T; the buffer goes back to the producer once this MMA has read it
        acc = warpgroup_mma(kn.permute((1, 0)), p_smem.permute((1, 0)), acc, is_async=True)
        if OVERLAP:  # returns at once (only this P V is pending), keeping acc a plain tensor across iterations
            acc = warpgroup_mma_wait(1, deps=(acc, ))
        else:
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            gl.thread_barrier()
            mbarrier.arrive(empty.index(b))
    acc = warpgroup_mma_wait(0, deps=(acc, ))

    # ---- epilogue: o = acc * k_scale / l, lse natural log; an empty range gives lse = -inf, o = 0
    l_o = gl.convert_layout(l_i, gl.SliceLayout(0, O_LAYOUT))
    o = acc * (k_scale / gl.where(l_o > 0.0, l_o, 1.0))[None, :]
    has_tok = l_i > 0.0
    lse = gl.where(has_tok, (m_i + gl.log2(gl.where(has_tok, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    heads_o = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(0, O_LAYOUT))
    offs_ol = gl.arange(0, L, layout=gl.SliceLayout(1, O_LAYOUT))
    gl.store(o_base + heads_o.to(gl.int64)[None, :] * stride_o_h + offs_ol[:, None], o.to(o_base.dtype.element_ty))
    gl.store(lse_base + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(0, S_LAYOUT)), lse)


@gluon.jit
def _mla_decode_gluon16_ws_kernel(
        q_ptr, kv_ptr, block_table_ptr, seq_lens_ptr, k_scale_ptr, q_scale_ptr,
        out_ptr, lse_ptr, part_o_ptr, part_lse_ptr,
        sm_scale, num_heads, num_splits, num_blocks, max_blocks,
        stride_q_b, stride_q_h, blk_words, tok_words, stride_bt_b, stride_o_b, stride_o_h,
        PAGE: gl.constexpr, L: gl.constexpr, R: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr,
        Q_SHIFT: gl.constexpr, HAS_Q_SCALE: gl.constexpr, E5M2: gl.constexpr, SINGLE_SPLIT: gl.constexpr,
        ONE_PAGE: gl.constexpr, PRODUCER_WARPS: gl.constexpr, PRODUCER_REGS: gl.constexpr, PREFETCH: gl.constexpr,
        OVERLAP: gl.constexpr, LANES: gl.constexpr, num_warps: gl.constexpr):
    gl.static_assert(num_warps == 4, "the default partition (consumer) is one warpgroup")
    gl.static_assert(BLOCK_N == 64, "the wgmma M side of S^T: one warpgroup, 64 tokens")
    gl.static_assert(BLOCK_H % 8 == 0 and BLOCK_H <= 32, "wgmma N = heads")
    gl.static_assert((not ONE_PAGE) or PAGE % BLOCK_N == 0, "ONE_PAGE: a tile lies in one page")
    pid_s = gl.program_id(0)
    pid_b = gl.program_id(1).to(gl.int64)
    SMEM_16: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)

    q_nope, q_pe = _query_tiles(q_ptr, pid_b, 0, stride_q_b, stride_q_h, L, R, BLOCK_H, Q_SHIFT, num_warps)
    q_nope_smem = gl.allocate_shared_memory(gl.float16, [BLOCK_H, L], SMEM_16, q_nope)
    q_pe_smem = gl.allocate_shared_memory(gl.float16, [BLOCK_H, R], SMEM_16, q_pe)
    k_nope = gl.allocate_shared_memory(gl.float16, [2, BLOCK_N, L], SMEM_16)
    k_pe = gl.allocate_shared_memory(gl.float16, [2, BLOCK_N, R], SMEM_16)
    p_smem = gl.allocate_shared_memory(gl.float16, [BLOCK_H, BLOCK_N], SMEM_16)
    full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(full.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    fence_async_shared()

    k_scale, qk_scale, start, end, bt_row, o_base, o_stride, lse_base = _cta_work(
        sm_scale, k_scale_ptr, q_scale_ptr, seq_lens_ptr, block_table_ptr, out_ptr, lse_ptr, part_o_ptr, part_lse_ptr,
        pid_b, pid_s, num_heads, num_splits, max_blocks, stride_bt_b, stride_o_b, stride_o_h, PAGE, L, BLOCK_N,
        Q_SHIFT, HAS_Q_SCALE, SINGLE_SPLIT)
    gl.warp_specialize([
        (_ws_consumer, (q_nope_smem, q_pe_smem, k_nope, k_pe, p_smem, full, empty, start, end, qk_scale, k_scale,
                        o_base, o_stride, lse_base, L, BLOCK_H, BLOCK_N, OVERLAP)),
        (_ws_producer, (k_nope, k_pe, full, empty, kv_ptr, bt_row, start, end, num_blocks, blk_words, tok_words,
                        PAGE, L, R, BLOCK_N, PRODUCER_WARPS, E5M2, ONE_PAGE, PREFETCH, LANES)),
    ], [PRODUCER_WARPS], [PRODUCER_REGS])
