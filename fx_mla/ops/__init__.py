"""fx_mla's custom ops (``torch.ops.fx_mla.*``): importing this package registers all of them.

Each module holds one op family: schema, fake implementation, CPU reference (plain PyTorch, the test oracle) and
the CUDA implementation that launches the Triton kernels of :mod:`fx_mla.ops.kernels`.
"""
from . import gather_dequant_cache, mla_decode_fp8, quant_fp8

__all__ = ["quant_fp8", "gather_dequant_cache", "mla_decode_fp8"]
