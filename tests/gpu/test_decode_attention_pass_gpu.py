"""The decode_attention pass on CUDA (marker cuda; multigpu for NCCL DCP; no expecttest).

DeepSeek shapes (D = 576, L = 512), FP8 e4m3 cache, Inductor as the inner compiler with
emulate_precision_casts=True (so the rest of the graph rounds bf16 intermediates as eager does, and the float64
references built from eager values see the same FP8 query). Run: PYTHONPATH=. python3 -m pytest -m cuda <this file>.
"""
import pytest
import torch

from fx_mla.launch import run_ranks
from fx_mla.mla import MLAConfig
from fx_mla.mla.decode import quantize_dequantize_query
from tests.mla.problems import make_problem, rank_inputs
from tests.passes.decode_attention_cases import (attention_problem, compile_run, flat_slots_attention,
                                                 flat_slots_index_select_attention, fp8_query_attention,
                                                 model_attention, model_reference, reference_attention, rel_err,
                                                 softmax_einsum_attention)

pytestmark = pytest.mark.cuda

SEQ_LENS = [1, 3, 0, 700, 2049]
PASSES = ("quant_before_gather", "cache_gather", "decode_attention")
INDUCTOR = dict(inner="inductor", inductor_patches={"emulate_precision_casts": True})


def _fp8_capable():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def _only_match(report):
    p = report.pass_report("decode_attention")
    assert len(p.matches) == 1 and not p.declines, report.format(graphs=False)
    return p.matches[0].detail


@pytest.mark.parametrize("heads,block_size,kv_dtype", [(128, 64, "fp8"), (16, 64, "fp8"), (16, 16, "auto"),
                                                       (128, 16, "fp8_e5m2")])
def test_decode_attention_pass_cuda_matches_float64(heads, block_size, kv_dtype):
    if kv_dtype != "auto" and not _fp8_capable():
        pytest.skip("FP8 caches need compute capability >= 8.9")
    torch._dynamo.reset()
    args, stored = attention_problem(heads, block_size, kv_dtype, SEQ_LENS, seed=heads, device="cuda")
    (o, lse), report = compile_run(model_attention, args, **INDUCTOR)
    _only_match(report)
    ref_o, ref_lse = reference_attention(args[0], stored)
    plain_o, plain_lse = model_attention(*args)
    assert not o.isnan().any() and not lse.isnan().any()
    assert rel_err(o, ref_o) <= 1e-2 and rel_err(o, plain_o) <= 1e-2
    assert rel_err(lse, ref_lse) <= 1e-3 and rel_err(lse, plain_lse) <= 1e-2
    assert o[2].abs().max() == 0 and (lse[2] == float("-inf")).all()


def test_decode_attention_pass_cuda_fp8_query_takes_the_fp8_path():
    if not _fp8_capable():
        pytest.skip("the FP8 query path needs compute capability >= 8.9")
    torch._dynamo.reset()
    args, stored = attention_problem(128, 64, "fp8", SEQ_LENS, seed=1, device="cuda")
    q_scale = torch.tensor(0.05, device="cuda")
    (o, lse), report = compile_run(fp8_query_attention, (args[0], q_scale) + args[1:], **INDUCTOR)
    assert "fp8 query with q_scale" in _only_match(report)
    qd = quantize_dequantize_query(args[0], q_scale, torch.float8_e4m3fn)
    ref_o, ref_lse = reference_attention(qd, stored)
    # FP8 x FP8 scores accumulate in the tensor cores' reduced-precision adder: the op's own GPU tests measured
    # lse errors up to 2.8e-3 at 128 heads on an H200, and allow 5e-3
    assert rel_err(o, ref_o) <= 1e-2 and rel_err(lse, ref_lse) <= 5e-3
    assert rel_err(o, fp8_query_attention(args[0], q_scale, *args[1:])[0]) <= 1e-2


def test_decode_attention_pass_cuda_softmax_einsum_variant():
    if not _fp8_capable():
        pytest.skip("FP8 caches need compute capability >= 8.9")
    torch._dynamo.reset()
    args, stored = attention_problem(16, 64, "fp8", SEQ_LENS, seed=2, device="cuda")
    o, report = compile_run(softmax_einsum_attention, args, **INDUCTOR)
    assert _only_match(report).startswith("softmax attention")
    assert rel_err(o, reference_attention(args[0], stored)[0]) <= 1e-2 and o[2].abs().max() == 0


@pytest.mark.parametrize("passes", [("decode_attention",), ("cache_gather", "decode_attention")], ids=len)
@pytest.mark.parametrize("fn", [flat_slots_attention, flat_slots_index_select_attention])
def test_decode_attention_pass_cuda_flat_slots(fn, passes):
    """Rows of the flattened cache by slots from the block table (session 11; the op gets the 3-D cache and the
    int32 table, the call the index form makes)."""
    if not _fp8_capable():
        pytest.skip("FP8 caches need compute capability >= 8.9")
    torch._dynamo.reset()
    args, stored = attention_problem(128, 64, "fp8", SEQ_LENS, seed=3, device="cuda")
    (o, lse), report = compile_run(fn, args, passes=passes, **INDUCTOR)
    assert _only_match(report).startswith("logsumexp attention")
    ref_o, ref_lse = reference_attention(args[0], stored)
    assert rel_err(o, ref_o) <= 1e-2 and rel_err(lse, ref_lse) <= 1e-3
    assert o[2].abs().max() == 0 and (lse[2] == float("-inf")).all()


@pytest.mark.parametrize("heads", [16, 128])
def test_decode_attention_pass_cuda_model_with_all_passes(heads):
    if not _fp8_capable():
        pytest.skip("FP8 caches need compute capability >= 8.9")
    torch._dynamo.reset()
    cfg = MLAConfig(num_heads=heads, kv_cache_dtype="fp8", quantize_query=True)
    pb = make_problem(cfg, SEQ_LENS)
    module, args = rank_inputs(pb, 0, device="cuda")
    out, report = compile_run(module, args, passes=PASSES, **INDUCTOR)
    assert "fp8 query with q_scale" in _only_match(report)
    with torch.no_grad():
        plain = module(*args)
    assert rel_err(out, model_reference(pb, module, args)) <= 1e-2 and rel_err(out, plain) <= 1e-2
    assert not out.isnan().any() and out[2].abs().max() == 0


def _nccl_worker(rank, world_size):
    cfg = MLAConfig.deepseek_v3(kv_cache_dtype="fp8", quantize_query=True, dcp_size=world_size)
    module, args = rank_inputs(make_problem(cfg, SEQ_LENS), rank, device=f"cuda:{rank}")
    out, report = compile_run(module, args, passes=PASSES, **INDUCTOR)
    p = report.pass_report("decode_attention")
    return out.cpu(), len(p.matches), [d.reason for d in p.declines]


@pytest.mark.multigpu
@pytest.mark.parametrize("world_size", [2, 4])
def test_decode_attention_pass_nccl_dcp_equals_dcp1(world_size):
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs")
    if not _fp8_capable():
        pytest.skip("FP8 caches need compute capability >= 8.9")
    per_rank = run_ranks(_nccl_worker, world_size, backend="nccl", timeout=400)
    assert all(r[1:] == (1, []) for r in per_rank), [r[1:] for r in per_rank]
    pb = make_problem(MLAConfig.deepseek_v3(kv_cache_dtype="fp8", quantize_query=True), SEQ_LENS)
    module, args = rank_inputs(pb, 0, device="cuda")
    got = torch.cat([r[0] for r in per_rank], dim=1)
    assert not got.isnan().any() and got[2].abs().max() == 0
    assert rel_err(got, model_reference(pb, module, args)) <= 1e-2
