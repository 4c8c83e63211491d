"""fx_mla.ops._device.on_input_device: the CUDA implementations of quant_fp8* and gather_dequant_cache* run with their
first input's device current (Python custom ops get no device guard from the dispatcher; Triton launches on the
current device). The CUDA side with two GPUs is covered by tests/gpu/test_mla_decode_dispatch_gpu.py's pattern."""
import torch

import fx_mla.ops.gather_dequant_cache  # noqa: F401  (imports must still register the ops)
import fx_mla.ops.quant_fp8  # noqa: F401
from fx_mla.ops._device import on_input_device


def test_on_input_device_enters_the_inputs_device(monkeypatch):
    seen = []

    class Recorder:
        def __init__(self, device):
            seen.append(device)

        def __enter__(self):
            seen.append("enter")

        def __exit__(self, *exc):
            seen.append("exit")

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    x = torch.randn(3)
    f = on_input_device(lambda a, b, c=0: (a, b, c))
    out = f(x, 2, c=5)
    assert out[0] is x and out[1:] == (2, 5)
    assert seen == [x.device, "enter", "exit"]


def test_on_input_device_exits_on_error(monkeypatch):
    seen = []

    class Recorder:
        def __init__(self, device):
            pass

        def __enter__(self):
            seen.append("enter")

        def __exit__(self, *exc):
            seen.append("exit")

    monkeypatch.setattr(torch.cuda, "device", Recorder)

    def boom(x):
        raise ValueError("x: bad")

    try:
        on_input_device(boom)(torch.zeros(1))
    except ValueError as e:
        assert "x: bad" in str(e)
    else:
        raise AssertionError("the error must propagate")
    assert seen == ["enter", "exit"]
