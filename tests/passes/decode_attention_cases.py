"""Decode attentions the decode_attention pass rewrites (or must decline), their inputs, a float64 reference and a
compile helper. Shared by tests/passes/test_decode_attention.py (CPU) and tests/gpu/test_decode_attention_pass_gpu.py;
no expecttest here (the GPU machines lack it).

Each attention is code a model or a user writes over a paged cache ``[num_blocks, block_size, D]``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

import fx_mla.backend  # noqa: F401  (registers backend="fx_mla")
import fx_mla.ops.gather_dequant_cache  # noqa: F401
import fx_mla.ops.mla_decode_fp8  # noqa: F401
from fx_mla.mla import MLAConfig, fill_paged_cache
from fx_mla.mla.decode import gather_pages, paged_decode_attention
from fx_mla.mla.reference import stored_values

L = 512
SM_SCALE = 1.0 / math.sqrt(192)
# The attentions below write the scale as the literal 192 ** -0.5: dynamo turns a global float (SM_SCALE) into a
# graph input under dynamic=True, and the pass needs the scale as a constant (it declines a tensor scale).
# Ragged lengths with an empty request; 4 requests, so the batch symbol stays apart from block counts.
SEQ_LENS = [5, 0, 70, 33]


# ---------------------------------------------------------------- attentions that match

def model_attention(q, cache, block_table, seq_lens, k_scale):
    """fx_mla/mla/decode.py's paged_decode_attention: logsumexp form, returns (o, lse)."""
    return paged_decode_attention(q, cache, block_table, seq_lens, k_scale, 192 ** -0.5, L)


def softmax_einsum_attention(q, cache, block_table, seq_lens, k_scale):
    """User code: einsum scores, masked_fill of padded positions, torch.softmax in fp32, einsum with the latent."""
    kv = gather_pages(cache, block_table, q.dtype, k_scale)
    s = torch.einsum("bhd,btd->bht", q, kv) * 192 ** -0.5
    pad = torch.arange(kv.shape[1], device=q.device)[None, :] >= seq_lens[:, None]
    s = s.masked_fill(pad[:, None, :], float("-inf"))
    p = torch.softmax(s.float(), dim=-1)
    return torch.einsum("bht,btl->bhl", p.to(q.dtype), kv[..., :L])


def where_matmul_attention(q, cache, block_table, seq_lens, k_scale):
    """User code: matmul, division by sqrt(192), where(valid, s, -inf), logsumexp + exp; returns (o, lse)."""
    kv = cache[block_table].view(block_table.shape[0], -1, cache.shape[-1])
    if cache.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        kv = kv.to(q.dtype) * k_scale
    s = torch.matmul(q, kv.transpose(1, 2)).float() / 192 ** 0.5
    valid = seq_lens[:, None] > torch.arange(kv.shape[1], device=q.device)
    s = torch.where(valid.unsqueeze(1), s, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.matmul(p.to(q.dtype), kv[:, :, :L]), lse


def index_select_attention(q, cache, block_table, seq_lens, k_scale):
    """User code: the pages gathered by index_select over the flattened block table; logsumexp form."""
    kv = torch.index_select(cache, 0, block_table.flatten()).view(block_table.shape[0], -1, cache.shape[-1])
    if cache.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        kv = kv.to(q.dtype) * k_scale
    s = torch.matmul(q, kv.transpose(1, 2)).float() * 192 ** -0.5
    pad = torch.arange(kv.shape[1], device=q.device)[None, None, :] >= seq_lens[:, None, None]
    s = s.masked_fill(pad, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.matmul(p.to(q.dtype), kv[..., :L]), lse


def _slots_lse_attention(q, kv, seq_lens):
    pos = torch.arange(kv.shape[1], device=q.device)
    s = torch.matmul(q, kv.transpose(1, 2)).float() * 192 ** -0.5
    s = s.masked_fill(pos[None, None, :] >= seq_lens[:, None, None], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.matmul(p.to(q.dtype), kv[..., :L]), lse


def flat_slots_attention(q, cache, block_table, seq_lens, k_scale):
    """User code: the cache flattened to rows, gathered by int64 slots computed from the block table; logsumexp."""
    bs = cache.shape[1]
    pos = torch.arange(block_table.shape[1] * bs, device=q.device)
    slots = block_table.long()[:, pos // bs] * bs + pos % bs
    kv = cache.view(-1, cache.shape[-1])[slots].to(q.dtype) * k_scale
    return _slots_lse_attention(q, kv, seq_lens)


def flat_slots_index_select_attention(q, cache, block_table, seq_lens, k_scale):
    """User code: the same slots (block table kept int32, scale first), the rows by index_select."""
    bs = cache.shape[1]
    pos = torch.arange(block_table.shape[1] * bs, device=q.device)
    slots = pos % bs + bs * block_table[:, pos // bs]
    rows = torch.index_select(cache.reshape(-1, cache.shape[-1]), 0, slots.flatten())
    kv = k_scale * rows.view(block_table.shape[0], -1, cache.shape[-1]).to(q.dtype)
    return _slots_lse_attention(q, kv, seq_lens)


def flat_slots_uncast_attention(q, cache, block_table, seq_lens, k_scale):
    """User code over a cache of q's dtype: the rows by slots used as they are (no cast, no reshape, no scale)."""
    bs = cache.shape[1]
    pos = torch.arange(block_table.shape[1] * bs, device=q.device)
    kv = cache.view(-1, cache.shape[-1])[block_table.long()[:, pos // bs] * bs + pos % bs]
    return _slots_lse_attention(q, kv, seq_lens)


def flat_slots_cast_first_attention(q, cache, block_table, seq_lens, k_scale):
    """User code: flattened slots, the rows cast before the view back to [B, T, D], then scaled."""
    bs = cache.shape[1]
    pos = torch.arange(block_table.shape[1] * bs, device=q.device)
    slots = block_table.long()[:, pos // bs] * bs + pos % bs
    rows = cache.view(-1, cache.shape[-1])[slots.view(-1)].to(q.dtype)
    kv = rows.view(block_table.shape[0], -1, cache.shape[-1]) * k_scale
    return _slots_lse_attention(q, kv, seq_lens)


def given_slots_attention(q, cache, slots, seq_lens, k_scale):
    """User code: flattened-cache rows gathered by slots passed in (not derived from a block table in the graph)."""
    kv = cache.view(-1, cache.shape[-1])[slots].to(q.dtype) * k_scale
    return _slots_lse_attention(q, kv, seq_lens)


def half_page_slots_attention(q, cache, block_table, seq_lens, k_scale):
    """User code with a slot formula of half the cache's block size: not cache[block_table], must not be rewritten."""
    bs = cache.shape[1] // 2
    pos = torch.arange(block_table.shape[1] * bs, device=q.device)
    slots = block_table.long()[:, pos // bs] * bs + pos % bs
    kv = cache.view(-1, cache.shape[-1])[slots].to(q.dtype) * k_scale
    return _slots_lse_attention(q, kv, seq_lens)


def fused_gather_attention(q, cache, block_table, seq_lens, k_scale):
    """After the cache_gather pass: the gather is fx_mla::gather_dequant_cache_paged; softmax form."""
    kv = torch.ops.fx_mla.gather_dequant_cache_paged(cache, block_table, k_scale, q.dtype)
    s = torch.einsum("bhd,btd->bht", q, kv).float() * 192 ** -0.5
    pad = torch.arange(kv.shape[1], device=q.device)[None, None, :] >= seq_lens[:, None, None]
    s = s.masked_fill(pad, float("-inf"))
    return torch.einsum("bht,btl->bhl", torch.softmax(s, -1).to(q.dtype), kv[..., :L])


def fp8_query_attention(q, q_scale, cache, block_table, seq_lens, k_scale):
    """Static FP8 query (quantize -> dequantize, as MLADecode writes it) then the model's attention."""
    q_fp8 = (q / q_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    return model_attention(q_fp8.to(q.dtype) * q_scale, cache, block_table, seq_lens, k_scale)


# ---------------------------------------------------------------- attentions that must be declined

def _scores(q, kv):
    return torch.matmul(q, kv.transpose(1, 2)).float() * 192 ** -0.5


def declined_attentions(q, cache, block_table, seq_lens, k_scale, keep):
    """Four attentions over one cache, each with one defect; returns what each computes.

    keep [B, T] bool: an arbitrary mask input (not a length mask); the probabilities of the second are also
    returned; the third reads L = 544 latent entries (over the kernel's 512); the fourth is not masked at all.
    """
    kv = gather_pages(cache, block_table, q.dtype, k_scale)
    pos = torch.arange(kv.shape[1], device=q.device)
    pad = (pos[None, :] >= seq_lens[:, None])[:, None, :]
    # distinct queries (exact power-of-two multiples), so that CSE cannot merge the four score matmuls
    s1 = _scores(q, kv).masked_fill(~keep[:, None, :], float("-inf"))
    o1 = torch.softmax(s1, -1).to(q.dtype) @ kv[..., :L]
    p2 = torch.softmax(_scores(q * 2, kv).masked_fill(pad, float("-inf")), -1)
    o2 = p2.to(q.dtype) @ kv[..., :L]
    p3 = torch.softmax(_scores(q * 0.5, kv).masked_fill(pad, float("-inf")), -1)
    o3 = p3.to(q.dtype) @ kv[..., :544]
    o4 = torch.softmax(_scores(q * 0.25, kv), -1).to(q.dtype) @ kv[..., :L]
    return o1, o2, p2, o3, o4


def capability_attentions(q, q_scale, cache_fp8, table_fp8, cache_bf16, table_bf16, seq_lens, k_scale):
    """One FP8-dequantized query attending an FP8 cache and a bf16 cache (for the capability guards)."""
    q_fp8 = (q / q_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    qd = q_fp8.to(q.dtype) * q_scale
    return (paged_decode_attention(qd, cache_fp8, table_fp8, seq_lens, k_scale, 192 ** -0.5, L),
            paged_decode_attention(qd, cache_bf16, table_bf16, seq_lens, k_scale, 192 ** -0.5, L))


# ---------------------------------------------------------------- inputs and the float64 reference

def attention_problem(heads: int, block_size: int, kv_cache_dtype: str = "fp8", seq_lens: Sequence[int] = SEQ_LENS,
                      seed: int = 0, device="cpu"):
    """(args, stored): q [B, H, 576] bf16, paged cache, int32 block_table and seq_lens, fp32 k_scale; and the
    float64 values the cache holds for each request ([S_b, 576])."""
    cfg = MLAConfig(num_heads=heads, block_size=block_size, kv_cache_dtype=kv_cache_dtype)
    g = torch.Generator().manual_seed(seed)
    latents = [torch.randn(s, cfg.entry_size, generator=g) for s in seq_lens]
    k_scale = torch.tensor(3.0 / 448, dtype=torch.float32)
    cache, table = fill_paged_cache(cfg, latents, k_scale, generator=g)
    q = (torch.randn(len(seq_lens), heads, cfg.entry_size, generator=g) * 2).to(torch.bfloat16)
    lens = torch.tensor(list(seq_lens), dtype=torch.int32)
    args = tuple(t.to(device) for t in (q, cache, table, lens, k_scale))
    return args, stored_values(cfg, latents, k_scale)


def reference_attention(q: torch.Tensor, stored, sm_scale: float = SM_SCALE, latent: int = L):
    """Float64 (o [B, H, L], lse [B, H]); an empty request gives o = 0, lse = -inf."""
    q = q.double().cpu()
    outs, lses = [], []
    for b, kv in enumerate(stored):
        if kv.shape[0] == 0:
            outs.append(torch.zeros(q.shape[1], latent, dtype=torch.float64))
            lses.append(torch.full((q.shape[1],), float("-inf"), dtype=torch.float64))
            continue
        s = q[b] @ kv.T * sm_scale
        lses.append(torch.logsumexp(s, -1))
        outs.append(torch.softmax(s, -1) @ kv[:, :latent])
    return torch.stack(outs), torch.stack(lses)


def model_reference(pb, module, args):
    """Float64 output of an MLADecode rank (DCP 1) on the query it computes itself in the model dtype (so the FP8
    query rounds the same way), over the values the cache stores. ``pb`` is a tests.mla.problems.Problem."""
    from fx_mla.mla.decode import quantize_dequantize_query

    cfg = pb.cfg
    with torch.no_grad():
        q = torch.cat([torch.einsum("bhp,hpl->bhl", args[0], module.w_uk), args[1]], dim=-1)
        if cfg.quantize_query:
            q = quantize_dequantize_query(q, args[6], cfg.query_fp8_dtype)
    o, _ = reference_attention(q, stored_values(cfg, pb.latents, pb.k_scale), cfg.sm_scale, cfg.kv_lora_rank)
    return torch.einsum("bhl,hlv->bhv", o, module.w_uv.double().cpu())


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    finite = torch.isfinite(ref)
    return float((out[finite] - ref[finite]).norm() / ref[finite].norm().clamp_min(1e-300))


def compile_run(fn, args, passes=("decode_attention",), inner="eager", inductor_patches=None, **options):
    """Compile ``fn`` with the fx_mla backend (fullgraph, dynamic, no compile caches), run it once; returns
    (outputs, report). ``inductor_patches``: Inductor config set around the compile (not through the backend's
    ``inductor_config`` option, which currently fails inside the pass manager: it re-validates the options while
    the manager is installed in Inductor's config, and deep-copying that config cannot pickle the manager)."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    reports = []
    compiled = torch.compile(fn, backend="fx_mla", fullgraph=True, dynamic=True,
                             options={"passes": tuple(passes), "inner": inner, "report": reports, **options})
    # caches off: a graph served from Inductor's cache would run no pass and leave no report to check
    with torch.no_grad(), inductor_config.patch(fx_graph_cache=False, **(inductor_patches or {})), \
            functorch_config.patch(enable_autograd_cache=False):
        out = compiled(*args)
    return out, reports[-1]
