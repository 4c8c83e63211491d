"""CPU tests of the quant_fp8 family: reference vs eager chain and an independent RNE oracle,
opcheck, bad inputs, hypothesis, and the Triton kernels under TRITON_INTERPRET=1 (in a subprocess,
so the interpreter flag is set before triton is imported, whatever the rest of the suite imports).

Run as a script (`TRITON_INTERPRET=1 python tests/ops/test_quant_fp8.py`) it performs the
interpreter checks itself; the pytest test below does exactly that.
"""
import os
import subprocess
import sys

import pytest
import torch

from fx_mla.ops import quant_fp8 as qmod
from fx_mla.ops._fp8 import AMAX_FLOOR, FP8_MAX, fp8_scale_from_amax, fp8_supported

XDTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _special_values(x, fd):
    """Overwrite the head of x with values beyond +-fmax, tiny, subnormal-range and signed zero."""
    fmax = FP8_MAX[fd]
    tiny = torch.finfo(fd).tiny
    vals = [fmax * 4, -fmax * 4, fmax * 1.01, -fmax * 0.999, tiny * 0.26, -tiny * 0.5, tiny * 0.75,
            tiny * 1e-3, -0.0, 0.0, fmax, -fmax]
    n = min(len(vals), x.numel())
    x.view(-1)[:n] = torch.tensor(vals[:n], dtype=torch.float32).to(x.dtype)
    return x


def _rand(shape, xd, fd, gen, spread=None):
    """Random values spanning the FP8 range (log-uniform magnitudes, random signs)."""
    fmax = FP8_MAX[fd]
    spread = spread or fmax
    mag = torch.exp(torch.empty(shape).uniform_(-12, float(torch.log(torch.tensor(spread * 4))),
                                                generator=gen))
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    return (mag * sign).to(xd)


def _rne_oracle(y, fd):
    """Independent fp8 round-to-nearest-even by table search in float64 (|y| <= fmax, no NaN);
    returns the flat byte codes."""
    codes = torch.arange(128, dtype=torch.uint8)
    vals = codes.view(fd).double()
    keep = vals.isfinite()
    codes, vals = codes[keep], vals[keep]
    a = y.double().abs().reshape(-1)
    hi = torch.searchsorted(vals, a).clamp(max=len(vals) - 1)
    lo = (hi - 1).clamp(min=0)
    dlo, dhi = a - vals[lo], vals[hi] - a
    tie_hi = (dlo == dhi) & (codes[hi] % 2 == 0)
    pick = torch.where((dhi < dlo) | tie_hi, hi, lo)
    pick = torch.where(vals[hi] == a, hi, pick)
    return codes[pick] | (torch.signbit(y.reshape(-1)).to(torch.uint8) << 7)


def _eager_chain(x, s, fd, reciprocal=False):
    fmax = FP8_MAX[fd]
    y = x * s if reciprocal else x / s
    return y.clamp(-fmax, fmax).to(fd)


def _bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


# ------------------------------------------------------------------ reference semantics

@pytest.mark.parametrize("xd", XDTYPES)
@pytest.mark.parametrize("fd", FP8)
@pytest.mark.parametrize("form", ["div0d", "div1elem", "mul0d"])
def test_quant_fp8_reference_equals_eager_chain_and_rne_oracle(xd, fd, form):
    gen = torch.Generator().manual_seed(hash((str(xd), str(fd), form)) % 2**31)
    x = _special_values(_rand((6, 333), xd, fd, gen), fd)
    s = torch.tensor(0.3) if form != "div1elem" else torch.tensor([0.7])
    if form == "mul0d":
        s = torch.tensor(1.0) / s
    rec = form == "mul0d"
    out = torch.ops.fx_mla.quant_fp8(x, s, fd, rec)
    chain = _eager_chain(x, s, fd, rec)
    assert torch.equal(_bytes(out), _bytes(chain))
    # independent oracle: quotient in the promoted dtype (torch's IEEE fp32 op, then RNE to x.dtype
    # for a 0-dim scale), clamp, fp8 RNE by table search
    y = x.float() * s if rec else x.float() / s
    if s.dim() == 0:
        y = y.to(xd).float()
    y = y.clamp(-FP8_MAX[fd], FP8_MAX[fd])
    assert torch.equal(_bytes(out), _rne_oracle(y, fd))


def test_quant_fp8_intermediate_rounding_changes_bytes():
    # fp32 -> bf16 -> fp8 (what eager does with a 0-dim scale) differs from fp32 -> fp8 on some inputs
    gen = torch.Generator().manual_seed(1)
    x = _rand((4096,), torch.bfloat16, torch.float8_e4m3fn, gen)
    s0, s1 = torch.tensor(0.3), torch.tensor([0.3])
    a = torch.ops.fx_mla.quant_fp8(x, s0, torch.float8_e4m3fn)
    b = torch.ops.fx_mla.quant_fp8(x, s1, torch.float8_e4m3fn)
    assert (_bytes(a) != _bytes(b)).any()
    assert torch.equal(_bytes(b), _bytes((x.float() / 0.3).clamp(-448, 448).to(torch.float8_e4m3fn)))


@pytest.mark.parametrize("fd", FP8)
def test_quant_fp8_nan_stays_nan(fd):
    x = torch.tensor([float("nan"), 1.0, -float("nan")], dtype=torch.bfloat16)
    out = torch.ops.fx_mla.quant_fp8(x, torch.tensor(2.0), fd).float()
    assert out.isnan().tolist() == [True, False, True]


@pytest.mark.parametrize("xd", XDTYPES)
@pytest.mark.parametrize("fd", FP8)
def test_quant_fp8_dynamic_scale_and_bytes(xd, fd):
    gen = torch.Generator().manual_seed(7)
    x = _rand((5, 3, 64), xd, fd, gen, spread=10.0)
    q, scale = torch.ops.fx_mla.quant_fp8_dynamic(x, fd)
    assert scale.shape == () and scale.dtype == torch.float32
    amax = x.double().abs().max()
    assert scale.item() == float(torch.tensor(max(amax.item(), AMAX_FLOOR) / FP8_MAX[fd]).float())
    assert torch.equal(_bytes(q), _bytes(_eager_chain(x, scale, fd)))
    # the distributed form a pass builds: local amax -> (all-reduce max) -> scale -> static quant
    s2 = fp8_scale_from_amax(x.abs().amax(), fd)
    assert torch.equal(scale, s2)
    assert torch.equal(_bytes(q), _bytes(torch.ops.fx_mla.quant_fp8(x, s2, fd)))


def test_quant_fp8_dynamic_zero_and_nan_inputs():
    fd = torch.float8_e4m3fn
    z = torch.zeros(8, dtype=torch.bfloat16)
    q, s = torch.ops.fx_mla.quant_fp8_dynamic(z, fd)
    assert s.item() == float(torch.tensor(AMAX_FLOOR).float() / 448) and not _bytes(q).any()
    n = torch.ones(8, dtype=torch.bfloat16)
    n[3] = float("nan")
    q, s = torch.ops.fx_mla.quant_fp8_dynamic(n, fd)
    assert s.isnan() and q.float().isnan().all()


@pytest.mark.parametrize("shape", [(1, 576), (3, 4, 5), (2, 1, 130)])
@pytest.mark.parametrize("xd", XDTYPES)
@pytest.mark.parametrize("fd", FP8)
def test_quant_fp8_per_token_rows(shape, xd, fd):
    gen = torch.Generator().manual_seed(3)
    x = _rand(shape, xd, fd, gen, spread=50.0)
    q, scales = torch.ops.fx_mla.quant_fp8_per_token(x, fd)
    assert scales.shape == shape[:-1] + (1,) and scales.dtype == torch.float32
    rows, sr = x.reshape(-1, shape[-1]), scales.reshape(-1)
    for r in range(rows.shape[0]):
        amax = rows[r].double().abs().max().item()
        assert sr[r].item() == float(torch.tensor(max(amax, AMAX_FLOOR) / FP8_MAX[fd]).float())
        # 1-element scale with dims: quotient stays fp32 (no rounding to x.dtype)
        want = _rne_oracle((rows[r].float() / sr[r:r + 1]).clamp(-FP8_MAX[fd], FP8_MAX[fd]), fd)
        assert torch.equal(_bytes(q.reshape(-1, shape[-1])[r]), want)


# ------------------------------------------------------------------ registration

@pytest.mark.parametrize("xd", XDTYPES)
@pytest.mark.parametrize("fd", FP8)
def test_quant_fp8_opcheck_cpu(xd, fd):
    gen = torch.Generator().manual_seed(11)
    x = _rand((4, 3, 16), xd, fd, gen, spread=20.0)
    xt = x.transpose(0, 1)  # non-contiguous input
    for inp in (x, xt):
        torch.library.opcheck(torch.ops.fx_mla.quant_fp8, (inp, torch.tensor(0.25), fd))
        torch.library.opcheck(torch.ops.fx_mla.quant_fp8, (inp, torch.tensor([4.0]), fd, True))
        torch.library.opcheck(torch.ops.fx_mla.quant_fp8_dynamic, (inp, fd))
        torch.library.opcheck(torch.ops.fx_mla.quant_fp8_per_token, (inp, fd))


def test_quant_fp8_outputs_contiguous_for_strided_input():
    x = torch.randn(8, 6, dtype=torch.bfloat16).t()
    for out in (torch.ops.fx_mla.quant_fp8(x, torch.tensor(0.5), torch.float8_e4m3fn),
                *torch.ops.fx_mla.quant_fp8_per_token(x, torch.float8_e4m3fn)):
        assert out.is_contiguous()


def test_quant_fp8_under_torch_compile_matches_eager():
    def f(x, s):
        q = torch.ops.fx_mla.quant_fp8(x, s, torch.float8_e4m3fn)
        qd, sd = torch.ops.fx_mla.quant_fp8_dynamic(x, torch.float8_e5m2)
        return q, qd, sd
    x = torch.randn(3, 7, 64, dtype=torch.bfloat16) * 100
    s = torch.tensor(0.37)
    got = torch.compile(f, backend="aot_eager", dynamic=True, fullgraph=True)(x, s)
    for g, w in zip(got, f(x, s)):
        assert torch.equal(_bytes(g), _bytes(w))


# ------------------------------------------------------------------ bad inputs

@pytest.mark.parametrize("call, exc, match", [
    (lambda x, s: torch.ops.fx_mla.quant_fp8(x.double(), s, torch.float8_e4m3fn), TypeError, "x must be"),
    (lambda x, s: torch.ops.fx_mla.quant_fp8(x, s.double(), torch.float8_e4m3fn), TypeError, "scale must be float32"),
    (lambda x, s: torch.ops.fx_mla.quant_fp8(x, torch.ones(2), torch.float8_e4m3fn), ValueError, "scale must have exactly one"),
    (lambda x, s: torch.ops.fx_mla.quant_fp8(x, torch.ones(1, 1, 1), torch.float8_e4m3fn), ValueError, "scale must not have more dims"),
    (lambda x, s: torch.ops.fx_mla.quant_fp8(x, s, torch.bfloat16), ValueError, "fp8_dtype must be"),
    (lambda x, s: torch.ops.fx_mla.quant_fp8(x, s, torch.float8_e4m3fnuz), ValueError, "fp8_dtype must be"),
    (lambda x, s: torch.ops.fx_mla.quant_fp8(x.to(torch.int32), s, torch.float8_e5m2), TypeError, "x must be"),
    (lambda x, s: torch.ops.fx_mla.quant_fp8_dynamic(x[:0], torch.float8_e5m2), ValueError, "at least one element"),
    (lambda x, s: torch.ops.fx_mla.quant_fp8_dynamic(x.half(), torch.int8), ValueError, "fp8_dtype must be"),
    (lambda x, s: torch.ops.fx_mla.quant_fp8_per_token(x[:, :0], torch.float8_e5m2), ValueError, "non-empty last dim"),
    (lambda x, s: torch.ops.fx_mla.quant_fp8_per_token(s, torch.float8_e5m2), ValueError, "non-empty last dim"),
    (lambda x, s: torch.ops.fx_mla.quant_fp8_per_token(x.double(), torch.float8_e5m2), TypeError, "x must be"),
])
def test_quant_fp8_bad_inputs_raise_clear_errors(call, exc, match):
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    with pytest.raises(exc, match=match):
        call(x, torch.tensor(0.5))


def test_quant_fp8_scale_on_wrong_device_rejected():
    x = torch.randn(4, 8, dtype=torch.bfloat16, device="meta")
    with pytest.raises(ValueError, match="scale must be on x's device"):
        qmod._check_static(x, torch.tensor(0.5), torch.float8_e4m3fn)


def test_fp8_supported_capability_rule():
    for fd in FP8:
        assert fp8_supported(fd, None) is None
        assert fp8_supported(fd, (8, 9)) is None and fp8_supported(fd, (9, 0)) is None
        assert "8.9" in fp8_supported(fd, (8, 6)) and "8.0" in fp8_supported(fd, (8, 0))
    assert "unsupported" in fp8_supported(torch.bfloat16, (9, 0))


# ------------------------------------------------------------------ hypothesis

hyp = pytest.importorskip("hypothesis")
st = hyp.strategies


@hyp.settings(max_examples=40, deadline=None)
@hyp.given(shape=st.lists(st.integers(1, 7), min_size=1, max_size=3),
           xd=st.sampled_from(XDTYPES), fd=st.sampled_from(FP8),
           scale=st.floats(1e-3, 1e3), one_dim=st.booleans(), rec=st.booleans(),
           seed=st.integers(0, 2**16))
def test_quant_fp8_hypothesis_matches_rne_oracle(shape, xd, fd, scale, one_dim, rec, seed):
    gen = torch.Generator().manual_seed(seed)
    x = _rand(tuple(shape), xd, fd, gen)
    s = torch.tensor([scale] if one_dim else scale, dtype=torch.float32)
    out = torch.ops.fx_mla.quant_fp8(x, s, fd, rec)
    y = x.float() * s if rec else x.float() / s
    if not one_dim:
        y = y.to(xd).float()
    assert torch.equal(_bytes(out), _rne_oracle(y.clamp(-FP8_MAX[fd], FP8_MAX[fd]), fd))
    q, sc = torch.ops.fx_mla.quant_fp8_per_token(x, fd)
    assert torch.equal(_bytes(q), _bytes(_eager_chain(x, sc, fd)))


# ------------------------------------------------------------------ Triton interpreter

def test_quant_fp8_kernels_under_triton_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "interpreter checks passed" in r.stdout


def _interpreter_checks():
    """Kernels vs torch, with the final conversions done by the interpreter itself (its fp32->bf16
    and fp32->fp8 rounding is not RNE: compare against the same rounding; GPU tests check RNE)."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import triton
    import triton.language as tl

    @triton.jit
    def _cast_kernel(x_ptr, o_ptr, n, OUT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        v = tl.load(x_ptr + offs, mask=offs < n)
        tl.store(o_ptr + offs, v.to(OUT, fp_downcast_rounding="rtne"), mask=offs < n)

    def icast(y, dtype):
        y = y.float().contiguous()
        o = torch.empty(y.shape, dtype=dtype)
        tl_dt = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(dtype) or qmod._tl_fp8(dtype)
        _cast_kernel[(1,)](y, o, y.numel(), OUT=tl_dt, BLOCK=triton.next_power_of_2(max(y.numel(), 2)))
        return o

    def expected(x, s, fd, rec, round_to_input):
        y = x.float() * s if rec else x.float() / s
        if round_to_input:
            y = icast(y, x.dtype).float()
        return icast(y.clamp(-FP8_MAX[fd], FP8_MAX[fd]), fd)

    def poisoned(shape, dtype):
        return torch.full(shape, float("nan"), dtype=torch.float32).to(dtype)

    gen = torch.Generator().manual_seed(5)
    # small tiles so the multi-program, multi-partial and tiled-row paths all run on small tensors
    qmod.STATIC_BLOCK, qmod.AMAX_BLOCK, qmod.FINALIZE_BLOCK = 256, 64, 4
    qmod.PER_TOKEN_MAX_BLOCK, qmod.PER_TOKEN_TILE = 32, 128  # 4 rows a program, last one partial
    for xd in XDTYPES:
        for fd in FP8:
            x = _special_values(_rand((3, 301), xd, fd, gen), fd)
            for s, rec in ((torch.tensor(0.3), False), (torch.tensor([0.7]), False),
                           (torch.tensor(3.1), True)):
                out = poisoned(x.shape, fd)
                qmod.launch_quant_fp8(x, s, fd, rec, out)
                want = expected(x, s, fd, rec, s.dim() == 0 and xd != torch.float32)
                assert torch.equal(_bytes(out), _bytes(want)), (xd, fd, s, rec)
            xs = _rand((37, 29), xd, fd, gen, spread=5.0)
            scale = torch.full((), float("nan"))
            qmod.launch_dynamic_scale(xs, scale, fd)
            ref_q, ref_s = qmod.quant_fp8_dynamic_reference(xs, fd)
            assert torch.equal(scale, ref_s), (xd, fd, scale, ref_s)
            for cols in (29, 100):  # single tile, tiled row
                xr = _rand((3, 2, cols), xd, fd, gen, spread=5.0)
                out, sc = poisoned(xr.shape, fd), torch.full((3, 2, 1), float("nan"))
                qmod.launch_quant_fp8_per_token(xr, fd, out, sc)
                ref_q, ref_s = qmod.quant_fp8_per_token_reference(xr, fd)
                assert torch.equal(sc, ref_s), (xd, fd, cols)
                assert torch.equal(_bytes(out), _bytes(expected(xr, sc, fd, False, False)))
    nan_x = torch.ones(200, dtype=torch.bfloat16)
    nan_x[150] = float("nan")
    scale = torch.zeros(())
    qmod.launch_dynamic_scale(nan_x, scale, torch.float8_e4m3fn)
    assert scale.isnan()
    print("interpreter checks passed")


if __name__ == "__main__":
    _interpreter_checks()


@pytest.mark.parametrize("xd", XDTYPES)
def test_quant_fp8_approx_division_is_exact_on_cpu(xd):
    """approx_division selects Triton's '/' on CUDA only; the CPU implementation divides exactly (as Inductor's
    C++ kernels do), so the flag leaves CPU results bitwise unchanged."""
    fd = torch.float8_e4m3fn
    x = _rand((33, 65), xd, fd, torch.Generator().manual_seed(11))
    s = torch.tensor(0.3)
    got = torch.ops.fx_mla.quant_fp8(x, s, fd, False, True)
    assert torch.equal(got.view(torch.uint8), qmod.quant_fp8_reference(x, s, fd).view(torch.uint8))
    assert torch.equal(qmod.quant_fp8(x, s, fd, approx_division=True).view(torch.uint8), got.view(torch.uint8))
    torch.library.opcheck(torch.ops.fx_mla.quant_fp8.default, (x, s, fd, False, True))
