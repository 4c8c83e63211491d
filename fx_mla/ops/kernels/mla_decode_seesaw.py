"""Gluon (Hopper, sm_90) "seesaw" kernel of the 64-heads-per-CTA MLA decode over a paged FP8 cache.

Import only where Triton 3.6 Gluon is available (fx_mla/ops/mla_decode_seesaw.py imports it lazily, after
seesaw_unsupported_reason returned None). Numerics, split workspace and bounds clamping are those of
fx_mla/ops/kernels/mla_decode_gluon.py (whose tile load / FP8 -> fp16 helpers this kernel reuses): a bf16 query
is scaled by 2**-Q_SHIFT into fp16, the FP8 cache converts to fp16 exactly, k_scale and 2**Q_SHIFT fold into the
base-2 score scale and k_scale into the output, fp32 accumulators, (o, lse) with a natural-log lse.

Why a second kernel: the first one runs its phases (convert, QK^T, softmax, P to smem, P V) one after another
in both warpgroups at once, so the tensor cores idle during the softmax and the conversion. Here the two
warpgroups are separate warp-specialized partitions that work on different tiles and hand row statistics to
each other through shared memory (FlashMLA's sm90 schedule, adapted to an FP8 cache converted by the consumers):

* CTA = (64-head group, split, request). Tiles of BLOCK_N = 32 tokens go in pairs (A, B). Warpgroup 0 (the
  default partition) computes S_A = Q K_A^T, warpgroup 1 (the worker) S_B = Q K_B^T: full 576-wide reductions,
  no product computed twice. Warpgroup 0 owns output columns 0..255 (O_L), warpgroup 1 columns 256..511 (O_R).
* WG0: m_a = max(m, rowmax S_A); P_A = exp2(S_A - m_a); publishes P_A, m_a, rowsum P_A (barrier a_ready);
       O_L = O_L * exp2(m - m_a) + P_A V_A[:, :256]; waits b_ready; O_L = O_L * exp2(m_a - m_b) + P_B V_B[:, :256].
  WG1: waits a_ready; m_b = max(m_a, rowmax S_B); P_B = exp2(S_B - m_b); publishes P_B, m_b (barrier b_ready);
       O_R = O_R * exp2(m - m_b) + (P_A * exp2(m_a - m_b)) V_A[:, 256:] + P_B V_B[:, 256:] (the scaled P_A is an
       MMA operand in registers); WG1 keeps the row sums l and hands them to WG0 at the end (barrier fin).
  While one warpgroup runs its softmax, the other one's MMAs run: that is the overlap.
* Each warpgroup converts its own next tile (FP8 words prefetched into registers one pair ahead) into one of two
  fp16 buffers while its last P V runs, then issues that tile's scores. No "buffer free" barriers: a warpgroup
  writes buffer (j+1) % 2, P or the statistics of pair j+1 only after waiting for the other's ready barrier of
  pair j, which the other arrives after its MMAs reading those buffers (pair j-1) completed; a ready barrier is
  never arrived twice ahead of its waiter (each arrive follows a wait on the other barrier).
* Tokens past the split's end load as 0 (no memory traffic) and score -inf. The first tile of a pair always
  has a valid token, so m_a is finite; a fully masked second tile gives m_b = m_a and P_B = 0 exactly.
Shared memory: Q 72 KiB + 2 tiles x 2 buffers x 36 KiB + P_A, P_B 8 KiB + 1 KiB of statistics (~225 KiB).
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                              warpgroup_mma_wait)

from fx_mla.ops.kernels.mla_decode_gluon import (_load_tile, _output_rows, _query_tiles, _score_scale, _split_range,
                                                 _store_tile, lat_layout)


@gluon.jit
def _pair_epilogue(acc, m_i, l_i, l_s, bar_fin, k_scale, o_base, stride_o_h, lse_base, WG: gl.constexpr,
                   L: gl.constexpr, BLOCK_H: gl.constexpr, S_LAYOUT: gl.constexpr, O_LAYOUT: gl.constexpr,
                   stage, bar_done, STAGED: gl.constexpr):
    """End of warpgroup WG: o = acc * k_scale / l into its L / 2 columns (WG1 keeps l and hands it to WG0 through
    l_s / bar_fin), lse in natural log (WG1); no tokens: o = 0, lse = -inf.
    STAGED: o goes through shared memory (`stage`: this warpgroup's own fp16 tile buffers [2, 32, L], 64 KiB, which
    no MMA reads once both warpgroups arrived bar_done, count 2) and out to global memory in whole 512-byte rows a
    warp: the MMA layout's own stores write 16 / 32 bytes of 8 rows a warp instruction (half-sector writes for a
    16-bit output), which Nsight Compute showed as the L2 being the busiest unit of a launch without tokens."""
    ROW_S: gl.constexpr = gl.SliceLayout(1, S_LAYOUT)
    ROW_O: gl.constexpr = gl.SliceLayout(1, O_LAYOUT)
    HALF: gl.constexpr = L // 2
    if WG == 1:
        l_s.store(l_i)
        gl.thread_barrier()
        mbarrier.arrive(bar_fin)
        has_s = l_i > 0.0
        lse = gl.where(has_s, (m_i + gl.log2(gl.where(has_s, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        gl.store(lse_base + gl.arange(0, BLOCK_H, layout=ROW_S), lse)
        l_o = gl.convert_layout(l_i, ROW_O)
    else:
        mbarrier.wait(bar_fin, 0)
        l_o = l_s.load(ROW_O)
    has_tokens = l_o > 0.0
    o = acc * (k_scale / gl.where(has_tokens, l_o, 1.0))[:, None]
    if STAGED:
        O_TY: gl.constexpr = o_base.dtype.element_ty
        VEC: gl.constexpr = 16 // (O_TY.primitive_bitwidth // 8)  # 16 bytes a thread: 4 fp32 or 8 16-bit entries
        # 16-byte chunks XOR-swizzled by row: the MMA layout's 8-row stores and the row loads are conflict-free
        STAGE_LAYOUT: gl.constexpr = gl.SwizzledSharedLayout(vec=VEC, per_phase=1, max_phase=8, order=[1, 0])
        ROWS_LAYOUT: gl.constexpr = gl.BlockedLayout([1, VEC], [1, 32], [4, 1], [1, 0])
        mbarrier.arrive(bar_done)  # this warpgroup's MMAs are complete (waited before the epilogue)
        mbarrier.wait(bar_done, 0)  # ... and the other's, which read our tiles as V
        if O_TY.primitive_bitwidth == 32:
            o_s = stage._reinterpret(O_TY, [BLOCK_H, HALF], STAGE_LAYOUT)
        else:
            o_s = stage.index(0)._reinterpret(O_TY, [BLOCK_H, HALF], STAGE_LAYOUT)
        o_s.store(o.to(O_TY))
        gl.thread_barrier()  # inside the partition: its 4 warps
        o_rows = o_s.load(ROWS_LAYOUT)
        rows = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, ROWS_LAYOUT))
        cols = WG * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(0, ROWS_LAYOUT))
        gl.store(o_base + rows.to(gl.int64)[:, None] * stride_o_h + cols[None, :], o_rows)
    else:
        rows = gl.arange(0, BLOCK_H, layout=ROW_O)
        cols = WG * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(0, O_LAYOUT))
        gl.store(o_base + rows.to(gl.int64)[:, None] * stride_o_h + cols[None, :], o.to(o_base.dtype.element_ty))


@gluon.jit
def _seesaw_partition(q_nope, q_pe, own_nope, own_pe, other_nope, p_own, p_other, m_a_s, l_a_s, m_b_s, l_s,
                      bar_a, bar_b, bar_fin, kv_ptr, bt_row, start, end, num_blocks, blk_words, tok_words,
                      qk_scale, k_scale, o_base, stride_o_h, lse_base,
                      WG: gl.constexpr, PAGE: gl.constexpr, L: gl.constexpr, R: gl.constexpr,
                      BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr, E5M2: gl.constexpr, ONE_PAGE: gl.constexpr,
                      LANES: gl.constexpr, bar_done, STAGED_O: gl.constexpr, full_own=None, empty_a=None, empty_b=None,
                      PRODUCER: gl.constexpr = False):
    """The whole life of warpgroup WG (0: tile A of each pair, columns [0, L/2); 1: tile B, columns [L/2, L)).
    PRODUCER: a producer partition (_seesaw_producer) converts the tiles; this warpgroup waits for its tile of a
    pair on full_own[buffer] and, once its MMAs of a pair are complete, releases both tiles of the pair (it reads
    both: its own scores and V, the other's V) on empty_a / empty_b[buffer]."""
    SUB: gl.constexpr = BLOCK_N // 4
    PAIR: gl.constexpr = 2 * BLOCK_N
    HALF: gl.constexpr = L // 2
    COL0: gl.constexpr = WG * HALF
    # One 4-warp partition: scores [64, BLOCK_N]; its half of O [64, 256] (one n = 256 wgmma); P as the
    # register A operand of that wgmma (WG1's rescaled P_A).
    S_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    O_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HALF, 16])
    P_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_LAYOUT, k_width=2)
    ROW_S: gl.constexpr = gl.SliceLayout(1, S_LAYOUT)
    ROW_O: gl.constexpr = gl.SliceLayout(1, O_LAYOUT)
    # Global loads of a tile: 16 consecutive bytes a thread, the cache as 32-bit words (36 registers a tile).
    LAT_LAYOUT: gl.constexpr = lat_layout(LANES, 4, SUB)                                 # [SUB, L / 4] words
    ROPE_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [4, 1], [1, 0])   # [BLOCK_N, R / 4] words
    SMEM_WORDS: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)
    own_nope_words = own_nope._reinterpret(gl.int32, [2, BLOCK_N, L // 2], SMEM_WORDS)
    own_pe_words = own_pe._reinterpret(gl.int32, [2, BLOCK_N, R // 2], SMEM_WORDS)
    kv_words = kv_ptr.to(gl.pointer_type(gl.int32), bitcast=True)
    off = WG * BLOCK_N  # this warpgroup's tile inside a pair
    n_pairs = gl.cdiv(end - start, PAIR)

    # ---- prologue: the tile of pair 0 converted into buffer 0, its scores issued; pair 1's tile to registers
    if PRODUCER:
        mbarrier.wait(full_own.index(0), 0)
    else:
        tile = _load_tile(kv_words, bt_row, start + off, end, num_blocks, blk_words, tok_words,
                          PAGE, L, R, SUB, LAT_LAYOUT, ROPE_LAYOUT, ONE_PAGE)
        _store_tile(tile, own_nope_words.index(0), own_pe_words.index(0), SUB, E5M2)
        tile = _load_tile(kv_words, bt_row, start + PAIR + off, end, num_blocks, blk_words, tok_words,
                          PAGE, L, R, SUB, LAT_LAYOUT, ROPE_LAYOUT, ONE_PAGE)
        fence_async_shared()
        gl.thread_barrier()  # inside a partition: its own 4 warps
    s = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, S_LAYOUT)
    s = warpgroup_mma(q_nope.index(0), own_nope.index(0).permute((1, 0)), s, use_acc=False, is_async=True)
    s = warpgroup_mma(q_pe.index(0), own_pe.index(0).permute((1, 0)), s, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s, ))

    m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, ROW_S)
    l_i = gl.zeros([BLOCK_H], gl.float32, ROW_S)
    acc = gl.zeros([BLOCK_H, HALF], gl.float32, O_LAYOUT)
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_LAYOUT))
    for j in range(0, n_pairs):
        buf = j % 2
        phase = j & 1
        v_own = own_nope.index(buf).slice(COL0, HALF, dim=1)       # [BLOCK_N, 256]: V of our tile, our columns
        v_other = other_nope.index(buf).slice(COL0, HALF, dim=1)   # V of the other warpgroup's tile
        if WG == 0:
            s = gl.where((start + j * PAIR + offs_n < end)[None, :], s * qk_scale, float("-inf"))
            m_a = gl.maximum(m_i, gl.max(s, 1))
            p = gl.exp2(s - m_a[:, None])
            p_own.store(p.to(gl.float16))
            m_a_s.store(m_a)
            l_a_s.store(gl.sum(p, 1))
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.arrive(bar_a)
            acc = acc * gl.convert_layout(gl.exp2(m_i - m_a), ROW_O)[:, None]
            acc = warpgroup_mma(p_own, v_own, acc, is_async=True)
            mbarrier.wait(bar_b, phase)
            m_b = m_b_s.load(ROW_S)
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            acc = acc * gl.convert_layout(gl.exp2(m_a - m_b), ROW_O)[:, None]
            acc = warpgroup_mma(p_other, v_other, acc, is_async=True)
            m_i = m_b
        else:
            mbarrier.wait(bar_a, phase)
            m_a = m_a_s.load(ROW_S)
            l_a = l_a_s.load(ROW_S)
            s = gl.where((start + j * PAIR + BLOCK_N + offs_n < end)[None, :], s * qk_scale, float("-inf"))
            m_b = gl.maximum(m_a, gl.max(s, 1))
            p = gl.exp2(s - m_b[:, None])
            p_own.store(p.to(gl.float16))
            m_b_s.store(m_b)
            # P_A rescaled to m_b, in registers (read before b_ready: WG0 rewrites P_A only after that)
            f_a = gl.exp2(m_a - m_b)
            p_a = p_other.load(P_LAYOUT).to(gl.float32) * gl.convert_layout(f_a, gl.SliceLayout(1, P_LAYOUT))[:, None]
            p_a = p_a.to(gl.float16)
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.arrive(bar_b)
            alpha = gl.exp2(m_i - m_b)
            l_i = l_i * alpha + l_a * f_a + gl.sum(p, 1)
            acc = acc * gl.convert_layout(alpha, ROW_O)[:, None]
            acc = warpgroup_mma(p_a, v_other, acc, is_async=True)
            acc = warpgroup_mma(p_own, v_own, acc, is_async=True)
            m_i = m_b
        # ---- our tile of pair j+1 into the other buffer while the P V MMAs run; then its scores
        nbuf = 1 - buf
        if PRODUCER:  # the producer converts one pair past the last (zeros): no branch around this wait
            mbarrier.wait(full_own.index(nbuf), ((j + 1) // 2) & 1)
        else:
            _store_tile(tile, own_nope_words.index(nbuf), own_pe_words.index(nbuf), SUB, E5M2)
            fence_async_shared()
            gl.thread_barrier()
            tile = _load_tile(kv_words, bt_row, start + (j + 2) * PAIR + off, end, num_blocks, blk_words,
                              tok_words, PAGE, L, R, SUB, LAT_LAYOUT, ROPE_LAYOUT, ONE_PAGE)
        # An opaque zero keeps the 36 query descriptors of this MMA from being hoisted out of the loop into 72
        # registers (ptxas then spills them in the default partition).
        zero = gl.inline_asm_elementwise("mov.b32 $0, 0;", "=r,r", [j], dtype=gl.int32, is_pure=False, pack=1)
        s = warpgroup_mma(q_nope.index(zero), own_nope.index(nbuf).permute((1, 0)), s, use_acc=False,
                          is_async=True)
        s = warpgroup_mma(q_pe.index(zero), own_pe.index(nbuf).permute((1, 0)), s, is_async=True)
        acc, s = warpgroup_mma_wait(0, deps=(acc, s))
        if PRODUCER:  # this warpgroup's reads of pair j's two tiles are complete
            gl.thread_barrier()
            mbarrier.arrive(empty_a.index(buf))
            mbarrier.arrive(empty_b.index(buf))

    _pair_epilogue(acc, m_i, l_i, l_s, bar_fin, k_scale, o_base, stride_o_h, lse_base, WG, L, BLOCK_H, S_LAYOUT,
                   O_LAYOUT, own_nope, bar_done, STAGED_O)

@gluon.jit
def _mla_decode_seesaw_kernel(
        q_ptr, kv_ptr, block_table_ptr, seq_lens_ptr, k_scale_ptr, q_scale_ptr,
        out_ptr, lse_ptr, part_o_ptr, part_lse_ptr,
        sm_scale, num_heads, num_splits, num_blocks, max_blocks,
        stride_q_b, stride_q_h, blk_words, tok_words, stride_bt_b, stride_o_b, stride_o_h,
        PAGE: gl.constexpr, L: gl.constexpr, R: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr,
        Q_SHIFT: gl.constexpr, HAS_Q_SCALE: gl.constexpr, E5M2: gl.constexpr, SINGLE_SPLIT: gl.constexpr,
        ONE_PAGE: gl.constexpr, WORKER_REGS: gl.constexpr, LANES: gl.constexpr, num_warps: gl.constexpr,
        PRODUCER: gl.constexpr = False, PRODUCER_REGS: gl.constexpr = 0, STAGED_O: gl.constexpr = False):
    """PRODUCER: the producer variant below (a third partition converts the tiles, full / empty barriers).
    STAGED_O: the output goes through shared memory in whole rows (_pair_epilogue)."""
    gl.static_assert(num_warps == 4, "the default partition is one warpgroup; the workers: the second (+ producer)")
    gl.static_assert(BLOCK_H == 64, "one warpgroup MMA height")
    gl.static_assert(BLOCK_N % 32 == 0, "tiles load as four row blocks of >= 8 rows")
    gl.static_assert((not ONE_PAGE) or PAGE % BLOCK_N == 0, "ONE_PAGE: a tile lies in one page")
    pid_g = gl.program_id(0)  # head group varies fastest: the groups of one tile run side by side and share L2
    pid_s = gl.program_id(1)
    pid_b = gl.program_id(2).to(gl.int64)

    SMEM_LAT: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    SMEM_ROPE: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    SMEM_P: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, BLOCK_N], gl.float16)
    SMEM_ROW: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])

    # ---- query (fp16; bf16 scaled by 2**-Q_SHIFT) into shared memory, once, by the default warps
    q_nope_t, q_pe_t = _query_tiles(q_ptr, pid_b, pid_g * BLOCK_H, stride_q_b, stride_q_h, L, R, BLOCK_H, Q_SHIFT,
                                    num_warps)
    q_nope = gl.allocate_shared_memory(gl.float16, [1, BLOCK_H, L], SMEM_LAT)
    q_nope.index(0).store(q_nope_t)
    q_pe = gl.allocate_shared_memory(gl.float16, [1, BLOCK_H, R], SMEM_ROPE)
    q_pe.index(0).store(q_pe_t)
    # Tiles A (WG0) and B (WG1) of a pair, two buffers each; P_A, P_B; row statistics; three barriers.
    ka_nope = gl.allocate_shared_memory(gl.float16, [2, BLOCK_N, L], SMEM_LAT)
    ka_pe = gl.allocate_shared_memory(gl.float16, [2, BLOCK_N, R], SMEM_ROPE)
    kb_nope = gl.allocate_shared_memory(gl.float16, [2, BLOCK_N, L], SMEM_LAT)
    kb_pe = gl.allocate_shared_memory(gl.float16, [2, BLOCK_N, R], SMEM_ROPE)
    p_a = gl.allocate_shared_memory(gl.float16, [BLOCK_H, BLOCK_N], SMEM_P)
    p_b = gl.allocate_shared_memory(gl.float16, [BLOCK_H, BLOCK_N], SMEM_P)
    m_a_s = gl.allocate_shared_memory(gl.float32, [BLOCK_H], SMEM_ROW)
    l_a_s = gl.allocate_shared_memory(gl.float32, [BLOCK_H], SMEM_ROW)
    m_b_s = gl.allocate_shared_memory(gl.float32, [BLOCK_H], SMEM_ROW)
    l_s = gl.allocate_shared_memory(gl.float32, [BLOCK_H], SMEM_ROW)
    bar_a = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    bar_b = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    bar_fin = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(bar_a, count=1)
    mbarrier.init(bar_b, count=1)
    mbarrier.init(bar_fin, count=1)
    if STAGED_O:
        bar_done = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(bar_done, count=2)  # both warpgroups' MMAs complete: the tile buffers take the output
    else:
        bar_done = bar_fin  # not used
    if PRODUCER:
        full_a = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        full_b = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        empty_a = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        empty_b = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(full_a.index(i), count=1)
            mbarrier.init(full_b.index(i), count=1)
            mbarrier.init(empty_a.index(i), count=2)  # both warpgroups read both tiles of a pair
            mbarrier.init(empty_b.index(i), count=2)
    fence_async_shared()

    k_scale, qk_scale = _score_scale(sm_scale, k_scale_ptr, q_scale_ptr, Q_SHIFT, HAS_Q_SCALE)
    start, end = _split_range(seq_lens_ptr, pid_b, pid_s, num_splits, max_blocks, PAGE, 2 * BLOCK_N)  # whole pairs
    if PRODUCER:
        # a split past the request's end has end < start: empty, not negative (a negative pair count would leave
        # the warpgroups' first full-barrier wait without a producer arrive: a hang; without the producer the
        # loops are just skipped)
        end = gl.maximum(end, start)
    bt_row = block_table_ptr + pid_b * stride_bt_b
    head0 = pid_g * BLOCK_H
    o_base, o_stride, lse_base = _output_rows(out_ptr, lse_ptr, part_o_ptr, part_lse_ptr, pid_b, pid_s, head0,
                                              num_heads, num_splits, stride_o_b, stride_o_h, L, SINGLE_SPLIT)
    WG0: gl.constexpr = 0
    WG1: gl.constexpr = 1
    # Partition arguments spelled out (a tuple concatenation would unwrap the constexprs into plain ints).
    if PRODUCER:
        gl.warp_specialize([
            (_seesaw_partition, (q_nope, q_pe, ka_nope, ka_pe, kb_nope, p_a, p_b, m_a_s, l_a_s, m_b_s, l_s,
                                 bar_a, bar_b, bar_fin, kv_ptr, bt_row, start, end, num_blocks, blk_words, tok_words,
                                 qk_scale, k_scale, o_base, o_stride, lse_base, WG0, PAGE, L, R, BLOCK_H, BLOCK_N,
                                 E5M2, ONE_PAGE, LANES, bar_done, STAGED_O, full_a, empty_a, empty_b, PRODUCER)),
            (_seesaw_partition, (q_nope, q_pe, kb_nope, kb_pe, ka_nope, p_b, p_a, m_a_s, l_a_s, m_b_s, l_s,
                                 bar_a, bar_b, bar_fin, kv_ptr, bt_row, start, end, num_blocks, blk_words, tok_words,
                                 qk_scale, k_scale, o_base, o_stride, lse_base, WG1, PAGE, L, R, BLOCK_H, BLOCK_N,
                                 E5M2, ONE_PAGE, LANES, bar_done, STAGED_O, full_b, empty_a, empty_b, PRODUCER)),
            (_seesaw_producer, (ka_nope, ka_pe, kb_nope, kb_pe, full_a, full_b, empty_a, empty_b, kv_ptr, bt_row,
                                start, end, num_blocks, blk_words, tok_words, PAGE, L, R, BLOCK_N, E5M2, ONE_PAGE,
                                LANES)),
        ], [4, 4], [WORKER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([
            (_seesaw_partition, (q_nope, q_pe, ka_nope, ka_pe, kb_nope, p_a, p_b, m_a_s, l_a_s, m_b_s, l_s,
                                 bar_a, bar_b, bar_fin, kv_ptr, bt_row, start, end, num_blocks, blk_words, tok_words,
                                 qk_scale, k_scale, o_base, o_stride, lse_base,
                                 WG0, PAGE, L, R, BLOCK_H, BLOCK_N, E5M2, ONE_PAGE, LANES, bar_done, STAGED_O)),
            (_seesaw_partition, (q_nope, q_pe, kb_nope, kb_pe, ka_nope, p_b, p_a, m_a_s, l_a_s, m_b_s, l_s,
                                 bar_a, bar_b, bar_fin, kv_ptr, bt_row, start, end, num_blocks, blk_words, tok_words,
                                 qk_scale, k_scale, o_base, o_stride, lse_base,
                                 WG1, PAGE, L, R, BLOCK_H, BLOCK_N, E5M2, ONE_PAGE, LANES, bar_done, STAGED_O)),
        ], [4], [WORKER_REGS])


# ------------------------------------------------------------------------------------------------------------------
# Producer variant (session 5, written without a GPU: not yet run). Nsight Compute put the seesaw kernel's warps at
# 0.35 eligible a cycle with the tensor pipe 34 % busy: each warpgroup loads and converts its own tiles on its
# critical path, between its P V and its next scores. Here a third, 4-warp partition does all loads and conversions
# (tile t of the split = pair t // 2, A for even t, B for odd, into buffer (t // 2) % 2, one tile ahead in
# registers), and the two MMA warpgroups only wait for their tile (full) and release both tiles of a pair once their
# MMAs on it completed (empty, count 2). The producer converts one pair past the last (zero rows, no memory traffic)
# because the warpgroups issue the next pair's scores before leaving the loop, as in the seesaw kernel. Shared
# memory as in the seesaw kernel plus 8 barriers; registers: producer PRODUCER_REGS, the warpgroups the rest.
# Launched as _mla_decode_seesaw_kernel with PRODUCER=True.


@gluon.jit
def _seesaw_producer(ka_nope, ka_pe, kb_nope, kb_pe, full_a, full_b, empty_a, empty_b, kv_ptr, bt_row, start, end,
                     num_blocks, blk_words, tok_words, PAGE: gl.constexpr, L: gl.constexpr, R: gl.constexpr,
                     BLOCK_N: gl.constexpr, E5M2: gl.constexpr, ONE_PAGE: gl.constexpr, LANES: gl.constexpr):
    SUB: gl.constexpr = BLOCK_N // 4
    PAIR: gl.constexpr = 2 * BLOCK_N
    LAT_LAYOUT: gl.constexpr = lat_layout(LANES, 4, SUB)                            # [SUB, L / 4] words
    ROPE_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [4, 1], [1, 0])   # [BLOCK_N, R / 4] words
    SMEM_WORDS: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)
    a_nope = ka_nope._reinterpret(gl.int32, [2, BLOCK_N, L // 2], SMEM_WORDS)
    a_pe = ka_pe._reinterpret(gl.int32, [2, BLOCK_N, R // 2], SMEM_WORDS)
    b_nope = kb_nope._reinterpret(gl.int32, [2, BLOCK_N, L // 2], SMEM_WORDS)
    b_pe = kb_pe._reinterpret(gl.int32, [2, BLOCK_N, R // 2], SMEM_WORDS)
    kv_words = kv_ptr.to(gl.pointer_type(gl.int32), bitcast=True)
    n_tiles = 2 * (gl.cdiv(end - start, PAIR) + 1)  # one pair past the last: see above
    tile = _load_tile(kv_words, bt_row, start, end, num_blocks, blk_words, tok_words,
                      PAGE, L, R, SUB, LAT_LAYOUT, ROPE_LAYOUT, ONE_PAGE)
    for t in range(n_tiles):
        j = t // 2
        b = j % 2
        parity = ((j // 2) & 1) ^ 1  # a fresh barrier passes parity 1 at once
        nxt = _load_tile(kv_words, bt_row, start + (t + 1) * BLOCK_N, end, num_blocks, blk_words, tok_words,
                         PAGE, L, R, SUB, LAT_LAYOUT, ROPE_LAYOUT, ONE_PAGE)
        if t % 2 == 0:
            mbarrier.wait(empty_a.index(b), parity)
            _store_tile(tile, a_nope.index(b), a_pe.index(b), SUB, E5M2)
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.arrive(full_a.index(b))
        else:
            mbarrier.wait(empty_b.index(b), parity)
            _store_tile(tile, b_nope.index(b), b_pe.index(b), SUB, E5M2)
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.arrive(full_b.index(b))
        tile = nxt
