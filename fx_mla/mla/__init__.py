"""The plain-PyTorch MLA decode model that fx_mla's passes rewrite (no custom ops, no Triton here)."""
from .cache import (allocate_cache, fill_paged_cache, local_count, local_seq_lens, quantize_for_cache,
                    slot_mapping, token_owner, write_cache)
from .context import ContextGather, ContextMetadata, build_context_metadata, gather_context
from .config import KV_CACHE_DTYPES, MLAConfig, fp8_max
from .reference import reference_context, reference_decode, stored_values
from .decode import (MLADecode, dequantize_cache, gather_pages, merge_dcp_partials, paged_decode_attention,
                     quantize_dequantize_query)

__all__ = [
    "MLAConfig", "KV_CACHE_DTYPES", "fp8_max", "MLADecode", "paged_decode_attention", "gather_pages",
    "dequantize_cache", "merge_dcp_partials", "quantize_dequantize_query", "allocate_cache", "fill_paged_cache",
    "local_count", "local_seq_lens", "quantize_for_cache", "slot_mapping", "token_owner", "write_cache",
    "ContextGather", "ContextMetadata", "build_context_metadata", "gather_context",
    "reference_context", "reference_decode", "stored_values",
]
