"""Pass ``cache_gather``: a paged-cache gather and its dequantize → ``fx_mla::gather_dequant_cache{,_paged}``.

Rewrites (post-grad ATen forms, sizes symbolic; ``views`` = reshape/view/unsqueeze/squeeze nodes, replayed on the
op's output, which has the same row-major element order):
  index(cache, [I]) | index_select(cache, 0, I) → views → convert(dt) → views → [mul(·, s)] → [convert(dt2)]
      cache [num_blocks, bs, D], I [B, M] or [N]     ⇒ gather_dequant_cache_paged(cache, I (unsqueezed to 2-D), s, dt)
      rows [num_rows, D] (e.g. cache.view(-1, D))    ⇒ the same op on rows.unsqueeze(1) (a block size of 1): the
                                                       flattened-slot form ``cache.view(-1, D)[slots]``
  index(cache, [block_table[b, off // bs], off % bs]) → … the same tail, with the metadata chain of
      fx_mla/mla/context.py: b = clamp_min(token_to_seq, 0), off = where(token_to_seq >= 0,
      iota - cu_seq_lens[b] (+ seq_starts[b]), 0)  ⇒ gather_dequant_cache(cache, block_table, cu_seq_lens,
                                                       token_to_seq, seq_starts, s, dt)
  dequant(x)[I] (x fp8, e.g. DCP's all-gathered context rows before their reorder) ⇒ the row form on x
  any of these gathers of uint8 [.., 656] fp8_ds_mla rows → byte slices viewed as e4m3 latent / fp32 group scales /
      bf16 rope → cat(4 × (fp32(latent group k) * scale k).to(dt), rope.to(dt))  ⇒ the op with layout="fp8_ds_mla"
The result is bitwise the unrewritten graph's: the upcast of an fp8 (or any) cache entry is exact, the product
with the scale is one fp32 multiply, and the op rounds once to the output dtype, as ATen does for
``x.to(dt) * s``. Executors that round a 0-dim fp32 scale to bf16/fp16 first (eager CUDA; Inductor with
``emulate_precision_casts``) get the scale rounded the same way in the rewritten graph, where the multiply itself
computes in bf16/fp16 (not for ``(x.float() * s).to(dt)``, whose multiply is fp32 everywhere). Inductor with
``emulate_precision_casts`` on CUDA is the exception: no rule reproduced it bitwise on H100, so that chain is
declined there. Inductor without
``emulate_precision_casts`` does not round bf16 intermediates it fuses: bitwise equality then holds where the
dequantized tensor is materialized (as when it feeds a matmul), not where Inductor would fuse it into later
pointwise ops.
Matches only when: a dtype conversion follows the gather (the anchor; a bare same-dtype gather is already one
copy); every node before the chain's end has no other user except ``sym_size`` (rewired to an equal size); the
scale is a one-element fp32 tensor (or of the conversion's dtype) on the cache's device, else the chain ends
before the multiply (the cast alone is still fused).
Declines (reported): cache dtype or output dtype the op does not cover (int8 / uint8 caches of other row widths
cast to a float included), a cache whose last dim is not contiguous,
fp8 on CUDA below compute capability 8.9, index dtypes other than int32/int64, index patterns not recognised
(more than 2-D block indices, other token index arithmetic such as an add/sub with alpha, indexing another dim),
fp8_ds_mla rows reshaped to another row width than 656 bytes, metadata shapes the op
rejects, a bf16/fp16 multiply by an fp32 scale for Inductor with emulate_precision_casts on CUDA (above), fp8 rows
gathered without a dequantize (e.g. feeding an all-gather after quant_before_gather's mirror
rewrite: the op has no fp8 → fp8 copy), and other users of the gathered fp8 rows.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..ops import gather_dequant_cache as _gdc  # registers the ops
from ..ops._fp8 import FP8_DTYPES, fp8_supported
from ._cache_gather_match import (_NAMER, RESHAPES, VIEWS, Shape, Source, Tail, _ds_mla_tail, _n, _pre_dequant, _short,
                                  _source, _sz, _tail)
from .match import (CONVERT, is_op, node_dtype as _dtype, node_shape, same_shape, same_size, set_val, static_int,
                    tensor_val)

PASS = "cache_gather"
aten = torch.ops.aten
PAGED = torch.ops.fx_mla.gather_dequant_cache_paged.default
TOKEN = torch.ops.fx_mla.gather_dequant_cache.default
FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16) + FP8_DTYPES
# The matchers (the dequantize tail after a gather, the gather's index pattern) live in _cache_gather_match.py.


def run(graph: torch.fx.Graph, ctx: Any) -> None:
    _NAMER[0] = getattr(ctx, "namer", None)
    if _NAMER[0] is not None:
        _NAMER[0].update(graph)  # name earlier passes' nodes now, as the printed graph will
    for gather in [n for n in graph.nodes if is_op(n, aten.index.Tensor, aten.index_select.default)]:
        src = gather.args[0]
        dtype = _dtype(src)
        root, tail = None, None
        if dtype == torch.uint8 and static_int(node_shape(src)[-1]) == _gdc.DS_MLA_ROW_BYTES:
            tail = _ds_mla_tail(gather)
        elif dtype in FLOATS:
            tail = _pre_dequant(gather)
            if tail is not None:  # dequant(x)[I] ⇒ the op on x: e.g. the reorder of DCP's all-gathered fp8 context
                root, tail = tail
            else:
                tail = _tail(gather)
        elif dtype in (torch.int8, torch.uint8):  # a byte cache cast to a float: _guard declines its dtype
            tail = _tail(gather)
            if not (isinstance(tail, Tail) and tail.out_dtype.is_floating_point):
                continue
        if tail is None or isinstance(tail, str):
            if tail is not None and dtype in FP8_DTYPES + (torch.uint8,):
                ctx.declined(PASS, gather, tail)
            continue
        source = _source(gather)
        if root is not None and not isinstance(source, str):
            source, dtype = dataclasses.replace(source, cache=root), _dtype(root)
        reason = source if isinstance(source, str) else _guard(ctx, source, tail)
        if reason:
            ctx.declined(PASS, gather, reason)
            continue
        plan = _plan_sizes(graph, tail, gather, source)
        if isinstance(plan, str):
            ctx.declined(PASS, gather, plan)
            continue
        new = _rewrite(graph, ctx, gather, source, tail, plan)
        what = "token-parallel gather" if source.kind == "token" else ("row gather" if source.rows else "paged gather")
        kind = "fp8_ds_mla (656-byte)" if tail.layout == "fp8_ds_mla" else _short(dtype)
        what += f" of {'dequantized ' if root is not None else 'a '}{kind} {'rows' if root else 'cache'}"
        scale = "" if tail.scale is None else " × scale"
        ctx.matched(PASS, [gather, new] if root is not None else [gather, tail.end, new],
                    f"{what}{scale} → {_short(tail.out_dtype)} fused into {new.target.name()}")

# ---------------------------------------------------------------- guards

def _guard(ctx: Any, source: Source, tail: Tail) -> Optional[str]:
    cache, dtype, ds = source.cache, _dtype(source.cache), tail.layout == "fp8_ds_mla"
    if dtype not in _gdc.CACHE_DTYPES and not ds:
        return (f"cache dtype {_short(dtype)} is not covered by the op (fp8 e4m3/e5m2, bf16, fp16, fp32, or uint8 rows "
                f"of {_gdc.DS_MLA_ROW_BYTES} bytes: fp8_ds_mla)")
    if tail.out_dtype not in _gdc.OUT_DTYPES:
        return f"output dtype {_short(tail.out_dtype)} is not covered by the op (bf16, fp16, fp32)"
    val = tensor_val(cache)
    if not (static_int(val.shape[-1]) == 1 or static_int(val.stride(-1)) == 1):
        strides = ", ".join(_sz(x) for x in val.stride())
        return (f"cache {_n(cache)} is not contiguous in its last dim (strides ({strides})): the op reads rows "
                "with stride 1")
    if ds and not all(statically_known_true(x % 16 == 0) for x in (*val.stride()[:-1], val.storage_offset())):
        return f"fp8_ds_mla cache {_n(cache)} rows are not provably 16-byte aligned (strides, offset): the op needs it"
    for node in (source.index, *source.meta, tail.scale):
        if node is not None and tensor_val(node).device != val.device:
            return f"{_n(node)} is on {tensor_val(node).device}, the cache on {val.device}"
    reason = _emulate_gap(ctx, tail)
    if reason:
        return reason
    if ctx.device.type == "cuda" and (dtype in FP8_DTYPES or ds):
        reason = fp8_supported(torch.float8_e4m3fn if ds else dtype, ctx.capability)
        if reason:
            return f"{reason} (the op's Triton kernel)"
    return None


def _emulate_gap(ctx: Any, tail: Tail) -> Optional[str]:
    """Why not to rewrite a bf16/fp16 multiply by an fp32 scale for Inductor with emulate_precision_casts on CUDA: there
    the rewritten graph was measured not bitwise the unrewritten one (1x H100, torch 2.11: 36 % of the dequantized
    values differ, with the scale rounded to bf16 first or not; RESULTS.md, "Inductor rounding on CUDA"), and no
    rounding rule that reproduces it is known. Diagnostics (EMULATE_SCALE_ROUNDING_OVERRIDE set) still rewrite."""
    inductor = getattr(ctx.options, "inner", "inductor") != "eager"
    if ctx.device.type != "cuda" or not inductor or EMULATE_SCALE_ROUNDING_OVERRIDE is not None:
        return None
    if not _scale_rounded_by_executor(ctx, tail):  # (Inductor: emulation on, an fp32 scale, a bf16/fp16 multiply)
        return None
    return (f"Inductor with emulate_precision_casts on CUDA: its rounding of a {_short(tail.mul_dtype)} multiply by an "
            "fp32 scale is not reproduced bitwise by the op (measured on H100); the gather stays as written")


# Set (to True/False) only by diagnostics (benchmarks/diag_inductor_rounding.py): replaces the rule below for
# Inductor with emulate_precision_casts, to test whether its kernels round a 0-dim fp32 scale to bf16/fp16.
EMULATE_SCALE_ROUNDING_OVERRIDE: Optional[bool] = None


def _scale_rounded_by_executor(ctx: Any, tail: Tail) -> bool:
    """Whether the unrewritten graph's executor rounds a 0-dim fp32 scale to the bf16/fp16 dtype of the multiply
    first (eager CUDA; Inductor with emulate_precision_casts). A multiply in fp32 (``(x.float() * s).to(dt)``)
    uses the scale as it is everywhere."""
    if tail.scale is None or _dtype(tail.scale) != torch.float32:
        return False
    if tail.mul_dtype not in (torch.bfloat16, torch.float16):
        return False
    if getattr(ctx.options, "inner", "inductor") == "eager":
        return ctx.device.type == "cuda" and tensor_val(tail.scale).dim() == 0
    from torch._inductor import config as inductor_config

    if not inductor_config.emulate_precision_casts:
        return False
    if ctx.device.type == "cuda" and EMULATE_SCALE_ROUNDING_OVERRIDE is not None:
        return EMULATE_SCALE_ROUNDING_OVERRIDE
    return True


# ---------------------------------------------------------------- rewrite

def _out_shape(source: Source) -> Shape:
    if source.kind == "token":
        return (node_shape(source.meta[2])[0], node_shape(source.cache)[-1])
    idx, cache = node_shape(source.index), node_shape(source.cache)
    rows, cols = (1, idx[0]) if len(idx) == 1 else idx
    return (rows, cols * (1 if source.rows else cache[1]), cache[-1])


def _plan_sizes(graph, tail: Tail, gather, source: Source) -> Union[list, str]:
    """For each sym_size user of a chain node: an int, ("new", dim) on the op's output, or an existing node."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    plan, out = [], _out_shape(source)
    for user, owner in tail.sizes:
        size = node_shape(owner)[user.args[1]]
        if static_int(size) is not None:
            plan.append((user, static_int(size)))
            continue
        if order[user] > order[tail.end]:
            dims = [d for d, s in enumerate(out) if same_size(s, size)]
            if dims:
                plan.append((user, ("new", dims[0])))
                continue
        found = [n for n in graph.nodes if order[n] < order[user] and n not in (user, *(u for u, _ in tail.sizes))
                 and isinstance(n.meta.get("val"), torch.SymInt) and same_size(n.meta["val"], size)]
        if not found:
            return (f"{_n(user)} = sym_size({_n(owner)}) ({_sz(size)}) is used before the chain ends and no "
                    "equal size is available there")
        plan.append((user, found[0]))
    return plan


def _rewrite(graph, ctx, gather, source: Source, tail: Tail, plan: list) -> torch.fx.Node:
    end = tail.end

    def call(target, *args):
        return set_val(graph.call_function(target, args))

    layout = () if tail.layout == "plain" else (tail.layout,)
    with graph.inserting_before(end):
        scale = tail.scale
        if scale is not None and _dtype(scale) != torch.float32:
            scale = call(CONVERT, scale, torch.float32)  # bf16/fp16 → fp32 is exact
        elif _scale_rounded_by_executor(ctx, tail):
            scale = call(CONVERT, call(CONVERT, scale, tail.mul_dtype), torch.float32)
        if source.kind == "token":
            new = call(TOKEN, source.cache, *source.meta, scale, tail.out_dtype, *layout)
        else:
            cache = call(aten.unsqueeze.default, source.cache, 1) if source.rows else source.cache
            table = source.index if len(node_shape(source.index)) == 2 else call(aten.unsqueeze.default,
                                                                                  source.index, 0)
            new = call(PAGED, cache, table, scale, tail.out_dtype, *layout)
        out = _replay_views(graph, call, new, gather, tail)
    end.replace_all_uses_with(out)
    for user, value in plan:
        if isinstance(value, int):
            for uu in list(user.users):
                uu.args = torch.fx.node.map_arg(uu.args, lambda a: value if a is user else a)
                uu.kwargs = torch.fx.node.map_arg(uu.kwargs, lambda a: value if a is user else a)
        elif isinstance(value, tuple):
            user.args = (new, value[1])
        else:
            user.replace_all_uses_with(value)
    return new


def _replay_views(graph, call, new, gather, tail: Tail) -> torch.fx.Node:
    """``new`` viewed as ``tail.end`` is: the chain's views replayed from the last reshape (row-major order is the
    same), or from a reshape to the gather's shape when the chain has none."""
    views = [n for n in tail.nodes if is_op(n, *VIEWS)]
    starts = [i for i, n in enumerate(views) if is_op(n, *RESHAPES)]
    cur, shape = new, node_shape(new)
    if tail.layout == "fp8_ds_mla":  # the rows' views end in 656 bytes, the output in 576 entries
        if same_shape(shape, node_shape(tail.end)):
            return cur
        if starts:
            return call(aten.reshape.default, cur, [*views[starts[-1]].args[1][:-1], _gdc.DS_MLA_D_OUT])
        return call(aten.reshape.default, cur, [*(_size_arg(graph, call, gather, d) for d in
                                                  range(len(node_shape(gather)) - 1)), _gdc.DS_MLA_D_OUT])
    if starts:
        views = views[starts[-1]:]
        if same_shape(shape, node_shape(views[0])):
            views = views[1:]
    elif not same_shape(shape, node_shape(gather)):
        cur = call(aten.reshape.default, cur, [_size_arg(graph, call, gather, d) for d in
                                               range(len(node_shape(gather)))])
    for v in views:
        cur = call(v.target, cur, *v.args[1:])
    return cur


def _size_arg(graph, call, gather, dim):
    """Size ``dim`` of the gather's result as an int, or a sym_size of the index or the cache that equals it."""
    size = node_shape(gather)[dim]
    if static_int(size) is not None:
        return static_int(size)
    candidates = [gather.args[2] if is_op(gather, aten.index_select.default) else gather.args[1][0], gather.args[0]]
    for node in candidates:
        for d, s in enumerate(node_shape(node)):
            if same_size(s, size):
                return call(aten.sym_size.int, node, d)
    raise AssertionError(f"size {size} of {_n(gather)} not found")  # unreachable: [*I.shape, *cache.shape[1:]]
