"""Launcher of the Hopper Gluon kernel of the memory-bound 16-head MLA decode
(fx_mla/ops/kernels/mla_decode_gluon16.py: cp.async ring of raw FP8 tiles, swap-AB wgmma, one CTA per request and
split with all 16 heads).

Same semantics and outputs as ``torch.ops.fx_mla.mla_decode_fp8`` (fx_mla/ops/mla_decode_fp8.py) for the inputs the
kernel covers: bf16/fp16 query [B, 16, 576], FP8 e4m3/e5m2 paged cache [num_blocks, block_size, 576] with 16-byte
aligned rows, kv_lora_rank 512 (rope 64). Writes (out [B, 16, 512], lse [B, 16] fp32, natural log) into the
caller's tensors; splits go through the same fp32 workspace and the same Triton combine kernel as the Triton path.
No host sync (CUDA-graph capturable); bad block ids / lengths are clamped in the kernel, never read out of bounds.

Gluon is imported lazily: this module imports on any Triton (CPU CI runs 3.9); the kernel runs only where
``gluon16_unsupported_reason`` returns None: compute capability exactly (9, 0) and Triton 3.6.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from fx_mla.ops._fp8 import FP8_DTYPES

__all__ = ["launch_mla_decode_gluon16", "gluon16_unsupported_reason", "smem_needed", "GLUON_TRITON_VERSION",
           "HEADS", "BLOCK_N", "NUM_STAGES", "EARLY_READ", "VARIANTS", "VARIANT"]

GLUON_TRITON_VERSION = "3.6"
HEADS = 16          # the wgmma N side (all heads of a request in one CTA)
BLOCK_N = 64        # tokens a tile: the wgmma M side of S^T = K Q^T (one warpgroup)
NUM_WARPS = 4       # one warpgroup
NUM_STAGES = 3      # raw FP8 tiles in the shared-memory ring (NUM_STAGES - 1 in flight during the compute)
EARLY_READ = True  # read the ring while the last P V still runs: 3-5 % faster on 1x H100 (RESULTS.md)
LATENT, ROPE = 512, 64
# Kernels: "ring" (the cp.async ring kernel, one warpgroup does everything; the default) and the warp-specialized
# round-2 kernel with a 4- or 8-warp producer partition converting into two fp16 tiles ("ws4", "ws8").
VARIANTS = ("ring", "ws4", "ws8")
VARIANT = "ring"
_WS = {"ws4": (4, 232), "ws8": (8, 152)}  # producer warps, producer registers (setmaxnreg)
Q_SHIFT = 8         # bf16 query -> fp16 as q * 2**-8, as the Triton path


def smem_needed(num_stages: int = NUM_STAGES, variant: str = "ring") -> int:
    """Shared memory of the compiled kernel (Triton 3.6, sm_90: ring 205,056 bytes at 3 stages, 168,192 at 2;
    ws4 168,228): fp16 query + raw FP8 ring + one fp16 tile + P + 256 bytes of scratch (ring); fp16 query + two
    fp16 tiles + P + barriers and scratch (ws)."""
    d = LATENT + ROPE
    if variant != "ring":
        return HEADS * d * 2 + 2 * BLOCK_N * d * 2 + HEADS * BLOCK_N * 2 + 292
    return HEADS * d * 2 + num_stages * BLOCK_N * d + BLOCK_N * d * 2 + HEADS * BLOCK_N * 2 + 256


def gluon16_unsupported_reason(q: torch.Tensor, kv_cache: torch.Tensor, kv_lora_rank: int,
                               device: Optional[torch.device] = None, num_stages: int = NUM_STAGES,
                               variant: Optional[str] = None) -> Optional[str]:
    """None when the 16-head Gluon kernel covers these inputs on `device` (default: q's device), else why not."""
    variant = VARIANT if variant is None else variant
    if variant not in VARIANTS:
        return f"variant must be one of {VARIANTS}, got {variant!r}"
    device = torch.device(device) if device is not None else q.device
    if device.type != "cuda":
        return f"the Gluon kernel runs on CUDA devices only, got {device}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    cap = tuple(torch.cuda.get_device_capability(device))
    if cap != (9, 0):
        return f"the Gluon kernel targets compute capability (9, 0) (Hopper wgmma), got {cap}"
    if not triton.__version__.startswith(GLUON_TRITON_VERSION):
        return f"the Gluon kernel is validated on Triton {GLUON_TRITON_VERSION} only, got {triton.__version__}"
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"query dtype must be bf16 or fp16 (no FP8-query variant), got {q.dtype}"
    if kv_cache.dtype not in FP8_DTYPES:
        return f"cache dtype must be float8_e4m3fn or float8_e5m2, got {kv_cache.dtype}"
    if q.dim() != 3 or kv_cache.dim() != 3:
        return f"q must be [B, H, D] and kv_cache [num_blocks, block_size, D], got {tuple(q.shape)}, " \
               f"{tuple(kv_cache.shape)}"
    if kv_lora_rank != LATENT or q.shape[2] != LATENT + ROPE or kv_cache.shape[2] != LATENT + ROPE:
        return f"only kv_lora_rank {LATENT} with head dim {LATENT + ROPE} is covered, got kv_lora_rank " \
               f"{kv_lora_rank}, q head dim {q.shape[2]}, cache head dim {kv_cache.shape[2]}"
    if q.shape[1] != HEADS:
        return f"the head count must be {HEADS}, got {q.shape[1]}"
    if kv_cache.stride(2) != 1 or kv_cache.stride(1) % 16 or kv_cache.stride(0) % 16 or kv_cache.data_ptr() % 16:
        return "kv_cache rows must be contiguous and 16-byte aligned (the kernel copies 16-byte vectors), got " \
               f"strides {tuple(kv_cache.stride())}"
    if num_stages not in (2, 3):
        return f"num_stages must be 2 or 3 (4 exceeds the shared memory), got {num_stages}"
    index = device.index if device.index is not None else torch.cuda.current_device()
    smem = getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", None)
    if smem is not None and smem < smem_needed(num_stages, variant):
        return f"the kernel needs {smem_needed(num_stages, variant)} bytes of shared memory a block, the device allows {smem}"
    return None


def _expect(cond: bool, exc, message: str) -> None:
    if not cond:
        raise exc(message)


def _check_args(q, kv_cache, kv_lora_rank, out, lse, block_table, seq_lens, k_scale):
    batch, heads, _ = q.shape
    _expect(isinstance(out, torch.Tensor) and out.shape == (batch, heads, kv_lora_rank), ValueError,
            f"out must be a [B={batch}, H={heads}, L={kv_lora_rank}] tensor, got "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    _expect(out.dtype in (torch.bfloat16, torch.float16, torch.float32), TypeError,
            f"out must be bf16, fp16 or fp32, got {out.dtype}")
    _expect(out.stride(2) == 1, ValueError, "out must be contiguous in its last dim")
    _expect(isinstance(lse, torch.Tensor) and lse.shape == (batch, heads) and lse.dtype == torch.float32
            and lse.is_contiguous(), ValueError, f"lse must be a contiguous float32 [B={batch}, H={heads}] tensor")
    _expect(isinstance(block_table, torch.Tensor) and block_table.dtype == torch.int32 and block_table.dim() == 2
            and block_table.shape[0] == batch, ValueError,
            f"block_table must be int32 [B={batch}, max_blocks], got "
            f"{getattr(block_table, 'dtype', None)} {tuple(getattr(block_table, 'shape', ()))}")
    _expect(isinstance(seq_lens, torch.Tensor) and seq_lens.dtype in (torch.int32, torch.int64)
            and seq_lens.shape == (batch,), ValueError,
            f"seq_lens must be int32/int64 [B={batch}], got {getattr(seq_lens, 'dtype', None)} "
            f"{tuple(getattr(seq_lens, 'shape', ()))}")
    _expect(isinstance(k_scale, torch.Tensor) and k_scale.dtype == torch.float32 and k_scale.numel() == 1, TypeError,
            f"k_scale must be a one-element float32 tensor, got {getattr(k_scale, 'dtype', type(k_scale).__name__)}")
    for name, t in (("kv_cache", kv_cache), ("block_table", block_table), ("seq_lens", seq_lens),
                    ("k_scale", k_scale), ("out", out), ("lse", lse)):
        _expect(t.device == q.device, ValueError, f"{name} must be on q's device {q.device}, got {t.device}")


def default_num_splits(batch: int, max_len: int, device_index: int) -> int:
    """About one CTA per SM (the kernel takes ~200 KB of shared memory: one CTA an SM), at least 4 tiles a split."""
    from fx_mla.ops.mla_decode_fp8 import _num_splits, _sm_count
    return _num_splits(batch, 1, max_len, BLOCK_N, _sm_count(device_index), 1)


def launch_mla_decode_gluon16(q, kv_cache, block_table, seq_lens, k_scale, q_scale, sm_scale, kv_lora_rank, out, lse,
                              num_splits: Optional[int] = None, num_stages: int = NUM_STAGES,
                              early_read: bool = EARLY_READ, poison_workspace: bool = False,
                              variant: Optional[str] = None):
    """Fill out / lse with the decode attention of q over the paged cache; returns (out, lse).

    num_splits: splits per request (None: default_num_splits). variant: "ring" / "ws4" / "ws8" (None: VARIANT);
    num_stages / early_read: options of the ring kernel (see the kernel module). poison_workspace fills the split
    workspace with NaN first (tests: every element the combine reads must have been written). B = 0, an empty cache
    or a table without columns: out = 0, lse = -inf without a kernel.
    """
    from fx_mla.ops.kernels.mla_decode_fp8 import _mla_decode_fp8_combine_kernel
    from fx_mla.ops.mla_decode_fp8 import check_capacity, fill_empty, no_tokens

    variant = VARIANT if variant is None else variant
    reason = gluon16_unsupported_reason(q, kv_cache, kv_lora_rank, num_stages=num_stages, variant=variant)
    if reason is not None:
        raise ValueError(f"the 16-head Gluon MLA decode kernel does not cover these inputs: {reason}")
    _expect(q_scale is None, ValueError, "q_scale must be None: the Gluon kernel takes a bf16/fp16 query")
    _check_args(q, kv_cache, kv_lora_rank, out, lse, block_table, seq_lens, k_scale)
    check_capacity(kv_cache, block_table)
    if no_tokens(q, kv_cache, block_table):  # B = 0, no cache block or no table column: out = 0, lse = -inf
        return fill_empty(out, lse)
    from fx_mla.ops.kernels import mla_decode_gluon16 as kmod  # gluon: Triton 3.6 only

    batch, heads, _ = q.shape
    page = kv_cache.shape[1]
    max_blocks = block_table.shape[1]
    if num_splits is None:
        index = q.device.index if q.device.index is not None else torch.cuda.current_device()
        num_splits = default_num_splits(batch, max_blocks * page, index)
    _expect(isinstance(num_splits, int) and 1 <= num_splits <= 1024, ValueError,
            f"num_splits must be an int in [1, 1024], got {num_splits!r}")
    q_shift = Q_SHIFT if q.dtype == torch.bfloat16 else 0
    if q.stride(2) != 1:
        q = q.contiguous()
    if block_table.stride(1) != 1:
        block_table = block_table.contiguous()
    seq_lens = seq_lens.contiguous()
    if num_splits > 1:
        new = torch.full if poison_workspace else torch.empty
        fill = (float("nan"),) if poison_workspace else ()
        part_o = new((batch, num_splits, heads, kv_lora_rank), *fill, dtype=torch.float32, device=q.device)
        part_lse = new((batch, num_splits, heads), *fill, dtype=torch.float32, device=q.device)
    else:
        part_o, part_lse = out, lse  # unused by the kernel
    args = (q, kv_cache, block_table, seq_lens, k_scale, out, lse, part_o, part_lse,
            float(sm_scale), heads, num_splits, kv_cache.shape[0], max_blocks,
            q.stride(0), q.stride(1), kv_cache.stride(0) // 4, kv_cache.stride(1) // 4, block_table.stride(0),
            out.stride(0), out.stride(1))
    common = dict(PAGE=page, L=LATENT, R=ROPE, BLOCK_H=HEADS, BLOCK_N=BLOCK_N, Q_SHIFT=q_shift,
                  E5M2=kv_cache.dtype == torch.float8_e5m2, SINGLE_SPLIT=num_splits == 1,
                  ONE_PAGE=page % BLOCK_N == 0, num_warps=NUM_WARPS)
    if variant == "ring":
        kernel = kmod._mla_decode_gluon16_kernel[(num_splits, batch)](
            *args, NUM_STAGES=num_stages, EARLY_READ=bool(early_read), **common)
    else:
        pw, regs = _WS[variant]
        kernel = kmod._mla_decode_gluon16_ws_kernel[(num_splits, batch)](
            *args, PRODUCER_WARPS=pw, PRODUCER_REGS=regs, **common)
    launch_mla_decode_gluon16.last_kernel = kernel  # the dev script reads its register / spill counts
    if num_splits > 1:
        pow2 = triton.next_power_of_2(num_splits)
        _mla_decode_fp8_combine_kernel[(heads, batch)](
            part_o, part_lse, out, lse, heads, num_splits, out.stride(0), out.stride(1),
            L=kv_lora_rank, BLOCK_L=LATENT, BLOCK_S=min(pow2, 8), SPLITS_POW2=pow2, num_warps=4)
    return out, lse
