"""``fx_mla.inspect``: compile a function or module with the fx_mla backend and return what the passes did."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import torch

from .backend import FxMlaOptions, fx_mla_backend
from .report import CompileReport


class NotTraceableError(RuntimeError):
    """The function cannot be captured as one graph (a graph break or an untraceable construct)."""


def inspect(fn: Callable[..., Any], *args: Any, options: Any = None, dynamic: Optional[bool] = True,
            **kwargs: Any) -> CompileReport:
    """Compile ``fn`` (a function or module) with the fx_mla backend, run it once on ``args``, return the report.

    The report holds the graph the passes saw (Inductor's post-grad ATen form) and the graph they left, printed by
    :mod:`fx_mla.report`'s stable printer, each rewrite and each declined match with its reason. Runs under
    ``torch.no_grad()`` (fx_mla compiles inference graphs) with ``fullgraph=True``: a graph break raises
    :class:`NotTraceableError`. ``dynamic=True`` (default) captures symbolic sizes, as a decode step needs.
    Inductor's caches are bypassed for this compile so that the passes always run.
    """
    if not callable(fn):
        raise TypeError(f"fx_mla.inspect: fn must be a function or module, got {type(fn).__name__}")
    reports: list[CompileReport] = []
    opts = dataclasses.replace(FxMlaOptions.coerce(options), report=reports)
    backend = functools.partial(fx_mla_backend, options=opts)
    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic)
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    from torch._dynamo import config as dynamo_config
    from torch._dynamo import exc
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    # Each inspect is a new backend for fn's code: lift the recompile limits (names of torch >= 2.6) for it.
    limits = {k: 1 << 20 for k in ("recompile_limit", "accumulated_recompile_limit") if hasattr(dynamo_config, k)}
    with torch.no_grad(), inductor_config.patch(fx_graph_cache=False), \
            functorch_config.patch(enable_autograd_cache=False), dynamo_config.patch(limits):
        try:
            compiled(*args, **kwargs)
        except (exc.Unsupported, exc.UserError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise NotTraceableError(
                f"fx_mla cannot capture {name} as one graph: {first}. fx_mla rewrites a whole decode step, so it "
                f"must trace with torch.compile(fullgraph=True); remove the graph break "
                f"(TORCH_LOGS=graph_breaks shows where).") from e
        except exc.BackendCompilerFailed as e:
            inner = getattr(e, "inner_exception", None)
            if isinstance(inner, (ValueError, TypeError, RuntimeError)):
                raise inner from None  # our own clear errors (options, strict mode), without dynamo's wrapping
            raise
    if not reports:
        raise RuntimeError(f"fx_mla.inspect: torch.compile did not compile {name} (dynamo skipped it)")
    return reports[-1]


__all__ = ["inspect", "NotTraceableError"]
