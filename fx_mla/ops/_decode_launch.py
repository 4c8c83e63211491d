"""Launch plumbing shared by the decode kernels of ``torch.ops.fx_mla.mla_decode_fp8`` (the Triton split-K kernels of
fx_mla/ops/mla_decode_fp8.py and the Gluon sm_90 kernels of mla_decode_gluon.py, mla_decode_gluon16.py and
mla_decode_seesaw.py): shape-only early exits, the split count, the split workspace and its combine, the argument
checks of a launch into caller-given outputs, and the device / shape / dtype checks every Gluon kernel makes.
All of it reads shapes, dtypes, strides and device properties only: no host sync, CUDA-graph safe.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import triton

from fx_mla.ops._fp8 import FP8_DTYPES
from fx_mla.ops.kernels.mla_decode_fp8 import _mla_decode_fp8_combine_balanced_kernel, _mla_decode_fp8_combine_kernel

GLUON_TRITON_VERSION = "3.6"  # the only Triton the Gluon kernels are validated on (Gluon's API changes)
GLUON_LATENT, GLUON_ROPE = 512, 64


def _expect(cond: bool, exc, message: str) -> None:
    if not cond:
        raise exc(message)


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def max_shared(device: torch.device) -> Optional[int]:
    """Shared memory a block may opt into on `device` (None where torch does not report it)."""
    return getattr(torch.cuda.get_device_properties(device_index(device)), "shared_memory_per_block_optin", None)


def max_shared_per_sm(device: torch.device) -> Optional[int]:
    """Shared memory an SM holds on `device`, all its blocks together (None where torch does not report it)."""
    return getattr(torch.cuda.get_device_properties(device_index(device)), "shared_memory_per_multiprocessor", None)


def no_tokens(q, kv_cache, block_table) -> bool:
    """No token to attend to, from the shapes alone (B or H 0, no cache block or no table column): the launchers
    write out = 0, lse = -inf without a kernel (an empty cache leaves the kernels' page-id clamp no target)."""
    return q.shape[0] == 0 or q.shape[1] == 0 or kv_cache.shape[0] == 0 or block_table.shape[1] == 0


def fill_empty(out: torch.Tensor, lse: torch.Tensor):
    return out.zero_(), lse.fill_(float("-inf"))  # on the device: no host sync


def check_capacity(kv_cache, block_table) -> None:
    # the kernels clamp lengths to it in int32 and round them up to 64-token tiles there
    capacity = block_table.shape[1] * kv_cache.shape[1]
    _expect(capacity <= 2 ** 31 - 64, ValueError,
            f"block_table's max_blocks ({block_table.shape[1]}) * kv_cache's block_size ({kv_cache.shape[1]}) = "
            f"{capacity} must be below 2**31 (at most 2**31 - 64)")


def num_splits_for(batch: int, groups: int, max_len: int, block_n: int, num_sms: int, occupancy: int) -> int:
    """Splits per request so that about occupancy * num_sms programs run; at least 4 tiles a split; then as few
    splits as give the same longest chunk of whole tiles at max_len (the kernels cut a request into
    cdiv(len, splits) tokens rounded up to whole tiles, so e.g. 1024 tiles over 66 splits is 64 chunks of 16 and two
    empty splits: their CTAs and partials, and the combine's reads of them, cost time for nothing)."""
    programs = batch * groups
    splits = max(1, (num_sms * occupancy) // programs)
    splits = max(1, min(splits, triton.cdiv(max_len, 4 * block_n), 1024))
    tiles = triton.cdiv(max(max_len, 1), block_n)
    return max(1, triton.cdiv(tiles, triton.cdiv(tiles, splits)))


def check_num_splits(splits) -> None:
    _expect(isinstance(splits, int) and not isinstance(splits, bool) and 1 <= splits <= 1024, ValueError,
            f"num_splits must be a positive int (at most 1024), got {splits!r}")


# Split partials of a bf16 output in bf16 instead of fp32 (half the bytes the split kernels write and the combine
# reads: at one request x 66 splits x 128 heads, 17 MB -> 8.4 MB; one more bf16 rounding of each partial before the
# merge, below the output's own). Off until measured: bench_decode.py --bf16-partials turns it on.
PARTIAL_BF16 = False


def split_workspace(q, splits: int, kv_lora_rank: int, out, lse, poison: bool, bf16: Optional[bool] = None):
    """(part_o [B, splits, H, L], part_lse [B, splits, H] fp32) for splits > 1, else (out, lse) (unused by the
    kernels); part_o is fp32, or bf16 for a bf16 `out` where `bf16` says so (None: PARTIAL_BF16; the kernels store
    in part_o's dtype, the combine loads it to fp32); poison fills them with NaN (tests: every element the combine
    reads must have been written)."""
    if splits == 1:
        return out, lse
    batch, heads = q.shape[:2]
    new = torch.full if poison else torch.empty
    fill = (float("nan"),) if poison else ()
    want_bf16 = PARTIAL_BF16 if bf16 is None else bf16
    part_dtype = torch.bfloat16 if (want_bf16 and out.dtype == torch.bfloat16) else torch.float32
    return (new((batch, splits, heads, kv_lora_rank), *fill, dtype=part_dtype, device=q.device),
            new((batch, splits, heads), *fill, dtype=torch.float32, device=q.device))


COMBINE_MAX_VALUES = 4096  # fp32 partial values a combine program reads at most (combine_config; benchmarks vary it)


def combine_config(batch: int, heads: int, splits: int, kv_lora_rank: int, num_sms: int = 132):
    """(BLOCK_L, BLOCK_S, SPLITS_POW2) of the combine kernel: latent chunks of at least 64 columns, cut until
    batch x heads x chunks reaches about two programs an SM and a program reads at most 4096 fp32 partial values
    (splits x chunk), and as many splits a step as keep a program's tile within 8192 fp32 values (64 registers a
    thread at 4 warps): few dependent load steps even at one request with 64 splits (the first version ran one
    program a (request, head) and 8 splits a step: 128 programs of 9 steps for one request of 128 heads).
    The 4096-value cap, 1x H100 (RESULTS.md, session 8): 1 x 128 heads x 64 splits, chunks of 64 columns 11.0 us
    against 13.4 us for 128 (what two programs an SM alone gave); 8 x 128 x 8 splits keeps 512 (9.5 us)."""
    pow2 = triton.next_power_of_2(splits)
    block_l = max(32, triton.next_power_of_2(kv_lora_rank))
    while block_l > 64 and (batch * heads * triton.cdiv(kv_lora_rank, block_l) < 2 * num_sms
                            or splits * block_l > COMBINE_MAX_VALUES):
        block_l //= 2
    block_s = max(1, min(pow2, 8192 // block_l))
    return block_l, block_s, pow2


# Launch the combine as a programmatic dependent launch on sm_90+ (its launch overlaps the split kernel's tail; it
# waits for that grid before reading, then lets the next kernel launch early: session 13; earlier measurements of
# this flag had neither that nor split kernels that trigger their dependents, so the combine could only launch as
# they exited). Off until measured: bench_decode.py --combine-pdl turns it on; the scorer's SCORER_PDL uses it.
COMBINE_PDL = False
# (A one-step form of the combine, its partials loaded with the lse's, was no faster in the op: session 15, s37,
# RESULTS.md; removed.)


def combine_splits(part_o, part_lse, out, lse, splits: int, kv_lora_rank: int, config=None,
                   pdl: Optional[bool] = None) -> None:
    """Merge the splits' (o, lse) into out / lse by their log-sum-exp weights (nothing to do for one split).
    ``config``: (BLOCK_L, BLOCK_S) instead of combine_config's (benchmarks compare them). ``pdl``: launch it as a
    programmatic dependent launch (sm_90+ CUDA; None: COMBINE_PDL)."""
    if splits == 1:
        return
    launch = {}
    if (COMBINE_PDL if pdl is None else pdl) and out.device.type == "cuda" and \
            torch.cuda.get_device_capability(out.device)[0] >= 9:
        launch = dict(PDL=True, launch_pdl=True)
    batch, heads = lse.shape
    if config is None:
        sms = sm_count(device_index(out.device)) if out.device.type == "cuda" else 132
        block_l, block_s, pow2 = combine_config(batch, heads, splits, kv_lora_rank, sms)
    else:
        (block_l, block_s), pow2 = config, triton.next_power_of_2(splits)
    _mla_decode_fp8_combine_kernel[(triton.cdiv(kv_lora_rank, block_l), heads, batch)](
        part_o, part_lse, out, lse, heads, splits, out.stride(0), out.stride(1),
        L=kv_lora_rank, BLOCK_L=block_l, BLOCK_S=block_s, SPLITS_POW2=pow2, num_warps=4, **launch)


# ---- the balanced schedule (the 16-head rs kernel's BALANCED form; kernels/mla_decode_gluon16_rs.py): all requests'
# tiles end to end, cut into num_ctas equal shares of whole tiles; a request's part in one CTA is a segment, written
# into out / lse when it is the whole request, else into workspace slot r + c
def balanced_workspace(q, num_ctas: int, kv_lora_rank: int, poison: bool):
    """(part_o [(B + G) H, L] fp32, part_lse [(B + G) H] fp32, tile_prefix [B + 1] int32): one slot a segment
    r + c (at most B + G - 1); tile_prefix is written by the kernel's CTA 0 for the combine."""
    batch, heads = q.shape[:2]
    new = torch.full if poison else torch.empty
    fill = (float("nan"),) if poison else ()
    rows = (batch + num_ctas) * heads
    prefix = torch.full((batch + 1,), -1, dtype=torch.int32, device=q.device) if poison else \
        torch.empty((batch + 1,), dtype=torch.int32, device=q.device)
    return (new((rows, kv_lora_rank), *fill, dtype=torch.float32, device=q.device),
            new((rows,), *fill, dtype=torch.float32, device=q.device), prefix)


def combine_balanced(part_o, part_lse, out, lse, tile_prefix, num_ctas: int, kv_lora_rank: int) -> None:
    """Merge the segments of requests split across CTAs; out = 0, lse = -inf for requests without tokens (the
    requests within one CTA were written by it). tile_prefix: the kernel's [B + 1] first tiles and T."""
    batch, heads = lse.shape
    block_l = min(128, triton.next_power_of_2(kv_lora_rank))
    _mla_decode_fp8_combine_balanced_kernel[(triton.cdiv(kv_lora_rank, block_l), heads, batch)](
        part_o, part_lse, out, lse, tile_prefix, batch, num_ctas, heads, out.stride(0), out.stride(1),
        L=kv_lora_rank, BLOCK_L=block_l, BLOCK_S=8, num_warps=4)


# A bf16 query over an FP8 cache -> fp16 as q * 2**-8 (the Triton and the Gluon kernels; exact for 2**-6 <= |q| <=
# 65504 * 2**8, and 2**8 goes back into the score scale); fp16 and FP8 queries convert as they are.
Q_SHIFT = 8


def gluon_launch_args(q, kv_cache, block_table, seq_lens, k_scale, q_scale, sm_scale, out, lse, num_splits: int,
                      poison: bool, bf16_partials: Optional[bool] = None):
    """What every Gluon decode kernel takes: (positional arguments, shared constexprs, (part_o, part_lse)) for a
    launch of `num_splits` splits a request (checked); q / block_table rows and seq_lens made contiguous where the
    kernels need it; the split workspace (split_workspace; bf16_partials: its `bf16`). The caller adds its kernel's
    own tile constexprs and merges the workspace with combine_splits."""
    check_num_splits(num_splits)
    if q.stride(2) != 1:
        q = q.contiguous()
    if block_table.stride(1) != 1:
        block_table = block_table.contiguous()
    seq_lens = seq_lens.contiguous()
    part_o, part_lse = split_workspace(q, num_splits, GLUON_LATENT, out, lse, poison, bf16_partials)
    args = (q, kv_cache, block_table, seq_lens, k_scale, k_scale if q_scale is None else q_scale, out, lse,
            part_o, part_lse, float(sm_scale), q.shape[1], num_splits, kv_cache.shape[0], block_table.shape[1],
            q.stride(0), q.stride(1), kv_cache.stride(0) // 4, kv_cache.stride(1) // 4, block_table.stride(0),
            out.stride(0), out.stride(1))
    consts = dict(PAGE=kv_cache.shape[1], L=GLUON_LATENT, R=GLUON_ROPE,
                  Q_SHIFT=Q_SHIFT if q.dtype == torch.bfloat16 else 0, HAS_Q_SCALE=q_scale is not None,
                  E5M2=kv_cache.dtype == torch.float8_e5m2, SINGLE_SPLIT=num_splits == 1)
    return args, consts, (part_o, part_lse)


def gluon_unsupported(q, kv_cache, kv_lora_rank: int, device: Optional[torch.device], *, kernel: str,
                      heads_reason: Callable[[int], Optional[str]], row_align: int,
                      smem_needed: int) -> Optional[str]:
    """None when a Gluon sm_90 kernel named `kernel` covers these inputs on `device` (default: q's device), else
    why not: CUDA, capability (9, 0), Triton GLUON_TRITON_VERSION, bf16/fp16/FP8 query, FP8 cache, L = 512 + R = 64,
    the kernel's head rule, cache rows contiguous and `row_align`-byte aligned, `smem_needed` bytes of shared
    memory a block."""
    device = torch.device(device) if device is not None else q.device
    if device.type != "cuda":
        return f"{kernel} runs on CUDA devices only, got {device}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    cap = tuple(torch.cuda.get_device_capability(device))
    if cap != (9, 0):
        return f"{kernel} targets compute capability (9, 0) (Hopper wgmma), got {cap}"
    if not triton.__version__.startswith(GLUON_TRITON_VERSION):
        return f"{kernel} is validated on Triton {GLUON_TRITON_VERSION} only, got {triton.__version__}"
    if q.dtype not in (torch.bfloat16, torch.float16) + tuple(FP8_DTYPES):
        return f"query dtype must be bf16, fp16, float8_e4m3fn or float8_e5m2, got {q.dtype}"
    if kv_cache.dtype not in FP8_DTYPES:
        return f"cache dtype must be float8_e4m3fn or float8_e5m2, got {kv_cache.dtype}"
    if q.dim() != 3 or kv_cache.dim() != 3:
        return f"q must be [B, H, D] and kv_cache [num_blocks, block_size, D], got {tuple(q.shape)}, " \
               f"{tuple(kv_cache.shape)}"
    d = GLUON_LATENT + GLUON_ROPE
    if kv_lora_rank != GLUON_LATENT or q.shape[2] != d or kv_cache.shape[2] != d:
        return f"only kv_lora_rank {GLUON_LATENT} with head dim {d} is covered, got kv_lora_rank {kv_lora_rank}, " \
               f"q head dim {q.shape[2]}, cache head dim {kv_cache.shape[2]}"
    reason = heads_reason(q.shape[1])
    if reason is not None:
        return reason
    a = row_align
    if kv_cache.stride(2) != 1 or kv_cache.stride(1) % a or kv_cache.stride(0) % a or kv_cache.data_ptr() % a:
        return f"kv_cache rows must be contiguous and {a}-byte aligned, got strides {tuple(kv_cache.stride())}"
    return shared_memory_reason(device, smem_needed, kernel)


def shared_memory_reason(device: torch.device, needed: int, kernel: str) -> Optional[str]:
    smem = max_shared(device)
    if smem is not None and smem < needed:
        return f"{kernel} needs {needed} bytes of shared memory a block, the device allows {smem}"
    return None


def check_launch_args(q, kv_cache, kv_lora_rank, out, lse, block_table, seq_lens, k_scale, q_scale,
                      kernel: str) -> None:
    """The arguments of a Gluon launch into caller-given outputs (the op checks its own before dispatching)."""
    batch, heads, _ = q.shape
    if q.dtype in FP8_DTYPES:  # the kernels load it as fp16 exactly and fold q_scale into the score scale
        _expect(isinstance(q_scale, torch.Tensor) and q_scale.dtype == torch.float32 and q_scale.numel() == 1
                and q_scale.device == q.device, TypeError,
                f"q_scale must be a one-element float32 tensor on {q.device} for an FP8 query, got "
                f"{getattr(q_scale, 'dtype', None)} {tuple(getattr(q_scale, 'shape', ()))} "
                f"on {getattr(q_scale, 'device', None)}")
    else:
        _expect(q_scale is None, ValueError, f"q_scale must be None for a {q.dtype} query ({kernel})")
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
    check_capacity(kv_cache, block_table)
