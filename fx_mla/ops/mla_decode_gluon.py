"""Launcher of the Hopper Gluon kernel of the MLA decode (fx_mla/ops/kernels/mla_decode_gluon.py).

Same semantics and outputs as ``torch.ops.fx_mla.mla_decode_fp8`` (fx_mla/ops/mla_decode_fp8.py) for the shapes the
kernel covers: bf16/fp16 query [B, H, 576] with H a multiple of 64, FP8 e4m3/e5m2 paged cache [num_blocks,
block_size, 576], kv_lora_rank 512 (rope 64). Writes (out [B, H, 512], lse [B, H] fp32, natural log) into the
caller's tensors; splits go through the same fp32 workspace and the same Triton combine kernel as the Triton path.
No host sync (CUDA-graph capturable); bad block ids / lengths are clamped in the kernel, never read out of bounds.

Gluon is imported lazily: this module imports on any Triton (CPU CI runs 3.9), and the kernel only runs where
``gluon_unsupported_reason`` returns None: compute capability exactly (9, 0) and Triton 3.6 (the only version the
kernel is validated on; Gluon's API changes between releases).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from fx_mla.ops._fp8 import FP8_DTYPES

__all__ = ["launch_mla_decode_gluon", "gluon_unsupported_reason", "GLUON_TRITON_VERSION", "BLOCK_H", "BLOCK_N"]

GLUON_TRITON_VERSION = "3.6"
BLOCK_H = 64        # heads a CTA: the warpgroup MMA height
BLOCK_N = 64        # tokens a tile (double-buffered fp16 tiles + the query fill 225 KiB of shared memory)
NUM_WARPS = 8       # two warpgroups: token halves of QK^T, column halves of PV
LATENT, ROPE = 512, 64
Q_SHIFT = 8         # bf16 query -> fp16 as q * 2**-8 (exact for 2**-6 <= |q| <= 65504 * 2**8), as the Triton path
SMEM_NEEDED = 225 * 1024  # the compiled kernel uses 229,888 bytes (Triton 3.6, sm_90)
# Kernel variants (round 2, issue 6), all compiled for sm_90 without spills; the default stays the round-1 kernel
# until a device run (benchmarks/dev_gluon_decode.py --variants) shows a variant correct and faster.
#   one_page:     a 64-token tile of a block_size % 64 == 0 cache is one page: one block-table read a tile and
#                 contiguous rows (the loop body shrinks from 826 to 722 instructions a thread); same numerics.
#   trim_barrier: drops the barrier before P is rewritten (the row-max reduction already synchronised); same
#                 numerics.
#   lazy_rescale: keeps the running max until a tile's max passes it by 2**8, skipping the 128-register rescale
#                 of the accumulator on most tiles; the same softmax, rounded differently.
VARIANT_FLAGS = ("one_page", "trim_barrier", "lazy_rescale")
DEFAULT_VARIANT = dict(one_page=True, trim_barrier=True, lazy_rescale=False)  # fastest on 1x H100 (RESULTS.md)


def gluon_unsupported_reason(q: torch.Tensor, kv_cache: torch.Tensor, kv_lora_rank: int,
                             device: Optional[torch.device] = None) -> Optional[str]:
    """None when the Gluon kernel covers these inputs on `device` (default: q's device), else why not."""
    device = torch.device(device) if device is not None else q.device
    if device.type != "cuda":
        return f"the Gluon kernel runs on CUDA devices only, got {device}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    cap = torch.cuda.get_device_capability(device)
    if tuple(cap) != (9, 0):
        return f"the Gluon kernel targets compute capability (9, 0) (Hopper wgmma), got {tuple(cap)}"
    if not triton.__version__.startswith(GLUON_TRITON_VERSION):
        return f"the Gluon kernel is validated on Triton {GLUON_TRITON_VERSION} only, got {triton.__version__}"
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"query dtype must be bf16 or fp16 (no FP8-query variant yet), got {q.dtype}"
    if kv_cache.dtype not in FP8_DTYPES:
        return f"cache dtype must be float8_e4m3fn or float8_e5m2, got {kv_cache.dtype}"
    if q.dim() != 3 or kv_cache.dim() != 3:
        return f"q must be [B, H, D] and kv_cache [num_blocks, block_size, D], got {tuple(q.shape)}, " \
               f"{tuple(kv_cache.shape)}"
    if kv_lora_rank != LATENT or q.shape[2] != LATENT + ROPE or kv_cache.shape[2] != LATENT + ROPE:
        return f"only kv_lora_rank {LATENT} with head dim {LATENT + ROPE} is covered, got kv_lora_rank " \
               f"{kv_lora_rank}, q head dim {q.shape[2]}, cache head dim {kv_cache.shape[2]}"
    if q.shape[1] % BLOCK_H != 0 or q.shape[1] == 0:
        return f"the head count must be a positive multiple of {BLOCK_H}, got {q.shape[1]}"
    if kv_cache.stride(2) != 1 or kv_cache.stride(1) % 4 or kv_cache.stride(0) % 4 or kv_cache.data_ptr() % 4:
        return "kv_cache rows must be contiguous and 4-byte aligned (the kernel loads 32-bit words), got strides " \
               f"{tuple(kv_cache.stride())}"
    index = device.index if device.index is not None else torch.cuda.current_device()
    smem = getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", None)
    if smem is not None and smem < SMEM_NEEDED:
        return f"the kernel needs {SMEM_NEEDED} bytes of shared memory a block, the device allows {smem}"
    return None


def _expect(cond: bool, exc, message: str) -> None:
    if not cond:
        raise exc(message)


def _check_outputs(q, kv_lora_rank, out, lse, block_table, seq_lens, k_scale):
    batch, heads, _ = q.shape
    _expect(isinstance(out, torch.Tensor) and out.shape == (batch, heads, kv_lora_rank), ValueError,
            f"out must be a [B={batch}, H={heads}, L={kv_lora_rank}] tensor, got "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    _expect(out.dtype in (torch.bfloat16, torch.float16, torch.float32), TypeError,
            f"out must be bf16, fp16 or fp32, got {out.dtype}")
    _expect(out.stride(2) == 1, ValueError, "out must be contiguous in its last dim")
    _expect(isinstance(lse, torch.Tensor) and lse.shape == (batch, heads) and lse.dtype == torch.float32
            and lse.is_contiguous(), ValueError, f"lse must be a contiguous float32 [B={batch}, H={heads}] tensor")
    _expect(block_table.dtype == torch.int32 and block_table.dim() == 2 and block_table.shape[0] == batch,
            ValueError, f"block_table must be int32 [B={batch}, max_blocks], got {block_table.dtype} "
                        f"{tuple(block_table.shape)}")
    _expect(seq_lens.dtype in (torch.int32, torch.int64) and seq_lens.shape == (batch,), ValueError,
            f"seq_lens must be int32/int64 [B={batch}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    _expect(k_scale.dtype == torch.float32 and k_scale.numel() == 1, TypeError,
            f"k_scale must be a one-element float32 tensor, got {k_scale.dtype} of shape {tuple(k_scale.shape)}")
    for name, t in (("kv_cache", None), ("block_table", block_table), ("seq_lens", seq_lens),
                    ("k_scale", k_scale), ("out", out), ("lse", lse)):
        if t is not None:
            _expect(t.device == q.device, ValueError, f"{name} must be on q's device {q.device}, got {t.device}")


def launch_mla_decode_gluon(q, kv_cache, block_table, seq_lens, k_scale, q_scale, sm_scale, kv_lora_rank, out, lse,
                            num_splits: Optional[int] = None, poison_workspace: bool = False,
                            variant: Optional[dict] = None):
    """Fill out / lse with the decode attention of q over the paged cache; returns (out, lse).

    num_splits: splits per request (None: the Triton path's rule, about one CTA per SM). poison_workspace fills
    the split workspace with NaN first (tests: every element the combine reads must have been written).
    variant: kernel flags (VARIANT_FLAGS) overriding DEFAULT_VARIANT; one_page applies only where
    block_size % BLOCK_N == 0.
    """
    from fx_mla.ops.kernels.mla_decode_fp8 import _mla_decode_fp8_combine_kernel
    from fx_mla.ops.mla_decode_fp8 import _num_splits, _sm_count, check_capacity, fill_empty, no_tokens

    reason = gluon_unsupported_reason(q, kv_cache, kv_lora_rank)
    if reason is not None:
        raise ValueError(f"the Gluon MLA decode kernel does not cover these inputs: {reason}")
    _expect(q_scale is None, ValueError, "q_scale must be None: the Gluon kernel takes a bf16/fp16 query")
    _check_outputs(q, kv_lora_rank, out, lse, block_table, seq_lens, k_scale)
    flags = dict(DEFAULT_VARIANT)
    if variant:
        unknown = sorted(set(variant) - set(VARIANT_FLAGS))
        _expect(not unknown, ValueError, f"variant: unknown flags {unknown}, expected some of {VARIANT_FLAGS}")
        flags.update({k: bool(v) for k, v in variant.items()})
    _expect(kv_cache.device == q.device, ValueError, f"kv_cache must be on q's device {q.device}")
    check_capacity(kv_cache, block_table)
    if no_tokens(q, kv_cache, block_table):  # B = 0, no cache block or no table column: out = 0, lse = -inf
        return fill_empty(out, lse)
    from fx_mla.ops.kernels.mla_decode_gluon import _mla_decode_gluon_kernel  # gluon: Triton 3.6 only

    batch, heads, _ = q.shape
    page = kv_cache.shape[1]
    max_blocks = block_table.shape[1]
    groups = heads // BLOCK_H
    if num_splits is None:
        index = q.device.index if q.device.index is not None else torch.cuda.current_device()
        num_splits = _num_splits(batch, groups, max_blocks * page, BLOCK_N, _sm_count(index), 1)
    _expect(isinstance(num_splits, int) and num_splits >= 1, ValueError,
            f"num_splits must be a positive int, got {num_splits!r}")
    q_shift = Q_SHIFT if q.dtype == torch.bfloat16 else 0  # the kernel converts the query as it loads it
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
    kernel = _mla_decode_gluon_kernel[(groups, num_splits, batch)](
        q, kv_cache, block_table, seq_lens, k_scale, out, lse, part_o, part_lse,
        float(sm_scale), heads, num_splits, kv_cache.shape[0], max_blocks,
        q.stride(0), q.stride(1), kv_cache.stride(0) // 4, kv_cache.stride(1) // 4, block_table.stride(0),
        out.stride(0), out.stride(1),
        PAGE=page, L=LATENT, R=ROPE, BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, Q_SHIFT=q_shift,
        E5M2=kv_cache.dtype == torch.float8_e5m2, SINGLE_SPLIT=num_splits == 1,
        ONE_PAGE=flags["one_page"] and page % BLOCK_N == 0, TRIM_BARRIER=flags["trim_barrier"],
        LAZY_RESCALE=flags["lazy_rescale"], num_warps=NUM_WARPS)
    launch_mla_decode_gluon.last_kernel = kernel  # the dev script reads its register / spill counts
    if num_splits > 1:
        pow2 = triton.next_power_of_2(num_splits)
        _mla_decode_fp8_combine_kernel[(heads, batch)](
            part_o, part_lse, out, lse, heads, num_splits, out.stride(0), out.stride(1),
            L=kv_lora_rank, BLOCK_L=LATENT, BLOCK_S=min(pow2, 8), SPLITS_POW2=pow2, num_warps=4)
    return out, lse
