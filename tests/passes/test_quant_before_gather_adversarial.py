"""Adversarial programs for quant_before_gather: near misses of the quantization it moves before the all-gather.
Each is either rewritten and the same as the unrewritten graph on every gloo rank, or declined with its reason and
the graph left intact (never rewritten into something else, never a failed compile). Declines are checked on one
process (fake DCP group), numerics on 2 gloo ranks (inner compiler eager)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fx_mla.inspect_api import inspect
from fx_mla.launch import run_ranks
from fx_mla.mla.decode import all_gather_along
from tests.backend_helpers import fake_dcp_group
from tests.passes import quant_before_gather_cases as cases

PASS = cases.PASS
E4M3 = torch.float8_e4m3fn


def _gathered(x, dim=1):
    return all_gather_along(x, dim, dist.get_world_size(), dist.group.WORLD)


def _q(y):
    return y.clamp(-448.0, 448.0).to(E4M3)


PROGRAMS = {
    # A clamp of the gathered data before the scaling (ints 6 / 15 happen to be dtype codes: f32 / bf16).
    "clamp_before_scaling": lambda x, s: _q(_gathered(x).clamp(-30.0, 30.0) / s),
    "clamp_min_6_before_scaling": lambda x, s: _q(_gathered(x).clamp_min(6) / s),
    "clamp_max_15_before_scaling": lambda x, s: _q(_gathered(x).clamp_max(15) / s),
    # A one-element scale with more dims than the data: the FP8 tensor has one dim more than the gathered one.
    "scale_adds_dims": lambda x, s: _q(_gathered(x) / s.reshape(1, 1, 1, 1)),
    # Dynamic scale; the NaN case sets one element of rank 1's data to NaN (see _worker).
    "dynamic_amax": lambda x, s: (lambda a: _q(a / (a.abs().amax().float() / 448)))(_gathered(x)),
    "dynamic_amax_nan": lambda x, s: (lambda a: _q(a / (a.abs().amax().float() / 448)))(_gathered(x)),
    "dynamic_max_nan": lambda x, s: (lambda a: _q(a / (a.max().float() / 448)))(_gathered(x)),
    # Rewritten as they are: clamps whose intersection is +-448, a non-power-of-two Python multiplier, an integer
    # round trip before the scaling.
    "two_wide_clamps": lambda x, s: (_gathered(x) / s).clamp(-1000, 448).clamp(-448, 1000).to(E4M3),
    "python_multiplier": lambda x, s: _q(_gathered(x) * 0.3),
    "integer_round_trip": lambda x, s: _q(_gathered(x).to(torch.int32).to(torch.bfloat16) / s),
}

DECLINED = {
    "clamp_before_scaling": "clamps before the scaling",
    "clamp_min_6_before_scaling": "clamps before the scaling",
    "clamp_max_15_before_scaling": "clamps before the scaling",
    "scale_adds_dims": "broadcasts the gathered tensor (3 dims) to another shape",
}


def _inputs(name, rank):
    g = torch.Generator().manual_seed(500 + 31 * rank)
    x = (torch.randn(3, 2, 8, generator=g) * 12 + 0.01).to(torch.bfloat16)
    if name.endswith("_nan") and rank == 1:
        x[1, 0, 5] = float("nan")
    return x, torch.tensor(0.0537)


@pytest.mark.parametrize("name", sorted(DECLINED))
def test_quant_before_gather_adversarial_declined_graph_intact(name):
    with fake_dcp_group(2):
        rep = inspect(PROGRAMS[name], *_inputs(name, 0), options={"passes": [PASS], "inner": "eager"})
    p = rep.pass_report(PASS)
    assert not p.matches and rep.graph_after == rep.graph_before, rep.format(graphs=False)
    assert len(p.declines) == 1 and DECLINED[name] in p.declines[0].reason, p.declines


class _Program(nn.Module):
    def __init__(self, name):
        super().__init__()
        self.name = name

    def forward(self, x, s):
        return PROGRAMS[self.name](x, s)


def _worker(rank, world_size, names):
    out = {}
    for name in names:  # a compile that fails fails its own test only (every rank compiles the same programs)
        try:
            out[name] = cases.both(_Program(name), _inputs(name, rank))
        except Exception as e:  # noqa: BLE001
            out[name] = f"{type(e).__name__}: {e}"
    return out


@pytest.fixture(scope="module")
def ranks2():
    return run_ranks(_worker, 2, list(PROGRAMS), timeout=500)


def _as_fp8(t):
    return t.view(E4M3).float() if t.dtype == torch.uint8 else t.float()


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_quant_before_gather_adversarial_same_on_every_rank_ws2(ranks2, name):
    """Bitwise, except that NaN sign and payload bits are not promised (quant_fp8's docstring): there both must be
    NaN in the same places."""
    for rank, result in enumerate(ranks2):
        assert not isinstance(result[name], str), (name, rank, result[name])
        base, new, matches, declines = result[name]
        assert len(base) == len(new) == 1
        want, got = base[0], new[0]
        if name.endswith("_nan"):
            assert want.shape == got.shape and bool(_as_fp8(want).isnan().any()), (name, rank)
            assert torch.equal(_as_fp8(want).isnan(), _as_fp8(got).isnan()), (name, rank)
            finite = ~_as_fp8(want).isnan()
            assert torch.equal(want[finite], got[finite]), (name, rank)
        else:
            assert torch.equal(cases.bits(want), cases.bits(got)), (name, rank)
        if name in DECLINED:
            assert not matches and DECLINED[name] in declines[0], (name, matches, declines)
        else:
            assert len(matches) == 1 and not declines, (name, matches, declines)
