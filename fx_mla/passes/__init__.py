"""fx_mla's graph passes: an ordered registry of pass names.

Each registered name maps to the import path of a module in this package (imported lazily, on first use) or to a
pass object registered at run time (tests do this). The registry order is the order passes run in; the default
pass list is every registered pass whose module exists. See :mod:`fx_mla.passes.manager` for the pass API.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Union

# Order matters: quantize the query before its all-gather, then fuse the cache gather, then the attention.
_REGISTRY: dict[str, Union[str, Any]] = {
    "quant_before_gather": "fx_mla.passes.quant_before_gather",
    "cache_gather": "fx_mla.passes.cache_gather",
    "decode_attention": "fx_mla.passes.decode_attention",
}


def registered_passes() -> tuple[str, ...]:
    """All registered pass names, in run order (whether or not their module exists yet)."""
    return tuple(_REGISTRY)


def _module_exists(path: str) -> bool:
    try:
        return importlib.util.find_spec(path) is not None
    except ModuleNotFoundError:
        return False


def available_passes() -> tuple[str, ...]:
    """Registered pass names that can be loaded: the default pass list."""
    return tuple(n for n, p in _REGISTRY.items() if not isinstance(p, str) or _module_exists(p))


def register_pass(name: str, target: Union[str, Any], *, before: str | None = None) -> None:
    """Register ``target`` (a module import path, or an object with ``run(graph, ctx)``) under ``name``.

    It runs last, or just before the pass named ``before``. Registering a taken name is a ValueError.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"pass name must be an identifier string, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"a pass named {name!r} is already registered")
    if not isinstance(target, str) and not callable(getattr(target, "run", None)):
        raise TypeError(f"pass {name!r} must be a module path or an object with run(graph, ctx), got {target!r}")
    if before is None:
        _REGISTRY[name] = target
        return
    if before not in _REGISTRY:
        raise ValueError(f"before={before!r} is not a registered pass; registered: {registered_passes()}")
    items = list(_REGISTRY.items())
    at = [n for n, _ in items].index(before)
    items.insert(at, (name, target))
    _REGISTRY.clear()
    _REGISTRY.update(items)


def unregister_pass(name: str) -> None:
    if name not in _REGISTRY:
        raise ValueError(f"no pass named {name!r} is registered; registered: {registered_passes()}")
    del _REGISTRY[name]


def load_pass(name: str) -> Any:
    """The pass object for ``name``: its module (which defines ``run(graph, ctx)``) or the registered object."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown fx_mla pass {name!r}; registered passes: {', '.join(registered_passes())}")
    target = _REGISTRY[name]
    if not isinstance(target, str):
        return target
    if not _module_exists(target):
        raise ValueError(f"fx_mla pass {name!r} is registered but its module {target} does not exist yet; "
                         f"available passes: {', '.join(available_passes()) or '(none)'}")
    module = importlib.import_module(target)
    if not callable(getattr(module, "run", None)):
        raise TypeError(f"fx_mla pass module {target} must define run(graph, ctx)")
    return module


__all__ = ["registered_passes", "available_passes", "register_pass", "unregister_pass", "load_pass"]
