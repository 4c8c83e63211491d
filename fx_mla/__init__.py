"""fx_mla: a torch.compile backend for MLA decode with an FP8 KV cache and decode context parallelism.

``torch.compile(model, backend="fx_mla", options={...})`` (options: :class:`FxMlaOptions`);
``fx_mla.inspect(fn, *args, options=...)`` returns the :class:`CompileReport` of what the passes did.
"""
from . import backend, mla
from .backend import FxMlaOptions, fx_mla_backend, options
from .inspect_api import NotTraceableError, inspect
from .passes.manager import StrictModeError
from .report import CompileReport

__all__ = ["mla", "backend", "fx_mla_backend", "inspect", "options", "FxMlaOptions", "CompileReport",
           "NotTraceableError", "StrictModeError"]
