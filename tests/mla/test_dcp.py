"""DCP 2 and 4 (gloo, one process a rank) equal DCP 1 on the same stored values."""
import dataclasses

import pytest
import torch

from fx_mla.launch import run_ranks
from fx_mla.mla import MLAConfig

from .problems import make_problem, rank_inputs, rel_err

# Ragged batch: sequences shorter than N*I (ranks without tokens), one empty, one spanning many blocks.
SEQ_LENS = [1, 3, 0, 21, 150]


def _cases(world_size):
    for interleave in (1, 16):
        for dtype, kv in ((torch.float32, "auto"), (torch.bfloat16, "fp8"), (torch.bfloat16, "fp8_e5m2")):
            yield dict(num_heads=4 * world_size, dtype=dtype, kv_cache_dtype=kv, block_size=16,
                       interleave=interleave, dcp_size=world_size, quantize_query=kv == "fp8")


def _dcp_worker(rank, world_size, compile_first):
    outs = []
    for i, kw in enumerate(_cases(world_size)):
        pb = make_problem(MLAConfig(**kw), SEQ_LENS, seed=i)
        module, args = rank_inputs(pb, rank)
        if compile_first and i == 0:
            module = torch.compile(module, fullgraph=True, dynamic=True)
        with torch.no_grad():
            outs.append(module(*args))
    return outs


@pytest.mark.parametrize("world_size", [2, 4])
def test_dcp_equals_dcp1(world_size):
    per_rank = run_ranks(_dcp_worker, world_size, world_size == 2, timeout=400)
    for i, kw in enumerate(_cases(world_size)):
        pb = make_problem(MLAConfig(**{**kw, "dcp_size": 1}), SEQ_LENS, seed=i)
        module, args = rank_inputs(pb, 0)
        want = module(*args)
        got = torch.cat([per_rank[r][i] for r in range(world_size)], dim=1)
        assert not got.isnan().any(), kw
        assert got[:, :, :].shape == want.shape
        assert got[2].abs().max() == 0, "an empty sequence gives exactly zero on every rank"
        bound = 1e-5 if kw["dtype"] == torch.float32 else 1e-2
        assert rel_err(got, want) < bound, (kw, rel_err(got, want))
