"""Guards for fx_mla's passes: each returns None when the rewrite may fire, else a reason string for the report.

Guards look only at the target device (``ctx``) and at dtypes/shapes in ``node.meta["val"]``, never at the rank
or at tensor values, so every rank makes the same decision. Combine them with :func:`first_reason`.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import torch

from .match import node_dtype, node_shape, static_int

FP8_MIN_CAPABILITY = (8, 9)  # tl.float8e4nv (e4m3fn) in Triton needs sm_89 or newer


def first_reason(*reasons: Optional[str]) -> Optional[str]:
    """The first non-None reason (guards are evaluated eagerly; pass them in the order to report)."""
    return next((r for r in reasons if r), None)


def require_cuda(ctx: Any) -> Optional[str]:
    if ctx.device.type != "cuda":
        return f"needs a CUDA device; the graph runs on {ctx.device.type}"
    return None


def require_capability(ctx: Any, minimum: Sequence[int] = FP8_MIN_CAPABILITY, why: str = "FP8 Triton kernels"
                       ) -> Optional[str]:
    """CUDA with compute capability ≥ ``minimum`` (default 8.9, the first with e4m3 in Triton)."""
    reason = require_cuda(ctx)
    if reason:
        return f"{reason} ({why})"
    if ctx.capability is None or tuple(ctx.capability) < tuple(minimum):
        have = "unknown" if ctx.capability is None else f"{ctx.capability[0]}.{ctx.capability[1]}"
        return f"{why} need compute capability >= {minimum[0]}.{minimum[1]}, the device has {have}"
    return None


def require_dtype(node: torch.fx.Node, allowed: Iterable[torch.dtype], what: str) -> Optional[str]:
    allowed = tuple(allowed)
    dtype = node_dtype(node)
    if dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        return f"{what} has dtype {str(dtype).removeprefix('torch.')}, expected one of {names}"
    return None


def require_ndim(node: torch.fx.Node, ndim: int, what: str) -> Optional[str]:
    shape = node_shape(node)
    if shape is None or len(shape) != ndim:
        return f"{what} must have {ndim} dims, has shape {shape}"
    return None


def require_static_dim(node: torch.fx.Node, dim: int, what: str,
                       allowed: Optional[Iterable[int]] = None) -> Optional[str]:
    """Dimension ``dim`` of ``node`` is a static size (and one of ``allowed`` when given)."""
    shape = node_shape(node)
    if shape is None or not -len(shape) <= dim < len(shape):
        return f"{what} has no dim {dim} (shape {shape})"
    size = static_int(shape[dim])
    if size is None:
        return f"{what} dim {dim} is symbolic ({shape[dim]}); the rewrite needs a static size"
    if allowed is not None:
        allowed = tuple(allowed)
        if size not in allowed:
            return f"{what} dim {dim} is {size}, supported: {', '.join(map(str, allowed))}"
    return None


def require_same_device(nodes: Iterable[torch.fx.Node], ctx: Any, what: str) -> Optional[str]:
    for node in nodes:
        t = node.meta.get("val")
        if isinstance(t, torch.Tensor) and t.device.type != ctx.device.type:
            return f"{what} is on {t.device.type}, the graph targets {ctx.device.type}"
    return None


__all__ = ["first_reason", "require_cuda", "require_capability", "require_dtype", "require_ndim",
           "require_static_dim", "require_same_device", "FP8_MIN_CAPABILITY"]
