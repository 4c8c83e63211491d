"""Float64 dense reference of the decode step and the context gather: no paging, no sharding."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .config import MLAConfig, fp8_max


def stored_values(cfg: MLAConfig, latents: Sequence[torch.Tensor], k_scale: torch.Tensor) -> list[torch.Tensor]:
    """The values the cache holds for ``latents`` (after FP8 quantization), as float64."""
    from .cache import quantize_for_cache

    out = []
    for x in latents:
        q = quantize_for_cache(cfg, x, k_scale)
        out.append(q.double() * k_scale.double() if cfg.is_fp8_cache else q.double())
    return out


def reference_decode(cfg: MLAConfig, q_nope: torch.Tensor, q_pe: torch.Tensor, w_uk: torch.Tensor,
                     w_uv: torch.Tensor, kv: Sequence[torch.Tensor], q_scale: Optional[torch.Tensor] = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """All heads: ``q_nope [B, H, P]``, ``q_pe [B, H, R]``, ``w_uk [H, P, L]``, ``w_uv [H, L, V]``, ``kv[b] [S_b, D]``.

    Returns ``out [B, H, V]`` and ``lse [B, H]`` in float64 (``lse = -inf``, ``out = 0`` for an empty sequence).
    """
    q = torch.cat([torch.einsum("bhp,hpl->bhl", q_nope.double(), w_uk.double()), q_pe.double()], dim=-1)
    if cfg.quantize_query:
        fmax = fp8_max(cfg.query_fp8_dtype)
        s = q_scale.double()
        q = (q / s).clamp(-fmax, fmax).to(cfg.query_fp8_dtype).double() * s
    outs, lses = [], []
    for b, x in enumerate(kv):
        x = x.double()
        if x.shape[0] == 0:
            outs.append(torch.zeros(q.shape[1], cfg.kv_lora_rank, dtype=torch.float64))
            lses.append(torch.full((q.shape[1],), float("-inf"), dtype=torch.float64))
            continue
        scores = q[b] @ x.T * cfg.sm_scale
        lses.append(torch.logsumexp(scores, dim=-1))
        outs.append(torch.softmax(scores, dim=-1) @ x[:, :cfg.kv_lora_rank])
    o = torch.stack(outs)
    return torch.einsum("bhl,hlv->bhv", o, w_uv.double()), torch.stack(lses)


def reference_context(kv: Sequence[torch.Tensor], context_lens: Sequence[int],
                      seq_starts: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Chunk ``[seq_starts[b], seq_starts[b] + context_lens[b])`` of each request, concatenated, float64."""
    starts = seq_starts or [0] * len(context_lens)
    return torch.cat([x[s:s + c].double() for x, s, c in zip(kv, starts, context_lens)])
