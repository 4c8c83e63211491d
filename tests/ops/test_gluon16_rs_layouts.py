"""CPU checks of the index algebra of the 16-head "rs" kernel (kernels/mla_decode_gluon16_rs.py), whose two wgmmas
read their A operands from the raw swizzled FP8 tiles straight into registers:

* the relabellings (perm_k, sigma, dim_of_row: the kernels' own index formulas, run on ints) are bijections with
  the stated inverses;
* each shared-memory view of views() addresses exactly the bytes a model of the TMA swizzle puts there (the
  16-byte group g of a row-major byte address a is stored at g ^ ((a / 128) % (swizzle / 16)));
* the register loads the kernel makes through those views are 16 consecutive bytes a thread and hit 8 different
  16-byte bank groups in every quarter warp (a 128-bit shared load is served 8 lanes at a time);
* _token_pairs_fp16's split / byte permute / join / permute turns the loaded bytes into the [row, token] tensor
  (modelled with numpy on index codes);
* the output store's reshape / permute names each accumulator row m by its dim dim_of_row(m), and O_DIMS gives each
  thread 16 consecutive dims of a head in adjacent registers (16-byte stores).
The numerics of the kernel itself are checked on a GPU (tests/gpu/test_mla_decode_gluon16_gpu.py)."""
import numpy as np
import pytest

pytest.importorskip("triton.experimental.gluon")
from fx_mla.ops.kernels import mla_decode_gluon16_rs as rs  # noqa: E402

BLOCK_N, HEADS, L, R = 64, 16, 512, 64
# the wgmma A-operand register layout (DotOperandLayout(0, NVMMA v3 [4, 1] [16, 16, 16], k_width 2)) as Triton 3.6
# reports it: register / lane / warp bit -> (row, column) step
A_REG_FIRST = [[0, 1], [8, 0], [0, 8], [0, 16], [0, 32]]
A_LANES = [[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]]
A_WARPS = [[16, 0], [32, 0]]


def _apply(bases, index):
    out = [0] * len(bases[0])
    for bit, basis in enumerate(bases):
        if index >> bit & 1:
            out = [o ^ b for o, b in zip(out, basis)]
    return tuple(out)


def _view_map(layout):
    """{logical index: element offset} of a SharedLinearLayout (offset bit b -> logical basis b, XOR-combined)."""
    bases = layout.offset_bases
    return {_apply(bases, off): off for off in range(1 << len(bases))}


def _swizzled(tok, byte, row_bytes, swizzle):
    a = tok * row_bytes + byte
    group = (a % row_bytes) // 16 ^ (a // 128) % (swizzle // 16)
    return tok * row_bytes + group * 16 + a % 16


def test_relabellings_are_bijections_with_their_inverses():
    assert sorted(rs.perm_k(k) for k in range(L)) == list(range(L))
    assert sorted(rs.perm_k(k) for k in range(R)) == list(range(R))
    assert all(rs.perm_k_inverse(rs.perm_k(k)) == k for k in range(L))
    assert all(rs.sigma(rs.sigma(i)) == i for i in range(BLOCK_N))
    assert sorted(rs.sigma(i) for i in range(BLOCK_N)) == list(range(BLOCK_N))
    assert sorted(rs.dim_of_row(m) for m in range(L)) == list(range(L))
    assert all(rs.row_of_dim(rs.dim_of_row(m)) == m for m in range(L))


def test_views_address_the_swizzled_bytes():
    v = rs.views(BLOCK_N, HEADS, L, R)
    k_map = _view_map(v["K_VIEW"])
    assert len(k_map) == BLOCK_N * L
    for (i, k), off in k_map.items():   # 4 chunk tiles [64, 128 B] back to back
        byte = rs.perm_k(k)
        tok = rs.sigma(i)
        assert off == (byte // 128) * BLOCK_N * 128 + _swizzled(tok, byte % 128, 128, 128), (i, k)
    kr_map = _view_map(v["KR_VIEW"])
    assert len(kr_map) == BLOCK_N * R
    for (i, k), off in kr_map.items():
        assert off == _swizzled(rs.sigma(i), rs.perm_k(k), R, R), (i, k)
    v_map = _view_map(v["V_VIEW"])
    assert len(v_map) == L * BLOCK_N
    for (m, j), off in v_map.items():
        d = rs.dim_of_row(m)
        assert off == (d // 128) * BLOCK_N * 128 + _swizzled(j, d % 128, 128, 128), (m, j)
    pt_map = _view_map(v["PT_VIEW"])       # fp16 elements: [16 heads, 64 tokens], 128-byte rows
    assert len(pt_map) == HEADS * BLOCK_N
    for (h, i), off in pt_map.items():
        t = rs.sigma(i)
        assert 2 * off == _swizzled(h, 2 * t, 128, 128), (h, i)


def _check_loads(view_map, reg_bases, lanes, warps, vector_regs, shape):
    """Every thread's registers `vector_regs` (bits) are 16 consecutive, 16-byte aligned bytes; each quarter warp of
    each such load hits 8 different 16-byte bank groups."""
    other = [b for n, b in enumerate(reg_bases) if n not in vector_regs]
    vec = [reg_bases[n] for n in vector_regs]
    for w in range(1 << len(warps)):
        for o in range(1 << len(other)):
            starts = []
            for lane in range(32):
                base = [a ^ b ^ c for a, b, c in zip(_apply(lanes, lane), _apply(warps, w), _apply(other, o))]
                offs = sorted(view_map[tuple(x ^ y for x, y in zip(base, _apply(vec, e)))] for e in range(16))
                assert offs == list(range(offs[0], offs[0] + 16)) and offs[0] % 16 == 0, (w, o, lane, offs)
                starts.append(offs[0])
            for q in range(4):
                groups = {s // 16 % 8 for s in starts[8 * q:8 * q + 8]}
                assert len(groups) == 8, (w, o, q, [s // 16 % 8 for s in starts[8 * q:8 * q + 8]])
    assert shape  # (documentation of the view's shape)


def test_scorer_loads_are_16_bytes_and_conflict_free():
    v = rs.views(BLOCK_N, HEADS, L, R)
    # A [64, 512]: k-steps of 16 columns, 32 of them (register bits after the first five: k bits 6, 7, 8)
    regs = A_REG_FIRST + [[0, 64], [0, 128], [0, 256]]
    _check_loads(_view_map(v["K_VIEW"]), regs, A_LANES, A_WARPS, vector_regs=(0, 2, 3, 4), shape=(64, 512))


def test_scorer_rope_loads_are_16_bytes():
    v = rs.views(BLOCK_N, HEADS, L, R)
    kr = _view_map(v["KR_VIEW"])
    regs = A_REG_FIRST
    other = [regs[1]]
    for w in range(4):
        for o in range(2):
            for lane in range(32):
                base = [a ^ b ^ c for a, b, c in zip(_apply(A_LANES, lane), _apply(A_WARPS, w), _apply(other, o))]
                offs = sorted(kr[tuple(x ^ y for x, y in zip(base, _apply([regs[0], regs[2], regs[3], regs[4]], e)))]
                              for e in range(16))
                assert offs == list(range(offs[0], offs[0] + 16)) and offs[0] % 16 == 0


def test_pv_loads_are_16_bytes_and_conflict_free():
    v = rs.views(BLOCK_N, HEADS, L, R)
    # the kernel's V_LOAD layout over [512 rows m, 64 tokens]
    regs = [[8, 0], [64, 0], [128, 0], [256, 0], [0, 1], [0, 8], [0, 16], [0, 32]]
    _check_loads(_view_map(v["V_VIEW"]), regs, A_LANES, A_WARPS, vector_regs=(0, 1, 2, 3), shape=(512, 64))


def test_token_pairs_relabelling():
    """numpy model of _token_pairs_fp16 on index codes x[m, t] = 64 m + t: the result must be x itself."""
    x = np.arange(L * BLOCK_N).reshape(L, BLOCK_N)
    xe, xo = x.reshape(L, BLOCK_N // 2, 2)[..., 0], x.reshape(L, BLOCK_N // 2, 2)[..., 1]

    def word_byte(src, m, b):  # byte b of the 4-byte word holding row m: rows m3, m6 = b & 1, b >> 1
        mm = (m & ~(8 | 64)) | ((b & 1) << 3) | ((b >> 1) << 6)
        return src[mm]

    lo = np.empty_like(xe)
    hi = np.empty_like(xe)
    for m in range(L):
        e, r = (m >> 3) & 1, (m >> 6) & 1      # slot bits (m3, m6) of the asm's 4 outputs
        src = xo if e else xe
        lo[m] = word_byte(src, m, r)          # a = (xe.b0, xo.b0, xe.b1, xo.b1)
        hi[m] = word_byte(src, m, 2 + r)      # b = (xe.b2, xo.b2, xe.b3, xo.b3)
    z = np.stack([lo, hi], axis=-1).reshape(2, 2, 2, 2, 2, 2, 8, BLOCK_N // 2, 2)
    z = z.transpose(0, 1, 8, 3, 4, 2, 6, 7, 5).reshape(L, BLOCK_N)
    assert (z == x).all()


def test_output_store_relabels_rows_as_dims_in_16_byte_runs():
    """_rs_pv's DIM_MAJOR_STORE: reshape [8, 4, 2, 8] (mb, w, h, l4) / permute (w, l4, mb, h) moves accumulator row m
    to position dim_of_row(m); O_DIMS is the accumulator layout (rs.ACC_*) with rows so renamed, registers 0..15 of
    a thread 16 consecutive dims of one head, and all of [512, 16] covered once."""
    m = np.arange(L)
    z = m.reshape(8, 4, 2, 8).transpose(1, 3, 0, 2).reshape(L)
    assert all(rs.dim_of_row(int(z[d])) == d for d in range(L))
    layout = rs.output_dims_layout(L, HEADS)
    regs, lanes, warps = layout.reg_bases, layout.lane_bases, layout.warp_bases
    # the same hardware positions as the accumulator's, each row basis renamed by dim_of_row (a linear map)
    renamed = [[rs.dim_of_row(r), h] for r, h in rs.ACC_REGS + rs.ACC_LANES + rs.ACC_WARPS]
    assert sorted(map(tuple, regs)) == sorted(map(tuple, renamed[:len(rs.ACC_REGS)]))
    assert [list(b) for b in lanes + warps] == renamed[len(rs.ACC_REGS):]
    seen = set()
    for w in range(4):
        for lane in range(32):
            owned = [_apply(regs + lanes + warps, r | lane << len(regs) | w << (len(regs) + 5))
                     for r in range(1 << len(regs))]
            for run in range(0, len(owned), 16):
                d0, h0 = owned[run]
                assert d0 % 16 == 0 and owned[run:run + 16] == [(d0 + i, h0) for i in range(16)]
            seen.update(owned)
    assert seen == {(d, h) for d in range(L) for h in range(HEADS)}
