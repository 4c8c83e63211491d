"""Graphs, inputs and multi-rank workers of the quant_before_gather pass tests.

Shared by tests/passes/test_quant_before_gather.py (CPU, gloo) and tests/gpu/test_quant_before_gather_gpu.py (CUDA,
NCCL); no expecttest here. Each module is code a model writes: an all-gather (functional collectives) followed by
one of the quantization forms plain PyTorch produces, or the DCP decode step / context gather of fx_mla/mla.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import torch.distributed as dist
from torch import nn

from fx_mla.backend import fx_mla_backend
from fx_mla.mla import ContextGather, MLAConfig
from fx_mla.mla.decode import all_gather_along

PASS = "quant_before_gather"
FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
SCALE_FORMS = ("input_div", "input_reciprocal", "input_inverse", "buffer_div", "python_mul", "python_div_pow2",
               "dynamic", "per_token")
DEQUANT_FORMS = ("dequant_mul", "dequant_f32")  # the mirror: all_gather(dequantize(x_fp8))
CLAMP_FORMS = ("clamp", "min_max", "max_min", "float_clamp")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One all-gather → quantize graph: gather dim, input dtype, FP8 dtype, scale form, clamp form, local shape."""
    dim: int = 1
    dtype: str = "bf16"
    fp8: str = "e4m3"
    scale: str = "input_div"
    clamp: str = "clamp"
    shape: tuple = (3, 2, 8)
    inner: str = ""  # the inner compiler for this variant ("": the worker's)


class GatherQuant(nn.Module):
    """all_gather(x, dim) then quantize as ``variant`` says; returns the FP8 tensor (and per-token scales)."""

    def __init__(self, variant: Variant):
        super().__init__()
        self.v = variant
        self.register_buffer("buffer_scale", torch.tensor(0.04))

    def forward(self, x, s):
        v, fp8 = self.v, FP8[self.v.fp8]
        fmax = torch.finfo(fp8).max
        if v.scale == "dequant_mul":  # x is FP8 here
            return all_gather_along(x.to(DTYPES[v.dtype]) * s, v.dim, dist.get_world_size(), dist.group.WORLD)
        if v.scale == "dequant_f32":
            return all_gather_along((x.float() * s).to(DTYPES[v.dtype]), v.dim, dist.get_world_size(), dist.group.WORLD)
        a = all_gather_along(x, v.dim, dist.get_world_size(), dist.group.WORLD)
        extra = ()
        if v.scale == "input_div":
            y = a / s
        elif v.scale == "input_reciprocal":
            y = a * (1 / s)
        elif v.scale == "input_inverse":
            y = a * s
        elif v.scale == "buffer_div":
            y = a / self.buffer_scale
        elif v.scale == "python_mul":
            y = a * 25.0
        elif v.scale == "python_div_pow2":
            y = a / 0.03125
        elif v.scale == "dynamic":
            y = a / (a.abs().amax().float().clamp(min=1e-12) / fmax)
        elif v.scale == "per_token":
            extra = (a.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / fmax,)
            y = a / extra[0]
        else:
            raise ValueError(v.scale)
        if v.clamp == "clamp":
            y = y.clamp(-fmax, fmax)
        elif v.clamp == "min_max":
            y = y.clamp(min=-fmax).clamp(max=fmax)
        elif v.clamp == "max_min":
            y = y.clamp(max=fmax).clamp(min=-fmax)
        elif v.clamp == "float_clamp":
            y = y.float().clamp(-fmax, fmax)
        return (y.to(fp8), *extra)


def variant_inputs(v: Variant, rank: int, device="cpu"):
    """Rank-specific data (never zeros, some values saturate at e4m3) and the scale every rank shares."""
    g = torch.Generator().manual_seed(1000 + 17 * rank)
    x = (torch.randn(v.shape, generator=g) * 12 + 0.01).to(DTYPES[v.dtype]).to(device)
    if v.scale in DEQUANT_FORMS:
        x = (x.float() / 0.05).clamp(-torch.finfo(FP8[v.fp8]).max, torch.finfo(FP8[v.fp8]).max).to(FP8[v.fp8])
    return x, torch.tensor(0.05, device=device)


class DecodeQuery(nn.Module):
    """The query half of MLADecode.forward (einsum, cat, head all-gather), ending with the FP8 query it quantizes.

    The model returns only the attention output; this exposes the FP8 query for bitwise comparison.
    """

    def __init__(self, decode: nn.Module):
        super().__init__()
        self.decode = decode

    def forward(self, q_nope, q_pe, q_scale):
        m = self.decode
        q = torch.cat([torch.einsum("bhp,hpl->bhl", q_nope, m.w_uk), q_pe], dim=-1)
        q = all_gather_along(q, 1, m.cfg.dcp_size, m.group)
        fmax = torch.finfo(m.cfg.query_fp8_dtype).max
        return (q / q_scale).clamp(-fmax, fmax).to(m.cfg.query_fp8_dtype)


SMALL = dict(num_heads=8, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, block_size=4)
SEQ_LENS = [1, 6, 0, 21, 37]
CONTEXT_LENS, CONTEXT_STARTS = [5, 0, 13, 22], [0, 0, 4, 9]


def model_config(world_size: int, dtype=torch.bfloat16, fp8: str = "e4m3") -> MLAConfig:
    return MLAConfig(**SMALL, dtype=dtype, kv_cache_dtype="fp8" if fp8 == "e4m3" else "fp8_e5m2",
                     quantize_query=True, query_fp8_dtype=FP8[fp8], dcp_size=world_size)


def compiled(module, passes, inner="eager", reports=None, dynamic=True):
    """torch.compile with the fx_mla backend, running exactly ``passes``."""
    opts = dict(passes=tuple(passes), inner=inner, report=reports if reports is not None else [])
    return torch.compile(module, backend=functools.partial(fx_mla_backend, options=opts), fullgraph=True,
                         dynamic=dynamic)


def both(module, args, inner="eager"):
    """(unrewritten outputs, rewritten outputs, the rewritten compile's matches and declines), as CPU tensors."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    outs = []
    for passes in ((), (PASS,)):
        torch._dynamo.reset()
        reports = []
        # No cache: a cache hit would skip the passes (and the report of what they did).
        with torch.no_grad(), inductor_config.patch(fx_graph_cache=False), \
                functorch_config.patch(enable_autograd_cache=False):
            out = compiled(module, passes, inner, reports)(*args)
        out = out if isinstance(out, tuple) else (out,)
        # FP8 tensors travel back from the ranks as their bytes (pickling float8 storages fails).
        outs.append(tuple(o.cpu().view(torch.uint8) if o.dtype in FP8.values() else o.cpu() for o in out))
    rep = reports[-1].pass_report(PASS)
    return outs[0], outs[1], [m.detail for m in rep.matches], [d.reason for d in rep.declines]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor, for bitwise comparison (NaN payloads included)."""
    return t.contiguous().view(torch.uint8) if t.element_size() == 1 else t.contiguous().view(
        {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def variants_worker(rank, world_size, variants, device="cpu", inner="eager"):
    out = []
    for v in variants:
        module = GatherQuant(v).to(device)
        out.append(both(module, variant_inputs(v, rank, device), v.inner or inner))
    return out


def model_worker(rank, world_size, cases, device="cpu"):
    """cases: (dtype, fp8, inner, whole_step). Per case, both ways: DecodeQuery's FP8 query and, with whole_step,
    MLADecode's output (else None)."""
    from tests.mla.problems import make_problem, rank_inputs

    results = []
    for i, (dtype, fp8, inner, whole_step) in enumerate(cases):
        pb = make_problem(model_config(world_size, dtype, fp8), SEQ_LENS, seed=i)
        module, args = rank_inputs(pb, rank, device=device)
        query = both(DecodeQuery(module), (args[0], args[1], args[6]), inner)
        results.append((query, both(module, args, inner) if whole_step else None))
    return results


def context_worker(rank, world_size, fp8="e4m3", device="cpu", inner="eager"):
    """ContextGather (chunked-prefill context, DCP) both ways: the mirror rewrite dequantizes after the gather."""
    from tests.mla.problems import context_inputs

    cfg = dataclasses.replace(model_config(world_size, fp8=fp8), interleave=2)
    g = torch.Generator().manual_seed(7)
    latents = [torch.randn(n + s, cfg.entry_size, generator=g) for n, s in zip(CONTEXT_LENS, CONTEXT_STARTS)]
    args = context_inputs(cfg, latents, CONTEXT_LENS, CONTEXT_STARTS, torch.tensor(3.0 / 448), rank)
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    return both(ContextGather(cfg).to(device), args, inner)


def all_worker(rank, world_size, model_cases=(), context_fp8s=(), variants=(), device="cpu", variant_inner="eager"):
    """Everything one spawn of ``world_size`` ranks checks, so a test session starts each world size once.

    ``device="cuda"`` means this rank's GPU (fx_mla.launch sets it for NCCL ranks)."""
    device = f"cuda:{torch.cuda.current_device()}" if device == "cuda" else device
    return dict(model=model_worker(rank, world_size, model_cases, device),
                context=[context_worker(rank, world_size, f, device) for f in context_fp8s],
                variants=variants_worker(rank, world_size, variants, device, variant_inner))
