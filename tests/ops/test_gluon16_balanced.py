"""CPU tests of the rs kernel's balanced schedule (RS_BALANCED; kernels/mla_decode_gluon16_rs.py): the schedule
itself (_decode_launch.balanced_segments, and the kernel's own formulas replayed in Python), the balanced combine
under TRITON_INTERPRET=1 (it merges the parts of split requests, leaves whole ones alone, fills empty ones), and the
launcher's call of the kernel. The kernel itself runs on a GPU only (tests/gpu/test_mla_decode_gluon16_gpu.py)."""
import inspect
import os
import subprocess
import sys

import pytest
import torch

from fx_mla.ops import mla_decode_gluon16 as g16mod

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BLOCK_N = 64


def balanced_segments(seq_lens, num_ctas: int, cap: int, block_n: int):
    """The balanced schedule in Python, from its definition (_decode_launch's comment): [(cta, request, first
    token, end token, whole)] for lengths clamped to [0, cap], in tile order."""
    tiles = [(min(max(int(n), 0), cap) + block_n - 1) // block_n for n in seq_lens]
    total = sum(tiles)
    out, p0 = [], 0
    for r, nt in enumerate(tiles):
        n = min(max(int(seq_lens[r]), 0), cap)
        for c in range(num_ctas):
            lo = max((c * total) // num_ctas - p0, 0)
            hi = min(((c + 1) * total) // num_ctas - p0, nt)
            if hi > lo:
                out.append((c, r, lo * block_n, min(hi * block_n, n), lo == 0 and hi == nt))
        p0 += nt
    return out


def balanced_prefix(seq_lens, cap: int, block_n: int):
    """tile_prefix as the kernel's CTA 0 writes it: request r's first tile in the end-to-end order, then T."""
    out = [0]
    for n in seq_lens:
        out.append(out[-1] + (min(max(int(n), 0), cap) + block_n - 1) // block_n)
    return out


def _ragged(batch, cap, seed):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, cap + 1, (batch,), generator=g)
    lens[torch.rand(batch, generator=g) < 0.2] = 0  # empty requests
    if batch > 2:
        lens[1], lens[2] = cap + 100, -5  # clamped to cap and to 0, as the kernels do
    return lens.tolist()


def _kernel_segments(lens, num_ctas, cap):
    """The kernel's walk (_balanced_range, then _rs_segment per request) replayed on ints."""
    nt = [(min(max(n, 0), cap) + BLOCK_N - 1) // BLOCK_N for n in lens]
    incl = [sum(nt[:i + 1]) for i in range(len(nt))]
    assert balanced_prefix(lens, cap, BLOCK_N) == [0] + incl  # CTA 0's tile_prefix: incl - nt, then T
    total = sum(nt)
    out = []
    for c in range(num_ctas):
        b_lo, b_hi = (c * total) // num_ctas, ((c + 1) * total) // num_ctas
        r = sum(1 for x in incl if x <= b_lo)
        p = sum(nt[:r])
        n_seg = max(sum(1 for x, t in zip(incl, nt) if x - t < b_hi) - r, 0)
        for _ in range(n_seg):
            n = min(max(lens[r], 0), cap)
            lo, hi = max(b_lo - p, 0), min(b_hi - p, nt[r])
            start = lo * BLOCK_N
            end = max(min(hi * BLOCK_N, n), start)
            if end > start:
                out.append((c, r, start, end, lo == 0 and hi == nt[r]))
            p += nt[r]
            r += 1
    return sorted(out, key=lambda s: (s[1], s[2]))


@pytest.mark.parametrize("batch,cap,num_ctas", [(1, 64 * 40, 132), (7, 64 * 9, 5), (32, 64 * 64, 132),
                                                (33, 1000, 7), (5, 64 * 3, 300), (12, 64 * 20, 1)])
def test_balanced_schedule_covers_each_token_once_in_equal_shares(batch, cap, num_ctas):
    lens = _ragged(batch, cap, batch * 31 + num_ctas)
    segs = balanced_segments(lens, num_ctas, cap, BLOCK_N)
    assert _kernel_segments(lens, num_ctas, cap) == sorted(segs, key=lambda s: (s[1], s[2]))
    for r, n in enumerate(lens):
        n = min(max(n, 0), cap)
        mine = sorted((s for s in segs if s[1] == r), key=lambda s: s[2])
        assert [(a, b) for _, _, a, b, _ in mine] == [(a, b) for a, b in zip([0] + [s[3] for s in mine[:-1]],
                                                                               [s[3] for s in mine])]
        assert (mine[-1][3] if mine else 0) == n  # every token, in order, no gap
        assert all(s[2] % BLOCK_N == 0 and s[3] > s[2] for s in mine)  # whole tiles from the request's start
        assert all(s[4] == (len(mine) == 1) for s in mine)  # "whole" iff the request lies in one CTA
        assert len({s[0] for s in mine}) == len(mine)
    slots = [r + c for c, r, _, _, whole in segs if not whole]
    assert len(slots) == len(set(slots)) and all(s < batch + num_ctas for s in slots)
    tiles = {}
    for c, _, a, b, _ in segs:
        tiles[c] = tiles.get(c, 0) + (b - a + BLOCK_N - 1) // BLOCK_N
    total = sum((min(max(n, 0), cap) + BLOCK_N - 1) // BLOCK_N for n in lens)
    assert all(total // num_ctas <= t <= -(-total // num_ctas) for t in tiles.values())  # equal shares
    # a request's CTAs by the combine's formula: tile x lies in CTA ((x + 1) G - 1) // T; between the first and the
    # last, those with an empty share (G > T) wrote nothing
    p0 = 0
    for r, n in enumerate(lens):
        nt = (min(max(n, 0), cap) + BLOCK_N - 1) // BLOCK_N
        if nt:
            ctas = sorted(s[0] for s in segs if s[1] == r)
            span = range(((p0 + 1) * num_ctas - 1) // total, ((p0 + nt) * num_ctas - 1) // total + 1)
            assert ctas == [c for c in span if ((c + 1) * total) // num_ctas > (c * total) // num_ctas]
        p0 += nt


def test_balanced_launcher_calls_the_kernel_and_its_combine(monkeypatch, fake_hopper):
    """RS_BALANCED on (CPU tensors, the kernel replaced by a recorder that binds its signature): grid (G,), G CTAs
    as num_splits, BALANCED with the batch's power of two, the [(B + G) H, L] workspace, the balanced combine."""
    from fx_mla.ops.kernels import mla_decode_gluon16_rs as krs
    real = krs._mla_decode_gluon16_rs_kernel
    calls, combined = [], []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **constexprs):
                inspect.signature(real.fn).bind(*args, **constexprs)
                calls.append((grid, args, constexprs))
            return launch

    monkeypatch.setattr(krs, "_mla_decode_gluon16_rs_kernel", Recorder())
    monkeypatch.setattr(g16mod, "gluon16_unsupported_reason", lambda *a, **k: None)
    monkeypatch.setattr(g16mod, "combine_balanced", lambda *a: combined.append(a))
    monkeypatch.setattr(g16mod, "combine_splits", lambda *a, **k: pytest.fail("the split combine ran"))
    monkeypatch.setattr(g16mod, "RS_BALANCED", True)
    batch, heads = 5, 16
    q = torch.randn(batch, heads, 576, dtype=torch.bfloat16)
    kv = torch.randn(12, 64, 576).to(torch.float8_e4m3fn)
    bt = torch.randint(0, 12, (batch, 3), dtype=torch.int32)
    lens = torch.tensor([100, 0, 192, 5, 64], dtype=torch.int32)
    ks = torch.tensor([0.5])
    out, lse = torch.empty(batch, heads, 512, dtype=torch.bfloat16), torch.empty(batch, heads)
    assert g16mod.launch_mla_decode_gluon16(q, kv, bt, lens, ks, None, 0.1, 512, out, lse, num_splits=7) == (out, lse)
    [(grid, args, constexprs)] = calls
    assert grid == (7, ) and args[13] == 7 and args[-2] == batch  # num_splits = the CTA count; batch, tile_prefix
    assert constexprs["BALANCED"] and constexprs["B_POW2"] == 8 and not constexprs["SINGLE_SPLIT"]
    part_o, part_lse, prefix = args[9], args[10], args[-1]  # after the two descriptors
    assert part_o.shape == ((batch + 7) * heads, 512) and part_lse.shape == ((batch + 7) * heads, )
    assert prefix.dtype == torch.int32 and prefix.shape == (batch + 1, )
    [(c_o, c_lse, c_out, c_lse_out, c_prefix, c_ctas, c_lat)] = combined
    assert c_o is part_o and c_lse is part_lse and c_out is out and c_lse_out is lse and c_prefix is prefix
    assert (c_ctas, c_lat) == (7, 512)
    # off (the default), or batches above RS_BALANCED_MAX_BATCH: the split form
    monkeypatch.setattr(g16mod, "RS_BALANCED_MAX_BATCH", batch - 1)
    monkeypatch.setattr(g16mod, "combine_splits", lambda *a, **k: None)
    g16mod.launch_mla_decode_gluon16(q, kv, bt, lens, ks, None, 0.1, 512, out, lse, num_splits=3)
    assert calls[-1][0] == (3, batch) and not calls[-1][2]["BALANCED"] and calls[-1][2]["B_POW2"] == 1
    assert calls[-1][1][-1] is calls[-1][1][4]  # tile_prefix unused: seq_lens in its place


def test_balanced_applies_only_where_its_int32_tile_counts_hold(monkeypatch):
    monkeypatch.setattr(g16mod, "RS_BALANCED", False)
    assert not g16mod.balanced_applies(8, 256, 64) and g16mod.balanced_applies(8, 256, 64, True)
    monkeypatch.setattr(g16mod, "RS_BALANCED", True)
    assert g16mod.balanced_applies(4096, 2 ** 19 - 1, 64)  # 4096 x (2**19 - 1) tiles: below 2**31
    assert not g16mod.balanced_applies(4096, 2 ** 19, 64) and not g16mod.balanced_applies(8, 256, 64, False)
    assert not g16mod.balanced_applies(4096, 2 ** 17, 256)  # 2**17 blocks of 256 tokens: 2**19 tiles a row
    assert not g16mod.balanced_applies(g16mod.RS_BALANCED_MAX_BATCH + 1, 4, 64)


def test_balanced_combine_interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "balanced combine checks passed" in r.stdout


def _combine_checks():
    """Random token scores and values a (request, head): each segment's (o, lse) over its tokens in float64 goes
    into its slot r + c (fp32), or into out / lse for a whole request; every other slot and the rows of the merged
    requests are NaN. The combine must give the float64 softmax over all tokens, leave the whole requests' rows
    bitwise as they were, and write out = 0, lse = -inf for requests without tokens."""
    from fx_mla.ops._decode_launch import balanced_workspace, combine_balanced
    assert os.environ.get("TRITON_INTERPRET") == "1"
    heads, lat = 3, 96
    # (4, 192, 40): more CTAs than tiles, so some CTAs between a request's first and last have no share
    for batch, cap, num_ctas, out_dtype in ((6, 64 * 6, 5, torch.float32), (9, 64 * 4, 13, torch.bfloat16),
                                            (3, 64 * 10, 2, torch.float32), (4, 64 * 3, 40, torch.float32)):
        lens = _ragged(batch, cap, num_ctas)
        lens[0] = max(lens[0], 130)  # at least one request split across CTAs
        g = torch.Generator().manual_seed(batch)
        scores = torch.randn(batch, heads, cap, generator=g, dtype=torch.float64) * 3
        values = torch.randn(batch, cap, lat, generator=g, dtype=torch.float64)
        q = torch.empty(batch, heads, 1)
        part_o, part_lse, prefix = balanced_workspace(q, num_ctas, lat, poison=True)
        assert bool((prefix == -1).all())  # poisoned: the kernel's CTA 0 writes it
        prefix.copy_(torch.tensor(balanced_prefix(lens, cap, BLOCK_N), dtype=torch.int32))
        out = torch.full((batch, heads, lat), float("nan"), dtype=out_dtype)
        lse = torch.full((batch, heads), float("nan"))
        ref_o = torch.zeros(batch, heads, lat, dtype=torch.float64)
        ref_lse = torch.full((batch, heads), float("-inf"), dtype=torch.float64)
        segs = balanced_segments(lens, num_ctas, cap, BLOCK_N)
        split = set()
        for c, r, a, b, whole in segs:
            s_lse = torch.logsumexp(scores[r, :, a:b], dim=1)
            s_o = torch.softmax(scores[r, :, a:b], dim=1) @ values[r, a:b]
            if whole:
                out[r], lse[r] = s_o.to(out_dtype), s_lse.float()
            else:
                rows = slice((r + c) * heads, (r + c + 1) * heads)
                part_o[rows], part_lse[rows] = s_o.float(), s_lse.float()
                split.add(r)
        for r, n in enumerate(lens):
            n = min(max(n, 0), cap)
            if n:
                ref_lse[r] = torch.logsumexp(scores[r, :, :n], dim=1)
                ref_o[r] = torch.softmax(scores[r, :, :n], dim=1) @ values[r, :n]
        before_o, before_lse = out.clone(), lse.clone()
        combine_balanced(part_o, part_lse, out, lse, prefix, num_ctas, lat)
        assert split and not out.isnan().any() and not lse.isnan().any(), (lens, split)
        for r, n in enumerate(lens):
            if r not in split and min(max(n, 0), cap) > 0:  # written by its one CTA: untouched
                assert torch.equal(out[r], before_o[r]) and torch.equal(lse[r], before_lse[r]), r
            elif r in split:
                err = float((out[r].double() - ref_o[r]).norm() / ref_o[r].norm())
                assert err < (1e-2 if out_dtype == torch.bfloat16 else 1e-6), (r, err)
                assert float((lse[r].double() - ref_lse[r]).abs().max()) < 1e-5, r
            else:  # no tokens
                assert float(out[r].abs().max()) == 0.0 and bool(torch.isinf(lse[r]).all() and (lse[r] < 0).all())
    print("balanced combine checks passed")


if __name__ == "__main__":
    _combine_checks()
