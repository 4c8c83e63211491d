"""CPU tests of the 16-head Gluon MLA decode launcher (fx_mla/ops/mla_decode_gluon16.py): the module imports on any
Triton without importing Gluon, gluon16_unsupported_reason declines everything but (9, 0) + Triton 3.6 + the covered
shapes / dtypes / alignment, and bad arguments raise clear errors before any kernel. The kernel itself runs only on
the device (tests/gpu/test_mla_decode_gluon16_gpu.py, benchmarks/dev_gluon16_decode.py)."""
import os
import subprocess
import sys

import pytest
import torch

from fx_mla.ops import _decode_launch as launch_mod
from fx_mla.ops import mla_decode_gluon16 as gmod

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
E4M3 = torch.float8_e4m3fn
CUDA0 = torch.device("cuda", 0)


def _q(heads=16, d=576, dtype=torch.bfloat16):
    return torch.randn(2, heads, d).to(dtype)


def _cache(d=576, dtype=E4M3, block=64):
    return torch.randn(4, block, d).to(dtype)


def test_gluon16_module_imports_without_gluon():
    code = ("import sys, fx_mla.ops.mla_decode_gluon16 as m; "
            "bad = [k for k in sys.modules if k.startswith(('triton.experimental.gluon', "
            "'fx_mla.ops.kernels.mla_decode_gluon16'))]; assert not bad, bad; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": REPO})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_gluon16_declines_on_cpu():
    reason = gmod.gluon16_unsupported_reason(_q(), _cache(), 512)
    assert reason is not None and "CUDA" in reason


def test_gluon16_launch_on_cpu_raises_value_error():
    out, lse = torch.empty(2, 16, 512, dtype=torch.bfloat16), torch.empty(2, 16)
    with pytest.raises(ValueError, match="does not cover"):
        gmod.launch_mla_decode_gluon16(_q(), _cache(), torch.zeros(2, 1, dtype=torch.int32),
                                       torch.ones(2, dtype=torch.int32), torch.ones(1), None, 0.07, 512, out, lse)


def test_smem_needed_matches_compiled_kernel():
    # shared bytes the Triton 3.6 sm_90 compile reported (GluonASTSource, checked by hand)
    assert gmod.smem_needed(3) == 205056
    assert gmod.smem_needed(2) == 168192
    assert gmod.smem_needed(4) > 232448  # why 4 stages are declined on H100 / H200


def test_gluon16_accepts_covered_inputs_on_fake_hopper(fake_hopper):
    assert gmod.gluon16_unsupported_reason(_q(), _cache(), 512, CUDA0) is None
    assert gmod.gluon16_unsupported_reason(_q(dtype=torch.float16), _cache(dtype=torch.float8_e5m2, block=16), 512,
                                           CUDA0, num_stages=2) is None


@pytest.mark.parametrize("cap", [(8, 0), (8, 9), (9, 1), (10, 0), (12, 0)])
def test_gluon16_declines_other_capabilities(fake_hopper, cap):
    fake_hopper["cap"] = cap
    reason = gmod.gluon16_unsupported_reason(_q(), _cache(), 512, CUDA0)
    assert reason is not None and "(9, 0)" in reason and str(cap) in reason


@pytest.mark.parametrize("version", ["3.5.1", "3.9.0", "3.7.0", "4.0.0"])
def test_gluon16_declines_other_triton_versions(fake_hopper, version):
    fake_hopper["version"] = version
    reason = gmod.gluon16_unsupported_reason(_q(), _cache(), 512, CUDA0)
    assert reason is not None and "3.6" in reason and version in reason


@pytest.mark.parametrize("q,cache,rank,needle", [
    (_q(64), _cache(), 512, "head count must be 16"),
    (_q(8), _cache(), 512, "head count must be 16"),
    (_q(128), _cache(), 512, "head count must be 16"),
    (_q(dtype=torch.int8), _cache(), 512, "query dtype"),
    (_q(dtype=torch.float32), _cache(), 512, "query dtype"),
    (_q(), _cache(dtype=torch.bfloat16), 512, "cache dtype"),
    (_q(d=320), _cache(d=320), 256, "kv_lora_rank 512"),
    (_q(), _cache(), 448, "kv_lora_rank 512"),
    (_q(), torch.randn(4, 576, 64).to(E4M3).transpose(1, 2), 512, "16-byte aligned"),
    (_q(), torch.randn(4 * 64 * 576 + 4).to(E4M3)[4:].view(4, 64, 576), 512, "16-byte aligned"),
    (_q(), torch.randn(4, 64, 580).to(E4M3)[:, :, :576], 512, "16-byte aligned"),
])
def test_gluon16_declines_uncovered_inputs(fake_hopper, q, cache, rank, needle):
    reason = gmod.gluon16_unsupported_reason(q, cache, rank, CUDA0)
    assert reason is not None and needle in reason, reason


@pytest.mark.parametrize("stages", [1, 4])
def test_gluon16_declines_stage_counts(fake_hopper, stages):
    reason = gmod.gluon16_unsupported_reason(_q(), _cache(), 512, CUDA0, num_stages=stages)
    assert reason is not None and "num_stages" in reason


def test_gluon16_declines_small_shared_memory(fake_hopper):
    fake_hopper["smem"] = 200000  # ring: 2 stages fit, 3 do not; the default rs kernel (170.6 KB) fits
    reason = gmod.gluon16_unsupported_reason(_q(), _cache(), 512, CUDA0, variant="ring")
    assert reason is not None and "shared memory" in reason
    assert gmod.gluon16_unsupported_reason(_q(), _cache(), 512, CUDA0, num_stages=2, variant="ring") is None
    assert gmod.VARIANT == "rs" and gmod.gluon16_unsupported_reason(_q(), _cache(), 512, CUDA0) is None


def test_launch_args_messages():
    q, cache = _q(), _cache()
    bt, lens, ks = torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, dtype=torch.int32), torch.ones(1)
    out, lse = torch.empty(2, 16, 512, dtype=torch.bfloat16), torch.empty(2, 16)

    def check(out, lse, bt, lens, ks, q_scale=None):
        launch_mod.check_launch_args(q, cache, 512, out, lse, bt, lens, ks, q_scale, "the Gluon kernel")

    with pytest.raises(ValueError, match="q_scale must be None"):
        check(out, lse, bt, lens, ks, torch.ones(1))
    check(out, lse, bt, lens, ks)  # fine
    with pytest.raises(ValueError, match="out must be"):
        check(out[:, :8], lse, bt, lens, ks)
    with pytest.raises(TypeError, match="out must be bf16"):
        check(out.to(torch.int32), lse, bt, lens, ks)
    with pytest.raises(ValueError, match="lse must be"):
        check(out, lse.double(), bt, lens, ks)
    with pytest.raises(ValueError, match="block_table must be int32"):
        check(out, lse, bt.long(), lens, ks)
    with pytest.raises(ValueError, match="seq_lens must be"):
        check(out, lse, bt, lens[:1], ks)
    with pytest.raises(TypeError, match="k_scale must be"):
        check(out, lse, bt, lens, ks.double())
    # an FP8 query needs its one-element fp32 scale on q's device
    q = _q(dtype=E4M3)
    check(out, lse, bt, lens, ks, torch.ones(1))
    for bad in (None, torch.ones(1, dtype=torch.float64), torch.ones(2)):
        with pytest.raises(TypeError, match="q_scale must be a one-element float32 tensor"):
            check(out, lse, bt, lens, ks, bad)


def test_gluon16_accepts_fp8_queries(fake_hopper):
    for dtype in (E4M3, torch.float8_e5m2):
        assert gmod.gluon16_unsupported_reason(_q(dtype=dtype), _cache(), 512, CUDA0) is None


def test_gluon16_ws_variants_on_fake_hopper(fake_hopper):
    assert gmod.VARIANT in gmod.VARIANTS
    for variant in gmod.VARIANTS:
        assert gmod.gluon16_unsupported_reason(_q(), _cache(), 512, CUDA0, variant=variant) is None
    reason = gmod.gluon16_unsupported_reason(_q(), _cache(), 512, CUDA0, variant="ws2")
    assert reason is not None and "variant must be one of" in reason and "ws2" in reason
    fake_hopper["smem"] = 160000  # below the two fp16 tiles of the warp-specialized kernel
    reason = gmod.gluon16_unsupported_reason(_q(), _cache(), 512, CUDA0, variant="ws4")
    assert reason is not None and "shared memory" in reason


def test_smem_needed_ws_matches_compiled_kernel():
    # ws4 / ws8: 168,228 / 168,232 bytes in the Triton 3.6 sm_90 compile (GluonASTSource, checked by hand)
    assert 168228 <= gmod.smem_needed(variant="ws4") <= 168232 + 64


def test_gluon16_launch_bad_variant_raises_value_error():
    out, lse = torch.empty(2, 16, 512, dtype=torch.bfloat16), torch.empty(2, 16)
    with pytest.raises(ValueError, match="does not cover"):
        gmod.launch_mla_decode_gluon16(_q(), _cache(), torch.zeros(2, 1, dtype=torch.int32),
                                       torch.ones(2, dtype=torch.int32), torch.ones(1), None, 0.07, 512, out, lse,
                                       variant="bogus")


def test_rs_declines_caches_its_tma_boxes_cannot_address(fake_hopper):
    for block in (16, 32, 64, 128):
        assert gmod.gluon16_unsupported_reason(_q(), _cache(block=block), 512, CUDA0, variant="rs") is None
    reason = gmod.gluon16_unsupported_reason(_q(), _cache(block=8), 512, CUDA0, variant="rs")
    assert reason is not None and "block sizes 16, 32" in reason and "got 8" in reason
    strided = torch.randn(4, 128, 576).to(E4M3)[:, :64]  # blocks 128 rows apart, 64 used
    reason = gmod.gluon16_unsupported_reason(_q(), strided, 512, CUDA0, variant="rs")
    assert reason is not None and "back to back" in reason
    assert gmod.gluon16_unsupported_reason(_q(), strided, 512, CUDA0, variant="ws8p2") is None


def test_smem_needed_rs_covers_compiled_kernel():
    # 170,600 bytes at 4 stages in the Triton 3.6 sm_90 compile (GluonASTSource, checked by hand)
    assert 170600 <= gmod.smem_needed(variant="rs") <= 170600 + 512


def test_default_rs_falls_back_where_it_declines(fake_hopper, monkeypatch):
    monkeypatch.setattr(gmod, "VARIANT", "rs")
    assert gmod._variant_for(_cache(block=64)) == "rs"
    assert gmod._variant_for(_cache(block=8)) == gmod.RS_FALLBACK
    # the default (variant=None) then takes the fallback's support check: a block size of 8 stays covered
    assert gmod.gluon16_unsupported_reason(_q(), _cache(block=8), 512, CUDA0) is None
