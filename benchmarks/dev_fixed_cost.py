"""Fixed cost against per-pair cost of the 128-head seesaw decode kernel (issue 6), one GPU.

Sessions 4-6 put B = 1 / 8 at 37 / 47 % of the roofline and B = 16 / 64 at 52-56 %; per 64-token pair a CTA the
short splits of B = 1 / 8 cost ~3.1-3.7 us against ~2.7-3.0 us at B = 16 / 64, which points at a cost a CTA pays
once (launch, query load, epilogue stores of the partials, the wait for the slowest CTA) rather than at the loop.
This measures it: the split count is held fixed and seq_lens is set so that every CTA gets p pairs, p in PAIRS;
t(p) = fixed + p * per_pair is fitted for p >= 2 (least squares), t(0) is the empty launch (query load, no loop,
out = 0 / lse = -inf written). For each (B, splits): the kernel alone (the launcher's combine replaced by a no-op)
and the op (kernel + combine), both kernel forms ("seesaw", "producer"). A trivial Triton kernel on the same grid
gives the launch floor. Each form's output is checked against the fp32 reference at one p first. Session 12:
--variants adds the scorer kernel (its 64-token tile is a pair here), the default since then.

  PYTHONPATH=. python3 benchmarks/dev_fixed_cost.py [--variants scorer,seesaw] [--no-split-ab]
  # JSON to $OUT/dev_fixed_cost.json, else results/
"""
from __future__ import annotations

import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import bench_decode as bd  # noqa: E402
from fx_mla.ops import mla_decode_fp8 as dmod  # noqa: E402
from fx_mla.ops import mla_decode_seesaw as smod  # noqa: E402

# (batch, splits): the splits the op picks for 1 x 128 x 65536, 8 x 128 x 16384 and 64 x 128 x 4096 on 132 SMs
# (1 x 128 x 65536: 66 before session 7, two of them empty; SPLIT_AB times 66 against 64 on the real shape)
CASES = [(1, 64), (8, 8), (64, 1)]
PAIRS = [0, 2, 4, 8, 16, 32]
CHECK_AT = 8


@triton.jit
def _touch(x_ptr):
    pid = tl.program_id(0) + tl.program_id(1) * tl.num_programs(0) + tl.program_id(2) * tl.num_programs(0) * \
        tl.num_programs(1)
    tl.store(x_ptr + pid, pid.to(tl.float32))


def fit(ps, ts):
    pts = [(p, t) for p, t in zip(ps, ts) if p >= 2 and t is not None]
    n = len(pts)
    if n < 2:
        return None, None
    mp = sum(p for p, _ in pts) / n
    mt = sum(t for _, t in pts) / n
    b = sum((p - mp) * (t - mt) for p, t in pts) / sum((p - mp) ** 2 for p, _ in pts)
    return mt - b * mp, b


def main():
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="scorer,seesaw,producer",
                    help="seesaw launcher variants to split (the scorer's 64-token tile is the seesaw's pair)")
    ap.add_argument("--no-split-ab", action="store_true", help="skip the 66 / 64 split A/B of session 7")
    args = ap.parse_args()
    rows = []
    real_combine = smod.combine_splits
    for batch, splits in CASES:
        max_ctx = max(PAIRS) * 64 * splits
        cache, tables, _, k_scale, q, _, _ = bd.make_inputs(batch, 128, max_ctx, 3)
        out = torch.empty(batch, 128, bd.LAT, dtype=torch.bfloat16, device="cuda")
        lse = torch.empty(batch, 128, device="cuda")
        grid = (128 // smod.BLOCK_H, splits, batch)
        scratch = torch.empty(grid[0] * grid[1] * grid[2], device="cuda")
        floor = bd.time_us(lambda t: _touch[grid](scratch), tables)[0]
        print(f"B={batch} splits={splits}: trivial kernel on the grid {floor:.2f} us", flush=True)
        for variant in args.variants.split(","):
            for combine in (False, True):
                if combine and splits == 1:
                    continue
                entry = dict(batch=batch, splits=splits, variant=variant, combine=combine, launch_floor_us=floor,
                             pairs=PAIRS, us=[])
                smod.combine_splits = real_combine if combine else (lambda *a, **k: None)
                try:
                    for p in PAIRS:
                        lens = torch.full((batch,), p * 64 * splits, dtype=torch.int32, device="cuda")
                        call = lambda t, lens=lens: smod.launch_mla_decode_seesaw(  # noqa: E731
                            q, cache, t, lens, k_scale, None, bd.SM_SCALE, bd.LAT, out, lse, num_splits=splits,
                            variant=variant)
                        if p == CHECK_AT and (combine or splits == 1):
                            out.fill_(float("nan"))
                            call(tables[0])
                            ref_o, ref_l = dmod.mla_decode_fp8_reference(q, cache, tables[0], lens, k_scale, None,
                                                                         bd.SM_SCALE, bd.LAT, torch.float32)
                            entry["rel_err"] = float((out.float() - ref_o).norm() / ref_o.norm())
                            entry["lse_err"] = float((lse - ref_l).abs().max())
                        entry["us"].append(bd.time_us(call, tables)[0])
                except Exception as e:  # noqa: BLE001  (report, keep going)
                    entry["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                finally:
                    smod.combine_splits = real_combine
                fixed, per_pair = fit(PAIRS, entry["us"])
                entry.update(fixed_us=fixed, per_pair_us=per_pair)
                rows.append(entry)
                ts = " ".join(f"{t:7.1f}" for t in entry["us"])
                print(f"B={batch:3d} splits={splits:3d} {variant:>8} {'op' if combine else 'kernel':>6}: "
                      f"t(p={PAIRS}) = {ts} us; fit fixed {fixed if fixed is None else round(fixed, 2)} us + "
                      f"{per_pair if per_pair is None else round(per_pair, 3)} us/pair; "
                      f"err {entry.get('rel_err')} {entry.get('error', '')}", flush=True)
        del cache, tables
        torch.cuda.empty_cache()
    split_ab = []
    if args.no_split_ab:
        return _write(rows, split_ab)
    cache, tables, lens, k_scale, q, _, _ = bd.make_inputs(1, 128, 65536, 3)
    out = torch.empty(1, 128, bd.LAT, dtype=torch.bfloat16, device="cuda")
    lse = torch.empty(1, 128, device="cuda")
    ref_o, _ = dmod.mla_decode_fp8_reference(q, cache, tables[0], lens, k_scale, None, bd.SM_SCALE, bd.LAT,
                                             torch.float32)
    for rep in range(2):
        for splits in (66, 64):
            call = lambda t, n=splits: smod.launch_mla_decode_seesaw(  # noqa: E731
                q, cache, t, lens, k_scale, None, bd.SM_SCALE, bd.LAT, out, lse, num_splits=n)
            out.fill_(float("nan"))
            call(tables[0])
            err = float((out.float() - ref_o).norm() / ref_o.norm())
            split_ab.append(dict(splits=splits, us=bd.time_us(call, tables)[0], rel_err=err))
            print(f"1x128x65536 op at {splits} splits: {split_ab[-1]['us']:.1f} us (err {err:.1e})", flush=True)
    _write(rows, split_ab)


def _write(rows, split_ab):
    res = dict(name="dev_fixed_cost", device=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=triton.__version__, rows=rows, split_ab=split_ab)
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    with open(os.path.join(out_dir, "dev_fixed_cost.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
