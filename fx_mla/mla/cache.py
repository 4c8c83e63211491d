"""Paged latent cache: allocation, DCP token ownership, slot mapping and quantizing writes.

Token at global position ``p`` lives on DCP rank ``(p // I) % N`` at local position
``(p // (N*I)) * I + p % I`` (N = dcp_size, I = interleave). All functions are plain PyTorch.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .config import MLAConfig, fp8_max


def allocate_cache(cfg: MLAConfig, num_blocks: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialised cache ``[num_blocks, block_size, L + R]`` in the storage dtype."""
    if num_blocks <= 0:
        raise ValueError(f"num_blocks must be positive, got {num_blocks}")
    return torch.empty(num_blocks, cfg.block_size, cfg.entry_size, dtype=cfg.cache_dtype, device=device)


def local_seq_lens(seq_lens: torch.Tensor, dcp_size: int, rank, interleave: int) -> torch.Tensor:
    """Tokens of each sequence stored on ``rank`` (an int or a 0-dim tensor) under DCP interleaving."""
    if dcp_size == 1:
        return seq_lens
    chunk = dcp_size * interleave
    base = torch.div(seq_lens, chunk, rounding_mode="floor") * interleave
    rest = seq_lens - base * dcp_size - rank * interleave
    return base + rest.clamp(0, interleave)


def local_count(seq_len: int, dcp_size: int, rank: int, interleave: int) -> int:
    """Host-side (Python int) version of :func:`local_seq_lens` for one sequence."""
    base = (seq_len // (dcp_size * interleave)) * interleave
    return base + min(max(seq_len - base * dcp_size - rank * interleave, 0), interleave)


def token_owner(positions: torch.Tensor, dcp_size: int, interleave: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(owning rank, local position) of tokens at global ``positions``."""
    owner = torch.div(positions, interleave, rounding_mode="floor") % dcp_size
    local = torch.div(positions, dcp_size * interleave, rounding_mode="floor") * interleave + positions % interleave
    return owner, local


def slot_mapping(cfg: MLAConfig, positions: torch.Tensor, request_ids: torch.Tensor, block_table: torch.Tensor,
                 rank: int = 0) -> torch.Tensor:
    """Flat cache slots (``block * block_size + offset``) for new tokens; -1 where another rank owns the token."""
    positions = positions.long()
    owner, local = token_owner(positions, cfg.dcp_size, cfg.interleave)
    mine = owner == rank
    # Tokens of other ranks index block 0 of the row, so a short row is never read past its end.
    index = torch.where(mine, torch.div(local, cfg.block_size, rounding_mode="floor"), 0)
    slots = block_table.long()[request_ids.long(), index] * cfg.block_size + local % cfg.block_size
    return torch.where(mine, slots, torch.full_like(slots, -1))


def quantize_for_cache(cfg: MLAConfig, kv: torch.Tensor, k_scale: torch.Tensor) -> torch.Tensor:
    """Storage form of latent entries: ``fp8(clamp(kv / k_scale, ±max))`` or a cast for ``auto``."""
    if not cfg.is_fp8_cache:
        return kv.to(cfg.cache_dtype)
    if not isinstance(k_scale, torch.Tensor) or k_scale.dtype != torch.float32 or k_scale.numel() != 1:
        raise TypeError(f"k_scale must be a one-element float32 tensor, got {k_scale!r}")
    fmax = fp8_max(cfg.cache_dtype)
    return (kv.float() / k_scale).clamp(-fmax, fmax).to(cfg.cache_dtype)


def write_cache(cfg: MLAConfig, cache: torch.Tensor, kv: torch.Tensor, slots: torch.Tensor,
                k_scale: torch.Tensor) -> None:
    """Write ``kv [n, L+R]`` to ``slots [n]`` (slots < 0 are skipped: tokens owned by another rank)."""
    if kv.ndim != 2 or kv.shape[1] != cfg.entry_size:
        raise ValueError(f"kv must be [n, {cfg.entry_size}], got {tuple(kv.shape)}")
    if slots.shape != kv.shape[:1]:
        raise ValueError(f"slots must be [{kv.shape[0]}], got {tuple(slots.shape)}")
    keep = slots >= 0
    flat = cache.view(-1, cfg.entry_size)
    kept = slots[keep].long()
    if kept.numel() and int(kept.max()) >= flat.shape[0]:
        raise ValueError(f"slots: slot {int(kept.max())} is past the cache's {flat.shape[0]} slots")
    flat[kept] = quantize_for_cache(cfg, kv[keep], k_scale)


def fill_paged_cache(cfg: MLAConfig, latents: Sequence[torch.Tensor], k_scale: torch.Tensor, rank: int = 0,
                     num_blocks: Optional[int] = None, generator: Optional[torch.Generator] = None,
                     device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Build this rank's paged cache holding ``latents[b] [S_b, L+R]`` of each request.

    Physical blocks are handed out in a random order (so tests exercise real paging); unused block-table
    entries hold block 0. Returns ``(cache, block_table)``.
    """
    counts = [local_count(int(x.shape[0]), cfg.dcp_size, rank, cfg.interleave) for x in latents]
    need = [-(-c // cfg.block_size) for c in counts]
    max_blocks = max(1, max(need, default=0))
    total = max(1, sum(need))
    num_blocks = num_blocks or total + 1
    if num_blocks < total:
        raise ValueError(f"num_blocks ({num_blocks}) is less than the {total} blocks the requests need")
    order = torch.randperm(num_blocks, generator=generator).tolist()
    table = torch.zeros(len(latents), max_blocks, dtype=torch.int32)
    nxt = 0
    for b, n in enumerate(need):
        table[b, :n] = torch.tensor(order[nxt:nxt + n], dtype=torch.int32)
        nxt += n
    cache = allocate_cache(cfg, num_blocks, device)
    cache.view(torch.uint8).fill_(0) if cfg.is_fp8_cache else cache.zero_()
    table = table.to(device)
    for b, x in enumerate(latents):
        if x.shape[0] == 0:
            continue
        pos = torch.arange(x.shape[0], device=device)
        slots = slot_mapping(cfg, pos, torch.full_like(pos, b), table, rank)
        write_cache(cfg, cache, x.to(device), slots, k_scale)
    return cache, table
