"""A device guard for the CUDA implementations of fx_mla's Python custom ops.

The dispatcher gives a Python kernel registered with ``Library.impl(..., "CUDA")`` no device guard, and Triton launches
on the *current* CUDA device: an input on another GPU would be read by a kernel running on the wrong device. Wrapping
the implementation makes its first tensor argument's device current for the call (a no-op when it already is).
"""
from __future__ import annotations

import functools

import torch


def on_input_device(fn):
    """Run ``fn(x, ...)`` with ``x.device`` as the current CUDA device."""
    @functools.wraps(fn)
    def guarded(x, *args, **kwargs):
        with torch.cuda.device(x.device):
            return fn(x, *args, **kwargs)
    return guarded
