"""Tensor-core layouts of ``torch.ops.fx_mla.mla_decode_fp8``'s split-K stage (Hopper warpgroup MMA in mind).

Same contract, numerics and workspace as ``_mla_decode_fp8_kernel`` (fx_mla/ops/kernels/mla_decode_fp8.py): one
program per (head group, split, request), base-2 online softmax in fp32, k_scale / q_scale / 2**Q_SHIFT folded into
the score scale, k_scale into the output, (o, lse) to ``out``/``lse`` (one split) or to the split workspace; the
combine kernel there merges the splits. The query arrives already in the MMA dtype (the launcher converts it), or
as FP8 for FP8 x FP8 scores (FP8_DOT). Two programs:

* ``_mla_decode_wide_kernel`` (64 heads a program, 8 warps). Triton gives a dot that feeds another dot in the
  same loop iteration all warps along M; with 64 heads both warpgroups then compute the same QK^T. Here the
  probabilities of tile i are multiplied by tile i's values in iteration i + 1 (V re-read from L2), so neither
  dot feeds the other inside an iteration and both split their warps along N. The scores are sums of per-chunk
  dots each scaled before the add (an add of a dot result would be folded into a dot chain again).
* ``_mla_decode_narrow_kernel`` (up to 32 heads). The MMA's 64-row side is the tokens, not the few heads:
  scores^T [BLOCK_N, BLOCK_H] = K Q^T and out^T [L, BLOCK_H] = V^T P^T, one warpgroup, no padded head rows.

The latent part is handled in chunks of BC (128) entries (NCH <= 4 chunks, L <= 512), so a converted cache chunk
is live in registers only for its own MMA; the chunk for P.V is loaded a second time (from L1/L2, with a distinct
eviction hint so the compiler does not merge the two reads and keep the converted tile alive across the softmax).
Page ids are clamped into the cache and lengths into the block-table row: never an out-of-bounds read.
"""
import triton
import triton.language as tl

from fx_mla.ops.kernels.mla_decode_fp8 import _dot, _score_scale, _split_range, _tile_pages


@triton.jit
def _rows(kv_ptr, pages, n0, offs_n, stride_kv_blk, stride_kv_tok, PAGE: tl.constexpr):
    pos = n0 + offs_n
    return kv_ptr + pages.to(tl.int64) * stride_kv_blk + (pos % PAGE) * stride_kv_tok


@triton.jit
def _kv_chunk(rows, tok_ok, c0: tl.constexpr, offs_c, W: tl.constexpr, DT: tl.constexpr, LAST: tl.constexpr):
    """Cache entries [c0, c0 + BC) of the tile's rows, [BLOCK_N, BC], masked past W and past the length."""
    m = tok_ok[:, None] & (offs_c[None, :] < W - c0)
    ptrs = rows[:, None] + c0 + offs_c[None, :]
    if LAST:
        x = tl.load(ptrs, mask=m, other=0.0, eviction_policy="evict_first")
    else:
        x = tl.load(ptrs, mask=m, other=0.0)
    return x.to(DT)


@triton.jit
def _q_chunk(q_rows, head_ok, c0: tl.constexpr, offs_c, W: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Query entries [c0, c0 + BC) of the group's heads: [BLOCK_H, BC], or [BC, BLOCK_H] when TRANSPOSED."""
    if TRANSPOSED:
        x = tl.load(q_rows[None, :] + c0 + offs_c[:, None], mask=head_ok[None, :] & (offs_c[:, None] < W - c0),
                    other=0.0)
    else:
        x = tl.load(q_rows[:, None] + c0 + offs_c[None, :], mask=head_ok[:, None] & (offs_c[None, :] < W - c0),
                    other=0.0)
    return x


@triton.jit
def _q_chunks(q_rows, head_ok, offs_c, offs_r, L: tl.constexpr, R: tl.constexpr, BC: tl.constexpr, NCH: tl.constexpr,
              TRANSPOSED: tl.constexpr):
    """The group's query as NCH latent chunks and the rope part (unused ones repeat chunk 0 and are never read)."""
    q0 = _q_chunk(q_rows, head_ok, 0, offs_c, L, TRANSPOSED)
    q1 = q0
    q2 = q0
    q3 = q0
    if NCH > 1:
        q1 = _q_chunk(q_rows, head_ok, BC, offs_c, L, TRANSPOSED)
    if NCH > 2:
        q2 = _q_chunk(q_rows, head_ok, 2 * BC, offs_c, L, TRANSPOSED)
    if NCH > 3:
        q3 = _q_chunk(q_rows, head_ok, 3 * BC, offs_c, L, TRANSPOSED)
    qr = q0
    if R > 0:
        qr = _q_chunk(q_rows + L, head_ok, 0, offs_r, R, TRANSPOSED)
    return q0, q1, q2, q3, qr


@triton.jit
def _store_chunk(o_rows, acc, c0: tl.constexpr, f, head_ok, offs_c, L: tl.constexpr, TRANSPOSED: tl.constexpr):
    """acc [BLOCK_H, BC] (or [BC, BLOCK_H] when TRANSPOSED) * f per head into entries [c0, c0 + BC) of o_rows."""
    if TRANSPOSED:
        o = acc * f[None, :]
        tl.store(o_rows[None, :] + c0 + offs_c[:, None], o.to(o_rows.dtype.element_ty),
                 mask=head_ok[None, :] & (offs_c[:, None] < L - c0))
    else:
        o = acc * f[:, None]
        tl.store(o_rows[:, None] + c0 + offs_c[None, :], o.to(o_rows.dtype.element_ty),
                 mask=head_ok[:, None] & (offs_c[None, :] < L - c0))


@triton.jit
def _finish(o_rows, lse_ptrs, a0, a1, a2, a3, m_i, l_i, v_scale, head_ok, offs_c, L: tl.constexpr,
            BC: tl.constexpr, NCH: tl.constexpr, TRANSPOSED: tl.constexpr):
    has_tokens = l_i > 0.0
    l_safe = tl.where(has_tokens, l_i, 1.0)
    f = v_scale / l_safe
    _store_chunk(o_rows, a0, 0, f, head_ok, offs_c, L, TRANSPOSED)
    if NCH > 1:
        _store_chunk(o_rows, a1, BC, f, head_ok, offs_c, L, TRANSPOSED)
    if NCH > 2:
        _store_chunk(o_rows, a2, 2 * BC, f, head_ok, offs_c, L, TRANSPOSED)
    if NCH > 3:
        _store_chunk(o_rows, a3, 3 * BC, f, head_ok, offs_c, L, TRANSPOSED)
    lse = tl.where(has_tokens, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(lse_ptrs, lse, mask=head_ok)


@triton.jit
def _outputs(out_ptr, lse_ptr, part_o_ptr, part_lse_ptr, pid_b, pid_s, heads, num_heads, num_splits,
             stride_o_b, stride_o_h, L: tl.constexpr, SINGLE_SPLIT: tl.constexpr):
    if SINGLE_SPLIT:
        o_rows = out_ptr + pid_b * stride_o_b + heads * stride_o_h
        lse_ptrs = lse_ptr + pid_b * num_heads + heads
    else:
        part = (pid_b * num_splits + pid_s) * num_heads + heads
        o_rows = part_o_ptr + part * L
        lse_ptrs = part_lse_ptr + part
    return o_rows, lse_ptrs


@triton.jit
def _wide_scores(rows, tok_ok, q0, q1, q2, q3, qr, qk_scale, offs_c, offs_r, L: tl.constexpr, R: tl.constexpr,
                 BC: tl.constexpr, NCH: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                 QK_DT: tl.constexpr, UPCAST: tl.constexpr):
    """scores [BLOCK_H, BLOCK_N] (base 2, scaled, -inf past the length) = sum over chunks of Q_c K_c^T."""
    z = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
    s = _dot(q0, tl.trans(_kv_chunk(rows, tok_ok, 0, offs_c, L, QK_DT, False)), z, UPCAST) * qk_scale
    if NCH > 1:
        s += _dot(q1, tl.trans(_kv_chunk(rows, tok_ok, BC, offs_c, L, QK_DT, False)), z, UPCAST) * qk_scale
    if NCH > 2:
        s += _dot(q2, tl.trans(_kv_chunk(rows, tok_ok, 2 * BC, offs_c, L, QK_DT, False)), z, UPCAST) * qk_scale
    if NCH > 3:
        s += _dot(q3, tl.trans(_kv_chunk(rows, tok_ok, 3 * BC, offs_c, L, QK_DT, False)), z, UPCAST) * qk_scale
    if R > 0:
        s += _dot(qr, tl.trans(_kv_chunk(rows + L, tok_ok, 0, offs_r, R, QK_DT, False)), z, UPCAST) * qk_scale
    return tl.where(tok_ok[None, :], s, float("-inf"))


@triton.jit
def _wide_pv(p, rows, tok_ok, a0, a1, a2, a3, offs_c, L: tl.constexpr, BC: tl.constexpr, NCH: tl.constexpr,
             COMPUTE: tl.constexpr, UPCAST: tl.constexpr):
    pc = p.to(COMPUTE)
    a0 = _dot(pc, _kv_chunk(rows, tok_ok, 0, offs_c, L, COMPUTE, True), a0, UPCAST)
    if NCH > 1:
        a1 = _dot(pc, _kv_chunk(rows, tok_ok, BC, offs_c, L, COMPUTE, True), a1, UPCAST)
    if NCH > 2:
        a2 = _dot(pc, _kv_chunk(rows, tok_ok, 2 * BC, offs_c, L, COMPUTE, True), a2, UPCAST)
    if NCH > 3:
        a3 = _dot(pc, _kv_chunk(rows, tok_ok, 3 * BC, offs_c, L, COMPUTE, True), a3, UPCAST)
    return a0, a1, a2, a3


@triton.jit
def _mla_decode_wide_kernel(
        q_ptr, kv_ptr, block_table_ptr, seq_lens_ptr, k_scale_ptr, q_scale_ptr,
        out_ptr, lse_ptr, part_o_ptr, part_lse_ptr,
        sm_scale, num_heads, num_splits, num_blocks, max_blocks,
        stride_q_b, stride_q_h, stride_kv_blk, stride_kv_tok, stride_bt_b, stride_o_b, stride_o_h,
        PAGE: tl.constexpr, L: tl.constexpr, R: tl.constexpr, BC: tl.constexpr, NCH: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr,
        KV_FP8: tl.constexpr, Q_FP8: tl.constexpr, FP8_DOT: tl.constexpr, Q_SHIFT: tl.constexpr,
        SINGLE_SPLIT: tl.constexpr, UPCAST: tl.constexpr):
    pid_g = tl.program_id(0)  # head groups of one tile are adjacent programs: the second reads it from L2
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    heads = pid_g * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads < num_heads
    offs_c = tl.arange(0, BC)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    QK_DT: tl.constexpr = kv_ptr.dtype.element_ty if FP8_DOT else COMPUTE

    q0, q1, q2, q3, qr = _q_chunks(q_ptr + pid_b * stride_q_b + heads * stride_q_h, head_ok, offs_c, offs_r, L, R, BC,
                                   NCH, False)
    qk_scale, v_scale = _score_scale(sm_scale, k_scale_ptr, q_scale_ptr, KV_FP8, Q_FP8, Q_SHIFT)
    start, end = _split_range(seq_lens_ptr, pid_b, pid_s, num_splits, max_blocks, PAGE, BLOCK_N)
    bt_row = block_table_ptr + pid_b * stride_bt_b

    a0 = tl.zeros([BLOCK_H, BC], dtype=tl.float32)
    a1 = tl.zeros([BLOCK_H, BC], dtype=tl.float32)
    a2 = tl.zeros([BLOCK_H, BC], dtype=tl.float32)
    a3 = tl.zeros([BLOCK_H, BC], dtype=tl.float32)
    # First tile (all masked when the split is empty: p = 0, l = 0).
    rows = _rows(kv_ptr, _tile_pages(bt_row, start, end, num_blocks, offs_n, PAGE), start, offs_n, stride_kv_blk,
                 stride_kv_tok, PAGE)
    tok_ok = (start + offs_n) < end
    s = _wide_scores(rows, tok_ok, q0, q1, q2, q3, qr, qk_scale, offs_c, offs_r, L, R, BC, NCH, BLOCK_H, BLOCK_N,
                     QK_DT, UPCAST)
    m_i = tl.max(s, 1)
    m_i = tl.where(m_i == float("-inf"), 0.0, m_i)
    p = tl.exp2(s - m_i[:, None])
    l_i = tl.sum(p, 1)
    for n0 in range(start + BLOCK_N, end, BLOCK_N):
        rows_next = _rows(kv_ptr, _tile_pages(bt_row, n0, end, num_blocks, offs_n, PAGE), n0, offs_n,
                          stride_kv_blk, stride_kv_tok, PAGE)
        ok_next = (n0 + offs_n) < end
        # P.V of the previous tile (acc and p relative to the same running max m_i)
        a0, a1, a2, a3 = _wide_pv(p, rows, tok_ok, a0, a1, a2, a3, offs_c, L, BC, NCH, COMPUTE, UPCAST)
        s = _wide_scores(rows_next, ok_next, q0, q1, q2, q3, qr, qk_scale, offs_c, offs_r, L, R, BC, NCH, BLOCK_H,
                         BLOCK_N, QK_DT, UPCAST)
        m_new = tl.maximum(m_i, tl.max(s, 1))  # the tile's first token is valid: finite
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        a0 = a0 * alpha[:, None]
        a1 = a1 * alpha[:, None]
        a2 = a2 * alpha[:, None]
        a3 = a3 * alpha[:, None]
        m_i = m_new
        rows = rows_next
        tok_ok = ok_next
    a0, a1, a2, a3 = _wide_pv(p, rows, tok_ok, a0, a1, a2, a3, offs_c, L, BC, NCH, COMPUTE, UPCAST)
    o_rows, lse_ptrs = _outputs(out_ptr, lse_ptr, part_o_ptr, part_lse_ptr, pid_b, pid_s, heads, num_heads,
                                num_splits, stride_o_b, stride_o_h, L, SINGLE_SPLIT)
    _finish(o_rows, lse_ptrs, a0, a1, a2, a3, m_i, l_i, v_scale, head_ok, offs_c, L, BC, NCH, False)


@triton.jit
def _mla_decode_narrow_kernel(
        q_ptr, kv_ptr, block_table_ptr, seq_lens_ptr, k_scale_ptr, q_scale_ptr,
        out_ptr, lse_ptr, part_o_ptr, part_lse_ptr,
        sm_scale, num_heads, num_splits, num_blocks, max_blocks,
        stride_q_b, stride_q_h, stride_kv_blk, stride_kv_tok, stride_bt_b, stride_o_b, stride_o_h,
        PAGE: tl.constexpr, L: tl.constexpr, R: tl.constexpr, BC: tl.constexpr, NCH: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr,
        KV_FP8: tl.constexpr, Q_FP8: tl.constexpr, FP8_DOT: tl.constexpr, Q_SHIFT: tl.constexpr,
        SINGLE_SPLIT: tl.constexpr, UPCAST: tl.constexpr):
    pid_g = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    heads = pid_g * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads < num_heads
    offs_c = tl.arange(0, BC)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    QK_DT: tl.constexpr = kv_ptr.dtype.element_ty if FP8_DOT else COMPUTE

    q0, q1, q2, q3, qr = _q_chunks(q_ptr + pid_b * stride_q_b + heads * stride_q_h, head_ok, offs_c, offs_r, L, R, BC,
                                   NCH, True)
    qk_scale, v_scale = _score_scale(sm_scale, k_scale_ptr, q_scale_ptr, KV_FP8, Q_FP8, Q_SHIFT)
    start, end = _split_range(seq_lens_ptr, pid_b, pid_s, num_splits, max_blocks, PAGE, BLOCK_N)
    bt_row = block_table_ptr + pid_b * stride_bt_b

    a0 = tl.zeros([BC, BLOCK_H], dtype=tl.float32)
    a1 = tl.zeros([BC, BLOCK_H], dtype=tl.float32)
    a2 = tl.zeros([BC, BLOCK_H], dtype=tl.float32)
    a3 = tl.zeros([BC, BLOCK_H], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    z = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        rows = _rows(kv_ptr, _tile_pages(bt_row, n0, end, num_blocks, offs_n, PAGE), n0, offs_n, stride_kv_blk,
                     stride_kv_tok, PAGE)
        tok_ok = (n0 + offs_n) < end
        s = _dot(_kv_chunk(rows, tok_ok, 0, offs_c, L, QK_DT, False), q0, z, UPCAST) * qk_scale
        if NCH > 1:
            s += _dot(_kv_chunk(rows, tok_ok, BC, offs_c, L, QK_DT, False), q1, z, UPCAST) * qk_scale
        if NCH > 2:
            s += _dot(_kv_chunk(rows, tok_ok, 2 * BC, offs_c, L, QK_DT, False), q2, z, UPCAST) * qk_scale
        if NCH > 3:
            s += _dot(_kv_chunk(rows, tok_ok, 3 * BC, offs_c, L, QK_DT, False), q3, z, UPCAST) * qk_scale
        if R > 0:
            s += _dot(_kv_chunk(rows + L, tok_ok, 0, offs_r, R, QK_DT, False), qr, z, UPCAST) * qk_scale
        s = tl.where(tok_ok[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))  # the tile's first token is valid: finite
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[None, :])
        l_i = l_i * alpha + tl.sum(p, 0)
        pc = p.to(COMPUTE)
        a0 = _dot(tl.trans(_kv_chunk(rows, tok_ok, 0, offs_c, L, COMPUTE, True)), pc, a0 * alpha[None, :], UPCAST)
        if NCH > 1:
            a1 = _dot(tl.trans(_kv_chunk(rows, tok_ok, BC, offs_c, L, COMPUTE, True)), pc, a1 * alpha[None, :],
                      UPCAST)
        if NCH > 2:
            a2 = _dot(tl.trans(_kv_chunk(rows, tok_ok, 2 * BC, offs_c, L, COMPUTE, True)), pc,
                      a2 * alpha[None, :], UPCAST)
        if NCH > 3:
            a3 = _dot(tl.trans(_kv_chunk(rows, tok_ok, 3 * BC, offs_c, L, COMPUTE, True)), pc,
                      a3 * alpha[None, :], UPCAST)
        m_i = m_new
    o_rows, lse_ptrs = _outputs(out_ptr, lse_ptr, part_o_ptr, part_lse_ptr, pid_b, pid_s, heads, num_heads,
                                num_splits, stride_o_b, stride_o_h, L, SINGLE_SPLIT)
    _finish(o_rows, lse_ptrs, a0, a1, a2, a3, m_i, l_i, v_scale, head_ok, offs_c, L, BC, NCH, True)
