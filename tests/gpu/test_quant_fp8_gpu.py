"""GPU tests of the quant_fp8 family: Triton kernels bitwise equal to torch (CPU reference, Inductor,
eager CUDA where eager agrees), opcheck on CUDA, CUDA-graph capture and replay.
Run on a lent H100/H200: `python3 -m pytest -m cuda tests/gpu/test_quant_fp8_gpu.py`."""
import pytest
import torch

import fx_mla.ops.quant_fp8 as qmod
from fx_mla.ops._fp8 import FP8_MAX, fp8_supported
from tests.gpu.graphs import capture

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
_reason = fp8_supported(torch.float8_e4m3fn, torch.cuda.get_device_capability())
if _reason is not None:
    pytest.skip(_reason, allow_module_level=True)

XDTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
DEV = "cuda"


def _rand(shape, xd, fd, seed, spread=None):
    g = torch.Generator(device=DEV).manual_seed(seed)
    spread = spread or FP8_MAX[fd]
    hi = float(torch.log(torch.tensor(spread * 4.0)))
    mag = torch.exp(torch.empty(shape, device=DEV).uniform_(-12, hi, generator=g))
    sign = torch.where(torch.rand(shape, device=DEV, generator=g) < 0.5, -1.0, 1.0)
    x = (mag * sign).to(xd)
    fmax, tiny = FP8_MAX[fd], torch.finfo(fd).tiny
    head = [float("nan"), -float("nan"), float("inf"), -float("inf"), fmax * 4, -fmax * 1.01,
            tiny * 0.26, -tiny * 0.5, tiny * 1e-3, -0.0, fmax, -fmax]
    n = min(len(head), x.numel())
    x.view(-1)[:n] = torch.tensor(head[:n], device=DEV).to(xd)
    return x


def _flat_bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8).cpu()


def assert_same_fp8(out, ref):
    """Bitwise on every non-NaN element; NaN exactly where the reference has NaN."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    nan = ref.float().isnan().reshape(-1).cpu()
    assert torch.equal(out.float().isnan().reshape(-1).cpu(), nan)
    a, b = _flat_bytes(out), _flat_bytes(ref)
    bad = (a != b) & ~nan
    assert not bad.any(), f"{int(bad.sum())} of {a.numel()} bytes differ, first at {bad.nonzero()[:5].tolist()}"


def _poisoned(shape, dtype):
    """An output buffer full of NaN (0xFF is NaN in both FP8 formats): unwritten elements show."""
    t = torch.empty(shape, dtype=dtype, device=DEV)
    if t.element_size() == 1:
        t.view(torch.uint8).fill_(0xFF)
    else:
        t.fill_(float("nan"))
    return t


SCALES = {"div0d": (torch.tensor(0.3), False), "div1elem": (torch.tensor([0.7]), False),
          "mul0d": (torch.tensor(1.0) / torch.tensor(0.3), True)}


@pytest.mark.parametrize("form", list(SCALES))
@pytest.mark.parametrize("fd", FP8)
@pytest.mark.parametrize("xd", XDTYPES)
def test_quant_fp8_cuda_bitwise_vs_cpu_reference(xd, fd, form):
    s, rec = SCALES[form]
    x = _rand((257, 1111), xd, fd, seed=1)
    out = torch.ops.fx_mla.quant_fp8(x, s.to(DEV), fd, rec)
    ref = torch.ops.fx_mla.quant_fp8(x.cpu(), s, fd, rec)
    assert_same_fp8(out, ref)


def _inductor_eager_numerics_patch():
    """Inductor config that keeps eager's numerics on CUDA: the quotient rounded to x.dtype
    (emulate_precision_casts) and IEEE division (div_rn instead of Triton's approximate '/')."""
    cfg = torch._inductor.config
    patch = {"emulate_precision_casts": True}
    if hasattr(cfg, "eager_numerics") and hasattr(cfg.eager_numerics, "division_rounding"):
        patch["eager_numerics.division_rounding"] = True
    else:
        for name in ("emulate_division_rounding", "emulate_divison_rounding"):
            if hasattr(cfg, name):
                patch[name] = True
    return patch


def _compiled_chain(fd, rec):
    fmax = FP8_MAX[fd]

    def chain(x, s):
        return ((x * s) if rec else (x / s)).clamp(-fmax, fmax).to(fd)
    torch._dynamo.reset()
    return torch.compile(chain, backend="inductor", fullgraph=True)


def _mismatches(out, ref):
    nan = ref.float().isnan().reshape(-1).cpu()
    return int(((_flat_bytes(out) != _flat_bytes(ref)) & ~nan).sum())


# Seen on H200 (torch 2.11, triton 3.6): with the eager-numerics switches Inductor equals our op
# bitwise when no rounding to x.dtype is involved (fp32 x, or a 1-element scale with dims).
INDUCTOR_EXACT_CASES = [(torch.float32, fd, "div0d") for fd in FP8] + [
    (torch.bfloat16, torch.float8_e4m3fn, "div1elem")]
# For bf16/fp16 x and a 0-dim scale it differed from our op (1.3 % of bytes for bf16, like eager
# CUDA vs our op): emulate_precision_casts also casts the scale to x.dtype, as eager CUDA does.
# First a non-strict xfail (a hypothesis); all 8 cases passed on H100 (torch 2.11, triton 3.6,
# 2026-11-28), so it is a plain assertion now.
INDUCTOR_ROUNDED_SCALE_CASES = [(xd, fd, form) for xd in (torch.bfloat16, torch.float16)
                                for fd in FP8 for form in ("div0d", "mul0d")]


def _inductor_vs_op(xd, fd, form, round_scale):
    patch = _inductor_eager_numerics_patch()
    if len(patch) == 1:
        pytest.skip("this torch has no Inductor switch for IEEE division")
    s, rec = SCALES[form]
    s = s.to(DEV)
    x = _rand((64, 128, 576), xd, fd, seed=2)
    with torch._inductor.config.patch(patch):
        ref = _compiled_chain(fd, rec)(x, s)
    s_op = s.to(xd).float() if round_scale else s
    out = torch.ops.fx_mla.quant_fp8(x, s_op, fd, rec)
    print(f"\n[inductor {patch}] {xd} {fd} {form} scale rounded={round_scale}: "
          f"{_mismatches(out, ref)} of {x.numel()} bytes differ")
    assert_same_fp8(out, ref)


@pytest.mark.parametrize("xd, fd, form", INDUCTOR_EXACT_CASES)
def test_quant_fp8_cuda_bitwise_vs_inductor_chain_with_eager_numerics(xd, fd, form):
    _inductor_vs_op(xd, fd, form, round_scale=False)


@pytest.mark.parametrize("xd, fd, form", INDUCTOR_ROUNDED_SCALE_CASES)
def test_inductor_eager_numerics_equals_op_with_scale_rounded_to_input_dtype(xd, fd, form):
    _inductor_vs_op(xd, fd, form, round_scale=True)


@pytest.mark.parametrize("xd, fd", [(xd, fd) for xd in XDTYPES for fd in FP8])
def test_inductor_default_cuda_numerics_documented(xd, fd):
    """Default Inductor on CUDA computes bf16/fp16 chains in fp32 (eliding roundings) and divides
    with Triton's approximate '/': neither eager CUDA nor our op (either scale form) match it.
    Seen on H200 (torch 2.11): fp32 x differs in 0-4 of 4.7M bytes; bf16/fp16 x in up to 0.82 %
    of bytes from the closer of our two forms. Printed for the record; gross drift fails."""
    s = torch.tensor(0.3, device=DEV)
    x = _rand((64, 128, 576), xd, fd, seed=2)
    ind = _compiled_chain(fd, False)(x, s)
    a = _mismatches(torch.ops.fx_mla.quant_fp8(x, s, fd), ind)
    b = _mismatches(torch.ops.fx_mla.quant_fp8(x, s.reshape(1), fd), ind)
    c = _mismatches(torch.ops.fx_mla.quant_fp8(x.float(), s, fd, False, True), ind)
    print(f"\n[inductor default {xd} {fd}] bytes differing from quant_fp8(0-dim scale): {a}; "
          f"from quant_fp8(fp32 quotient): {b}; from quant_fp8(fp32 x, approx_division): {c} of {x.numel()}")
    limit = 1e-4 if xd == torch.float32 else 1e-2
    assert min(a, b) <= x.numel() * limit


@pytest.mark.parametrize("xd", (torch.bfloat16, torch.float16))
def test_eager_cuda_chain_casts_0dim_scale_to_input_dtype(xd):
    """Eager CUDA casts a 0-dim fp32 CUDA scale to x.dtype before dividing (CPU eager and Inductor
    do not): with a scale not exact in x.dtype, eager CUDA equals our op applied to the rounded
    scale, not to the scale itself. Our op follows CPU eager (one semantics on every device)."""
    fd = torch.float8_e4m3fn
    s = torch.tensor(0.3, device=DEV)
    x = _rand((64, 4096), xd, fd, seed=4)
    eager = (x / s).clamp(-448, 448).to(fd)
    ours = torch.ops.fx_mla.quant_fp8(x, s, fd)
    ours_rounded_scale = torch.ops.fx_mla.quant_fp8(x, s.to(xd).float(), fd)
    a, b = _mismatches(ours, eager), _mismatches(ours_rounded_scale, eager)
    print(f"\n[eager cuda {xd}] bytes differing from quant_fp8(fp32 scale): {a}; "
          f"from quant_fp8(scale rounded to {xd}): {b}")
    assert b == 0


@pytest.mark.parametrize("fd", FP8)
@pytest.mark.parametrize("xd", XDTYPES)
@pytest.mark.parametrize("shape", [(1, 128, 576), (9_000_001,)])
def test_quant_fp8_dynamic_cuda_bitwise(xd, fd, shape):
    x = _rand(shape, xd, fd, seed=5, spread=30.0)
    x.view(-1)[:4] = 1.0  # no NaN/inf here: a NaN makes the whole result NaN (tested below)
    q, s = torch.ops.fx_mla.quant_fp8_dynamic(x, fd)
    rq, rs = torch.ops.fx_mla.quant_fp8_dynamic(x.cpu(), fd)
    assert s.shape == () and torch.equal(s.cpu(), rs), (s.item(), rs.item())
    assert_same_fp8(q, rq)


def test_quant_fp8_dynamic_cuda_nan_and_zero():
    x = torch.ones(100_000, device=DEV, dtype=torch.bfloat16)
    x[77_777] = float("nan")
    q, s = torch.ops.fx_mla.quant_fp8_dynamic(x, torch.float8_e4m3fn)
    assert s.isnan().item() and q.float().isnan().all().item()
    z = torch.zeros(1000, device=DEV, dtype=torch.float16)
    q, s = torch.ops.fx_mla.quant_fp8_dynamic(z, torch.float8_e5m2)
    assert torch.equal(s.cpu(), torch.ops.fx_mla.quant_fp8_dynamic(z.cpu(), torch.float8_e5m2)[1])
    assert not _flat_bytes(q).any()


@pytest.mark.parametrize("fd", FP8)
@pytest.mark.parametrize("xd", XDTYPES)
@pytest.mark.parametrize("shape", [(1, 128, 576), (256, 128, 576), (7, 5000), (3, 1), (0, 576)])
def test_quant_fp8_per_token_cuda_bitwise(xd, fd, shape):
    x = _rand(shape, xd, fd, seed=6, spread=30.0) if 0 not in shape else torch.empty(shape, device=DEV, dtype=xd)
    q, s = torch.ops.fx_mla.quant_fp8_per_token(x, fd)
    rq, rs = torch.ops.fx_mla.quant_fp8_per_token(x.cpu(), fd)
    assert s.shape == rs.shape and torch.equal(s.cpu().isnan(), rs.isnan())
    ok = ~rs.isnan()
    assert torch.equal(s.cpu()[ok], rs[ok])
    assert_same_fp8(q, rq)


@pytest.mark.parametrize("fd", FP8)
@pytest.mark.parametrize("xd", XDTYPES)
def test_quant_fp8_launchers_write_every_element(xd, fd):
    x = _rand((3, 5000), xd, fd, seed=12, spread=30.0)
    s = torch.tensor(0.3, device=DEV)
    out = qmod.launch_quant_fp8(x, s, fd, False, _poisoned(x.shape, fd))
    assert_same_fp8(out, qmod.quant_fp8_reference(x.cpu(), s.cpu(), fd))
    x.view(-1)[:12] = 1.0
    scale = qmod.launch_dynamic_scale(x, _poisoned((), torch.float32), fd)
    rq, rs = qmod.quant_fp8_dynamic_reference(x.cpu(), fd)
    assert torch.equal(scale.cpu(), rs)
    q, sc = qmod.launch_quant_fp8_per_token(x, fd, _poisoned(x.shape, fd), _poisoned((3, 1), torch.float32))
    rq, rs = qmod.quant_fp8_per_token_reference(x.cpu(), fd)
    assert torch.equal(sc.cpu(), rs)
    assert_same_fp8(q, rq)


def test_quant_fp8_cuda_non_contiguous_input():
    x = _rand((576, 64), torch.bfloat16, torch.float8_e4m3fn, seed=7).t()
    s = torch.tensor(0.3, device=DEV)
    assert_same_fp8(torch.ops.fx_mla.quant_fp8(x, s, torch.float8_e4m3fn),
                    torch.ops.fx_mla.quant_fp8(x.cpu(), s.cpu(), torch.float8_e4m3fn))
    q, sc = torch.ops.fx_mla.quant_fp8_per_token(x, torch.float8_e5m2)
    assert_same_fp8(q, torch.ops.fx_mla.quant_fp8_per_token(x.cpu(), torch.float8_e5m2)[0])


@pytest.mark.parametrize("fd", FP8)
def test_quant_fp8_opcheck_cuda(fd):
    x = _rand((4, 16, 576), torch.bfloat16, fd, seed=8, spread=20.0)
    x.view(-1)[:4] = 1.0
    torch.library.opcheck(torch.ops.fx_mla.quant_fp8, (x, torch.tensor(0.25, device=DEV), fd))
    torch.library.opcheck(torch.ops.fx_mla.quant_fp8, (x, torch.tensor([4.0], device=DEV), fd, True))
    torch.library.opcheck(torch.ops.fx_mla.quant_fp8_dynamic, (x, fd))
    torch.library.opcheck(torch.ops.fx_mla.quant_fp8_per_token, (x, fd))


def test_quant_fp8_scale_on_cpu_rejected_for_cuda_x():
    x = torch.randn(8, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="scale must be on x's device"):
        torch.ops.fx_mla.quant_fp8(x, torch.tensor(1.0), torch.float8_e4m3fn)


def test_quant_fp8_cuda_graph_capture_replay_same_bytes():
    fd = torch.float8_e4m3fn
    x = _rand((32, 128, 576), torch.bfloat16, fd, seed=9, spread=30.0)
    x.view(-1)[:4] = 1.0
    s = torch.tensor(0.3, device=DEV)

    def step():
        q = torch.ops.fx_mla.quant_fp8(x, s, fd)
        qd, sd = torch.ops.fx_mla.quant_fp8_dynamic(x, fd)
        qt, st = torch.ops.fx_mla.quant_fp8_per_token(x, torch.float8_e5m2)
        return q, qd, sd, qt, st
    step()  # compile the kernels outside capture
    g, outs = capture(step)
    for seed in (10, 11):
        new = _rand((32, 128, 576), torch.bfloat16, fd, seed=seed, spread=30.0)
        new.view(-1)[:4] = 1.0
        x.copy_(new)
        s.fill_(0.3 + seed)
        g.replay()
        torch.cuda.synchronize()
        for got, want in zip(outs, step()):
            assert torch.equal(_flat_bytes(got), _flat_bytes(want))
