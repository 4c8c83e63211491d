"""benchmarks/pick_gather_config.py: which swept gather config replaces the default (gpu_suite.sh s41)."""
import importlib.util
import os

_P = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "pick_gather_config.py")
_spec = importlib.util.spec_from_file_location("pick_gather_config", _P)
pgc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pgc)

DEFAULT = [8, 4, 0, "per"]  # the Triton defaults of both layouts ("r": fp8_ds_mla only)


def _rows(cfg, e64, d64, e1m=95.0, d1m=94.0, bitwise=True, reason=None):
    return [dict(config=list(cfg), layout=lay, tokens=n, pct_of_copy=pct, bitwise_vs_op=bitwise, async_reason=reason)
            for lay, n, pct in (("plain", 65536, e64), ("fp8_ds_mla", 65536, d64), ("plain", 1 << 20, e1m),
                                ("fp8_ds_mla", 1 << 20, d1m))]


def test_picks_the_config_that_beats_the_default_on_both_layouts():
    rows = _rows(DEFAULT, 90.0, 89.5) + _rows([32, 4, 2, "ape", 3], 91.0, 90.2) + _rows([32, 4, 1, "ap", 6], 92.0, 90.6)
    assert pgc.pick(rows, DEFAULT)[1] == (32, 4, 1, "ap", 6)


def test_none_when_one_layout_is_slower_or_bits_differ():
    rows = _rows(DEFAULT, 90.0, 89.5) + _rows([32, 4, 2, "ape", 3], 93.0, 89.4)
    assert pgc.pick(rows, DEFAULT) is None
    rows = _rows(DEFAULT, 90.0, 89.5) + _rows([32, 4, 2, "ape", 3], 93.0, 92.0, bitwise=False)
    assert pgc.pick(rows, DEFAULT) is None
    assert pgc.pick(_rows([32, 4, 2, "ape", 3], 93.0, 92.0), DEFAULT) is None  # no default row: nothing to beat


def test_none_within_the_margin_or_when_the_fallback_ran():
    rows = _rows(DEFAULT, 90.0, 89.5) + _rows([32, 4, 2, "ape", 3], 90.2, 89.7)
    assert pgc.pick(rows, DEFAULT) is None                      # +0.2: noise, not a win
    assert pgc.pick(rows, DEFAULT, margin=0.1)[1] == (32, 4, 2, "ape", 3)
    rows = _rows(DEFAULT, 90.0, 89.5) + _rows([32, 4, 2, "ape", 3], 93.0, 92.0, reason="not a CUDA tensor")
    assert pgc.pick(rows, DEFAULT) is None                      # the Triton fallback ran under an async label
