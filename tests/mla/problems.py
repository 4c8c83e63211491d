"""Random decode / context problems shared by the model tests (fresh inputs, never zeros)."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from fx_mla.mla import (MLAConfig, MLADecode, build_context_metadata, fill_paged_cache, reference_decode,
                        stored_values)


@dataclasses.dataclass
class Problem:
    cfg: MLAConfig
    seq_lens: list
    w_uk: torch.Tensor
    w_uv: torch.Tensor
    latents: list
    q_nope: torch.Tensor
    q_pe: torch.Tensor
    k_scale: torch.Tensor
    q_scale: Optional[torch.Tensor]


def make_problem(cfg: MLAConfig, seq_lens: Sequence[int], seed: int = 0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    h, p, l, v, r = cfg.num_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank, cfg.v_head_dim, cfg.qk_rope_head_dim
    w_uk = torch.randn(h, p, l, generator=g) / p ** 0.5
    w_uv = torch.randn(h, l, v, generator=g) / l ** 0.5
    latents = [torch.randn(s, l + r, generator=g) for s in seq_lens]
    q_nope = torch.randn(len(seq_lens), h, p, generator=g)
    q_pe = torch.randn(len(seq_lens), h, r, generator=g)
    k_scale = torch.tensor(3.0 / 448, dtype=torch.float32)   # |latent| up to ~3 uses e4m3's range
    q_scale = torch.tensor(0.05, dtype=torch.float32) if cfg.quantize_query else None
    return Problem(cfg, list(seq_lens), w_uk, w_uv, latents, q_nope, q_pe, k_scale, q_scale)


def rank_inputs(pb: Problem, rank: int, device="cpu", seed: int = 1):
    """(module, args) of one DCP rank: its heads of the query and its shard of the cache."""
    cfg = pb.cfg
    module = MLADecode.from_full_weights(cfg, pb.w_uk, pb.w_uv, rank).to(device)
    heads = slice(rank * cfg.local_heads, (rank + 1) * cfg.local_heads)
    cache, table = fill_paged_cache(cfg, pb.latents, pb.k_scale, rank=rank,
                                    generator=torch.Generator().manual_seed(seed + rank), device=device)
    args = (pb.q_nope[:, heads].to(cfg.dtype).to(device), pb.q_pe[:, heads].to(cfg.dtype).to(device), cache,
            table, torch.tensor(pb.seq_lens, dtype=torch.int32, device=device), pb.k_scale.to(device),
            None if pb.q_scale is None else pb.q_scale.to(device))
    return module, args


def reference_out(pb: Problem) -> torch.Tensor:
    """Float64 output of all heads, on the values the cache stores (query rounded to the model dtype first)."""
    cfg = pb.cfg
    kv = stored_values(cfg, pb.latents, pb.k_scale)
    out, _ = reference_decode(cfg, pb.q_nope.to(cfg.dtype), pb.q_pe.to(cfg.dtype), pb.w_uk.to(cfg.dtype),
                              pb.w_uv.to(cfg.dtype), kv, pb.q_scale)
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-300))


def context_inputs(cfg: MLAConfig, latents, context_lens, seq_starts, k_scale, rank: int, seed: int = 1):
    cache, table = fill_paged_cache(cfg, latents, k_scale, rank=rank, generator=torch.Generator().manual_seed(seed))
    meta = build_context_metadata(cfg, context_lens, seq_starts, rank)
    ss = meta.seq_starts if seq_starts is not None or cfg.dcp_size > 1 else None
    return (cache, table, meta.cu_seq_lens, meta.token_to_seq, ss, k_scale, meta.reorder)
