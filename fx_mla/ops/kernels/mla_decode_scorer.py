"""Gluon (Hopper, sm_90) "scorer" kernel of the 64-heads-per-CTA MLA decode over a paged FP8 cache (issue 6).

Import only where Triton 3.6 Gluon is available (the seesaw launcher imports it lazily for VARIANT "scorer").
Numerics, split workspace, bounds clamping and the epilogue are the seesaw kernel's (kernels/mla_decode_seesaw.py):
a bf16 query scaled by 2**-Q_SHIFT into fp16, the FP8 cache converted to fp16 exactly, k_scale and 2**Q_SHIFT in
the base-2 score scale, k_scale into the output, fp32 accumulators, natural-log lse.

Why a third 64-head schedule: Nsight Compute put the seesaw kernel's shared memory at ~73 % of its throughput with
the tensor pipe at ~39 % (RESULTS.md, session 7). Its scores are 64 x 32 x 16 wgmmas with both operands in shared
memory: 3 KB moved for 16 tensor cycles, above the 128 bytes a cycle shared memory serves, and the whole 72 KB query
is read again for every 32 tokens. The 64-token-tile seesaw of session 7 ("tile64") halved that but had room for one
buffer a tile only, so its producer could not run ahead. Here ONE warpgroup computes all the scores:

* Tiles of 64 tokens, two buffers (Q 72 KiB + 2 x 72 KiB of fp16 tiles + P 8 KiB ~ 225 KiB). Scores are 64 x 64 x 16
  wgmmas (4 KB for 32 tensor cycles: within shared memory's rate) and the query is read once per 64 tokens.
* The scorer (default partition, 4 warps) owns output columns 256..511 and the row statistics: for tile j it waits
  for S_j, masks and scales it, takes m_j, P_j = exp2(S_j - m_j), alpha_j = exp2(m_{j-1} - m_j), l; publishes P_j
  and alpha_j in shared memory (p_full); rescales its accumulator and issues P_j V_j[:, 256:], then the next tile's
  scores S_{j+1} = Q K_{j+1}^T, and waits for its P V only before releasing tile j (empty): P_j V_j and S_{j+1} run
  back to back on the tensor cores (with the helper's P V).
* The helper (4 warps) owns columns 0..255: per tile it waits p_full, rescales by alpha_j, runs P_j V_j[:, :256],
  then releases P (p_empty) and the tile (empty).
* The producer (4 warps) loads each tile in two 32-token halves (one half ahead in registers: the seesaw producer's
  budget), converts FP8 -> fp16 into the tile's buffer (empty: both the scorer and the helper released it) and
  signals full; with PREFETCH it first asks L2 for the rows of the half PREFETCH tiles ahead. It converts one tile
  past the last (zero rows, no memory traffic): the scorer issues the next tile's scores before leaving its loop,
  without a branch.
* Why the next scores come after this tile's P V (not before its softmax, FlashAttention-3's order): a tile's buffer
  is then busy from its scores to its P V only, and the producer converts tile j+1 while the scorer waits for S_j and
  runs its softmax. In the other order (the first version, session 12) tile j+1 was needed the moment tile j-1 was
  released: Nsight Compute showed the scorer waiting on full and the producer on empty barriers, and it was 5-8 %
  slower (1x H100, RESULTS.md).
* The tile's tokens past the split's end load as 0 and score -inf; the first tile of a split always has a valid
  token, and so does every tile the loop reaches, so every m_j is finite.
* EARLY_Q: the scorer loads the query itself, inside the warp-specialized region, so that the producer's first tile
  is loaded and converted at the same time (otherwise all warps wait for the query first). STAGED: the output goes
  through the (then free) tile buffers and out in whole rows (_pair_epilogue's staged form); the launcher's "plan"
  stages one-split launches and many short splits of a bf16 output (then with bf16 partials). Both run on a GPU in
  session 13 (bitwise the plain scorer). A producer of two warpgroups (session 12, git history) was 7-10 % slower on
  the four 128-head shapes (1x H100, session 13): 16 warps bound ptxas at 128 registers a thread, which split the
  output MMAs into n = 128 halves; removed.
* PDL (opt-in; 1-4 % slower on 1x H100, session 14, so off): a programmatic dependent launch whose
  first statement is griddepcontrol.wait (no global read or write before it, but for PDL_EARLY's prefetch of the
  first tile into L2, from L1-bypassing reads used for nothing else), then launch_dependents for the split merge.
Shared memory a block: Q 73,728 + tiles 147,456 + P 8,192 + statistics and barriers (230,176 bytes compiled, up to
230,216 with the options, of the 232,448 an H100 block may use).
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                              warpgroup_mma_wait)

from fx_mla.ops.kernels.mla_decode_gluon import (_load_tile, _output_rows, _query_tiles, _score_scale, _split_range,
                                                 _store_tile, lat_layout)
from fx_mla.ops.kernels.mla_decode_seesaw import _pair_epilogue


@gluon.constexpr_function
def mma_layout(n):
    """A one-warpgroup wgmma accumulator layout, n columns an instruction."""
    n = getattr(n, "value", n)
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])


@gluon.jit
def _scorer_partition(q_nope, q_pe, k_nope, k_pe, p_s, alpha_s, l_s, full, empty, p_full, p_empty, bar_fin, bar_done,
                      start, end, qk_scale, k_scale, o_base, stride_o_h, lse_base,
                      q_ptr, pid_b, head0, stride_q_b, stride_q_h,
                      L: gl.constexpr, R: gl.constexpr, BLOCK_H: gl.constexpr, TILE: gl.constexpr,
                      Q_SHIFT: gl.constexpr, EARLY_Q: gl.constexpr, STAGED: gl.constexpr, prow, PROBE: gl.constexpr,
                      mrg, MERGE: gl.constexpr, SPLITS_POW2: gl.constexpr, MERGE_ROWS: gl.constexpr):
    """Scores, softmax statistics and output columns [L/2, L) (the epilogue's warpgroup 1: it holds l, writes lse).
    MERGE: then the in-kernel split merge of its columns (_merge_tail; mrg: its arguments)."""
    HALF: gl.constexpr = L // 2
    S_LAYOUT: gl.constexpr = mma_layout(TILE)  # scores [64, TILE]
    O_LAYOUT: gl.constexpr = mma_layout(L // 2)  # this warpgroup's half of O [64, L / 2]
    ROW_S: gl.constexpr = gl.SliceLayout(1, S_LAYOUT)
    ROW_O: gl.constexpr = gl.SliceLayout(1, O_LAYOUT)
    n_tiles = gl.cdiv(end - start, TILE)
    if EARLY_Q:  # the query, while the producer loads and converts the first tile
        q_nope_t, q_pe_t = _query_tiles(q_ptr, pid_b, head0, stride_q_b, stride_q_h, L, R, BLOCK_H, Q_SHIFT, 4)
        q_nope.index(0).store(q_nope_t)
        q_pe.index(0).store(q_pe_t)
        fence_async_shared()
        gl.thread_barrier()
        _stamp(prow, 3, PROBE)

    mbarrier.wait(full.index(0), 0)
    _stamp(prow, 4, PROBE)
    s = gl.zeros([BLOCK_H, TILE], gl.float32, S_LAYOUT)
    s = warpgroup_mma(q_nope.index(0), k_nope.index(0).permute((1, 0)), s, use_acc=False, is_async=True)
    s = warpgroup_mma(q_pe.index(0), k_pe.index(0).permute((1, 0)), s, is_async=True)

    m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, ROW_S)
    l_i = gl.zeros([BLOCK_H], gl.float32, ROW_S)
    acc = gl.zeros([BLOCK_H, HALF], gl.float32, O_LAYOUT)
    offs_n = gl.arange(0, TILE, layout=gl.SliceLayout(0, S_LAYOUT))
    for j in range(0, n_tiles):
        buf = j % 2
        nbuf = 1 - buf
        s_t = warpgroup_mma_wait(0, deps=(s, ))   # S_j complete
        s_t = gl.where((start + j * TILE + offs_n < end)[None, :], s_t * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s_t, 1))
        p = gl.exp2(s_t - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        mbarrier.wait(p_empty, (j & 1) ^ 1)        # the helper's P_{j-1} V_{j-1} complete (a fresh barrier passes)
        p_s.store(p.to(gl.float16))
        alpha_s.store(alpha)
        fence_async_shared()
        gl.thread_barrier()
        mbarrier.arrive(p_full)
        acc = acc * gl.convert_layout(alpha, ROW_O)[:, None]
        acc = warpgroup_mma(p_s, k_nope.index(buf).slice(HALF, HALF, dim=1), acc, is_async=True)
        mbarrier.wait(full.index(nbuf), ((j + 1) // 2) & 1)
        # An opaque zero keeps the query's MMA descriptors from being hoisted out of the loop into registers.
        zero = gl.inline_asm_elementwise("mov.b32 $0, 0;", "=r,r", [j], dtype=gl.int32, is_pure=False, pack=1)
        s = warpgroup_mma(q_nope.index(zero), k_nope.index(nbuf).permute((1, 0)), s_t, use_acc=False,
                          is_async=True)
        s = warpgroup_mma(q_pe.index(zero), k_pe.index(nbuf).permute((1, 0)), s, is_async=True)
        acc = warpgroup_mma_wait(2, deps=(acc, ))  # P_j V_j complete (the two score groups may stay in flight)
        gl.thread_barrier()
        mbarrier.arrive(empty.index(buf))          # our reads of tile j (K, V, P) are complete
        m_i = m_new
    s_t = warpgroup_mma_wait(0, deps=(s, ))       # the scores of the (empty) tile past the last
    _stamp(prow, 5, PROBE)
    SMEM_LAT: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    stage = k_nope.index(1)._reinterpret(gl.float16, [2, TILE // 2, L], SMEM_LAT)  # STAGED: tile buffer 1
    _pair_epilogue(acc, m_i, l_i, l_s, bar_fin, k_scale, o_base, stride_o_h, lse_base, 1, L, BLOCK_H, S_LAYOUT,
                   O_LAYOUT, stage, bar_done, STAGED)
    _stamp(prow, 6, PROBE)
    _merge_tail(mrg, 1, L, BLOCK_H, MERGE, SPLITS_POW2, MERGE_ROWS, L // 2)
    _stamp(prow, 7, PROBE, True)


@gluon.jit
def _helper_partition(k_nope, p_s, alpha_s, l_s, empty, p_full, p_empty, bar_fin, bar_done, start, end, k_scale,
                      o_base, stride_o_h, lse_base, L: gl.constexpr, BLOCK_H: gl.constexpr, TILE: gl.constexpr,
                      STAGED: gl.constexpr, prow, PROBE: gl.constexpr, mrg, MERGE: gl.constexpr,
                      SPLITS_POW2: gl.constexpr, MERGE_ROWS: gl.constexpr):
    """Output columns [0, L/2): P_j V_j with the scorer's P_j and alpha_j (the epilogue's warpgroup 0); MERGE: then
    the in-kernel split merge of those columns."""
    HALF: gl.constexpr = L // 2
    S_LAYOUT: gl.constexpr = mma_layout(TILE)  # scores [64, TILE]
    O_LAYOUT: gl.constexpr = mma_layout(L // 2)  # this warpgroup's half of O [64, L / 2]
    ROW_S: gl.constexpr = gl.SliceLayout(1, S_LAYOUT)
    ROW_O: gl.constexpr = gl.SliceLayout(1, O_LAYOUT)
    n_tiles = gl.cdiv(end - start, TILE)
    acc = gl.zeros([BLOCK_H, HALF], gl.float32, O_LAYOUT)
    for j in range(0, n_tiles):
        mbarrier.wait(p_full, j & 1)
        alpha = alpha_s.load(ROW_O)
        acc = acc * alpha[:, None]
        acc = warpgroup_mma(p_s, k_nope.index(j % 2).slice(0, HALF, dim=1), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        gl.thread_barrier()
        mbarrier.arrive(p_empty)
        mbarrier.arrive(empty.index(j % 2))
    _stamp(prow, 10, PROBE)
    unused = gl.zeros([BLOCK_H], gl.float32, ROW_S)
    SMEM_LAT: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    stage = k_nope.index(0)._reinterpret(gl.float16, [2, TILE // 2, L], SMEM_LAT)  # STAGED: tile buffer 0
    _pair_epilogue(acc, unused, unused, l_s, bar_fin, k_scale, o_base, stride_o_h, lse_base, 0, L, BLOCK_H, S_LAYOUT,
                   O_LAYOUT, stage, bar_done, STAGED)
    # 160 registers: 128 columns a step where a step's rows are 64 (bf16 partials; 256 spill)
    _merge_tail(mrg, 0, L, BLOCK_H, MERGE, SPLITS_POW2, MERGE_ROWS, L // 4 if MERGE_ROWS > 32 else L // 2)
    _stamp(prow, 11, PROBE)


@gluon.jit
def _tile_producer(k_nope, k_pe, full, empty, kv_ptr, bt_row, start, end, num_blocks, blk_words, tok_words,
                   PAGE: gl.constexpr, L: gl.constexpr, R: gl.constexpr, TILE: gl.constexpr, E5M2: gl.constexpr,
                   ONE_PAGE: gl.constexpr, LANES: gl.constexpr, PREFETCH: gl.constexpr, PF_CONTIG: gl.constexpr,
                   prow, PROBE: gl.constexpr):
    """Tile t (tokens start + 64 t ..) into buffer t % 2 in two 32-token halves, one half ahead in registers.
    PREFETCH > 0: the cache rows of the half PREFETCH tiles ahead are prefetched into L2 (_prefetch_half), their
    page ids loaded one iteration before (no wait on them in the loop)."""
    HALF_T: gl.constexpr = TILE // 2
    SUB: gl.constexpr = HALF_T // 4
    LAT_LAYOUT: gl.constexpr = lat_layout(LANES, 4, SUB)                        # [SUB, L / 4] words
    ROPE_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [4, 1], [1, 0])   # [HALF_T, R / 4] words
    SMEM_WORDS: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)
    nope_words = k_nope._reinterpret(gl.int32, [2, TILE, L // 2], SMEM_WORDS)
    pe_words = k_pe._reinterpret(gl.int32, [2, TILE, R // 2], SMEM_WORDS)
    kv_words = kv_ptr.to(gl.pointer_type(gl.int32), bitcast=True)
    n_halves = 2 * (gl.cdiv(end - start, TILE) + 1)  # one tile past the last: see the module docstring
    half = _load_tile(kv_words, bt_row, start, end, num_blocks, blk_words, tok_words,
                      PAGE, L, R, SUB, LAT_LAYOUT, ROPE_LAYOUT, ONE_PAGE)
    if PREFETCH > 0:
        gl.static_assert(L + R == 576 and HALF_T == 32, "prefetch sizes: 32 rows of 576 FP8 bytes")
        PF_LAYOUT: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        pf_e = gl.arange(0, 128, layout=PF_LAYOUT)  # a quarter of a row each: 32 rows x 4 chunks
        for k in gl.static_range(1, 2 * PREFETCH):
            n_k = start + k * HALF_T
            _prefetch_half(kv_ptr, _half_pages(bt_row, n_k, end, num_blocks, pf_e, PAGE, PF_CONTIG), n_k, end,
                           blk_words, tok_words, pf_e, PAGE, PF_CONTIG)
        pf_page = _half_pages(bt_row, start + 2 * PREFETCH * HALF_T, end, num_blocks, pf_e, PAGE, PF_CONTIG)
    for i in range(n_halves):
        t = i // 2
        b = t % 2
        if PREFETCH > 0:
            n_pf = start + (i + 2 * PREFETCH) * HALF_T
            _prefetch_half(kv_ptr, pf_page, n_pf, end, blk_words, tok_words, pf_e, PAGE, PF_CONTIG)
            pf_page = _half_pages(bt_row, n_pf + HALF_T, end, num_blocks, pf_e, PAGE, PF_CONTIG)
        nxt = _load_tile(kv_words, bt_row, start + (i + 1) * HALF_T, end, num_blocks, blk_words, tok_words,
                         PAGE, L, R, SUB, LAT_LAYOUT, ROPE_LAYOUT, ONE_PAGE)
        if i % 2 == 0:
            mbarrier.wait(empty.index(b), ((t // 2) & 1) ^ 1)  # a fresh barrier passes parity 1 at once
            _store_tile(half, nope_words.index(b).slice(0, HALF_T), pe_words.index(b).slice(0, HALF_T), SUB, E5M2)
            if PROBE:
                if i == 0:
                    _stamp(prow, 8, PROBE)
        else:
            _store_tile(half, nope_words.index(b).slice(HALF_T, HALF_T), pe_words.index(b).slice(HALF_T, HALF_T),
                        SUB, E5M2)
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.arrive(full.index(b))
        half = nxt
    _stamp(prow, 9, PROBE)


@gluon.jit
def _half_pages(bt_row, n0, end, num_blocks, pf_e, PAGE: gl.constexpr, CONTIG: gl.constexpr, CG: gl.constexpr = False):
    """Page ids of the prefetch lanes' rows (clamped into the cache; 0 past `end`): row n0 + pf_e // 4, or with
    CONTIG the half's one page (every lane the same). CG: the loads bypass L1 (reads before the PDL wait)."""
    MOD: gl.constexpr = ".cg" if CG else ""
    pos = n0 + pf_e * 0 if CONTIG else n0 + pf_e // 4
    page = gl.load(bt_row + pos // PAGE, mask=pos < end, other=0, cache_modifier=MOD)
    return gl.minimum(gl.maximum(page, 0), num_blocks - 1)


@gluon.jit
def _prefetch_half(kv_ptr, page, n0, end, blk_words, tok_words, pf_e, PAGE: gl.constexpr, CONTIG: gl.constexpr):
    """cp.async.bulk.prefetch.L2 of the 32 cache rows of tokens n0.. before `end`: with CONTIG (the 32 rows lie in
    one page, 576 bytes apart) one 18,432-byte prefetch by lane 0, else each of 128 lanes a quarter row (144 bytes;
    the instruction takes one address a warp at a time, so this form costs a 32-step loop a warp). The launcher
    enables prefetches only for a 16-byte aligned cache (the instruction's requirement)."""
    if CONTIG:
        off = page.to(gl.int64) * (blk_words * 4) + (n0 % PAGE) * (tok_words * 4)
        ok = (pf_e == 0) & (n0 < end)
        gl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], 18432; "
            "mov.b32 $0, 0; }", "=r,l,r", [kv_ptr + off, ok.to(gl.int32)], dtype=gl.int32, is_pure=False, pack=1)
    else:
        pos = n0 + pf_e // 4
        off = (page.to(gl.int64) * (blk_words * 4) + (pos % PAGE).to(gl.int64) * (tok_words * 4)
               + (pf_e % 4) * 144)
        ok = pos < end
        gl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], 144; mov.b32 $0, 0; }",
            "=r,l,r", [kv_ptr + off, ok.to(gl.int32)], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _prefetch_first_tile(kv_ptr, bt_row, start, end, num_blocks, blk_words, tok_words, PAGE: gl.constexpr,
                         TILE: gl.constexpr, PF_CONTIG: gl.constexpr):
    """PDL_EARLY: the tile at `start` (two 32-token halves) into L2, its page ids read with L1-bypassing loads (before
    the PDL wait: possibly stale, used for these prefetch addresses only, clamped like the real ones)."""
    pf_e = gl.arange(0, 128, layout=gl.BlockedLayout([1], [32], [4], [0]))
    for k in gl.static_range(2):
        n_k = start + k * (TILE // 2)
        _prefetch_half(kv_ptr, _half_pages(bt_row, n_k, end, num_blocks, pf_e, PAGE, PF_CONTIG, True), n_k, end,
                       blk_words, tok_words, pf_e, PAGE, PF_CONTIG)


@gluon.jit
def _merge_tail(mrg, WG: gl.constexpr, L: gl.constexpr, BLOCK_H: gl.constexpr, MERGE: gl.constexpr,
                SPLITS_POW2: gl.constexpr, MERGE_ROWS: gl.constexpr, COLS: gl.constexpr):
    """MERGE: warpgroup WG's arrival at the grid barrier and its share of the split merge. mrg: (counter, arrivals to
    wait for, part_o, part_lse, out, lse, pid_b, pid_s, head0, num_heads, num_splits, out's stride_b, stride_h)."""
    if MERGE:
        ctr, target, part_o, part_lse, out, lse, pid_b, pid_s, head0, num_heads, num_splits, s_b, s_h = mrg
        _grid_arrive_wait(ctr, target)
        _merge_half(part_o, part_lse, out, lse, pid_b, pid_s, head0, num_heads, num_splits, s_b, s_h, WG, L, BLOCK_H,
                    SPLITS_POW2, MERGE_ROWS, COLS)


@gluon.jit
def _grid_arrive_wait(ctr_ptr, target):
    """MERGE: this partition's arrival at the grid-wide barrier, then its wait for `target` arrivals (every CTA's two
    output warpgroups: the split kernel's grid, co-resident by its cooperative launch). The partition's warps first
    meet (their stores of o / lse issued before the arrival); its first thread makes them visible at GPU scope
    (fence.acq_rel.gpu, then a release add on the counter, which the launcher zeroes every launch) and polls the
    counter with acquire loads until it reaches `target`; the warps meet again, and read the other CTAs' rows with
    L1-bypassing loads after that. Every CTA arrives exactly once a warpgroup, whatever its split's length (empty
    splits included), so the count is always reached."""
    E_LAYOUT: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    e = gl.arange(0, 128, layout=E_LAYOUT)
    gl.thread_barrier()
    gl.inline_asm_elementwise(
        "{ .reg .pred p, q; .reg .s32 v; setp.ne.b32 p, $2, 0; @!p bra DONE; "
        "fence.acq_rel.gpu; red.release.gpu.global.add.s32 [$1], 1; "
        "WAIT: ld.acquire.gpu.global.s32 v, [$1]; setp.ge.s32 q, v, $3; @q bra DONE; nanosleep.u32 32; bra WAIT; "
        "DONE: mov.b32 $0, 0; }",
        "=r,l,r,r", [ctr_ptr + e * 0, (e == 0).to(gl.int32), target + e * 0], dtype=gl.int32, is_pure=False,
        pack=1)
    gl.thread_barrier()


@gluon.jit
def _merge_half(part_o_ptr, part_lse_ptr, out_ptr, lse_ptr, pid_b, pid_s, head0, num_heads, num_splits, stride_o_b,
                stride_o_h, WG: gl.constexpr, L: gl.constexpr, BLOCK_H: gl.constexpr, SPLITS_POW2: gl.constexpr,
                MERGE_ROWS: gl.constexpr, COLS: gl.constexpr):
    """MERGE, after the grid barrier: warpgroup WG merges output columns [WG L/2, (WG + 1) L/2) of the split partials of
    this CTA's share of its head group, the same merge as the combine kernel (_decode_launch.combine_splits): o =
    sum_s exp(lse_s - m) o_s / sum_s exp(lse_s - m), lse = m + log(that sum) (m the largest lse; no tokens in any
    split: o = 0, lse = -inf), into out / lse (WG 1 writes lse).

    The group's BLOCK_H heads are cut into blocks of HPS heads; the CTA of split s takes blocks s, s + num_splits, ...
    A block's lse's are loaded with its first column step, a [HPS, SPLITS_POW2, COLS] tile (HPS x SPLITS_POW2 =
    MERGE_ROWS rows of partials; L/2 / COLS steps): a thread holds MERGE_ROWS / SL rows (SL = min(SPLITS_POW2, 4)
    lanes across the splits) of COLS / (32 / SL) / 4 consecutive columns (16 bytes of bf16 at SL = 4 and 256
    columns), so the split sums are in-thread adds and shuffles among SL lanes (no shared memory) and the row
    addresses are few. The launcher keeps MERGE_ROWS x 2 values a thread within 64 registers (64 rows of bf16
    partials, 32 of fp32); the helper's 160 registers take 128 columns a step of 64 bf16 rows (spills at 256; still
    ~14 spill stores offline, Triton 3.6 sm_90). A form with 16 lanes across the splits and one 256-column step for
    both warpgroups (no spills) was slower on the GPU (session 15, 1x H100, RESULTS.md: s39 1 x 128 x 64K 51.3 / 51.8
    us and 2 x 128 x 32K 53.1 / 53.1 against this form's 50.9-51.3 / 51.3-51.8 in s38, the combine kernel 51.8-52.3 /
    53.6-54.0 on both machines): its 16-lane shuffle sums cost more than the helper's second step."""
    HALF: gl.constexpr = L // 2
    gl.static_assert(SPLITS_POW2 <= MERGE_ROWS, "all splits of a head in one step")
    HPS: gl.constexpr = MERGE_ROWS // SPLITS_POW2
    gl.static_assert(BLOCK_H % HPS == 0, "head blocks tile the group")
    SL: gl.constexpr = 4 if SPLITS_POW2 > 4 else SPLITS_POW2
    CL: gl.constexpr = 32 // SL
    gl.static_assert(COLS % (4 * CL) == 0 and HALF % COLS == 0, "column steps")
    T3: gl.constexpr = gl.BlockedLayout([HPS, SPLITS_POW2 // SL, COLS // (4 * CL)], [1, SL, CL], [1, 1, 4], [2, 1, 0])
    W2: gl.constexpr = gl.SliceLayout(2, T3)                                                        # [HPS, S2]
    O2: gl.constexpr = gl.SliceLayout(1, T3)                                                        # [HPS, COLS]
    hh = gl.arange(0, HPS, layout=gl.SliceLayout(1, W2))
    split = gl.arange(0, SPLITS_POW2, layout=gl.SliceLayout(0, W2))
    cols = gl.arange(0, COLS, layout=gl.SliceLayout(0, O2))
    ho = gl.arange(0, HPS, layout=gl.SliceLayout(1, O2))
    for hb in range(pid_s, BLOCK_H // HPS, num_splits):
        head = head0 + hb * HPS + hh                                                                # [HPS]
        rows = (pid_b * num_splits + split[None, :]) * num_heads + head[:, None]                     # [HPS, S2]
        ok = (split < num_splits)[None, :] & (head >= 0)[:, None]
        lse_s = gl.load(part_lse_ptr + rows, mask=ok, other=float("-inf"), cache_modifier=".cg")
        o_rows = gl.expand_dims(rows.to(gl.int64) * L, 2)
        w = lse_s
        denom_o = gl.zeros([HPS], gl.float32, gl.SliceLayout(1, O2))
        head_o = head0 + hb * HPS + ho
        for c0 in gl.static_range(WG * HALF, (WG + 1) * HALF, COLS):
            cc = c0 + cols
            cc3 = gl.expand_dims(gl.expand_dims(cc, 0), 1)                                          # [1, 1, COLS]
            o_s = gl.load(part_o_ptr + o_rows + cc3, mask=gl.expand_dims(ok, 2) & (cc3 >= 0), other=0.0,
                          cache_modifier=".cg")
            # the weights, once a block, after the first step's partials are loaded: computed before that load, they
            # would hold it back (ptxas does not move it above the exp; offline SASS: one L2 round trip more)
            if c0 == WG * HALF:
                m = gl.max(lse_s, 1)
                m_safe = gl.where(m == float("-inf"), 0.0, m)  # no tokens in any split: exp(-inf) = 0, no NaN
                w = gl.exp(lse_s - m_safe[:, None])
                denom = gl.sum(w, 1)
                has = denom > 0.0
                denom_o = gl.convert_layout(gl.where(has, denom, 1.0), gl.SliceLayout(1, O2))
                if WG == 1:
                    lse = gl.where(has, m_safe + gl.log(gl.where(has, denom, 1.0)), float("-inf"))
                    gl.store(lse_ptr + pid_b * num_heads + head, lse)
            acc = gl.sum(gl.expand_dims(w, 2) * o_s.to(gl.float32), 1)                              # [HPS, COLS]
            gl.store(out_ptr + pid_b * stride_o_b + head_o.to(gl.int64)[:, None] * stride_o_h + cc[None, :],
                     (acc / denom_o[:, None]).to(out_ptr.dtype.element_ty))


@gluon.jit
def _stamp(probe_ptr, slot, PROBE: gl.constexpr, GLOBAL: gl.constexpr = False):
    """PROBE (a development probe, off in the op): the SM's cycle counter (GLOBAL: the global nanosecond timer) into
    int64 slot `slot` of this CTA's probe row; every thread of the calling partition stores the same-time reading."""
    if PROBE:
        REG: gl.constexpr = "%globaltimer" if GLOBAL else "%clock64"
        t = gl.inline_asm_elementwise("mov.u64 $0, " + REG + ";", "=l", [], dtype=gl.int64, is_pure=False, pack=1)
        gl.store(probe_ptr + slot, t)


@gluon.jit
def _gdc(INSTR: gl.constexpr):
    """One grid-dependency-control instruction (griddepcontrol.wait / .launch_dependents), by every thread of the
    calling partition (the kernel calls it before warp_specialize: the default partition's 128 threads; the worker
    warps wait at the warp-specialize barrier until the default partition reaches that region)."""
    gl.inline_asm_elementwise(INSTR + " // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _mla_decode_scorer_kernel(
        q_ptr, kv_ptr, block_table_ptr, seq_lens_ptr, k_scale_ptr, q_scale_ptr,
        out_ptr, lse_ptr, part_o_ptr, part_lse_ptr,
        sm_scale, num_heads, num_splits, num_blocks, max_blocks,
        stride_q_b, stride_q_h, blk_words, tok_words, stride_bt_b, stride_o_b, stride_o_h,
        PAGE: gl.constexpr, L: gl.constexpr, R: gl.constexpr, BLOCK_H: gl.constexpr, TILE: gl.constexpr,
        Q_SHIFT: gl.constexpr, HAS_Q_SCALE: gl.constexpr, E5M2: gl.constexpr, SINGLE_SPLIT: gl.constexpr,
        ONE_PAGE: gl.constexpr, HELPER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, LANES: gl.constexpr,
        num_warps: gl.constexpr, PREFETCH: gl.constexpr = 0, PF_CONTIG: gl.constexpr = False,
        EARLY_Q: gl.constexpr = False, STAGED: gl.constexpr = False, PDL: gl.constexpr = False,
        PDL_EARLY: gl.constexpr = False, probe_ptr=None, PROBE: gl.constexpr = False,
        merge_ctr_ptr=None, MERGE: gl.constexpr = False,
        SPLITS_POW2: gl.constexpr = 1, MERGE_ROWS: gl.constexpr = 64):
    """PREFETCH: L2 prefetch distance in tiles (0: off; the launcher: a 16-byte aligned cache only); PF_CONTIG: a
    32-token half is 32 rows 576 bytes apart in one page (one prefetch); EARLY_Q / STAGED: the module docstring.
    PDL: launched as a programmatic dependent launch: the CTA waits (griddepcontrol.wait) for the previous kernel
    in the stream to complete and flush before it reads or writes any global memory, then lets the next kernel be
    scheduled early (the split merge, which waits for this grid the same way; with one split, whatever follows).
    PDL_EARLY (with PDL and PREFETCH's 16-byte aligned cache): before that wait, the first tile into L2
    (_prefetch_first_tile: L1-bypassing reads used for prefetch addresses only).
    MERGE (launched as a cooperative grid: every CTA co-resident; merge_ctr_ptr an int32 zeroed for this launch):
    the split merge in this kernel instead of the combine kernel after it. Each output warpgroup, after its
    epilogue, arrives at a grid-wide barrier (_grid_arrive_wait) and merges its columns of its CTA's share of the
    group's heads (_merge_half): no second kernel, its launch gap or its separate reads of the lse's.
    SPLITS_POW2: next power of two of num_splits; MERGE_ROWS: partial rows a merge step (the launcher).
    PROBE (development only; benchmarks/dev_scorer_probe.py): int64 timestamps at fixed points of each CTA's life into
    probe_ptr[cta, 0:16] (cta = (pid_b * num_splits + pid_s) * groups + pid_g; the slots: _PROBE_SLOTS there)."""
    gl.static_assert(num_warps == 4, "the default partition (the scorer) is one warpgroup")
    gl.static_assert(BLOCK_H == 64, "one warpgroup MMA height")
    gl.static_assert(TILE == 64, "64-token tiles, loaded as two 32-token halves")
    gl.static_assert((not ONE_PAGE) or PAGE % (TILE // 2) == 0, "ONE_PAGE: a half tile lies in one page")
    gl.static_assert((not PDL_EARLY) or (PDL and PREFETCH > 0), "PDL_EARLY: a PDL launch over a prefetchable cache")
    pid_g = gl.program_id(0)  # head group varies fastest: the groups of one tile run side by side and share L2
    pid_s = gl.program_id(1)
    pid_b = gl.program_id(2).to(gl.int64)
    head0 = pid_g * BLOCK_H
    bt_row = block_table_ptr + pid_b * stride_bt_b
    if PDL:
        if PDL_EARLY:  # the split range as read now (seq_lens bypassing L1), for the first tile's prefetch only
            e_start, e_end = _split_range(seq_lens_ptr, pid_b, pid_s, num_splits, max_blocks, PAGE, TILE, True)
            _prefetch_first_tile(kv_ptr, bt_row, e_start, gl.maximum(e_end, e_start), num_blocks, blk_words,
                                 tok_words, PAGE, TILE, PF_CONTIG)
        _gdc("griddepcontrol.wait;")
        _gdc("griddepcontrol.launch_dependents;")
    prow = bt_row  # unused without PROBE (warp_specialize takes no None)
    if PROBE:  # (after a PDL wait: its stores are global accesses)
        prow = probe_ptr + ((pid_b * num_splits + pid_s) * gl.num_programs(0) + pid_g) * 16
        _stamp(prow, 0, PROBE, True)
        _stamp(prow, 1, PROBE)

    SMEM_LAT: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    SMEM_P: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, TILE], gl.float16)
    SMEM_ROW: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])

    q_nope = gl.allocate_shared_memory(gl.float16, [1, BLOCK_H, L], SMEM_LAT)
    q_pe = gl.allocate_shared_memory(gl.float16, [1, BLOCK_H, R], SMEM_LAT)
    if not EARLY_Q:  # the query first, by all four default warps, before the partitions start
        q_nope_t, q_pe_t = _query_tiles(q_ptr, pid_b, head0, stride_q_b, stride_q_h, L, R, BLOCK_H, Q_SHIFT, num_warps)
        q_nope.index(0).store(q_nope_t)
        q_pe.index(0).store(q_pe_t)
    k_nope = gl.allocate_shared_memory(gl.float16, [2, TILE, L], SMEM_LAT)
    k_pe = gl.allocate_shared_memory(gl.float16, [2, TILE, R], SMEM_LAT)
    p_s = gl.allocate_shared_memory(gl.float16, [BLOCK_H, TILE], SMEM_P)
    alpha_s = gl.allocate_shared_memory(gl.float32, [BLOCK_H], SMEM_ROW)
    l_s = gl.allocate_shared_memory(gl.float32, [BLOCK_H], SMEM_ROW)
    full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    p_full = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    p_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    bar_fin = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    bar_done = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(full.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # the scorer and the helper both read a tile
    mbarrier.init(p_full, count=1)
    mbarrier.init(p_empty, count=1)
    mbarrier.init(bar_fin, count=1)
    mbarrier.init(bar_done, count=2)  # STAGED: both warpgroups' MMAs complete, the tile buffers take the output
    fence_async_shared()

    k_scale, qk_scale = _score_scale(sm_scale, k_scale_ptr, q_scale_ptr, Q_SHIFT, HAS_Q_SCALE)
    start, end = _split_range(seq_lens_ptr, pid_b, pid_s, num_splits, max_blocks, PAGE, TILE)
    # a split past the request's end has end < start: empty, not negative (a negative tile count would leave the
    # scorer's first full-barrier wait without a producer arrive: a hang)
    end = gl.maximum(end, start)
    o_base, o_stride, lse_base = _output_rows(out_ptr, lse_ptr, part_o_ptr, part_lse_ptr, pid_b, pid_s, head0,
                                              num_heads, num_splits, stride_o_b, stride_o_h, L, SINGLE_SPLIT)
    _stamp(prow, 2, PROBE)
    if MERGE:
        gl.static_assert(not SINGLE_SPLIT, "MERGE: a launch of several splits")
        n_arrive = 2 * gl.num_programs(0) * gl.num_programs(1) * gl.num_programs(2)
        mrg = (merge_ctr_ptr, n_arrive, part_o_ptr, part_lse_ptr, out_ptr, lse_ptr, pid_b, pid_s, head0, num_heads,
               num_splits, stride_o_b, stride_o_h)
    else:
        mrg = (seq_lens_ptr, )  # unused (warp_specialize takes no None)
    gl.warp_specialize([
        (_scorer_partition, (q_nope, q_pe, k_nope, k_pe, p_s, alpha_s, l_s, full, empty, p_full, p_empty, bar_fin,
                             bar_done, start, end, qk_scale, k_scale, o_base, o_stride, lse_base,
                             q_ptr, pid_b, head0, stride_q_b, stride_q_h,
                             L, R, BLOCK_H, TILE, Q_SHIFT, EARLY_Q, STAGED, prow, PROBE, mrg, MERGE, SPLITS_POW2,
                             MERGE_ROWS)),
        (_helper_partition, (k_nope, p_s, alpha_s, l_s, empty, p_full, p_empty, bar_fin, bar_done, start, end,
                             k_scale, o_base, o_stride, lse_base, L, BLOCK_H, TILE, STAGED, prow, PROBE, mrg, MERGE,
                             SPLITS_POW2, MERGE_ROWS)),
        (_tile_producer, (k_nope, k_pe, full, empty, kv_ptr, bt_row, start, end, num_blocks, blk_words, tok_words,
                          PAGE, L, R, TILE, E5M2, ONE_PAGE, LANES, PREFETCH, PF_CONTIG, prow, PROBE)),
    ], [4, 4], [HELPER_REGS, PRODUCER_REGS])
