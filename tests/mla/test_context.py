"""Context gather for chunked prefill against the float64 reference; DCP 2/4 against DCP 1."""
import pytest
import torch

from fx_mla.launch import run_ranks
from fx_mla.mla import ContextGather, MLAConfig, reference_context, stored_values

from .problems import context_inputs, rel_err

SEQS = [40, 7, 0, 100]                 # cached tokens of each request
CHUNKS = [([40, 7, 0, 100], None),     # whole context
          ([30, 2, 0, 57], [10, 5, 0, 43])]   # chunks starting inside the sequence


def _latents(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, 576, generator=g) for s in SEQS]


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("dtype,kv_dtype", [(torch.float32, "auto"), (torch.bfloat16, "auto"),
                                            (torch.bfloat16, "fp8"), (torch.float16, "fp8_e5m2")])
@pytest.mark.parametrize("chunk", range(len(CHUNKS)))
def test_context_gather_matches_reference(dtype, kv_dtype, block_size, chunk):
    cfg = MLAConfig.deepseek_v2_lite(dtype=dtype, kv_cache_dtype=kv_dtype, block_size=block_size)
    lens, starts = CHUNKS[chunk]
    lat = _latents(block_size)
    k_scale = torch.tensor(3.0 / 448)
    got = ContextGather(cfg)(*context_inputs(cfg, lat, lens, starts, k_scale, rank=0))
    want = reference_context(stored_values(cfg, lat, k_scale), lens, starts)
    assert got.dtype == dtype and got.shape == want.shape
    # The gather is a copy of stored values rounded once to the model dtype.
    assert torch.equal(got, want.to(dtype))


def _context_worker(rank, world_size):
    outs = []
    for interleave in (1, 16):
        for lens, starts in CHUNKS:
            cfg = MLAConfig.deepseek_v2_lite(kv_cache_dtype="fp8", block_size=16, dcp_size=world_size,
                                             interleave=interleave)
            outs.append(ContextGather(cfg)(*context_inputs(cfg, _latents(7), lens, starts,
                                                          torch.tensor(0.01), rank=rank)))
    return outs


@pytest.mark.parametrize("world_size", [2, 4])
def test_context_gather_dcp_equals_dcp1(world_size):
    per_rank = run_ranks(_context_worker, world_size, timeout=300)
    cfg = MLAConfig.deepseek_v2_lite(kv_cache_dtype="fp8", block_size=16)
    want = [ContextGather(cfg)(*context_inputs(cfg, _latents(7), lens, starts, torch.tensor(0.01), rank=0))
            for _ in (1, 16) for lens, starts in CHUNKS]
    for r in range(world_size):
        for got, ref in zip(per_rank[r], want):
            assert torch.equal(got, ref)


def test_context_gather_compiles_fullgraph():
    cfg = MLAConfig.deepseek_v2_lite(kv_cache_dtype="fp8", block_size=16)
    lat = _latents(3)
    inputs = context_inputs(cfg, lat, [30, 2, 0, 57], [10, 5, 0, 43], torch.tensor(0.01), rank=0)
    torch._dynamo.reset()
    compiled = torch.compile(ContextGather(cfg), fullgraph=True, dynamic=True)
    assert torch.equal(compiled(*inputs), ContextGather(cfg)(*inputs))
