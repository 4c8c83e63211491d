"""Fixtures shared by the CPU tests of the decode launchers."""
import pytest
import torch

from fx_mla.ops import _decode_launch as launch_mod


@pytest.fixture
def fake_hopper(monkeypatch):
    """Pretend a CUDA device of capability `cap`, Triton `version` and `smem` bytes of opt-in shared memory (the
    Gluon support checks read only these); mutate the returned dict to change them."""
    state = dict(cap=(9, 0), version="3.6.0", smem=232448)

    class Props:
        @property
        def shared_memory_per_block_optin(self):
            return state["smem"]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: state["cap"])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: Props())
    monkeypatch.setattr(launch_mod, "triton", type("T", (), {"__version__": property(lambda self: state["version"])})())
    return state
