"""CPU checks of kernels/mla_decode_gluon.lat_layout, the loaders' register layout of a cache tile's latent words
[rows, 128] in the Gluon decode kernels, against a model of the shared-memory banks of the 128-byte-swizzled fp16 tile
the words are converted into (the layouts' docstring claims; the GPU timing is in RESULTS.md, session 5).

Model: a thread holds 4 consecutive FP8 words (16 entries) a register group; converted to fp16 they are two 16-byte
chunks of one tile row. The fp16 tile [rows, 512] with a 128-byte swizzle is stored as 8 swizzle columns of 64 entries;
chunk k of row r within its column lands on bank group (k ^ (r % 8)) (4 banks of 4 bytes), and the columns lie a
multiple of 128 bytes apart (the same banks). A 16-byte shared store is served a quarter warp (8 lanes) at a time: it
is conflict-free when those 8 lanes hit 8 different bank groups."""
import pytest

gluon = pytest.importorskip("triton.experimental.gluon")
from fx_mla.ops.kernels.mla_decode_gluon import lat_layout  # noqa: E402

WORDS = 128  # L / 4: 512 FP8 entries a row as 32-bit words


def _lane_positions(layout, warps, rows):
    """{(warp, register group): [(row, word) of lanes 0..31]}: where each lane's 4 consecutive words start."""
    out = {}
    if hasattr(layout, "lane_bases"):  # DistributedLinearLayout: positions are sums (XOR) of the set bits' bases
        def pos(bases, index):
            r = c = 0
            for bit, (br, bc) in enumerate(bases):
                if index >> bit & 1:
                    r ^= br
                    c ^= bc
            return r, c

        reg, lane, warp = layout.reg_bases, layout.lane_bases, layout.warp_bases
        assert reg[:2] == [[0, 1], [0, 2]], "4 consecutive words a thread"
        for w in range(warps):
            for g in range(1 << (len(reg) - 2)):
                base = [a ^ b for a, b in zip(pos(warp, w), pos(reg[2:], g))]
                out[(w, g)] = [tuple(a ^ b for a, b in zip(base, pos(lane, ln))) for ln in range(32)]
        return out
    spt, tpw, wpc = layout.size_per_thread, layout.threads_per_warp, layout.warps_per_cta
    assert list(spt) == [1, 4] and list(layout.order) == [1, 0]
    tile_r, tile_c = tpw[0] * wpc[0], 4 * tpw[1] * wpc[1]
    for w in range(warps):
        wr, wc = divmod(w, wpc[1])
        for g, (rr, cr) in enumerate((a, b) for a in range(rows // tile_r) for b in range(WORDS // tile_c)):
            out[(w, g)] = [(rr * tile_r + wr * tpw[0] + ln // tpw[1], cr * tile_c + wc * 4 * tpw[1] + 4 * (ln % tpw[1]))
                           for ln in range(32)]
    return out


def _bank_group(row, fp16_col):
    return ((fp16_col % 64) // 8) ^ (row % 8)


def _quarter_warp_conflicts(positions):
    """Largest number of lanes of one quarter warp on one bank group, over both 16-byte stores of every group."""
    worst = 1
    for lanes in positions.values():
        for half in (0, 8):  # a thread's two fp16 chunks: words c..c+1 -> fp16 4c..4c+7, words c+2..c+3 -> 4c+8..
            for q in range(4):
                groups = [_bank_group(r, 4 * c + half) for r, c in lanes[8 * q:8 * q + 8]]
                worst = max(worst, max(groups.count(x) for x in set(groups)))
    return worst


CASES = [("1x32", 4, 8), ("1x32", 8, 16), ("2x16", 4, 8), ("2x16", 8, 16), ("8x4", 4, 8), ("8x4", 8, 16),
         ("8x4", 4, 16), ("q2x4", 4, 8), ("q2x4", 8, 16), ("q2x4", 4, 16)]


@pytest.mark.parametrize("lanes,warps,rows", CASES)
def test_lat_layout_covers_the_tile_once(lanes, warps, rows):
    pos = _lane_positions(lat_layout(lanes, warps, rows), warps, rows)
    words = [(r, c + k) for lanes_ in pos.values() for r, c in lanes_ for k in range(4)]
    assert sorted(words) == [(r, c) for r in range(rows) for c in range(WORDS)]


@pytest.mark.parametrize("lanes,warps,rows", CASES)
def test_lat_layout_store_conflicts_as_documented(lanes, warps, rows):
    worst = _quarter_warp_conflicts(_lane_positions(lat_layout(lanes, warps, rows), warps, rows))
    assert worst == {"1x32": 2, "2x16": 2, "8x4": 1, "q2x4": 1}[lanes], worst


@pytest.mark.parametrize("lanes,warps,rows", CASES)
def test_lat_layout_load_row_segments(lanes, warps, rows):
    """Bytes of one cache row a warp's load reads contiguously (lanes of one row, 16 bytes each)."""
    expect = {"1x32": 512, "2x16": 256, "8x4": 64, "q2x4": 256}[lanes]
    for lanes_ in _lane_positions(lat_layout(lanes, warps, rows), warps, rows).values():
        for row in {r for r, _ in lanes_}:
            cols = sorted(c for r, c in lanes_ if r == row)
            assert cols == list(range(cols[0], cols[0] + 4 * len(cols), 4)) and 16 * len(cols) == expect


def test_lat_layout_q2x4_needs_whole_row_pairs():
    with pytest.raises(Exception, match="multiple of 2 x warps"):
        lat_layout("q2x4", 8, 8)
