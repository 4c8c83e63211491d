"""MLA configuration: model shapes, KV-cache storage and decode context parallelism (DCP)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch

# kv_cache_dtype name -> storage dtype (None: the model dtype).
KV_CACHE_DTYPES: dict[str, Optional[torch.dtype]] = {
    "auto": None,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
MODEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an fp8 dtype (448 for e4m3fn, 57344 for e5m2)."""
    return float(torch.finfo(dtype).max)


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Shapes and storage of one MLA decode layer, validated at construction.

    ``num_heads`` counts the query heads of the whole DCP group; each rank owns ``num_heads // dcp_size`` of them
    (DCP reuses the tensor-parallel ranks). ``dcp_group`` is the process group (None: the default group).
    """

    num_heads: int
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    block_size: int = 64
    kv_cache_dtype: str = "auto"
    dtype: torch.dtype = torch.bfloat16
    dcp_size: int = 1
    dcp_group: Any = dataclasses.field(default=None, compare=False, hash=False)
    interleave: int = 1
    quantize_query: bool = False
    query_fp8_dtype: torch.dtype = torch.float8_e4m3fn

    def __post_init__(self) -> None:
        for name in ("num_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                     "block_size", "dcp_size", "interleave"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MLAConfig.{name} must be a positive int, got {value!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"MLAConfig.kv_cache_dtype must be one of {sorted(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.dtype not in MODEL_DTYPES:
            raise ValueError(f"MLAConfig.dtype must be one of {MODEL_DTYPES}, got {self.dtype!r}")
        if self.block_size % self.interleave != 0:
            raise ValueError(f"MLAConfig.interleave ({self.interleave}) must divide "
                             f"MLAConfig.block_size ({self.block_size})")
        if self.num_heads % self.dcp_size != 0:
            raise ValueError(f"MLAConfig.num_heads ({self.num_heads}) must be divisible by "
                             f"MLAConfig.dcp_size ({self.dcp_size})")
        if self.query_fp8_dtype not in FP8_DTYPES:
            raise ValueError(f"MLAConfig.query_fp8_dtype must be one of {FP8_DTYPES}, got {self.query_fp8_dtype!r}")

    # DeepSeek presets -------------------------------------------------------------------------------------------
    @classmethod
    def deepseek_v2_lite(cls, **overrides: Any) -> "MLAConfig":
        return cls(**{"num_heads": 16, **overrides})

    @classmethod
    def deepseek_v3(cls, **overrides: Any) -> "MLAConfig":
        return cls(**{"num_heads": 128, **overrides})

    # Derived quantities -------------------------------------------------------------------------------------------
    @property
    def entry_size(self) -> int:
        """Cache entries per token: latent (L) then rope key (R)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def local_heads(self) -> int:
        return self.num_heads // self.dcp_size

    @property
    def sm_scale(self) -> float:
        """1/sqrt(P + R): the original qk head dim (192 for DeepSeek), not the latent width."""
        return 1.0 / math.sqrt(self.qk_nope_head_dim + self.qk_rope_head_dim)

    @property
    def cache_dtype(self) -> torch.dtype:
        """Storage dtype of the paged cache."""
        return KV_CACHE_DTYPES[self.kv_cache_dtype] or self.dtype

    @property
    def is_fp8_cache(self) -> bool:
        return self.cache_dtype in FP8_DTYPES
