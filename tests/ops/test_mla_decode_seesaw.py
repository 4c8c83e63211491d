"""CPU tests of the seesaw Gluon MLA decode launcher (fx_mla/ops/mla_decode_seesaw.py): the module imports on any
Triton without importing Gluon, and seesaw_unsupported_reason declines everything but (9, 0) + Triton 3.6 + the
covered shapes and dtypes + enough shared memory. The kernel runs only on the device
(tests/gpu/test_mla_decode_seesaw_gpu.py, benchmarks/dev_seesaw_decode.py)."""
import os
import subprocess
import sys

import pytest
import torch

from fx_mla.ops import mla_decode_gluon as gmod
from fx_mla.ops import mla_decode_seesaw as smod

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
E4M3 = torch.float8_e4m3fn
CUDA0 = torch.device("cuda", 0)


def _q(heads=128, d=576, dtype=torch.bfloat16):
    return torch.randn(2, heads, d).to(dtype)


def _cache(d=576, dtype=E4M3, block=64):
    return torch.randn(4, block, d).to(dtype)


def test_seesaw_module_imports_without_gluon():
    code = ("import sys, fx_mla.ops.mla_decode_seesaw as m; "
            "bad = [k for k in sys.modules if k.startswith(('triton.experimental.gluon', "
            "'fx_mla.ops.kernels.mla_decode_seesaw', 'fx_mla.ops.kernels.mla_decode_gluon'))]; "
            "assert not bad, bad; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": REPO})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_seesaw_declines_on_cpu():
    reason = smod.seesaw_unsupported_reason(_q(), _cache(), 512)
    assert reason is not None and "CUDA" in reason and "seesaw" in reason


def test_seesaw_launch_on_cpu_raises_value_error():
    out = torch.empty(2, 128, 512, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="seesaw MLA decode kernel does not cover"):
        smod.launch_mla_decode_seesaw(_q(), _cache(), torch.zeros(2, 1, dtype=torch.int32),
                                      torch.ones(2, dtype=torch.int32), torch.ones(1), None, 0.07, 512, out,
                                      torch.empty(2, 128))


def test_seesaw_accepts_covered_inputs_on_fake_hopper(fake_hopper):
    assert smod.seesaw_unsupported_reason(_q(), _cache(), 512, CUDA0) is None
    assert smod.seesaw_unsupported_reason(_q(64, dtype=torch.float16), _cache(dtype=torch.float8_e5m2, block=16),
                                          512, CUDA0) is None


@pytest.mark.parametrize("cap", [(8, 0), (8, 9), (9, 1), (10, 0)])
def test_seesaw_declines_other_capabilities(fake_hopper, cap):
    fake_hopper["cap"] = cap
    reason = smod.seesaw_unsupported_reason(_q(), _cache(), 512, CUDA0)
    assert reason is not None and "(9, 0)" in reason and str(cap) in reason


@pytest.mark.parametrize("version", ["3.5.1", "3.9.0"])
def test_seesaw_declines_other_triton_versions(fake_hopper, version):
    fake_hopper["version"] = version
    reason = smod.seesaw_unsupported_reason(_q(), _cache(), 512, CUDA0)
    assert reason is not None and "3.6" in reason and version in reason


@pytest.mark.parametrize("q,cache,rank,needle", [
    (_q(16), _cache(), 512, "multiple of 64"),
    (_q(dtype=torch.int8), _cache(), 512, "query dtype"),
    (_q(), _cache(dtype=torch.bfloat16), 512, "cache dtype"),
    (_q(), _cache(), 448, "kv_lora_rank 512"),
])
def test_seesaw_declines_uncovered_shapes_and_dtypes(fake_hopper, q, cache, rank, needle):
    reason = smod.seesaw_unsupported_reason(q, cache, rank, CUDA0)
    assert reason is not None and needle in reason, reason


def test_seesaw_declines_where_its_shared_memory_does_not_fit(fake_hopper):
    # enough for the round-1 Gluon kernel (225 KiB) and the scorer kernel ("auto"), not for the seesaw kernel
    fake_hopper["smem"] = gmod.SMEM_NEEDED
    assert gmod.gluon_unsupported_reason(_q(), _cache(), 512, CUDA0) is None
    assert smod.seesaw_unsupported_reason(_q(), _cache(), 512, CUDA0) is None
    reason = smod.seesaw_unsupported_reason(_q(), _cache(), 512, CUDA0, variant="seesaw")
    assert reason is not None and "shared memory" in reason and str(smod.SMEM_NEEDED) in reason


def test_seesaw_kernel_source_constexprs_match_launcher():
    """The launcher's constexpr keywords are the kernel's (read as text: no Gluon import on CPU)."""
    src = open(os.path.join(REPO, "fx_mla", "ops", "kernels", "mla_decode_seesaw.py")).read()
    for name in ("PAGE", "L", "R", "BLOCK_H", "BLOCK_N", "Q_SHIFT", "E5M2", "SINGLE_SPLIT", "ONE_PAGE", "WORKER_REGS"):
        assert f"{name}: gl.constexpr" in src, name
    assert smod.BLOCK_H == 64 and smod.BLOCK_N == 32


def test_seesaw_variants_on_fake_hopper(fake_hopper):
    assert smod.VARIANT in smod.VARIANTS
    reason = smod.seesaw_unsupported_reason(_q(), _cache(), 512, CUDA0, variant="bogus")
    assert reason is not None and "variant must be one of" in reason and "bogus" in reason
    for variant in smod.VARIANTS:
        assert smod.seesaw_unsupported_reason(_q(), _cache(), 512, CUDA0, variant=variant) is None
    fake_hopper["smem"] = smod.SMEM_NEEDED  # the seesaw kernel fits, the producer form (8 barriers more) does not
    assert smod.seesaw_unsupported_reason(_q(), _cache(), 512, CUDA0, variant="seesaw") is None
    reason = smod.seesaw_unsupported_reason(_q(), _cache(), 512, CUDA0, variant="producer")
    assert reason is not None and "shared memory" in reason
    assert smod.seesaw_unsupported_reason(_q(), _cache(), 512, CUDA0, variant="auto") is None  # the scorer fits


def test_seesaw_auto_variant_is_the_scorer_kernel(fake_hopper):
    """"auto" (the default) is the scorer kernel, whose shared memory is the least of the three: where "auto" is
    supported, every variant's check reads shared memory only."""
    assert smod.VARIANT == "auto"
    assert smod.SMEM_NEEDED_SCORER < min(smod.SMEM_NEEDED, smod.SMEM_NEEDED_PRODUCER)
    fake_hopper["smem"] = smod.SMEM_NEEDED_SCORER
    assert smod.seesaw_unsupported_reason(_q(), _cache(), 512, CUDA0, variant="auto") is None
    assert smod.seesaw_unsupported_reason(_q(), _cache(), 512, CUDA0, variant="scorer") is None
    for variant in ("seesaw", "producer"):
        assert "shared memory" in smod.seesaw_unsupported_reason(_q(), _cache(), 512, CUDA0, variant=variant)
    fake_hopper["smem"] = smod.SMEM_NEEDED_SCORER - 1
    assert "shared memory" in smod.seesaw_unsupported_reason(_q(), _cache(), 512, CUDA0, variant="auto")


def test_seesaw_output_plan_from_launch_shape(monkeypatch):
    """STAGED_O "auto": the staged output for one split, and for launches of a bf16 output with at least
    STAGED_MIN_SPLITS splits of at most STAGED_MAX_PAIRS pairs (64 tokens) at the block table's capacity, which then
    write bf16 partials (the rest: MMA-layout stores, partials as PARTIAL_BF16 says); True / False force the staging
    and leave the partials to PARTIAL_BF16. Shapes and dtypes only: every rank gets the same plan."""
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    assert smod.STAGED_O == "auto" and smod.STAGED_MAX_PAIRS == 16 and smod.STAGED_MIN_SPLITS == 32
    for dtype in (bf16, fp16, fp32):
        assert smod.output_plan(1, 64, dtype) == (True, None) and smod.output_plan(1, 1 << 20, dtype) == (True, None)
    for splits in (32, 33, 64, 1024):
        assert smod.output_plan(splits, 1, bf16) == (True, True)
        assert smod.output_plan(splits, 16 * 64 * splits, bf16) == (True, True)  # 16 pairs a split
        assert smod.output_plan(splits, 16 * 64 * splits + 1, bf16) == (False, None)  # one split gets 17
        assert smod.output_plan(splits, 32 * 64 * splits, bf16) == (False, None)
        for dtype in (fp16, fp32):  # no bf16 partials for them: the staged fp32 partials were slower everywhere
            assert smod.output_plan(splits, 64, dtype) == (False, None)
    for splits in (2, 7, 16, 31):  # too few splits: even or slower, whatever the pairs
        assert smod.output_plan(splits, 1, bf16) == (False, None)
        assert smod.output_plan(splits, 4 * 64 * splits, bf16) == (False, None)
    # measured shapes (1x H100, session 10): the splits num_splits_for gives at 132 SMs and two head groups
    assert smod.output_plan(64, 65536, bf16) == (True, True)     # 1 x 128 x 65536: 64 splits of 16 pairs
    assert smod.output_plan(64, 16384, bf16) == (True, True)     # 1 x 128 x 16384: 64 of 4
    assert smod.output_plan(32, 8192, bf16) == (True, True)      # 2 x 128 x 8192: 32 of 4
    assert smod.output_plan(64, 131072, bf16) == (False, None)   # 1 x 128 x 131072: 64 of 32
    assert smod.output_plan(16, 16384, bf16) == (False, None)    # 4 x 128 x 16384: 16 of 16
    assert smod.output_plan(8, 16384, bf16) == (False, None)     # 8 x 128 x 16384: 8 of 32
    for value, want in ((True, True), (False, False)):
        monkeypatch.setattr(smod, "STAGED_O", value)
        for splits, capacity, dtype in ((1, 64, bf16), (8, 2048, bf16), (64, 2048, bf16), (8, 16384, fp32)):
            assert smod.output_plan(splits, capacity, dtype) == (want, None), value
    with pytest.raises(ValueError, match="num_splits must be a positive int"):
        smod.output_plan(0, 64, bf16)


@pytest.mark.parametrize("max_blocks,splits,out_dtype,staged,part_dtype", [
    (3, 32, torch.bfloat16, True, torch.bfloat16),      # 1 pair a split: lean
    (512, 32, torch.bfloat16, True, torch.bfloat16),    # 16 pairs a split: lean
    (513, 32, torch.bfloat16, False, torch.float32),    # 17 pairs a split
    (3, 31, torch.bfloat16, False, torch.float32),      # too few splits
    (3, 32, torch.float32, False, torch.float32),       # fp32 output: fp32 partials, not staged
    (3, 32, torch.float16, False, torch.float32),
    (51, 1, torch.bfloat16, True, None),                # one split: staged, no workspace
])
def test_seesaw_launch_follows_the_output_plan(monkeypatch, max_blocks, splits, out_dtype, staged, part_dtype):
    """The launcher's STAGED_O constexpr and split workspace dtype follow output_plan at the block table's capacity
    (max_blocks x 64 tokens), whatever the lengths; the kernel replaced by a recorder, the support check bypassed."""
    from fx_mla.ops.kernels import mla_decode_seesaw as kmod
    calls, merged = [], []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **constexprs: calls.append((grid, args, constexprs))

    monkeypatch.setattr(kmod, "_mla_decode_seesaw_kernel", Recorder())
    monkeypatch.setattr(smod, "seesaw_unsupported_reason", lambda *a, **k: None)
    monkeypatch.setattr(smod, "combine_splits", lambda *a, **k: merged.append(a))
    q = _q()
    kv = torch.randn(8, 64, 576).to(E4M3)
    bt = torch.randint(0, 8, (2, max_blocks), dtype=torch.int32)
    lens = torch.tensor([5, 64 * max_blocks], dtype=torch.int32)  # lengths do not enter the plan
    out, lse = torch.empty(2, 128, 512, dtype=out_dtype), torch.empty(2, 128)
    smod.launch_mla_decode_seesaw(q, kv, bt, lens, torch.ones(1), None, 0.07, 512, out, lse, num_splits=splits,
                                  variant="seesaw")
    [(grid, args, constexprs)] = calls
    assert grid == (2, splits, 2) and constexprs["STAGED_O"] == staged
    part_o = args[8]
    if part_dtype is None:
        assert part_o is out
    else:
        assert part_o.shape == (2, splits, 128, 512) and part_o.dtype == part_dtype
    [(m_part_o, *_)] = merged
    assert m_part_o is part_o


def test_seesaw_launch_checks_num_splits_before_using_it(monkeypatch):
    monkeypatch.setattr(smod, "seesaw_unsupported_reason", lambda *a, **k: None)
    out = torch.empty(2, 128, 512, dtype=torch.bfloat16)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_splits must be a positive int"):
            smod.launch_mla_decode_seesaw(_q(), _cache(), torch.zeros(2, 1, dtype=torch.int32),
                                          torch.ones(2, dtype=torch.int32), torch.ones(1), None, 0.07, 512, out,
                                          torch.empty(2, 128), num_splits=bad)