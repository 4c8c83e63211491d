"""Pick the winner of a dev_lane_rows.py A/B (its JSON) for a follow-up command in the same GPU session.

Prints the winning setting value (e.g. "SCORER_MERGE=True" or "SCORER_PDL=early+SCORER_MERGE=False"): the one with
the lowest mean over the rows of its time relative to the first (baseline) setting's, among settings whose outputs
all checked ok, if that mean is at least --margin percent below 1 and it is no slower than the baseline by more than
--margin on any row; else the baseline.
A gpu_suite recipe turns the value into bench_decode.py flags with --flags.

    python3 benchmarks/pick_setting.py $OUT/dev_settings.json [--margin 1] [--flags]
"""
from __future__ import annotations

import argparse
import json

# a setting -> bench_decode.py flags
FLAGS = {("SCORER_PDL", "True"): "--scorer-pdl True", ("SCORER_PDL", "early"): "--scorer-pdl early",
         ("SCORER_MERGE", "True"): "--scorer-merge True", ("SCORER_MERGE", "False"): "--scorer-merge False",
         ("RS_DIM_MAJOR_STORE", "True"): "--gluon16-set RS_DIM_MAJOR_STORE=True",
         ("RS_BALANCED", "True"): "--gluon16-set RS_BALANCED=True",
         ("VARIANT", "ws8p2"): "--gluon16-set VARIANT=ws8p2"}


def pick(payload: dict, margin: float) -> str:
    settings = payload["settings"]
    key = lambda v: f"{payload['attr'].lower()}_" + (v.replace("=", "_").replace("+", "_").lower()  # noqa: E731
                                                     if "=" in v else v)
    rows = payload["rows"]
    base = settings[0]
    # the mean of each row's time relative to the baseline's (a sum of times would be the longest shape's alone)
    total = {v: sum(r[f"{key(v)}_us"] / r[f"{key(base)}_us"] for r in rows) / len(rows) for v in settings}
    best = base
    for v in settings[1:]:
        if not all(r[f"{key(v)}_ok"] for r in rows):
            continue
        no_worse = all(r[f"{key(v)}_us"] <= r[f"{key(base)}_us"] * (1 + margin / 100) for r in rows)
        if no_worse and total[v] < total[base] * (1 - margin / 100) and total[v] < total[best]:
            best = v
    return best


def flags(value: str) -> str:
    out = []
    for kv in value.split("+"):
        a, _, v = kv.partition("=")
        if (a, v) in FLAGS:
            out.append(FLAGS[(a, v)])
    return " ".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--margin", type=float, default=1.0, help="percent")
    ap.add_argument("--flags", action="store_true", help="print bench_decode.py flags instead of the value")
    args = ap.parse_args()
    with open(args.path) as f:
        value = pick(json.load(f), args.margin)
    print(flags(value) if args.flags else value)


if __name__ == "__main__":
    main()
