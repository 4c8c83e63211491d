"""Matching helpers of the ``decode_attention`` pass (:mod:`fx_mla.passes.decode_attention`): the layouts of views
between two nodes, the pieces of paged MLA decode attention (the gathered cache, the scaled and length-masked scores)
and the softmax / logsumexp over the token dim. Each returns None when a node is not the piece, or raises
:class:`Decline` with the reason to report.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Optional

import torch
import torch.fx

import fx_mla.ops.gather_dequant_cache  # noqa: F401  (registers the op we match)

from ._cache_gather_match import _is_size, _strip_upcast
from .match import CONVERT, arg, is_op, node_dtype, node_shape, same_size, static_int, tensor_val

aten, prims, fx_mla = torch.ops.aten, torch.ops.prims, torch.ops.fx_mla

VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
         aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.expand.default, aten.clone.default,
         aten.alias.default, aten.permute.default, aten.transpose.int)
RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
PAGED = fx_mla.gather_dequant_cache_paged.default
NOTS = (aten.bitwise_not.default, aten.logical_not.default)
LAST = (-1, 2)  # the token dim of [B, H, T]
FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
INTS = (torch.int32, torch.int64)


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


def _float_cast(node: Any) -> bool:
    """A cast between bf16, fp16, fp32 and fp64: it changes values by a 16-bit float's rounding at most, which the
    op's tolerance covers. Casts to or from FP8, integer or bool types change them more (or, from FP8, leave a
    base the op cannot take without its scale): they are part of the computation, not a layout."""
    return is_op(node, CONVERT) and node_dtype(node) in FLOATS and node_dtype(node.args[0]) in FLOATS


def _int_cast(node: Any) -> bool:
    """A cast between int32 and int64 (exact for positions and lengths, which are below 2**31)."""
    return is_op(node, CONVERT) and node_dtype(node) in INTS and node_dtype(node.args[0]) in INTS


def _back(node: Any, casts: Any = _float_cast) -> tuple[Any, list[torch.fx.Node]]:
    """(base, chain): walk back through views (and the casts ``casts`` accepts, None: none) from ``node``; chain
    runs base → node."""
    chain = []
    while is_op(node, *VIEWS) or (casts is not None and casts(node)):
        if is_op(node, *RESHAPES, CONVERT) and _gathered(node.args[0]):
            break  # a gather's reshape (or cast): the gathered [B, T, D] itself
        chain.append(node)
        node = node.args[0]
    return node, chain[::-1]


def _gathered(node: Any) -> bool:
    """``node`` is a cache gather (index, index_select, cache_gather's op), or a cast of one."""
    gathers = (aten.index.Tensor, aten.index_select.default, PAGED)
    return is_op(node, *gathers) or (is_op(node, CONVERT) and is_op(node.args[0], *gathers))


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


def _block_table(index: Any, batch: Any, tokens: Any, block_size: Any) -> Optional[torch.fx.Node]:
    """The 2-D block table [B, M] (M * block_size == tokens) whose rows, flattened, are ``index``: the table itself,
    or the table flattened to [B * M] (index_select's index), possibly unsqueezed to [1, B * M] (the cache_gather
    pass's paged op over an index_select), or None."""
    for _ in range(3):
        shape = node_shape(index)
        if shape is not None and len(shape) == 2 and same_size(shape[0], batch) and \
                same_size(shape[1] * block_size, tokens):
            return index
        if not is_op(index, *RESHAPES, aten.unsqueeze.default):
            return None
        index = index.args[0]
    return None


def _paged_source(cache: Any) -> Optional[torch.fx.Node]:
    """The paged cache ``[NB, BS, D]`` (BS not 1) that ``cache`` is a row view of: ``[NB * BS, D]`` as user code
    writes ``cache.view(-1, D)``, or ``[NB * BS, 1, D]`` as the cache_gather pass passes it to its op; else None."""
    cs = node_shape(cache)
    if cs is None or not (len(cs) == 2 or (len(cs) == 3 and static_int(cs[1]) == 1)):
        return None
    src = cache
    for _ in range(3):
        if not is_op(src, *RESHAPES, aten.unsqueeze.default):
            return None
        src = src.args[0]
        ss = node_shape(src)
        if ss is not None and len(ss) == 3 and static_int(ss[1]) != 1:
            return src if same_size(ss[0] * ss[1], cs[0]) and same_size(ss[2], cs[-1]) else None
    return None


def _slot_table(slots: Any, block_size: Any, batch: Any, tokens: Any) -> Optional[torch.fx.Node]:
    """The block table ``[B, M]`` (``M * block_size == tokens``) when ``slots`` ``[B, T]`` is
    ``block_table[:, p // block_size] * block_size + p % block_size`` over ``p = arange(T)`` (the table possibly
    cast to int64 first), else None. Row ``slots[b, p]`` of the flattened cache is then ``cache[block_table][b]``'s
    row p, out-of-range and negative block ids included (a negative id wraps the same way: (NB + id) * BS + p % BS)."""
    for _ in range(3):  # index_select's flattened slots (cache_gather's op: unsqueezed to [1, B * T]): to [B, T]
        if not is_op(slots, *RESHAPES, aten.unsqueeze.default):
            break
        slots = slots.args[0]
    shape = node_shape(slots)
    if not (is_op(slots, aten.add.Tensor) and len(slots.args) == 2 and slots.kwargs.get("alpha", 1) == 1
            and shape is not None and len(shape) == 2
            and same_size(shape[0], batch) and same_size(shape[1], tokens)):
        return None
    for prod, rem in (slots.args, slots.args[::-1]):
        if not (is_op(prod, aten.mul.Tensor) and len(prod.args) == 2 and
                is_op(rem, aten.remainder.Scalar, aten.remainder.Tensor) and _is_size(rem.args[1], block_size)):
            continue
        pos = rem.args[0]
        if not (is_op(pos, prims.iota.default) and arg(pos, 1, "start", 0) == 0 and arg(pos, 2, "step", 1) == 1
                and same_size(_size(pos.args[0]), tokens)):
            continue
        for pages, k in (prod.args, prod.args[::-1]):
            if not (_is_size(k, block_size) and is_op(pages, aten.index.Tensor) and len(pages.args[1]) == 2
                    and pages.args[1][0] is None):
                continue
            col = pages.args[1][1]
            if not (is_op(col, aten.div.Tensor_mode) and col.args[0] is pos and _is_size(col.args[1], block_size)
                    and col.kwargs.get("rounding_mode") == "floor"):
                continue
            table = _strip_upcast(pages.args[0])
            ts = node_shape(table)
            if ts is not None and len(ts) == 2 and same_size(ts[0], batch) and same_size(ts[1] * block_size, tokens):
                return table
    return None


def _paged_kv(node: Any) -> Optional[KV]:
    """The gathered, dequantized paged cache ``[B, T, D]`` that ``node`` is, or None: the cache_gather pass's paged
    op (or a reshape of it to [B, T, D]), or ``cache[block_table]`` / ``index_select(cache, 0, block_table.view(-1))``
    reshaped to [B, T, D], converted, optionally times a one-element fp32 scale. The rows of the flattened cache
    gathered by slots ``block_table[:, p // block_size] * block_size + p % block_size`` (``cache.view(-1, D)[slots]``,
    by index or index_select, or cache_gather's op over them) are ``cache[block_table]``: the 3-D cache and the table
    are returned for them. Other per-token slots over the flattened cache: declined (or, through cache_gather's op,
    returned with the slots as a table of one-token pages, which the caller declines)."""
    x, scale = node, None
    gather = node.args[0] if is_op(node, *RESHAPES) else node
    if is_op(gather, PAGED):
        if arg(gather, 4, "layout", "plain") != "plain":
            raise Decline(f"{{}} has layout {arg(gather, 4, 'layout')!r}: mla_decode_fp8 reads plain caches only",
                          gather)
        cache, index, scale = gather.args[0], gather.args[1], arg(gather, 2, "scale")
    else:
        if is_op(x, aten.mul.Tensor) and len(x.args) == 2:
            x, scale = x.args if _one_element_f32(x.args[1]) else x.args[::-1]
            if not _one_element_f32(scale):
                return None
        if is_op(x, CONVERT) and node_dtype(x) in FLOATS:  # the dequantizing cast (FP8 → model dtype)
            x = x.args[0]
        gather = x.args[0] if is_op(x, *RESHAPES) else x
        if gather is not x and is_op(gather, CONVERT) and node_dtype(gather) in FLOATS:  # cast, then reshape
            gather = gather.args[0]
        if is_op(gather, aten.index.Tensor) and len(gather.args[1]) == 1 and gather.args[1][0] is not None:
            cache, index = gather.args[0], gather.args[1][0]
        elif is_op(gather, aten.index_select.default) and len(gather.args) == 3 and \
                gather.args[1] in (0, -len(node_shape(gather.args[0]) or ())):
            cache, index = gather.args[0], gather.args[2]
        else:
            return None
    cs, xs = node_shape(cache), node_shape(x)
    if cs is None or xs is None or len(xs) != 3 or not same_size(xs[2], cs[-1]):
        return None
    source = _paged_source(cache)
    if source is not None:  # rows of the flattened paged cache, by slot
        table = _slot_table(index, node_shape(source)[1], xs[0], xs[1])
        if table is not None:
            return KV(node, source, table, scale)
        if len(cs) == 2:
            raise Decline("the keys are rows of the flattened cache {} gathered by per-token slots that are not "
                          "block_table[:, p // block_size] * block_size + p % block_size over p = arange(T); "
                          "mla_decode_fp8 reads the paged cache through a block table", cache)
    if len(cs) != 3 or (x is gather and not is_op(gather, PAGED)):
        return None
    table = _block_table(index, xs[0], xs[1], cs[1])
    return None if table is None else KV(node, cache, table, scale)


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
        elif not (is_op(u, *VIEWS) or _float_cast(u)):
            break
        nodes.append(u)
        cur = u
    views = [n for n in nodes if is_op(n, *VIEWS) or _float_cast(n)]
    out = node_shape(cur)
    if not _holds(_labels(bmm, views), [0, 1, 2]) or out is None or len(out) != 3 or \
            not all(same_size(a, b) for a, b in zip(out, node_shape(bmm))):
        raise Decline("the scores change layout or shape after the q·k bmm")
    if not scale > 0 or not math.isfinite(scale):
        raise Decline(f"the score scale {scale} is not a positive finite number")
    return Scores(cur, nodes, scale, mask, valid)


def _along(operand: Any, axis: int, rank: int, size: Any) -> Optional[torch.fx.Node]:
    """The 1-D base of ``operand`` when, broadcast to ``rank`` dims, it varies only along ``axis`` (of ``size``)."""
    base, views = _back(operand, casts=_int_cast)
    shape, base_shape, labels = node_shape(operand), node_shape(base), _labels(base, views)
    if labels is None or shape is None or base_shape is None or len(base_shape) != 1 or len(shape) > rank:
        return None
    labels = [None] * (rank - len(shape)) + labels
    if [i for i, l in enumerate(labels) if l is not None] != [axis] or not same_size(base_shape[0], size):
        return None
    return base


def _single(operand: Any) -> Optional[torch.fx.Node]:
    """The 1-D, one-element base of ``operand`` when every axis of ``operand`` has size 1 (batch 1's lengths)."""
    base, _ = _back(operand, casts=_int_cast)
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
        cmp, views = _back(cond, casts=None)
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
            arg(pos, 2, "step", 1) != 1 or node_dtype(pos) not in INTS or node_dtype(lens) not in INTS:
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
