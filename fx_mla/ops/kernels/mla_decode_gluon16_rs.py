"""Gluon (Hopper, sm_90) kernel of the memory-bound 16-head MLA decode with both MMAs' A operand in registers.

Import this module only where triton.experimental.gluon is the validated Triton 3.6 version (the launcher in
fx_mla/ops/mla_decode_gluon16.py imports it lazily, after gluon16_unsupported_reason returned None).

Why: the warp-specialized 16-head kernel (mla_decode_gluon16.py, "ws8p2") converts each FP8 tile into an fp16 tile in
shared memory, which both wgmmas then read (S^T = K Q^T and O^T += V^T P^T, N = 16 heads): per 64-token tile (36 KB
of HBM) about 250 KB of shared-memory traffic, so on an H200 the kernel is bound by shared memory, not by HBM. Here
the raw FP8 tile goes into shared memory once (TMA, 128-byte swizzle) and each consumer warpgroup reads it straight
into the register layout of a wgmma A operand, converts FP8 -> fp16 in registers and multiplies from registers:
TMA write 36 KB + two reads of 36 / 32 KB + Q and P (~35 KB) a tile, about 140 KB.

Partitions, one CTA per (split, request) with all 16 heads:
* loader (1 warp): TMA of tile j into ring slot j % NUM_STAGES (4 latent boxes [rows, 128 B] and one rope box
  [rows, 64 B] a page piece), one mbarrier `ready` a slot with the byte count; waits `empty` (both consumers done).
* scorer (4 warps, a worker): S^T [64 tokens, 16 heads] = K Q^T with A = K in registers, the online softmax, P^T and
  the per-head (alpha, l) into one of two P buffers (`pready`), lse at the end.
* P V (4 warps, the default partition): O^T [512, 16] += V^T P^T with A = V^T in registers, rescaled by alpha.

Register layouts of A come from the wgmma (DotOperandLayout, k_width 2): a thread holds 2 rows x 2 pairs a k-step.
A reduction index may be relabelled freely when both operands follow it, and an M index when the output does:
* scorer: K's column k (latent dim, also Q's column) is the physical byte perm_k(k), chosen so a thread's 16 entries
  of four k-steps are 16 consecutive bytes of a row (one 128-bit shared load); its row i is token sigma(i) (bits 0
  and 2 swapped), so that each quarter warp's loads hit 8 different 16-byte bank groups of the swizzled tile;
* P V: V^T's row m (latent dim, the output row) is the physical byte dim_of_row(m), again 16 consecutive bytes a
  thread a token; its column (token) is not relabelled; the output rows are written back to dim_of_row(m).
Both views are shared-memory reinterpretations (SharedLinearLayout) of the same swizzled bytes, so the loads are
plain ld.shared of the layout the MMA wants. Numerics are those of the other Gluon kernels (exact FP8 -> fp16, fp16
query scaled by 2**-Q_SHIFT, fp32 online softmax with p rounded to fp16, k_scale into the score scale and output).
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from fx_mla.ops.kernels.mla_decode_gluon import _cta_work, _perm_k, _query_tiles, _score_scale
from fx_mla.ops.kernels.mla_decode_scorer import mma_layout


# ---- index relabellings. The kernel computes them on index tensors; the launcher builds the shared-memory views
# from the same functions' Python bodies (`.fn`) on ints, so both use one formula each.
def _bit(x, b):
    return (x >> b) & 1


@gluon.jit
def _sigma_t(i):
    """Token of the scorer's row i within a 64-token tile: bits 0 and 2 swapped (an involution)."""
    return (i & ~5) | ((i & 1) << 2) | ((i >> 2) & 1)


@gluon.jit
def _dim_of_row_t(m):
    """Latent dim (physical byte of the 512-byte row) of the P V output row m: m = 64 mb + 16 w + 8 h + l4 (mb the
    wgmma M block, w the warp, h the fragment's second row, l4 = lane // 4) -> 128 w + 16 l4 + 2 mb + h."""
    return 128 * ((m >> 4) & 3) + 16 * (m & 7) + 2 * ((m >> 6) & 7) + ((m >> 3) & 1)


perm_k = _perm_k.fn
sigma = _sigma_t.fn
dim_of_row = _dim_of_row_t.fn


def perm_k_inverse(p):
    """Inverse of perm_k: byte bits (p0, p1, p2, p3, p4, p5, p6..) -> column bits (k0, k3, k4, k5, k1, k2, k6..)."""
    return ((p & ~63) | (_bit(p, 1) << 3) | (_bit(p, 2) << 4) | (_bit(p, 3) << 5) | (_bit(p, 4) << 1)
            | (_bit(p, 5) << 2) | (p & 1))


def row_of_dim(d):
    """Inverse of dim_of_row: byte d = 128 w + 16 l4 + 2 mb + h -> row m = 64 mb + 16 w + 8 h + l4."""
    w, l4, mb, h = (d >> 7) & 3, (d >> 4) & 7, (d >> 1) & 7, d & 1
    return 64 * mb + 16 * w + 8 * h + l4


def swizzled_bases(rows, row_bytes, swizzle, elem_bytes, chunks=1):
    """Offset bases (element offset bit -> (chunk, row, column)) of `chunks` stacked tiles [rows, row_bytes /
    elem_bytes] in the NVMMA / TMA swizzle of `swizzle` bytes: the 16-byte group g of byte address a is stored at
    g ^ ((a / 128) % (swizzle / 16)). Rows are exactly `swizzle` bytes here."""
    assert row_bytes == swizzle and swizzle in (64, 128)
    cols = row_bytes // elem_bytes
    per16 = 16 // elem_bytes
    groups = swizzle // 16
    bases = [(0, 0, 1 << b) for b in range(cols.bit_length() - 1)]
    for b in range(rows.bit_length() - 1):
        r = 1 << b
        bases.append((0, r, (((r * row_bytes) // 128) % groups) * per16))
    bases += [(1 << b, 0, 0) for b in range(chunks.bit_length() - 1)]
    return bases


def _linear(f, x):
    """f (linear over GF(2): a bit permutation) applied to x bit by bit."""
    out, b = 0, 0
    while x >> b:
        if (x >> b) & 1:
            out ^= f(1 << b)
        b += 1
    return out


# the P V accumulator O^T [512 rows m, 16 heads] (NVMMA v3, warps [4, 1], instr [16, 16, 16]) as Triton 3.6 lays it
# out: register / lane / warp bit -> (row, head) step
ACC_REGS = [[0, 1], [8, 0], [0, 8], [64, 0], [128, 0], [256, 0]]
ACC_LANES = [[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]]
ACC_WARPS = [[16, 0], [32, 0]]


def output_dims_layout(latent: int = 512, block_h: int = 16):
    """O_DIMS: the accumulator's own registers with each row m named by its latent dim dim_of_row(m), the registers
    ordered dims first, so a thread's 16 consecutive dims of a head are adjacent registers (16-byte stores)."""
    assert latent == 512 and block_h == 16, "dim_of_row and the accumulator bases are those of 512 x 16"

    def named(bases):
        return [[dim_of_row(r) if r else 0, h] for r, h in bases]

    regs = named(ACC_REGS)
    regs = sorted((b for b in regs if b[0]), key=lambda b: b[0]) + [b for b in regs if not b[0]]
    return gl.DistributedLinearLayout(reg_bases=regs, lane_bases=named(ACC_LANES), warp_bases=named(ACC_WARPS),
                                      block_bases=[], shape=[latent, block_h])


def views(block_n: int = 64, block_h: int = 16, latent: int = 512, rope: int = 64):
    """The shared-memory views (SharedLinearLayout offset bases) of the kernel:
    K_VIEW [block_n rows i, latent columns k] of a slot's latent tiles (4 chunks [block_n, 128 B], 128-byte swizzle):
        row i = token sigma(i), column k = byte perm_k(k);
    KR_VIEW [block_n, rope] of its rope tile ([block_n, 64 B], 64-byte swizzle), the same relabelling;
    V_VIEW [latent rows m, block_n tokens] of the latent tiles: row m = byte dim_of_row(m);
    PT_VIEW [block_h, block_n] of a P^T buffer (fp16, 128-byte swizzle) with column i = token sigma(i);
    and O_DIMS (output_dims_layout), the register layout of the output store."""
    k = [[_linear(sigma, r), _linear(perm_k_inverse, c * 128 + col)]
         for c, r, col in swizzled_bases(block_n, 128, 128, 1, latent // 128)]
    kr = [[_linear(sigma, r), _linear(perm_k_inverse, col)] for _, r, col in swizzled_bases(block_n, rope, rope, 1)]
    v = [[_linear(row_of_dim, c * 128 + col), r] for c, r, col in swizzled_bases(block_n, 128, 128, 1, latent // 128)]
    pt = [[r, _linear(sigma, col)] for _, r, col in swizzled_bases(block_h, 2 * block_n, 128, 2)]
    out = {name: gl.SharedLinearLayout(offset_bases=b) for name, b in
           (("K_VIEW", k), ("KR_VIEW", kr), ("V_VIEW", v), ("PT_VIEW", pt))}
    out["O_DIMS"] = output_dims_layout(latent, block_h)
    return out


# ---- the balanced schedule (BALANCED): every request's tiles laid end to end, request after request, and cut into
# num_ctas equal shares of whole tiles; CTA c takes tiles [c T / G, (c + 1) T / G) (T tiles in all, G CTAs). The part
# of request r that CTA c computes is a "segment": written straight into out / lse when it is the whole request,
# else into workspace slot r + c (unique: along the tiles, each new segment steps r, c or both), which the balanced
# combine (kernels/mla_decode_fp8._mla_decode_fp8_combine_balanced_kernel) merges. The cut depends on seq_lens only.
@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _balanced_range(seq_lens_ptr, tile_prefix_ptr, batch, cap, num_ctas, B_POW2: gl.constexpr, BLOCK_N: gl.constexpr,
                    NUM_WARPS: gl.constexpr):
    """(b_lo, b_hi, r_first, p_first, n_seg): this CTA's tiles [b_lo, b_hi) of the end-to-end order, the first
    request r_first with a tile at or after b_lo, the tiles before it (p_first), and the number of requests from
    r_first on whose tiles start before b_hi (empty requests among them give empty segments). CTA 0 also writes
    tile_prefix [B + 1] (request r's tiles start at tile_prefix[r]; tile_prefix[B] = T) for the balanced combine."""
    LAY: gl.constexpr = gl.BlockedLayout([1], [32], [NUM_WARPS], [0])
    idx = gl.arange(0, B_POW2, layout=LAY)
    lens = gl.load(seq_lens_ptr + idx, mask=idx < batch, other=0).to(gl.int32)
    nt = (gl.minimum(gl.maximum(lens, 0), cap) + (BLOCK_N - 1)) // BLOCK_N
    incl = gl.associative_scan(nt, 0, _add)
    total = gl.sum(nt, 0).to(gl.int64)
    c = gl.program_id(0).to(gl.int64)
    b_lo = ((c * total) // num_ctas).to(gl.int32)
    b_hi = (((c + 1) * total) // num_ctas).to(gl.int32)
    r_first = gl.sum((incl <= b_lo).to(gl.int32), 0)
    p_first = gl.sum(gl.where(idx < r_first, nt, 0), 0)
    n_seg = gl.maximum(gl.sum((incl - nt < b_hi).to(gl.int32), 0) - r_first, 0)
    if c == 0:
        gl.store(tile_prefix_ptr + idx, incl - nt, mask=idx < batch)
        gl.store(tile_prefix_ptr + batch, total.to(gl.int32))
    return b_lo, b_hi, r_first, p_first, n_seg


@gluon.jit
def _rs_segment(seq_lens_ptr, r, p, b_lo, b_hi, cap, BLOCK_N: gl.constexpr):
    """Request r (its first tile at p in the end-to-end order) within [b_lo, b_hi): tokens [start, end) (end =
    start when the request has no tile there), its tile count nt, and whether the segment is the whole request."""
    n = gl.minimum(gl.maximum(gl.load(seq_lens_ptr + r).to(gl.int32), 0), cap)
    nt = gl.cdiv(n, BLOCK_N)
    lo = gl.maximum(b_lo - p, 0)
    hi = gl.minimum(b_hi - p, nt)
    start = lo * BLOCK_N
    end = gl.maximum(gl.minimum(hi * BLOCK_N, n), start)
    return start, end, nt, (lo == 0) & (hi == nt)


# ---- partitions: each runs a per-tile step (_rs_load_tile, _rs_score_tile, _rs_pv_tile) over one split's tiles
# (_rs_loader, _rs_scorer, _rs_pv) or over the segments of a balanced share (the *_balanced forms); j counts the
# CTA's tiles for the ring slots and phases
@gluon.jit
def _rs_load_tile(lat_desc, rope_desc, lat_ring, rope_ring, ready, empty, bt_row, n0, end, num_blocks, j,
                  PAGE: gl.constexpr, L: gl.constexpr, R: gl.constexpr, BLOCK_N: gl.constexpr, BOX: gl.constexpr,
                  NUM_STAGES: gl.constexpr):
    """TMA of the tile at token n0 into ring slot j % NUM_STAGES: BLOCK_N / BOX page pieces of BOX rows, each 4
    latent boxes of 128 bytes and one rope box. Page ids are clamped into the cache; a piece past `end` reads page 0
    (its rows are masked by the consumers); rows past the cache's end are zero-filled by the TMA unit."""
    CHUNK: gl.constexpr = 128
    s = j % NUM_STAGES
    mbarrier.wait(empty.index(s), ((j // NUM_STAGES) & 1) ^ 1)
    mbarrier.expect(ready.index(s), BLOCK_N * (L + R))
    for piece in gl.static_range(BLOCK_N // BOX):
        t0 = n0 + piece * BOX
        page = gl.load(bt_row + t0 // PAGE, mask=t0 < end, other=0)
        page = gl.minimum(gl.maximum(page, 0), num_blocks - 1)
        row = page * PAGE + t0 % PAGE
        for c in gl.static_range(L // CHUNK):
            tma.async_copy_global_to_shared(lat_desc, [row, c * CHUNK], ready.index(s),
                                            lat_ring.index(s).slice(c * BLOCK_N + piece * BOX, BOX))
        tma.async_copy_global_to_shared(rope_desc, [row, L], ready.index(s),
                                        rope_ring.index(s).slice(piece * BOX, BOX))


@gluon.jit
def _rs_loader(lat_desc, rope_desc, lat_ring, rope_ring, ready, empty, bt_row, start, end, num_blocks,
               PAGE: gl.constexpr, L: gl.constexpr, R: gl.constexpr, BLOCK_N: gl.constexpr, BOX: gl.constexpr,
               NUM_STAGES: gl.constexpr):
    """The split's tiles into the ring (_rs_load_tile)."""
    n_tiles = gl.cdiv(end - start, BLOCK_N)
    for j in range(n_tiles):
        _rs_load_tile(lat_desc, rope_desc, lat_ring, rope_ring, ready, empty, bt_row, start + j * BLOCK_N, end,
                      num_blocks, j, PAGE, L, R, BLOCK_N, BOX, NUM_STAGES)


@gluon.jit
def _rs_loader_balanced(lat_desc, rope_desc, lat_ring, rope_ring, ready, empty, block_table_ptr, stride_bt_b,
                        seq_lens_ptr, r_first, p_first, b_lo, b_hi, n_seg, cap, num_blocks, PAGE: gl.constexpr,
                        L: gl.constexpr, R: gl.constexpr, BLOCK_N: gl.constexpr, BOX: gl.constexpr,
                        NUM_STAGES: gl.constexpr):
    """Every segment's tiles into the ring, one after the other (the ring runs on across segments)."""
    j0 = 0
    r = r_first
    p = p_first
    for _ in range(n_seg):
        start, end, nt, _whole = _rs_segment(seq_lens_ptr, r, p, b_lo, b_hi, cap, BLOCK_N)
        bt_row = block_table_ptr + r.to(gl.int64) * stride_bt_b
        n_tiles = gl.cdiv(end - start, BLOCK_N)
        for t in range(n_tiles):
            _rs_load_tile(lat_desc, rope_desc, lat_ring, rope_ring, ready, empty, bt_row, start + t * BLOCK_N, end,
                          num_blocks, j0 + t, PAGE, L, R, BLOCK_N, BOX, NUM_STAGES)
        j0 += n_tiles
        p += nt
        r += 1


@gluon.jit
def _rs_score_tile(q_nope_smem, q_pe_smem, lat_ring, rope_ring, p_smem, stat_smem, ready, empty, pready, pfree, j,
                   n0, end, qk_scale, m_i, l_i, L: gl.constexpr, R: gl.constexpr, BLOCK_H: gl.constexpr,
                   BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, K_VIEW: gl.constexpr, KR_VIEW: gl.constexpr,
                   PT_VIEW: gl.constexpr):
    """Scores of the tile in ring slot j % NUM_STAGES (tokens from n0, masked at `end`), the online softmax step,
    P^T and (alpha, l) into P buffer j % 2; returns the new (m_i, l_i)."""
    S_LAYOUT: gl.constexpr = mma_layout(BLOCK_H)  # S^T [tokens, heads]
    A_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=S_LAYOUT, k_width=2)
    dtype: gl.constexpr = lat_ring.dtype
    s_zero = gl.zeros([BLOCK_N, BLOCK_H], gl.float32, S_LAYOUT)
    tok = _sigma_t(gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, S_LAYOUT)))
    s = j % NUM_STAGES
    mbarrier.wait(ready.index(s), (j // NUM_STAGES) & 1)
    k_lat = lat_ring.index(s)._reinterpret(dtype, [BLOCK_N, L], K_VIEW).load(A_LAYOUT)
    k_pe = rope_ring.index(s)._reinterpret(dtype, [BLOCK_N, R], KR_VIEW).load(A_LAYOUT)
    acc = warpgroup_mma(k_lat.to(gl.float16), q_nope_smem.permute((1, 0)), s_zero, use_acc=False, is_async=True)
    acc = warpgroup_mma(k_pe.to(gl.float16), q_pe_smem.permute((1, 0)), acc, is_async=True)
    sc = warpgroup_mma_wait(0, deps=(acc, ))
    gl.thread_barrier()  # every thread of this partition has read slot s
    mbarrier.arrive(empty.index(s))
    # ---- online softmax over the tokens (axis 0); the tile's first token is valid, so maxima are finite
    sc = gl.where((n0 + tok < end)[:, None], sc * qk_scale, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(sc, 0))
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(sc - m_new[None, :])
    l_i = l_i * alpha + gl.sum(p, 0)
    b = j % 2
    mbarrier.wait(pfree.index(b), ((j // 2) & 1) ^ 1)
    p_smem.index(b)._reinterpret(gl.float16, [BLOCK_H, BLOCK_N], PT_VIEW).store(gl.permute(p.to(gl.float16), (1, 0)))
    stat_smem.index(2 * b).store(alpha)
    stat_smem.index(2 * b + 1).store(l_i)
    fence_async_shared()
    gl.thread_barrier()
    mbarrier.arrive(pready.index(b))
    return m_new, l_i


@gluon.jit
def _rs_lse(m_i, l_i):
    """Natural-log lse of the softmax state; -inf where no token was scored."""
    has_tok = l_i > 0.0
    return gl.where(has_tok, (m_i + gl.log2(gl.where(has_tok, l_i, 1.0))) * 0.6931471805599453, float("-inf"))


@gluon.jit
def _rs_scorer(q_nope_smem, q_pe_smem, lat_ring, rope_ring, p_smem, stat_smem, ready, empty, pready, pfree,
               start, end, qk_scale, lse_base, L: gl.constexpr, R: gl.constexpr, BLOCK_H: gl.constexpr,
               BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, K_VIEW: gl.constexpr, KR_VIEW: gl.constexpr,
               PT_VIEW: gl.constexpr):
    """S^T = K Q^T and the online softmax over the split's tiles (_rs_score_tile); its lse at the end."""
    STAT: gl.constexpr = gl.SliceLayout(0, mma_layout(BLOCK_H))
    n_tiles = gl.cdiv(end - start, BLOCK_N)
    m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, STAT)
    l_i = gl.zeros([BLOCK_H], gl.float32, STAT)
    for j in range(n_tiles):
        m_i, l_i = _rs_score_tile(q_nope_smem, q_pe_smem, lat_ring, rope_ring, p_smem, stat_smem, ready, empty,
                                  pready, pfree, j, start + j * BLOCK_N, end, qk_scale, m_i, l_i, L, R, BLOCK_H,
                                  BLOCK_N, NUM_STAGES, K_VIEW, KR_VIEW, PT_VIEW)
    gl.store(lse_base + gl.arange(0, BLOCK_H, layout=STAT), _rs_lse(m_i, l_i))


@gluon.jit
def _rs_scorer_balanced(q_ptr, stride_q_b, stride_q_h, q_nope_smem, q_pe_smem, lat_ring, rope_ring, p_smem,
                        stat_smem, ready, empty, pready, pfree, seq_lens_ptr, r_first, p_first, b_lo, b_hi, n_seg,
                        cap, qk_scale, lse_ptr, part_lse_ptr, L: gl.constexpr, R: gl.constexpr,
                        BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr, Q_SHIFT: gl.constexpr,
                        NUM_STAGES: gl.constexpr, K_VIEW: gl.constexpr, KR_VIEW: gl.constexpr,
                        PT_VIEW: gl.constexpr):
    """The scorer over the segments: each loads its request's query into shared memory first (the previous
    segment's MMAs have completed: _rs_score_tile waits for them), and writes its lse into lse (a whole request)
    or into the workspace slot r + c."""
    STAT: gl.constexpr = gl.SliceLayout(0, mma_layout(BLOCK_H))
    heads = gl.arange(0, BLOCK_H, layout=STAT)
    c = gl.program_id(0)
    j0 = 0
    r = r_first
    p = p_first
    for _ in range(n_seg):
        start, end, nt, whole = _rs_segment(seq_lens_ptr, r, p, b_lo, b_hi, cap, BLOCK_N)
        n_tiles = gl.cdiv(end - start, BLOCK_N)
        if n_tiles > 0:
            q_nope, q_pe = _query_tiles(q_ptr, r.to(gl.int64), 0, stride_q_b, stride_q_h, L, R, BLOCK_H, Q_SHIFT,
                                        4, True)
            q_nope_smem.store(q_nope)
            q_pe_smem.store(q_pe)
            fence_async_shared()
            gl.thread_barrier()
            m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, STAT)
            l_i = gl.zeros([BLOCK_H], gl.float32, STAT)
            for t in range(n_tiles):
                m_i, l_i = _rs_score_tile(q_nope_smem, q_pe_smem, lat_ring, rope_ring, p_smem, stat_smem, ready,
                                          empty, pready, pfree, j0 + t, start + t * BLOCK_N, end, qk_scale, m_i,
                                          l_i, L, R, BLOCK_H, BLOCK_N, NUM_STAGES, K_VIEW, KR_VIEW, PT_VIEW)
            if whole:
                gl.store(lse_ptr + r.to(gl.int64) * BLOCK_H + heads, _rs_lse(m_i, l_i))
            else:
                gl.store(part_lse_ptr + (r + c).to(gl.int64) * BLOCK_H + heads, _rs_lse(m_i, l_i))
        j0 += n_tiles
        p += nt
        r += 1


def _pairs_asm(fp8):
    """PTX of _token_pairs_fp16 for FP8 format `fp8` ("e4m3" / "e5m2"): two byte permutes, four exact conversions."""
    return ("{ .reg .b32 a, b; .reg .b16 a0, a1, b0, b1; prmt.b32 a, $4, $5, 0x5140; prmt.b32 b, $4, $5, 0x7362; "
            "mov.b32 {a0, a1}, a; mov.b32 {b0, b1}, b; "
            + " ".join(f"cvt.rn.f16x2.{fp8}x2 ${i}, {r};" for i, r in enumerate(("a0", "a1", "b0", "b1"))) + " }")


_PAIRS_ASM_E4M3 = gl.constexpr(_pairs_asm("e4m3"))
_PAIRS_ASM_E5M2 = gl.constexpr(_pairs_asm("e5m2"))


@gluon.jit
def _token_pairs_fp16(x, E5M2: gl.constexpr):
    """x: FP8 bytes [L rows m, BLOCK_N tokens] in _rs_pv's V_LOAD order (a thread's 16 bytes of a token are its
    rows m3, m6, m7, m8) -> the fp16 tensor [L, BLOCK_N] whose 32-bit registers hold two tokens of one row, as the
    wgmma A operand wants: per 4 bytes of tokens 2u and 2u + 1, two byte permutes and four exact conversions."""
    xe, xo = gl.split(gl.reshape(x, [x.shape[0], x.shape[1] // 2, 2]))
    # $4 / $5: bytes (d, d+1, d+2, d+3) of tokens 2u / 2u + 1; a = (2u: d, 2u+1: d, 2u: d+1, 2u+1: d+1), b for d+2, d+3
    if E5M2:
        asm: gl.constexpr = _PAIRS_ASM_E5M2
    else:
        asm: gl.constexpr = _PAIRS_ASM_E4M3
    lo, hi = gl.inline_asm_elementwise(
        asm,
        "=r,=r,=r,=r,r,r", [xe, xo], dtype=(gl.float16, gl.float16), is_pure=True, pack=4)
    # lo / hi [L, BLOCK_N / 2]: in the slot of (m3, m6) = (e, r) the entry of token 2u + e, row bit m3 = r, and
    # m6 = 0 (lo) / 1 (hi). Relabel: m6' -> m3, m3' -> the token's bit 0, the new last dim -> m6.
    z = gl.reshape(gl.join(lo, hi), [2, 2, 2, 2, 2, 2, 8, x.shape[1] // 2, 2])
    z = gl.permute(z, (0, 1, 8, 3, 4, 2, 6, 7, 5))
    return gl.reshape(z, [x.shape[0], x.shape[1]])


@gluon.jit
def _rs_pv_tile(lat_ring, p_smem, stat_smem, ready, empty, pready, pfree, j, n0, end, acc, L: gl.constexpr,
                BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, V_VIEW: gl.constexpr,
                E5M2: gl.constexpr):
    """O^T += V^T P^T for the tile in ring slot j % NUM_STAGES (tokens from n0, zeroed at `end`) after rescaling by
    alpha; returns (acc, l) with l the scorer's running sum published with this tile's P."""
    O_LAYOUT: gl.constexpr = mma_layout(BLOCK_H)  # O^T [L, heads]
    A_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_LAYOUT, k_width=2)
    # the A operand's entries of a thread, registers ordered as 16 consecutive bytes of a token first (m3, m6..m8
    # are the byte's bits 0..3): one 128-bit load a token; the fp16 pairs of the MMA (two tokens) are formed after
    V_LOAD: gl.constexpr = gl.DistributedLinearLayout(
        reg_bases=[[8, 0], [64, 0], [128, 0], [256, 0], [0, 1], [0, 8], [0, 16], [0, 32]],
        lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]], warp_bases=[[16, 0], [32, 0]], block_bases=[],
        shape=[L, BLOCK_N])
    STAT: gl.constexpr = gl.SliceLayout(0, O_LAYOUT)
    toks = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, V_LOAD))
    s = j % NUM_STAGES
    mbarrier.wait(ready.index(s), (j // NUM_STAGES) & 1)
    x = lat_ring.index(s)._reinterpret(gl.uint8, [L, BLOCK_N], V_VIEW).load(V_LOAD)
    if n0 + BLOCK_N > end:  # rows past the end hold other tokens' bytes (maybe NaN): zero, as p is 0 there
        x = gl.where((n0 + toks < end)[None, :], x, 0)
    v = _token_pairs_fp16(x, E5M2)
    v = gl.convert_layout(v, A_LAYOUT, assert_trivial=True)
    gl.thread_barrier()
    mbarrier.arrive(empty.index(s))
    b = j % 2
    mbarrier.wait(pready.index(b), (j // 2) & 1)
    alpha = stat_smem.index(2 * b).load(STAT)
    l_o = stat_smem.index(2 * b + 1).load(STAT)
    acc = acc * alpha[None, :]
    acc = warpgroup_mma(v, p_smem.index(b).permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc, ))
    gl.thread_barrier()
    mbarrier.arrive(pfree.index(b))
    return acc, l_o


@gluon.jit
def _rs_store_o(o, o_base, o_stride, L: gl.constexpr, BLOCK_H: gl.constexpr, DIM_MAJOR_STORE: gl.constexpr,
                O_DIMS: gl.constexpr):
    """The normalized O^T [L rows m, BLOCK_H] into rows o_base + head * o_stride, row m at its dim dim_of_row(m)."""
    if DIM_MAJOR_STORE:
        # relabel the rows m = 64 mb + 16 w + 8 h + l4 as their dims 128 w + 16 l4 + 2 mb + h (no data moves), then
        # order each thread's registers dims first (O_DIMS, output_dims_layout): its 16 consecutive dims of a head
        # are 16-byte vector stores (row-wise, each 4-byte store of a warp hits 32 sectors)
        z = gl.permute(gl.reshape(o, [8, 4, 2, 8, BLOCK_H]), (1, 3, 0, 2, 4))
        o = gl.convert_layout(gl.reshape(z, [L, BLOCK_H]), O_DIMS, assert_trivial=True)
        heads = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(0, O_DIMS))
        dims = gl.arange(0, L, layout=gl.SliceLayout(1, O_DIMS))
    else:
        O_LAYOUT: gl.constexpr = mma_layout(BLOCK_H)
        heads = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(0, O_LAYOUT))
        dims = _dim_of_row_t(gl.arange(0, L, layout=gl.SliceLayout(1, O_LAYOUT)))
    gl.store(o_base + heads.to(gl.int64)[None, :] * o_stride + dims[:, None], o.to(o_base.dtype.element_ty))


@gluon.jit
def _rs_pv(lat_ring, p_smem, stat_smem, ready, empty, pready, pfree, start, end, k_scale, o_base, o_stride,
           L: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
           V_VIEW: gl.constexpr, E5M2: gl.constexpr, DIM_MAJOR_STORE: gl.constexpr, O_DIMS: gl.constexpr):
    """O^T over the split's tiles (_rs_pv_tile), normalized and stored (_rs_store_o)."""
    O_LAYOUT: gl.constexpr = mma_layout(BLOCK_H)
    n_tiles = gl.cdiv(end - start, BLOCK_N)
    acc = gl.zeros([L, BLOCK_H], gl.float32, O_LAYOUT)
    l_o = gl.full([BLOCK_H], 1.0, gl.float32, gl.SliceLayout(0, O_LAYOUT))
    for j in range(n_tiles):
        acc, l_o = _rs_pv_tile(lat_ring, p_smem, stat_smem, ready, empty, pready, pfree, j, start + j * BLOCK_N, end,
                               acc, L, BLOCK_H, BLOCK_N, NUM_STAGES, V_VIEW, E5M2)
    o = acc * (k_scale / gl.where(l_o > 0.0, l_o, 1.0))[None, :]
    _rs_store_o(o, o_base, o_stride, L, BLOCK_H, DIM_MAJOR_STORE, O_DIMS)


@gluon.jit
def _rs_pv_balanced(lat_ring, p_smem, stat_smem, ready, empty, pready, pfree, seq_lens_ptr, r_first, p_first, b_lo,
                    b_hi, n_seg, cap, k_scale, out_ptr, part_o_ptr, stride_o_b, stride_o_h, L: gl.constexpr,
                    BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, V_VIEW: gl.constexpr,
                    E5M2: gl.constexpr, DIM_MAJOR_STORE: gl.constexpr, O_DIMS: gl.constexpr):
    """P V over the segments: each segment's O into out (a whole request) or into workspace slot r + c."""
    O_LAYOUT: gl.constexpr = mma_layout(BLOCK_H)
    c = gl.program_id(0)
    j0 = 0
    r = r_first
    p = p_first
    for _ in range(n_seg):
        start, end, nt, whole = _rs_segment(seq_lens_ptr, r, p, b_lo, b_hi, cap, BLOCK_N)
        n_tiles = gl.cdiv(end - start, BLOCK_N)
        if n_tiles > 0:
            acc = gl.zeros([L, BLOCK_H], gl.float32, O_LAYOUT)
            l_o = gl.full([BLOCK_H], 1.0, gl.float32, gl.SliceLayout(0, O_LAYOUT))
            for t in range(n_tiles):
                acc, l_o = _rs_pv_tile(lat_ring, p_smem, stat_smem, ready, empty, pready, pfree, j0 + t,
                                       start + t * BLOCK_N, end, acc, L, BLOCK_H, BLOCK_N, NUM_STAGES, V_VIEW, E5M2)
            o = acc * (k_scale / gl.where(l_o > 0.0, l_o, 1.0))[None, :]
            if whole:
                _rs_store_o(o, out_ptr + r.to(gl.int64) * stride_o_b, stride_o_h, L, BLOCK_H, DIM_MAJOR_STORE,
                            O_DIMS)
            else:
                _rs_store_o(o, part_o_ptr + (r + c).to(gl.int64) * (BLOCK_H * L), L, L, BLOCK_H, DIM_MAJOR_STORE,
                            O_DIMS)
        j0 += n_tiles
        p += nt
        r += 1


@gluon.jit
def _mla_decode_gluon16_rs_kernel(
        q_ptr, lat_desc, rope_desc, block_table_ptr, seq_lens_ptr, k_scale_ptr, q_scale_ptr,
        out_ptr, lse_ptr, part_o_ptr, part_lse_ptr,
        sm_scale, num_heads, num_splits, num_blocks, max_blocks,
        stride_q_b, stride_q_h, stride_bt_b, stride_o_b, stride_o_h, batch, tile_prefix_ptr,
        PAGE: gl.constexpr, L: gl.constexpr, R: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr,
        Q_SHIFT: gl.constexpr, HAS_Q_SCALE: gl.constexpr, E5M2: gl.constexpr, SINGLE_SPLIT: gl.constexpr,
        NUM_STAGES: gl.constexpr, DIM_MAJOR_STORE: gl.constexpr, BALANCED: gl.constexpr, B_POW2: gl.constexpr,
        SCORER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr, K_VIEW: gl.constexpr, KR_VIEW: gl.constexpr,
        V_VIEW: gl.constexpr, PT_VIEW: gl.constexpr, O_DIMS: gl.constexpr, num_warps: gl.constexpr):
    """Grid (num_splits, batch): CTA (s, b) computes split s of request b. BALANCED: grid (num_splits,) with
    num_splits the CTA count G; CTA c computes its equal share of all requests' tiles (_balanced_range), whole
    requests into out / lse and parts of requests into workspace slots r + c (B_POW2 >= batch), and CTA 0 the
    requests' first tiles into tile_prefix [B + 1] int32 for the balanced combine (unused by the split form)."""
    gl.static_assert(num_warps == 4, "the default partition (P V) is one warpgroup")
    gl.static_assert(BLOCK_N == 64, "the wgmma M side of S^T: one warpgroup, 64 tokens")
    gl.static_assert(BLOCK_H == 16, "wgmma N = the 16 heads")
    gl.static_assert(L == 512 and R == 64, "latent 4 x 128 bytes, rope 64 bytes")
    BOX: gl.constexpr = lat_desc.block_shape[0]
    gl.static_assert(BLOCK_N % BOX == 0 and (PAGE % BLOCK_N == 0 or PAGE == BOX), "a box is a page piece")
    SMEM_16: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    LAT_SMEM: gl.constexpr = lat_desc.layout
    ROPE_SMEM: gl.constexpr = rope_desc.layout
    dtype: gl.constexpr = lat_desc.dtype

    if BALANCED:  # each segment's query is loaded by the scorer
        q_nope_smem = gl.allocate_shared_memory(gl.float16, [BLOCK_H, L], SMEM_16)
        q_pe_smem = gl.allocate_shared_memory(gl.float16, [BLOCK_H, R], SMEM_16)
    else:
        q_nope, q_pe = _query_tiles(q_ptr, gl.program_id(1).to(gl.int64), 0, stride_q_b, stride_q_h, L, R, BLOCK_H,
                                    Q_SHIFT, num_warps, True)
        q_nope_smem = gl.allocate_shared_memory(gl.float16, [BLOCK_H, L], SMEM_16, q_nope)
        q_pe_smem = gl.allocate_shared_memory(gl.float16, [BLOCK_H, R], SMEM_16, q_pe)
    lat_ring = gl.allocate_shared_memory(dtype, [NUM_STAGES, (L // 128) * BLOCK_N, 128], LAT_SMEM)
    rope_ring = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, R], ROPE_SMEM)
    p_smem = gl.allocate_shared_memory(gl.float16, [2, BLOCK_H, BLOCK_N], SMEM_16)
    stat_smem = gl.allocate_shared_memory(gl.float32, [4, BLOCK_H],
                                          gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0]))
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    pready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    pfree = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # the scorer and the P V partition
    for i in gl.static_range(2):
        mbarrier.init(pready.index(i), count=1)
        mbarrier.init(pfree.index(i), count=1)
    fence_async_shared()

    if BALANCED:
        k_scale, qk_scale = _score_scale(sm_scale, k_scale_ptr, q_scale_ptr, Q_SHIFT, HAS_Q_SCALE)
        cap = max_blocks * PAGE
        b_lo, b_hi, r_first, p_first, n_seg = _balanced_range(seq_lens_ptr, tile_prefix_ptr, batch, cap, num_splits,
                                                               B_POW2, BLOCK_N, num_warps)
        gl.warp_specialize([
            (_rs_pv_balanced, (lat_ring, p_smem, stat_smem, ready, empty, pready, pfree, seq_lens_ptr, r_first,
                               p_first, b_lo, b_hi, n_seg, cap, k_scale, out_ptr, part_o_ptr, stride_o_b,
                               stride_o_h, L, BLOCK_H, BLOCK_N, NUM_STAGES, V_VIEW, E5M2, DIM_MAJOR_STORE, O_DIMS)),
            (_rs_scorer_balanced, (q_ptr, stride_q_b, stride_q_h, q_nope_smem, q_pe_smem, lat_ring, rope_ring, p_smem,
                                   stat_smem, ready, empty, pready, pfree, seq_lens_ptr, r_first, p_first, b_lo, b_hi,
                                   n_seg, cap, qk_scale, lse_ptr, part_lse_ptr, L, R, BLOCK_H, BLOCK_N, Q_SHIFT,
                                   NUM_STAGES, K_VIEW, KR_VIEW, PT_VIEW)),
            (_rs_loader_balanced, (lat_desc, rope_desc, lat_ring, rope_ring, ready, empty, block_table_ptr,
                                   stride_bt_b, seq_lens_ptr, r_first, p_first, b_lo, b_hi, n_seg, cap, num_blocks,
                                   PAGE, L, R, BLOCK_N, BOX, NUM_STAGES)),
        ], [4, 1], [SCORER_REGS, LOADER_REGS])
    else:
        k_scale, qk_scale, start, end, bt_row, o_base, o_stride, lse_base = _cta_work(
            sm_scale, k_scale_ptr, q_scale_ptr, seq_lens_ptr, block_table_ptr, out_ptr, lse_ptr, part_o_ptr,
            part_lse_ptr, gl.program_id(1).to(gl.int64), gl.program_id(0), num_heads, num_splits, max_blocks,
            stride_bt_b, stride_o_b, stride_o_h, PAGE, L, BLOCK_N, Q_SHIFT, HAS_Q_SCALE, SINGLE_SPLIT)
        gl.warp_specialize([
            (_rs_pv, (lat_ring, p_smem, stat_smem, ready, empty, pready, pfree, start, end, k_scale, o_base, o_stride,
                      L, BLOCK_H, BLOCK_N, NUM_STAGES, V_VIEW, E5M2, DIM_MAJOR_STORE, O_DIMS)),
            (_rs_scorer, (q_nope_smem, q_pe_smem, lat_ring, rope_ring, p_smem, stat_smem, ready, empty, pready, pfree,
                          start, end, qk_scale, lse_base, L, R, BLOCK_H, BLOCK_N, NUM_STAGES, K_VIEW, KR_VIEW,
                          PT_VIEW)),
            (_rs_loader, (lat_desc, rope_desc, lat_ring, rope_ring, ready, empty, bt_row, start, end, num_blocks,
                          PAGE, L, R, BLOCK_N, BOX, NUM_STAGES)),
        ], [4, 1], [SCORER_REGS, LOADER_REGS])
