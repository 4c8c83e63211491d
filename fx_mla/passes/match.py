"""Shared matching helpers for fx_mla's passes (post-grad ATen graphs with symbolic sizes).

Node facts come from ``node.meta["val"]`` (a FakeTensor, SymInt, or a tuple of them); sizes may be SymInts, so
compare them with :func:`same_size` or guard on them explicitly, never with ``int(...)``.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, Iterable, Optional, Sequence, Union

import torch
import torch.fx

aten = torch.ops.aten
c10d = torch.ops._c10d_functional
CONVERT = torch.ops.prims.convert_element_type.default

Target = Union[torch._ops.OpOverload, torch._ops.OpOverloadPacket, Any]


# Node facts ---------------------------------------------------------------------------------------------------
def is_op(node: Any, *targets: Target) -> bool:
    """``node`` is a call of one of ``targets`` (an OpOverload, or a packet matching all its overloads)."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    for t in targets:
        if node.target is t:
            return True
        if isinstance(t, torch._ops.OpOverloadPacket) and getattr(node.target, "overloadpacket", None) is t:
            return True
    return False


def find_ops(graph: torch.fx.Graph, *targets: Target) -> list[torch.fx.Node]:
    """All calls of ``targets`` in graph order."""
    return [n for n in graph.nodes if is_op(n, *targets)]


def users(node: torch.fx.Node) -> list[torch.fx.Node]:
    return list(node.users)


def only_user(node: torch.fx.Node) -> Optional[torch.fx.Node]:
    """The single user of ``node``, or None when it has zero or several."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def tensor_val(node: Any) -> Optional[torch.Tensor]:
    v = val(node)
    return v if isinstance(v, torch.Tensor) else None


def node_dtype(node: Any) -> Optional[torch.dtype]:
    t = tensor_val(node)
    return None if t is None else t.dtype


def node_shape(node: Any) -> Optional[tuple]:
    """The shape of a tensor-valued node; entries are ints or SymInts."""
    t = tensor_val(node)
    return None if t is None else tuple(t.shape)


def node_device(node: Any) -> Optional[torch.device]:
    t = tensor_val(node)
    return None if t is None else t.device


def static_int(size: Any) -> Optional[int]:
    """``size`` as an int when it is static (an int, or a SymInt with a constant value), else None."""
    if isinstance(size, int):
        return size
    if isinstance(size, torch.SymInt):
        expr = size.node.expr
        return int(expr) if getattr(expr, "is_number", False) else None
    return None


def same_size(a: Any, b: Any) -> bool:
    """``a == b`` for ints or SymInts, decided symbolically (no guard is added)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    ea = a.node.expr if isinstance(a, torch.SymInt) else a
    eb = b.node.expr if isinstance(b, torch.SymInt) else b
    try:
        import sympy

        return bool(sympy.simplify(sympy.sympify(ea) - sympy.sympify(eb)) == 0)
    except (TypeError, ValueError):
        return False


def same_shape(a: Optional[Sequence], b: Optional[Sequence]) -> bool:
    """Two shapes (None: unknown) have the same rank and sizes, decided with :func:`same_size`."""
    return a is not None and b is not None and len(a) == len(b) and all(map(same_size, a, b))


def follow(node: torch.fx.Node, *targets: Target) -> Optional[list[torch.fx.Node]]:
    """Walk ``targets`` in order through single users, starting at ``node``'s only user.

    ``follow(div, convert, clamp_min, clamp_max)`` returns ``[convert, clamp_min, clamp_max]`` when each is the
    only user of the one before, else None.
    """
    chain, cur = [], node
    for t in targets:
        nxt = only_user(cur)
        if nxt is None or not is_op(nxt, t):
            return None
        chain.append(nxt)
        cur = nxt
    return chain


def arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` of a call, whether passed positionally or as keyword ``name``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


# Collective chains --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AllGatherChain:
    """A functional all-gather and the ops that move the gathered dimension.

    Gathering on dim 0 is ``all_gather_into_tensor(x, N, group) → wait_tensor``; on dim d > 0, torch adds
    ``→ split(·, B) → getitem × N → cat(dim d)``. ``result`` is the node holding the gathered tensor (the cat,
    or the wait) and ``dim`` the dimension gathered along.
    """

    gather: torch.fx.Node
    wait: torch.fx.Node
    source: torch.fx.Node
    group_size: int
    group_name: Any
    dim: int
    split: Optional[torch.fx.Node] = None
    getitems: tuple[torch.fx.Node, ...] = ()
    cat: Optional[torch.fx.Node] = None

    @property
    def result(self) -> torch.fx.Node:
        return self.cat if self.cat is not None else self.wait

    @property
    def nodes(self) -> tuple[torch.fx.Node, ...]:
        rest = (self.split, *self.getitems, self.cat) if self.cat is not None else ()
        return (self.gather, self.wait, *rest)


def match_all_gather(gather: torch.fx.Node) -> Optional[AllGatherChain]:
    """The chain starting at an ``all_gather_into_tensor`` node, or None if its wait is not its only user."""
    if not is_op(gather, c10d.all_gather_into_tensor):
        return None
    wait = only_user(gather)
    if wait is None or not is_op(wait, c10d.wait_tensor):
        return None
    source, group_size, group_name = gather.args[0], gather.args[1], gather.args[2]
    base = AllGatherChain(gather, wait, source, group_size, group_name, dim=0)
    split = only_user(wait)
    if split is None or not is_op(split, aten.split.Tensor) or arg(split, 2, "dim", 0) != 0:
        return base
    getitems = list(split.users)
    if len(getitems) != group_size or not all(g.target is operator.getitem for g in getitems):
        return base
    getitems.sort(key=lambda g: g.args[1])
    if [g.args[1] for g in getitems] != list(range(group_size)):
        return base
    cat = only_user(getitems[0])
    if cat is None or not is_op(cat, aten.cat.default) or list(cat.args[0]) != getitems:
        return base
    if any(only_user(g) is not cat for g in getitems):
        return base
    ndim = len(node_shape(cat) or ())
    dim = arg(cat, 1, "dim", 0)
    dim = dim + ndim if dim < 0 else dim
    return dataclasses.replace(base, dim=dim, split=split, getitems=tuple(getitems), cat=cat)


def all_gather_chains(graph: torch.fx.Graph) -> list[AllGatherChain]:
    """Every all-gather chain in the graph, in graph order."""
    chains = (match_all_gather(n) for n in find_ops(graph, c10d.all_gather_into_tensor))
    return [c for c in chains if c is not None]


def replace_uses(old: torch.fx.Node, new: torch.fx.Node, keep: Iterable[torch.fx.Node] = ()) -> None:
    """Point every user of ``old`` except those in ``keep`` at ``new``."""
    keep = set(keep)
    old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in keep)


def names(nodes: Sequence[torch.fx.Node]) -> list[str]:
    return [n.name for n in nodes]


# Graph surgery ------------------------------------------------------------------------------------------------
def downstream(node: torch.fx.Node) -> set:
    """Every node computed from ``node``, itself included."""
    seen, stack = {node}, [node]
    while stack:
        for u in stack.pop().users:
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


def hoist_before(node: Any, anchor: torch.fx.Node) -> None:
    """Move ``node`` and those of its ancestors that sit after ``anchor`` to just before it (in order); none of
    them may depend on ``anchor``. Non-nodes are ignored."""
    if not isinstance(node, torch.fx.Node):
        return
    order = {n: i for i, n in enumerate(anchor.graph.nodes)}
    todo, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in todo and order[n] > order[anchor]:
            todo.add(n)
            stack.extend(n.all_input_nodes)
    for n in sorted(todo, key=order.__getitem__):
        anchor.prepend(n)


def set_val(node: torch.fx.Node) -> torch.fx.Node:
    """Compute ``meta['val']`` of a new ``node`` with the fake mode of its graph; returns ``node``. Without a fake
    mode (a graph with no fake inputs) it is left unset, for the pass manager to fill in or skip."""
    from torch._guards import detect_fake_mode

    vals = [n.meta.get("val") for n in node.graph.nodes if n.op == "placeholder"]
    fake_mode = detect_fake_mode(vals + [a.meta.get("val") for a in node.all_input_nodes])
    if fake_mode is not None:
        with fake_mode:
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
            node.meta["val"] = node.target(*args, **kwargs)
    return node


def set_vals(graph: torch.fx.Graph, nodes: Iterable[torch.fx.Node]) -> None:
    """(Re)compute ``meta['val']`` of new or retyped ``nodes``, in graph order, with the graph's fake mode."""
    from torch._guards import detect_fake_mode

    todo = set(nodes)
    mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes if n.op == "placeholder"])
    with mode if mode is not None else torch._subclasses.FakeTensorMode():
        for n in graph.nodes:
            if n in todo:
                args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), lambda a: a.meta["val"])
                n.meta["val"] = n.target(*args, **kwargs)


def erase_unused(graph: torch.fx.Graph, nodes: Iterable[torch.fx.Node]) -> None:
    """Erase those of ``nodes`` that end up without users (users first)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted(nodes, key=order.__getitem__, reverse=True):
        if not n.users:
            graph.erase_node(n)


__all__ = ["is_op", "find_ops", "users", "only_user", "val", "tensor_val", "node_dtype", "node_shape",
           "node_device", "static_int", "same_size", "same_shape", "follow", "arg", "AllGatherChain",
           "match_all_gather", "all_gather_chains", "replace_uses", "names", "downstream", "hoist_before", "set_val",
           "set_vals", "erase_unused", "CONVERT"]
