"""CPU tests of the cache_gather pass: snapshots (our printer) before/after, op counts, bitwise numerics against
the unrewritten graph (inner eager = exact ATen semantics; Inductor with and without emulate_precision_casts where
the result is materialized), every gather form, D ∈ {576, 320, 288}, ragged batches with empty requests,
seq_starts, DCP padding tokens, the 656-byte fp8_ds_mla layout, declines with their reasons, DCP 2 (fake group
snapshot; gloo ranks bitwise). Speed is not measured here."""
import dataclasses
import re

import pytest
import torch
from expecttest import TestCase

from fx_mla.launch import run_ranks
from fx_mla.mla import ContextGather
from fx_mla.passes import cache_gather
from fx_mla.report import count_ops
from tests.backend_helpers import decode_step, fake_dcp_group, registered, small_config
from tests.mla.problems import context_inputs
from tests.passes.cache_gather_cases import (PAGED_FORMS, assert_bitwise, compile_fn, compile_run,
                                             ds_mla_flat_slots, ds_mla_paged, ds_mla_token, graph_diff, paged_index,
                                             paged_inputs, random_cache, run_compiled, token_gather, token_inputs)

PASSES = ["cache_gather"]
DS = (576, 320, 288)
PAGED_OP, TOKEN_OP = "fx_mla.gather_dequant_cache_paged.default", "fx_mla.gather_dequant_cache.default"


def _compare(fn, inputs, passes=PASSES, inner="eager", **config):
    """Rewritten vs unrewritten graph (and plain eager) on each input tuple, each compiled once (inputs of other
    sizes run the same symbolic graph); returns the rewritten graph's last report."""
    torch._dynamo.reset()
    (plain, _), (rewritten, reports) = compile_fn(fn, [], inner), compile_fn(fn, passes, inner)
    name = getattr(fn, "__name__", type(fn).__name__)
    for args in inputs:
        want, got = run_compiled(plain, args, **config), run_compiled(rewritten, args, **config)
        assert_bitwise(got, want, f"{name} rewritten vs unrewritten")
        if inner == "eager":
            assert_bitwise(got, fn(*args), f"{name} rewritten vs plain eager")
    return reports[-1]


def _checked_token_gather(cache, block_table, cu_seq_lens, token_to_seq, seq_starts, scale, dtype=torch.bfloat16):
    # The sizes the op requires, made known to the compiler (as fx_mla/mla/context.py's input checks do).
    torch._check(cu_seq_lens.shape[0] == block_table.shape[0] + 1)
    if seq_starts is not None:
        torch._check(seq_starts.shape[0] == block_table.shape[0])
    return token_gather(cache, block_table, cu_seq_lens, token_to_seq, seq_starts, scale, dtype)


class TestCacheGatherSnapshots(TestCase):
    def test_cache_gather_decode_dcp1_snapshot(self):
        module, args = decode_step(small_config(1), [5, 0, 9])
        out, rep = compile_run(module, args, PASSES)
        want, _ = compile_run(module, args, [])
        assert_bitwise(out, want, "decode step")
        self.assertExpectedInline(graph_diff(rep), """\
- %index: f8e4m3fn[s0, s0, 4, 40] = aten.index.Tensor(%kv_cache, [%block_table])
- %reshape_4: f8e4m3fn[s0, 4*s0, 40] = aten.reshape.default(%index, [%s0, -1, 40])
- %convert_element_type_4: bf16[s0, 4*s0, 40] = prims.convert_element_type.default(%reshape_4, bf16)
- %mul_2: bf16[s0, 4*s0, 40] = aten.mul.Tensor(%convert_element_type_4, %k_scale)
- %permute_3: bf16[s0, 40, 4*s0] = aten.permute.default(%mul_2, [0, 2, 1])
- %sym_size: Sym(4*s0) = aten.sym_size.int(%reshape_4, 1)
- %slice: bf16[s0, 4*s0, 32] = aten.slice.Tensor(%mul_2, 2, 0, 32)
+ %gather_dequant_cache_paged: bf16[s0, 4*s0, 40] = fx_mla.gather_dequant_cache_paged.default(%kv_cache, %block_table, %k_scale, bf16)
+ %permute_3: bf16[s0, 40, 4*s0] = aten.permute.default(%gather_dequant_cache_paged, [0, 2, 1])
+ %sym_size: Sym(4*s0) = aten.sym_size.int(%gather_dequant_cache_paged, 1)
+ %slice: bf16[s0, 4*s0, 32] = aten.slice.Tensor(%gather_dequant_cache_paged, 2, 0, 32)""")
        before, after = count_ops(rep.graph_before), count_ops(rep.graph_after)
        self.assertEqual((before.get("aten.index.Tensor"), after.get("aten.index.Tensor")), (1, None))
        self.assertEqual(after.get(PAGED_OP), 1)
        self.assertEqual([d.reason for d in rep.declines], [])

    def test_cache_gather_context_snapshot(self):
        cfg = small_config(1)
        g = torch.Generator().manual_seed(3)
        lens, starts = [6, 0, 11], [2, 0, 5]
        latents = [torch.randn(s + n, 40, generator=g) for s, n in zip(starts, lens)]
        args = context_inputs(cfg, latents, lens, starts, torch.tensor(0.0131), 0)
        module = ContextGather(cfg)
        out, rep = compile_run(module, args, PASSES)
        assert_bitwise(out, compile_run(module, args, [])[0], "context gather")
        self.assertExpectedInline(rep.graph_after, """\
%s0: Sym(s0) = input
%cache: f8e4m3fn[s0, 4, 40] = input
%k_scale: f32[] = input
%block_table: i32[3, 4] = input
%cu_seq_lens: i32[4] = input
%s1: Sym(s1) = input
%token_to_seq: i32[s1] = input
%seq_starts: i32[3] = input
%gather_dequant_cache: bf16[s1, 40] = fx_mla.gather_dequant_cache.default(%cache, %block_table, %cu_seq_lens, %token_to_seq, %seq_starts, %k_scale, bf16)
return (%gather_dequant_cache,)""")
        self.assertEqual(count_ops(rep.graph_before).get("aten.index.Tensor"), 4)
        self.assertEqual(count_ops(rep.graph_after), {TOKEN_OP: 1})

    def test_cache_gather_dcp2_fake_group_report(self):
        """DCP 2 after quant_before_gather: the decode gather fuses; on the context path the local fp8 gather feeds
        the fp8 all-gather (declined: no fp8 copy in the op) and the reorder of the gathered rows takes the
        dequantize (row gather, block size 1)."""
        passes = ["quant_before_gather", "cache_gather"]
        lines = []
        with fake_dcp_group(2):
            cfg = small_config(2)
            module, args = decode_step(cfg, [5, 0, 9])
            rep = compile_run(module, args, passes)[1]
            lines += [f"decode: {m.detail}" for m in rep.pass_report("cache_gather").matches]
            g = torch.Generator().manual_seed(4)
            latents = [torch.randn(s, 40, generator=g) for s in (7, 0, 13)]
            cargs = context_inputs(cfg, latents, [7, 0, 13], [0, 0, 3], torch.tensor(0.0131), 0)
            rep = compile_run(ContextGather(cfg), cargs, passes)[1]
        pr = rep.pass_report("cache_gather")
        lines += [f"context: {m.detail}" for m in pr.matches] + [f"context declined: {d.reason}" for d in pr.declines]
        lines += [re.sub(r"\bs\d+\b", "s?", x) for x in rep.graph_after.splitlines() if "fx_mla.gather" in x]
        self.assertExpectedInline("\n".join(lines), """\
decode: paged gather of a f8e4m3fn cache × scale → bf16 fused into fx_mla::gather_dequant_cache_paged
context: row gather of dequantized f8e4m3fn rows × scale → bf16 fused into fx_mla::gather_dequant_cache_paged
context declined: fp8 rows gathered without a dequantize (used by %view): the op has no fp8 → fp8 copy
%gather_dequant_cache_paged: bf16[1, s?, 40] = fx_mla.gather_dequant_cache_paged.default(%unsqueeze, %unsqueeze_1, %k_scale, bf16)""")


# ---------------------------------------------------------------- numerics of every form

@pytest.mark.parametrize("form", sorted(PAGED_FORMS))
@pytest.mark.parametrize("cache_dtype,out_dtype", [(torch.float8_e4m3fn, torch.bfloat16),
                                                   (torch.float8_e5m2, torch.float16),
                                                   (torch.float8_e4m3fn, torch.float32),
                                                   (torch.bfloat16, torch.float32)], ids=str)
def test_cache_gather_paged_forms_bitwise(form, cache_dtype, out_dtype):
    fn = PAGED_FORMS[form]
    if form == "fp32_then_round" and cache_dtype == torch.bfloat16:
        pytest.skip("no scale with a bf16 cache")
    inputs = [paged_inputs(d + i, d, cache_dtype) + (out_dtype,) for i, d in enumerate(DS)]
    rep = _compare(fn, inputs)
    assert len(rep.matches) == 1 and not rep.declines, rep.format(graphs=False)
    assert count_ops(rep.graph_after).get(PAGED_OP) == 1
    before, after = count_ops(rep.graph_before), count_ops(rep.graph_after)
    assert after.get("aten.index.Tensor", 0) == before.get("aten.index.Tensor", 0) - 1  # only the cache's index
    assert "convert_element_type" not in rep.graph_after.split(PAGED_OP)[1]


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16], ids=str)
def test_cache_gather_auto_cache_cast_bitwise(cache_dtype):
    """`auto` caches in another dtype than the model: the cast alone (f32 → bf16 rounds once, as the op does)."""
    rep = _compare(paged_index, [paged_inputs(d, d, cache_dtype)[:2] + (None, torch.bfloat16) for d in DS[:2]])
    assert count_ops(rep.graph_after).get(PAGED_OP) == 1


def test_cache_gather_same_dtype_gather_left_alone():
    """A bf16 cache read by a bf16 model has no conversion: the index is already one copy (no match, no decline)."""
    rep = _compare(paged_index, [paged_inputs(5, 40, torch.bfloat16)[:2] + (None, torch.bfloat16)])
    assert not rep.matches and not rep.declines and not rep.changed


@pytest.mark.parametrize("seq_starts", [True, False])
@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16], ids=str)
def test_cache_gather_token_form_bitwise(seq_starts, cache_dtype):
    out_dtype = torch.float32 if cache_dtype == torch.bfloat16 else torch.bfloat16
    inputs = [token_inputs(d + 7, d, cache_dtype, starts=seq_starts) + (out_dtype,) for d in DS]
    rep = _compare(_checked_token_gather, inputs)
    assert len(rep.matches) == 1 and count_ops(rep.graph_after).get(TOKEN_OP) == 1, rep.format(graphs=False)
    assert "aten.index" not in rep.graph_after


def test_cache_gather_scale_forms_bitwise():
    cache, table, scale = paged_inputs(11, 320, torch.float8_e4m3fn)
    # A [1] fp32 scale promotes the product to fp32; a bf16 scale is exact in fp32; both fuse.
    for s, out in ((scale.reshape(1), torch.float32), (scale.to(torch.bfloat16), torch.bfloat16)):
        rep = _compare(paged_index, [(cache, table, s, torch.bfloat16)])
        assert len(rep.matches) == 1 and "× scale → " + {torch.float32: "f32", torch.bfloat16: "bf16"}[out] \
            in rep.matches[0].detail, rep.format(graphs=False)
        assert "aten.mul" not in rep.graph_after

    def python_scale(cache, table):
        return paged_index(cache, table, 0.0137)
    rep = _compare(python_scale, [(cache, table)])  # a Python-number scale: the cast fuses, the mul stays
    assert count_ops(rep.graph_after).get(PAGED_OP) == 1 and count_ops(rep.graph_after).get("aten.mul.Tensor") == 1


def test_cache_gather_inductor_bitwise():
    """Inductor (emulate_precision_casts off) on a materialized result, and the decode step with emulation on,
    where the unrewritten graph rounds the 0-dim scale to bf16 first: the pass rounds it the same way."""
    args = paged_inputs(13, 320, torch.float8_e4m3fn)
    rep = _compare(paged_index, [args], inner="inductor", emulate_precision_casts=False)
    assert count_ops(rep.graph_after).get(PAGED_OP) == 1
    module, args = decode_step(small_config(1), [5, 0, 9])
    rep = _compare(module, [args], inner="inductor", emulate_precision_casts=True)
    after = count_ops(rep.graph_after)
    assert after.get(PAGED_OP) == 1 and after.get("prims.convert_element_type.default", 0) >= 2


def test_cache_gather_fp8_ds_mla_bitwise():
    """656-byte rows (512 e4m3 | 4 fp32 group scales | 64 bf16 rope): paged (bf16, f32), flattened-slot, token."""
    g = torch.Generator().manual_seed(21)
    cache, table, _ = paged_inputs(21, 40, torch.float8_e4m3fn)
    cache = random_cache(cache.shape[0], cache.shape[1], 576, None, g, "fp8_ds_mla")
    out_dtype = torch.bfloat16
    for fn, dt in ((ds_mla_paged, torch.float32), (ds_mla_paged, out_dtype), (ds_mla_flat_slots, out_dtype)):
        rep = _compare(fn, [(cache, table, dt)])
        assert count_ops(rep.graph_after).get(PAGED_OP) == 1 and "fp8_ds_mla" in rep.graph_after, rep.format()
        assert "aten.cat" not in rep.graph_after and "view.dtype" not in rep.graph_after
    c, table, cu, tts, starts, _ = token_inputs(22, 40, torch.float8_e4m3fn)
    cache = random_cache(c.shape[0], c.shape[1], 576, None, g, "fp8_ds_mla")
    rep = _compare(ds_mla_token, [(cache, table, cu, tts, starts, out_dtype)])
    assert count_ops(rep.graph_after).get(TOKEN_OP) == 1, rep.format(graphs=False)


def test_cache_gather_fp8_ds_mla_unaligned_declines():
    g = torch.Generator().manual_seed(23)
    cache, table, _ = paged_inputs(23, 40, torch.float8_e4m3fn)
    rows = random_cache(cache.shape[0], cache.shape[1], 576, None, g, "fp8_ds_mla")
    wide = torch.zeros(rows.shape[0], rows.shape[1], 664, dtype=torch.uint8)
    wide[..., 8:] = rows
    rep = _compare(ds_mla_paged, [(wide[..., 8:], table, torch.bfloat16)])  # rows 664 bytes apart, offset 8
    assert not rep.matches and "not provably 16-byte aligned" in rep.declines[0].reason, rep.format(graphs=False)


# ---------------------------------------------------------------- declines

def _fp8_view(cache, table, scale):
    return cache[table].view(table.shape[0], -1, cache.shape[-1]).view(torch.uint8)


def _fp8_two_users(cache, table, scale):
    x = cache[table]
    return x.to(torch.bfloat16) * scale, x.float().sum()


def _transposed_cache(cache, table, scale):
    x = cache.transpose(1, 2)[table]  # a cache stored [num_blocks, D, block_size]: rows are strided
    return x.reshape(table.shape[0], -1, x.shape[-1]).to(torch.bfloat16) * scale


def _to_float64(cache, table, scale):
    return cache[table].to(torch.float64) * scale


def _index_select_dim1(cache, table, scale):
    return torch.index_select(cache, 1, table[0].long() % cache.shape[1]).to(torch.bfloat16) * scale


def _table_3d(cache, table, scale):
    return cache[table.view(1, *table.shape)].to(torch.bfloat16) * scale


def _token_unclamped(cache, table, cu, tts, starts, scale):
    b = tts.long()  # no clamp_min: padding tokens index the last request, unlike the op
    off = torch.arange(tts.shape[0]) - cu.long()[b] + starts.long()[b]
    return cache[table.long()[b, off // cache.shape[1]], off % cache.shape[1]].to(torch.bfloat16) * scale


def _byte_or_float64_cache(cache, table, scale):  # the cache an input of dtype i8 / u8 / f64 (CACHE_AS below)
    return cache[table].view(table.shape[0], -1, cache.shape[-1]).to(torch.bfloat16) * scale


CACHE_AS = {"int8 cache": lambda c: c.view(torch.int8), "float64 cache": lambda c: c.double(),
            "uint8 rows, not 656 bytes": lambda c: c.view(torch.uint8)}


DECLINES = {
    "fp8 without dequant": (_fp8_view, "fp8 rows gathered without a dequantize"),
    "fp8 needed elsewhere": (_fp8_two_users, "have several users"),
    "non-contiguous cache": (_transposed_cache, "is not contiguous in its last dim"),
    "float64 output": (_to_float64, "output dtype f64 is not covered"),
    "index_select dim 1": (_index_select_dim1, "indexes dim 1 of the source"),
    "3-D block index": (_table_3d, "has 3 dims; the op takes 1 or 2"),
    "token index unclamped": (_token_unclamped, "is not clamp_min(token_to_seq, 0)"),
    "metadata sizes unknown": (token_gather, "not provably block_table's rows + 1"),
    "int8 cache": (_byte_or_float64_cache, "cache dtype i8 is not covered by the op"),
    "uint8 rows, not 656 bytes": (_byte_or_float64_cache, "cache dtype u8 is not covered by the op (fp8 e4m3/e5m2, "
                                                          "bf16, fp16, fp32, or uint8 rows of 656 bytes"),
    "float64 cache": (_byte_or_float64_cache, "cache dtype f64 is not covered by the op"),
}


@pytest.mark.parametrize("case", sorted(DECLINES))
def test_cache_gather_declines_with_reason(case):
    fn, reason = DECLINES[case]
    if "token" in case or "metadata" in case:
        args = token_inputs(17, 48, torch.float8_e4m3fn, padding=0)
        if case == "token index unclamped":
            args = args[:4] + (args[4], args[5])
    else:
        cache, table, scale = paged_inputs(17, 48, torch.float8_e4m3fn)
        if case == "non-contiguous cache":
            cache = cache.transpose(1, 2).contiguous()
        args = (CACHE_AS.get(case, lambda c: c)(cache), table, scale)
    want, _ = compile_run(fn, args, [])
    got, rep = compile_run(fn, args, PASSES)
    for g, w in zip(*(x if isinstance(x, tuple) else (x,) for x in (got, want))):
        same_bytes = torch.equal(g.reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8))
        assert g.dtype == w.dtype and same_bytes, case
    assert not rep.matches and not rep.changed, rep.format()
    assert [d.reason for d in rep.declines if reason in d.reason], rep.format(graphs=False)


class _AtCapability:
    """cache_gather as seen from a CUDA target of the given compute capability (decisions only)."""

    def __init__(self, capability):
        self.name, self.capability = f"test_cache_gather_sm{capability[0]}{capability[1]}", capability

    def run(self, graph, ctx):
        cache_gather.run(graph, dataclasses.replace(ctx, device=torch.device("cuda"), capability=self.capability))


@pytest.mark.parametrize("capability,fires", [((8, 0), False), ((9, 0), True)])
def test_cache_gather_capability_guard(capability, fires):
    p = _AtCapability(capability)
    with registered(p):
        for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            _, rep = compile_run(paged_index, paged_inputs(3, 40, dtype), [p.name])
            assert bool(rep.matches) == fires, rep.format(graphs=False)
            if not fires:
                assert "needs compute capability >= 8.9, device has 8.0" in rep.declines[0].reason


@pytest.mark.parametrize("emulate", [False, True])
@pytest.mark.parametrize("form", ["index", "fp32_then_round"])
def test_cache_gather_declines_inductor_emulate_on_cuda(form, emulate):
    """Seen from CUDA with Inductor as the inner compiler: under emulate_precision_casts a bf16 multiply by the fp32
    scale is declined (measured not bitwise on H100), with the graph left intact; the fp32 multiply
    ((x.float() * s).to(dt)) and default Inductor still rewrite."""
    p = _AtCapability((9, 0))
    args = paged_inputs(5, 40, torch.float8_e4m3fn)
    with registered(p):
        got, rep = compile_run(PAGED_FORMS[form], args, [p.name], inner="inductor", emulate_precision_casts=emulate)
    declined = emulate and form == "index"
    assert bool(rep.matches) == (not declined), rep.format(graphs=False)
    if declined:
        assert not rep.changed
        assert any("emulate_precision_casts on CUDA" in d.reason and "bf16 multiply" in d.reason
                   for d in rep.declines), rep.format(graphs=False)
    want, _ = compile_run(PAGED_FORMS[form], args, [], inner="inductor", emulate_precision_casts=emulate)
    assert torch.equal(got, want)  # CPU tensors: the CPU rules hold whichever way the CUDA-side decision went


# ---------------------------------------------------------------- DCP 2 on gloo ranks

def _dcp2_worker(rank, world_size):
    results = []
    cfg = small_config(world_size)
    module, args = decode_step(cfg, [5, 0, 9, 2], rank=rank)
    g = torch.Generator().manual_seed(5)
    latents = [torch.randn(s, 40, generator=g) for s in (7, 0, 13)]
    cargs = context_inputs(cfg, latents, [7, 0, 13], [0, 0, 3], torch.tensor(0.0131), rank)
    for fn, a in ((module, args), (ContextGather(cfg), cargs)):
        want, _ = compile_run(fn, a, [])
        got, rep = compile_run(fn, a, ["quant_before_gather", "cache_gather"])
        results.append((want, got, len(rep.pass_report("cache_gather").matches)))
    return results


def test_cache_gather_dcp2_gloo_bitwise():
    for rank, results in enumerate(run_ranks(_dcp2_worker, 2, timeout=300)):
        for i, (want, got, matches) in enumerate(results):
            assert matches == 1, (rank, i)
            assert_bitwise(got, want, f"rank {rank} case {i}")
