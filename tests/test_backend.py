"""The fx_mla backend: options, entry point, inner compilers, pass manager, Inductor cache, dynamic batch sizes."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fx_mla
import fx_mla.passes as fx_passes
from fx_mla.backend import FxMlaOptions, fx_mla_backend
from fx_mla.passes import guards, match
from fx_mla.passes.manager import PassContext, PassManager, StrictModeError

from .backend_helpers import (DeclineMul, MulByTwoToAdd, RecordContext, decode_step, fx_mla_logs, registered,
                              rel_err, small_config)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # each test compiles from scratch; keeps MLADecode.forward under the recompile limit
    yield


def _tiny(x, y):
    return (x * y + 1).sum(dim=-1) * 2


# Options -------------------------------------------------------------------------------------------------------
def test_options_dict_and_dataclass_agree():
    opts = FxMlaOptions.coerce({"passes": ["quant_before_gather"], "inner": "eager", "strict": True})
    assert opts == fx_mla.options(passes=("quant_before_gather",), inner="eager", strict=True)
    assert opts.passes == ("quant_before_gather",)
    assert FxMlaOptions.coerce(None) == FxMlaOptions()
    assert FxMlaOptions().inner == "inductor" and FxMlaOptions().strict is False


@pytest.mark.parametrize("value, error, words", [
    ({"pases": []}, ValueError, "unknown fx_mla option(s) 'pases'"),
    ({"strict": "yes"}, TypeError, "'strict' must be a bool"),
    ({"inner": "tvm"}, ValueError, "'inner' must be one of"),
    ({"passes": "quant_before_gather"}, TypeError, "'passes' must be a list or tuple"),
    ({"passes": ["no_such_pass"]}, ValueError, "unknown pass 'no_such_pass'"),
    ({"passes": ["cache_gather", "cache_gather"]}, ValueError, "names a pass twice"),
    ({"report": 3}, TypeError, "'report' must be None, a list or a callable"),
    ({"inductor_config": {"no_such_knob": 1}}, ValueError, "'no_such_knob' is not an Inductor config name"),
    (["inner", "eager"], TypeError, "must be a dict or fx_mla.FxMlaOptions"),
])
def test_bad_options_are_clear_errors(value, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        FxMlaOptions.coerce(value)


def test_bad_option_through_torch_compile_names_the_option():
    compiled = torch.compile(_tiny, backend="fx_mla", options={"bogus": 1})
    with pytest.raises(Exception, match="unknown fx_mla option.*'bogus'"):
        compiled(torch.randn(3, 5), torch.randn(3, 5))


def test_registered_pass_without_module_is_not_a_default_and_is_a_clear_error():
    fx_passes.register_pass("not_written_yet", "fx_mla.passes.not_written_yet")
    try:
        assert "not_written_yet" not in FxMlaOptions().resolved_passes()
        with pytest.raises(ValueError, match="'not_written_yet' is registered but its module"):
            fx_passes.load_pass("not_written_yet")
    finally:
        fx_passes.unregister_pass("not_written_yet")


def test_registry_order_and_before():
    with registered(DeclineMul()):
        assert fx_passes.registered_passes()[-1] == "test_decline_mul"
        assert "test_decline_mul" in FxMlaOptions().resolved_passes()
    fx_passes.register_pass("first_test_pass", DeclineMul(), before="quant_before_gather")
    try:
        assert fx_passes.registered_passes()[0] == "first_test_pass"
    finally:
        fx_passes.unregister_pass("first_test_pass")
    with pytest.raises(ValueError, match="already registered"):
        fx_passes.register_pass("cache_gather", DeclineMul())


# Inner compilers on the model ------------------------------------------------------------------------------------
@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_no_passes_compiled_equals_eager(inner):
    cfg = small_config()
    module, args = decode_step(cfg, [13, 1, 30])
    reports = []
    compiled = torch.compile(module, backend="fx_mla", fullgraph=True,
                             options={"passes": [], "inner": inner, "report": reports})
    with torch.no_grad():
        ref = module(*args)
        out = torch.full_like(ref, float("nan"))
        out.copy_(compiled(*args))
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert not out.isnan().any()
    # Same math; Inductor may fuse and reorder fp32 sums before the bf16 rounding.
    assert rel_err(out, ref) < (1e-6 if inner == "eager" else 1e-2)
    assert len(reports) == 1 and reports[0].passes == []


def _lens_for(batch: int, avoid: set, seed: int) -> list:
    """Sequence lengths whose batch / block-table width / block count are distinct and not in ``avoid``."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(1000):
        lens = torch.randint(1, 61, (batch,), generator=g).tolist()
        blocks = [-(-s // 4) for s in lens]
        sizes = {batch, max(blocks), sum(blocks) + 1}
        if len(sizes) == 3 and not sizes & avoid:
            return lens
    raise AssertionError(f"no lengths for batch {batch} avoid {sorted(avoid)}")


@pytest.mark.parametrize("passes", [(), None], ids=["no_passes", "default_passes"])
def test_eight_batch_sizes_compile_at_most_twice(passes):
    cfg = small_config()
    static_dims = {2, 4, 8, 16, 32, 40}
    reports = []
    compiled = None
    first_sizes: set = set()
    for i, batch in enumerate([3, 5, 6, 7, 9, 10, 11, 12]):
        # The first two captures decide which sizes are symbolic: keep them apart (later steps may collide).
        lens = _lens_for(batch, static_dims | first_sizes, seed=batch) if i < 2 else _lens_for(batch, set(), batch)
        if i == 0:
            first_sizes = {batch, max(-(-s // 4) for s in lens), sum(-(-s // 4) for s in lens) + 1}
        module, args = decode_step(cfg, lens, seed=0)
        if compiled is None:
            compiled = torch.compile(module, backend="fx_mla",
                                     options={"passes": passes, "inner": "eager", "report": reports})
        else:
            compiled._orig_mod.load_state_dict(module.state_dict())
        with torch.no_grad():
            out = compiled(*args)
            # Without passes the same ATen math runs; default passes swap in fused ops (other roundings).
            assert rel_err(out, module(*args)) < (1e-6 if passes == () else 2e-2)
        # 1st call: static graph; 2nd: the dynamic one (automatic dynamic shapes); then no recompile.
        assert len(reports) == min(i + 1, 2), f"batch {batch} recompiled"
    assert "s0" in reports[1].graph_before and "s0" not in reports[0].graph_before


# Pass manager -----------------------------------------------------------------------------------------------------
def test_rewrite_fires_is_reported_logged_and_exact():
    x, y = torch.randn(3, 5), torch.randn(3, 5)
    with registered(MulByTwoToAdd()), fx_mla_logs(logging.INFO) as logs:
        reports = []
        compiled = torch.compile(_tiny, backend="fx_mla",
                                 options={"passes": ["test_mul_by_two"], "inner": "eager", "report": reports})
        out = compiled(x, y)
    assert torch.equal(out, _tiny(x, y))
    (report,) = reports
    (m,) = report.matches
    assert m.pass_name == "test_mul_by_two" and m.nodes == ("mul_1", "add_1")
    assert "aten.add.Tensor(%sum, %sum)" in report.graph_after and report.changed
    assert any("test_mul_by_two rewrote mul_1, add_1" in r.getMessage() and r.levelno == logging.INFO
               for r in logs)


def test_decline_logged_at_debug_and_strict_mode_raises_listing_reasons():
    x, y = torch.randn(3, 5), torch.randn(3, 5)
    with registered(DeclineMul()):
        with fx_mla_logs(logging.DEBUG) as logs:
            fx_mla.inspect(_tiny, x, y, options={"passes": ["test_decline_mul"], "inner": "eager"})
        assert any("test_decline_mul declined mul" in r.getMessage() and r.levelno == logging.DEBUG for r in logs)
        with pytest.raises(StrictModeError, match=r"2 match\(es\) declined:\n  test_decline_mul declined %mul: "
                                                  r"test pass: declines every aten.mul"):
            fx_mla.inspect(_tiny, x, y, options={"passes": ["test_decline_mul"], "inner": "eager", "strict": True})
        torch._dynamo.reset()
        compiled = torch.compile(_tiny, backend="fx_mla",
                                 options={"passes": ["test_decline_mul"], "inner": "eager", "strict": True})
        with pytest.raises(Exception, match="fx_mla strict mode: 2 match"):
            compiled(x, y)


def test_context_carries_device_capability_and_options():
    recorder = RecordContext()
    with registered(recorder):
        fx_mla.inspect(_tiny, torch.randn(3, 5), torch.randn(3, 5),
                       options={"passes": ["test_record_ctx"], "inner": "eager"})
    ((device, capability, opts),) = recorder.seen
    assert device == torch.device("cpu") and capability is None and opts.passes == ("test_record_ctx",)


def test_report_goes_to_a_callable_and_options_may_be_the_dataclass():
    got = []
    opts = fx_mla.options(passes=[], inner="eager", report=got.append)
    compiled = torch.compile(_tiny, backend="fx_mla", options=opts)
    compiled(torch.randn(3, 5), torch.randn(3, 5))
    assert len(got) == 1 and isinstance(got[0], fx_mla.CompileReport) and "aten.sum.dim_IntList" in got[0].graph_before


def test_uuid_hashes_options_and_sources_and_is_stable():
    cpu = torch.device("cpu")
    with registered(DeclineMul(), MulByTwoToAdd()):
        def uuid(**kw):
            return PassManager(FxMlaOptions(**kw), cpu, None).uuid()
        base = uuid(passes=("test_decline_mul",))
        assert base == uuid(passes=("test_decline_mul",), report=[])  # where the report goes is not in the key
        assert base != uuid(passes=("test_decline_mul",), strict=True)
        assert base != uuid(passes=("test_mul_by_two",))
        assert base != uuid(passes=("test_mul_by_two", "test_decline_mul"))
        assert base != PassManager(FxMlaOptions(passes=("test_decline_mul",)), torch.device("cuda"), (9, 0)).uuid()


def test_guards_decline_fp8_on_cpu_and_check_dtypes():
    report = fx_mla.CompileReport(options=FxMlaOptions(), inner="eager")
    ctx = PassContext(FxMlaOptions(), torch.device("cpu"), None, report, namer=None)
    assert "needs a CUDA device" in guards.require_capability(ctx)
    ctx.device, ctx.capability = torch.device("cuda"), (8, 0)
    assert "compute capability >= 8.9, the device has 8.0" in guards.require_capability(ctx)
    ctx.capability = (9, 0)
    assert guards.require_capability(ctx) is None
    assert guards.first_reason(None, "b", "c") == "b"


def test_all_gather_chain_helper_on_a_traced_graph():
    def gather_heads(x):
        import torch.distributed._functional_collectives as fc
        return fc.all_gather_tensor(x, 1, [0, 1]) * 2

    from .backend_helpers import fake_dcp_group

    found = []

    class FindGathers:
        name = "test_find_gathers"

        def run(self, graph, ctx):
            for chain in match.all_gather_chains(graph):
                found.append((chain.dim, chain.group_size, [match.node_shape(chain.result)]))
                ctx.matched(self.name, chain.nodes, f"all-gather on dim {chain.dim}")

    with fake_dcp_group(2), registered(FindGathers()):
        report = fx_mla.inspect(gather_heads, torch.randn(3, 4, 6),
                                options={"passes": ["test_find_gathers"], "inner": "eager"})
    ((dim, size, _),) = found
    assert (dim, size) == (1, 2)
    assert report.matches[0].nodes[:2] == ("all_gather_into_tensor", "wait_tensor")


# Entry point and Inductor's FX graph cache, in fresh processes ----------------------------------------------------
_FRESH = textwrap.dedent("""
    import json, sys, torch
    from torch._dynamo.utils import counters
    import_first = sys.argv[1] == "import_first"
    def uuid():
        from fx_mla.backend import FxMlaOptions
        from fx_mla.passes.manager import PassManager
        return PassManager(FxMlaOptions(), torch.device("cpu"), None).uuid()
    if import_first:
        import fx_mla
    imported_before = "fx_mla" in sys.modules
    uuid_before = uuid() if import_first else None
    def f(x, y):
        return (x * 2 + y).relu().sum(-1)
    reports = []
    g = torch.compile(f, backend="fx_mla", options={"report": reports})
    with torch.no_grad():
        g(torch.randn(4, 8), torch.randn(4, 8))
    out = {"imported_before": imported_before, "inductor": dict(counters["inductor"]),
           "cache_hit": [r.cache_hit for r in reports], "uuids": sorted({uuid_before or uuid(), uuid()})}
    print("RESULT " + json.dumps(out))
""")


def _fresh(arg: str, cache_dir: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir, "TORCHINDUCTOR_COMPILE_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-c", _FRESH, arg], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_entry_point_in_fresh_process_and_fx_graph_cache_hit(tmp_path):
    uuid_at_start = PassManager(FxMlaOptions(), torch.device("cpu"), None).uuid()
    first = _fresh("no_import", str(tmp_path))
    assert first["imported_before"] is False  # backend="fx_mla" resolved through the entry point
    assert first["inductor"].get("fxgraph_cache_miss", 0) >= 1 and first["cache_hit"] == [False]
    second = _fresh("import_first", str(tmp_path))  # fx_mla imported first: no duplicate registration
    assert second["imported_before"] is True
    if len({uuid_at_start, *first["uuids"], *second["uuids"]}) > 1:  # fx_mla/passes or fx_mla/ops edited during the test
        pytest.skip("fx_mla's pass/op sources changed between the two compiles: a cache miss is the right answer")
    counters = second["inductor"]
    assert counters.get("fxgraph_cache_hit", 0) >= 1 and counters.get("fxgraph_cache_bypass", 0) == 0, (first, second)
    assert second["cache_hit"] == [True], (first, second)  # the report says the passes did not run in this process


def test_backend_function_is_importable_and_callable_directly():
    assert fx_mla.fx_mla_backend is fx_mla_backend
    compiled = torch.compile(_tiny, backend=fx_mla_backend)
    x, y = torch.randn(3, 5), torch.randn(3, 5)
    torch.testing.assert_close(compiled(x, y), _tiny(x, y))


def test_inductor_config_option_compiles():
    """Inductor overrides go through while the pass manager is installed (validation must not copy the config)."""
    reports = []
    compiled = torch.compile(lambda x: (x * 2).sin(), backend="fx_mla",
                             options={"inductor_config": {"max_autotune": False}, "report": reports})
    x = torch.randn(8)
    assert torch.allclose(compiled(x), (x * 2).sin())
    assert len(reports) == 1
