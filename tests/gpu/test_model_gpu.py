"""The plain-PyTorch model on CUDA: DCP 1 against float64, DCP 2/4 over NCCL against DCP 1, fullgraph compile."""
import pytest
import torch

from fx_mla.launch import run_ranks
from fx_mla.mla import MLAConfig
from tests.mla.problems import make_problem, rank_inputs, reference_out, rel_err

pytestmark = pytest.mark.cuda

SEQ_LENS = [1, 3, 0, 700, 2049]


@pytest.mark.parametrize("kv_dtype,quant_q", [("auto", False), ("fp8", False), ("fp8", True), ("fp8_e5m2", False)])
def test_decode_cuda_matches_reference(kv_dtype, quant_q):
    cfg = MLAConfig.deepseek_v3(kv_cache_dtype=kv_dtype, quantize_query=quant_q)
    pb = make_problem(cfg, SEQ_LENS)
    module, args = rank_inputs(pb, 0, device="cuda")
    ref = reference_out(pb)
    with torch.no_grad():
        assert rel_err(module(*args).cpu(), ref) < (2e-2 if quant_q else 1e-2)
        compiled = torch.compile(module, fullgraph=True, dynamic=True)
        assert rel_err(compiled(*args).cpu(), ref) < (2e-2 if quant_q else 1e-2)


def _nccl_worker(rank, world_size):
    cfg = MLAConfig.deepseek_v3(kv_cache_dtype="fp8", quantize_query=True, dcp_size=world_size, interleave=1)
    module, args = rank_inputs(make_problem(cfg, SEQ_LENS), rank, device=f"cuda:{rank}")
    with torch.no_grad():
        eager = module(*args).cpu()
        compiled = torch.compile(module, fullgraph=True, dynamic=True)(*args).cpu()
    return eager, compiled


@pytest.mark.multigpu
@pytest.mark.parametrize("world_size", [2, 4])
def test_dcp_nccl_equals_dcp1(world_size):
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs")
    per_rank = run_ranks(_nccl_worker, world_size, backend="nccl", timeout=400)
    cfg = MLAConfig.deepseek_v3(kv_cache_dtype="fp8", quantize_query=True)
    ref = reference_out(make_problem(cfg, SEQ_LENS))
    for i in range(2):
        got = torch.cat([r[i] for r in per_rank], dim=1)
        assert not got.isnan().any()
        assert rel_err(got, ref) < 2e-2
