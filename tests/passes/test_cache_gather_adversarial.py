"""Adversarial programs for the cache_gather pass: near misses of the forms it rewrites. Each is either rewritten
and bitwise the unrewritten graph, or declined with its reason and the graph left intact (never rewritten into
something else, never a failed compile). CPU only; inner compiler eager (exact ATen semantics)."""
import pytest
import torch

from fx_mla.report import count_ops
from tests.passes.cache_gather_cases import compile_fn, paged_inputs, random_cache, run_compiled, token_inputs

E4M3, BF16 = torch.float8_e4m3fn, torch.bfloat16


def _both(fn, args, dynamic=True):
    """(unrewritten output, rewritten output, the rewritten compile's report)."""
    torch._dynamo.reset()
    (plain, _), (rewritten, reports) = compile_fn(fn, [], dynamic=dynamic), compile_fn(fn, ["cache_gather"],
                                                                                       dynamic=dynamic)
    return run_compiled(plain, args), run_compiled(rewritten, args), reports[-1]


def _same_bits(got, want):
    return got.dtype == want.dtype and got.shape == want.shape and torch.equal(
        got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))


def _assert_declined(fn, args, words, dynamic=True):
    want, got, rep = _both(fn, args, dynamic)
    assert _same_bits(got, want)
    assert not rep.matches and not rep.changed, rep.format(graphs=False)
    assert any(words in d.reason for d in rep.declines), rep.format(graphs=False)


# ---------------------------------------------------------------- fp8_ds_mla rows regrouped by a reshape

def _ds_mla_bounded(rows, out_dtype=BF16):
    """plain_ds_mla_dequant with every byte slice bounded ([528:656] for the rope, not [528:]): on 656-byte rows
    the same program."""
    lat = rows[..., 0:512].view(E4M3)
    scales = rows[..., 512:528].contiguous().view(torch.float32)
    parts = [(lat[..., 128 * k:128 * (k + 1)].to(torch.float32) * scales[..., k:k + 1]).to(out_dtype)
             for k in range(4)]
    return torch.cat(parts + [rows[..., 528:656].contiguous().view(BF16).to(out_dtype)], dim=-1)


def _ds_mla_two_rows(cache, table):
    """Two 656-byte rows viewed as one 1312-byte row: only the first of each pair is dequantized (the op would
    dequantize every row)."""
    torch._check(cache.shape[-1] == 656)
    return _ds_mla_bounded(cache[table].view(table.shape[0], -1, 1312))


def _ds_mla_flat(cache, table):
    torch._check(cache.shape[-1] == 656)
    return _ds_mla_bounded(cache[table].view(table.shape[0], -1))


def test_cache_gather_ds_mla_bounded_slices_fuse():
    """The bounded-slice dequant on 656-byte rows is the fp8_ds_mla form: rewritten, bitwise."""
    g = torch.Generator().manual_seed(29)
    _, table, _ = paged_inputs(29, 40, E4M3)
    cache = random_cache(int(table.max()) + 2, 4, 576, None, g, "fp8_ds_mla")
    want, got, rep = _both(lambda c, t: _ds_mla_bounded(c[t].view(t.shape[0], -1, 656)), (cache, table))
    assert _same_bits(got, want)
    assert count_ops(rep.graph_after).get("fx_mla.gather_dequant_cache_paged.default") == 1, rep.format(graphs=False)


@pytest.mark.parametrize("fn,dynamic,words", [(_ds_mla_two_rows, True, "has rows of"),
                                              (_ds_mla_two_rows, False, "has rows of 1312 bytes"),
                                              (_ds_mla_flat, False, "has rows of")],
                         ids=["1312_dynamic", "1312_static", "flat_static"])
def test_cache_gather_ds_mla_regrouped_rows_declined(fn, dynamic, words):
    g = torch.Generator().manual_seed(31)
    _, table, _ = paged_inputs(31, 40, E4M3)
    cache = random_cache(int(table.max()) + 2, 4, 576, None, g, "fp8_ds_mla")
    _assert_declined(fn, (cache, table), words, dynamic)


# ---------------------------------------------------------------- the token form's position arithmetic

def _token(cache, block_table, cu_seq_lens, token_to_seq, seq_starts, scale, pos):
    torch._check(cu_seq_lens.shape[0] == block_table.shape[0] + 1)
    torch._check(seq_starts.shape[0] == block_table.shape[0])
    bs = cache.shape[1]
    tts = token_to_seq.long()
    b = tts.clamp_min(0)
    off = pos(torch.arange(tts.shape[0]), cu_seq_lens.long()[b], seq_starts.long()[b])
    off = torch.where(tts >= 0, off, torch.zeros_like(off))
    return cache[block_table.long()[b, torch.div(off, bs, rounding_mode="floor")], off % bs].to(BF16) * scale


def _sub_alpha2(*args):  # t - 2 * cu_seq_lens[b] + seq_starts[b]
    return _token(*args, pos=lambda t, cu, st: torch.sub(t, cu, alpha=2) + st)


def _add_alpha_minus1(*args):  # t - cu_seq_lens[b] - seq_starts[b]
    return _token(*args, pos=lambda t, cu, st: torch.add(t - cu, st, alpha=-1))


def _add_alpha0(*args):  # seq_starts ignored
    return _token(*args, pos=lambda t, cu, st: torch.add(t - cu, st, alpha=0))


def _constant_offset(*args):  # a constant where seq_starts[b] would be
    return _token(*args, pos=lambda t, cu, st: t - cu + 1)


@pytest.mark.parametrize("fn,words", [(_sub_alpha2, "is not arange(num_tokens) - cu_seq_lens[request]"),
                                      (_add_alpha_minus1, "adds seq_starts[request] times alpha=-1"),
                                      (_add_alpha0, "adds seq_starts[request] times alpha=0"),
                                      (_constant_offset, "1 is not seq_starts[request]")],
                         ids=["sub_alpha2", "add_alpha-1", "add_alpha0", "constant_offset"])
def test_cache_gather_token_position_variants_declined(fn, words):
    args = token_inputs(41, 48, E4M3, padding=2)
    if fn is _sub_alpha2:  # keep every position inside its request's pages, so eager indexes in range
        args = (args[0], args[1], args[2] // 2, *args[3:])
    _assert_declined(fn, args, words)


def test_cache_gather_token_plain_positions_still_fuse():
    """The same helper with the positions context.py computes: rewritten, bitwise."""
    fn = lambda *a: _token(*a, pos=lambda t, cu, st: t - cu + st)  # noqa: E731
    want, got, rep = _both(fn, token_inputs(43, 48, E4M3, padding=2))
    assert _same_bits(got, want)
    assert count_ops(rep.graph_after).get("fx_mla.gather_dequant_cache.default") == 1, rep.format(graphs=False)


# ---------------------------------------------------------------- cache views, scales: fused exactly or declined

def _paged(cache, table, scale):
    return cache[table].view(table.shape[0], -1, cache.shape[-1]).to(BF16) * scale


REWRITTEN = {  # name: (program, how its inputs are changed, op count after, multiplies left)
    "latent slice at an offset": (lambda c, t, s: _paged(c[..., 8:40], t, s), None, 1, 0),
    "slots of a slice": (lambda c, t, s: _paged(c[:, 1:3], t, s), None, 1, 0),
    "divided by the scale": (lambda c, t, s: c[t].to(BF16) / s, None, 1, 0),
    "per-token scale": (lambda c, t, s: c[t].to(BF16) * s, lambda s: torch.rand(4, 1) + 0.5, 1, 1),
    "scale broadcast to more dims": (_paged, lambda s: s.reshape(1, 1, 1, 1), 1, 1),
    "scale used twice": (lambda c, t, s: c[t].to(BF16) * s * s, None, 1, 1),
}


@pytest.mark.parametrize("name", sorted(REWRITTEN))
def test_cache_gather_views_and_scales_bitwise(name):
    fn, change, ops, muls = REWRITTEN[name]
    cache, table, scale = paged_inputs(47, 48, E4M3)
    want, got, rep = _both(fn, (cache, table, change(scale) if change else scale))
    assert _same_bits(got, want), name
    after = count_ops(rep.graph_after)
    assert after.get("fx_mla.gather_dequant_cache_paged.default") == ops, rep.format(graphs=False)
    assert after.get("aten.mul.Tensor", 0) == muls, rep.format(graphs=False)


def test_cache_gather_strided_latent_declined():
    cache, table, scale = paged_inputs(53, 48, E4M3)
    _assert_declined(lambda c, t, s: _paged(c[..., ::2], t, s), (cache, table, scale),
                     "is not contiguous in its last dim")
