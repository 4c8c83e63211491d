"""Decode step (DCP 1) against the float64 reference, per dtype and block size; fullgraph compile."""
import pytest
import torch

from fx_mla.mla import MLAConfig

from .problems import make_problem, rank_inputs, reference_out, rel_err

# (model dtype, kv_cache_dtype, quantize_query) -> relative-error bound against float64.
CASES = {
    (torch.float32, "auto", False): 1e-5,
    (torch.bfloat16, "auto", False): 1e-2,
    (torch.bfloat16, "fp8", False): 1e-2,
    (torch.bfloat16, "fp8_e5m2", False): 1e-2,
    (torch.float16, "fp8_e4m3", False): 2e-3,
    (torch.bfloat16, "fp8", True): 2e-2,
    (torch.float32, "fp8", True): 1e-5,
}


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("dtype,kv_dtype,quant_q", list(CASES))
def test_decode_matches_float64_reference(dtype, kv_dtype, quant_q, block_size):
    cfg = MLAConfig.deepseek_v2_lite(dtype=dtype, kv_cache_dtype=kv_dtype, block_size=block_size,
                                     quantize_query=quant_q)
    pb = make_problem(cfg, [1, 37, 0, 130], seed=block_size)
    module, args = rank_inputs(pb, 0)
    out = module(*args)
    assert out.dtype == dtype and out.shape == (4, 16, 128)
    assert not out.isnan().any()
    assert out[2].abs().max() == 0, "an empty sequence must give exactly zero"
    assert rel_err(out, reference_out(pb)) < CASES[dtype, kv_dtype, quant_q]


def test_decode_error_threshold_can_fail():
    """The comparison above detects a wrong kernel: dropping the last token of one request breaks it."""
    cfg = MLAConfig.deepseek_v2_lite(kv_cache_dtype="fp8")
    pb = make_problem(cfg, [3, 5], seed=3)
    module, args = rank_inputs(pb, 0)
    lens = args[4].clone()
    lens[0] -= 1
    out = module(*args[:4], lens, *args[5:])
    assert rel_err(out, reference_out(pb)) > 2e-2


def test_decode_compiles_fullgraph_dynamic():
    cfg = MLAConfig.deepseek_v2_lite(kv_cache_dtype="fp8", block_size=16, quantize_query=True)
    torch._dynamo.reset()
    outs = []
    for seed, lens in enumerate(([5, 40, 0], [17, 3], [2, 9, 33, 64])):
        pb = make_problem(cfg, lens, seed=seed)
        module, args = rank_inputs(pb, 0)
        compiled = torch.compile(module, fullgraph=True, dynamic=True)
        with torch.no_grad():
            got = compiled(*args)
            want = module(*args)
        outs.append(rel_err(got, want))
        assert rel_err(got, reference_out(pb)) < 3e-2
    assert max(outs) < 1e-2
