"""Context gather for chunked prefill: cached latent of each request into one contiguous workspace.

For output token ``t``: ``b = token_to_seq[t]``, ``off = t - cu_seq_lens[b] + seq_starts[b]``,
``out[t] = dequant(cache[block_table[b, off // block_size], off % block_size])``. A negative ``token_to_seq``
marks a padding token (DCP pads every rank to the same count); it reads request 0's first slot and is dropped.
With DCP each rank gathers its own tokens, the group all-gathers, and an index puts rows in global order.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .cache import local_count, token_owner
from .config import MLAConfig
from .decode import all_gather_along, dequantize_cache
from .validate import INDEX_DTYPES, _check_tensor, check_block_ids, check_cache


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, cu_seq_lens: torch.Tensor,
                   token_to_seq: torch.Tensor, seq_starts: Optional[torch.Tensor], k_scale: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    """``[num_tokens, D]`` in ``dtype``: the cached entries the metadata names (plain PyTorch)."""
    block_size = cache.shape[1]
    tts = token_to_seq.long()
    valid = tts >= 0
    b = tts.clamp_min(0)
    t = torch.arange(tts.shape[0], device=cache.device)
    off = t - cu_seq_lens.long()[b]
    if seq_starts is not None:
        off = off + seq_starts.long()[b]
    off = torch.where(valid, off, torch.zeros_like(off))
    blocks = block_table.long()[b, torch.div(off, block_size, rounding_mode="floor")]
    x = cache[blocks, off % block_size]
    return dequantize_cache(x, dtype, k_scale)


@dataclasses.dataclass(frozen=True)
class ContextMetadata:
    """Host-built metadata of one rank: what it gathers locally and, with DCP, how rows are put in order."""

    cu_seq_lens: torch.Tensor          # [B + 1] int32, local token offsets
    token_to_seq: torch.Tensor         # [M] int32, -1 for padding
    seq_starts: torch.Tensor           # [B] int32, local position where each chunk starts
    reorder: Optional[torch.Tensor]    # [total] int64 rows of the all-gathered [N * M, D] in global order
    num_tokens: int                    # total tokens in global order

    def to(self, device) -> "ContextMetadata":
        move = (lambda x: None if x is None else x.to(device))
        return dataclasses.replace(self, cu_seq_lens=move(self.cu_seq_lens), token_to_seq=move(self.token_to_seq),
                                   seq_starts=move(self.seq_starts), reorder=move(self.reorder))


def build_context_metadata(cfg: MLAConfig, context_lens: Sequence[int], seq_starts: Optional[Sequence[int]] = None,
                           rank: int = 0) -> ContextMetadata:
    """Metadata for gathering chunk ``[seq_starts[b], seq_starts[b] + context_lens[b])`` of each request."""
    n, inter = cfg.dcp_size, cfg.interleave
    starts = list(seq_starts) if seq_starts is not None else [0] * len(context_lens)
    if len(starts) != len(context_lens):
        raise ValueError(f"seq_starts has {len(starts)} entries, context_lens {len(context_lens)}")
    if any(x < 0 for x in list(context_lens) + starts):
        raise ValueError("context_lens and seq_starts must be non-negative")

    def local(r):  # (local start, local count) of each request on rank r
        return [(local_count(s, n, r, inter), local_count(s + c, n, r, inter) - local_count(s, n, r, inter))
                for s, c in zip(starts, context_lens)]

    per_rank = [local(r) for r in range(n)]
    width = max(sum(c for _, c in rows) for rows in per_rank)
    mine = per_rank[rank]
    counts = torch.tensor([c for _, c in mine], dtype=torch.int64)
    cu = torch.zeros(len(mine) + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(counts, 0)
    tts = torch.full((width if n > 1 else int(cu[-1]),), -1, dtype=torch.int64)
    tts[:int(cu[-1])] = torch.repeat_interleave(torch.arange(len(mine)), counts)
    reorder = None
    if n > 1:
        rows = []
        for b, (s, c) in enumerate(zip(starts, context_lens)):
            owner, lpos = token_owner(torch.arange(s, s + c), n, inter)
            r_cu = torch.tensor([sum(cnt for _, cnt in per_rank[r][:b]) for r in range(n)])
            r_start = torch.tensor([per_rank[r][b][0] for r in range(n)])
            rows.append(owner * width + r_cu[owner] + lpos - r_start[owner])
        reorder = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)
    return ContextMetadata(cu.to(torch.int32), tts.to(torch.int32),
                           torch.tensor([s for s, _ in mine], dtype=torch.int32), reorder, int(sum(context_lens)))


class ContextGather(nn.Module):
    """forward(cache, block_table, cu_seq_lens, token_to_seq, seq_starts, k_scale, reorder=None) → [total, D]."""

    def __init__(self, cfg: MLAConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, cache: torch.Tensor, block_table: torch.Tensor, cu_seq_lens: torch.Tensor,
                token_to_seq: torch.Tensor, seq_starts: Optional[torch.Tensor], k_scale: torch.Tensor,
                reorder: Optional[torch.Tensor] = None) -> torch.Tensor:
        cfg = self.cfg
        check_context_inputs(cfg, cache, block_table, cu_seq_lens, token_to_seq, seq_starts, k_scale, reorder)
        if not torch.compiler.is_compiling():
            check_context_data(cfg, cache, block_table, cu_seq_lens, token_to_seq, seq_starts)
        x = gather_context(cache, block_table, cu_seq_lens, token_to_seq, seq_starts, k_scale, cfg.dtype)
        if cfg.dcp_size > 1:
            group = cfg.dcp_group if cfg.dcp_group is not None else dist.group.WORLD
            x = all_gather_along(x, 0, cfg.dcp_size, group)
            x = torch.index_select(x, 0, reorder)
        return x


def check_context_inputs(cfg, cache, block_table, cu_seq_lens, token_to_seq, seq_starts, k_scale, reorder) -> None:
    device = cache.device if isinstance(cache, torch.Tensor) else torch.device("cpu")
    check_cache(cfg, cache, device, k_scale)
    _check_tensor("block_table", block_table, (torch.int32,), 2, device)
    _check_tensor("cu_seq_lens", cu_seq_lens, INDEX_DTYPES, 1, device)
    if cu_seq_lens.shape[0] != block_table.shape[0] + 1:
        raise ValueError(f"cu_seq_lens must be [{block_table.shape[0] + 1}] (batch + 1), "
                         f"got {tuple(cu_seq_lens.shape)}")
    _check_tensor("token_to_seq", token_to_seq, INDEX_DTYPES, 1, device)
    if seq_starts is not None:
        _check_tensor("seq_starts", seq_starts, INDEX_DTYPES, 1, device)
    if cfg.dcp_size > 1:
        if reorder is None:
            raise ValueError("reorder is required when MLAConfig.dcp_size > 1 (see build_context_metadata)")
        _check_tensor("reorder", reorder, INDEX_DTYPES, 1, device)


def check_context_data(cfg, cache, block_table, cu_seq_lens, token_to_seq, seq_starts) -> None:
    """Every token's position must lie inside its request's block-table row, every block id inside the cache."""
    check_block_ids(block_table, cache.shape[0])
    batch, capacity = block_table.shape[0], block_table.shape[1] * cfg.block_size
    tts = token_to_seq.long()
    if tts.numel() == 0:
        return
    if batch == 0:
        raise ValueError("token_to_seq names tokens but block_table has no rows")
    if int(tts.max()) >= batch:
        raise ValueError(f"token_to_seq holds request id {int(tts.max())}, past the batch of {batch}")
    b = tts.clamp_min(0)
    starts = seq_starts.long()[b] if seq_starts is not None else 0
    off = torch.arange(tts.shape[0], device=tts.device) - cu_seq_lens.long()[b] + starts
    bad = (tts >= 0) & ((off < 0) | (off >= capacity))
    if bool(bad.any()):
        t = int(bad.nonzero()[0])
        raise ValueError(f"token {t} of request {int(tts[t])} is at position {int(off[t])}, outside the "
                         f"{capacity} positions its block_table row holds (check cu_seq_lens and seq_starts)")
