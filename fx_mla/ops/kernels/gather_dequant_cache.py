"""Triton kernels of gather_dequant_cache. Launched from fx_mla/ops/gather_dequant_cache.py.

One program gathers a tile of BLOCK_T output tokens x the whole entry: the token -> cache-row index
chain is computed once per token (a [BLOCK_T] vector), then the entry is streamed in BLOCK_D-wide
chunks that are unrolled at compile time, so every chunk's load is independent and in flight at once.
The cache is read once and never again: loads carry evict_first so the stream does not push the
(small, reused) index arrays out of L2.

Index semantics (same as the plain-torch reference, including torch's wrap-around of negative
indices): a token whose request id, block-table column or block id is out of range after the
wrap-around reads nothing and writes zeros. No address outside the cache, the block table or the
metadata arrays is ever formed into a load.

Launch flags (constexpr, chosen in the launcher's CONFIG):
- VEC: the column index carries a contiguity hint of VEC elements, so a thread loads exactly the elements it
  will store (VEC = 16 bytes / output element size). Without it an fp8 load takes 16 bytes a thread and a
  bf16 store 16 bytes = 8 elements a thread: the loaded tile changes layout through shared memory (a barrier
  and a round trip) between the two. 0: no hint.
- STREAM: output stores carry cache_modifier ".cs" (streaming: written once, not read back by this kernel).
- PDL: programmatic dependent launch (sm_90+). Every program waits (griddepcontrol.wait) for the previous
  kernel in the stream to finish and flush before it reads any value it computes with (EARLY below reads
  indices before it, for prefetch addresses only), so the result does not depend on what ran before; it then
  lets the next kernel's programs be scheduled early (launch_dependents). Only the launch latency and ramp
  overlap the previous kernel's tail.
- EARLY (with PDL only): before that wait, a program reads its first tile's index chain (loads marked .cg, an
  L1 bypass; a cache operator is a hint in PTX, and what makes the later loads see the previous kernel's writes
  is griddepcontrol.wait, which makes them visible to this grid) and asks L2 to prefetch the cache rows those
  indices name (prefetch.global.L2 on every 128-byte line of a row). Those early indices may be stale (the
  previous kernel may still be writing them) and are used for nothing else: every value the program computes
  comes from the loads after the wait. The prefetched lines stay coherent (the L2 is where every write lands);
  an early row index out of range is masked like any other (the prefetch is predicated off: no address outside
  the cache is issued). It moves each call's first data requests under the previous kernel's tail (with a
  persistent grid, each program's first tile only). Only programs with an id below `early_programs` (the
  launcher: what one wave of the grid can hold, SMs x 16) do it: later ones start after the previous kernel has
  finished, when the early phase would only add a dependent index chain ahead of the real one.

- ROW_LOAD (fp8_ds_mla kernel only): its latent loaded as [BLOCK_T, 512] and viewed as [BLOCK_T, 4, 128] (that
  kernel's docstring).

Rounding: fp8/bf16/fp16/fp32 -> fp32 is exact; x * scale is one fp32 multiply; the result is rounded
once to the output dtype, round-to-nearest-even. ROUND_BY_BITS does that last rounding with integer
arithmetic for bf16 outputs: only for TRITON_INTERPRET, whose fp32 -> bf16 conversion truncates.
"""
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _round_fp32_to(y, OUT_DTYPE: tl.constexpr, ROUND_BY_BITS: tl.constexpr):
    if OUT_DTYPE == tl.float32:
        out = y
    elif ROUND_BY_BITS and OUT_DTYPE == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(y != y, 0x7FC0, rounded)
        out = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = y.to(OUT_DTYPE, fp_downcast_rounding="rtne")
    return out


@triton.jit
def _floor_divmod(a, B: tl.constexpr):
    # torch's // and % on int64 round toward -inf; make that explicit whatever the backend's division does
    q = a // B
    r = a - q * B
    neg = r < 0
    return tl.where(neg, q - 1, q), tl.where(neg, r + B, r)


@triton.jit
def _rows_of(t, live, tts_ptr, cu_ptr, ss_ptr, bt_ptr, bt_s0, bt_s1, n_req, max_blocks, n_blocks, c_s0, c_s1,
             row_len, BLOCK_SIZE: tl.constexpr, PAGED: tl.constexpr, HAS_SEQ_STARTS: tl.constexpr,
             CG: tl.constexpr = False):
    """Output token ids t (int64, any shape; live: those that exist) -> the element offset of each one's cache
    row and a mask `ok` of tokens that read the cache (others write zeros). CG: the index loads bypass L1."""
    MOD: tl.constexpr = ".cg" if CG else ""
    if PAGED:
        # decode form: token t of the [B, row_len = max_blocks * block_size] output, request b = t // row_len
        b = t // row_len
        off = t - b * row_len
        ok = live
    else:
        s = tl.load(tts_ptr + t, mask=live, other=0, cache_modifier=MOD).to(tl.int64)
        valid = s >= 0                 # negative request id: DCP padding token
        b = tl.maximum(s, 0)
        ok = live & (b < n_req)
        start = tl.load(cu_ptr + b, mask=ok, other=0, cache_modifier=MOD).to(tl.int64)
        if HAS_SEQ_STARTS:
            start -= tl.load(ss_ptr + b, mask=ok, other=0, cache_modifier=MOD).to(tl.int64)
        off = tl.where(valid, t - start, 0)
    j, r = _floor_divmod(off, BLOCK_SIZE)
    j = tl.where(j < 0, j + max_blocks, j)
    ok = ok & (j >= 0) & (j < max_blocks)
    blk = tl.load(bt_ptr + b * bt_s0 + j * bt_s1, mask=ok, other=0, cache_modifier=MOD).to(tl.int64)
    blk = tl.where(blk < 0, blk + n_blocks, blk)
    ok = ok & (blk >= 0) & (blk < n_blocks)
    # no tl.where(ok, row, 0) here: a select hides the 16-byte alignment of the row from Triton's
    # analysis and the cache loads fall back to single bytes. Rows of ~ok tokens are never loaded (masked).
    row = blk * c_s0 + r * c_s1
    return row, ok


@triton.jit
def _token_rows(tile, n_tokens, tts_ptr, cu_ptr, ss_ptr, bt_ptr, bt_s0, bt_s1, n_req, max_blocks,
                n_blocks, c_s0, c_s1, row_len,
                BLOCK_T: tl.constexpr, BLOCK_SIZE: tl.constexpr, PAGED: tl.constexpr,
                HAS_SEQ_STARTS: tl.constexpr, CG: tl.constexpr = False):
    """Output token ids t [BLOCK_T] (int64) of a tile, the element offset of each one's cache row, and a mask
    `ok` of tokens that read the cache (others write zeros) and `live` of tokens that exist."""
    t = (tile * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # n_tokens < 2**31: the product fits
    live = t < n_tokens
    row, ok = _rows_of(t, live, tts_ptr, cu_ptr, ss_ptr, bt_ptr, bt_s0, bt_s1, n_req, max_blocks, n_blocks, c_s0,
                       c_s1, row_len, BLOCK_SIZE, PAGED, HAS_SEQ_STARTS, CG)
    return t, row, ok, live


@triton.jit
def _columns(OFF: tl.constexpr, W: tl.constexpr, VEC: tl.constexpr):
    d = tl.arange(0, W)
    if VEC > 0 and VEC < W:
        d = tl.max_contiguous(tl.multiple_of(d, VEC), VEC)
    return OFF + d


@triton.jit
def _pdl_enter(PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _prefetch_rows(row_base, ok, ROW_BYTES: tl.constexpr):
    """prefetch.global.L2 of every 128-byte line of the ROW_BYTES-byte rows at byte pointers row_base [BLOCK_T]
    where ok: the line of each row's first byte, then every 128 bytes, then its last byte."""
    NL: tl.constexpr = triton.next_power_of_2((ROW_BYTES + 127) // 128 + 1)
    k = tl.arange(0, NL)
    off = tl.minimum(k * 128, ROW_BYTES - 1)
    addr = row_base[:, None] + off[None, :]
    flag = (ok[:, None] & (k >= 0)[None, :]).to(tl.int32)  # [BLOCK_T, NL]
    tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.b32 $0, 0; }",
                              "=r,l,r", [addr, flag], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _early_prefetch(cache_ptr, tile, n_tokens, tts_ptr, cu_ptr, ss_ptr, bt_ptr, bt_s0, bt_s1, n_req, max_blocks,
                    n_blocks, c_s0, c_s1, row_len, ROW_BYTES: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, PAGED: tl.constexpr, HAS_SEQ_STARTS: tl.constexpr):
    """EARLY (module docstring): the tile's rows by its indices as read now, before the PDL wait, into L2."""
    _, row, ok, _ = _token_rows(tile, n_tokens, tts_ptr, cu_ptr, ss_ptr, bt_ptr, bt_s0, bt_s1, n_req, max_blocks,
                                n_blocks, c_s0, c_s1, row_len, BLOCK_T, BLOCK_SIZE, PAGED, HAS_SEQ_STARTS, True)
    _prefetch_rows((cache_ptr + row).to(tl.pointer_type(tl.uint8)), ok, ROW_BYTES)


@triton.jit
def _store(ptrs, y, mask, STREAM: tl.constexpr):
    if STREAM:
        tl.store(ptrs, y, mask=mask, cache_modifier=".cs")
    else:
        tl.store(ptrs, y, mask=mask)


@triton.jit
def _load_part(cache_ptr, row, ok, OFF: tl.constexpr, W: tl.constexpr, VALID: tl.constexpr, VEC: tl.constexpr):
    """Columns [OFF, OFF + VALID) of each token's cache row as a [BLOCK_T, W] tile (W a power of two)."""
    d = _columns(OFF, W, VEC)
    if VALID == W:
        m = ok[:, None]
    else:
        m = ok[:, None] & (d < OFF + VALID)[None, :]
    return tl.load(cache_ptr + row[:, None] + d[None, :], mask=m, other=0.0, eviction_policy="evict_first")


@triton.jit
def _store_part(out_ptr, out_row, live, x, s, OFF: tl.constexpr, W: tl.constexpr, VALID: tl.constexpr,
                HAS_SCALE: tl.constexpr, ROUND_BY_BITS: tl.constexpr, VEC: tl.constexpr, STREAM: tl.constexpr):
    y = x.to(tl.float32)
    if HAS_SCALE:
        y = y * s
    d = _columns(OFF, W, VEC)
    if VALID == W:
        m = live[:, None]
    else:
        m = live[:, None] & (d < OFF + VALID)[None, :]
    _store(out_ptr + out_row[:, None] + d[None, :], _round_fp32_to(y, out_ptr.dtype.element_ty, ROUND_BY_BITS), m,
           STREAM)


@triton.jit
def _gather_dequant_cache_kernel(
        cache_ptr, out_ptr, scale_ptr, tts_ptr, cu_ptr, ss_ptr, bt_ptr,
        n_tokens, n_req, max_blocks, n_blocks, bt_s0, bt_s1, c_s0, c_s1, row_len, n_tiles, early_programs,
        D: tl.constexpr, OUT_STRIDE: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr,
        PAGED: tl.constexpr, HAS_SEQ_STARTS: tl.constexpr, HAS_SCALE: tl.constexpr,
        PERSISTENT: tl.constexpr, ROUND_BY_BITS: tl.constexpr, VEC: tl.constexpr, STREAM: tl.constexpr,
        PDL: tl.constexpr, EARLY: tl.constexpr = False):
    """Plain layout: out[t, :D] = round(fp32(cache[row(t), :D]) * scale) (no scale: a cast); out rows are
    OUT_STRIDE apart (the launcher gathers entries wider than 1024 in column slices).

    The entry is read as up to three power-of-two-wide parts, D = P1 + P2 + (a masked P3), e.g.
    576 = 512 + 64, 288 = 256 + 32. All parts are loaded before anything is stored: the compiler cannot
    move a load above a store that might alias it, so load/store interleaved per chunk would wait one
    memory latency per chunk; this way a thread has the whole tile's 16-byte loads in flight at once.
    """
    if PDL and EARLY:
        if tl.program_id(0) < early_programs:
            _early_prefetch(cache_ptr, tl.program_id(0), n_tokens, tts_ptr, cu_ptr, ss_ptr, bt_ptr, bt_s0, bt_s1,
                            n_req, max_blocks, n_blocks, c_s0, c_s1, row_len,
                            D * (cache_ptr.dtype.element_ty.primitive_bitwidth // 8), BLOCK_T, BLOCK_SIZE, PAGED,
                            HAS_SEQ_STARTS)
    _pdl_enter(PDL)
    if HAS_SCALE:
        s = tl.load(scale_ptr)  # device scalar: no host sync, CUDA-graph capturable
    else:
        s = 1.0
    R3: tl.constexpr = D - P1 - P2
    # PERSISTENT: a grid of a few programs per SM strides over the tiles, and the next tile's index chain
    # (token_to_seq -> cu_seq_lens/seq_starts -> block_table: three dependent small loads) is issued while
    # this tile's rows are in flight. Otherwise one tile a program (the loop body runs once).
    step = tl.num_programs(0) if PERSISTENT else n_tiles
    tile = tl.program_id(0)
    t, row, ok, live = _token_rows(tile, n_tokens, tts_ptr, cu_ptr, ss_ptr, bt_ptr, bt_s0, bt_s1,
                                   n_req, max_blocks, n_blocks, c_s0, c_s1, row_len,
                                   BLOCK_T, BLOCK_SIZE, PAGED, HAS_SEQ_STARTS)
    for _ in range(tl.program_id(0), n_tiles, step):
        x1 = _load_part(cache_ptr, row, ok, 0, P1, P1, VEC)
        if P2 > 0:
            x2 = _load_part(cache_ptr, row, ok, P1, P2, P2, VEC)
        if P3 > 0:
            x3 = _load_part(cache_ptr, row, ok, P1 + P2, P3, R3, VEC)
        if PERSISTENT:
            tile += step
            t_n, row_n, ok_n, live_n = _token_rows(tile, n_tokens, tts_ptr, cu_ptr, ss_ptr, bt_ptr, bt_s0, bt_s1,
                                                   n_req, max_blocks, n_blocks, c_s0, c_s1, row_len,
                                                   BLOCK_T, BLOCK_SIZE, PAGED, HAS_SEQ_STARTS)
        out_row = t * OUT_STRIDE
        _store_part(out_ptr, out_row, live, x1, s, 0, P1, P1, HAS_SCALE, ROUND_BY_BITS, VEC, STREAM)
        if P2 > 0:
            _store_part(out_ptr, out_row, live, x2, s, P1, P2, P2, HAS_SCALE, ROUND_BY_BITS, VEC, STREAM)
        if P3 > 0:
            _store_part(out_ptr, out_row, live, x3, s, P1 + P2, P3, R3, HAS_SCALE, ROUND_BY_BITS, VEC, STREAM)
        if PERSISTENT:
            t, row, ok, live = t_n, row_n, ok_n, live_n


@triton.jit
def _gather_dequant_cache_fp8_ds_mla_kernel(
        cache_ptr, out_ptr, tts_ptr, cu_ptr, ss_ptr, bt_ptr,
        n_tokens, n_req, max_blocks, n_blocks, bt_s0, bt_s1, c_s0, c_s1, row_len, n_tiles, early_programs,
        BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr,
        PAGED: tl.constexpr, HAS_SEQ_STARTS: tl.constexpr,
        PERSISTENT: tl.constexpr, ROUND_BY_BITS: tl.constexpr, VEC: tl.constexpr, STREAM: tl.constexpr,
        PDL: tl.constexpr, EARLY: tl.constexpr = False, ROW_LOAD: tl.constexpr = False):
    """fp8_ds_mla layout, a 656-byte row: 512 e4m3 | 4 fp32 group scales | 64 bf16 rope.
    out[t, i] = round(fp32(e4m3[i]) * scale[i // 128]) for i < 512, out[t, 512 + k] = round(rope[k]).
    The latent is one [BLOCK_T, 4, 128] tile (group x element), loaded with the scales and the rope
    before any store, for the same reason as in the plain kernel. ROW_LOAD: it is loaded as [BLOCK_T, 512] and
    viewed as [BLOCK_T, 4, 128] (a free reshape): a warp's 16-byte loads then cover one row's 512 contiguous bytes
    instead of a 128-byte group of four rows each (rows are 656 bytes apart, so half of them start mid-sector and
    a 128-byte piece of one touches five sectors, a 512-byte one seventeen).
    Same values either way (bitwise)."""
    OUT_DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    GROUP: tl.constexpr = 128
    N_GROUPS: tl.constexpr = 4
    LATENT: tl.constexpr = 512
    ROPE: tl.constexpr = 64
    D_OUT: tl.constexpr = LATENT + ROPE
    if PDL and EARLY:
        if tl.program_id(0) < early_programs:
            _early_prefetch(cache_ptr, tl.program_id(0), n_tokens, tts_ptr, cu_ptr, ss_ptr, bt_ptr, bt_s0, bt_s1,
                            n_req, max_blocks, n_blocks, c_s0, c_s1, row_len, LATENT + 4 * N_GROUPS + 2 * ROPE,
                            BLOCK_T, BLOCK_SIZE, PAGED, HAS_SEQ_STARTS)
    _pdl_enter(PDL)
    k = tl.arange(0, N_GROUPS)
    g = _columns(0, GROUP, VEC)
    e = _columns(0, ROPE, VEC)
    lat_off = k[None, :, None] * GROUP + g[None, None, :]            # [1, 4, 128]
    step = tl.num_programs(0) if PERSISTENT else n_tiles            # as in the plain kernel
    tile = tl.program_id(0)
    t, row, ok, live = _token_rows(tile, n_tokens, tts_ptr, cu_ptr, ss_ptr, bt_ptr, bt_s0, bt_s1,
                                   n_req, max_blocks, n_blocks, c_s0, c_s1, row_len,
                                   BLOCK_T, BLOCK_SIZE, PAGED, HAS_SEQ_STARTS)
    for _ in range(tl.program_id(0), n_tiles, step):
        # typed pointers to each token's row parts (row offsets are multiples of 16 bytes)
        lat_base = (cache_ptr + row).to(tl.pointer_type(tl.float8e4nv))
        sc_base = (cache_ptr + row + LATENT).to(tl.pointer_type(tl.float32))
        rope_base = (cache_ptr + row + LATENT + 4 * N_GROUPS).to(tl.pointer_type(tl.bfloat16))
        if ROW_LOAD:  # each row's 512 latent bytes as one contiguous vector, then viewed as [4, 128]
            x = tl.reshape(tl.load(lat_base[:, None] + _columns(0, LATENT, VEC)[None, :], mask=ok[:, None],
                                   other=0.0, eviction_policy="evict_first"), [BLOCK_T, N_GROUPS, GROUP])
        else:
            x = tl.load(lat_base[:, None, None] + lat_off, mask=ok[:, None, None], other=0.0,
                        eviction_policy="evict_first")
        sc = tl.load(sc_base[:, None] + k[None, :], mask=ok[:, None], other=0.0)
        rope = tl.load(rope_base[:, None] + e[None, :], mask=ok[:, None], other=0.0,
                       eviction_policy="evict_first")
        if PERSISTENT:
            tile += step
            t_n, row_n, ok_n, live_n = _token_rows(tile, n_tokens, tts_ptr, cu_ptr, ss_ptr, bt_ptr, bt_s0, bt_s1,
                                                   n_req, max_blocks, n_blocks, c_s0, c_s1, row_len,
                                                   BLOCK_T, BLOCK_SIZE, PAGED, HAS_SEQ_STARTS)
        out_row = t * D_OUT
        y = x.to(tl.float32) * sc[:, :, None]
        _store(out_ptr + out_row[:, None, None] + lat_off, _round_fp32_to(y, OUT_DTYPE, ROUND_BY_BITS),
               live[:, None, None], STREAM)
        _store(out_ptr + out_row[:, None] + (LATENT + e)[None, :],
               _round_fp32_to(rope.to(tl.float32), OUT_DTYPE, ROUND_BY_BITS), live[:, None], STREAM)
        if PERSISTENT:
            t, row, ok, live = t_n, row_n, ok_n, live_n
