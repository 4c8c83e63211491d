"""Triton kernels of ``torch.ops.fx_mla.mla_decode_fp8``: split-K (flash-decoding) MLA attention over a paged cache.

Stage 1 (``_mla_decode_fp8_kernel``): one program per (head group, split, request). It walks its share of the
request's tokens in tiles of BLOCK_N, reads each tile of the paged cache once for all BLOCK_H heads, and keeps an
online softmax in base 2 with fp32 accumulators. Stage 2 (``_mla_decode_fp8_combine_kernel``) merges the splits'
(o, lse) by their log-sum-exp weights. With one split, stage 1 writes the final (o, lse) itself.

Numerics (the launcher picks the constexprs):
* An FP8 cache is multiplied in fp16 on the tensor cores: e4m3 and e5m2 convert to fp16 exactly (one
  ``cvt.rn.f16x2.e4m3x2`` per two values on sm_89+, where the bf16 route costs three conversions). k_scale is
  folded into the score scale and into the output instead of being applied per element.
* A bf16 query with an FP8 cache is scaled by 2**-Q_SHIFT (exact) and rounded to fp16: exact for
  2**-6 <= |q| <= 65504 * 2**8, absolute error <= 2**-17 below 2**-6; 2**Q_SHIFT goes into the score scale.
* An FP8 query with the same FP8 cache dtype multiplies FP8 x FP8 for the scores (q_scale folded likewise);
  the probabilities times V still run in fp16.
* Sequence lengths are clamped to the block-table row and page ids to the cache, so bad metadata can give
  wrong numbers but never an out-of-bounds read.
"""
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    # UPCAST only under TRITON_INTERPRET=1 with bf16 operands: the interpreter (triton 3.9) multiplies bf16
    # tensors as their raw uint16 storage, so they go through fp32 there (exact products, same sums).
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if a.dtype.is_fp8():
        # Hopper's FP8 warpgroup MMA accumulates with a reduced-precision adder; adding its partial sums
        # into the fp32 accumulator every 128 products cut the lse error at 128 heads on an H200 from
        # 4.1e-3 to 2.8e-3 (the mma.sync path of 16 heads stays under 1e-3).
        if a.shape[1] > 128:
            return tl.dot(a, b, acc, max_num_imprecise_acc=128)
    return tl.dot(a, b, acc)


@triton.jit
def _scores(q_nope, q_pe, k_nope, k_pe, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, R: tl.constexpr,
            UPCAST: tl.constexpr):
    """q . k over the latent and rope parts: [BLOCK_H, BLOCK_N] fp32."""
    s = _dot(q_nope, tl.trans(k_nope), tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32), UPCAST)
    if R > 0:
        s = _dot(q_pe, tl.trans(k_pe), s, UPCAST)
    return s


@triton.jit
def _tile_pages(bt_row, n0, end, num_blocks, offs_n, PAGE: tl.constexpr):
    """Physical page of each token of the tile at n0, clamped into the cache (bad ids never read out of it)."""
    pos = n0 + offs_n
    page = tl.load(bt_row + pos // PAGE, mask=pos < end, other=0)
    return tl.minimum(tl.maximum(page, 0), num_blocks - 1)


@triton.jit
def _tile_load(kv_ptr, pages, n0, end, offs_n, offs_l, offs_r, stride_kv_blk, stride_kv_tok, PAGE: tl.constexpr,
               L: tl.constexpr, R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr):
    """The tile's cache rows as stored: latent [BLOCK_N, BLOCK_L] and rope [BLOCK_N, BLOCK_R]; tokens at or
    past `end` (the whole tile when n0 >= end) are masked to 0 and cost no memory traffic."""
    pos = n0 + offs_n
    tok_ok = pos < end
    rows = kv_ptr + pages.to(tl.int64) * stride_kv_blk + (pos % PAGE) * stride_kv_tok
    lmask = tok_ok[:, None]
    if L != BLOCK_L:
        lmask = lmask & (offs_l[None, :] < L)
    k_nope = tl.load(rows[:, None] + offs_l[None, :], mask=lmask, other=0.0)
    if R > 0:
        rmask = tok_ok[:, None]
        if R != BLOCK_R:
            rmask = rmask & (offs_r[None, :] < R)
        k_pe = tl.load(rows[:, None] + L + offs_r[None, :], mask=rmask, other=0.0)
    else:
        k_pe = 0  # placeholder: never used when R == 0
    return k_nope, k_pe


@triton.jit
def _split_range(seq_lens_ptr, pid_b, pid_s, num_splits, max_blocks, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """This split's token range [start, end): the length is clamped to the block-table row, the split length follows
    the request's own length in whole tiles (no host sync)."""
    seq_len = tl.load(seq_lens_ptr + pid_b).to(tl.int32)
    seq_len = tl.minimum(tl.maximum(seq_len, 0), max_blocks * PAGE)
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = pid_s * chunk
    return start, tl.minimum(start + chunk, seq_len)


@triton.jit
def _score_scale(sm_scale, k_scale_ptr, q_scale_ptr, KV_FP8: tl.constexpr, Q_FP8: tl.constexpr,
                 Q_SHIFT: tl.constexpr):
    """(score scale in base 2 with k_scale, q_scale and 2**Q_SHIFT folded in, output scale k_scale)."""
    qk_scale = sm_scale * 1.4426950408889634
    v_scale = 1.0
    if KV_FP8:
        k_scale = tl.load(k_scale_ptr)
        qk_scale = qk_scale * k_scale
        v_scale = k_scale
    if Q_FP8:
        qk_scale = qk_scale * tl.load(q_scale_ptr)
    if Q_SHIFT > 0:
        qk_scale = qk_scale * (1 << Q_SHIFT)
    return qk_scale, v_scale


@triton.jit
def _mla_decode_fp8_kernel(
        q_ptr, kv_ptr, block_table_ptr, seq_lens_ptr, k_scale_ptr, q_scale_ptr,
        out_ptr, lse_ptr, part_o_ptr, part_lse_ptr,
        sm_scale, num_heads, num_splits, num_blocks, max_blocks,
        stride_q_b, stride_q_h, stride_kv_blk, stride_kv_tok, stride_bt_b, stride_o_b, stride_o_h,
        PAGE: tl.constexpr, L: tl.constexpr, R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr,
        KV_FP8: tl.constexpr, Q_FP8: tl.constexpr, FP8_DOT: tl.constexpr, Q_SHIFT: tl.constexpr,
        SINGLE_SPLIT: tl.constexpr, PREFETCH: tl.constexpr, UPCAST: tl.constexpr):
    pid_g = tl.program_id(0)  # head group varies fastest: groups of one tile run side by side and share L2
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)

    heads = pid_g * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads < num_heads
    offs_l = tl.arange(0, BLOCK_L)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)

    # Query tile, all heads of the group: [BLOCK_H, L] latent part and [BLOCK_H, R] rope part.
    q_rows = q_ptr + pid_b * stride_q_b + heads[:, None] * stride_q_h
    q_lmask = head_ok[:, None]
    if L != BLOCK_L:
        q_lmask = q_lmask & (offs_l[None, :] < L)
    q_nope = tl.load(q_rows + offs_l[None, :], mask=q_lmask, other=0.0)
    if R > 0:
        q_rmask = head_ok[:, None]
        if R != BLOCK_R:
            q_rmask = q_rmask & (offs_r[None, :] < R)
        q_pe = tl.load(q_rows + L + offs_r[None, :], mask=q_rmask, other=0.0)
    else:
        q_pe = 0  # placeholder: never used when R == 0

    # Everything that scales a score goes into one fp32 factor (base-2 exponent).
    qk_scale, v_scale = _score_scale(sm_scale, k_scale_ptr, q_scale_ptr, KV_FP8, Q_FP8, Q_SHIFT)
    if not FP8_DOT and q_ptr.dtype.element_ty != COMPUTE:
        # (The launcher converts q beforehand for the warpgroup-MMA configs: a query tile that comes
        # straight from memory stays in shared memory as the MMA's A operand instead of in registers.)
        if Q_SHIFT > 0:
            q_nope = (q_nope.to(tl.float32) * (1.0 / (1 << Q_SHIFT))).to(COMPUTE)
            if R > 0:
                q_pe = (q_pe.to(tl.float32) * (1.0 / (1 << Q_SHIFT))).to(COMPUTE)
        else:
            q_nope = q_nope.to(COMPUTE)
            if R > 0:
                q_pe = q_pe.to(COMPUTE)

    # This split's token range; the split length follows the request's own length (no host sync).
    start, end = _split_range(seq_lens_ptr, pid_b, pid_s, num_splits, max_blocks, PAGE, BLOCK_N)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_L], dtype=tl.float32)
    bt_row = block_table_ptr + pid_b * stride_bt_b
    if PREFETCH:
        # Software pipelining by hand (a register double buffer): Triton's pipeliner does not stage loads
        # that reach an mma.sync dot through the fp8 -> fp16 conversion, which leaves every tile's DRAM
        # latency exposed. Tile i+1 is in flight while tile i computes; page ids run two tiles ahead.
        pages = _tile_pages(bt_row, start, end, num_blocks, offs_n, PAGE)
        k_nope_next, k_pe_next = _tile_load(kv_ptr, pages, start, end, offs_n, offs_l, offs_r, stride_kv_blk,
                                            stride_kv_tok, PAGE, L, R, BLOCK_L, BLOCK_R)
        pages = _tile_pages(bt_row, start + BLOCK_N, end, num_blocks, offs_n, PAGE)
    for n0 in range(start, end, BLOCK_N):
        if PREFETCH:
            k_nope = k_nope_next
            k_pe = k_pe_next
            k_nope_next, k_pe_next = _tile_load(kv_ptr, pages, n0 + BLOCK_N, end, offs_n, offs_l, offs_r,
                                                stride_kv_blk, stride_kv_tok, PAGE, L, R, BLOCK_L, BLOCK_R)
            pages = _tile_pages(bt_row, n0 + 2 * BLOCK_N, end, num_blocks, offs_n, PAGE)
        else:
            pages = _tile_pages(bt_row, n0, end, num_blocks, offs_n, PAGE)
            k_nope, k_pe = _tile_load(kv_ptr, pages, n0, end, offs_n, offs_l, offs_r, stride_kv_blk,
                                      stride_kv_tok, PAGE, L, R, BLOCK_L, BLOCK_R)
        tok_ok = (n0 + offs_n) < end

        v = k_nope.to(COMPUTE)
        if FP8_DOT:
            s = _scores(q_nope, q_pe, k_nope, k_pe, BLOCK_H, BLOCK_N, R, False)
        else:
            if R > 0:
                k_pe = k_pe.to(COMPUTE)
            s = _scores(q_nope, q_pe, v, k_pe, BLOCK_H, BLOCK_N, R, UPCAST)
        s = tl.where(tok_ok[None, :], s * qk_scale, float("-inf"))
        # The tile's first token is always valid, so m_new is finite and exp2(-inf - m_new) = 0.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _dot(p.to(COMPUTE), v, acc * alpha[:, None], UPCAST)
        m_i = m_new

    has_tokens = l_i > 0.0
    l_safe = tl.where(has_tokens, l_i, 1.0)
    o = acc * (v_scale / l_safe)[:, None]
    lse = tl.where(has_tokens, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_mask = head_ok[:, None]
    if L != BLOCK_L:
        o_mask = o_mask & (offs_l[None, :] < L)
    if SINGLE_SPLIT:
        o_rows = out_ptr + pid_b * stride_o_b + heads[:, None] * stride_o_h
        tl.store(o_rows + offs_l[None, :], o.to(out_ptr.dtype.element_ty), mask=o_mask)
        tl.store(lse_ptr + pid_b * num_heads + heads, lse, mask=head_ok)
    else:
        part = (pid_b * num_splits + pid_s) * num_heads + heads
        tl.store(part_o_ptr + part[:, None] * L + offs_l[None, :], o.to(part_o_ptr.dtype.element_ty), mask=o_mask)
        tl.store(part_lse_ptr + part, lse, mask=head_ok)


@triton.jit
def _mla_decode_fp8_combine_kernel(
        part_o_ptr, part_lse_ptr, out_ptr, lse_ptr, num_heads, num_splits, stride_o_b, stride_o_h,
        L: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr, SPLITS_POW2: tl.constexpr,
        PDL: tl.constexpr = False):
    """Merge the splits of one (request, head) over latent columns [pid_l BLOCK_L, (pid_l + 1) BLOCK_L):
    o = sum_s exp(lse_s - lse) o_s, lse = logsumexp_s lse_s (written by the pid_l = 0 program).

    Grid (cdiv(L, BLOCK_L), heads, batch): the launcher cuts L into chunks when batch x heads alone would leave
    SMs idle (one request with many splits), and takes BLOCK_S splits a step so that few dependent steps remain.
    PDL (launched as a programmatic dependent launch, sm_90): wait for the split kernel's grid to finish and flush
    before reading anything; only the launch overlaps its tail. Then it lets the next kernel in the stream be
    scheduled early (a programmatic dependent launch after it waits for this grid the same way).
    (A one-step form loading the partials with the lse's where all splits fit one step was no faster in the op,
    session 15, and was removed.)"""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    pid_l = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_all = tl.arange(0, SPLITS_POW2)
    base = b * num_splits * num_heads + h
    lses = tl.load(part_lse_ptr + base + offs_all * num_heads, mask=offs_all < num_splits, other=float("-inf"))
    m = tl.max(lses, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # all splits empty: weights exp(-inf) = 0, no NaN
    denom = tl.sum(tl.exp(lses - m_safe), 0)

    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    l_mask = offs_l < L
    acc = tl.zeros([BLOCK_L], dtype=tl.float32)
    offs_s = tl.arange(0, BLOCK_S)
    for s0 in range(0, num_splits, BLOCK_S):
        split = s0 + offs_s
        s_ok = split < num_splits
        lse_s = tl.load(part_lse_ptr + base + split * num_heads, mask=s_ok, other=float("-inf"))
        o_mask = s_ok[:, None]
        if L % BLOCK_L != 0:
            o_mask = o_mask & l_mask[None, :]
        o_s = tl.load(part_o_ptr + (base + split * num_heads)[:, None] * L + offs_l[None, :], mask=o_mask,
                      other=0.0).to(tl.float32)
        acc += tl.sum(tl.exp(lse_s - m_safe)[:, None] * o_s, 0)

    has_tokens = denom > 0.0
    o = acc / tl.where(has_tokens, denom, 1.0)
    tl.store(out_ptr + b * stride_o_b + h * stride_o_h + offs_l, o.to(out_ptr.dtype.element_ty), mask=l_mask)
    if pid_l == 0:
        lse = tl.where(has_tokens, m_safe + tl.log(tl.where(has_tokens, denom, 1.0)), float("-inf"))
        tl.store(lse_ptr + b * num_heads + h, lse)


@triton.jit
def _mla_decode_fp8_combine_balanced_kernel(
        part_o_ptr, part_lse_ptr, out_ptr, lse_ptr, tile_prefix_ptr, batch, num_ctas, num_heads, stride_o_b,
        stride_o_h, L: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr):
    """Merge request b's segments of the balanced schedule (kernels/mla_decode_gluon16_rs.py, BALANCED): all
    requests' tiles laid end to end (T in all, request b's at [P_b, P_(b+1)): tile_prefix, written by the kernel's
    CTA 0), CTA c of G took tiles [c T / G, (c + 1) T / G) (none where G > T and that range is empty), so tile x lies
    in CTA ((x + 1) G - 1) // T, and the CTA c of a part of request b wrote it into workspace slot b + c
    ([(B + G) H, L] rows of L, lse [(B + G) H]). A request within one CTA was written into out / lse by that CTA
    (nothing to do here); a request without tiles gets out = 0, lse = -inf. Grid (cdiv(L, BLOCK_L), heads, batch)."""
    pid_l = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    p0 = tl.load(tile_prefix_ptr + b).to(tl.int64)
    nt = tl.load(tile_prefix_ptr + b + 1).to(tl.int64) - p0
    total = tl.load(tile_prefix_ptr + batch).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    l_mask = offs_l < L
    o_ptrs = out_ptr + b.to(tl.int64) * stride_o_b + h * stride_o_h + offs_l
    if nt == 0:
        tl.store(o_ptrs, tl.zeros([BLOCK_L], dtype=tl.float32).to(out_ptr.dtype.element_ty), mask=l_mask)
        if pid_l == 0:
            tl.store(lse_ptr + b.to(tl.int64) * num_heads + h, float("-inf"))
    else:
        c_first = ((p0 + 1) * num_ctas - 1) // total
        c_last = ((p0 + nt) * num_ctas - 1) // total
        if c_last > c_first:
            # CTAs c_first..c_last, less those whose share is empty (more CTAs than tiles): they wrote nothing
            n = (c_last - c_first + 1).to(tl.int32)
            offs_s = tl.arange(0, BLOCK_S)
            m = float("-inf")
            for s0 in range(0, n, BLOCK_S):
                c = c_first + s0 + offs_s
                s_ok = (s0 + offs_s < n) & (((c + 1) * total) // num_ctas > (c * total) // num_ctas)
                lse_s = tl.load(part_lse_ptr + (b + c) * num_heads + h, mask=s_ok, other=float("-inf"))
                m = tl.maximum(m, tl.max(lse_s, 0))
            m_safe = tl.where(m == float("-inf"), 0.0, m)
            denom = 0.0
            acc = tl.zeros([BLOCK_L], dtype=tl.float32)
            for s0 in range(0, n, BLOCK_S):
                c = c_first + s0 + offs_s
                s_ok = (s0 + offs_s < n) & (((c + 1) * total) // num_ctas > (c * total) // num_ctas)
                rows = (b + c) * num_heads + h  # workspace row of slot b + c, head h
                w = tl.exp(tl.load(part_lse_ptr + rows, mask=s_ok, other=float("-inf")) - m_safe)
                denom += tl.sum(w, 0)
                o_s = tl.load(part_o_ptr + rows[:, None] * L + offs_l[None, :], mask=s_ok[:, None] & l_mask[None, :],
                              other=0.0).to(tl.float32)
                acc += tl.sum(w[:, None] * o_s, 0)
            has_tokens = denom > 0.0
            tl.store(o_ptrs, (acc / tl.where(has_tokens, denom, 1.0)).to(out_ptr.dtype.element_ty), mask=l_mask)
            if pid_l == 0:
                lse = tl.where(has_tokens, m_safe + tl.log(tl.where(has_tokens, denom, 1.0)), float("-inf"))
                tl.store(lse_ptr + b.to(tl.int64) * num_heads + h, lse)
