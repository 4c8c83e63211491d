"""CPU tests of the Gluon MLA decode launcher (fx_mla/ops/mla_decode_gluon.py): the module imports on any Triton
without importing Gluon, and gluon_unsupported_reason declines everything but (9, 0) + Triton 3.6 + the covered
shapes and dtypes. The kernel itself only runs on the device (tests/gpu/test_mla_decode_gluon_gpu.py,
benchmarks/dev_gluon_decode.py)."""
import os
import subprocess
import sys

import pytest
import torch

from fx_mla.ops import mla_decode_gluon as gmod

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
E4M3 = torch.float8_e4m3fn


def _q(heads=128, d=576, dtype=torch.bfloat16):
    return torch.randn(2, heads, d).to(dtype)


def _cache(d=576, dtype=E4M3, block=64):
    return torch.randn(4, block, d).to(dtype)


def test_gluon_module_imports_without_gluon():
    code = ("import sys, fx_mla.ops.mla_decode_gluon as m; "
            "bad = [k for k in sys.modules if k.startswith(('triton.experimental.gluon', 'fx_mla.ops.kernels.mla_decode_gluon'))]; "
            "assert not bad, bad; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": REPO})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_gluon_declines_on_cpu():
    reason = gmod.gluon_unsupported_reason(_q(), _cache(), 512)
    assert reason is not None and "CUDA" in reason


def test_gluon_launch_on_cpu_raises_value_error():
    q, cache = _q(), _cache()
    out = torch.empty(2, 128, 512, dtype=torch.bfloat16)
    lse = torch.empty(2, 128)
    with pytest.raises(ValueError, match="does not cover"):
        gmod.launch_mla_decode_gluon(q, cache, torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, dtype=torch.int32),
                                     torch.ones(1), None, 0.07, 512, out, lse)


CUDA0 = torch.device("cuda", 0)


def test_gluon_accepts_covered_inputs_on_fake_hopper(fake_hopper):
    assert gmod.gluon_unsupported_reason(_q(), _cache(), 512, CUDA0) is None
    assert gmod.gluon_unsupported_reason(_q(64, dtype=torch.float16), _cache(dtype=torch.float8_e5m2, block=16),
                                         512, CUDA0) is None


@pytest.mark.parametrize("cap", [(8, 0), (8, 9), (9, 1), (10, 0), (12, 0)])
def test_gluon_declines_other_capabilities(fake_hopper, cap):
    fake_hopper["cap"] = cap
    reason = gmod.gluon_unsupported_reason(_q(), _cache(), 512, CUDA0)
    assert reason is not None and "(9, 0)" in reason and str(cap) in reason


@pytest.mark.parametrize("version", ["3.5.1", "3.9.0", "3.7.0", "4.0.0"])
def test_gluon_declines_other_triton_versions(fake_hopper, version):
    fake_hopper["version"] = version
    reason = gmod.gluon_unsupported_reason(_q(), _cache(), 512, CUDA0)
    assert reason is not None and "3.6" in reason and version in reason


@pytest.mark.parametrize("q,cache,rank,needle", [
    (_q(16), _cache(), 512, "multiple of 64"),
    (_q(96), _cache(), 512, "multiple of 64"),
    (_q(dtype=torch.int8), _cache(), 512, "query dtype"),
    (_q(dtype=torch.float32), _cache(), 512, "query dtype"),
    (_q(), _cache(dtype=torch.bfloat16), 512, "cache dtype"),
    (_q(d=320), _cache(d=320), 256, "kv_lora_rank 512"),
    (_q(), _cache(), 448, "kv_lora_rank 512"),
    (_q(), _cache()[:, :, :575], 512, "kv_lora_rank 512"),
    (_q(), torch.randn(4, 576, 64).to(E4M3).transpose(1, 2), 512, "contiguous"),
])
def test_gluon_declines_uncovered_shapes_and_dtypes(fake_hopper, q, cache, rank, needle):
    reason = gmod.gluon_unsupported_reason(q, cache, rank, CUDA0)
    assert reason is not None and needle in reason, reason


def test_gluon_declines_small_shared_memory(fake_hopper, monkeypatch):
    class Small:
        shared_memory_per_block_optin = 101376

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: Small())
    reason = gmod.gluon_unsupported_reason(_q(), _cache(), 512, CUDA0)
    assert reason is not None and "shared memory" in reason


def test_gluon_variant_flags_match_kernel_constexprs():
    """Every launcher variant flag is a constexpr of the kernel (read as text: no Gluon import on CPU)."""
    src = open(os.path.join(REPO, "fx_mla", "ops", "kernels", "mla_decode_gluon.py")).read()
    assert set(gmod.DEFAULT_VARIANT) == set(gmod.VARIANT_FLAGS)
    # measured fastest on 1x H100 (benchmarks/RESULTS.md): one block-table read a tile, no redundant barrier
    assert gmod.DEFAULT_VARIANT == dict(one_page=True, trim_barrier=True, lazy_rescale=False)
    for flag in gmod.VARIANT_FLAGS:
        assert f"{flag.upper()}: gl.constexpr" in src, flag
