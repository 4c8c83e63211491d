"""Gluon (Hopper, sm_90) MLA decode kernel over a paged FP8 cache with 64-token tiles ("tile64"), 64 heads a CTA.

Session 7, written and compiled offline for sm_90 (Triton 3.6: no spills), NOT YET RUN ON A GPU: opt-in only
(mla_decode_seesaw.VARIANT = "tile64"), never picked by "auto" until its GPU tests pass and it is measured.

Why: Nsight Compute on the seesaw kernel (1x H200, B = 8, RESULTS.md session 7) puts shared memory at 73 % of its
throughput and the tensor pipe at ~39 %: each 32-token tile's scores read the whole 64 x 576 query (72 KB) from
shared memory again, and a 64 x 32 x 16 wgmma with both operands in shared memory moves 3 KB for 16 cycles of tensor
work, more than the 128 bytes a cycle shared memory serves. With 64-token tiles a 64 x 64 x 16 wgmma moves 4 KB for
32 cycles (within the limit), so the query is read half as often per token, and every hand-off between the two
warpgroups (statistics, P) covers twice the tokens.

Schedule: the seesaw kernel's (kernels/mla_decode_seesaw.py, producer form), with 64-token tiles. Warpgroup 0 scores
tile A of each 128-token pair and owns output columns 0..255, warpgroup 1 tile B and columns 256..511; they hand row
statistics and P to each other; a 4-warp producer loads and converts every tile (FP8 -> fp16, exact) in two 32-token
halves (two halves in registers at most: the seesaw producer's register budget).
Shared memory: Q 72 KiB + tiles A and B 72 KiB each, ONE buffer each (two would need 288 KiB), so:
* P of a tile goes into that tile's rope rows (64 tokens x 64 fp16 = 64 heads x 64 tokens fp16, same swizzled
  layout), dead once the tile's scores are computed.
* A tile is released to the producer (empty barrier, count 2) once both warpgroups' MMAs reading it are complete:
  each warpgroup releases A after its P_A V_A and B after its P_B V_B (warpgroup 1 takes P_A from shared memory,
  relative to m_a, and rescales its accumulator around that product: no register copy of P_A, 16 registers less).
  The producer converts A of the next pair, then B, each after its release; warpgroup 0 issues the next A scores
  before waiting for its P_B V_B (wait(2): one commit group a warpgroup_mma call with shared-memory operands), so
  that product runs while A is converted.
* The cost of one buffer a tile: the producer cannot run ahead (A of pair j+1 waits for both P_A V_A of pair j,
  B for both P_B V_B), so part of each conversion sits on the critical path; the first GPU run decides.
* The producer converts one pair past the last (zero rows, no memory traffic): the warpgroups issue the next
  pair's scores before leaving the loop, as in the seesaw kernel.
Numerics are the seesaw kernel's: bf16 query scaled by 2**-Q_SHIFT into fp16, k_scale and 2**Q_SHIFT in the base-2
score scale, k_scale into the output, fp32 accumulators, natural-log lse; tokens past the split's end load as 0 and
score -inf; the first tile of a pair always has a valid token.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                              warpgroup_mma_wait)

from fx_mla.ops.kernels.mla_decode_gluon import (_load_tile, _output_rows, _query_tiles, _score_scale, _split_range,
                                                 _store_tile, lat_layout)
from fx_mla.ops.kernels.mla_decode_seesaw import _pair_epilogue


@gluon.jit
def _t64_partition(q_nope, q_pe, own_nope, own_pe, other_nope, other_pe, m_a_s, l_a_s, m_b_s, l_s,
                   bar_a, bar_b, bar_fin, full_own, empty_a, empty_b, start, end, qk_scale, k_scale,
                   o_base, stride_o_h, lse_base,
                   WG: gl.constexpr, L: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr):
    """Warpgroup WG (0: tile A of each pair, columns [0, L/2); 1: tile B, columns [L/2, L))."""
    PAIR: gl.constexpr = 2 * BLOCK_N
    HALF: gl.constexpr = L // 2
    COL0: gl.constexpr = WG * HALF
    S_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    O_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HALF, 16])
    ROW_S: gl.constexpr = gl.SliceLayout(1, S_LAYOUT)
    ROW_O: gl.constexpr = gl.SliceLayout(1, O_LAYOUT)
    n_pairs = gl.cdiv(end - start, PAIR)
    v_own = own_nope.slice(COL0, HALF, dim=1)       # [BLOCK_N, 256]: V of our tile, our columns
    v_other = other_nope.slice(COL0, HALF, dim=1)   # V of the other warpgroup's tile

    # ---- prologue: the scores of our tile of pair 0
    mbarrier.wait(full_own, 0)
    s = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, S_LAYOUT)
    s = warpgroup_mma(q_nope.index(0), own_nope.permute((1, 0)), s, use_acc=False, is_async=True)
    s = warpgroup_mma(q_pe.index(0), own_pe.permute((1, 0)), s, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s, ))

    m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, ROW_S)
    l_i = gl.zeros([BLOCK_H], gl.float32, ROW_S)
    acc = gl.zeros([BLOCK_H, HALF], gl.float32, O_LAYOUT)
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_LAYOUT))
    for j in range(0, n_pairs):
        phase = j & 1
        # An opaque zero keeps the query descriptors of the score MMAs from being hoisted out of the loop.
        zero = gl.inline_asm_elementwise("mov.b32 $0, 0;", "=r,r", [j], dtype=gl.int32, is_pure=False, pack=1)
        if WG == 0:
            s = gl.where((start + j * PAIR + offs_n < end)[None, :], s * qk_scale, float("-inf"))
            m_a = gl.maximum(m_i, gl.max(s, 1))
            p = gl.exp2(s - m_a[:, None])
            own_pe.store(p.to(gl.float16))          # P_A into tile A's rope rows (read by its scores, complete)
            m_a_s.store(m_a)
            l_a_s.store(gl.sum(p, 1))
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.arrive(bar_a)
            acc = acc * gl.convert_layout(gl.exp2(m_i - m_a), ROW_O)[:, None]
            acc = warpgroup_mma(own_pe, v_own, acc, is_async=True)
            mbarrier.wait(bar_b, phase)
            m_b = m_b_s.load(ROW_S)
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            gl.thread_barrier()
            mbarrier.arrive(empty_a)                # our reads of tile A (K, P_A, V_A) are complete
            acc = acc * gl.convert_layout(gl.exp2(m_a - m_b), ROW_O)[:, None]
            acc = warpgroup_mma(other_pe, v_other, acc, is_async=True)   # P_B (tile B's rope rows) V_B
            m_i = m_b
            # tile A of pair j+1: its scores go in behind P_B V_B
            mbarrier.wait(full_own, (j + 1) & 1)
            s = warpgroup_mma(q_nope.index(zero), own_nope.permute((1, 0)), s, use_acc=False, is_async=True)
            s = warpgroup_mma(q_pe.index(zero), own_pe.permute((1, 0)), s, is_async=True)
            acc = warpgroup_mma_wait(2, deps=(acc, ))   # the two score MMAs may stay in flight, P_B V_B not
            gl.thread_barrier()
            mbarrier.arrive(empty_b)                # our reads of tile B (P_B, V_B) are complete
            s = warpgroup_mma_wait(0, deps=(s, ))
        else:
            mbarrier.wait(bar_a, phase)
            m_a = m_a_s.load(ROW_S)
            l_a = l_a_s.load(ROW_S)
            s = gl.where((start + j * PAIR + BLOCK_N + offs_n < end)[None, :], s * qk_scale, float("-inf"))
            m_b = gl.maximum(m_a, gl.max(s, 1))
            p = gl.exp2(s - m_b[:, None])
            own_pe.store(p.to(gl.float16))          # P_B into tile B's rope rows
            m_b_s.store(m_b)
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.arrive(bar_b)
            # P_A straight from shared memory (relative to m_a: the accumulator goes to m_a first, then to m_b,
            # the row factors commute with the product) instead of a rescaled register copy: 16 registers less
            acc = acc * gl.convert_layout(gl.exp2(m_i - m_a), ROW_O)[:, None]
            acc = warpgroup_mma(other_pe, v_other, acc, is_async=True)
            f_a = gl.exp2(m_a - m_b)
            l_i = l_i * gl.exp2(m_i - m_b) + l_a * f_a + gl.sum(p, 1)
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            gl.thread_barrier()
            mbarrier.arrive(empty_a)                # our reads of tile A (P_A, V_A) are complete
            acc = acc * gl.convert_layout(f_a, ROW_O)[:, None]
            acc = warpgroup_mma(own_pe, v_own, acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            gl.thread_barrier()
            mbarrier.arrive(empty_b)
            m_i = m_b
            mbarrier.wait(full_own, (j + 1) & 1)
            s = warpgroup_mma(q_nope.index(zero), own_nope.permute((1, 0)), s, use_acc=False, is_async=True)
            s = warpgroup_mma(q_pe.index(zero), own_pe.permute((1, 0)), s, is_async=True)
            s = warpgroup_mma_wait(0, deps=(s, ))

    _pair_epilogue(acc, m_i, l_i, l_s, bar_fin, k_scale, o_base, stride_o_h, lse_base, WG, L, BLOCK_H, S_LAYOUT,
                   O_LAYOUT)

@gluon.jit
def _t64_producer(ka_nope, ka_pe, kb_nope, kb_pe, full_a, full_b, empty_a, empty_b, kv_ptr, bt_row, start, end,
                  num_blocks, blk_words, tok_words, PAGE: gl.constexpr, L: gl.constexpr, R: gl.constexpr,
                  BLOCK_N: gl.constexpr, E5M2: gl.constexpr, ONE_PAGE: gl.constexpr, LANES: gl.constexpr):
    """Tile t of the split (pair t // 2; A for even t, B for odd) converted into its buffer in two 32-token halves,
    after the buffer's release (empty, both warpgroups) of the tile before; the next half is loaded while one is
    stored. One pair past the last is converted too (zeros)."""
    HN: gl.constexpr = BLOCK_N // 2                 # a half tile: 32 tokens
    SUB: gl.constexpr = HN // 4
    PAIR: gl.constexpr = 2 * BLOCK_N
    LAT_LAYOUT: gl.constexpr = lat_layout(LANES, 4, SUB)                            # [SUB, L / 4] words
    ROPE_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [4, 1], [1, 0])   # [HN, R / 4] words
    SMEM_WORDS: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)
    a_nope = ka_nope._reinterpret(gl.int32, [BLOCK_N, L // 2], SMEM_WORDS)
    a_pe = ka_pe._reinterpret(gl.int32, [BLOCK_N, R // 2], SMEM_WORDS)
    b_nope = kb_nope._reinterpret(gl.int32, [BLOCK_N, L // 2], SMEM_WORDS)
    b_pe = kb_pe._reinterpret(gl.int32, [BLOCK_N, R // 2], SMEM_WORDS)
    kv_words = kv_ptr.to(gl.pointer_type(gl.int32), bitcast=True)
    n_tiles = 2 * (gl.cdiv(end - start, PAIR) + 1)
    first = _load_tile(kv_words, bt_row, start, end, num_blocks, blk_words, tok_words,
                       PAGE, L, R, SUB, LAT_LAYOUT, ROPE_LAYOUT, ONE_PAGE)
    for t in range(n_tiles):
        n0 = start + t * BLOCK_N
        parity = ((t // 2) & 1) ^ 1  # a fresh barrier passes parity 1 at once
        second = _load_tile(kv_words, bt_row, n0 + HN, end, num_blocks, blk_words, tok_words,
                            PAGE, L, R, SUB, LAT_LAYOUT, ROPE_LAYOUT, ONE_PAGE)
        if t % 2 == 0:
            mbarrier.wait(empty_a, parity)
            _store_tile(first, a_nope.slice(0, HN), a_pe.slice(0, HN), SUB, E5M2)
        else:
            mbarrier.wait(empty_b, parity)
            _store_tile(first, b_nope.slice(0, HN), b_pe.slice(0, HN), SUB, E5M2)
        first = _load_tile(kv_words, bt_row, n0 + BLOCK_N, end, num_blocks, blk_words, tok_words,
                           PAGE, L, R, SUB, LAT_LAYOUT, ROPE_LAYOUT, ONE_PAGE)
        if t % 2 == 0:
            _store_tile(second, a_nope.slice(HN, HN), a_pe.slice(HN, HN), SUB, E5M2)
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.arrive(full_a)
        else:
            _store_tile(second, b_nope.slice(HN, HN), b_pe.slice(HN, HN), SUB, E5M2)
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.arrive(full_b)


@gluon.jit
def _mla_decode_tile64_kernel(
        q_ptr, kv_ptr, block_table_ptr, seq_lens_ptr, k_scale_ptr, q_scale_ptr,
        out_ptr, lse_ptr, part_o_ptr, part_lse_ptr,
        sm_scale, num_heads, num_splits, num_blocks, max_blocks,
        stride_q_b, stride_q_h, blk_words, tok_words, stride_bt_b, stride_o_b, stride_o_h,
        PAGE: gl.constexpr, L: gl.constexpr, R: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr,
        Q_SHIFT: gl.constexpr, HAS_Q_SCALE: gl.constexpr, E5M2: gl.constexpr, SINGLE_SPLIT: gl.constexpr,
        ONE_PAGE: gl.constexpr, WORKER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, LANES: gl.constexpr,
        num_warps: gl.constexpr):
    gl.static_assert(num_warps == 4, "the default partition is one warpgroup; the workers: the second + producer")
    gl.static_assert(BLOCK_H == 64, "one warpgroup MMA height")
    gl.static_assert(BLOCK_N == 64, "64-token tiles, converted in 32-token halves")
    gl.static_assert(R == 64, "P of a tile lives in its rope rows: 64 tokens x 64 = 64 heads x 64 tokens")
    gl.static_assert((not ONE_PAGE) or PAGE % (BLOCK_N // 2) == 0, "ONE_PAGE: a half tile lies in one page")
    pid_g = gl.program_id(0)  # head group varies fastest: the groups of one tile run side by side and share L2
    pid_s = gl.program_id(1)
    pid_b = gl.program_id(2).to(gl.int64)

    SMEM_TILE: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)  # fp16 rows
    SMEM_ROW: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])

    q_nope_t, q_pe_t = _query_tiles(q_ptr, pid_b, pid_g * BLOCK_H, stride_q_b, stride_q_h, L, R, BLOCK_H, Q_SHIFT,
                                    num_warps)
    q_nope = gl.allocate_shared_memory(gl.float16, [1, BLOCK_H, L], SMEM_TILE)
    q_nope.index(0).store(q_nope_t)
    q_pe = gl.allocate_shared_memory(gl.float16, [1, BLOCK_H, R], SMEM_TILE)
    q_pe.index(0).store(q_pe_t)
    ka_nope = gl.allocate_shared_memory(gl.float16, [BLOCK_N, L], SMEM_TILE)
    ka_pe = gl.allocate_shared_memory(gl.float16, [BLOCK_N, R], SMEM_TILE)
    kb_nope = gl.allocate_shared_memory(gl.float16, [BLOCK_N, L], SMEM_TILE)
    kb_pe = gl.allocate_shared_memory(gl.float16, [BLOCK_N, R], SMEM_TILE)
    m_a_s = gl.allocate_shared_memory(gl.float32, [BLOCK_H], SMEM_ROW)
    l_a_s = gl.allocate_shared_memory(gl.float32, [BLOCK_H], SMEM_ROW)
    m_b_s = gl.allocate_shared_memory(gl.float32, [BLOCK_H], SMEM_ROW)
    l_s = gl.allocate_shared_memory(gl.float32, [BLOCK_H], SMEM_ROW)
    bar_a = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    bar_b = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    bar_fin = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    full_a = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    full_b = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    empty_a = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    empty_b = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(bar_a, count=1)
    mbarrier.init(bar_b, count=1)
    mbarrier.init(bar_fin, count=1)
    mbarrier.init(full_a, count=1)
    mbarrier.init(full_b, count=1)
    mbarrier.init(empty_a, count=2)  # both warpgroups read both tiles of a pair
    mbarrier.init(empty_b, count=2)
    fence_async_shared()

    k_scale, qk_scale = _score_scale(sm_scale, k_scale_ptr, q_scale_ptr, Q_SHIFT, HAS_Q_SCALE)
    start, end = _split_range(seq_lens_ptr, pid_b, pid_s, num_splits, max_blocks, PAGE, 2 * BLOCK_N)  # whole pairs
    end = gl.maximum(end, start)  # a split past the request's end: empty (a negative pair count would hang)
    bt_row = block_table_ptr + pid_b * stride_bt_b
    o_base, o_stride, lse_base = _output_rows(out_ptr, lse_ptr, part_o_ptr, part_lse_ptr, pid_b, pid_s,
                                              pid_g * BLOCK_H, num_heads, num_splits, stride_o_b, stride_o_h, L,
                                              SINGLE_SPLIT)
    WG0: gl.constexpr = 0
    WG1: gl.constexpr = 1
    gl.warp_specialize([
        (_t64_partition, (q_nope, q_pe, ka_nope, ka_pe, kb_nope, kb_pe, m_a_s, l_a_s, m_b_s, l_s,
                          bar_a, bar_b, bar_fin, full_a, empty_a, empty_b, start, end, qk_scale, k_scale,
                          o_base, o_stride, lse_base, WG0, L, BLOCK_H, BLOCK_N)),
        (_t64_partition, (q_nope, q_pe, kb_nope, kb_pe, ka_nope, ka_pe, m_a_s, l_a_s, m_b_s, l_s,
                          bar_a, bar_b, bar_fin, full_b, empty_a, empty_b, start, end, qk_scale, k_scale,
                          o_base, o_stride, lse_base, WG1, L, BLOCK_H, BLOCK_N)),
        (_t64_producer, (ka_nope, ka_pe, kb_nope, kb_pe, full_a, full_b, empty_a, empty_b, kv_ptr, bt_row,
                         start, end, num_blocks, blk_words, tok_words, PAGE, L, R, BLOCK_N, E5M2, ONE_PAGE, LANES)),
    ], [4, 4], [WORKER_REGS, PRODUCER_REGS])
