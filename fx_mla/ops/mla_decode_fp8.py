"""torch.ops.fx_mla.mla_decode_fp8: fused MLA decode attention over a paged (FP8) latent cache.

Schema (registered on import):
  mla_decode_fp8(Tensor q, Tensor kv_cache, Tensor block_table, Tensor seq_lens, Tensor k_scale,
                 Tensor? q_scale, float sm_scale, int kv_lora_rank, ScalarType out_dtype) -> (Tensor, Tensor)

Semantics = fx_mla.mla.decode.paged_decode_attention computed in fp32 (cache slots past a length ignored):
  q [B, H, D] bf16/fp16 (q_scale None), or fp8 e4m3/e5m2 whose values are q * q_scale (fp32, one element);
  kv_cache [num_blocks, block_size, D] fp8 e4m3/e5m2 (values kv * k_scale) or q's dtype (k_scale ignored);
  block_table [B, max_blocks] int32; seq_lens [B] int32/int64, tokens 0..seq_lens[b]-1 of the request's pages.
  score = q . kv * sm_scale; lse [B, H] fp32 = logsumexp (natural log); out [B, H, L] (out_dtype) =
  softmax @ kv[..., :L] with L = kv_lora_rank. seq_lens[b] = 0 gives lse = -inf and out = 0. With DCP these
  are the rank's local lengths, and (out, lse) is what merge_dcp_partials consumes.

The CPU implementation is that reference (the test oracle; it also checks block ids and lengths). The CUDA
implementation launches the first kernel that supports the inputs (cuda_kernel_choice, FX_MLA_DECODE_KERNEL): the
Gluon sm_90 kernels (mla_decode_seesaw / mla_decode_gluon for 64-head groups, mla_decode_gluon16 for 16 heads), else
the split-K Triton kernels of fx_mla/ops/kernels/mla_decode_fp8.py (and _tc.py); all write the same (out, lse) and
share the split workspace and combine kernel: no host sync, workspace sized from static bounds (B, H,
max_blocks * block_size, SM count), so the op is CUDA-graph capturable. It does not read seq_lens or block_table on
the host; the kernels clamp them instead (never read out of bounds). Shapes that leave no token to attend to (B = 0,
no cache block, no table column) give out = 0 and lse = -inf without a kernel.
"""
from __future__ import annotations

import importlib
import math
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fx_mla.mla.decode import gather_pages
from fx_mla.mla.validate import check_block_ids
from fx_mla.ops._decode_launch import (Q_SHIFT, _expect, check_capacity, check_launch_args, check_num_splits,
                                       combine_splits, device_index, fill_empty, max_shared, no_tokens,
                                       num_splits_for, sm_count, split_workspace)
from fx_mla.ops._fp8 import FP8_DTYPES, fp8_supported
from fx_mla.ops.kernels.mla_decode_fp8 import _mla_decode_fp8_kernel
from fx_mla.ops.kernels.mla_decode_fp8_tc import _mla_decode_narrow_kernel, _mla_decode_wide_kernel

__all__ = ["mla_decode_fp8", "mla_decode_fp8_reference", "launch_mla_decode_fp8", "kernel_unsupported_reason",
           "DecodeConfig", "choose_config"]

QUERY_DTYPES = (torch.bfloat16, torch.float16) + FP8_DTYPES
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_LATENT = 512    # BLOCK_L above 512 would not fit the fp32 accumulator of a head group in registers
MAX_ROPE = 256
TC_CHUNK = 128     # latent entries a chunk in the tensor-core kernels (L <= 4 chunks)


# ---------------------------------------------------------------- launch configuration (the one place)

class DecodeConfig(tuple):
    """(block_h, block_n, num_warps, num_stages, occupancy, prefetch, kind): heads per program, tokens per tile,
    warps, Triton's software-pipelining depth, programs per SM the split count aims for, whether the "base"
    kernel double-buffers cache tiles in registers itself (for the mma.sync configs Triton does not pipeline),
    and which split-K kernel runs: "base" (_mla_decode_fp8_kernel), "wide" or "narrow" (the tensor-core layouts
    of fx_mla/ops/kernels/mla_decode_fp8_tc.py)."""
    __slots__ = ()

    def __new__(cls, block_h, block_n, num_warps, num_stages, occupancy, prefetch=False, kind="base"):
        if kind not in ("base", "wide", "narrow"):
            raise ValueError(f"DecodeConfig kind must be 'base', 'wide' or 'narrow', got {kind!r}")
        return super().__new__(cls, (block_h, block_n, num_warps, num_stages, occupancy, bool(prefetch), kind))

    block_h = property(lambda self: self[0])
    block_n = property(lambda self: self[1])
    num_warps = property(lambda self: self[2])
    num_stages = property(lambda self: self[3])
    occupancy = property(lambda self: self[4])
    prefetch = property(lambda self: self[5])
    kind = property(lambda self: self[6])


def choose_config(num_heads: int, fp8_dot: bool = False, max_shared: Optional[int] = None) -> DecodeConfig:
    """The launch configuration; measured on an H200 (benchmarks/RESULTS.md, sweep in results/decode.json).

    fp8_dot: FP8 query times an FP8 cache of the same dtype; max_shared: the device's shared memory a block
    may opt into (None: assume Hopper's 227 KiB). The small-shared-memory fallbacks are untested on GPUs.
    """
    small_smem = max_shared is not None and max_shared < 227 * 1024
    # Up to 16 heads (DeepSeek-V2-Lite, or V3 under TP 8): one program holds every head, padded to the
    # 16-row MMA minimum, so each cache tile is read once per request and split. mma.sync keeps the 16 x 576
    # query operand in every warp's registers; 8 warps fit it with the 16 x 512 fp32 accumulator in 255
    # registers (no spills). Triton does not pipeline these loads, so the kernel prefetches (H200, 32 x 16 x
    # 16384: 264 us with prefetch, 285 us with Triton's 2-stage setting that leaves the load synchronous).
    if num_heads <= 16:
        return DecodeConfig(16, 32 if small_smem else 64, 8, 1, 1, prefetch=True)
    # More heads: 64-head groups (the Hopper warpgroup MMA height). A 64 x 512 fp32 accumulator takes 128
    # registers a thread over 8 warps; 128 heads would need the whole register file, so the groups of one
    # tile are adjacent programs (grid axis 0) and the second reads the tile from L2, not DRAM. 128-token
    # tiles (221 KiB of shared memory, no cp.async staging) beat 64-token tiles with 2 stages (H200,
    # 1 x 128 x 65536: 103 vs 117 us); the FP8-query form needs 236 KiB at 128 tokens (Triton 3.9), too much.
    if small_smem:
        return DecodeConfig(32, 32, 8, 1, 1, prefetch=True)
    if fp8_dot:
        return DecodeConfig(64, 64, 8, 2, 1)
    return DecodeConfig(64, 128, 8, 1, 1)


def kernel_unsupported_reason(q_dtype: torch.dtype, cache_dtype: torch.dtype, head_dim: int, kv_lora_rank: int,
                              capability=None) -> Optional[str]:
    """None when the Triton kernel covers these inputs, else why not (for guards of the FX pass)."""
    if q_dtype not in QUERY_DTYPES:
        return f"query dtype {q_dtype} is not bf16, fp16, float8_e4m3fn or float8_e5m2"
    if cache_dtype not in FP8_DTYPES and q_dtype not in FP8_DTYPES and cache_dtype != q_dtype:
        return f"a {cache_dtype} cache needs a query of the same dtype, got {q_dtype}"
    if cache_dtype not in FP8_DTYPES + (torch.bfloat16, torch.float16):
        return f"cache dtype {cache_dtype} is not fp8, bf16 or fp16"
    if not 0 < kv_lora_rank <= min(head_dim, MAX_LATENT):
        return f"kv_lora_rank {kv_lora_rank} must be in [1, min(head dim {head_dim}, {MAX_LATENT})]"
    if head_dim - kv_lora_rank > MAX_ROPE:
        return f"rope width {head_dim - kv_lora_rank} (head dim - kv_lora_rank) is over {MAX_ROPE}"
    if capability is not None:
        for dt in (q_dtype, cache_dtype):
            if dt in FP8_DTYPES:
                reason = fp8_supported(dt, capability)
                if reason is not None:
                    return reason
    return None


# ---------------------------------------------------------------- validation (CPU, CUDA and fake)

def _check_args(q, kv_cache, block_table, seq_lens, k_scale, q_scale, sm_scale, kv_lora_rank, out_dtype) -> None:
    named = (("q", q), ("kv_cache", kv_cache), ("block_table", block_table), ("seq_lens", seq_lens),
             ("k_scale", k_scale))
    for name, t in named:
        _expect(isinstance(t, torch.Tensor), TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _expect(q.dtype in QUERY_DTYPES, TypeError, f"q must be bf16, fp16, float8_e4m3fn or float8_e5m2, got {q.dtype}")
    _expect(q.dim() == 3, ValueError, f"q must be [B, H, D], got shape {tuple(q.shape)}")
    _expect(kv_cache.dim() == 3, ValueError, f"kv_cache must be [num_blocks, block_size, D], got shape "
                                             f"{tuple(kv_cache.shape)}")
    cache_fp8 = kv_cache.dtype in FP8_DTYPES
    _expect(cache_fp8 or kv_cache.dtype in (torch.bfloat16, torch.float16), TypeError,
            f"kv_cache must be float8_e4m3fn, float8_e5m2, bf16 or fp16, got {kv_cache.dtype}")
    _expect(cache_fp8 or q.dtype in FP8_DTYPES or kv_cache.dtype == q.dtype, TypeError,
            f"a {kv_cache.dtype} kv_cache needs q of the same dtype, got q {q.dtype}")
    batch, _, head_dim = q.shape
    _expect(kv_cache.shape[2] == head_dim, ValueError,
            f"kv_cache's last dim ({kv_cache.shape[2]}) must equal q's head dim D ({head_dim})")
    _expect(kv_cache.shape[1] > 0, ValueError, "kv_cache's block_size (dim 1) must be positive")
    _expect(kv_cache.stride(2) == 1 or head_dim <= 1, ValueError,
            f"kv_cache must be contiguous in its last dim (D), got strides {tuple(kv_cache.stride())}")
    _expect(isinstance(kv_lora_rank, int) and 0 < kv_lora_rank <= head_dim, ValueError,
            f"kv_lora_rank must be an int in [1, D={head_dim}], got {kv_lora_rank!r}")
    _expect(block_table.dtype == torch.int32, TypeError, f"block_table must be int32, got {block_table.dtype}")
    _expect(block_table.dim() == 2 and block_table.shape[0] == batch, ValueError,
            f"block_table must be [B={batch}, max_blocks], got shape {tuple(block_table.shape)}")
    _expect(seq_lens.dtype in (torch.int32, torch.int64), TypeError,
            f"seq_lens must be int32 or int64, got {seq_lens.dtype}")
    _expect(seq_lens.dim() == 1 and seq_lens.shape[0] == batch, ValueError,
            f"seq_lens must be [B={batch}], got shape {tuple(seq_lens.shape)}")
    _expect(k_scale.dtype == torch.float32 and k_scale.numel() == 1, TypeError,
            f"k_scale must be a one-element float32 tensor, got {k_scale.dtype} of shape {tuple(k_scale.shape)}")
    if q.dtype in FP8_DTYPES:
        _expect(isinstance(q_scale, torch.Tensor), TypeError, f"q_scale (a one-element float32 tensor) is "
                                                              f"required with an fp8 query ({q.dtype})")
        _expect(q_scale.dtype == torch.float32 and q_scale.numel() == 1, TypeError,
                f"q_scale must be a one-element float32 tensor, got {q_scale.dtype} of shape {tuple(q_scale.shape)}")
        named += (("q_scale", q_scale),)
    else:
        _expect(q_scale is None, ValueError, f"q_scale must be None with a {q.dtype} query (it scales fp8 queries)")
    _expect(out_dtype in OUT_DTYPES, TypeError, f"out_dtype must be bf16, fp16 or fp32, got {out_dtype}")
    _expect(isinstance(sm_scale, (float, int)), TypeError, f"sm_scale must be a float, got {type(sm_scale).__name__}")
    _expect(math.isfinite(sm_scale), ValueError, f"sm_scale must be finite, got {sm_scale}")
    for name, t in named[1:]:
        _expect(t.device == q.device, ValueError, f"{name} must be on q's device {q.device}, got {t.device}")


def _empty_outputs(q, kv_lora_rank, out_dtype):
    batch, heads, _ = q.shape
    out = torch.empty(batch, heads, kv_lora_rank, dtype=out_dtype, device=q.device)
    lse = torch.empty(batch, heads, dtype=torch.float32, device=q.device)
    return out, lse


# ---------------------------------------------------------------- the plain-torch reference (CPU impl)

def mla_decode_fp8_reference(q, kv_cache, block_table, seq_lens, k_scale, q_scale, sm_scale, kv_lora_rank,
                             out_dtype):
    """paged_decode_attention's math in fp32 (dequantized cache, scores, probabilities times V), the fp8
    query's scale applied first; cache slots past each length are zeroed so garbage there (even NaN) is
    ignored, as the kernel's masked loads ignore it. Shapes with no token to attend to give out = 0, lse = -inf (as
    the launchers do); the one-element scales act as 0-dim ones whatever their shape (as in the kernels)."""
    if no_tokens(q, kv_cache, block_table):  # also: gather_pages cannot view an empty batch as [0, -1, D]
        return fill_empty(*_empty_outputs(q, kv_lora_rank, out_dtype))
    k_scale = k_scale.reshape(())  # a [1, 1, 1, 1] scale would broadcast the outputs to 4 dims
    qf = q.float() * q_scale.reshape(()) if q.dtype in FP8_DTYPES else q.float()
    # a strided table (eager accepts one) gathers pages in its own layout: made contiguous for gather_pages' view
    kv = gather_pages(kv_cache, block_table.contiguous(), torch.float32, k_scale)
    valid = torch.arange(kv.shape[1], device=q.device)[None, :] < seq_lens[:, None]
    kv = kv.masked_fill(~valid[..., None], 0.0)
    scores = torch.matmul(qf, kv.transpose(1, 2)) * sm_scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    out = torch.matmul(probs, kv[..., :kv_lora_rank])
    return out.to(out_dtype).contiguous(), lse.contiguous()


def _check_data(kv_cache, block_table, seq_lens) -> None:
    """Index checks that read tensors (CPU path only: on CUDA they would sync the host)."""
    check_block_ids(block_table, kv_cache.shape[0])
    capacity = block_table.shape[1] * kv_cache.shape[1]
    for b, s in enumerate(seq_lens.tolist()):
        _expect(0 <= s <= capacity, ValueError,
                f"seq_lens[{b}] = {s} must be in [0, {capacity}] (max_blocks * block_size of block_table)")


# ---------------------------------------------------------------- the Triton launcher

# Shared with the Gluon launchers (fx_mla/ops/_decode_launch.py); the old private names stay for benchmarks / tests.
_sm_count, _num_splits = sm_count, num_splits_for


def launch_mla_decode_fp8(q, kv_cache, block_table, seq_lens, k_scale, q_scale, sm_scale, kv_lora_rank, out_dtype,
                          config: Optional[DecodeConfig] = None, num_splits: Optional[int] = None,
                          num_sms: Optional[int] = None, out: Optional[torch.Tensor] = None,
                          lse: Optional[torch.Tensor] = None, poison_workspace: bool = False,
                          checked: bool = False):
    """Run the Triton kernels (any device Triton runs on, CPU tensors under TRITON_INTERPRET=1).

    config / num_splits / num_sms override the choices of choose_config / _num_splits (benchmarks, tests);
    out / lse are optional preallocated outputs and poison_workspace fills the split workspace with NaN
    (tests: every element the kernels read must have been written).
    checked: the caller (torch.ops.fx_mla.mla_decode_fp8) validated the arguments; a direct call has them checked
    here (shapes, dtypes and devices only: no host sync), out / lse included, so that no kernel indexes past them.
    """
    if not checked:
        _check_args(q, kv_cache, block_table, seq_lens, k_scale, q_scale, sm_scale, kv_lora_rank, out_dtype)
        if out is not None or lse is not None:
            check_launch_args(q, kv_cache, kv_lora_rank, out, lse, block_table, seq_lens, k_scale, q_scale,
                              "the Triton kernel")
    batch, heads, head_dim = q.shape
    rope = head_dim - kv_lora_rank
    reason = kernel_unsupported_reason(q.dtype, kv_cache.dtype, head_dim, kv_lora_rank)
    if reason is not None:
        raise ValueError(f"mla_decode_fp8's Triton kernel does not cover these inputs: {reason}")
    _expect(kv_cache.stride(2) == 1, ValueError, "kv_cache must be contiguous in its last dim (D)")
    if q.stride(2) != 1:
        q = q.contiguous()
    if block_table.stride(1) != 1:
        block_table = block_table.contiguous()
    seq_lens = seq_lens.contiguous()
    cache_fp8 = kv_cache.dtype in FP8_DTYPES
    q_fp8 = q.dtype in FP8_DTYPES
    fp8_dot = q_fp8 and q.dtype == kv_cache.dtype
    cfg = config or choose_config(heads, fp8_dot, max_shared(q.device) if q.is_cuda else None)
    _expect(not (cfg.kind == "wide" and fp8_dot), ValueError,
            "config kind 'wide' does not take an FP8 query over an FP8 cache (its FP8 x FP8 form faulted on an H100 "
            "and is not validated); use kind 'base' or 'narrow'")
    check_capacity(kv_cache, block_table)
    page = kv_cache.shape[1]
    max_blocks = block_table.shape[1]
    if out is None or lse is None:
        out, lse = _empty_outputs(q, kv_lora_rank, out_dtype)
    if no_tokens(q, kv_cache, block_table):
        return fill_empty(out, lse)
    groups = triton.cdiv(heads, cfg.block_h)
    if num_sms is None:
        num_sms = sm_count(device_index(q.device)) if q.is_cuda else 8
    splits = num_splits_for(batch, groups, max_blocks * page, cfg.block_n, num_sms, cfg.occupancy) \
        if num_splits is None else num_splits
    check_num_splits(splits)
    torch_compute = torch.float16 if cache_fp8 or kv_cache.dtype == torch.float16 else torch.bfloat16
    compute = tl_dtype(torch_compute)
    q_shift = Q_SHIFT if (cache_fp8 and q.dtype == torch.bfloat16) else 0
    if (cfg.block_h >= 64 or cfg.kind != "base") and not fp8_dot and q.dtype != torch_compute:
        # Warpgroup-MMA configs: hand the kernel a query already in the MMA dtype (see the kernel's comment).
        q = ((q.float() * 2.0 ** -q_shift).to(torch_compute) if q_shift else q.to(torch_compute))
    block_l = max(32, triton.next_power_of_2(kv_lora_rank))  # 32: the K step of an FP8 MMA
    block_r = max(32, triton.next_power_of_2(rope)) if rope > 0 else 32
    part_o, part_lse = split_workspace(q, splits, kv_lora_rank, out, lse, poison_workspace)
    q_scale_arg = q_scale if q_scale is not None else k_scale
    common = (q, kv_cache, block_table, seq_lens, k_scale, q_scale_arg, out, lse, part_o, part_lse,
              float(sm_scale), heads, splits, kv_cache.shape[0], max_blocks,
              q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), block_table.stride(0),
              out.stride(0), out.stride(1))
    flags = dict(PAGE=page, L=kv_lora_rank, R=rope, BLOCK_R=block_r, BLOCK_H=cfg.block_h, BLOCK_N=cfg.block_n,
                 COMPUTE=compute, KV_FP8=cache_fp8, Q_FP8=q_fp8, FP8_DOT=fp8_dot, Q_SHIFT=q_shift,
                 SINGLE_SPLIT=splits == 1, UPCAST=_interpreting() and compute == tl.bfloat16,
                 num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.kind == "base":
        kernel = _mla_decode_fp8_kernel[(groups, splits, batch)](*common, BLOCK_L=block_l, PREFETCH=cfg.prefetch,
                                                                 **flags)
    else:
        tc_kernel = _mla_decode_wide_kernel if cfg.kind == "wide" else _mla_decode_narrow_kernel
        kernel = tc_kernel[(groups, splits, batch)](*common, BC=TC_CHUNK, NCH=triton.cdiv(kv_lora_rank, TC_CHUNK),
                                                   **flags)
    launch_mla_decode_fp8.last_kernel = kernel  # benchmarks read its register / spill counts
    combine_splits(part_o, part_lse, out, lse, splits, kv_lora_rank)
    return out, lse


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tl_dtype(dtype: torch.dtype):
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


# ---------------------------------------------------------------- torch.library registration

SCHEMA = ("(Tensor q, Tensor kv_cache, Tensor block_table, Tensor seq_lens, Tensor k_scale, Tensor? q_scale, "
          "float sm_scale, int kv_lora_rank, ScalarType out_dtype) -> (Tensor, Tensor)")


@torch.library.custom_op("fx_mla::mla_decode_fp8", mutates_args=(), schema=SCHEMA)
def mla_decode_fp8(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                   k_scale: torch.Tensor, q_scale: Optional[torch.Tensor], sm_scale: float, kv_lora_rank: int,
                   out_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """CPU (and any non-CUDA device): the fp32 plain-torch reference, after the data checks."""
    _check_args(q, kv_cache, block_table, seq_lens, k_scale, q_scale, sm_scale, kv_lora_rank, out_dtype)
    _check_data(kv_cache, block_table, seq_lens)
    return mla_decode_fp8_reference(q, kv_cache, block_table, seq_lens, k_scale, q_scale, sm_scale, kv_lora_rank,
                                    out_dtype)


@mla_decode_fp8.register_fake
def _(q, kv_cache, block_table, seq_lens, k_scale, q_scale, sm_scale, kv_lora_rank, out_dtype):
    _check_args(q, kv_cache, block_table, seq_lens, k_scale, q_scale, sm_scale, kv_lora_rank, out_dtype)
    return _empty_outputs(q, kv_lora_rank, out_dtype)


@mla_decode_fp8.register_kernel("cuda")
def _mla_decode_fp8_cuda(q, kv_cache, block_table, seq_lens, k_scale, q_scale, sm_scale, kv_lora_rank, out_dtype):
    _check_args(q, kv_cache, block_table, seq_lens, k_scale, q_scale, sm_scale, kv_lora_rank, out_dtype)
    check_capacity(kv_cache, block_table)
    cap = torch.cuda.get_device_capability(q.device)
    reason = kernel_unsupported_reason(q.dtype, kv_cache.dtype, q.shape[2], kv_lora_rank, cap)
    if reason is not None:
        raise RuntimeError(f"mla_decode_fp8 cannot run on {q.device}: {reason}")
    if no_tokens(q, kv_cache, block_table):
        return fill_empty(*_empty_outputs(q, kv_lora_rank, out_dtype))
    # A Python custom op gets no device guard from the dispatcher, and Triton launches on the current device:
    # inputs on another GPU than the current one must switch to theirs.
    with torch.cuda.device(q.device):
        choice = cuda_kernel_choice(q, kv_cache, kv_lora_rank)
        if choice == "triton":
            return launch_mla_decode_fp8(q, kv_cache, block_table, seq_lens, k_scale, q_scale, sm_scale, kv_lora_rank,
                                         out_dtype, checked=True)
        name = {"seesaw": "mla_decode_seesaw", "gluon": "mla_decode_gluon", "gluon16": "mla_decode_gluon16"}[choice]
        launch = getattr(importlib.import_module(f"fx_mla.ops.{name}"), f"launch_{name}")
        # checked: _check_args above and cuda_kernel_choice's support check cover the launcher's own checks
        return launch(q, kv_cache, block_table, seq_lens, k_scale, q_scale, sm_scale, kv_lora_rank,
                      *_empty_outputs(q, kv_lora_rank, out_dtype), checked=True)


# Which CUDA kernel the op runs: "auto" (a Gluon sm_90 kernel where its support check allows it, else the Triton
# kernels), "triton", or "gluon" (an error where no Gluon kernel supports the inputs). The Gluon kernels, first
# supported wins: fx_mla/ops/mla_decode_seesaw.py (64-head groups: its VARIANT, by default the scorer kernel of
# kernels/mla_decode_scorer.py; the seesaw kernel and its producer form on request), mla_decode_gluon.py (64-head
# groups) and mla_decode_gluon16.py (16 heads); on 1x H100 the seesaw kernel ran 1.3-1.5x and gluon16 1.46-1.48x
# faster than the Triton kernels, the scorer 10-17 % faster than the seesaw kernel (benchmarks/RESULTS.md). Set by
# FX_MLA_DECODE_KERNEL at import; benchmarks and tests assign the module attribute.
DECODE_KERNEL = os.environ.get("FX_MLA_DECODE_KERNEL", "auto")


def cuda_kernel_choice(q, kv_cache, kv_lora_rank, device=None) -> str:
    """"seesaw" / "gluon" (64-head groups), "gluon16" or "triton" for these CUDA inputs under DECODE_KERNEL (raises
    where "gluon" is forced but no Gluon kernel supports them, naming why). device: where they run (None: q's)."""
    if DECODE_KERNEL not in ("auto", "triton", "gluon"):
        raise ValueError(f"FX_MLA_DECODE_KERNEL / DECODE_KERNEL must be 'auto', 'triton' or 'gluon', got "
                         f"{DECODE_KERNEL!r}")
    if DECODE_KERNEL == "triton":
        return "triton"
    from fx_mla.ops import mla_decode_seesaw
    from fx_mla.ops.mla_decode_gluon import gluon_unsupported_reason
    from fx_mla.ops.mla_decode_gluon16 import gluon16_unsupported_reason
    reason = gluon_unsupported_reason(q, kv_cache, kv_lora_rank, device)
    if reason is None:  # the seesaw launcher's kernels cover the same inputs where their (larger) shared memory fits
        if mla_decode_seesaw.VARIANT not in mla_decode_seesaw.VARIANTS:  # a misconfiguration, not a decline
            raise ValueError(f"mla_decode_seesaw.VARIANT must be one of {mla_decode_seesaw.VARIANTS}, got "
                             f"{mla_decode_seesaw.VARIANT!r}")
        seesaw_reason = mla_decode_seesaw.seesaw_unsupported_reason(q, kv_cache, kv_lora_rank, device)
        return "gluon" if seesaw_reason else "seesaw"
    reason16 = gluon16_unsupported_reason(q, kv_cache, kv_lora_rank, device)
    if reason16 is None:
        return "gluon16"
    if DECODE_KERNEL == "gluon":
        raise RuntimeError(f"FX_MLA_DECODE_KERNEL=gluon, but no Gluon kernel can run these inputs: {reason}; "
                           f"16-head kernel: {reason16}")
    return "triton"
