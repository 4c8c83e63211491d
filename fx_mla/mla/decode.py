"""The MLA decode step in plain PyTorch (weight-absorbed form, paged latent cache, optional FP8, DCP).

Everything here is ordinary ATen: this is the code users write and the code fx_mla's passes rewrite.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
from torch import nn

from .cache import local_seq_lens
from .config import FP8_DTYPES, MLAConfig, fp8_max
from .validate import check_decode_inputs, check_decode_data


def dequantize_cache(x: torch.Tensor, dtype: torch.dtype, k_scale: torch.Tensor) -> torch.Tensor:
    """Stored entries to the model dtype: ``fp8 → dtype × k_scale`` (exact upcast, one rounding), or a cast."""
    if x.dtype in FP8_DTYPES:
        return x.to(dtype) * k_scale
    return x.to(dtype)


def gather_pages(cache: torch.Tensor, block_table: torch.Tensor, dtype: torch.dtype,
                 k_scale: torch.Tensor) -> torch.Tensor:
    """All pages of each request, ``[B, max_blocks * block_size, D]`` in the model dtype."""
    x = cache[block_table]
    x = x.view(block_table.shape[0], -1, cache.shape[-1])
    return dequantize_cache(x, dtype, k_scale)


def paged_decode_attention(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                           k_scale: torch.Tensor, sm_scale: float, kv_lora_rank: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q [B, H, D]`` over the first ``seq_lens[b]`` cached tokens of each request.

    Returns ``o [B, H, L]`` in q's dtype and ``lse [B, H]`` in fp32 (natural log). A request with no tokens gets
    ``o = 0`` and ``lse = -inf``.
    """
    kv = gather_pages(cache, block_table, q.dtype, k_scale)
    scores = torch.matmul(q, kv.transpose(1, 2)).float() * sm_scale
    positions = torch.arange(kv.shape[1], device=q.device)
    valid = positions[None, :] < seq_lens[:, None]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - finite_lse[..., None])
    o = torch.matmul(probs.to(q.dtype), kv[..., :kv_lora_rank])
    return o, lse


def quantize_dequantize_query(q: torch.Tensor, q_scale: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """Static per-tensor FP8 query, written as quantize-then-dequantize so the math stays visible."""
    fmax = fp8_max(fp8_dtype)
    q_fp8 = (q / q_scale).clamp(-fmax, fmax).to(fp8_dtype)
    return q_fp8.to(q.dtype) * q_scale


def all_gather_along(x: torch.Tensor, dim: int, group_size: int, group) -> torch.Tensor:
    """All-gather ``x`` over the group, concatenated along ``dim``.

    Gathers along dim 0 and moves the gathered dim with chunk + cat, written out here: the graph shows
    ``all_gather_into_tensor → wait_tensor → split → getitem… → cat`` on every torch version (the helper inside
    ``all_gather_tensor`` for dim > 0 is not traceable by dynamo on some releases).
    """
    gathered = fc.all_gather_tensor(x.contiguous(), 0, group)
    if dim == 0:
        return gathered
    return torch.cat(torch.chunk(gathered, group_size, dim=0), dim=dim)


def reduce_scatter_along(x: torch.Tensor, dim: int, group_size: int, group) -> torch.Tensor:
    """Sum ``x`` over the group and keep this rank's chunk along ``dim`` (chunk + cat to dim 0, then dim-0 op)."""
    if dim != 0:
        x = torch.cat(torch.chunk(x, group_size, dim=dim), dim=0)
    return fc.reduce_scatter_tensor(x, "sum", 0, group)


def merge_dcp_partials(o: torch.Tensor, lse: torch.Tensor, dcp_size: int, group) -> torch.Tensor:
    """Merge per-rank partial attention ``o [B, H, L]``, ``lse [B, H]`` over the DCP group; keep own heads.

    LSE all-gather, rescale by ``exp(lse_r - lse)``, reduce-scatter over heads (the bytes vLLM moves). A rank
    without tokens (``lse_r = -inf``) contributes exactly zero.
    """
    lses = all_gather_along(lse, 0, dcp_size, group).view(dcp_size, *lse.shape)
    total = torch.logsumexp(lses, dim=0)
    total = torch.where(torch.isinf(total), torch.zeros_like(total), total)
    weight = torch.exp(lse - total)
    scaled = (o.float() * weight[..., None]).to(o.dtype)
    return reduce_scatter_along(scaled, 1, dcp_size, group)


class MLADecode(nn.Module):
    """One MLA decode step of one DCP rank.

    forward(q_nope [B, H_local, P], q_pe [B, H_local, R], kv_cache, block_table [B, max_blocks] int32,
    seq_lens [B] (global lengths), k_scale (fp32 tensor), q_scale (fp32 tensor, with quantize_query))
    → out [B, H_local, V]. The rank is a buffer, so every rank traces the same graph.
    """

    def __init__(self, cfg: MLAConfig, w_uk: torch.Tensor, w_uv: torch.Tensor, rank: int = 0):
        super().__init__()
        h, p, l, v = cfg.local_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank, cfg.v_head_dim
        if tuple(w_uk.shape) != (h, p, l):
            raise ValueError(f"w_uk must be [{h}, {p}, {l}] (local heads, P, L), got {tuple(w_uk.shape)}")
        if tuple(w_uv.shape) != (h, l, v):
            raise ValueError(f"w_uv must be [{h}, {l}, {v}] (local heads, L, V), got {tuple(w_uv.shape)}")
        if not 0 <= rank < cfg.dcp_size:
            raise ValueError(f"rank must be in [0, {cfg.dcp_size}), got {rank}")
        self.cfg = cfg
        self.w_uk = nn.Parameter(w_uk.to(cfg.dtype), requires_grad=False)
        self.w_uv = nn.Parameter(w_uv.to(cfg.dtype), requires_grad=False)
        self.register_buffer("dcp_rank", torch.tensor(rank, dtype=torch.int64, device=w_uk.device))

    @classmethod
    def from_full_weights(cls, cfg: MLAConfig, w_uk: torch.Tensor, w_uv: torch.Tensor, rank: int = 0) -> "MLADecode":
        """Take this rank's heads from the whole group's ``w_uk [H, P, L]`` and ``w_uv [H, L, V]``."""
        heads = slice(rank * cfg.local_heads, (rank + 1) * cfg.local_heads)
        return cls(cfg, w_uk[heads], w_uv[heads], rank)

    @property
    def group(self):
        return self.cfg.dcp_group if self.cfg.dcp_group is not None else dist.group.WORLD

    def forward(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                seq_lens: torch.Tensor, k_scale: torch.Tensor, q_scale: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        cfg = self.cfg
        check_decode_inputs(cfg, q_nope, q_pe, kv_cache, block_table, seq_lens, k_scale, q_scale)
        if not torch.compiler.is_compiling():
            check_decode_data(cfg, kv_cache, block_table, seq_lens, int(self.dcp_rank))
        ql_nope = torch.einsum("bhp,hpl->bhl", q_nope, self.w_uk)
        q = torch.cat([ql_nope, q_pe], dim=-1)
        if cfg.dcp_size > 1:
            q = all_gather_along(q, 1, cfg.dcp_size, self.group)
        if cfg.quantize_query:
            q = quantize_dequantize_query(q, q_scale, cfg.query_fp8_dtype)
        lens = local_seq_lens(seq_lens, cfg.dcp_size, self.dcp_rank, cfg.interleave)
        o, lse = paged_decode_attention(q, kv_cache, block_table, lens, k_scale, cfg.sm_scale, cfg.kv_lora_rank)
        if cfg.dcp_size > 1:
            o = merge_dcp_partials(o, lse, cfg.dcp_size, self.group)
        return torch.einsum("bhl,hlv->bhv", o, self.w_uv)
