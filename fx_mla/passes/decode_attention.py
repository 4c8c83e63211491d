"""Pass ``decode_attention``: paged MLA decode attention → ``torch.ops.fx_mla.mla_decode_fp8``.

Rewrites (B requests, H heads, T = max_blocks * block_size gathered tokens, D = L + R)::

    kv  = cache[block_table].view(B, T, D).to(dt) * k_scale      # or fx_mla.gather_dequant_cache_paged(...)
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

Matches only when: the keys and values are one gathered paged cache (``index(cache, [block_table])`` reshaped to
``[B, T, D]``, optionally cast and scaled by a one-element fp32 ``k_scale``, or ``gather_dequant_cache_paged`` with
the plain layout); the values are its first L entries; scores are scaled by Python numbers only; the mask is a
per-request length mask. The head dim and L are specialized (guarded) to ints, as the kernel needs.

Declines (reported) when: the mask is not ``positions < seq_lens[:, None]`` (causal, a boolean mask input, no mask);
the softmax / logsumexp is not recognized; an intermediate (scores, probabilities, ...) has another user; dtypes or
shapes the kernel does not cover (``kernel_unsupported_reason``: head dim, L, rope width, dtypes, capability);
block_table not int32; a scaled non-FP8 cache.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Optional

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import guard_int

import fx_mla.ops.gather_dequant_cache  # noqa: F401  (registers the op we match)
import fx_mla.ops.mla_decode_fp8  # noqa: F401  (registers the op we emit)
from fx_mla.ops._fp8 import FP8_DTYPES
from fx_mla.ops.mla_decode_fp8 import OUT_DTYPES, kernel_unsupported_reason

from ..report import short_dtype
from .match import arg, is_op, node_dtype, node_shape, same_size, static_int, tensor_val

PASS = "decode_attention"
aten, prims, fx_mla = torch.ops.aten, torch.ops.prims, torch.ops.fx_mla
CONVERT = prims.convert_element_type.default
VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
         aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.expand.default, aten.clone.default,
         aten.alias.default, aten.permute.default, aten.transpose.int)
NOTS = (aten.bitwise_not.default, aten.logical_not.default)
LAST = (-1, 2)  # the token dim of [B, H, T]


class Decline(Exception):
    """A candidate that cannot be rewritten: the reported reason, with ``{}`` for the canonical names of ``nodes``."""

    def __init__(self, reason: str, *nodes: torch.fx.Node):
        super().__init__(reason)
        self.reason, self.nodes = reason, nodes

    def text(self, namer) -> str:
        return self.reason.format(*("%" + namer.name(n) for n in self.nodes)) if self.nodes else self.reason


# ---------------------------------------------------------------- layouts: views and casts between two nodes

def _real_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [u for u in node.users if not is_op(u, aten.sym_size.int)]


def _back(node: Any, casts: bool = True) -> tuple[Any, list[torch.fx.Node]]:
    """(base, chain): walk back through views (and casts) from ``node``; chain runs base → node."""
    chain = []
    while is_op(node, *VIEWS) or (casts and is_op(node, CONVERT)):
        if is_op(node.args[0], aten.index.Tensor):
            break  # a paged gather's reshape: the gathered [B, T, D] itself
        chain.append(node)
        node = node.args[0]
    return node, chain[::-1]


def _ones(shape) -> list[bool]:
    return [static_int(s) == 1 for s in shape]


def _labels(base: torch.fx.Node, chain: list[torch.fx.Node]) -> Optional[list]:
    """Which base axis each axis of ``chain[-1]`` holds (None: a size-1 axis), or None when a view mixes axes."""
    shape = node_shape(base)
    if shape is None:
        return None
    labels = [None if one else i for i, one in enumerate(_ones(shape))]
    for n in chain:
        out = node_shape(n)
        if out is None:
            return None
        if is_op(n, aten.permute.default):
            labels = [labels[d % len(labels)] for d in n.args[1]]
        elif is_op(n, aten.transpose.int):
            a, b = (d % len(labels) for d in n.args[1:3])
            labels[a], labels[b] = labels[b], labels[a]
        else:  # reshape/view/unsqueeze/squeeze/expand/clone/cast: only size-1 axes may come or go
            src = [(l, s) for l, s, one in zip(labels, shape, _ones(shape)) if not one]
            dst = [s for s, one in zip(out, _ones(out)) if not one]
            if len(src) != len(dst) or not all(same_size(a[1], b) for a, b in zip(src, dst)):
                return None
            it = iter(l for l, _ in src)
            labels = [None if one else next(it) for one in _ones(out)]
        shape = out
    return labels


def _holds(labels: Optional[list], order: list[int]) -> bool:
    """The non-singleton axes are the base's axes ``order`` (in that order; base size-1 axes ignored).

    A base axis of size 1 (batch 1 specialised by dynamo, say) carries no label, so it is dropped from ``order``.
    """
    if labels is None:
        return False
    present = [l for l in labels if l is not None]
    return set(present) <= set(order) and present == [o for o in order if o in present]


# ---------------------------------------------------------------- pieces of the attention

@dataclasses.dataclass
class KV:
    node: torch.fx.Node
    cache: torch.fx.Node
    block_table: torch.fx.Node
    k_scale: Optional[torch.fx.Node]


def _one_element_f32(node: Any) -> bool:
    t = tensor_val(node)
    return t is not None and t.dtype == torch.float32 and all(static_int(s) == 1 for s in t.shape)


def _paged_kv(node: Any) -> Optional[KV]:
    """The gathered, dequantized paged cache ``[B, T, D]`` that ``node`` is, or None."""
    if is_op(node, fx_mla.gather_dequant_cache_paged.default):
        if arg(node, 4, "layout", "plain") != "plain":
            raise Decline(f"{{}} has layout {arg(node, 4, 'layout')!r}: mla_decode_fp8 reads plain caches only", node)
        return KV(node, node.args[0], node.args[1], arg(node, 2, "scale"))
    x, scale = node, None
    if is_op(x, aten.mul.Tensor) and len(x.args) == 2:
        x, scale = x.args if _one_element_f32(x.args[1]) else x.args[::-1]
        if not _one_element_f32(scale):
            return None
    if is_op(x, CONVERT):
        x = x.args[0]
    if not is_op(x, aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        return None
    index = x.args[0]
    if not is_op(index, aten.index.Tensor) or len(index.args[1]) != 1 or index.args[1][0] is None:
        return None
    cache, table = index.args[0], index.args[1][0]
    cs, ts, gs, xs = node_shape(cache), node_shape(table), node_shape(index), node_shape(x)
    if None in (cs, ts, gs, xs) or len(cs) != 3 or len(ts) != 2 or len(xs) != 3:
        return None
    if not (same_size(xs[0], ts[0]) and same_size(xs[1], ts[1] * cs[1]) and same_size(xs[2], cs[2])):
        return None
    return KV(node, cache, table, scale)


def _size(x: Any) -> Any:
    """A size argument as an int or SymInt (size arguments may be SymInt-valued nodes)."""
    return x.meta.get("val") if isinstance(x, torch.fx.Node) else x


def _scalar(x: Any) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _is_neg_inf(x: Any) -> bool:
    if _scalar(x) is not None:
        return _scalar(x) == -math.inf
    if is_op(x, aten.full.default) and all(static_int(s) == 1 for s in x.args[0]):
        return _scalar(x.args[1]) == -math.inf
    return is_op(x, aten.scalar_tensor.default) and _scalar(x.args[0]) == -math.inf


@dataclasses.dataclass
class Scores:
    end: torch.fx.Node                 # the masked, scaled scores S [B, H, T]
    nodes: list[torch.fx.Node]
    sm_scale: float
    mask: Optional[torch.fx.Node]      # the where
    mask_valid_polarity: bool = False  # where(cond, s, -inf): cond marks kept tokens


def _scores(bmm: torch.fx.Node) -> Scores:
    """Walk the elementwise chain after the score bmm: views, casts, scalar scaling, one -inf where."""
    cur, nodes, scale, mask, valid = bmm, [], 1.0, None, False
    while len(users := _real_users(cur)) == 1:
        u = users[0]
        if is_op(u, aten.mul.Tensor, aten.mul.Scalar) and len(u.args) == 2 and cur in u.args:
            other = u.args[1] if u.args[0] is cur else u.args[0]
            if _scalar(other) is None:
                if tensor_val(other) is not None and tensor_val(other).dim() == 0:
                    raise Decline("the scores are scaled by a tensor (a Python float captured as a graph input?); "
                                  "mla_decode_fp8 needs sm_scale as a constant")
                break
            scale *= _scalar(other)
        elif is_op(u, aten.div.Tensor, aten.div.Scalar) and u.args[0] is cur and _scalar(u.args[1]) is not None \
                and "rounding_mode" not in u.kwargs:
            scale /= _scalar(u.args[1])
        elif is_op(u, aten.where.self) and mask is None and cur in u.args[1:] and u.args[0] is not cur:
            other = u.args[2] if u.args[1] is cur else u.args[1]
            if not _is_neg_inf(other):
                break
            mask, valid = u, u.args[1] is cur
        elif not (is_op(u, *VIEWS) or is_op(u, CONVERT)):
            break
        nodes.append(u)
        cur = u
    views = [n for n in nodes if is_op(n, *VIEWS) or is_op(n, CONVERT)]
    out = node_shape(cur)
    if not _holds(_labels(bmm, views), [0, 1, 2]) or out is None or len(out) != 3 or \
            not all(same_size(a, b) for a, b in zip(out, node_shape(bmm))):
        raise Decline("the scores change layout or shape after the q·k bmm")
    if not scale > 0 or not math.isfinite(scale):
        raise Decline(f"the score scale {scale} is not a positive finite number")
    return Scores(cur, nodes, scale, mask, valid)


def _along(operand: Any, axis: int, rank: int, size: Any) -> Optional[torch.fx.Node]:
    """The 1-D base of ``operand`` when, broadcast to ``rank`` dims, it varies only along ``axis`` (of ``size``)."""
    base, views = _back(operand, casts=True)
    shape, base_shape, labels = node_shape(operand), node_shape(base), _labels(base, views)
    if labels is None or shape is None or base_shape is None or len(base_shape) != 1 or len(shape) > rank:
        return None
    labels = [None] * (rank - len(shape)) + labels
    if [i for i, l in enumerate(labels) if l is not None] != [axis] or not same_size(base_shape[0], size):
        return None
    return base


def _single(operand: Any) -> Optional[torch.fx.Node]:
    """The 1-D, one-element base of ``operand`` when every axis of ``operand`` has size 1 (batch 1's lengths)."""
    base, _ = _back(operand, casts=True)
    shape, base_shape = node_shape(operand), node_shape(base)
    if shape is None or base_shape is None or len(base_shape) != 1 or static_int(base_shape[0]) != 1 \
            or any(static_int(d) != 1 for d in shape):
        return None
    return base


def _length_mask(sc: Scores, batch: Any, tokens: Any) -> torch.fx.Node:
    """The seq_lens node of a per-request length mask ``positions < seq_lens[:, None]``, else Decline."""
    not_length = ("the mask is not a per-request length mask (arange(T) < seq_lens[:, None], broadcast over "
                  "heads)")
    if sc.mask is None:
        raise Decline("the scores are not masked by sequence length (no where/masked_fill with -inf)")
    cond, chain, flips = sc.mask.args[0], [], 0
    while True:  # views and logical nots between the comparison and the where
        cmp, views = _back(cond, casts=False)
        chain = views + chain
        if not is_op(cmp, *NOTS):
            break
        flips, cond = flips + 1, cmp.args[0]
    kinds = {aten.lt.Tensor: (0, True), aten.ge.Tensor: (0, False), aten.gt.Tensor: (1, True),
             aten.le.Tensor: (1, False)}  # (which operand is the positions, True if the comparison marks kept)
    kind = next((v for k, v in kinds.items() if is_op(cmp, k)), None)
    cs, out = node_shape(cmp), node_shape(sc.mask.args[0])
    labels = _labels(cmp, chain)
    one_request = static_int(batch) == 1  # dynamo specialised batch 1: the batch axis carries no label
    if kind is None or cs is None or out is None or len(out) != 3 or labels is None or labels[1] is not None \
            or labels[2] is None or (labels[0] is None and not one_request) \
            or not same_size(out[0], batch) or not same_size(out[2], tokens):
        raise Decline(not_length)
    pos = _along(cmp.args[kind[0]], labels[2], len(cs), tokens)
    lens = (_single(cmp.args[1 - kind[0]]) if labels[0] is None
            else _along(cmp.args[1 - kind[0]], labels[0], len(cs), batch))
    if pos is None or lens is None or not is_op(pos, prims.iota.default) or arg(pos, 1, "start", 0) != 0 or \
            arg(pos, 2, "step", 1) != 1 or node_dtype(lens) not in (torch.int32, torch.int64):
        raise Decline(not_length)
    # kept tokens: cond (after the nots) selects s in where(cond, s, -inf), -inf in where(cond, -inf, s)
    if kind[1] ^ (flips % 2 == 1) != sc.mask_valid_polarity:
        raise Decline(not_length)
    return lens


# ---------------------------------------------------------------- softmax / logsumexp over the token dim

def _last_dim(node: torch.fx.Node, index: int, name: str) -> bool:
    dims = arg(node, index, name)
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    return len(dims) == 1 and dims[0] in LAST


def _row_max(m: Any, s: torch.fx.Node) -> bool:
    """amax(s, -1, keepdim=True), optionally made finite: where(abs(m) == inf, 0, m)."""
    if is_op(m, aten.where.self) and _scalar_zero(m.args[1]):
        eq, inner = m.args[0], m.args[2]
        if not (is_op(eq, aten.eq.Scalar) and _scalar(eq.args[1]) == math.inf and is_op(eq.args[0], aten.abs.default)
                and eq.args[0].args[0] is inner):
            return False
        m = inner
    return is_op(m, aten.amax.default) and m.args[0] is s and _last_dim(m, 1, "dim") and arg(m, 2, "keepdim", False)


def _scalar_zero(x: Any) -> bool:
    if _scalar(x) is not None:
        return _scalar(x) == 0
    return is_op(x, aten.full.default) and _scalar(x.args[1]) == 0


def _exp_minus(e: Any, s: torch.fx.Node) -> Optional[torch.fx.Node]:
    """The subtrahend m of ``e = exp(s - m)``, else None."""
    if is_op(e, aten.exp.default) and is_op(e.args[0], aten.sub.Tensor) and e.args[0].args[0] is s \
            and "alpha" not in e.args[0].kwargs:
        return e.args[0].args[1]
    return None


def _is_lse(n: Any, s: torch.fx.Node) -> bool:
    """``n = logsumexp(s, -1)``: the op itself or its decomposition log(sum(exp(s - m), -1)) + squeeze(m)."""
    if is_op(n, aten.logsumexp.default):
        return n.args[0] is s and _last_dim(n, 1, "dim") and not arg(n, 2, "keepdim", False)
    if not is_op(n, aten.add.Tensor) or "alpha" in n.kwargs:
        return False
    for log, sq in (n.args, n.args[::-1]):
        if not (is_op(log, aten.log.default) and is_op(sq, aten.squeeze.dims, aten.squeeze.dim)):
            continue
        total, m = log.args[0], sq.args[0]
        if not (_last_dim(sq, 1, "dim") and is_op(total, aten.sum.dim_IntList) and _last_dim(total, 1, "dim")
                and not arg(total, 2, "keepdim", False)):
            continue
        if _exp_minus(total.args[0], s) is m and _row_max(m, s):
            return True
    return False


def _probs(p: torch.fx.Node, s: torch.fx.Node) -> tuple[str, Optional[torch.fx.Node]]:
    """('logsumexp', lse) for p = exp(s - finite(lse)[..., None]); ('softmax', None) for p = softmax(s)."""
    m = _exp_minus(p, s)
    if m is not None and is_op(m, aten.unsqueeze.default) and m.args[1] in LAST:
        lse = m.args[0]
        if is_op(lse, aten.where.self) and is_op(lse.args[0], aten.isinf.default) and _scalar_zero(lse.args[1]) \
                and lse.args[0].args[0] is lse.args[2]:
            lse = lse.args[2]
        if _is_lse(lse, s):
            return "logsumexp", lse
    if is_op(p, aten.div.Tensor) and len(p.args) == 2:
        e, total = p.args
        if is_op(total, aten.sum.dim_IntList) and total.args[0] is e and _last_dim(total, 1, "dim") and \
                arg(total, 2, "keepdim", False) and _row_max(_exp_minus(e, s), s):
            return "softmax", None
        if _online_softmax(e, total, s):
            return "softmax", None
    raise Decline("the probabilities {} are not recognized as softmax or exp(s - logsumexp(s)) over the tokens", p)


def _online_softmax(e: Any, total: Any, s: torch.fx.Node) -> bool:
    """Inductor's online-softmax form (CUDA post-grad): m, t = prepare_softmax_online(s, -1); exp(s - m) / t."""
    pso = getattr(torch.ops.prims, "prepare_softmax_online", None)
    if pso is None or not (is_op(total, operator.getitem) and total.args[1] == 1):
        return False
    stats = total.args[0]
    m = _exp_minus(e, s)
    return (is_op(stats, pso.default) and stats.args[0] is s and _last_dim(stats, 1, "dim")
            and is_op(m, operator.getitem) and m.args[0] is stats and m.args[1] == 0)


def _find_lse(s: torch.fx.Node, depth: int = 6) -> Optional[torch.fx.Node]:
    frontier, seen = [s], {s}
    for _ in range(depth):
        frontier = [u for n in frontier for u in n.users if u not in seen and not seen.add(u)]
        for n in frontier:
            if _is_lse(n, s):
                return n
    return None


# ---------------------------------------------------------------- the whole match

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
        if is_op(conv, CONVERT) and node_dtype(conv.args[0]) in FP8_DTYPES and _one_element_f32(scale):
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
        raise Decline(f"block_table is {short_dtype(node_dtype(kv.block_table))}; mla_decode_fp8 takes i32")
    if kv.k_scale is not None and cache_dtype not in FP8_DTYPES:
        raise Decline(f"a {short_dtype(cache_dtype)} cache times a scale: mla_decode_fp8 scales FP8 caches only")
    if kv.k_scale is not None and not _one_element_f32(kv.k_scale):
        raise Decline("k_scale is not a one-element float32 tensor")
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
    reason = kernel_unsupported_reason(node_dtype(plan.q), cache_dtype, head_dim, latent, cap)
    if reason is not None:
        raise Decline(f"mla_decode_fp8 does not cover this attention: {reason}")
    qtype = "fp8 query with q_scale" if plan.q_scale is not None else f"{short_dtype(node_dtype(plan.q))} query"
    uses = "replaced" if lse is not None else "unused"
    plan.detail = (f"{form} attention over the paged {short_dtype(cache_dtype)} cache -> mla_decode_fp8 ({qtype}, "
                   f"L={latent}, sm_scale={plan.sm_scale:.6g}, lse {uses}){note}")
    return plan


# ---------------------------------------------------------------- rewrite

def _with_val(graph: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node:
    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes if n.op == "placeholder"])
    if fake_mode is not None:
        with fake_mode:
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
            node.meta["val"] = node.target(*args, **kwargs)
    return node


def _rewrite(graph: torch.fx.Graph, plan: Plan) -> torch.fx.Node:
    for size in plan.sizes:  # the kernel is specialized to these: recompile when they change
        guard_int(size)
    order = {n: i for i, n in enumerate(graph.nodes)}
    at = min([plan.value_bmm] + ([plan.lse] if plan.lse is not None else []), key=order.get)
    with graph.inserting_before(at):
        k_scale = plan.kv.k_scale
        if k_scale is None:  # unscaled cache: the op takes a scale all the same (1, or ignored for bf16/fp16)
            device = tensor_val(plan.kv.cache).device
            k_scale = _with_val(graph, graph.call_function(aten.full.default, ([], 1.0),
                                                           {"dtype": torch.float32, "device": device}))
        op = _with_val(graph, graph.call_function(
            fx_mla.mla_decode_fp8.default, (plan.q, plan.kv.cache, plan.kv.block_table, plan.seq_lens, k_scale,
                                           plan.q_scale, plan.sm_scale, plan.kv_lora_rank, plan.out_dtype)))
        out = _with_val(graph, graph.call_function(operator.getitem, (op, 0)))
        lse = _with_val(graph, graph.call_function(operator.getitem, (op, 1)))
        if plan.lse is not None and node_dtype(plan.lse) != torch.float32:
            lse = _with_val(graph, graph.call_function(CONVERT, (lse, node_dtype(plan.lse))))
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
