"""The fx_mla torch.compile backend: capture → Inductor's post-grad ATen graph → fx_mla's passes → inner compiler.

``torch.compile(model, backend="fx_mla", options={...})`` finds :func:`fx_mla_backend` through the
``torch_dynamo_backends`` entry point (no import of fx_mla needed). Options are :class:`FxMlaOptions` or a dict of
the same names.

* ``inner="inductor"`` (default): the pass manager is installed as Inductor's ``post_grad_custom_post_pass``, a
  ``CustomGraphPass`` whose ``uuid()`` hashes the options and the passes' sources, so Inductor's FX graph cache stays
  on. On a cache hit no pass runs; the report then has ``cache_hit=True``.
* ``inner="eager"``: AOTAutograd with Inductor's decomposition table, Inductor's joint-graph and post-grad passes
  (with the same pass manager in the same slot), then the graph runs eagerly: passes never see a second dialect.
"""
from __future__ import annotations

import dataclasses
import inspect as _pyinspect
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence

import torch

from . import passes as _passes
from .report import CompileReport, clean_input_name

INNER_COMPILERS = ("inductor", "eager")


@dataclasses.dataclass(frozen=True)
class FxMlaOptions:
    """Options of the fx_mla backend (also accepted as a dict with the same names).

    passes: pass names to run, in order (None: every registered pass whose module exists; ``()``: none).
    inner: ``"inductor"`` compiles the rest of the graph; ``"eager"`` runs it op by op (debugging, CPU tests).
    strict: fail the compile, listing the reasons, when any pass declines a match.
    report: where each :class:`CompileReport` goes: None, a list (appended to) or a callable (called with it).
    inductor_config: Inductor config overrides for the inductor inner compiler, e.g. ``{"max_autotune": True}``.
    """

    passes: Optional[tuple[str, ...]] = None
    inner: str = "inductor"
    strict: bool = False
    report: Any = dataclasses.field(default=None, compare=False, hash=False)
    inductor_config: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.passes is not None:
            if isinstance(self.passes, str) or not isinstance(self.passes, (list, tuple)):
                raise TypeError(f"fx_mla option 'passes' must be a list or tuple of pass names (or None), "
                                f"got {self.passes!r}")
            names = tuple(self.passes)
            known = _passes.registered_passes()
            for name in names:
                if not isinstance(name, str):
                    raise TypeError(f"fx_mla option 'passes' must hold pass names (str), got {name!r}")
                if name not in known:
                    raise ValueError(f"fx_mla option 'passes': unknown pass {name!r}; registered passes: "
                                     f"{', '.join(known)}")
            if len(set(names)) != len(names):
                raise ValueError(f"fx_mla option 'passes' names a pass twice: {names}")
            object.__setattr__(self, "passes", names)
        if not isinstance(self.inner, str) or self.inner not in INNER_COMPILERS:
            raise ValueError(f"fx_mla option 'inner' must be one of {INNER_COMPILERS}, got {self.inner!r}")
        if not isinstance(self.strict, bool):
            raise TypeError(f"fx_mla option 'strict' must be a bool, got {self.strict!r}")
        if self.report is not None and not isinstance(self.report, list) and not callable(self.report):
            raise TypeError(f"fx_mla option 'report' must be None, a list or a callable, got {self.report!r}")
        object.__setattr__(self, "inductor_config", _check_inductor_config(self.inductor_config))

    @classmethod
    def coerce(cls, value: Any) -> "FxMlaOptions":
        """``None``, an ``FxMlaOptions`` or a dict of option names → ``FxMlaOptions`` (clear errors otherwise)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"fx_mla options must be a dict or fx_mla.FxMlaOptions, got {type(value).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in value if k not in names)
        if unknown:
            raise ValueError(f"unknown fx_mla option(s) {', '.join(map(repr, unknown))}; "
                             f"known options: {', '.join(sorted(names))}")
        return cls(**value)

    def resolved_passes(self) -> tuple[str, ...]:
        """The pass names that will run, in order."""
        return _passes.available_passes() if self.passes is None else self.passes


def _check_inductor_config(value: Any) -> tuple[tuple[str, Any], ...]:
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (list, tuple)) and all(isinstance(i, tuple) and len(i) == 2 for i in value):
        items = list(value)
    else:
        raise TypeError(f"fx_mla option 'inductor_config' must be a dict of Inductor config names, got {value!r}")
    if items:
        from torch._inductor import config as inductor_config

        # hasattr, not get_config_copy(): a copy deep-copies the installed pass manager, which holds modules
        for key, _ in items:
            if not isinstance(key, str) or not hasattr(inductor_config, key):
                raise ValueError(f"fx_mla option 'inductor_config': {key!r} is not an Inductor config name")
            if key == "post_grad_custom_post_pass":
                raise ValueError("fx_mla option 'inductor_config' cannot set post_grad_custom_post_pass: "
                                 "fx_mla's pass manager uses it")
    return tuple(sorted(items))


def options(**kwargs: Any) -> FxMlaOptions:
    """Build validated :class:`FxMlaOptions`: ``fx_mla.options(passes=[...], inner="eager")``."""
    return FxMlaOptions.coerce(kwargs)


def target_device(example_inputs: Sequence[Any]) -> torch.device:
    """The device the graph runs on: the first CUDA input's, else the first tensor input's, else CPU."""
    devices = [x.device for x in example_inputs if isinstance(x, torch.Tensor)]
    cuda = [d for d in devices if d.type == "cuda"]
    return (cuda or devices or [torch.device("cpu")])[0]


def device_capability(device: torch.device) -> Optional[tuple[int, int]]:
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def _input_names(gm: torch.fx.GraphModule) -> list[Optional[str]]:
    names: list[Optional[str]] = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        source = getattr(node.meta.get("grapharg"), "source", None)
        name = getattr(source, "name", None) if source is not None else None
        name = name() if callable(name) else name
        names.append(clean_input_name(name) if isinstance(name, str) else None)
    return names


def _deliver(report: CompileReport, target: Any) -> None:
    if isinstance(target, list):
        target.append(report)
    elif callable(target):
        target(report)


def fx_mla_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, options: Any = None,
                   mode: Optional[str] = None) -> Callable[..., Any]:
    """The torch.compile backend (entry point ``fx_mla``). ``mode`` is torch.compile's, for the inductor inner."""
    from .passes.manager import PassManager

    opts = FxMlaOptions.coerce(options)
    device = target_device(example_inputs)
    manager = PassManager(opts, device, device_capability(device), _input_names(gm))
    try:
        if opts.inner == "eager":
            compiled = _compile_eager(gm, example_inputs, manager)
        else:
            compiled = _compile_inductor(gm, example_inputs, manager, opts, mode)
    except BaseException:
        for report in manager.reports:  # e.g. the report behind a strict-mode failure
            _deliver(report, opts.report)
        raise
    # No report: Inductor served the graph from its cache, so the passes did not run in this process.
    reports = manager.reports or [CompileReport(options=dataclasses.replace(opts, report=None), inner=opts.inner,
                                                device=str(device), capability=manager.capability, cache_hit=True)]
    for report in reports:
        _deliver(report, opts.report)
    return compiled


def _compile_inductor(gm, example_inputs, manager, opts: FxMlaOptions, mode: Optional[str]):
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches: dict[str, Any] = dict(list_mode_options(mode)) if mode else {}
    patches.update(opts.inductor_config)
    patches["post_grad_custom_post_pass"] = manager
    return compile_fx(gm, example_inputs, config_patches=patches)


def _compile_eager(gm, example_inputs, manager):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import _recursive_joint_graph_passes, _recursive_post_grad_passes
    from torch._guards import detect_fake_mode
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.fx_passes.post_grad import view_to_reshape
    from torch._inductor.virtualized import V

    device = manager.device

    def passes_then_eager(fx_gm: torch.fx.GraphModule, inputs, is_inference: bool = True):
        # The same steps, in the same order, as Inductor's compile_fx before and around its post-grad passes.
        with inductor_config.patch(post_grad_custom_post_pass=manager):
            if "input_device" in _pyinspect.signature(_recursive_joint_graph_passes).parameters:
                fx_gm = _recursive_joint_graph_passes(fx_gm, input_device=device)
            else:  # older Inductor
                fx_gm = _recursive_joint_graph_passes(fx_gm)
            view_to_reshape(fx_gm)
            with V.set_fake_mode(detect_fake_mode(inputs)):
                _recursive_post_grad_passes(fx_gm, is_inference=is_inference)
        fx_gm.recompile()
        return make_boxed_func(fx_gm.forward)

    def plain_eager(fx_gm: torch.fx.GraphModule, _inputs):
        return make_boxed_func(fx_gm.forward)

    return aot_autograd(fw_compiler=lambda g, i: passes_then_eager(g, i, is_inference=False),
                        inference_compiler=passes_then_eager, bw_compiler=plain_eager,
                        decompositions=select_decomp_table(),
                        keep_inference_input_mutations=True)(gm, example_inputs)


def _register_without_entry_point() -> None:
    """Register ``backend="fx_mla"`` by hand only where the package's entry point is not installed.

    Where it is installed, dynamo loads it on first lookup; registering here too would be a duplicate name.
    """
    from importlib.metadata import entry_points

    if any(ep.name == "fx_mla" for ep in entry_points(group="torch_dynamo_backends")):
        return
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if "fx_mla" not in _COMPILER_FNS:
        register_backend(fx_mla_backend, name="fx_mla")


_register_without_entry_point()

__all__ = ["FxMlaOptions", "fx_mla_backend", "options", "target_device", "device_capability", "INNER_COMPILERS"]
