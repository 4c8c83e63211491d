"""Matching helpers of the ``quant_before_gather`` pass (:mod:`fx_mla.passes.quant_before_gather`): the all-gather
chain, the FP8 cast after it, the quantization between them (its data path, converts, clamps and single scaling),
the scale's dependence on the gathered data, and the dequantization before a gather (the mirror rewrite). Each
raises :class:`Decline` with the reason to report, or returns None when there is nothing to rewrite.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Optional

import torch
import torch.fx
from torch.fx import Node

from fx_mla.ops._fp8 import FP8_DTYPES, FP8_MAX, INPUT_DTYPES

from ..report import short_dtype
from .match import CONVERT, AllGatherChain, is_op as _is, match_all_gather, node_dtype, node_shape, same_shape

aten = torch.ops.aten
CLAMPS = (aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default)
SCALINGS = (aten.div.Tensor, aten.mul.Tensor)
REDUCTIONS = (aten.amax.default, aten.max.default)
CONSTANTS = (aten.full.default, aten.scalar_tensor.default)
MOVES = (aten.split.Tensor, aten.cat.default)
ANY_FP8 = FP8_DTYPES + (torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)
SEARCH_LIMIT = 64  # nodes visited looking for an FP8 cast downstream of a gather


class Decline(Exception):
    """A candidate left as it is; the message is the reason in the report (nodes as %fx_name)."""

# ---------------------------------------------------------------------------------------------------- helpers
def _chain(ag: Node) -> Optional[AllGatherChain]:
    """match_all_gather, plus the group-of-one form on dim d > 0: Inductor drops the one-input cat, leaving
    ``split → getitem(0)``, which then stands in for the cat."""
    chain = match_all_gather(ag)
    if chain is None or chain.cat is not None or chain.group_size != 1 or len(chain.wait.users) != 1:
        return chain
    split = next(iter(chain.wait.users))
    gets = list(split.users)
    if _is(split, aten.split.Tensor) and len(gets) == 1 and gets[0].target is operator.getitem \
            and gets[0].args[1] == 0 and len(split.meta.get("val", ())) == 1:
        return dataclasses.replace(chain, split=split, getitems=(gets[0],), cat=gets[0])
    return chain


def _pointwise(node) -> bool:
    return (isinstance(node, Node) and node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and torch.Tag.pointwise in node.target.tags)


def _op(node: Node) -> str:
    return str(node.target) if node.op == "call_function" else node.op


def _one_element(node) -> bool:
    shape = node_shape(node)
    return shape is not None and all(isinstance(s, int) and s == 1 for s in shape)


def _exact_in(d0: torch.dtype, t: torch.dtype) -> bool:
    """Every ``d0`` value is exactly representable in ``t``."""
    return t == d0 or t == torch.float64 or (t == torch.float32 and d0 in (torch.bfloat16, torch.float16))


def _check_group(chain: AllGatherChain) -> None:
    if type(chain.group_size) is not int or not isinstance(chain.group_name, str):
        raise Decline(f"group size {chain.group_size!r} / group {chain.group_name!r} is not static")


def _replicated(node) -> bool:
    """Same value on every rank: a Python number, a floating 1-element graph input/buffer/constant, or a pointwise
    function of those (graph inputs are assumed replicated: the graph cannot tell)."""
    if not isinstance(node, Node):
        return True
    if node.op in ("placeholder", "get_attr"):
        return _one_element(node) and bool(node_dtype(node) and node_dtype(node).is_floating_point)
    return _is(node, *CONSTANTS) or (_pointwise(node) and _one_element(node)
                                     and all(_replicated(i) for i in node.all_input_nodes))


def _find_fp8_cast(start: Node) -> Optional[Node]:
    """The first cast to an FP8 dtype reached from ``start`` through pointwise ops, amax/max and split/cat."""
    seen, frontier, found = {start}, [start], []
    while frontier and len(seen) < SEARCH_LIMIT:
        nxt = []
        for u in (u for n in frontier for u in n.users):
            if u not in seen and (_pointwise(u) or _is(u, *REDUCTIONS, *MOVES) or u.target is operator.getitem):
                seen.add(u)
                (found if _is(u, CONVERT) and u.args[1] in ANY_FP8 else nxt).append(u)
        frontier = nxt
    order = {n: i for i, n in enumerate(start.graph.nodes)}
    return min(found, key=order.__getitem__) if found else None


# ------------------------------------------------------------------------------------ quantize before the gather
def _data_path(fp8_cast: Node, result: Node, region, gathered: set) -> list[Node]:
    """The ops from the gathered tensor to the FP8 cast, following the data operand, in graph order."""
    path, cur = [], fp8_cast
    while cur is not result:
        if cur in region:
            raise Decline(f"the FP8 cast reads %{cur.name}, not the whole gathered tensor")
        path.append(cur)
        if _is(cur, CONVERT, *CLAMPS):
            data = [cur.args[0]]
        elif _is(cur, *SCALINGS):
            data = [a for a in cur.args[:1 if cur.target is aten.div.Tensor else 2]
                    if isinstance(a, Node) and same_shape(node_shape(a), node_shape(result)) and a in gathered]
        else:
            raise Decline(f"{_op(cur)} (%{cur.name}) between the all-gather and the FP8 cast is not part of "
                          f"a quantization")
        if len(data) != 1 or not isinstance(data[0], Node):
            raise Decline(f"%{cur.name} ({_op(cur)}) does not scale the gathered tensor elementwise")
        cur = data[0]
    return path[::-1]


def _chain_semantics(path: list[Node], chain: AllGatherChain):
    """(converts before the scaling, the scaling op or None, fp8 dtype, whether the low-precision quotient is only
    implicitly rounded); checks the clamps and the roundings after the scaling."""
    scalings = [n for n in path if _is(n, *SCALINGS)]
    if len(scalings) > 1:
        raise Decline(f"the chain scales twice (%{scalings[0].name}, %{scalings[1].name}); quant_fp8 scales once")
    k = path.index(scalings[0]) if scalings else next(i for i, n in enumerate(path) if not _is(n, CONVERT)
                                                      or n is path[-1])
    pre, post = path[:k], path[k + bool(scalings):-1]
    clamp = next((n for n in pre if not _is(n, CONVERT)), None)
    if clamp is not None:
        raise Decline(f"%{clamp.name} clamps before the scaling; quant_fp8 clamps only the scaled values")
    x_dtype = node_dtype(pre[-1]) if pre else node_dtype(chain.result)
    fp8 = path[-1].args[1]
    if x_dtype not in INPUT_DTYPES or fp8 not in FP8_DTYPES:
        raise Decline(f"quantizes {short_dtype(x_dtype)} to {short_dtype(fp8)}; quant_fp8 takes bf16, fp16 or fp32 "
                      f"to float8_e4m3fn or float8_e5m2")
    d0 = node_dtype(chain.result)  # a dtype holding every value: narrowed by rounding converts, then the scaling
    for c in pre:
        d0 = d0 if _exact_in(d0, c.args[1]) else c.args[1]
    d0 = node_dtype(scalings[0]) if scalings else d0
    lo, hi, fmax = -math.inf, math.inf, FP8_MAX[fp8]
    for n in post:
        if _is(n, CONVERT):
            if not _exact_in(d0, n.args[1]):
                raise Decline(f"%{n.name} rounds the {short_dtype(d0)} values to {short_dtype(n.args[1])} before "
                              f"the FP8 cast; quant_fp8 rounds once")
            continue
        low, high = (tuple(n.args[1:3]) + (None, None))[:2] if n.target is aten.clamp.default else \
            ((n.args[1], None) if n.target is aten.clamp_min.default else (None, n.args[1]))
        if any(b is not None and not isinstance(b, (int, float)) for b in (low, high)):
            raise Decline(f"%{n.name} clamps to a non-constant bound")
        lo, hi = max(lo, low if low is not None else lo), min(hi, high if high is not None else hi)
    if (lo, hi) == (-math.inf, math.inf):
        raise Decline("no clamp before the FP8 cast (eager casts overflow to NaN, compiled ones saturate); "
                      "quant_fp8 saturates")
    if (lo, hi) != (-fmax, fmax):
        raise Decline(f"the chain clamps to [{lo:g}, {hi:g}]; quant_fp8 saturates to exactly +-{fmax:g}")
    rounded = any(_is(n, CONVERT) and n.args[1] == d0 for n in post)  # an explicit cast back to the quotient's dtype
    return pre, (scalings[0] if scalings else None), fp8, d0 != torch.float32 and not rounded


def _scale_cone(scale: Node, chain: AllGatherChain, region, gathered: set, order):
    """The scale's ops that read the gathered data, and how: None, 'tensor' (whole amax) or 'row' (per token)."""
    cone, stack = set(), [scale]
    while stack:
        n = stack.pop()
        if n not in cone and n not in region and n in gathered:
            cone.add(n)
            stack.extend(n.all_input_nodes)
    kinds, ndim, whole = set(), len(node_shape(chain.result)), (chain.wait, chain.result)
    for n in sorted(cone, key=order.__getitem__):
        if _is(n, *REDUCTIONS):
            src = n.args[0].args[0] if _is(n.args[0], aten.abs.default) else n.args[0]
            dims = n.args[1] if len(n.args) > 1 else []
            dims = {d % ndim for d in ([dims] if isinstance(dims, int) else dims)} or set(range(ndim))
            if src not in whole or (n.target is aten.max.default and len(n.args) > 1):
                raise Decline(f"the scale reads the gathered tensor through %{n.name} ({_op(n)}); only an amax of "
                              f"the whole gathered tensor (or of its abs) can be made exact")
            if dims == set(range(ndim)):
                kinds.add("tensor")
            elif 0 in dims or chain.dim in dims or src is not chain.result:
                raise Decline(f"the per-token amax %{n.name} reduces over dim 0 or the gathered dim {chain.dim}")
            else:
                kinds.add("row")
            continue
        if _is(n, aten.abs.default) and n.args[0] in whole:
            if any(u not in cone for u in n.users):
                raise Decline(f"the gathered tensor's abs %{n.name} has other users")
        elif not _pointwise(n) or any(i in region for i in n.all_input_nodes):
            raise Decline(f"the scale depends on the gathered tensor through %{n.name} ({_op(n)}); only an amax "
                          f"(all-reduced MAX, or per token along non-gathered dims) can be made exact")
        if any(not (_replicated(i) and _one_element(i)) for i in n.all_input_nodes if i not in cone | region):
            raise Decline(f"%{n.name} of the scale also reads a tensor that is not a replicated scalar")
    if len(kinds) > 1:
        raise Decline("the scale mixes a per-tensor and a per-token amax of the gathered tensor")
    return cone, next(iter(kinds), None)


# ------------------------------------------------------------------------------------ mirror: dequant after gather
def _dequant_chain(x: Node):
    """(fp8 tensor, [convert(fp8 → ·), …, x]) when ``x`` is an elementwise dequantization of an FP8 tensor."""
    chain, cur = [], x
    while _is(cur, CONVERT, *SCALINGS):
        chain.append(cur)
        if _is(cur, CONVERT) and node_dtype(cur.args[0]) in FP8_DTYPES:
            return cur.args[0], chain[::-1]
        data = [a for a in cur.args[:1 if cur.target is aten.div.Tensor else 2]
                if isinstance(a, Node) and same_shape(node_shape(a), node_shape(cur))]
        if len(data) != 1:
            return None
        cur = data[0]
    return None
