"""Triton kernels of the quant_fp8 family. Launched from fx_mla/ops/quant_fp8.py.

Bitwise contract with the plain PyTorch chain `(x / s).clamp(-fmax, fmax).to(fp8)`:
- the quotient is an IEEE round-to-nearest fp32 division (`div_rn`), or an fp32 multiplication for
  the reciprocal form; APPROX_DIV selects Triton's plain fp32 `/` instead (PTX `div.full.f32`, up to
  2 ulp off), the division Inductor's generated CUDA kernels use unless told to round;
- when torch's type promotion keeps the quotient in x's dtype (0-dim scale), it is rounded to
  that dtype (RNE) before the clamp, exactly as eager does;
- the clamp keeps NaN (PTX min/max return the non-NaN operand, torch.clamp returns NaN);
- the final fp32 -> fp8 conversion is explicit round-to-nearest-even. The clamped value is
  finite and within +-fmax, so the hardware's saturating conversion never saturates.
"""
import triton
import triton.language as tl


@triton.jit
def _nan_max(a, b):
    # torch.amax propagates NaN; a plain max would drop it.
    return tl.where(a != a, a, tl.where(b != b, b, tl.maximum(a, b)))


@triton.jit
def _scaled_clamped_fp8(x, s, FMAX: tl.constexpr, RECIPROCAL: tl.constexpr,
                        ROUND_TO_INPUT: tl.constexpr, OUT_DTYPE: tl.constexpr,
                        APPROX_DIV: tl.constexpr = False):
    """x (any float dtype, upcast here) divided (or multiplied) by s, clamped, converted to fp8."""
    xf = x.to(tl.float32)
    if RECIPROCAL:
        y = xf * s
    elif APPROX_DIV:
        y = xf / s
    else:
        y = tl.math.div_rn(xf, s)
    if ROUND_TO_INPUT:
        # eager rounds the quotient to x.dtype before the clamp (bf16/fp16 tensor by 0-dim scale)
        y = y.to(x.dtype, fp_downcast_rounding="rtne").to(tl.float32)
    y = tl.where(y != y, y, tl.minimum(tl.maximum(y, -FMAX), FMAX))
    return y.to(OUT_DTYPE, fp_downcast_rounding="rtne")


@triton.jit
def _quant_fp8_kernel(x_ptr, scale_ptr, out_ptr, n_elements,
                      FMAX: tl.constexpr, RECIPROCAL: tl.constexpr, ROUND_TO_INPUT: tl.constexpr,
                      OUT_DTYPE: tl.constexpr, BLOCK: tl.constexpr, APPROX_DIV: tl.constexpr = False):
    """Static per-tensor scale: one program per BLOCK contiguous elements (1-D grid)."""
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: tensors may exceed 2**31 elements
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    s = tl.load(scale_ptr)  # read on device: no host sync, CUDA-graph capturable
    q = _scaled_clamped_fp8(x, s, FMAX, RECIPROCAL, ROUND_TO_INPUT, OUT_DTYPE, APPROX_DIV)
    tl.store(out_ptr + offs, q, mask=mask)


@triton.jit
def _quant_fp8_amax_partial_kernel(x_ptr, partial_ptr, n_elements, BLOCK: tl.constexpr):
    """Dynamic scale, stage 1: amax(|x|) of each BLOCK, one fp32 partial a program (no atomics)."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n_elements, other=0.0)
    a = tl.reduce(tl.abs(x.to(tl.float32)), 0, _nan_max)
    tl.store(partial_ptr + pid, a)


@triton.jit
def _quant_fp8_amax_finalize_kernel(partial_ptr, n_partials, scale_ptr, amax_floor,
                                    FMAX: tl.constexpr, BLOCK: tl.constexpr):
    """Dynamic scale, stage 2 (one program): scale = max(amax, floor) / FMAX."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_partials, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        p = tl.load(partial_ptr + offs, mask=offs < n_partials, other=0.0)
        acc = _nan_max(acc, p)
    amax = tl.reduce(acc, 0, _nan_max)
    amax = _nan_max(amax, amax_floor)
    tl.store(scale_ptr, tl.math.div_rn(amax, FMAX))


@triton.jit
def _quant_fp8_per_token_kernel(x_ptr, out_ptr, scale_ptr, n_rows, n_cols, amax_floor,
                                FMAX: tl.constexpr, OUT_DTYPE: tl.constexpr, ROWS: tl.constexpr,
                                BLOCK_N: tl.constexpr, SINGLE_TILE: tl.constexpr):
    """Per-token scale: ROWS rows per program; scale[row] = max(amax(|row|), floor) / FMAX.
    Several rows a program, so a short row (576 values) is not one tiny program each."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    base = rows[:, None] * n_cols
    cols = tl.arange(0, BLOCK_N)[None, :]
    if SINGLE_TILE:
        # the whole row fits one tile: keep it in registers between amax and quantization
        mask = row_mask[:, None] & (cols < n_cols)
        x = tl.load(x_ptr + base + cols, mask=mask, other=0.0)
        amax = tl.reduce(tl.abs(x.to(tl.float32)), 1, _nan_max)
        s = tl.math.div_rn(_nan_max(amax, amax_floor), FMAX)
        s_tile = tl.broadcast_to(s[:, None], (ROWS, BLOCK_N))
        q = _scaled_clamped_fp8(x, s_tile, FMAX, False, False, OUT_DTYPE)
        tl.store(out_ptr + base + cols, q, mask=mask)
    else:
        acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            mask = row_mask[:, None] & (start + cols < n_cols)
            x = tl.load(x_ptr + base + start + cols, mask=mask, other=0.0)
            acc = _nan_max(acc, tl.abs(x.to(tl.float32)))
        amax = tl.reduce(acc, 1, _nan_max)
        s = tl.math.div_rn(_nan_max(amax, amax_floor), FMAX)
        s_tile = tl.broadcast_to(s[:, None], (ROWS, BLOCK_N))
        for start in range(0, n_cols, BLOCK_N):
            mask = row_mask[:, None] & (start + cols < n_cols)
            x = tl.load(x_ptr + base + start + cols, mask=mask, other=0.0)
            q = _scaled_clamped_fp8(x, s_tile, FMAX, False, False, OUT_DTYPE)
            tl.store(out_ptr + base + start + cols, q, mask=mask)
    tl.store(scale_ptr + rows, s, mask=row_mask)
