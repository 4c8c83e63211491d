"""Shared FP8 helpers: supported dtypes, their largest finite values, argument checks and the
capability guard. Plain functions only; every op and pass that touches FP8 imports these.

Capability rule (documented here, enforced by `fp8_supported`):
- Triton accepts `tl.float8e4nv` (torch.float8_e4m3fn) only on compute capability >= 8.9
  (its NVIDIA backend adds "fp8e4nv" to the supported FP8 types only from sm_89 on).
- Triton accepts `tl.float8e5` (torch.float8_e5m2) on every NVIDIA arch, but below sm_89 there is
  no hardware fp32 -> fp8 conversion and Triton emulates it through fp16, a double rounding that
  is not guaranteed bitwise equal to torch's direct round-to-nearest-even. Since our ops promise
  bitwise equality with the plain PyTorch chain, both FP8 dtypes require capability >= 8.9.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Largest finite value of each FP8 format (torch.finfo(dtype).max), used for saturation.
FP8_MAX = {dtype: float(torch.finfo(dtype).max) for dtype in FP8_DTYPES}

# Lower bound on the amax of dynamic scales, so an all-zero tensor gets a finite, normal scale.
AMAX_FLOOR = 1e-12

MIN_CAPABILITY = (8, 9)


def fp8_max(fp8_dtype: torch.dtype) -> float:
    check_fp8_dtype(fp8_dtype)
    return FP8_MAX[fp8_dtype]


def check_fp8_dtype(fp8_dtype, arg: str = "fp8_dtype") -> None:
    if fp8_dtype not in FP8_DTYPES:
        raise ValueError(f"{arg} must be torch.float8_e4m3fn or torch.float8_e5m2, got {fp8_dtype}")


def check_input_tensor(x, arg: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(f"{arg} must be bfloat16, float16 or float32, got {x.dtype}")


def check_scale_tensor(scale, x: torch.Tensor, arg: str = "scale") -> None:
    """A per-tensor scale: fp32, exactly one element, on x's device, no more dims than x."""
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(scale).__name__}")
    if scale.dtype != torch.float32:
        raise TypeError(f"{arg} must be float32, got {scale.dtype}")
    if scale.numel() != 1:
        raise ValueError(f"{arg} must have exactly one element, got shape {tuple(scale.shape)}")
    if scale.dim() > x.dim():
        raise ValueError(
            f"{arg} must not have more dims than x (got {scale.dim()} > {x.dim()}): "
            "the output would be broadcast to a different shape than x")
    if scale.device != x.device:
        raise ValueError(f"{arg} must be on x's device {x.device}, got {scale.device}")


def fp8_supported(fp8_dtype: torch.dtype,
                  device_capability: Optional[Sequence[int]]) -> Optional[str]:
    """None when our FP8 kernels can run, else the reason they cannot.

    device_capability: (major, minor) of a CUDA device, or None for CPU (the plain-torch
    reference always runs there).
    """
    if fp8_dtype not in FP8_DTYPES:
        return f"unsupported fp8 dtype {fp8_dtype} (expected float8_e4m3fn or float8_e5m2)"
    if device_capability is None:
        return None
    cap = tuple(int(c) for c in device_capability)[:2]
    if cap < MIN_CAPABILITY:
        name = "e4m3fn" if fp8_dtype == torch.float8_e4m3fn else "e5m2"
        return (f"fp8 {name} needs compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}, "
                f"device has {cap[0]}.{cap[1]}")
    return None


def fp8_scale_from_amax(amax: torch.Tensor, fp8_dtype: torch.dtype,
                        amax_floor: float = AMAX_FLOOR) -> torch.Tensor:
    """Per-tensor (or per-row) scale from an amax: max(amax, floor) / fp8 max, in fp32.

    The same arithmetic as quant_fp8_dynamic / quant_fp8_per_token, so a pass can build the
    exact distributed form: local amax -> all_reduce(MAX) -> this -> quant_fp8(x, scale).
    NaN in amax stays NaN. Division is IEEE fp32 (a 0-dim fp32 tensor divisor, never a
    Python scalar, which CUDA would turn into a multiplication by its reciprocal).
    """
    check_fp8_dtype(fp8_dtype)
    a = amax.to(torch.float32).clamp(min=amax_floor)
    fmax = torch.full((), FP8_MAX[fp8_dtype], dtype=torch.float32, device=a.device)
    return a / fmax
