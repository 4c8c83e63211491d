"""Pass ``decode_attention``: paged MLA decode attention → ``torch.ops.fx_mla.mla_decode_fp8``.

Rewrites (B requests, H heads, T = max_blocks * block_size gathered tokens, D = L + R)::

    kv  = cache[block_table].view(B, T, D).to(dt) * k_scale      # or index_select(cache, 0, block_table.flatten()),
                                                                 # or fx_mla.gather_dequant_cache_paged(...)
    s   = (q @ kv^T).float() * sm_scale                          # bmm / matmul / einsum, any cast and scale order
    s   = where(arange(T) >= seq_lens[:, None], -inf, s)         # masked_fill / where, either polarity
    lse = logsumexp(s);  p = exp(s - finite(lse))                # or p = softmax(s) (lse then optional)
    o   = p.to(dt) @ kv[..., :L]
  ⇒ o, lse = fx_mla.mla_decode_fp8(q, cache, block_table, seq_lens, k_scale, q_scale, sm_scale, L, dt)

The fused op reads the paged cache once; both ``o`` and ``lse`` users (the DCP merge) are redirected to it, and the
gather, the scores and the probabilities become dead. A query written as a static FP8 quantize→dequantize
(``q_fp8.to(dt) * q_scale``, also after ``quant_before_gather`` moved the quantization before the all-gather) is
passed as FP8 with its ``q_scale`` on CUDA where the kernel covers it (capability >= 8.9); elsewhere the dequantized
query is passed (exact: it is the tensor the plain graph multiplies).

Numerics: not bitwise the plain graph (the op keeps scores and probabilities in fp32 in one pass), within 1e-2
relative error for bf16 outputs; an empty sequence gives lse = -inf and o = 0 (plain softmax gives NaN there).

Matches only when: the keys and values are one gathered paged cache (``index(cache, [block_table])`` or
``index_select(cache, 0, block_table.flatten())`` reshaped to ``[B, T, D]``, optionally cast and scaled by a
one-element fp32 ``k_scale``, or ``gather_dequant_cache_paged`` with the plain layout, also over the flattened table
as the cache_gather pass writes it for index_select, reshaped to ``[B, T, D]``; or the rows of the flattened cache
``cache.view(-1, D)`` gathered by index or index_select with slots ``block_table[:, p // bs] * bs + p % bs`` over
``p = arange(T)``, ``bs`` the cache's block size, directly or through cache_gather's op: that is
``cache[block_table]``, and the op reads the 3-D cache through the table); the values are its first L
entries; scores are scaled by Python numbers only; the mask is a per-request length mask. The head dim and L are specialized (guarded) to ints, as the kernel needs.
Casts are looked through only between bf16, fp16, fp32 and fp64 (the mask's positions and lengths: int32 / int64):
a cast to FP8, an integer or bool type inside the attention is computation the op would drop, so it ends the match
(a query cast up from FP8 or int8 is passed as that cast, the tensor the plain graph multiplies).

Declines (reported) when: the mask is not ``positions < seq_lens[:, None]`` (causal, a boolean mask input, no mask);
the softmax / logsumexp is not recognized; an intermediate (scores, probabilities, ...) has another user; dtypes or
shapes the kernel does not cover (``kernel_unsupported_reason``: head dim, L, rope width, dtypes, capability);
block_table not int32; a flattened-slot gather whose slots are not that formula over a block table (slots passed
in, another block size), reported as per-token slots, with or without the cache_gather pass first; a scaled
non-FP8 cache; a cache not contiguous in D; an input of the op on another device than the query (eager takes a CPU
index or a CPU 0-dim scale with a CUDA cache).
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, Optional

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import guard_int

import fx_mla.ops.mla_decode_fp8  # noqa: F401  (registers the op we emit)
from fx_mla.ops._fp8 import FP8_DTYPES
from fx_mla.ops.mla_decode_fp8 import OUT_DTYPES, kernel_unsupported_reason

from ..report import short_dtype
from ._decode_attention_match import (FLOATS, KV, Decline, _back, _find_lse, _holds, _labels, _length_mask,
                                      _one_element_f32, _paged_kv, _probs, _real_users, _scores, _size)
from .match import (CONVERT, arg, is_op, node_device, node_dtype, node_shape, same_size, set_val, static_int,
                    tensor_val)

PASS = "decode_attention"
aten, fx_mla = torch.ops.aten, torch.ops.fx_mla

# ---------------------------------------------------------------- the whole match (its pieces: _decode_attention_match)

@dataclasses.dataclass
class Plan:
    score_bmm: torch.fx.Node
    value_bmm: torch.fx.Node
    lse: Optional[torch.fx.Node]
    kv: KV
    q: torch.fx.Node
    q_scale: Optional[torch.fx.Node]
    seq_lens: torch.fx.Node
    sm_scale: float
    kv_lora_rank: int
    out_dtype: torch.dtype
    detail: str
    sizes: list  # SymInts the decision read through their hints: guarded when the rewrite fires


def _hint(size: Any, sizes: list) -> int:
    """A size as an int for the decision, from its hint: a SymInt is guarded (specialized) only when the rewrite
    fires (``sizes`` collects it), so a declined match leaves the shape environment alone too."""
    if isinstance(size, int):
        return size
    if isinstance(size, torch.SymInt) and static_int(size) is not None:
        return static_int(size)
    hint = getattr(size.node, "hint", None) if isinstance(size, torch.SymInt) else None
    if hint is None:
        raise Decline(f"a size the kernel needs as a constant ({size}) has no hint")
    sizes.append(size)
    return int(hint)


def _fp8_query(q: torch.fx.Node) -> Optional[tuple[torch.fx.Node, torch.fx.Node]]:
    """(q_fp8, q_scale) of a static FP8 dequantize ``q_fp8.to(dt) * q_scale``, else None."""
    if not is_op(q, aten.mul.Tensor) or len(q.args) != 2:
        return None
    for conv, scale in (q.args, q.args[::-1]):
        if is_op(conv, CONVERT) and node_dtype(conv.args[0]) in FP8_DTYPES and node_dtype(conv) in FLOATS and \
                _one_element_f32(scale):
            return conv.args[0], scale
    return None


def _value_bmm(s: torch.fx.Node, kv: KV, score_bmm: torch.fx.Node) -> torch.fx.Node:
    frontier, seen = [s], {s}
    for _ in range(12):
        frontier = [u for n in frontier for u in _real_users(n) if u not in seen and not seen.add(u)]
        for n in frontier:
            if is_op(n, aten.bmm.default) and n is not score_bmm:
                v_base, _ = _back(n.args[1])
                if v_base is kv.node or (is_op(v_base, aten.slice.Tensor) and v_base.args[0] is kv.node):
                    return n
    raise Decline("no bmm of the probabilities with the gathered cache's latent (p @ kv[..., :L]) follows the "
                  "scores")


def _latent_width(v_base: torch.fx.Node, kv: KV, head_dim: int, sizes: list) -> int:
    if v_base is kv.node:
        return head_dim
    dim, start, end, step = (arg(v_base, i, n, d) for i, n, d in
                             ((1, "dim", 0), (2, "start", None), (3, "end", None), (4, "step", 1)))
    if dim not in (2, -1) or start not in (0, None) or step != 1:
        raise Decline("the values are not a leading slice kv[..., :L] of the gathered cache")
    return head_dim if end is None else min(_hint(_size(end), sizes), head_dim)


def _check_users(plan: Plan, probs: torch.fx.Node) -> None:
    """Every intermediate between the q·k bmm and (o, lse) is used only inside the attention."""
    order = {n: i for i, n in enumerate(plan.score_bmm.graph.nodes)}
    ends = [plan.value_bmm] + ([plan.lse] if plan.lse is not None else [])
    last = max(order[n] for n in ends)
    inside, todo = set(), list(ends)
    while todo:  # ancestors of o / lse that descend from the q·k bmm (they lie between the two in graph order)
        n = todo.pop()
        if n in inside or order.get(n, -1) < order[plan.score_bmm] or order[n] > last:
            continue
        inside.add(n)
        todo += [a for a in n.all_input_nodes]
    desc, todo = set(), [plan.score_bmm]
    while todo:
        n = todo.pop()
        if n not in desc and order[n] <= last:
            desc.add(n)
            todo += list(n.users)
    inside &= desc
    for n in sorted(inside - set(ends), key=order.get):
        extra = [u for u in _real_users(n) if u not in inside]
        if extra:
            what = "the attention probabilities" if n is probs else "an intermediate of the attention"
            raise Decline(what + " {} also feed {}; rewriting would keep them alive", n, extra[0])


def _match(bmm: torch.fx.Node, ctx) -> Optional[Plan]:
    k_base, k_chain = _back(bmm.args[1])
    kv = _paged_kv(k_base)
    if kv is None:
        return None  # not attention over a paged cache: not ours to report
    kvs = node_shape(kv.node)
    if not _holds(_labels(k_base, k_chain), [0, 2, 1]):
        raise Decline("the keys are not the gathered cache transposed to [B, D, T]")
    q, q_chain = _back(bmm.args[0])
    qs = node_shape(q)
    if qs is None or len(qs) != 3 or not _holds(_labels(q, q_chain), [0, 1, 2]) or not same_size(qs[2], kvs[2]):
        raise Decline("the query is not a [B, H, D] tensor with the cache's head dim")
    sc = _scores(bmm)
    seq_lens = _length_mask(sc, kvs[0], kvs[1])
    vb = _value_bmm(sc.end, kv, bmm)
    v_base, v_chain = _back(vb.args[1])
    p, p_chain = _back(vb.args[0])
    if not (_holds(_labels(v_base, v_chain), [0, 1, 2]) and _holds(_labels(p, p_chain), [0, 1, 2])):
        raise Decline("the probabilities @ values bmm is not [B, H, T] @ [B, T, L]")
    form, lse = _probs(p, sc.end)
    lse = lse if lse is not None else _find_lse(sc.end)
    sizes: list = []
    head_dim = _hint(qs[2], sizes)
    latent = _latent_width(v_base, kv, head_dim, sizes)
    plan = Plan(bmm, vb, lse, kv, q, None, seq_lens, sc.sm_scale, latent, node_dtype(vb), "", sizes)
    _check_users(plan, p)

    cache_dtype = node_dtype(kv.cache)
    if node_dtype(kv.block_table) != torch.int32:
        what = short_dtype(node_dtype(kv.block_table))
        if static_int(node_shape(kv.cache)[1]) == 1:  # cache_gather's op over cache.view(-1, D)
            raise Decline(f"the gather reads per-token {what} slots (cache rows as pages of one token); "
                          "mla_decode_fp8 takes an i32 block table")
        raise Decline(f"block_table is {what}; mla_decode_fp8 takes i32")
    if kv.k_scale is not None and cache_dtype not in FP8_DTYPES:
        raise Decline(f"a {short_dtype(cache_dtype)} cache times a scale: mla_decode_fp8 scales FP8 caches only")
    if kv.k_scale is not None and not _one_element_f32(kv.k_scale):
        raise Decline("k_scale is not a one-element float32 tensor")
    if static_int(tensor_val(kv.cache).stride(-1)) != 1 and static_int(node_shape(kv.cache)[-1]) != 1:
        raise Decline("the cache is not contiguous in its last dim (D); mla_decode_fp8 reads rows of D entries")
    if plan.out_dtype not in OUT_DTYPES:
        raise Decline(f"the output dtype {short_dtype(plan.out_dtype)} is not bf16, fp16 or f32")
    cap = ctx.capability if ctx.is_cuda else None
    note = ""
    fp8 = _fp8_query(q)
    if fp8 is not None:
        why = "the FP8 x FP8 path is CUDA-only" if not ctx.is_cuda else \
            kernel_unsupported_reason(node_dtype(fp8[0]), cache_dtype, head_dim, latent, cap)
        if why is None:
            plan.q, plan.q_scale = fp8
        else:
            note = f"; dequantized query ({why})"
    # eager takes a CPU index or a CPU 0-dim scale with a CUDA cache; the op takes every input on the query's device
    inputs = {"kv_cache": kv.cache, "block_table": kv.block_table, "seq_lens": seq_lens, "k_scale": kv.k_scale,
              "q_scale": plan.q_scale}
    for name, node in inputs.items():
        if node is not None and node_device(node) != node_device(plan.q):
            raise Decline(f"{name} is on {node_device(node)}, the query on {node_device(plan.q)}: mla_decode_fp8 "
                          "takes its inputs on one device")
    reason = kernel_unsupported_reason(node_dtype(plan.q), cache_dtype, head_dim, latent, cap)
    if reason is not None:
        raise Decline(f"mla_decode_fp8 does not cover this attention: {reason}")
    qtype = "fp8 query with q_scale" if plan.q_scale is not None else f"{short_dtype(node_dtype(plan.q))} query"
    uses = "replaced" if lse is not None else "unused"
    plan.detail = (f"{form} attention over the paged {short_dtype(cache_dtype)} cache -> mla_decode_fp8 ({qtype}, "
                   f"L={latent}, sm_scale={plan.sm_scale:.6g}, lse {uses}){note}")
    return plan


# ---------------------------------------------------------------- rewrite

def _rewrite(graph: torch.fx.Graph, plan: Plan) -> torch.fx.Node:
    for size in plan.sizes:  # the kernel is specialized to these: recompile when they change
        guard_int(size)
    order = {n: i for i, n in enumerate(graph.nodes)}
    at = min([plan.value_bmm] + ([plan.lse] if plan.lse is not None else []), key=order.get)
    with graph.inserting_before(at):
        k_scale = plan.kv.k_scale
        if k_scale is None:  # unscaled cache: the op takes a scale all the same (1, or ignored for bf16/fp16)
            device = tensor_val(plan.kv.cache).device
            k_scale = set_val(graph.call_function(aten.full.default, ([], 1.0),
                                                  {"dtype": torch.float32, "device": device}))
        op = set_val(graph.call_function(
            fx_mla.mla_decode_fp8.default, (plan.q, plan.kv.cache, plan.kv.block_table, plan.seq_lens, k_scale,
                                           plan.q_scale, plan.sm_scale, plan.kv_lora_rank, plan.out_dtype)))
        out = set_val(graph.call_function(operator.getitem, (op, 0)))
        lse = set_val(graph.call_function(operator.getitem, (op, 1)))
        if plan.lse is not None and node_dtype(plan.lse) != torch.float32:
            lse = set_val(graph.call_function(CONVERT, (lse, node_dtype(plan.lse))))
    plan.value_bmm.replace_all_uses_with(out)
    if plan.lse is not None:
        plan.lse.replace_all_uses_with(lse)
    return op


def run(graph: torch.fx.Graph, ctx) -> None:
    fired = False
    for bmm in [n for n in graph.nodes if is_op(n, aten.bmm.default)]:
        if not bmm.users:
            continue
        try:
            plan = _match(bmm, ctx)
        except Decline as e:
            ctx.declined(PASS, bmm, e.text(ctx.namer))
            continue
        except Exception as e:  # noqa: BLE001 - a matcher bug must not fail the compile: report it, leave the graph
            ctx.declined(PASS, bmm, f"decode_attention matcher error ({type(e).__name__}: {e}); graph left as is")
            continue
        if plan is None:
            continue
        op = _rewrite(graph, plan)
        nodes = [plan.score_bmm, plan.value_bmm] + ([plan.lse] if plan.lse is not None else []) + [op]
        ctx.matched(PASS, nodes, plan.detail)
        fired = True
    if fired:
        graph.eliminate_dead_code()
