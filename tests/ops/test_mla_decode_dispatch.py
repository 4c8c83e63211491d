"""CPU tests of the Python side of mla_decode_fp8's CUDA path: which kernel cuda_kernel_choice picks (on a pretended
sm_90 + Triton 3.6), the op's CUDA implementation (device guard around the launch, the chosen launcher called),
and the launchers' shape-only early exits (B = 0, H = 0, no cache block, no block-table column: out = 0,
lse = -inf, no kernel) and capacity check. No kernel runs here: launchers are replaced by recorders where one
would launch."""
import contextlib

import pytest
import torch

from fx_mla.ops import mla_decode_fp8 as dmod
from fx_mla.ops import mla_decode_gluon as gmod
from fx_mla.ops import mla_decode_gluon16 as g16mod
from fx_mla.ops import mla_decode_seesaw as smod

E4M3 = torch.float8_e4m3fn
CUDA0 = torch.device("cuda", 0)


def _inputs(batch=2, heads=128, num_blocks=4, block=64, max_blocks=3, q_dtype=torch.bfloat16, cache_dtype=E4M3):
    torch.manual_seed(batch * 131 + heads + num_blocks + max_blocks)
    q = torch.randn(batch, heads, 576).to(q_dtype)
    kv = torch.randn(num_blocks, block, 576).to(cache_dtype)
    bt = torch.randint(0, max(num_blocks, 1), (batch, max_blocks), dtype=torch.int32)
    lens = torch.randint(0, max_blocks * block + 1, (batch,), dtype=torch.int32)
    return q, kv, bt, lens, torch.rand(1) + 0.5


def _poisoned(q):
    return (torch.full((q.shape[0], q.shape[1], 512), float("nan"), dtype=torch.bfloat16),
            torch.full(q.shape[:2], float("nan")))


def _assert_empty_result(out, lse):
    assert torch.equal(out, torch.zeros_like(out))
    assert bool((lse == float("-inf")).all())


# ---------------------------------------------------------------- launchers: shape-only early exits

@pytest.mark.parametrize("batch,heads,num_blocks,max_blocks", [(0, 16, 4, 3), (2, 0, 4, 3), (2, 16, 0, 3),
                                                               (2, 16, 4, 0), (2, 128, 0, 0)])
def test_triton_launcher_no_token_shapes_give_empty_result(batch, heads, num_blocks, max_blocks):
    # B = 0 / H = 0 divided by zero in the split count before; an empty cache had the kernels clamp page ids to -1
    q, kv, bt, lens, ks = _inputs(batch, heads, num_blocks, 16, max_blocks)
    out, lse = _poisoned(q)
    res = dmod.launch_mla_decode_fp8(q, kv, bt, lens + 5, ks, None, 0.1, 512, torch.bfloat16, out=out, lse=lse)
    assert res[0] is out and res[1] is lse
    _assert_empty_result(out, lse)
    out2, lse2 = dmod.launch_mla_decode_fp8(q, kv, bt, lens, ks, None, 0.1, 512, torch.float32)
    assert out2.shape == (batch, heads, 512) and out2.dtype == torch.float32
    _assert_empty_result(out2, lse2)


def test_launchers_reject_capacity_past_int32():
    q, kv, _, lens, ks = _inputs(1, 16, 1, 64, 1)
    bt = torch.zeros(1, 2 ** 25, dtype=torch.int32).expand(1, 2 ** 25)  # 2**25 columns x 64 tokens = 2**31
    with pytest.raises(ValueError, match=r"max_blocks .* must be below 2\*\*31"):
        dmod.launch_mla_decode_fp8(q, kv, bt, lens, ks, None, 0.1, 512, torch.bfloat16)
    with pytest.raises(ValueError, match=r"max_blocks .* must be below 2\*\*31"):
        dmod.check_capacity(kv, bt)
    dmod.check_capacity(kv, bt[:, :2 ** 24])
    # 2**31 - 32 tokens: an int32 length rounded up to a 64-token tile would overflow
    kv32, wide = torch.empty(1, 32, 576), torch.zeros(1, 1, dtype=torch.int32).expand(1, 2 ** 26 - 1)
    with pytest.raises(ValueError, match=r"at most 2\*\*31 - 64"):
        dmod.check_capacity(kv32, wide)
    dmod.check_capacity(kv32, wide[:, :2 ** 26 - 2])  # 2**31 - 64 tokens


def test_triton_launcher_rejects_bad_num_splits():
    q, kv, bt, lens, ks = _inputs(2, 16, 4, 16, 3)
    with pytest.raises(ValueError, match="num_splits must be a positive int"):
        dmod.launch_mla_decode_fp8(q, kv, bt, lens, ks, None, 0.1, 512, torch.bfloat16, num_splits=-2)


@pytest.mark.parametrize("launcher,heads", [("gluon", 128), ("seesaw", 128), ("gluon16", 16)])
@pytest.mark.parametrize("num_blocks,max_blocks,batch", [(0, 3, 2), (4, 0, 2), (4, 3, 0)])
def test_gluon_launchers_no_token_shapes_give_empty_result(monkeypatch, launcher, heads, num_blocks, max_blocks,
                                                           batch):
    """Past their (here pretended) support checks, the Gluon launchers exit before importing Gluon: a 16-head
    table without columns raised ValueError in the 16-head launcher before, an empty cache reached the kernels."""
    mod, fn = {"gluon": (gmod, gmod.launch_mla_decode_gluon), "seesaw": (smod, smod.launch_mla_decode_seesaw),
               "gluon16": (g16mod, g16mod.launch_mla_decode_gluon16)}[launcher]
    for name in ("gluon_unsupported_reason", "seesaw_unsupported_reason", "gluon16_unsupported_reason"):
        if hasattr(mod, name):
            monkeypatch.setattr(mod, name, lambda *a, **k: None)
    q, kv, bt, lens, ks = _inputs(batch, heads, num_blocks, 64, max_blocks)
    out, lse = _poisoned(q)
    res = fn(q, kv, bt, lens, ks, None, 0.1, 512, out, lse)
    assert res[0] is out and res[1] is lse
    _assert_empty_result(out, lse)


# ---------------------------------------------------------------- cuda_kernel_choice on a pretended Hopper

@pytest.fixture
def fake_hopper(fake_hopper, monkeypatch):
    """The shared pretended Hopper (tests/ops/conftest.py) with the op's kernel choice on "auto"."""
    monkeypatch.setattr(dmod, "DECODE_KERNEL", "auto")
    return fake_hopper


@pytest.mark.parametrize("heads,q_dtype,cache_dtype,expected", [
    (128, torch.bfloat16, E4M3, "seesaw"), (64, torch.float16, torch.float8_e5m2, "seesaw"),
    (16, torch.bfloat16, E4M3, "gluon16"), (32, torch.bfloat16, E4M3, "triton"), (128, E4M3, E4M3, "seesaw"),
    (16, E4M3, E4M3, "gluon16"), (64, torch.float8_e5m2, E4M3, "seesaw"), (32, E4M3, E4M3, "triton"),
    (128, E4M3, torch.bfloat16, "triton"), (128, torch.bfloat16, torch.bfloat16, "triton"),
    (8, torch.bfloat16, E4M3, "triton"), (128, torch.float32, E4M3, "triton"),
])
def test_cuda_kernel_choice_on_hopper(fake_hopper, heads, q_dtype, cache_dtype, expected):
    q, kv, *_ = _inputs(2, heads, q_dtype=q_dtype, cache_dtype=cache_dtype)
    assert dmod.cuda_kernel_choice(q, kv, 512, CUDA0) == expected
    assert dmod.cuda_kernel_choice(q, kv, 448, CUDA0) == "triton"


def test_cuda_kernel_choice_shared_memory_and_capability(fake_hopper, monkeypatch):
    q, kv, *_ = _inputs(2, 128)
    fake_hopper["smem"] = 230500  # enough for the Gluon kernel (230,400 B) and the scorer (230,176 B) ...
    assert dmod.cuda_kernel_choice(q, kv, 512, CUDA0) == "seesaw"  # the seesaw launcher's "auto": the scorer
    monkeypatch.setattr(smod, "VARIANT", "seesaw")  # ... not for the seesaw kernel (230,732 B)
    assert dmod.cuda_kernel_choice(q, kv, 512, CUDA0) == "gluon"
    fake_hopper["cap"] = (10, 0)
    assert dmod.cuda_kernel_choice(q, kv, 512, CUDA0) == "triton"


def test_cuda_kernel_choice_rejects_an_unknown_seesaw_variant(fake_hopper, monkeypatch):
    """A misspelt mla_decode_seesaw.VARIANT raises, naming it, rather than quietly running another kernel."""
    q, kv, *_ = _inputs(2, 128)
    monkeypatch.setattr(smod, "VARIANT", "scorrer")
    with pytest.raises(ValueError, match="scorrer"):
        dmod.cuda_kernel_choice(q, kv, 512, CUDA0)


def test_cuda_kernel_choice_unaligned_cache_goes_to_triton(fake_hopper):
    q, _, *_ = _inputs(2, 16)
    kv = torch.randn(4, 64, 580).to(E4M3)[..., 2:578]  # rows 2 bytes off the 4- and 16-byte boundaries
    assert dmod.cuda_kernel_choice(q, kv, 512, CUDA0) == "triton"


def test_cuda_kernel_choice_forced_gluon_raises_where_none_covers(fake_hopper, monkeypatch):
    q, kv, *_ = _inputs(2, 32)
    monkeypatch.setattr(dmod, "DECODE_KERNEL", "gluon")
    with pytest.raises(RuntimeError, match="FX_MLA_DECODE_KERNEL=gluon.*multiple of 64.*head count must be 16"):
        dmod.cuda_kernel_choice(q, kv, 512, CUDA0)
    monkeypatch.setattr(dmod, "DECODE_KERNEL", "triton")
    assert dmod.cuda_kernel_choice(*_inputs(2, 128)[:2], 512, CUDA0) == "triton"


# ---------------------------------------------------------------- the op's CUDA implementation (wiring only)

@pytest.fixture
def recorded_cuda(monkeypatch):
    """The op's CUDA implementation on CPU tensors: capability (9, 0), torch.cuda.device recorded, launchers
    replaced by recorders that note whether the device guard was active."""
    log = dict(guard=[], active=0, calls=[], args=[], checked=[])

    @contextlib.contextmanager
    def device(dev):
        log["guard"].append(torch.device(dev))
        log["active"] += 1
        try:
            yield
        finally:
            log["active"] -= 1

    def recorder(name):
        def launch(q, kv, bt, lens, ks, qs, sm, rank, *rest, **kw):
            log["calls"].append((name, log["active"], rest))
            log["checked"].append(kw.get("checked", False))
            log["args"].append((q, kv, bt, lens, ks, qs, sm, rank))
            out, lse = rest if len(rest) == 2 else dmod._empty_outputs(q, rank, rest[0])
            return out.fill_(1.0), lse.fill_(2.0)
        return launch

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(dmod, "launch_mla_decode_fp8", recorder("triton"))
    monkeypatch.setattr(smod, "launch_mla_decode_seesaw", recorder("seesaw"))
    monkeypatch.setattr(g16mod, "launch_mla_decode_gluon16", recorder("gluon16"))
    return log


@pytest.mark.parametrize("choice", ["triton", "seesaw", "gluon16"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_cuda_impl_launches_the_choice_under_a_device_guard(recorded_cuda, monkeypatch, choice, out_dtype):
    monkeypatch.setattr(dmod, "cuda_kernel_choice", lambda *a, **k: choice)
    q, kv, bt, lens, ks = _inputs(2, 16 if choice == "gluon16" else 128)
    out, lse = dmod._mla_decode_fp8_cuda(q, kv, bt, lens, ks, None, 0.1, 512, out_dtype)
    assert recorded_cuda["guard"] == [q.device]
    [(name, active, rest)] = recorded_cuda["calls"]
    assert name == choice and active == 1  # launched inside the guard
    if choice != "triton":  # the Gluon launchers get preallocated outputs of the requested dtype, checked inputs
        assert rest[0].dtype == out_dtype and rest[0].shape == (2, q.shape[1], 512) and rest[1].dtype == torch.float32
        assert recorded_cuda["checked"] == [True]
    assert out.dtype == out_dtype and bool((out == 1).all()) and bool((lse == 2).all())


@pytest.mark.parametrize("choice,heads", [("seesaw", 128), ("gluon16", 16)])
def test_cuda_impl_fp8_query_reaches_the_gluon_launchers_with_its_scale(fake_hopper, recorded_cuda, monkeypatch,
                                                                       choice, heads):
    """An FP8 query over an FP8 cache goes to the Gluon kernels as is, with q_scale (they load it as fp16 exactly
    and fold q_scale into the score scale)."""
    choose = dmod.cuda_kernel_choice
    monkeypatch.setattr(dmod, "cuda_kernel_choice", lambda q, kv, rank, device=None: choose(q, kv, rank, CUDA0))
    q, kv, bt, lens, ks = _inputs(2, heads, q_dtype=E4M3)
    qs = torch.tensor([0.37])
    out, lse = dmod._mla_decode_fp8_cuda(q, kv, bt, lens, ks, qs, 0.1, 512, torch.bfloat16)
    [(name, _, _)] = recorded_cuda["calls"]
    assert name == choice
    assert recorded_cuda["args"][0][0] is q and recorded_cuda["args"][0][5] is qs


@pytest.mark.parametrize("batch,num_blocks,max_blocks", [(0, 4, 3), (2, 0, 3), (2, 4, 0)])
def test_cuda_impl_no_token_shapes_launch_nothing(recorded_cuda, batch, num_blocks, max_blocks):
    q, kv, bt, lens, ks = _inputs(batch, 16, num_blocks, 64, max_blocks)
    out, lse = dmod._mla_decode_fp8_cuda(q, kv, bt, lens, ks, None, 0.1, 512, torch.float16)
    assert recorded_cuda["calls"] == [] and out.shape == (batch, 16, 512) and out.dtype == torch.float16
    _assert_empty_result(out, lse)


def test_cuda_impl_validates_before_dispatch(recorded_cuda):
    q, kv, bt, lens, ks = _inputs(2, 128)
    with pytest.raises(TypeError, match="seq_lens must be int32 or int64"):
        dmod._mla_decode_fp8_cuda(q, kv, bt, lens.float(), ks, None, 0.1, 512, torch.bfloat16)
    with pytest.raises(ValueError, match="block_table must be"):
        dmod._mla_decode_fp8_cuda(q, kv, bt[:1], lens, ks, None, 0.1, 512, torch.bfloat16)
    assert recorded_cuda["calls"] == []


# ---------------------------------------------------------------- the shared Gluon launch arguments

def _kernel_params(module_file, kernel_name):
    """(positional parameter names, constexpr names) of a Gluon kernel, read as text (no Gluon import on CPU)."""
    import os
    import re
    src = open(os.path.join(os.path.dirname(dmod.__file__), "kernels", module_file)).read()
    sig = re.search(rf"def {kernel_name}\((.*?)\):", src, re.S).group(1)
    params = [p.strip() for p in sig.replace("\n", " ").split(",") if p.strip()]
    return ([p for p in params if "constexpr" not in p], {p.split(":")[0] for p in params if "constexpr" in p})


@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16, E4M3])
def test_gluon_launch_args_match_every_gluon_kernel(q_dtype):
    from fx_mla.ops._decode_launch import Q_SHIFT, gluon_launch_args
    q, kv, bt, lens, ks = _inputs(2, 16, q_dtype=q_dtype)
    q = torch.cat([q, q], dim=2)[..., :576]              # rows 1152 apart, contiguous in the last dim
    bt_cm = bt.t().contiguous().t()                       # column-major: made contiguous
    qs = torch.tensor([0.5]) if q_dtype == E4M3 else None
    out, lse = torch.empty(2, 16, 512, dtype=torch.bfloat16), torch.empty(2, 16)
    args, consts, (part_o, part_lse) = gluon_launch_args(q, kv, bt_cm, lens, ks, qs, 0.1, out, lse, 3, poison=True)
    assert args[0] is q and args[2].is_contiguous() and torch.equal(args[2], bt)
    assert args[5] is (qs if qs is not None else ks) and args[8] is part_o and args[9] is part_lse
    assert part_o.shape == (2, 3, 16, 512) and bool(part_o.isnan().all())
    assert args[12:15] == (3, 4, 3)                       # splits, cache blocks, block-table columns
    assert args[15:17] == (q.stride(0), q.stride(1)) and args[17:19] == (576 * 64 // 4, 576 // 4)
    assert consts["Q_SHIFT"] == (Q_SHIFT if q_dtype == torch.bfloat16 else 0)
    assert consts["HAS_Q_SCALE"] == (qs is not None) and not consts["SINGLE_SPLIT"] and consts["PAGE"] == 64
    for module_file, kernel_name in (("mla_decode_gluon.py", "_mla_decode_gluon_kernel"),
                                     ("mla_decode_seesaw.py", "_mla_decode_seesaw_kernel"),
                                     ("mla_decode_gluon16.py", "_mla_decode_gluon16_kernel"),
                                     ("mla_decode_gluon16.py", "_mla_decode_gluon16_ws_kernel")):
        positional, constexprs = _kernel_params(module_file, kernel_name)
        assert len(positional) == len(args), kernel_name
        assert set(consts) <= constexprs, (kernel_name, set(consts) - constexprs)
    with pytest.raises(ValueError, match="num_splits"):
        gluon_launch_args(q, kv, bt, lens, ks, qs, 0.1, out, lse, 0, poison=False)


def test_scorer_pdl_and_probe_settings_are_checked(monkeypatch):
    """SCORER_PDL: a value other than False / True / "early" raises, naming it; "early" prefetches only
    where the cache allows the bulk prefetch (16-byte aligned: else plain PDL). SCORER_PROBE: checked, passed on."""
    from fx_mla.ops.kernels import mla_decode_scorer as ksc
    calls = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **constexprs: calls.append(constexprs)

    monkeypatch.setattr(ksc, "_mla_decode_scorer_kernel", Recorder())
    monkeypatch.setattr(smod, "seesaw_unsupported_reason", lambda *a, **k: None)
    monkeypatch.setattr(smod, "combine_splits", lambda *a, **k: None)
    q, kv, bt, lens, ks = _inputs(2, 128)
    out, lse = torch.empty(2, 128, 512, dtype=torch.bfloat16), torch.empty(2, 128)
    monkeypatch.setattr(smod, "SCORER_PDL", "yes")
    with pytest.raises(ValueError, match="SCORER_PDL must be False, True or 'early', got 'yes'"):
        smod.launch_mla_decode_seesaw(q, kv, bt, lens, ks, None, 0.1, 512, out, lse, num_splits=3, variant="scorer")
    monkeypatch.setattr(smod, "SCORER_PDL", "early")
    unaligned = torch.empty(kv.numel() + 1, dtype=kv.dtype)[1:].view(kv.shape)
    unaligned.copy_(kv)
    for cache, early in ((kv, True), (unaligned, False)):
        smod.launch_mla_decode_seesaw(q, cache, bt, lens, ks, None, 0.1, 512, out, lse, num_splits=3, variant="scorer")
        assert calls[-1]["PDL"] and calls[-1]["launch_pdl"] and calls[-1]["PDL_EARLY"] == early
        assert (calls[-1]["PREFETCH"] > 0) == early
    # SCORER_PROBE (development): an int64 buffer of 16 entries a CTA (2 requests x 2 head groups x 3 splits)
    monkeypatch.setattr(smod, "SCORER_PDL", False)
    for bad in (torch.empty(16 * 12, dtype=torch.int32), torch.empty(16 * 12 - 1, dtype=torch.int64),
                torch.empty(2, 16 * 12, dtype=torch.int64).t()):
        monkeypatch.setattr(smod, "SCORER_PROBE", bad)
        with pytest.raises(ValueError, match="SCORER_PROBE must be a contiguous int64 tensor on cpu of at least 192"):
            smod.launch_mla_decode_seesaw(q, kv, bt, lens, ks, None, 0.1, 512, out, lse, num_splits=3,
                                          variant="scorer")
    probe = torch.empty(16 * 12, dtype=torch.int64)
    monkeypatch.setattr(smod, "SCORER_PROBE", probe)
    smod.launch_mla_decode_seesaw(q, kv, bt, lens, ks, None, 0.1, 512, out, lse, num_splits=3, variant="scorer")
    assert calls[-1]["PROBE"] and calls[-1]["probe_ptr"] is probe
    monkeypatch.setattr(smod, "SCORER_PROBE", None)
    smod.launch_mla_decode_seesaw(q, kv, bt, lens, ks, None, 0.1, 512, out, lse, num_splits=3, variant="scorer")
    assert "PROBE" not in calls[-1] and "probe_ptr" not in calls[-1]


@pytest.mark.parametrize("launcher", ["gluon", "seesaw", "seesaw_producer", "seesaw_auto", "seesaw_scorer",
                                      "seesaw_scorer_early", "gluon16_ring",
                                      "gluon16_ws8p2", "gluon16_rs"])
@pytest.mark.parametrize("splits", [1, 3])
def test_gluon_launchers_call_their_kernel_with_its_signature(monkeypatch, launcher, splits):
    """Each Gluon launcher, on CPU tensors with its support check bypassed and its kernel replaced by a recorder:
    the call binds to the real kernel's parameters (all of them, constexprs included), and the split workspace
    reaches the combine. "seesaw_scorer" also with SCORER_PDL on: the scorer and the combine as programmatic
    dependent launches."""
    import inspect

    from fx_mla.ops.kernels import mla_decode_gluon as kg
    from fx_mla.ops.kernels import mla_decode_gluon16 as kg16
    from fx_mla.ops.kernels import mla_decode_gluon16_rs as krs
    from fx_mla.ops.kernels import mla_decode_scorer as ksc
    from fx_mla.ops.kernels import mla_decode_seesaw as ks_
    mod, kmod, name, heads, kw = {
        "gluon": (gmod, kg, "_mla_decode_gluon_kernel", 128, {}),
        "seesaw": (smod, ks_, "_mla_decode_seesaw_kernel", 128, dict(variant="seesaw")),
        "seesaw_producer": (smod, ks_, "_mla_decode_seesaw_kernel", 128, dict(variant="producer")),
        "seesaw_auto": (smod, ksc, "_mla_decode_scorer_kernel", 128, dict(variant="auto")),
        "seesaw_scorer": (smod, ksc, "_mla_decode_scorer_kernel", 128, {}),
        "seesaw_scorer_early": (smod, ksc, "_mla_decode_scorer_kernel", 128, {}),
        "gluon16_ring": (g16mod, kg16, "_mla_decode_gluon16_kernel", 16, dict(variant="ring")),
        "gluon16_ws8p2": (g16mod, kg16, "_mla_decode_gluon16_ws_kernel", 16, dict(variant="ws8p2")),
        "gluon16_rs": (g16mod, krs, "_mla_decode_gluon16_rs_kernel", 16, {}),  # the default VARIANT
    }[launcher]
    real = getattr(kmod, name)
    calls, merged = [], []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **constexprs):
                options = {k: constexprs.pop(k) for k in ("launch_pdl", "launch_cooperative_grid")
                           if k in constexprs}  # launch options
                inspect.signature(real.fn).bind(*args, **constexprs)  # every parameter (num_warps too), none unknown
                calls.append((grid, args, {**constexprs, **options}))
                return "compiled"
            return launch

    monkeypatch.setattr(kmod, name, Recorder())
    for reason in ("gluon_unsupported_reason", "seesaw_unsupported_reason", "gluon16_unsupported_reason"):
        if hasattr(mod, reason):
            monkeypatch.setattr(mod, reason, lambda *a, **k: None)
    monkeypatch.setattr(mod, "combine_splits", lambda *a, **k: merged.append((*a, k.get("pdl"))))
    # SCORER_PDL on for every seesaw launch but "auto" (the defaults): only the scorer may take it
    pdl = launcher in ("seesaw_scorer", "seesaw_scorer_early")  # the scorer itself a PDL launch
    monkeypatch.setattr(smod, "SCORER_PDL", "early" if launcher == "seesaw_scorer_early" else launcher != "seesaw_auto")
    q, kv, bt, lens, ks = _inputs(2, heads, q_dtype=E4M3)
    out, lse = torch.empty(2, heads, 512, dtype=torch.bfloat16), torch.empty(2, heads)
    launch = getattr(mod, f"launch_{mod.__name__.rsplit('.', 1)[1]}")
    assert launch(q, kv, bt, lens, ks, torch.tensor([0.5]), 0.1, 512, out, lse, num_splits=splits, **kw) == (out, lse)
    [(grid, args, constexprs)] = calls
    assert splits in grid and constexprs["HAS_Q_SCALE"] and constexprs["SINGLE_SPLIT"] == (splits == 1)
    if launcher in ("seesaw", "seesaw_producer"):  # the seesaw kernel, or its producer form where asked for
        assert constexprs.get("PRODUCER", False) == (launcher == "seesaw_producer")
        # STAGED_O "auto": staged for one split; 3 splits are fewer than the lean plan's STAGED_MIN_SPLITS: MMA-layout
        # stores and fp32 partials (smod.output_plan; tests/ops/test_mla_decode_seesaw.py covers the rest)
        assert constexprs["STAGED_O"] == (splits == 1)
        assert splits == 1 or args[8].dtype == torch.float32
    if launcher.startswith("seesaw_scorer") or launcher == "seesaw_auto":  # the scorer kernel, L2 prefetch
        assert constexprs["TILE"] == 64 and constexprs["EARLY_Q"] == smod.SCORER_EARLY_Q
        # SCORER_STAGED "plan" (default): staged for one split; 3 splits are fewer than the lean plan's minimum
        assert constexprs["STAGED"] == (splits == 1)
        assert constexprs["PREFETCH"] == smod.SCORER_PREFETCH  # a 16-byte aligned cache
        assert constexprs["PF_CONTIG"] == constexprs["ONE_PAGE"]  # its rows 576 bytes apart
        assert splits == 1 or args[8].dtype == torch.float32
        assert constexprs.get("PDL", False) == pdl and constexprs.get("launch_pdl", False) == pdl
        assert constexprs.get("PDL_EARLY", False) == (launcher == "seesaw_scorer_early")
    else:
        assert "launch_pdl" not in constexprs
    if launcher == "gluon16_rs":  # the cache as two TMA descriptors (latent, rope boxes) in the pointer's place
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
        lat, rope = args[1], args[2]
        assert isinstance(lat, TensorDescriptor) and isinstance(rope, TensorDescriptor)
        assert lat.base is kv and lat.block_shape == [64, 128] and rope.block_shape == [64, 64]
        args = (args[0], kv) + args[3:]  # the other kernels' argument positions
    [(part_o, part_lse, m_out, m_lse, m_splits, rank, m_pdl)] = merged
    assert part_o is args[8] and part_lse is args[9] and m_out is out and (m_splits, rank) == (splits, 512)
    assert m_pdl == (True if pdl else None)  # the merge waits for a PDL scorer's grid


def test_merge_plan_applies_where_a_cooperative_grid_and_one_merge_step_can(monkeypatch):
    """merge_plan: None for one split, for more CTAs than SMs, and for more splits than one merge step holds (64 rows
    of bf16 partials, 32 of fp32), and (performance: the combine kernel is faster there) for fewer than
    MERGE_MIN_SPLITS splits; else the rows of a step (at least 32, all of a head's splits)."""
    mp = smod.merge_plan
    assert mp(8, 2, 8, 4, 132) is None and mp(2, 2, 31, 2, 132) is None and mp(2, 2, 32, 2, 132) == 32
    monkeypatch.setattr(smod, "MERGE_MIN_SPLITS", 2)  # the rule of the kernel's coverage alone
    assert mp(1, 2, 1, 2, 132) is None                       # one split: nothing to merge
    assert mp(1, 2, 64, 2, 132) == 64 and mp(1, 2, 64, 4, 132) is None  # B = 1's 64 splits: bf16 partials only
    assert mp(1, 2, 66, 2, 132) is None                      # next power of two 128: more than one step
    assert mp(2, 2, 33, 2, 132) == 64 and mp(2, 2, 33, 2, 131) is None  # 132 CTAs: within 132 SMs, not 131
    assert mp(8, 2, 8, 4, 132) == 32 and mp(8, 2, 8, 2, 132) == 32   # fp32 / bf16 partials of 8 splits
    assert mp(6, 2, 11, 4, 132) == 32 and mp(2, 2, 32, 4, 132) == 32 and mp(1, 2, 33, 4, 132) is None
    assert mp(33, 2, 2, 4, 132) == 32 and mp(34, 2, 2, 4, 132) is None
    with pytest.raises(ValueError, match="num_splits"):
        mp(1, 2, 0, 2, 132)


@pytest.mark.parametrize("num_splits,merged", [(3, True), (1, False), (40, False)])
def test_scorer_merge_setting_launches_a_cooperative_merging_grid(monkeypatch, num_splits, merged):
    """SCORER_MERGE on (CPU tensors, the scorer kernel replaced by a recorder): where merge_plan applies, the scorer
    is launched as a cooperative grid with MERGE, its split count's power of two, the plan's rows and a zeroed int32
    counter, and no combine follows; elsewhere (one split; 2 x 2 x 40 CTAs > 132) the plain launch and the combine.
    With SCORER_PDL on, no merge."""
    import inspect

    from fx_mla.ops.kernels import mla_decode_scorer as ksc
    real = ksc._mla_decode_scorer_kernel
    calls, merges = [], []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **constexprs):
                kw = {k: v for k, v in constexprs.items() if k not in ("launch_pdl", "launch_cooperative_grid")}
                inspect.signature(real.fn).bind(*args, **kw)  # the merge's names are the kernel's parameters
                calls.append((grid, constexprs))
            return launch

    monkeypatch.setattr(ksc, "_mla_decode_scorer_kernel", Recorder())
    monkeypatch.setattr(smod, "seesaw_unsupported_reason", lambda *a, **k: None)
    monkeypatch.setattr(smod, "combine_splits", lambda *a, **k: merges.append(a))
    monkeypatch.setattr(smod, "SCORER_MERGE", True)
    monkeypatch.setattr(smod, "MERGE_MIN_SPLITS", 2)
    q, kv, bt, lens, ks = _inputs(2, 128)
    out, lse = torch.empty(2, 128, 512, dtype=torch.bfloat16), torch.empty(2, 128)
    smod.launch_mla_decode_seesaw(q, kv, bt, lens, ks, None, 0.1, 512, out, lse, num_splits=num_splits,
                                  variant="scorer")
    [(grid, c)] = calls
    assert grid == (2, num_splits, 2)
    assert c.get("MERGE", False) == merged and c.get("launch_cooperative_grid", False) == merged
    assert len(merges) == (0 if merged else 1)  # (the combine itself returns at once for one split)
    if merged:
        assert c["SPLITS_POW2"] == 4 and c["MERGE_ROWS"] == 32
        ctr = c["merge_ctr_ptr"]
        assert ctr.dtype == torch.int32 and ctr.numel() == 1 and int(ctr) == 0
    monkeypatch.setattr(smod, "SCORER_PDL", True)
    smod.launch_mla_decode_seesaw(q, kv, bt, lens, ks, None, 0.1, 512, out, lse, num_splits=num_splits,
                                  variant="scorer")
    assert "MERGE" not in calls[-1][1] and calls[-1][1]["PDL"]
