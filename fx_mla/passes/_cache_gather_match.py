"""Matching helpers of the ``cache_gather`` pass (:mod:`fx_mla.passes.cache_gather`): what follows a gather (the
dequantize tail, plain or the fp8_ds_mla byte form, or a dequantize before it) and how the gather reads the cache
(paged blocks, rows, or context.py's token-parallel index chain). Each returns the match, or a string: the reason to
report.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
import torch.fx

from ..ops import gather_dequant_cache as _gdc  # registers the ops
from ..ops._fp8 import FP8_DTYPES
from ..report import short_dtype
from .match import CONVERT, is_op, node_dtype as _dtype, node_shape, same_size, static_int, tensor_val

aten, prims = torch.ops.aten, torch.ops.prims
RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)
VIEWS = RESHAPES + (aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
SIZE_OPS = (aten.sym_size.int,)
INDEX_DTYPES = (torch.int32, torch.int64)
Shape = tuple
_NAMER: list = [None]  # the report's GraphNamer, so reasons use the printed graph's names (set by the pass's run)


def _n(node) -> str:
    if not isinstance(node, torch.fx.Node):  # a constant or None where a matcher expected a node
        return repr(node)
    return "%" + (_NAMER[0].name(node) if _NAMER[0] is not None else node.name)


def _sz(size) -> str:
    return _NAMER[0].render_expr(size) if _NAMER[0] is not None else str(size)


def _short(dtype) -> str:
    return short_dtype(dtype) if dtype is not None else "?"


@dataclasses.dataclass
class Tail:
    """What follows the gather: the chain up to ``end`` (views and elementwise nodes), the output dtype, the scale
    node (or None) and the ``sym_size`` users of chain nodes."""
    nodes: list
    end: torch.fx.Node
    out_dtype: torch.dtype
    scale: Optional[torch.fx.Node]
    sizes: list
    layout: str = "plain"
    mul_dtype: Optional[torch.dtype] = None  # the dtype the scale multiply computes in (its promoted dtype)


@dataclasses.dataclass
class Source:
    """How the gather reads the cache: ``paged`` (blocks or rows through a 1-D/2-D index) or ``token``."""
    kind: str
    cache: torch.fx.Node
    index: Optional[torch.fx.Node] = None
    rows: bool = False                       # a 2-D [num_rows, D] source, addressed as block size 1
    meta: tuple = ()                         # token form: (block_table, cu_seq_lens, token_to_seq, seq_starts)


# ---------------------------------------------------------------- the dequantize tail

def _tail(gather: torch.fx.Node) -> Union[Tail, str]:
    """Walk views, one conversion, an optional scale multiply and an optional second conversion."""
    nodes, sizes = [], []
    cur, end, scale, converts, mul_dtype = gather, None, None, 0, None
    src_dtype = _dtype(gather)
    while converts < 2:
        real = [u for u in cur.users if not is_op(u, *SIZE_OPS)]
        sizes += [(u, cur) for u in cur.users if is_op(u, *SIZE_OPS)]
        if len(real) != 1:
            break
        u = real[0]
        if is_op(u, *VIEWS, aten.clone.default) and u.args[0] is cur:  # clones are dropped: the op's output is new
            nodes.append(u)
            cur = u
            continue
        if is_op(u, CONVERT) and (converts == 0 or _dtype(cur) == torch.float32 and _dtype(u) in _gdc.OUT_DTYPES):
            converts += 1  # a second one rounds the fp32 value (x.float() [* s]).to(dt) once, as the op does
        elif converts == 1 and scale is None and src_dtype in FP8_DTYPES and _scale_of(u, cur) is not None:
            scale, mul_dtype = _scale_of(u, cur), _dtype(u)
        else:
            break
        nodes.append(u)
        end = cur = u
    if end is None:
        users = ", ".join(_n(u) for u in cur.users if not is_op(u, *SIZE_OPS)) or "nothing"
        if len(real) > 1:
            return f"the gathered fp8 rows {_n(cur)} have several users ({users}): the fp8 intermediate is needed"
        return f"fp8 rows gathered without a dequantize (used by {users}): the op has no fp8 → fp8 copy"
    keep = nodes[:nodes.index(end) + 1]
    chain = {gather, *keep}
    return Tail(keep, end, _dtype(end), scale, [(u, o) for u, o in sizes if o in chain and o is not end],
                mul_dtype=mul_dtype)


def _ds_mla_tail(gather: torch.fx.Node) -> Union[Tail, str]:
    """The plain-PyTorch dequantize of 656-byte fp8_ds_mla rows (as vLLM writes it): byte slices reinterpreted as
    e4m3 latent / 4 fp32 group scales / bf16 rope, ``(lat[128k:128k+128].float() * scale[k:k+1]).to(dt)`` for
    k < 4 and ``rope.to(dt)``, concatenated on the last dim."""
    nodes, sizes, rows = [], [], gather
    while True:
        sizes += [(u, rows) for u in rows.users if is_op(u, *SIZE_OPS)]
        real = [u for u in rows.users if not is_op(u, *SIZE_OPS)]
        if len(real) != 1 or not is_op(real[0], *RESHAPES, aten.clone.default):
            break
        rows = real[0]
        nodes.append(rows)
    no = "656-byte rows gathered, but not dequantized in the fp8_ds_mla form the pass knows: "
    if static_int(node_shape(rows)[-1]) != _gdc.DS_MLA_ROW_BYTES:  # a reshape regrouped the bytes of the rows
        return no + f"{_n(rows)} has rows of {_sz(node_shape(rows)[-1])} bytes, not the cache's 656"
    lat, scales, rope = (_byte_view(rows, *part) for part in ((0, 512, torch.float8_e4m3fn),
                                                              (512, 528, torch.float32), (528, 656, torch.bfloat16)))
    if None in (lat, scales, rope) or len(rows.users) != 3 or len(lat.users) != 4 or len(scales.users) != 4:
        return no + f"the byte slices of {_n(rows)} are not latent [0:512] / scales [512:528] / rope [528:656]"
    last = _single_convert(rope)
    cat = next(iter(last.users)) if len(last.users) == 1 else None
    if not (is_op(cat, aten.cat.default) and len(cat.args[0]) == 5 and cat.args[0][4] is last
            and (len(cat.args) < 2 or cat.args[1] in (-1, len(node_shape(cat)) - 1))):
        return no + f"the rope {_n(rope)} does not end a concatenation of 4 latent groups and the rope"
    for k, part in enumerate(cat.args[0][:4]):
        mul = part.args[0] if is_op(part, CONVERT) and _dtype(part.args[0]) == torch.float32 else part
        ops = [a for a in getattr(mul, "args", ()) if isinstance(a, torch.fx.Node)]
        if not (is_op(mul, aten.mul.Tensor) and len(ops) == 2 and all(len(n.users) == 1 for n in (part, mul, *ops))):
            return no + f"latent group {k} ({_n(part)}) is not a product of the group and its scale"
        group, scale = ops if is_op(ops[0], CONVERT) else ops[::-1]
        if not (_is_slice(scale, scales, k, k + 1) and is_op(group, CONVERT) and _dtype(group) == torch.float32
                and _is_slice(group.args[0], lat, 128 * k, 128 * k + 128) and len(group.args[0].users) == 1):
            return no + f"latent group {k} ({_n(part)}) is not fp32(latent[{128 * k}:{128 * k + 128}]) * scale[{k}]"
    if len({_dtype(p) for p in cat.args[0]}) != 1:
        return no + "the concatenated parts differ in dtype"
    return Tail(nodes, cat, _dtype(cat), None, sizes, "fp8_ds_mla")


def _is_slice(node, src, lo, hi) -> bool:
    ends = (hi, 2 ** 63 - 1) if hi == static_int(node_shape(src)[-1]) else (hi,)
    return (is_op(node, aten.slice.Tensor) and node.args[0] is src and node.args[1] in (-1, len(node_shape(src)) - 1)
            and (node.args[2] if len(node.args) > 2 else 0) == lo and (node.args[3] if len(node.args) > 3 else None)
            in ends and (len(node.args) < 5 or node.args[4] == 1))


def _byte_view(rows, lo, hi, dtype):
    """The node viewing bytes [lo, hi) of each row as ``dtype`` (slice → [clone] → view.dtype), or None."""
    for sl in rows.users:
        if _is_slice(sl, rows, lo, hi) and len(sl.users) == 1:
            v = next(iter(sl.users))
            v = next(iter(v.users)) if is_op(v, aten.clone.default) and len(v.users) == 1 else v
            if is_op(v, aten.view.dtype) and v.args[1] == dtype:
                return v
    return None


def _single_convert(node):
    user = next(iter(node.users)) if len(node.users) == 1 else None
    return user if is_op(user, CONVERT) else node


def _pre_dequant(gather: torch.fx.Node) -> Optional[tuple]:
    """(x, Tail ending at ``gather``) when the gathered tensor is ``dequant(x)`` used only by the gather."""
    src, root = gather.args[0], gather.args[0]
    for _ in range(3):  # convert, mul by the scale, convert
        if is_op(root, CONVERT):
            root = root.args[0]
        elif is_op(root, aten.mul.Tensor):
            root = next((a for a in root.args if _scale_of(root, a) is not None), root)
        else:
            break
    if root is src or _dtype(root) not in _gdc.CACHE_DTYPES:
        return None
    tail = _tail(root)
    if isinstance(tail, str) or tail.end is not src or tail.sizes or any(is_op(n, *VIEWS) for n in tail.nodes):
        return None
    return root, Tail([], gather, tail.out_dtype, tail.scale, [], mul_dtype=tail.mul_dtype)


def _scale_of(mul: torch.fx.Node, x: torch.fx.Node) -> Optional[torch.fx.Node]:
    """The scale operand of ``mul`` when it is a one-element tensor the op can take (same result dtype)."""
    if not is_op(mul, aten.mul.Tensor) or len(mul.args) != 2:
        return None
    a, b = mul.args
    s = b if a is x else a
    if s is x or not isinstance(s, torch.fx.Node):
        return None
    sv, xv, mv = tensor_val(s), tensor_val(x), tensor_val(mul)
    if sv is None or static_int(sv.numel()) != 1 or sv.dim() > xv.dim() or sv.device != xv.device:
        return None
    if sv.dtype not in (torch.float32, xv.dtype) or mv.dtype not in _gdc.OUT_DTYPES:
        return None
    return s


# ---------------------------------------------------------------- the gather

def _source(gather: torch.fx.Node) -> Union[Source, str]:
    src = gather.args[0]
    ndim = len(node_shape(src))
    if is_op(gather, aten.index_select.default):
        dim = gather.args[1] + ndim if gather.args[1] < 0 else gather.args[1]
        if dim != 0:
            return f"index_select on dim {dim}: only rows (dim 0) of the cache are gathered by the op"
        indices = [gather.args[2]]
    else:
        indices = list(gather.args[1])
    if indices and indices[0] is None:
        dim = next((d for d, i in enumerate(indices) if i is not None), 0)
        return f"indexes dim {dim} of the source: the op gathers rows (dim 0) of the cache"
    if any(not isinstance(i, torch.fx.Node) for i in indices) or ndim not in (2, 3):
        return (f"index pattern not recognised: a {ndim}-D source indexed by "
                f"[{', '.join(_n(i) if isinstance(i, torch.fx.Node) else repr(i) for i in indices)}]")
    for i in indices:
        if _dtype(i) not in INDEX_DTYPES:
            return f"index {_n(i)} has dtype {_short(_dtype(i))}; the op takes int32 or int64 indices"
    if len(indices) == 1:
        if len(node_shape(indices[0])) not in (1, 2):
            return f"block index {_n(indices[0])} has {len(node_shape(indices[0]))} dims; the op takes 1 or 2"
        return Source("paged", src, indices[0], rows=ndim == 2)
    if len(indices) == 2 and ndim == 3:
        meta = _token_meta(src, *indices)
        return meta if isinstance(meta, str) else Source("token", src, meta=meta)
    return f"index pattern not recognised: {len(indices)} indices into a {ndim}-D source"


def _strip_upcast(node):
    """``x`` for an exact int32 → int64 conversion of ``x``, else ``node`` itself."""
    if is_op(node, CONVERT) and _dtype(node) == torch.int64 and _dtype(node.args[0]) in INDEX_DTYPES:
        return node.args[0]
    return node


def _unscaled(node) -> bool:
    """An ``add``/``sub`` whose second operand is not multiplied (no ``alpha``, or ``alpha=1``)."""
    alpha = node.kwargs.get("alpha", 1)
    return isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha == 1


def _is_size(value, size) -> bool:
    v = value.meta.get("val") if isinstance(value, torch.fx.Node) else value
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool) and same_size(v, size)


def _token_meta(cache, blk, slot) -> Union[tuple, str]:
    """(block_table, cu_seq_lens, token_to_seq, seq_starts) of context.py's index chain, or why not."""
    bs = node_shape(cache)[1]
    no = "token index not recognised: "
    if not (is_op(slot, aten.remainder.Scalar, aten.remainder.Tensor) and _is_size(slot.args[1], bs)):
        return no + f"{_n(slot)} is not (position % block_size)"
    off = slot.args[0]
    if not (is_op(blk, aten.index.Tensor) and len(blk.args[1]) == 2):
        return no + f"{_n(blk)} is not block_table[request, position // block_size]"
    table, (b, col) = blk.args
    if not (is_op(col, aten.div.Tensor_mode) and col.args[0] is off and _is_size(col.args[1], bs)
            and col.kwargs.get("rounding_mode") == "floor"):
        return no + f"{_n(col)} is not position // block_size of the same position"
    if not (is_op(b, aten.clamp_min.default) and b.args[1] == 0):
        return no + f"request index {_n(b)} is not clamp_min(token_to_seq, 0) (padding tokens)"
    tts = _strip_upcast(b.args[0])
    if not (is_op(off, aten.where.self) and is_op(off.args[0], aten.ge.Scalar) and off.args[0].args[1] == 0
            and _strip_upcast(off.args[0].args[0]) is tts and is_op(off.args[2], aten.full.default)
            and off.args[2].args[1] == 0):
        return no + f"position {_n(off)} is not where(token_to_seq >= 0, ..., 0)"
    raw, starts = off.args[1], None
    if is_op(raw, aten.add.Tensor):
        x, y = raw.args
        if not _unscaled(raw):
            return no + f"{_n(raw)} adds seq_starts[request] times alpha={_n(raw.kwargs['alpha'])}"
        raw, starts = (x, y) if is_op(x, aten.sub.Tensor) else (y, x)
        if not (is_op(starts, aten.index.Tensor) and list(starts.args[1]) == [b]):
            return no + f"{_n(starts)} is not seq_starts[request]"
        starts = _strip_upcast(starts.args[0])
    if not (is_op(raw, aten.sub.Tensor) and _unscaled(raw) and is_op(raw.args[0], prims.iota.default)
            and raw.args[0].kwargs.get("start") == 0 and raw.args[0].kwargs.get("step") == 1
            and is_op(raw.args[1], aten.index.Tensor) and list(raw.args[1].args[1]) == [b]):
        return no + f"{_n(raw)} is not arange(num_tokens) - cu_seq_lens[request]"
    cu, table = _strip_upcast(raw.args[1].args[0]), _strip_upcast(table)
    meta = (table, cu, tts, starts)
    for node, ndim in zip(meta, (2, 1, 1, 1)):
        if node is not None and (_dtype(node) not in INDEX_DTYPES or len(node_shape(node)) != ndim):
            return no + f"{_n(node)} must be a {ndim}-D int32/int64 tensor"
    batch, n = node_shape(table)[0], node_shape(tts)[0]
    for node, want, what in ((cu, batch + 1, "rows + 1"), (starts, batch, "rows")):
        if node is not None and not same_size(node_shape(node)[0], want):
            return (f"{_n(node)} has {_sz(node_shape(node)[0])} entries, not provably block_table's {what} "
                    f"({_sz(want)}), "
                    "which the op requires; torch._check the sizes in the model so the compiler knows them")
    if not (same_size(node_shape(raw.args[0])[0], n) and same_size(node_shape(blk)[0], n)):
        return no + "positions are not one per token_to_seq entry"
    return meta
