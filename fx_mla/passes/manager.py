"""The pass manager: runs fx_mla's passes in order on Inductor's post-grad ATen graph and records every decision.

Pass API (what a pass author writes)
------------------------------------
A pass is a module ``fx_mla/passes/<name>.py``, registered by name in :mod:`fx_mla.passes` (registry order is run
order), that defines::

    def run(graph: torch.fx.Graph, ctx: PassContext) -> None:
        for node in ...:                       # find candidate matches (helpers: fx_mla.passes.match)
            reason = guards.first_reason(...)  # each guard returns None or a reason string
            if reason:
                ctx.declined("my_pass", node, reason)
                continue
            ...                                # rewrite in place; give new nodes meta["val"] (else it is computed)
            ctx.matched("my_pass", [old, new], "what it did")

The graph is always Inductor's post-grad form (functionalized, decomposed with Inductor's table, Inductor's own
post-grad passes applied; inference only), whichever inner compiler runs next, with symbolic batch sizes and
lengths: never assume a static size you did not check. ``ctx`` carries the options, the target ``device`` and its
CUDA ``capability`` (from the example inputs' device, never from the rank or the data): a rewrite decision must
not depend on the rank or on tensor values. After each pass that fired, dead nodes are removed and the graph is
linted. Any object with ``run(graph, ctx)`` may be registered too (tests register tiny passes).

``ctx.matched`` logs at INFO and ``ctx.declined`` at DEBUG on ``logging.getLogger("fx_mla")``; both go into the
CompileReport. With ``strict=True`` the compile fails after all passes ran if any match was declined.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import pathlib
from typing import Any, Iterable, Optional, Sequence, Union

import torch
import torch.fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from . import load_pass
from ..report import CompileReport, Decline, GraphNamer, Match, PassReport, format_graph

log = logging.getLogger("fx_mla")

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent.parent


class StrictModeError(RuntimeError):
    """A pass declined a match while ``strict=True``; the message lists every reason."""


@dataclasses.dataclass
class PassContext:
    """What a pass sees besides the graph: options, target device, and the report recorder."""

    options: Any
    device: torch.device
    capability: Optional[tuple[int, int]]
    report: CompileReport
    namer: GraphNamer
    _records: list = dataclasses.field(default_factory=list, repr=False)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def _pass(self, pass_name: str) -> PassReport:
        for p in self.report.passes:
            if p.name == pass_name:
                return p
        p = PassReport(pass_name)
        self.report.passes.append(p)
        return p

    def matched(self, pass_name: str, nodes: Union[torch.fx.Node, Iterable[torch.fx.Node]], detail: str = "") -> None:
        """Record (and log at INFO) a rewrite that fired on ``nodes``."""
        nodes = [nodes] if isinstance(nodes, torch.fx.Node) else list(nodes)
        self._records.append(("match", self._pass(pass_name), nodes, detail))
        log.info("fx_mla: %s rewrote %s: %s", pass_name, ", ".join(self.namer.name(n) for n in nodes), detail)

    def declined(self, pass_name: str, node: torch.fx.Node, reason: str) -> None:
        """Record (and log at DEBUG) a match at ``node`` that was not rewritten, and why."""
        if not reason:
            raise ValueError(f"{pass_name}: ctx.declined needs a reason")
        self._records.append(("decline", self._pass(pass_name), [node], reason))
        log.debug("fx_mla: %s declined %s: %s", pass_name, self.namer.name(node), reason)

    def _finish(self) -> None:
        """Resolve recorded nodes to the canonical names of the printed graphs."""
        for kind, report, nodes, text in self._records:
            names = tuple(self.namer.name(n) for n in nodes)
            if kind == "match":
                report.matches.append(Match(report.name, names, text))
            else:
                report.declines.append(Decline(report.name, names[0], text))
        self._records.clear()


def _fill_missing_vals(graph: torch.fx.Graph) -> None:
    """Give nodes a pass created without ``meta['val']`` one, computed with the graph's fake mode."""
    missing = [n for n in graph.nodes if n.op == "call_function" and "val" not in n.meta]
    if not missing:
        return
    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes if n.op == "placeholder"])
    if fake_mode is None:
        return
    with fake_mode:
        for node in missing:
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
            node.meta["val"] = node.target(*args, **kwargs)


def _source_of(obj: Any) -> str:
    uuid = getattr(obj, "uuid", None)
    if callable(uuid):
        return str(uuid())
    if inspect.ismodule(obj):
        return inspect.getsource(obj)
    try:
        return inspect.getsource(type(obj))
    except (OSError, TypeError):
        return repr(type(obj))


def _package_sources() -> str:
    # Passes may share helpers anywhere in passes/ and match against ops' schemas: hash them all.
    digest = hashlib.sha256()
    for sub in ("passes", "ops"):
        for path in sorted((_PACKAGE_DIR / sub).rglob("*.py")):
            digest.update(str(path.relative_to(_PACKAGE_DIR)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


class PassManager(CustomGraphPass):
    """Runs the passes named in ``options.passes`` in order; installed as Inductor's post-grad custom pass.

    ``uuid()`` hashes the options that change the graph and the passes' sources, so Inductor's FX graph cache
    stays on. Each call appends one :class:`CompileReport` to ``self.reports``.
    """

    def __init__(self, options: Any, device: torch.device, capability: Optional[tuple[int, int]],
                 input_names: Optional[Sequence[Optional[str]]] = None):
        self.options = options
        self.device = device
        self.capability = capability
        self.input_names = list(input_names or ())
        self.pass_names = tuple(options.resolved_passes())
        self.passes = [(name, load_pass(name)) for name in self.pass_names]
        self.reports: list[CompileReport] = []

    def uuid(self) -> str:
        # Every option but where the report goes may steer a rewrite: all of them are in the key.
        opts = {f.name: repr(getattr(self.options, f.name)) for f in dataclasses.fields(self.options)
                if f.name != "report"}
        key = json.dumps({"options": opts, "passes": self.pass_names, "device": self.device.type,
                          "capability": self.capability}, sort_keys=True)
        digest = hashlib.sha256(key.encode())
        digest.update(_package_sources().encode())
        for _, p in self.passes:
            digest.update(_source_of(p).encode())
        return digest.hexdigest()

    def __call__(self, graph: torch.fx.Graph) -> None:
        report = CompileReport(options=dataclasses.replace(self.options, report=None), inner=self.options.inner,
                               device=str(self.device), capability=self.capability, compile_id=_compile_id())
        namer = GraphNamer(graph, self.input_names)
        report.graph_before = format_graph(graph, namer)
        ctx = PassContext(self.options, self.device, self.capability, report, namer)
        for name, p in self.passes:
            ctx._pass(name)
            before = len(ctx._records)
            try:
                p.run(graph, ctx)
            except Exception as e:
                if hasattr(e, "add_note"):
                    e.add_note(f"raised by fx_mla pass {name!r}")
                raise
            if any(r[0] == "match" for r in ctx._records[before:]):
                graph.eliminate_dead_code()
                _fill_missing_vals(graph)
                graph.lint()
        report.graph_after = format_graph(graph, namer)
        ctx._finish()
        self.reports.append(report)
        if self.options.strict and report.declines:
            reasons = "\n".join(f"  {d.pass_name} declined %{d.node}: {d.reason}" for d in report.declines)
            raise StrictModeError(f"fx_mla strict mode: {len(report.declines)} match(es) declined:\n{reasons}")


def _compile_id() -> Optional[str]:
    try:
        cid = torch._guards.CompileContext.current_compile_id()
    except Exception:  # noqa: BLE001 - outside dynamo there is no compile id
        return None
    return None if cid is None else str(cid)
