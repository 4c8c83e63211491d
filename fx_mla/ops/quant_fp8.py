"""torch.ops.fx_mla.quant_fp8 family: FP8 quantization, saturating, round-to-nearest-even.

Ops (registered on import):
  quant_fp8(Tensor x, Tensor scale, ScalarType fp8_dtype, bool scale_is_reciprocal=False,
            bool approx_division=False) -> Tensor
  quant_fp8_dynamic(Tensor x, ScalarType fp8_dtype) -> (Tensor q, Tensor scale)
  quant_fp8_per_token(Tensor x, ScalarType fp8_dtype) -> (Tensor q, Tensor scales)

Semantics = the plain PyTorch chain, bitwise (NaN stays NaN; its sign/payload bits are not promised):
  quant_fp8:           (x / scale).clamp(-fmax, fmax).to(fp8_dtype)   or  x * scale  when
                       scale_is_reciprocal. The quotient is an IEEE fp32 division (or product) taking
                       torch's promoted dtype result_type(x, scale): a 0-dim scale keeps x.dtype (the
                       fp32 quotient is rounded to bf16/fp16 before the clamp), a 1-element scale with
                       dims promotes to fp32 (no intermediate rounding). fp8 conversion is RNE.
  quant_fp8_dynamic:   scale = fp8_scale_from_amax(x.abs().amax()) (0-dim fp32), then quant_fp8.
  quant_fp8_per_token: scales = fp8_scale_from_amax(x.abs().amax(-1, keepdim=True)), shape
                       x.shape[:-1] + (1,), fp32; q = (x / scales).clamp(..).to(fp8) (fp32 quotient).
Devices disagree on that chain; this op has one semantics, the CPU one (eager and Inductor alike):
- eager CUDA first casts a 0-dim CUDA scale to x.dtype (seen on H200, torch 2.11); to reproduce
  it exactly call quant_fp8(x, scale.to(x.dtype).float(), ...);
- default Inductor on CUDA matches neither (it computes bf16/fp16 in fp32, eliding roundings, and
  Triton's '/' is approximate): 0.04-0.8 % of bytes differ for bf16/fp16 x, 0-4 in 4.7M for fp32.
approx_division=True (static op, division form only) makes the CUDA kernel divide with Triton's plain
fp32 '/' (PTX div.full.f32), the division Inductor's generated CUDA kernels use unless Inductor is told
to round divisions, so a pass can reproduce such a kernel; the CPU implementation divides exactly
either way (Inductor's C++ kernels divide exactly too), so on CPU the flag changes nothing.
The CPU implementation is that chain (the test oracle); the CUDA one launches the Triton kernels of
fx_mla/ops/kernels/quant_fp8.py, reading scales on the device (no host sync: CUDA-graph safe).
"""
from __future__ import annotations

import functools
from typing import Tuple

import torch

from fx_mla.ops._device import on_input_device
from fx_mla.ops._fp8 import (AMAX_FLOOR, FP8_MAX, check_fp8_dtype, check_input_tensor,
                             check_scale_tensor, fp8_scale_from_amax, fp8_supported)

__all__ = ["quant_fp8", "quant_fp8_dynamic", "quant_fp8_per_token", "fp8_scale_from_amax",
           "quant_fp8_reference", "quant_fp8_dynamic_reference", "quant_fp8_per_token_reference"]

# Launch configuration, in one place. These kernels are memory-bound streams: a tile of 4096
# elements over 8 warps gives each thread 16 elements (two 16-byte bf16 loads) in flight.
STATIC_BLOCK = 4096
STATIC_WARPS = 8
AMAX_BLOCK = 8192          # elements reduced by one stage-1 program of the dynamic scale
AMAX_WARPS = 8
FINALIZE_BLOCK = 1024      # partials folded per step by the single stage-2 program
PER_TOKEN_MAX_BLOCK = 4096  # a row longer than this is processed in tiles, read twice
PER_TOKEN_TILE = 8192       # elements of one per-token tile: rows a program = TILE // row block
PER_TOKEN_WARPS = 8


# ---------------------------------------------------------------- validation

def _check_static(x, scale, fp8_dtype):
    check_fp8_dtype(fp8_dtype)
    check_input_tensor(x)
    check_scale_tensor(scale, x)


def _check_dynamic(x, fp8_dtype):
    check_fp8_dtype(fp8_dtype)
    check_input_tensor(x)
    if x.numel() == 0:
        raise ValueError("x must have at least one element to compute a dynamic scale")


def _check_per_token(x, fp8_dtype):
    check_fp8_dtype(fp8_dtype)
    check_input_tensor(x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dim (the token's features), got shape "
                         f"{tuple(x.shape)}")


@functools.lru_cache(maxsize=None)
def _capability(device_index):
    return torch.cuda.get_device_capability(device_index)


def _check_cuda_capability(x, fp8_dtype):
    reason = fp8_supported(fp8_dtype, _capability(x.device.index if x.device.index is not None
                                                  else torch.cuda.current_device()))
    if reason is not None:
        raise RuntimeError(f"quant_fp8 cannot run on {x.device}: {reason}")


# ---------------------------------------------------------------- plain-torch references

def quant_fp8_reference(x, scale, fp8_dtype, scale_is_reciprocal=False):
    fmax = FP8_MAX[fp8_dtype]
    y = x * scale if scale_is_reciprocal else x / scale
    return y.clamp(-fmax, fmax).to(fp8_dtype).contiguous()


def quant_fp8_dynamic_reference(x, fp8_dtype):
    scale = fp8_scale_from_amax(x.abs().amax(), fp8_dtype)
    return quant_fp8_reference(x, scale, fp8_dtype), scale


def quant_fp8_per_token_reference(x, fp8_dtype):
    scales = fp8_scale_from_amax(x.abs().amax(dim=-1, keepdim=True), fp8_dtype)
    return quant_fp8_reference(x, scales, fp8_dtype), scales.contiguous()


# ---------------------------------------------------------------- Triton launchers
# Plain functions of contiguous tensors, so tests can drive them under TRITON_INTERPRET=1 on CPU.

def _tl_fp8(fp8_dtype):
    import triton.language as tl
    return tl.float8e4nv if fp8_dtype == torch.float8_e4m3fn else tl.float8e5


def launch_quant_fp8(x, scale, fp8_dtype, scale_is_reciprocal, out, approx_division=False):
    import triton
    from fx_mla.ops.kernels.quant_fp8 import _quant_fp8_kernel
    n = x.numel()
    if n == 0:
        return out
    # torch's promotion of x / scale: a 0-dim scale keeps x.dtype, a scale with dims gives fp32
    round_to_input = scale.dim() == 0 and x.dtype != torch.float32
    grid = (triton.cdiv(n, STATIC_BLOCK),)
    _quant_fp8_kernel[grid](x, scale, out, n, FMAX=FP8_MAX[fp8_dtype],
                            RECIPROCAL=bool(scale_is_reciprocal), ROUND_TO_INPUT=round_to_input,
                            OUT_DTYPE=_tl_fp8(fp8_dtype), BLOCK=STATIC_BLOCK,
                            APPROX_DIV=bool(approx_division) and not scale_is_reciprocal,
                            num_warps=STATIC_WARPS)
    return out


def launch_dynamic_scale(x, scale_out, fp8_dtype):
    import triton
    from fx_mla.ops.kernels.quant_fp8 import (_quant_fp8_amax_finalize_kernel,
                                              _quant_fp8_amax_partial_kernel)
    n = x.numel()
    n_partials = triton.cdiv(n, AMAX_BLOCK)
    partials = torch.empty(n_partials, dtype=torch.float32, device=x.device)
    _quant_fp8_amax_partial_kernel[(n_partials,)](x, partials, n, BLOCK=AMAX_BLOCK,
                                                  num_warps=AMAX_WARPS)
    _quant_fp8_amax_finalize_kernel[(1,)](partials, n_partials, scale_out, AMAX_FLOOR,
                                          FMAX=FP8_MAX[fp8_dtype], BLOCK=FINALIZE_BLOCK,
                                          num_warps=4)
    return scale_out


def launch_quant_fp8_per_token(x, fp8_dtype, out, scales_out):
    import triton
    from fx_mla.ops.kernels.quant_fp8 import _quant_fp8_per_token_kernel
    n_cols = x.shape[-1]
    n_rows = x.numel() // n_cols
    if n_rows == 0:
        return out, scales_out
    block_n = min(triton.next_power_of_2(n_cols), PER_TOKEN_MAX_BLOCK)
    rows = max(1, PER_TOKEN_TILE // block_n)
    _quant_fp8_per_token_kernel[(triton.cdiv(n_rows, rows),)](
        x, out, scales_out, n_rows, n_cols, AMAX_FLOOR, FMAX=FP8_MAX[fp8_dtype],
        OUT_DTYPE=_tl_fp8(fp8_dtype), ROWS=rows, BLOCK_N=block_n, SINGLE_TILE=block_n >= n_cols,
        num_warps=PER_TOKEN_WARPS)
    return out, scales_out


# ---------------------------------------------------------------- registration
# Low-level torch.library registration (define + per-device impl + fake): the custom_op decorator
# costs about 10 us more host time a call, which dominates small decode-time launches.

_lib = torch.library.Library("fx_mla", "FRAGMENT")
_lib.define("quant_fp8(Tensor x, Tensor scale, ScalarType fp8_dtype, bool scale_is_reciprocal=False,"
            " bool approx_division=False) -> Tensor")
_lib.define("quant_fp8_dynamic(Tensor x, ScalarType fp8_dtype) -> (Tensor, Tensor)")
_lib.define("quant_fp8_per_token(Tensor x, ScalarType fp8_dtype) -> (Tensor, Tensor)")


def _quant_fp8_cpu(x, scale, fp8_dtype, scale_is_reciprocal=False, approx_division=False):
    _check_static(x, scale, fp8_dtype)
    return quant_fp8_reference(x, scale, fp8_dtype, scale_is_reciprocal)


def _quant_fp8_fake(x, scale, fp8_dtype, scale_is_reciprocal=False, approx_division=False):
    _check_static(x, scale, fp8_dtype)
    return x.new_empty(x.shape, dtype=fp8_dtype)


def _quant_fp8_cuda(x, scale, fp8_dtype, scale_is_reciprocal=False, approx_division=False):
    _check_static(x, scale, fp8_dtype)
    _check_cuda_capability(x, fp8_dtype)
    out = torch.empty(x.shape, dtype=fp8_dtype, device=x.device)
    return launch_quant_fp8(x.contiguous(), scale, fp8_dtype, scale_is_reciprocal, out, approx_division)


def _dynamic_cpu(x, fp8_dtype):
    _check_dynamic(x, fp8_dtype)
    return quant_fp8_dynamic_reference(x, fp8_dtype)


def _dynamic_fake(x, fp8_dtype):
    _check_dynamic(x, fp8_dtype)
    return x.new_empty(x.shape, dtype=fp8_dtype), x.new_empty((), dtype=torch.float32)


def _dynamic_cuda(x, fp8_dtype):
    _check_dynamic(x, fp8_dtype)
    _check_cuda_capability(x, fp8_dtype)
    x = x.contiguous()
    scale = torch.empty((), dtype=torch.float32, device=x.device)
    launch_dynamic_scale(x, scale, fp8_dtype)
    out = torch.empty(x.shape, dtype=fp8_dtype, device=x.device)
    return launch_quant_fp8(x, scale, fp8_dtype, False, out), scale


def _per_token_cpu(x, fp8_dtype):
    _check_per_token(x, fp8_dtype)
    return quant_fp8_per_token_reference(x, fp8_dtype)


def _per_token_fake(x, fp8_dtype):
    _check_per_token(x, fp8_dtype)
    return (x.new_empty(x.shape, dtype=fp8_dtype),
            x.new_empty(tuple(x.shape[:-1]) + (1,), dtype=torch.float32))


def _per_token_cuda(x, fp8_dtype):
    _check_per_token(x, fp8_dtype)
    _check_cuda_capability(x, fp8_dtype)
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=fp8_dtype, device=x.device)
    scales = torch.empty(tuple(x.shape[:-1]) + (1,), dtype=torch.float32, device=x.device)
    return launch_quant_fp8_per_token(x, fp8_dtype, out, scales)


for _name, _cpu, _cuda, _fake in (("quant_fp8", _quant_fp8_cpu, _quant_fp8_cuda, _quant_fp8_fake),
                                  ("quant_fp8_dynamic", _dynamic_cpu, _dynamic_cuda, _dynamic_fake),
                                  ("quant_fp8_per_token", _per_token_cpu, _per_token_cuda,
                                   _per_token_fake)):
    _lib.impl(_name, _cpu, "CPU")
    _lib.impl(_name, on_input_device(_cuda), "CUDA")
    torch.library.register_fake(f"fx_mla::{_name}", _fake, lib=_lib)


# ---------------------------------------------------------------- Python entry points

def quant_fp8(x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype,
              scale_is_reciprocal: bool = False, approx_division: bool = False) -> torch.Tensor:
    """Static per-tensor FP8 quantization: (x / scale) or (x * scale), clamped, cast RNE.
    approx_division: on CUDA divide with Triton's fp32 '/' (as Inductor's kernels do); exact on CPU."""
    return torch.ops.fx_mla.quant_fp8(x, scale, fp8_dtype, scale_is_reciprocal, approx_division)


def quant_fp8_dynamic(x: torch.Tensor, fp8_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-tensor FP8 quantization; returns (q, scale), scale a 0-dim fp32 tensor."""
    return torch.ops.fx_mla.quant_fp8_dynamic(x, fp8_dtype)


def quant_fp8_per_token(x: torch.Tensor,
                        fp8_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token FP8 quantization (one scale per row of the last dim); returns (q, scales)."""
    return torch.ops.fx_mla.quant_fp8_per_token(x, fp8_dtype)
