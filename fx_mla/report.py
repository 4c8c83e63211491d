"""CompileReport and the stable graph printer.

The printer renders a ``torch.fx.Graph`` one line per node::

    %q_nope: bf16[s0, 2, 16] = input
    %all_gather_into_tensor: bf16[2*s0, 2, 24] = _c10d_functional.all_gather_into_tensor.default(%cat, 2, '0')
    return (%view_15,)

Node names are canonical (placeholders take the name of the user-visible input when the backend knows it, other
nodes ``<op>``, ``<op>_1``, … in graph order), symbols are renumbered ``s0, s1, …`` in order of first appearance in
the inputs, dtypes are short (``bf16``, ``f8e4m3fn``), and nothing prints an address, a file path or a
torch-version-specific decoration, so the text is stable across runs and fit for snapshot tests.
"""
from __future__ import annotations

import dataclasses
import operator
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
import torch.fx

_SHORT_DTYPES = {
    torch.float64: "f64", torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16",
    torch.float8_e4m3fn: "f8e4m3fn", torch.float8_e5m2: "f8e5m2", torch.int64: "i64", torch.int32: "i32",
    torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "b8", torch.complex64: "c64",
}


def short_dtype(dtype: torch.dtype) -> str:
    return _SHORT_DTYPES.get(dtype, str(dtype).removeprefix("torch."))


def op_name(node: torch.fx.Node) -> str:
    """Display name of a node's operation: ``aten.mm.default``, ``getitem``, ``input``, ``output``."""
    if node.op == "placeholder":
        return "input"
    if node.op in ("output", "get_attr"):
        return node.op
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", type(target).__name__)
    if getattr(target, "__module__", None) in ("_operator", "operator") and name != "getitem":
        return f"operator.{name}"  # SymInt arithmetic, told apart from aten ops of the same name
    return name


def _base_name(node: torch.fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        base = target.overloadpacket.__name__
    elif target is operator.getitem:
        base = "getitem"
    elif isinstance(target, str):
        base = target.split(".")[-1]
    else:
        base = getattr(target, "__name__", "node")
    return re.sub(r"\W", "_", base).strip("_") or "node"


def clean_input_name(source_name: str) -> str:
    """``L['self']._parameters['w_uk']`` → ``self.w_uk``; ``L['q_nope']`` → ``q_nope``."""
    name = re.sub(r"^[LG]\['([^']+)'\]", r"\1", source_name)
    name = re.sub(r"\._(?:parameters|buffers|modules)\['([^']+)'\]", r".\1", name)
    name = re.sub(r"\['([^']+)'\]", r".\1", name)
    return name


class GraphNamer:
    """Canonical node names and symbol names, shared by the before and after printouts of one compile."""

    def __init__(self, graph: torch.fx.Graph, input_names: Optional[Sequence[Optional[str]]] = None):
        self.names: dict[torch.fx.Node, str] = {}
        self._used: set[str] = set()
        self._counts: dict[str, int] = {}
        self.symbols: dict[Any, Any] = {}
        import sympy

        self._sympy = sympy
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        for node in placeholders:
            for expr in _val_exprs(node.meta.get("val")):
                for sym in sorted(expr.free_symbols, key=str):
                    self._symbol(sym)
        names = list(input_names or ())
        for i, node in enumerate(placeholders):
            val = node.meta.get("val")
            if isinstance(val, torch.SymInt) and isinstance(_expr(val), sympy.Symbol):
                wanted = self.render_expr(val)
            elif i < len(names) and names[i]:
                wanted = names[i]
            else:
                wanted = f"arg{i}"
            self.names[node] = self._unique(wanted)
        self.update(graph)

    def _symbol(self, sym):
        if sym not in self.symbols:
            prefix = "u" if str(sym).startswith("u") else "s"
            index = sum(1 for v in self.symbols.values() if str(v).startswith(prefix))
            self.symbols[sym] = self._sympy.Symbol(f"{prefix}{index}", integer=True)
        return self.symbols[sym]

    def _unique(self, wanted: str) -> str:
        name, n = wanted, self._counts.get(wanted, 0)
        while name in self._used:
            n += 1
            name = f"{wanted}_{n}"
        self._counts[wanted] = n
        self._used.add(name)
        return name

    def update(self, graph: torch.fx.Graph) -> None:
        """Name nodes not seen before (new nodes a pass created), keeping existing names."""
        for node in graph.nodes:
            if node not in self.names and node.op != "output":
                self.names[node] = self._unique(_base_name(node))

    def name(self, node: torch.fx.Node) -> str:
        if node not in self.names and node.op != "output":
            self.names[node] = self._unique(_base_name(node))  # a node created since the last update
        return self.names.get(node, node.name)

    def render_expr(self, value) -> str:
        expr = _expr(value)
        for sym in sorted(getattr(expr, "free_symbols", ()), key=str):
            self._symbol(sym)
        return str(expr.xreplace(self.symbols)) if hasattr(expr, "xreplace") else str(expr)

    def render_type(self, val) -> str:
        if isinstance(val, torch.Tensor):
            dims = ", ".join(self.render_expr(d) for d in val.shape)
            return f"{short_dtype(val.dtype)}[{dims}]"
        if isinstance(val, torch.SymInt):
            return f"Sym({self.render_expr(val)})"
        if isinstance(val, (torch.SymFloat, torch.SymBool)):
            return f"Sym({self.render_expr(val)})"
        if isinstance(val, (list, tuple)):
            return "(" + ", ".join(self.render_type(v) for v in val) + ("," if len(val) == 1 else "") + ")"
        if val is None:
            return "?"
        return type(val).__name__

    def render_arg(self, arg) -> str:
        if isinstance(arg, torch.fx.Node):
            return "%" + self.name(arg)
        if isinstance(arg, (list, tuple)):
            inner = ", ".join(self.render_arg(a) for a in arg)
            return f"[{inner}]" if isinstance(arg, list) else f"({inner}{',' if len(arg) == 1 else ''})"
        if isinstance(arg, dict):
            return "{" + ", ".join(f"{k!r}: {self.render_arg(v)}" for k, v in arg.items()) + "}"
        if isinstance(arg, torch.dtype):
            return short_dtype(arg)
        if isinstance(arg, (torch.device, torch.layout, torch.memory_format)):
            return str(arg).removeprefix("torch.")
        if isinstance(arg, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return self.render_expr(arg)
        if isinstance(arg, torch._ops.OpOverload):
            return str(arg)
        if isinstance(arg, (str, int, float, bool)) or arg is None:
            return repr(arg)
        return type(arg).__name__

    def render_node(self, node: torch.fx.Node) -> str:
        if node.op == "output":
            return "return " + self.render_arg(node.args[0])
        head = f"%{self.name(node)}: {self.render_type(node.meta.get('val'))}"
        if node.op == "placeholder":
            return f"{head} = input"
        if node.op == "get_attr":
            return f"{head} = get_attr({node.target!r})"
        args = [self.render_arg(a) for a in node.args]
        args += [f"{k}={self.render_arg(v)}" for k, v in node.kwargs.items()]
        return f"{head} = {op_name(node)}({', '.join(args)})"


def _expr(value):
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return value.node.expr
    import sympy

    return sympy.sympify(value)


def _val_exprs(val) -> Iterable[Any]:
    if isinstance(val, torch.Tensor):
        return [_expr(d) for d in val.shape if isinstance(d, torch.SymInt)]
    if isinstance(val, torch.SymInt):
        return [_expr(val)]
    return []


def format_graph(graph: torch.fx.Graph, namer: Optional[GraphNamer] = None, indent: str = "") -> str:
    """Render ``graph`` with the stable printer (a fresh :class:`GraphNamer` unless one is given)."""
    namer = namer or GraphNamer(graph)
    namer.update(graph)
    return "\n".join(indent + namer.render_node(n) for n in graph.nodes)


# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Match:
    """A rewrite that fired: the pass, the nodes it matched (canonical names), what it did."""
    pass_name: str
    nodes: tuple[str, ...]
    detail: str


@dataclasses.dataclass(frozen=True)
class Decline:
    """A match a pass found but did not rewrite, and why."""
    pass_name: str
    node: str
    reason: str


@dataclasses.dataclass
class PassReport:
    name: str
    matches: list[Match] = dataclasses.field(default_factory=list)
    declines: list[Decline] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class CompileReport:
    """What fx_mla did to one captured graph.

    ``graph_before``/``graph_after`` are the stable printouts of the graph the passes saw (Inductor's post-grad
    ATen form) and of the graph they left. ``cache_hit`` is True when Inductor served the compiled graph from its
    cache, so no pass ran in this process and the graphs are empty.
    """
    options: Any
    inner: str
    device: str = "cpu"
    capability: Optional[tuple[int, int]] = None
    passes: list[PassReport] = dataclasses.field(default_factory=list)
    graph_before: str = ""
    graph_after: str = ""
    cache_hit: bool = False
    compile_id: Optional[str] = None

    @property
    def matches(self) -> list[Match]:
        return [m for p in self.passes for m in p.matches]

    @property
    def declines(self) -> list[Decline]:
        return [d for p in self.passes for d in p.declines]

    @property
    def changed(self) -> bool:
        return self.graph_before != self.graph_after

    def pass_report(self, name: str) -> PassReport:
        for p in self.passes:
            if p.name == name:
                return p
        raise KeyError(f"no pass named {name!r} ran; ran: {[p.name for p in self.passes]}")

    def format(self, graphs: bool = True) -> str:
        names = [p.name for p in self.passes]
        cap = "none" if self.capability is None else f"{self.capability[0]}.{self.capability[1]}"
        lines = ["fx_mla compile report",
                 f"inner compiler: {self.inner}; device: {self.device} (compute capability {cap})",
                 f"passes: {', '.join(names) if names else '(none)'}"]
        if self.cache_hit:
            lines.append("served from Inductor's cache: no pass ran in this process")
        for p in self.passes:
            lines.append(f"pass {p.name}: {len(p.matches)} rewritten, {len(p.declines)} declined")
            lines += [f"  rewrote {', '.join('%' + n for n in m.nodes)}: {m.detail}" for m in p.matches]
            lines += [f"  declined %{d.node}: {d.reason}" for d in p.declines]
        if graphs and not self.cache_hit:
            lines.append(f"graph before passes ({_count(self.graph_before)} nodes):")
            lines += ["  " + line for line in self.graph_before.splitlines()]
            if self.changed:
                lines.append(f"graph after passes ({_count(self.graph_after)} nodes):")
                lines += ["  " + line for line in self.graph_after.splitlines()]
            else:
                lines.append("graph after passes: unchanged")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _count(text: str) -> int:
    return sum(1 for line in text.splitlines() if not line.startswith("return"))


def count_ops(text: str) -> Mapping[str, int]:
    """Op name → occurrences in a printed graph (for tests that count ops before/after a rewrite)."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"%\S+: .*? = ([\w.]+)\(", line)
        if m:
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts
