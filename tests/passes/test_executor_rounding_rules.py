"""Compile-time rounding rules of the passes that must reproduce the unrewritten graph's executor bitwise:
which executors round a 0-dim fp32 scale (cache_gather), decided from dtypes, the inner compiler, Inductor's config
and the device only. GPU numerics: tests/gpu/*_pass_gpu.py and benchmarks/diag_inductor_rounding.py."""
import types

import pytest
import torch
import torch.fx

from fx_mla.passes import cache_gather as cg


def _scale_node(dim=0):
    g = torch.fx.Graph()
    node = g.placeholder("k_scale")
    node.meta["val"] = torch.empty((1,) * dim, dtype=torch.float32)
    return node


def _ctx(inner, device):
    return types.SimpleNamespace(options=types.SimpleNamespace(inner=inner), device=torch.device(device))


@pytest.mark.parametrize("inner,device,emulate,mul_dtype,dim,want", [
    ("eager", "cuda", False, torch.bfloat16, 0, True),      # eager CUDA casts the 0-dim scale to bf16
    ("eager", "cuda", False, torch.float32, 0, False),      # (x.float() * s).to(bf16): the multiply is fp32
    ("eager", "cuda", False, torch.bfloat16, 1, False),     # a scale with dims promotes the multiply to fp32
    ("eager", "cpu", False, torch.bfloat16, 0, False),      # CPU uses the scale in fp32
    ("inductor", "cuda", False, torch.bfloat16, 0, False),  # default Inductor keeps the scale in fp32
    ("inductor", "cuda", True, torch.bfloat16, 0, True),    # emulate_precision_casts rounds it
    ("inductor", "cuda", True, torch.float32, 0, False),
])
def test_cache_gather_scale_rounding_rule(inner, device, emulate, mul_dtype, dim, want):
    from torch._inductor import config as inductor_config

    tail = cg.Tail([], None, torch.bfloat16, _scale_node(dim), [], mul_dtype=mul_dtype)
    with inductor_config.patch(emulate_precision_casts=emulate):
        assert cg._scale_rounded_by_executor(_ctx(inner, device), tail) is want


def test_cache_gather_emulate_override_applies_on_cuda_only(monkeypatch):
    from torch._inductor import config as inductor_config

    monkeypatch.setattr(cg, "EMULATE_SCALE_ROUNDING_OVERRIDE", False)
    tail = cg.Tail([], None, torch.bfloat16, _scale_node(), [], mul_dtype=torch.bfloat16)
    with inductor_config.patch(emulate_precision_casts=True):
        assert cg._scale_rounded_by_executor(_ctx("inductor", "cuda"), tail) is False
        assert cg._scale_rounded_by_executor(_ctx("inductor", "cpu"), tail) is True
