"""Quantize before the all-gather: FP8 bytes on the wire instead of bf16/fp16/fp32, bitwise the same result.

Rewrites (x: the rank's local tensor; [reorg]: torch's ``split → getitem × N → cat(d)`` of a gather on dim d > 0;
FP8 travels as uint8, since gloo cannot all-gather float8):

* static per-tensor scale:   all_gather(x) → wait → [reorg] → quantize(·, s)
                          ⇒  quant_fp8(x, s) → view(u8) → all_gather → wait → [reorg] → view(fp8)
* dynamic per-tensor scale:  s = f(amax(|gathered|)): the amax becomes amax(|x|) → all_reduce(MAX) → wait (max is
                             exact, so s is bitwise the same on every rank; a NaN flag travels in the same all-reduce,
                             since a MAX all-reduce drops NaN where amax keeps it), then as above.
* per-token scales (reductions over dims other than 0 and d): the whole chain runs on x's rows before the gather;
  scales that later ops read (a dequant) are all-gathered as fp32 through the same [reorg].
* mirror (context path):     all_gather(dequantize(x_fp8)) ⇒ dequantize(all_gather(x_fp8)); dequantize = converts
                             and mul/div by replicated per-tensor scales (elementwise, so it commutes with the gather).

"quantize" is the chain plain PyTorch decomposes to: converts, one ``div(·, s)`` or ``mul(·, s)`` (s a 1-element fp32
tensor such as an input, a buffer, ``reciprocal(s)``, or a Python number), clamp / clamp_min / clamp_max to exactly
±fp8 max in any order, converts that cannot round (bf16 → f32 → bf16 around the clamp), then the cast to
float8_e4m3fn or float8_e5m2. The FP8 bytes equal those the unrewritten graph computes where it runs (_roundings):
quant_fp8 rounds the quotient to torch's promoted dtype as ATen does; under default Inductor, which keeps a fused
chain in fp32 up to its first explicit cast (on CUDA its Triton kernels drop explicit casts to bf16/fp16 too), the
pass feeds quant_fp8 an fp32 input when the chain has no explicit cast back (on CUDA: always); where a 0-dim scale would be rounded to the bf16/fp16 input's dtype (eager CUDA, Inductor with
emulate_precision_casts) it rounds the scale too; where Inductor's CUDA kernels divide with Triton's approximate fp32
'/' (its default), quant_fp8 divides the same way (approx_division). A scale not derived from the gathered data
must be replicated: graph inputs, buffers and constants are assumed identical on every rank (as vLLM's
q_scale/k_scale are); a scale computed from rank-local tensors is declined.

Declines (reported; graph intact): group size not a static int; the gathered tensor or a step of its quantization
has other users; an op that is not part of a quantization between the gather and the FP8 cast; no clamp, a clamp
other than ±fp8 max, a clamp before the scaling, or a rounding convert after the scaling; a scale that broadcasts the
data to more dims; a narrowing convert before the scaling where the
compiled graph drops it (default Inductor on CUDA); a scale that is not 1-element fp32, is computed from
rank-local data, or reads the gathered data other than through an amax; a Python-number divisor that is not a power
of two (eager CPU divides, eager CUDA and Inductor multiply by its reciprocal); unsupported dtypes; a CUDA device
below the capability quant_fp8 needs (fx_mla/ops/_fp8.py).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

import torch
import torch.fx
from torch.fx import Node

import fx_mla.ops.quant_fp8  # noqa: F401  (registers torch.ops.fx_mla.quant_fp8)
from fx_mla.ops._fp8 import fp8_supported

from ..report import short_dtype
from ._quant_before_gather_match import (REDUCTIONS, Decline, _chain, _chain_semantics, _check_group, _data_path,
                                         _dequant_chain, _exact_in, _find_fp8_cast, _one_element, _replicated,
                                         _scale_cone)
from .match import (CONVERT, AllGatherChain, downstream, erase_unused, hoist_before, is_op as _is, node_dtype,
                    node_shape, same_shape, set_vals, tensor_val)

PASS = "quant_before_gather"
aten, c10d = torch.ops.aten, torch.ops._c10d_functional
# The matchers (the quantization after a gather, its scale, the dequantization before one) live in
# _quant_before_gather_match.py.


def run(graph: torch.fx.Graph, ctx) -> None:
    canonical = {n.name: ctx.namer.name(n) for n in graph.nodes}  # the report prints canonical names
    rename = (lambda text: re.sub(r"%(\w+)", lambda m: "%" + canonical.get(m.group(1), m.group(1)), text))
    for ag in [n for n in graph.nodes if n.target is c10d.all_gather_into_tensor.default]:
        chain = _chain(ag)
        if chain is None:
            continue
        fp8_cast = _find_fp8_cast(chain.result)
        try:
            if fp8_cast is not None:
                _check_group(chain)
                ctx.matched(PASS, [ag, fp8_cast], rename(_quant_before(graph, chain, fp8_cast, ctx)))
            elif (deq := _dequant_chain(chain.source)) is not None:
                _check_group(chain)
                ctx.matched(PASS, [ag], rename(_dequant_after(graph, chain, *deq)))
        except Decline as e:
            ctx.declined(PASS, ag, rename(str(e)))


# ---------------------------------------------------------------------------------------------------- helpers
def _call(graph, target, *args, **kwargs) -> Node:
    return graph.call_function(target, args, kwargs)


def _gather_like(graph, chain: AllGatherChain, local: Node, after: Node) -> list[Node]:
    """A second gather of ``local``, same group and dim: all_gather (before the chain's) → wait → [reorg]."""
    with graph.inserting_before(chain.gather):
        nodes = [_call(graph, c10d.all_gather_into_tensor.default, local, *chain.gather.args[1:])]
    old_to_new = {chain.gather: nodes[0]}
    for old in dict.fromkeys(chain.nodes[1:]):
        with graph.inserting_after(after if len(nodes) == 1 else nodes[-1]):
            nodes.append(graph.node_copy(old, lambda a: old_to_new.get(a, a)))
        old_to_new[old] = nodes[-1]
    return nodes


def _send_bytes(graph, chain: AllGatherChain, local_bytes: Node, fp8_dtype, new: list) -> Node:
    """Gather ``local_bytes`` (uint8) through the existing chain; return the result viewed as ``fp8_dtype``."""
    chain.gather.args = (local_bytes, *chain.gather.args[1:])
    with graph.inserting_after(chain.result):
        fp8 = _call(graph, aten.view.dtype, chain.result, fp8_dtype)
    set_vals(graph, set(new) | set(chain.nodes) | {fp8})
    return fp8


# ------------------------------------------------------------------------------------ quantize before the gather
@dataclasses.dataclass(frozen=True)
class Rounding:
    """How the unrewritten graph computes ``x / s`` where it will run, for a bf16/fp16 ``x``: whether it rounds the
    quotient to x's dtype before the clamp, rounds a 0-dim fp32 scale to x's dtype first, and divides with
    Triton's approximate fp32 '/' (PTX div.full.f32) instead of an IEEE division."""
    quotient: bool
    scale: bool
    approx_division: bool = False


# Set (to a Rounding) only by diagnostics (benchmarks/diag_inductor_rounding.py): replaces the rule below for
# Inductor on CUDA without emulate_precision_casts, to test another hypothesis of how its kernels round.
INDUCTOR_CUDA_OVERRIDE: Optional[Rounding] = None


def _inductor_rounds_division() -> bool:
    """Whether Inductor's Triton kernels divide with div_rn (its eager-numerics switch; named differently across
    torch versions) rather than Triton's approximate '/'."""
    from torch._inductor import config as inductor_config
    numerics = getattr(inductor_config, "eager_numerics", None)
    flags = [getattr(numerics, "division_rounding", False)] + [
        getattr(inductor_config, n, False) for n in ("emulate_division_rounding", "emulate_divison_rounding")]
    return any(bool(f) for f in flags)


def _roundings(ctx, scale, implicit: bool) -> Rounding:
    """How the unrewritten graph rounds, where it will run (compile-time facts only: inner compiler, Inductor
    config, device; never data or rank).

    ATen (eager) rounds the quotient to its dtype; eager CUDA also casts a 0-dim CUDA scale to the input's dtype (CPU
    uses it in fp32). Inductor computes a fused chain in fp32: it rounds only at explicit casts, and uses the scale
    in fp32, unless emulate_precision_casts is on, which rounds both as eager CUDA does. Inductor's CUDA (Triton)
    kernels divide with Triton's approximate fp32 '/' unless its division-rounding switch is on; its CPU (C++)
    kernels divide exactly.
    """
    val = tensor_val(scale) if isinstance(scale, Node) else None
    zero_dim = val is not None and val.dim() == 0
    if getattr(ctx.options, "inner", "inductor") == "eager":
        return Rounding(True, zero_dim and val.device.type == "cuda")
    from torch._inductor import config as inductor_config
    approx = bool(ctx.is_cuda) and not _inductor_rounds_division()
    if inductor_config.emulate_precision_casts:
        return Rounding(True, zero_dim, approx)
    if ctx.is_cuda and INDUCTOR_CUDA_OVERRIDE is not None:
        return INDUCTOR_CUDA_OVERRIDE
    if ctx.is_cuda:
        # Inductor's Triton kernels compute bf16/fp16 intermediates in fp32 and drop every cast to them, explicit or
        # implicit (only stores round): measured bitwise on an H100, torch 2.11 (benchmarks/diag_inductor_rounding.py)
        return Rounding(False, False, approx)
    return Rounding(not implicit, False, approx)


def _quant_before(graph: torch.fx.Graph, chain: AllGatherChain, fp8_cast: Node, ctx) -> str:
    region = {chain.wait, *chain.nodes[2:]}
    gathered = downstream(chain.wait)
    path = _data_path(fp8_cast, chain.result, region, gathered)
    if not same_shape(node_shape(fp8_cast), node_shape(chain.result)):
        raise Decline(f"the quantization broadcasts the gathered tensor ({len(node_shape(chain.result))} dims) to "
                      f"another shape (%{fp8_cast.name}: {len(node_shape(fp8_cast))} dims); quant_fp8 keeps its "
                      f"input's shape")
    pre, scaling, fp8, implicit = _chain_semantics(path, chain)
    reason = fp8_supported(fp8, ctx.capability if ctx.is_cuda else None)
    if reason:
        raise Decline(f"quant_fp8 cannot run here: {reason}")
    order = {n: i for i, n in enumerate(graph.nodes)}
    scale = None
    if scaling is not None:
        data = path[path.index(scaling) - 1] if path.index(scaling) else chain.result
        scale = scaling.args[1] if scaling.args[0] is data else scaling.args[0]
    cone, kind = _scale_cone(scale, chain, region, gathered, order) if isinstance(scale, Node) else (set(), None)
    for n in [chain.wait, *chain.nodes[2:], *path[:-1]]:
        extra = [u for u in n.users if u not in set(path) | cone | set(chain.nodes)]
        if extra:
            raise Decline(f"the gathered {short_dtype(node_dtype(chain.result))} tensor (at %{n.name}) has other "
                          f"users: {', '.join('%' + u.name for u in extra)}")
    if kind == "row":
        return _quantize_rows_locally(graph, chain, path, cone, fp8)
    reciprocal = scaling is None or scaling.target is aten.mul.Tensor
    if not isinstance(scale, Node):
        value = 1.0 if scale is None else float(scale)
        if not reciprocal and (not math.isfinite(value) or value == 0 or math.frexp(abs(value))[0] != 0.5):
            raise Decline(f"divides by the Python number {value!r}: eager CPU divides, eager CUDA and Inductor "
                          f"multiply by its reciprocal; use a tensor scale or multiply by 1/s")
    elif node_dtype(scale) != torch.float32 or not _one_element(scale):
        raise Decline(f"scale %{scale.name} is {short_dtype(node_dtype(scale))}{list(node_shape(scale))}; "
                      f"quant_fp8 takes a 1-element fp32 scale")
    elif kind is None and not _replicated(scale):
        raise Decline(f"scale %{scale.name} is computed from rank-local data: it may differ between ranks")
    gathered = f"{tensor_val(chain.result).element_size()}-byte {short_dtype(node_dtype(chain.result))}"
    form = f"x {'*' if reciprocal else '/'} " + (f"{value!r}" if not isinstance(scale, Node) else f"%{scale.name}")
    x, new = chain.source, []
    with graph.inserting_before(chain.gather):
        for amax in (n for n in sorted(cone, key=order.__getitem__) if _is(n, *REDUCTIONS)):
            new += _all_reduced_amax(graph, amax, x, chain)
        if not isinstance(scale, Node):
            scale = _call(graph, aten.full.default, [], value, dtype=torch.float32,
                          device=tensor_val(x).device, pin_memory=False)
            new.append(scale)
    hoist_before(scale, chain.gather)
    rounding = _roundings(ctx, scale, implicit)
    if not rounding.quotient:  # an executor that drops casts to bf16/fp16 also drops a narrowing one before the scaling
        d = node_dtype(chain.result)
        for c in pre:
            if not _exact_in(d, c.args[1]):
                raise Decline(f"%{c.name} rounds the gathered {short_dtype(d)} to {short_dtype(c.args[1])} before "
                              f"the scaling, a cast the compiled graph drops; quant_fp8 would round it")
            d = c.args[1]
    with graph.inserting_before(chain.gather):
        for c in pre:
            new.append(x := _call(graph, CONVERT, x, c.args[1]))
        if node_dtype(x) != torch.float32 and rounding.scale:
            new.append(scale := _call(graph, CONVERT, _call(graph, CONVERT, scale, node_dtype(x)), torch.float32))
            new.append(scale.args[0])
            form += f" (scale rounded to {short_dtype(node_dtype(x))} as the unrewritten graph does)"
        if node_dtype(x) != torch.float32 and not rounding.quotient:
            new.append(x := _call(graph, CONVERT, x, torch.float32))
            form += " (fp32 quotient, as Inductor computes the fused chain)"
        approx = rounding.approx_division and not reciprocal
        if approx:
            form += " (Triton's approximate fp32 division, as Inductor's CUDA kernels divide)"
        new.append(q := _call(graph, torch.ops.fx_mla.quant_fp8.default, x, scale, fp8, reciprocal,
                              *((True,) if approx else ())))
        new.append(local_bytes := _call(graph, aten.view.dtype, q, torch.uint8))
    fp8_cast.replace_all_uses_with(_send_bytes(graph, chain, local_bytes, fp8, new))
    erase_unused(graph, set(path) | cone)
    dynamic = ", scale from an all-reduced amax" if kind else ""
    return (f"quant_fp8({short_dtype(node_dtype(x))} -> {short_dtype(fp8)}, {form}{dynamic}) before the all-gather; "
            f"gathers 1-byte FP8 instead of {gathered}")


def _all_reduced_amax(graph, amax: Node, x: Node, chain: AllGatherChain) -> list[Node]:
    """amax(|x|) over this rank → all_reduce(MAX) → wait, in fp32 (exact for bf16/fp16; gloo reduces fp32).

    torch's amax of the gathered tensor is NaN when any rank's part holds a NaN, but a MAX all-reduce drops NaN
    (gloo's compares with '<', NCCL's is fmax): each rank sends [its amax, isnan(its amax)] in one all-reduce and a
    raised flag makes the result NaN."""
    nodes = [_call(graph, aten.abs.default, x)] if _is(amax.args[0], aten.abs.default) else []
    nodes.append(graph.call_function(amax.target, (nodes[-1] if nodes else x, *amax.args[1:]), dict(amax.kwargs)))
    dtype = node_dtype(amax)
    if dtype != torch.float32:
        nodes.append(_call(graph, CONVERT, nodes[-1], torch.float32))
    local = nodes[-1]
    nodes.append(nan := _call(graph, CONVERT, _call(graph, aten.isnan.default, local), torch.float32))
    nodes.append(nan.args[0])
    nodes += [_call(graph, aten.unsqueeze.default, n, 0) for n in (local, nan)]
    nodes.append(_call(graph, aten.cat.default, nodes[-2:]))
    nodes.append(_call(graph, c10d.all_reduce.default, nodes[-1], "max", chain.group_name))
    nodes.append(wait := _call(graph, c10d.wait_tensor.default, nodes[-1]))
    nodes.append(flag := _call(graph, aten.gt.Scalar, _call(graph, aten.select.int, wait, 0, 1), 0))
    nodes += [flag.args[0], _call(graph, aten.select.int, wait, 0, 0)]
    nodes.append(_call(graph, aten.full.default, [], math.nan, dtype=torch.float32, device=tensor_val(x).device,
                       pin_memory=False))
    nodes.append(_call(graph, aten.where.self, flag, nodes[-1], nodes[-2]))
    if dtype != torch.float32:
        nodes.append(_call(graph, CONVERT, nodes[-1], dtype))
    amax.replace_all_uses_with(nodes[-1])
    return nodes


def _quantize_rows_locally(graph, chain: AllGatherChain, path, cone, fp8) -> str:
    """Per-token scales (reductions over dims other than 0 and the gather dim): the chain runs on the local rows."""
    local = set(path) | cone
    order = {n: i for i, n in enumerate(graph.nodes)}
    env, new = {chain.result: chain.source}, []
    for n in sorted(local, key=order.__getitem__):
        for i in n.all_input_nodes:
            if i not in env and i not in local:
                hoist_before(i, chain.gather)
        with graph.inserting_before(chain.gather):
            new.append(env.setdefault(n, graph.node_copy(n, lambda a: env.get(a, a))))
    with graph.inserting_before(chain.gather):
        new.append(local_bytes := _call(graph, aten.view.dtype, env[path[-1]], torch.uint8))
    after, gathered = chain.result, 0
    for n in sorted(cone, key=order.__getitem__):
        if any(u not in local for u in n.users):  # e.g. the dequant's scale: gather the local scales
            nodes = _gather_like(graph, chain, env[n], after)
            n.replace_all_uses_with(nodes[-1], delete_user_cb=lambda u: u not in local)
            new, after, gathered = new + nodes, nodes[-1], gathered + 1
    path[-1].replace_all_uses_with(_send_bytes(graph, chain, local_bytes, fp8, new))
    erase_unused(graph, local)
    return (f"per-token quantization to {short_dtype(fp8)} on the local rows before the all-gather; "
            f"{gathered} fp32 scale tensor(s) all-gathered for later users")


# ------------------------------------------------------------------------------------ mirror: dequant after gather
def _dequant_after(graph: torch.fx.Graph, chain: AllGatherChain, x8: Node, deq: list[Node]) -> str:
    for n in deq[1:]:
        if any(not (_replicated(a) and _one_element(a)) for a in n.args[:2]
               if isinstance(a, Node) and a not in deq):
            raise Decline(f"the dequantization %{n.name} uses a scale that is not a replicated per-tensor scalar")
    with graph.inserting_before(chain.gather):
        local_bytes = _call(graph, aten.view.dtype, x8, torch.uint8)
    env = {x8: _send_bytes(graph, chain, local_bytes, node_dtype(x8), [local_bytes])}
    new = [env[x8]]
    for n in deq:
        with graph.inserting_after(new[-1]):
            new.append(env.setdefault(n, graph.node_copy(n, lambda a: env.get(a, a))))
    chain.result.replace_all_uses_with(new[-1], delete_user_cb=lambda u: u is not env[x8])
    set_vals(graph, new[1:])
    erase_unused(graph, deq)
    return (f"dequantization moved after the all-gather: gathers {short_dtype(node_dtype(x8))} bytes instead of "
            f"{short_dtype(node_dtype(deq[-1]))}")
