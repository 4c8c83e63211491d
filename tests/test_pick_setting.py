"""benchmarks/pick_setting.py: the winner of an A/B for a follow-up command of the same GPU recipe."""
from benchmarks.pick_setting import flags, pick


def _payload(times, ok=None):
    """dev_lane_rows.py's JSON shape: settings and per-row `<attr>_<setting>_us` / `_ok` keys."""
    settings = list(times)
    keys = {v: "lanes_" + v.replace("=", "_").replace("+", "_").lower() for v in settings}
    rows = []
    for i in range(len(next(iter(times.values())))):
        row = {}
        for v in settings:
            row[f"{keys[v]}_us"] = times[v][i]
            row[f"{keys[v]}_ok"] = (ok or {}).get(v, True)
        rows.append(row)
    return dict(attr="LANES", settings=settings, rows=rows)


def test_the_fastest_setting_that_is_ok_and_no_slower_anywhere_wins():
    base, trig, both = "SCORER_PDL=False", "SCORER_PDL=early", "SCORER_PDL=early+SCORER_MERGE=True"
    assert pick(_payload({base: [50.0, 86.0], trig: [48.0, 85.0], both: [47.0, 84.9]}), 1.0) == both
    # the fastest sum, but slower than the baseline on one row by more than the margin: not taken
    assert pick(_payload({base: [50.0, 86.0], trig: [48.0, 85.0], both: [40.0, 88.0]}), 1.0) == trig
    # a wrong output never wins
    assert pick(_payload({base: [50.0, 86.0], both: [40.0, 80.0]}, ok={both: False}), 1.0) == base
    # within the margin: the baseline stays
    assert pick(_payload({base: [50.0, 86.0], trig: [49.8, 85.9]}), 1.0) == base
    # rows weigh by their relative time, not their length: 4 % faster on the short row, 0.5 % slower on the long one
    # wins (a sum of times would keep the baseline: 48 + 301.5 > 50 + 300)
    assert pick(_payload({base: [50.0, 300.0], trig: [48.0, 301.5]}), 1.0) == trig
    assert flags(both) == "--scorer-pdl early --scorer-merge True" and flags(base) == ""
    assert flags("SCORER_MERGE=True") == "--scorer-merge True" and flags("SCORER_MERGE=False") == "--scorer-merge False"
    # the 16-head launcher's settings go to bench_decode.py's --gluon16-set
    assert flags("VARIANT=rs+RS_DIM_MAJOR_STORE=True") == "--gluon16-set RS_DIM_MAJOR_STORE=True"
    assert flags("VARIANT=ws8p2") == "--gluon16-set VARIANT=ws8p2" and flags("VARIANT=rs") == ""
    assert flags("VARIANT=rs+RS_BALANCED=True+RS_DIM_MAJOR_STORE=True") == \
        "--gluon16-set RS_BALANCED=True --gluon16-set RS_DIM_MAJOR_STORE=True"
