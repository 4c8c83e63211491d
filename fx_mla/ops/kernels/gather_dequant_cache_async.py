"""Gluon (sm_90) form of gather_dequant_cache: persistent, warp-specialized, the cache read by cp.async copies.

Import only where Triton 3.6 Gluon is available (the launcher imports it lazily, for config flag "a").

Why (issue 5; RESULTS.md sessions 5-14): the Triton kernels stay ~5 points of copy bandwidth below a plain 1:2 cast
at 64K tokens. What they have that a cast does not is the index chain ahead of each program's data (token ->
request -> block table -> page: up to three dependent loads), paid by every short-lived program, and a register
tile that holds its data from load to store. Here each CTA lives for the whole launch and splits the work:

* a producer warp computes the cache rows of GROUP tiles at once (the same index semantics as the Triton kernels,
  _rows; one dependent chain a group, its loads spread over the lanes) and issues each tile's rows as 16-byte
  cp.async copies into one of STAGES shared-memory buffers, then signals `full` through
  cp.async.mbarrier.arrive (each producer lane's arrival lands when its copies have). It runs up to STAGES tiles
  ahead of the consumers: the index chains of later tiles overlap the data of earlier ones, and the bytes in flight
  do not live in registers.
* the consumer warps (the default partition) wait for a buffer, read it back (what becomes 16 output bytes a
  thread), dequantize (fp8 -> fp32 exact, one fp32 multiply by the scale, one round-to-nearest-even to the output
  dtype: the Triton kernels' arithmetic, so the result is bitwise theirs), store each tile's output rows in whole
  32-byte sectors, and release the buffer.

Status (RESULTS.md, session 16, 1x H100): opt-in, slower than the Triton default so far. The first forms measured
66-78 % of copy against the Triton kernels' 90 / 95 % (64K / 1M tokens); with the stores switched off the kernel ran
at the copy rate, with the reads switched off at ~60 %: a consumer thread then stored 32 bytes, so every store
instruction wrote half sectors. With 16 output bytes a thread (whole sectors) it reaches 85-86 / 90 % (64K / 1M),
bitwise the op in all GPU tests: still 4-5 points below the Triton kernels.

Masked copies (tokens past the end, tokens whose indices are out of range after torch's wrap-around) zero-fill the
buffer (cp.async with source size 0: no address is read), so such a token's output row is the same
round(0 * scale) the Triton kernels write. Nothing outside the cache, the block table or the metadata arrays is
read (a masked copy's address, e.g. the -16 sentinel row below, is formed but never dereferenced).

The grid (one or a few CTAs an SM) splits the tokens into equal contiguous ranges, one a CTA, walked in tiles of
BLOCK_T tokens: every CTA moves the same bytes within one token (tiles dealt round-robin would leave some CTAs one
tile more, ~3 % of a 64K-token call at one CTA an SM). Layouts: "plain" fp8 entries of D bytes, D a multiple of
16 (up to three power-of-two parts, the third masked to D, as the Triton kernel splits them), and "fp8_ds_mla"
(656-byte rows: 512 e4m3 | 4 fp32 group scales | 64 bf16 rope). PDL: the CTA waits for the previous kernel
(griddepcontrol.wait) before anything else (EARLY: but its first group's rows into L2, _early_prefetch), then lets
the next one be scheduled.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import mbarrier


@gluon.constexpr_function
def part_layout(width, vec, warps):
    """[tokens, width] elements, vec contiguous elements a thread, lanes along the width first."""
    width, vec, warps = (getattr(x, "value", x) for x in (width, vec, warps))
    lanes_w = min(32, max(width // vec, 1))
    return gl.BlockedLayout([1, vec], [32 // lanes_w, lanes_w], [warps, 1], [1, 0])


@gluon.constexpr_function
def group_layout(warps, vec=16):
    """fp8_ds_mla latent [tokens, 4 groups, 128] elements, vec contiguous a thread (lanes along a group first)."""
    warps, vec = (getattr(x, "value", x) for x in (warps, vec))
    lanes_c = min(32, 128 // vec)
    return gl.BlockedLayout([1, 1, vec], [1, 32 // lanes_c, lanes_c], [warps, 1, 1], [2, 1, 0])


@gluon.constexpr_function
def smem_layout(rank, vec):
    """Unswizzled, row-major, for buffers of `rank` dims (a leading stage index on top); vec: elements a copy."""
    rank, vec = (getattr(x, "value", x) for x in (rank, vec))
    return gl.SwizzledSharedLayout(vec=vec, per_phase=1, max_phase=1, order=list(range(rank - 1, -1, -1)))


@gluon.jit
def _gdc(INSTR: gl.constexpr):
    gl.inline_asm_elementwise(INSTR + " // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _rows(t, live, tts_ptr, cu_ptr, ss_ptr, bt_ptr, bt_s0, bt_s1, n_req, max_blocks, n_blocks, c_s0, c_s1, row_len,
          BLOCK_SIZE: gl.constexpr, PAGED: gl.constexpr, HAS_SEQ_STARTS: gl.constexpr, CG: gl.constexpr = False):
    """Token ids t (int64) -> element offset of each one's cache row, and `ok`: the token reads the cache. The Triton
    kernels' _rows_of, line for line (torch's floor division and one wrap-around of negative indices). CG: the
    index loads bypass L1 (EARLY's reads before the PDL wait)."""
    MOD: gl.constexpr = ".cg" if CG else ""
    if PAGED:
        b = t // row_len
        off = t - b * row_len
        ok = live
    else:
        s = gl.load(tts_ptr + t, mask=live, other=0, cache_modifier=MOD).to(gl.int64)
        valid = s >= 0
        b = gl.maximum(s, 0)
        ok = live & (b < n_req)
        start = gl.load(cu_ptr + b, mask=ok, other=0, cache_modifier=MOD).to(gl.int64)
        if HAS_SEQ_STARTS:
            start -= gl.load(ss_ptr + b, mask=ok, other=0, cache_modifier=MOD).to(gl.int64)
        off = gl.where(valid, t - start, 0)
    q = off // BLOCK_SIZE
    r = off - q * BLOCK_SIZE
    neg = r < 0
    j = gl.where(neg, q - 1, q)
    r = gl.where(neg, r + BLOCK_SIZE, r)
    j = gl.where(j < 0, j + max_blocks, j)
    ok = ok & (j >= 0) & (j < max_blocks)
    blk = gl.load(bt_ptr + b * bt_s0 + j * bt_s1, mask=ok, other=0, cache_modifier=MOD).to(gl.int64)
    blk = gl.where(blk < 0, blk + n_blocks, blk)
    ok = ok & (blk >= 0) & (blk < n_blocks)
    return blk * c_s0 + r * c_s1, ok


@gluon.jit
def _copy_part(dst, base, rows_s, W: gl.constexpr, VALID: gl.constexpr, SHIFT: gl.constexpr, LAYOUT: gl.constexpr,
               DIAG: gl.constexpr = 0):
    """cp.async of columns [0, VALID) of each token's row part into dst [BT, W]: typed pointer base + (row >> SHIFT)
    (row: the byte offset of a row, a multiple of 16, read from rows_s; negative: the token reads nothing)."""
    row = rows_s.load(gl.SliceLayout(1, LAYOUT))
    ok = row >= 0
    if SHIFT == 0:
        off = gl.multiple_of(row, 16)
    else:
        off = gl.multiple_of(row >> SHIFT, 16 >> SHIFT)
    d = gl.arange(0, W, layout=gl.SliceLayout(0, LAYOUT))
    if VALID == W:
        m = ok[:, None] & (d >= 0)[None, :]
    else:
        m = ok[:, None] & (d < VALID)[None, :]
    if DIAG == 2:  # development only: no global reads (zero-filled copies)
        m = m & (d < 0)[None, :]
    async_copy.async_copy_global_to_shared(dst, base + off[:, None] + d[None, :], mask=m,
                                           eviction_policy="evict_first")


@gluon.jit
def _emit_part(src, out_ptr, t0, end, s, OFF: gl.constexpr, W: gl.constexpr, VALID: gl.constexpr,
               D_OUT: gl.constexpr, HAS_SCALE: gl.constexpr, BLOCK_T: gl.constexpr, LAYOUT: gl.constexpr,
               DIAG: gl.constexpr = 0):
    """Columns [OFF, OFF + VALID) of output rows t0 .. t0 + BLOCK_T (those below end) from src [BT, W]:
    round(fp32(x) * s)."""
    y = src.load(LAYOUT).to(gl.float32)
    if HAS_SCALE:
        y = y * s
    t = t0 + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, LAYOUT))
    d = gl.arange(0, W, layout=gl.SliceLayout(0, LAYOUT))
    if VALID == W:
        m = (t < end)[:, None] & (d >= 0)[None, :]
    else:
        m = (t < end)[:, None] & (d < VALID)[None, :]
    if DIAG == 1:  # development only: no stores
        m = m & (d < 0)[None, :]
    gl.store(out_ptr + t[:, None] * D_OUT + (OFF + d)[None, :], y.to(out_ptr.dtype.element_ty), mask=m)


@gluon.jit
def _cta_range(n_tokens):
    """This CTA's tokens [begin, end): the grid splits n_tokens into equal contiguous ranges (within one token)."""
    pid = gl.program_id(0).to(gl.int64)
    grid = gl.num_programs(0)
    return pid * n_tokens // grid, (pid + 1) * n_tokens // grid


@gluon.jit
def _producer(bufs, rows_s, full, empty, cache_ptr, tts_ptr, cu_ptr, ss_ptr, bt_ptr, n_tokens, n_req, max_blocks,
              n_blocks, bt_s0, bt_s1, c_s0, c_s1, row_len,
              P1: gl.constexpr, P2: gl.constexpr, P3: gl.constexpr, R3: gl.constexpr, DS_MLA: gl.constexpr,
              BLOCK_SIZE: gl.constexpr, BLOCK_T: gl.constexpr, STAGES: gl.constexpr, GROUP: gl.constexpr,
              PAGED: gl.constexpr, HAS_SEQ_STARTS: gl.constexpr, DIAG: gl.constexpr):
    """One warp: tile k of this CTA into buffer k % STAGES (module docstring). The index chain runs for GROUP tiles
    at once (GROUP * BLOCK_T tokens, spread over the lanes: its dependent loads are paid once a group, not once a
    tile); the rows go through rows_s to each part's layout (-16: the token reads nothing; a multiple of 16 like
    every row offset, so the masked lanes' addresses keep the 16-byte alignment the copies are vectorized for)."""
    begin, end = _cta_range(n_tokens)
    n_my = gl.cdiv(end - begin, BLOCK_T).to(gl.int32)
    CHUNK: gl.constexpr = GROUP * BLOCK_T
    ROW_D: gl.constexpr = gl.BlockedLayout([(CHUNK + 31) // 32], [32], [1], [0])
    if DS_MLA:
        LA: gl.constexpr = group_layout(1)
        LS: gl.constexpr = part_layout(4, 4, 1)
        LR: gl.constexpr = part_layout(64, 8, 1)
        ROW3: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, LA))
        g4 = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, LA)))
        c128 = gl.arange(0, 128, layout=gl.SliceLayout(0, gl.SliceLayout(1, LA)))
        lat_ptr = cache_ptr.to(gl.pointer_type(gl.float8e4nv), bitcast=True)
        sc_ptr = (cache_ptr + 512).to(gl.pointer_type(gl.float32), bitcast=True)     # 4 fp32 group scales
        rope_ptr = (cache_ptr + 528).to(gl.pointer_type(gl.bfloat16), bitcast=True)  # 64 bf16 rope
    else:
        V: gl.constexpr = 128 // cache_ptr.dtype.element_ty.primitive_bitwidth
        LA: gl.constexpr = part_layout(P1, V, 1)
        LB: gl.constexpr = part_layout(P2, V, 1)
        LC: gl.constexpr = part_layout(P3, V, 1)
    for c in range(gl.cdiv(n_my, GROUP)):
        t = begin + c * CHUNK + gl.arange(0, CHUNK, layout=ROW_D)
        row, ok = _rows(t, t < end, tts_ptr, cu_ptr, ss_ptr, bt_ptr, bt_s0, bt_s1, n_req, max_blocks, n_blocks,
                        c_s0, c_s1, row_len, BLOCK_SIZE, PAGED, HAS_SEQ_STARTS)
        gl.thread_barrier()  # the previous group's reads of rows_s are done
        rows_s.store(gl.where(ok, row, -16))
        gl.thread_barrier()
        for g in gl.static_range(GROUP):
            k = c * GROUP + g
            if k < n_my:
                st = k % STAGES
                rs = rows_s.slice(g * BLOCK_T, BLOCK_T)
                mbarrier.wait(empty.index(st), ((k // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1 at once
                if DS_MLA:
                    lat_s, sc_s, rope_s = bufs
                    row3 = rs.load(ROW3)  # latent [BT, 4, 128] e4m3 bytes
                    ok3 = row3 >= 0
                    row3 = gl.multiple_of(row3, 16)
                    off3 = row3[:, None, None] + (g4 * 128)[None, :, None] + c128[None, None, :]
                    m3 = ok3[:, None, None] & (g4 >= 0)[None, :, None] & (c128 >= 0)[None, None, :]
                    if DIAG == 2:
                        m3 = m3 & (c128 < 0)[None, None, :]
                    async_copy.async_copy_global_to_shared(lat_s.index(st), lat_ptr + off3, mask=m3,
                                                           eviction_policy="evict_first")
                    # row offsets are multiples of 16 bytes: exact in fp32 (>> 2) and bf16 (>> 1) elements
                    _copy_part(sc_s.index(st), sc_ptr, rs, 4, 4, 2, LS, DIAG)
                    _copy_part(rope_s.index(st), rope_ptr, rs, 64, 64, 1, LR, DIAG)
                else:
                    a_s, b_s, c_s = bufs
                    _copy_part(a_s.index(st), cache_ptr, rs, P1, P1, 0, LA, DIAG)
                    if P2 > 0:
                        _copy_part(b_s.index(st), cache_ptr + P1, rs, P2, P2, 0, LB, DIAG)
                    if P3 > 0:
                        _copy_part(c_s.index(st), cache_ptr + (P1 + P2), rs, P3, R3, 0, LC, DIAG)
                async_copy.mbarrier_arrive(full.index(st), increment_count=False)


@gluon.jit
def _consumer(bufs, full, empty, out_ptr, scale_ptr, n_tokens,
              P1: gl.constexpr, P2: gl.constexpr, P3: gl.constexpr, R3: gl.constexpr, D_OUT: gl.constexpr,
              DS_MLA: gl.constexpr, HAS_SCALE: gl.constexpr, BLOCK_T: gl.constexpr, STAGES: gl.constexpr,
              DIAG: gl.constexpr, num_warps: gl.constexpr):
    """The default partition: dequantize and store tile k of this CTA from buffer k % STAGES, release it. A thread
    takes 16 bytes of OUTPUT (8 bf16 / fp16, 4 fp32), neighbouring lanes neighbouring 16 bytes: each store
    instruction writes whole 32-byte sectors. (Session 16's first form took 16 bytes of input, 32 bytes of bf16
    output a thread: every st.global.v4 wrote half of each of 32 sectors, and with no stores at all the kernel ran
    near the copy rate, with stores only at ~60 % of it: the stores bounded it.)"""
    begin, end = _cta_range(n_tokens)
    n_my = gl.cdiv(end - begin, BLOCK_T).to(gl.int32)
    if HAS_SCALE:
        s = gl.load(scale_ptr)  # a device scalar: no host sync, CUDA-graph capturable
    else:
        s = 1.0
    V_OUT: gl.constexpr = 128 // out_ptr.dtype.element_ty.primitive_bitwidth  # elements in 16 output bytes
    if DS_MLA:
        LA: gl.constexpr = group_layout(num_warps, V_OUT)
        LS: gl.constexpr = gl.SliceLayout(2, LA)
        LR: gl.constexpr = part_layout(64, V_OUT, num_warps)
    else:
        LA: gl.constexpr = part_layout(P1, V_OUT, num_warps)
        LB: gl.constexpr = part_layout(P2, V_OUT, num_warps)
        LC: gl.constexpr = part_layout(P3, V_OUT, num_warps)
    for k in range(n_my):
        st = k % STAGES
        t0 = begin + k * BLOCK_T
        mbarrier.wait(full.index(st), (k // STAGES) & 1)
        if DS_MLA:
            lat_s, sc_s, rope_s = bufs
            x = lat_s.index(st).load(LA).to(gl.float32)
            sc = sc_s.index(st).load(LS)
            y = x * sc[:, :, None]
            t = t0 + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, LS))
            g = gl.arange(0, 4, layout=gl.SliceLayout(0, LS))
            c = gl.arange(0, 128, layout=gl.SliceLayout(0, gl.SliceLayout(1, LA)))
            m3 = (t < end)[:, None, None] & (g >= 0)[None, :, None] & (c >= 0)[None, None, :]
            if DIAG == 1:
                m3 = m3 & (c < 0)[None, None, :]
            ptr = out_ptr + t[:, None, None] * D_OUT + (g * 128)[None, :, None] + c[None, None, :]
            gl.store(ptr, y.to(out_ptr.dtype.element_ty), mask=m3)
            _emit_part(rope_s.index(st), out_ptr, t0, end, s, 512, 64, 64, D_OUT, False, BLOCK_T, LR, DIAG)
        else:
            a_s, b_s, c_s = bufs
            _emit_part(a_s.index(st), out_ptr, t0, end, s, 0, P1, P1, D_OUT, HAS_SCALE, BLOCK_T, LA, DIAG)
            if P2 > 0:
                _emit_part(b_s.index(st), out_ptr, t0, end, s, P1, P2, P2, D_OUT, HAS_SCALE, BLOCK_T, LB, DIAG)
            if P3 > 0:
                _emit_part(c_s.index(st), out_ptr, t0, end, s, P1 + P2, P3, R3, D_OUT, HAS_SCALE, BLOCK_T, LC, DIAG)
        gl.thread_barrier()  # every consumer warp's reads of the buffer are done
        mbarrier.arrive(empty.index(st))


@gluon.jit
def _early_prefetch(cache_ptr, tts_ptr, cu_ptr, ss_ptr, bt_ptr, n_tokens, n_req, max_blocks, n_blocks, bt_s0, bt_s1,
                    c_s0, c_s1, row_len, ROW_BYTES: gl.constexpr, BLOCK_SIZE: gl.constexpr, CHUNK: gl.constexpr,
                    PAGED: gl.constexpr, HAS_SEQ_STARTS: gl.constexpr, num_warps: gl.constexpr):
    """EARLY (with PDL), before the PDL wait: the CTA's first CHUNK tokens' rows into L2 (prefetch.global.L2 of each
    row's 128-byte lines), by indices read now with L1-bypassing loads. Those indices may be stale (the previous
    kernel may still be writing them) and serve these prefetch addresses only: every value the kernel computes comes
    from loads after the wait (the Triton kernels' flag "e"). A row out of range is not prefetched."""
    L: gl.constexpr = gl.BlockedLayout([1, 1], [32, 1], [num_warps, 1], [1, 0])
    NL: gl.constexpr = (ROW_BYTES + 127) // 128 + 1  # every 128 bytes from the row's start, then its last byte
    NLP: gl.constexpr = 1 << (NL - 1).bit_length()
    begin, end = _cta_range(n_tokens)
    t = begin + gl.arange(0, CHUNK, layout=gl.SliceLayout(1, L))
    row, ok = _rows(t, t < end, tts_ptr, cu_ptr, ss_ptr, bt_ptr, bt_s0, bt_s1, n_req, max_blocks, n_blocks, c_s0,
                    c_s1, row_len, BLOCK_SIZE, PAGED, HAS_SEQ_STARTS, True)
    k = gl.arange(0, NLP, layout=gl.SliceLayout(0, L))
    base = cache_ptr.to(gl.pointer_type(gl.uint8), bitcast=True)
    addr = base + row[:, None] + gl.minimum(k * 128, ROW_BYTES - 1)[None, :]
    flag = (ok[:, None] & (k < NL)[None, :]).to(gl.int32)
    gl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.b32 $0, 0; }",
                              "=r,l,r", [addr, flag], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _gather_dequant_cache_async_kernel(
        cache_ptr, out_ptr, scale_ptr, tts_ptr, cu_ptr, ss_ptr, bt_ptr,
        n_tokens, n_req, max_blocks, n_blocks, bt_s0, bt_s1, c_s0, c_s1, row_len,
        D_OUT: gl.constexpr, P1: gl.constexpr, P2: gl.constexpr, P3: gl.constexpr, DS_MLA: gl.constexpr,
        BLOCK_SIZE: gl.constexpr, BLOCK_T: gl.constexpr, STAGES: gl.constexpr, PAGED: gl.constexpr,
        HAS_SEQ_STARTS: gl.constexpr, HAS_SCALE: gl.constexpr, PDL: gl.constexpr, PRODUCER_REGS: gl.constexpr,
        num_warps: gl.constexpr, GROUP: gl.constexpr = 4, EARLY: gl.constexpr = False,
        ROW_BYTES: gl.constexpr = 576, DIAG: gl.constexpr = 0):
    """plain: out[t, :D_OUT] = round(fp32(cache[row(t), :D_OUT]) * scale), the entry read as parts P1 + P2 + a
    masked P3 (the launcher's _split_entry); fp8_ds_mla (DS_MLA; cache bytes): the 656-byte row dequantized to 576.
    Grid: persistent, a contiguous range of tokens a CTA (module docstring)."""
    if PDL:
        if EARLY:
            _early_prefetch(cache_ptr, tts_ptr, cu_ptr, ss_ptr, bt_ptr, n_tokens, n_req, max_blocks, n_blocks, bt_s0,
                            bt_s1, c_s0, c_s1, row_len, ROW_BYTES, BLOCK_SIZE, GROUP * BLOCK_T, PAGED, HAS_SEQ_STARTS,
                            num_warps)
        _gdc("griddepcontrol.wait;")
        _gdc("griddepcontrol.launch_dependents;")
    R3: gl.constexpr = D_OUT - P1 - P2
    if DS_MLA:
        LAT: gl.constexpr = smem_layout(3, 16)
        lat_s = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_T, 4, 128], LAT)
        sc_s = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_T, 4], smem_layout(2, 4))
        rope_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_T, 64], smem_layout(2, 8))
        bufs = (lat_s, sc_s, rope_s)
        V_IN: gl.constexpr = 16
    else:
        IN_DTYPE: gl.constexpr = cache_ptr.dtype.element_ty
        V_IN: gl.constexpr = 128 // IN_DTYPE.primitive_bitwidth
        a_s = gl.allocate_shared_memory(IN_DTYPE, [STAGES, BLOCK_T, P1], smem_layout(2, V_IN))
        b_s = gl.allocate_shared_memory(IN_DTYPE, [STAGES, BLOCK_T, P2 if P2 > 0 else V_IN], smem_layout(2, V_IN))
        c_s = gl.allocate_shared_memory(IN_DTYPE, [STAGES, BLOCK_T, P3 if P3 > 0 else V_IN], smem_layout(2, V_IN))
        bufs = (a_s, b_s, c_s)
    rows_s = gl.allocate_shared_memory(gl.int64, [GROUP * BLOCK_T], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(full.index(i), count=32)  # each producer lane's cp.async.mbarrier.arrive.noinc
        mbarrier.init(empty.index(i), count=1)
    gl.warp_specialize([
        (_consumer, (bufs, full, empty, out_ptr, scale_ptr, n_tokens, P1, P2, P3, R3, D_OUT, DS_MLA,
                     HAS_SCALE, BLOCK_T, STAGES, DIAG, num_warps)),
        (_producer, (bufs, rows_s, full, empty, cache_ptr, tts_ptr, cu_ptr, ss_ptr, bt_ptr, n_tokens, n_req, max_blocks,
                     n_blocks, bt_s0, bt_s1, c_s0, c_s1, row_len, P1, P2, P3, R3, DS_MLA, BLOCK_SIZE,
                     BLOCK_T, STAGES, GROUP, PAGED, HAS_SEQ_STARTS, DIAG)),
    ], [1], [PRODUCER_REGS])
