"""Plain-PyTorch cache gathers the cache_gather pass rewrites, their inputs, and a compile helper.

Shared by tests/passes/test_cache_gather.py (CPU) and tests/gpu/test_cache_gather_pass_gpu.py; no expecttest here.
Each gather is the code a model writes: index / index_select of pages, flattened slots, the token-parallel context
gather, each followed by the upcast and the scale multiply.
"""
from __future__ import annotations

import torch

from tests.ops.gather_dequant_cache_cases import (FP8, assert_bitwise, plain_ds_mla_dequant,  # noqa: F401
                                                  ragged_lengths, random_cache, random_scale, token_problem)

import fx_mla.backend  # noqa: F401  (registers backend="fx_mla")


def dequant(x, dtype, scale):
    return x.to(dtype) * scale if scale is not None else x.to(dtype)


def paged_index(cache, block_table, scale, dtype=torch.bfloat16):
    """What fx_mla/mla/decode.py writes: cache[block_table].view(B, -1, D) → dtype × k_scale."""
    x = cache[block_table].view(block_table.shape[0], -1, cache.shape[-1])
    return dequant(x, dtype, scale)


def paged_index_select(cache, block_table, scale, dtype=torch.bfloat16):
    x = torch.index_select(cache, 0, block_table.flatten()).view(block_table.shape[0], -1, cache.shape[-1])
    return dequant(x, dtype, scale)


def paged_flat_slots(cache, block_table, scale, dtype=torch.bfloat16):
    """cache.view(-1, D)[slots] with slots = block_table[b, p // bs] * bs + p % bs for every page position p."""
    bs = cache.shape[1]
    pos = torch.arange(block_table.shape[1] * bs, device=cache.device)
    slots = block_table.long()[:, pos // bs] * bs + pos % bs
    return dequant(cache.view(-1, cache.shape[-1])[slots], dtype, scale)


def paged_fp32_then_round(cache, block_table, scale, dtype=torch.bfloat16):
    """(x.float() * s).to(dtype): fp32 product, one rounding."""
    x = cache[block_table].view(block_table.shape[0], -1, cache.shape[-1])
    return (x.float() * scale).to(dtype)


def token_gather(cache, block_table, cu_seq_lens, token_to_seq, seq_starts, scale, dtype=torch.bfloat16):
    """fx_mla/mla/context.py's gather_context, written out."""
    bs = cache.shape[1]
    tts = token_to_seq.long()
    valid = tts >= 0
    b = tts.clamp_min(0)
    t = torch.arange(tts.shape[0], device=cache.device)
    off = t - cu_seq_lens.long()[b]
    if seq_starts is not None:
        off = off + seq_starts.long()[b]
    off = torch.where(valid, off, torch.zeros_like(off))
    blocks = block_table.long()[b, torch.div(off, bs, rounding_mode="floor")]
    return dequant(cache[blocks, off % bs], dtype, scale)


def ds_mla_paged(cache, block_table, dtype=torch.bfloat16):
    """656-byte fp8_ds_mla rows of every page, dequantized the way vLLM's plain-PyTorch reference does it."""
    return plain_ds_mla_dequant(cache[block_table].view(block_table.shape[0], -1, 656), dtype)


def ds_mla_flat_slots(cache, block_table, dtype=torch.bfloat16):
    bs = cache.shape[1]
    pos = torch.arange(block_table.shape[1] * bs, device=cache.device)
    slots = block_table.long()[:, pos // bs] * bs + pos % bs
    return plain_ds_mla_dequant(cache.view(-1, 656)[slots], dtype)


def ds_mla_token(cache, block_table, cu_seq_lens, token_to_seq, seq_starts, dtype=torch.bfloat16):
    torch._check(cu_seq_lens.shape[0] == block_table.shape[0] + 1)
    torch._check(seq_starts.shape[0] == block_table.shape[0])
    torch._check(cache.shape[-1] == 656)
    bs = cache.shape[1]
    tts = token_to_seq.long()
    b = tts.clamp_min(0)
    off = torch.arange(tts.shape[0], device=cache.device) - cu_seq_lens.long()[b] + seq_starts.long()[b]
    off = torch.where(tts >= 0, off, torch.zeros_like(off))
    return plain_ds_mla_dequant(cache[block_table.long()[b, torch.div(off, bs, rounding_mode="floor")], off % bs],
                                dtype)


PAGED_FORMS = {"index": paged_index, "index_select": paged_index_select, "flat_slots": paged_flat_slots,
               "fp32_then_round": paged_fp32_then_round}


def paged_inputs(seed, d, cache_dtype, bs=4, lengths=(5, 0, 9, 1), device="cpu"):
    """A ragged batch (an empty request included) of scattered pages, fresh random entries, a scale."""
    g = torch.Generator().manual_seed(seed)
    pages = [max(1, -(-n // bs)) for n in lengths]
    num_blocks = sum(pages) + 3
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.randint(0, num_blocks, (len(lengths), max(pages)), generator=g)
    used = 0
    for b, p in enumerate(pages):
        table[b, :p] = perm[used:used + p]
        used += p
    cache = random_cache(num_blocks, bs, d, cache_dtype, g)
    scale = random_scale(g) if cache_dtype in FP8 else None
    return cache.to(device), table.to(torch.int32).to(device), None if scale is None else scale.to(device)


def token_inputs(seed, d, cache_dtype, bs=4, total=23, batch=4, padding=2, starts=True, device="cpu"):
    """Ragged requests (one empty), chunks starting inside their sequences, DCP padding tokens at the end."""
    g = torch.Generator().manual_seed(seed)
    lengths = ragged_lengths(total, batch, g, empty=1)
    st = torch.randint(0, 2 * bs, (batch,), generator=g).tolist() if starts else None
    p = token_problem(lengths, bs, g, starts=st, padding=padding).to(device)
    cache = random_cache(p.num_blocks, bs, d, cache_dtype, g).to(device)
    scale = random_scale(g).to(device) if cache_dtype in FP8 else None
    return cache, p.block_table, p.cu_seq_lens, p.token_to_seq, p.seq_starts, scale


def compile_run(fn, args, passes, inner="eager", dynamic=True, **inductor_config):
    """(output, CompileReport) of fn compiled with the fx_mla backend running ``passes``; fresh dynamo state."""
    torch._dynamo.reset()
    compiled, reports = compile_fn(fn, passes, inner, dynamic)
    return run_compiled(compiled, args, **inductor_config), reports[-1]


def compile_fn(fn, passes, inner="eager", dynamic=True):
    """(compiled fn, list its CompileReports are appended to); compiles on first call (see run_compiled)."""
    reports: list = []
    options = {"passes": list(passes), "inner": inner, "report": reports}
    return torch.compile(fn, backend="fx_mla", options=options, dynamic=dynamic, fullgraph=True), reports


def run_compiled(compiled, args, **inductor_config):
    from torch._inductor import config

    # Inductor settings as global patches: the passes read them while the graph compiles.
    with torch.no_grad(), config.patch(fx_graph_cache=False, **inductor_config):
        return compiled(*args)


def graph_diff(report) -> str:
    """Lines the passes removed (-) and added (+), in graph order: a compact before/after snapshot."""
    before, after = report.graph_before.splitlines(), report.graph_after.splitlines()
    kept_b, kept_a = set(before), set(after)
    return "\n".join(["- " + x for x in before if x not in kept_a] + ["+ " + x for x in after if x not in kept_b])
