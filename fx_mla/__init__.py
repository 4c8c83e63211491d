"""fx_mla: a torch.compile backend for MLA decode with an FP8 KV cache and decode context parallelism."""
from . import mla

__all__ = ["mla"]
