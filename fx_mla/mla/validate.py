"""Input checks for the decode step and the context gather.

Static checks (dtypes, devices, ranks of shapes) are trace-time Python and also run under torch.compile; the
data checks (index ranges) read tensors and run only in eager mode, always before any gather touches the cache.
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import MLAConfig

INDEX_DTYPES = (torch.int32, torch.int64)


def _expect(cond: bool, message) -> None:
    """Raise ValueError(message()) unless cond. The message is built only on failure: formatting a symbolic
    size while tracing would specialize it."""
    if not cond:
        raise ValueError(message())


def _check_tensor(name: str, t, dtypes, ndim: Optional[int], device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {tuple(dtypes)}, got {t.dtype}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def check_cache(cfg: MLAConfig, kv_cache: torch.Tensor, device: torch.device, k_scale) -> None:
    _check_tensor("kv_cache", kv_cache, (cfg.cache_dtype,), 3, device)
    _expect(kv_cache.shape[1] == cfg.block_size and kv_cache.shape[2] == cfg.entry_size,
            lambda: f"kv_cache must be [num_blocks, {cfg.block_size}, {cfg.entry_size}], got {tuple(kv_cache.shape)}")
    _check_tensor("k_scale", k_scale, (torch.float32,), None, device)
    _expect(k_scale.numel() == 1, lambda: f"k_scale must hold one element, got shape {tuple(k_scale.shape)}")


def check_decode_inputs(cfg: MLAConfig, q_nope, q_pe, kv_cache, block_table, seq_lens, k_scale, q_scale) -> None:
    device = q_nope.device if isinstance(q_nope, torch.Tensor) else torch.device("cpu")
    _check_tensor("q_nope", q_nope, (cfg.dtype,), 3, device)
    batch = q_nope.shape[0]
    _expect(tuple(q_nope.shape[1:]) == (cfg.local_heads, cfg.qk_nope_head_dim),
            lambda: f"q_nope must be [B, {cfg.local_heads}, {cfg.qk_nope_head_dim}], got {tuple(q_nope.shape)}")
    _check_tensor("q_pe", q_pe, (cfg.dtype,), 3, device)
    _expect(q_pe.shape[0] == batch and tuple(q_pe.shape[1:]) == (cfg.local_heads, cfg.qk_rope_head_dim),
            lambda: f"q_pe must be [{batch}, {cfg.local_heads}, {cfg.qk_rope_head_dim}], got {tuple(q_pe.shape)}")
    check_cache(cfg, kv_cache, device, k_scale)
    _check_tensor("block_table", block_table, (torch.int32,), 2, device)
    _expect(block_table.shape[0] == batch,
            lambda: f"block_table must have {batch} rows (batch), got {block_table.shape[0]}")
    _check_tensor("seq_lens", seq_lens, INDEX_DTYPES, 1, device)
    _expect(seq_lens.shape[0] == batch, lambda: f"seq_lens must be [{batch}], got {tuple(seq_lens.shape)}")
    if cfg.quantize_query:
        if q_scale is None:
            raise ValueError("q_scale is required when MLAConfig.quantize_query is set")
        _check_tensor("q_scale", q_scale, (torch.float32,), None, device)
        _expect(q_scale.numel() == 1, lambda: f"q_scale must hold one element, got shape {tuple(q_scale.shape)}")


def check_block_ids(block_table: torch.Tensor, num_blocks: int) -> None:
    if block_table.numel() == 0:
        return
    bad = (block_table < 0) | (block_table >= num_blocks)
    if bool(bad.any()):
        b, j = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"block_table[{b}, {j}] = {int(block_table[b, j])} is out of range "
                         f"for a cache of {num_blocks} blocks")


def check_decode_data(cfg: MLAConfig, kv_cache, block_table, seq_lens, rank: int) -> None:
    from .cache import local_count

    check_block_ids(block_table, kv_cache.shape[0])
    capacity = block_table.shape[1] * cfg.block_size
    for b, s in enumerate(seq_lens.tolist()):
        _expect(s >= 0, lambda: f"seq_lens[{b}] = {s} is negative")
        local = local_count(s, cfg.dcp_size, rank, cfg.interleave)
        _expect(local <= capacity, lambda: f"seq_lens[{b}] = {s} needs {local} tokens on rank {rank}, past the "
                                   f"{capacity} tokens its block_table row holds")
