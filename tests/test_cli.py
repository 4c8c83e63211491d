"""`python -m fx_mla`: help, demo dispatch, explain."""
from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest

import fx_mla
from fx_mla.__main__ import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_help_names_the_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "explain" in out


def test_explain_help_says_what_it_takes(capsys):
    with pytest.raises(SystemExit) as e:
        main(["explain", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--passes", "--inner", "--kv-cache-dtype", "--heads", "--dcp", "--batch", "--strict"):
        assert flag in out


def test_unknown_command_and_unknown_pass_are_clear_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["explian"])
    assert e.value.code == 2 and "invalid choice: 'explian'" in capsys.readouterr().err
    assert main(["explain", "--passes", "nope"]) == 2
    assert "unknown pass 'nope'" in capsys.readouterr().err


def test_demo_is_dispatched_to_fx_mla_demo_main(monkeypatch):
    seen = []
    fake = types.ModuleType("fx_mla.demo")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "fx_mla.demo", fake)
    monkeypatch.setattr(fx_mla, "demo", fake, raising=False)
    assert main(["demo", "--backends", "fx_mla"]) == 0
    assert seen == [["--backends", "fx_mla"]]


def test_explain_prints_the_dcp2_decode_report():
    env = {**os.environ, "PYTHONPATH": REPO, "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "fx_mla", "explain", "--inner", "eager", "--batch", "3"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("# decode step: 16 heads, DCP 2 (rank 0 of 2), kv cache fp8, query static fp8")
    assert "fx_mla compile report" in out and "graph before passes" in out
    assert "%q_nope: bf16[s0, 8, 128] = input" in out  # 8 local heads, symbolic batch
    assert "%kv_cache: f8e4m3fn[s1, 16, 576] = input" in out
    assert "_c10d_functional.all_gather_into_tensor.default" in out
