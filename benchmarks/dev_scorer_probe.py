"""Where a scorer launch's time goes, CTA by CTA (issue 6), one GPU: the scorer kernel's development probe.

Session 13 put 1 x 128 x 65536 at ~16 tiles x 2.16 us + ~16 us of fixed cost (kernel alone ~13.9 us of it, a trivial
kernel on the same grid 2.4 us). Nsight Compute gives averages over the launch; this gives each CTA's own timeline.
With mla_decode_seesaw.SCORER_PROBE set, the kernel (kernels/mla_decode_scorer.py, PROBE) stores int64 stamps at
fixed points into 16 slots a CTA (_PROBE_SLOTS). The op runs in a CUDA graph of one call per rotated block table
(bench_decode's method: back to back, each call after the previous call's combine), replayed; the last call's
stamps are read. Cycle stamps are converted with the SM clock measured in the same launch (cycles against the global
nanosecond timer over each CTA's life). The phases come from the cycle counter; the cross-CTA figures (entry skew,
ends, kernel span, markers) from the global timer, whose update interval the hardware sets (sub-microsecond on the
H100s of session 14, where entry skews of 0.10-0.16 us were read). A CTA's "end" is its scorer partition's end
(slot 7); the helper's epilogue may end ~0.2 us later.

    PYTHONPATH=. python3 benchmarks/dev_scorer_probe.py [--shapes 1x128x65536,...] [--pdl early]
    # table on stdout, JSON to $OUT/dev_scorer_probe.json, else benchmarks/results/
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import bench_decode as bd  # noqa: E402
from fx_mla.ops import mla_decode_seesaw as ss  # noqa: E402

# slot: (what, partition); g = global nanosecond timer, c = SM cycle counter
_PROBE_SLOTS = {0: ("g entry", "default"), 1: ("c entry", "default"), 2: ("c before warp_specialize", "default"),
                3: ("c query in shared memory (EARLY_Q)", "scorer"), 4: ("c first tile full", "scorer"),
                5: ("c loop done", "scorer"), 6: ("c epilogue done", "scorer"), 7: ("g end", "scorer"),
                8: ("c first half tile stored", "producer"), 9: ("c producer done", "producer"),
                10: ("c loop done", "helper"), 11: ("c epilogue done", "helper")}


@triton.jit
def _stamp_kernel(buf_ptr, slot):
    """One program: the global nanosecond timer into buf[slot] (a marker kernel between the op's kernels)."""
    t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
    tl.store(buf_ptr + slot, t)


# phases: (name, from slot, to slot), cycle slots
PHASES = [("prologue (scales, split range, barriers)", 1, 2), ("query load (scorer)", 2, 3),
          ("first half tile stored (producer)", 2, 8), ("first tile full (scorer)", 2, 4),
          ("loop (scorer)", 4, 5), ("epilogue (scorer)", 5, 6), ("helper loop end - scorer loop end", 5, 10),
          ("epilogue (helper)", 10, 11), ("whole CTA (entry to scorer end)", 1, 6)]


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


def _replay(op, tables):
    """A CUDA graph of one op call per table (back to back), replayed three times: the stamps of its last call stay."""
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for t in tables:
            op(t)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()


def stamp_gaps(batch, heads, ctx, pdl):
    """Marker kernels around the scorer and its combine in a CUDA graph of one op call per rotated table, for the
    last call: A (before the op) -> scorer -> B -> combine -> C -> D (D right after C: a marker's own gap)."""
    cache, tables, lens, k_scale, q, _, _ = bd.make_inputs(batch, heads, ctx, 3)
    probe = torch.full((16 * 132 * 512,), -1, dtype=torch.int64, device="cuda")
    marks = torch.full((4,), -1, dtype=torch.int64, device="cuda")
    stamp = (lambda k: _stamp_kernel[(1,)](marks, k, num_warps=1))  # noqa: E731
    real_combine = ss.combine_splits

    def combine(*a, **k):
        stamp(1)
        real_combine(*a, **k)
        stamp(2)
        stamp(3)

    def op(t):
        stamp(0)
        torch.ops.fx_mla.mla_decode_fp8(q, cache, t, lens, k_scale, None, bd.SM_SCALE, bd.LAT, torch.bfloat16)
    old = ss.SCORER_PDL, ss.SCORER_PROBE
    try:
        ss.SCORER_PDL, ss.SCORER_PROBE, ss.combine_splits = pdl, probe, combine
        for t in tables:
            op(t)
        torch.cuda.synchronize()
        _replay(op, tables)
    finally:
        ss.SCORER_PDL, ss.SCORER_PROBE = old
        ss.combine_splits = real_combine
    rows = probe.view(-1, 16).cpu()
    rows = rows[rows[:, 0] >= 0].tolist()
    a, b, c, d = marks.cpu().tolist()
    first, last = min(x[0] for x in rows), max(x[7] for x in rows)
    del cache, tables
    torch.cuda.empty_cache()
    return dict(marker_to_first_cta_us=(first - a) / 1e3, scorer_span_us=(last - first) / 1e3,
                last_cta_end_to_marker_us=(b - last) / 1e3, combine_between_markers_us=(c - b) / 1e3,
                marker_to_marker_us=(d - c) / 1e3)


def probe_shape(batch, heads, ctx, pdl):
    cache, tables, lens, k_scale, q, _, _ = bd.make_inputs(batch, heads, ctx, 3)
    probe = torch.full((16 * 132 * 512,), -1, dtype=torch.int64, device="cuda")
    op = (lambda t: torch.ops.fx_mla.mla_decode_fp8(q, cache, t, lens, k_scale, None, bd.SM_SCALE, bd.LAT,
                                                    torch.bfloat16))
    old = ss.SCORER_PDL, ss.SCORER_PROBE
    try:
        ss.SCORER_PDL = pdl
        us_plain, _ = bd.time_us(op, tables)  # the op as timed in bench_decode (no probe)
        ss.SCORER_PROBE = probe
        us_probe, _ = bd.time_us(op, tables)  # ... and with the probe's stores (their own cost)
        torch.cuda.synchronize()
        probe.fill_(-1)
        _replay(op, tables)
    finally:
        ss.SCORER_PDL, ss.SCORER_PROBE = old
    rows = probe.view(-1, 16).cpu()
    rows = rows[rows[:, 0] >= 0]
    n = rows.shape[0]
    r = rows.tolist()
    g0 = min(x[0] for x in r)
    life_ns = [x[7] - x[0] for x in r]
    life_cyc = [x[6] - x[1] for x in r]
    ghz = sorted(c / ns for c, ns in zip(life_cyc, life_ns) if ns > 2000)
    ghz = ghz[len(ghz) // 2] if ghz else float("nan")
    res = dict(batch=batch, heads=heads, context=ctx, ctas=n, splits=n // (batch * heads // 64), pdl=str(pdl),
               op_us=us_plain, op_probe_us=us_probe, sm_ghz=ghz,
               kernel_span_us=(max(x[7] for x in r) - g0) / 1e3,
               start_skew_us=dict(p50=_pct([(x[0] - g0) / 1e3 for x in r], .5),
                                  max=(max(x[0] for x in r) - g0) / 1e3),
               end_us=dict(min=(min(x[7] for x in r) - g0) / 1e3, p50=_pct([(x[7] - g0) / 1e3 for x in r], .5),
                           max=(max(x[7] for x in r) - g0) / 1e3), phases={})
    for name, a, b in PHASES:
        d = [(x[b] - x[a]) / ghz / 1e3 for x in r if x[a] >= 0 and x[b] >= 0]
        if d:
            res["phases"][name] = dict(min=min(d), p50=_pct(d, .5), p90=_pct(d, .9), max=max(d))
    tiles = -(-ctx // (64 * res["splits"]))
    if "loop (scorer)" in res["phases"]:
        res["us_per_tile_p50"] = res["phases"]["loop (scorer)"]["p50"] / max(tiles, 1)
    res["tiles_per_cta"] = tiles
    del cache, tables
    torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1x128x65536,8x128x16384,64x128x4096")
    ap.add_argument("--pdl", default="False", choices=("False", "True", "early"), help="SCORER_PDL for the runs")
    ap.add_argument("--markers", action="store_true",
                    help="also time the launch gaps and the combine between marker kernels (stamp_gaps)")
    args = ap.parse_args()
    pdl = {"False": False, "True": True}.get(args.pdl, args.pdl)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}", flush=True)
    results = []
    if args.markers:  # the graph method's own cost: one marker kernel a graph against eight
        marks = torch.zeros(8, dtype=torch.int64, device="cuda")
        for n in (1, 8):
            g = torch.cuda.CUDAGraph()
            _stamp_kernel[(1,)](marks, 0, num_warps=1)
            torch.cuda.synchronize()
            with torch.cuda.graph(g):
                for k in range(n):
                    _stamp_kernel[(1,)](marks, k, num_warps=1)
            us = bd.bench_ms(g.replay) * 1e3
            print(f"graph of {n} marker kernel(s): {us:.2f} us a replay, {us / n:.2f} us a kernel", flush=True)
            results.append(dict(graph_of_markers=n, us_per_replay=us))
    for shp in args.shapes.split(","):
        b, h, c = (int(v) for v in shp.split("x"))
        res = probe_shape(b, h, c, pdl)
        results.append(res)
        print(f"\n{b} x {h} x {c}: {res['ctas']} CTAs ({res['splits']} splits of {res['tiles_per_cta']} tiles), "
              f"op {res['op_us']:.1f} us (with the probe {res['op_probe_us']:.1f}), SM clock {res['sm_ghz']:.2f} GHz, "
              f"kernel span {res['kernel_span_us']:.1f} us (entry of the first CTA to the end of the last); CTA "
              f"entries +{res['start_skew_us']['p50']:.2f} p50 / +{res['start_skew_us']['max']:.2f} max, ends "
              f"{res['end_us']['min']:.1f} / {res['end_us']['p50']:.1f} / {res['end_us']['max']:.1f} us "
              f"(min / p50 / max)", flush=True)
        print(f"  {'phase':<44} {'min':>7} {'p50':>7} {'p90':>7} {'max':>7}  us")
        for name, d in res["phases"].items():
            print(f"  {name:<44} {d['min']:7.2f} {d['p50']:7.2f} {d['p90']:7.2f} {d['max']:7.2f}")
        if "us_per_tile_p50" in res:
            print(f"  loop per tile (p50): {res['us_per_tile_p50']:.3f} us")
        if args.markers:
            res["markers"] = m = stamp_gaps(b, h, c, pdl)
            print("  markers: " + ", ".join(f"{k} {v:.2f}" for k, v in m.items()), flush=True)
    path = os.path.join(os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                        "dev_scorer_probe.json")
    with open(path, "w") as f:
        json.dump(dict(name="dev_scorer_probe", device=torch.cuda.get_device_name(), torch=torch.__version__,
                       triton=triton.__version__, slots={str(k): v for k, v in _PROBE_SLOTS.items()},
                       results=results), f, indent=1)


if __name__ == "__main__":
    main()
