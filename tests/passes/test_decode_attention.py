"""The decode_attention pass: paged MLA decode attention → fx_mla::mla_decode_fp8 (CPU: the op's reference runs).

Snapshots of the graph before/after, op counts, numerics against float64 and against the unrewritten code (inner
"eager": exact ATen semantics for the rest of the graph), user-written variants, declines with their reasons, the
capability guard (graph copies rewritten under a pretended CUDA device), and DCP 2/4 over gloo.
"""
from __future__ import annotations

import re

import expecttest
import pytest
import torch

import fx_mla.passes as fx_passes
from fx_mla.launch import run_ranks
from fx_mla.mla import MLAConfig
from fx_mla.mla.decode import quantize_dequantize_query
from fx_mla.passes import decode_attention
from fx_mla.passes.manager import PassContext
from fx_mla.report import CompileReport, GraphNamer, count_ops, format_graph
from tests.mla.problems import make_problem, rank_inputs
from tests.passes.decode_attention_cases import (L, attention_problem, capability_attentions, compile_run,
                                                 declined_attentions, flat_slots_attention,
                                                 flat_slots_cast_first_attention, flat_slots_uncast_attention,
                                                 flat_slots_index_select_attention, fp8_query_attention,
                                                 given_slots_attention, half_page_slots_attention,
                                                 fused_gather_attention, index_select_attention, model_attention,
                                                 model_reference, reference_attention, rel_err,
                                                 softmax_einsum_attention, where_matmul_attention)

OP = "fx_mla.mla_decode_fp8.default"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # the same functions are compiled with several option sets
    yield


def check_outputs(o, lse, args, stored, plain):
    """o / lse against float64 and against the unrewritten function's (o_plain, lse_plain)."""
    ref_o, ref_lse = reference_attention(args[0], stored)
    assert not o.isnan().any() and not lse.isnan().any()
    assert rel_err(o, ref_o) <= 1e-2 and rel_err(o, plain[0]) <= 1e-2, (rel_err(o, ref_o), rel_err(o, plain[0]))
    assert rel_err(lse, ref_lse) <= 1e-3 and torch.equal(lse.isinf(), ref_lse.isinf())
    if plain[1] is not None:
        assert rel_err(lse, plain[1]) <= 1e-2
    empty = args[3] == 0
    assert o[empty].abs().max() == 0 and (lse[empty] == float("-inf")).all(), "empty request: o = 0, lse = -inf"


def only_match(report):
    p = report.pass_report("decode_attention")
    assert len(p.matches) == 1 and not p.declines, report.format(graphs=False)
    return p.matches[0]


# ---------------------------------------------------------------- snapshot

class TestDecodeAttentionSnapshot(expecttest.TestCase):
    def test_decode_attention_snapshot_model_attention(self):
        args, stored = attention_problem(16, 64)
        (o, lse), report = compile_run(model_attention, args)
        self.assertExpectedInline(report.graph_before, """\
%s0: Sym(s0) = input
%s1: Sym(s1) = input
%s2: Sym(s2) = input
%q: bf16[s0, s1, s2] = input
%s3: Sym(s3) = input
%s4: Sym(s4) = input
%cache: f8e4m3fn[s3, s4, s2] = input
%s5: Sym(s5) = input
%block_table: i32[s0, s5] = input
%k_scale: f32[] = input
%seq_lens: i32[s0] = input
%mul: Sym(s4*s5) = operator.mul(%s5, %s4)
%iota: i64[s4*s5] = prims.iota.default(%mul, start=0, step=1, dtype=i64, device=cpu, requires_grad=False)
%unsqueeze: i64[1, s4*s5] = aten.unsqueeze.default(%iota, 0)
%unsqueeze_1: i32[s0, 1] = aten.unsqueeze.default(%seq_lens, 1)
%lt: b8[s0, s4*s5] = aten.lt.Tensor(%unsqueeze, %unsqueeze_1)
%unsqueeze_2: b8[s0, 1, s4*s5] = aten.unsqueeze.default(%lt, 1)
%bitwise_not: b8[s0, 1, s4*s5] = aten.bitwise_not.default(%unsqueeze_2)
%full: f32[] = aten.full.default([], -inf, dtype=f32, layout=strided, device=cpu, pin_memory=False)
%expand: bf16[s0, s1, s2] = aten.expand.default(%q, [%s0, %s1, %s2])
%index: f8e4m3fn[s0, s5, s4, s2] = aten.index.Tensor(%cache, [%block_table])
%reshape: f8e4m3fn[s0, s4*s5, s2] = aten.reshape.default(%index, [%s0, -1, %s2])
%convert_element_type: bf16[s0, s4*s5, s2] = prims.convert_element_type.default(%reshape, bf16)
%mul_1: bf16[s0, s4*s5, s2] = aten.mul.Tensor(%convert_element_type, %k_scale)
%permute: bf16[s0, s2, s4*s5] = aten.permute.default(%mul_1, [0, 2, 1])
%sym_size: Sym(s4*s5) = aten.sym_size.int(%reshape, 1)
%expand_1: bf16[s0, s2, s4*s5] = aten.expand.default(%permute, [%s0, %s2, %sym_size])
%bmm: bf16[s0, s1, s4*s5] = aten.bmm.default(%expand, %expand_1)
%convert_element_type_1: f32[s0, s1, s4*s5] = prims.convert_element_type.default(%bmm, f32)
%mul_2: f32[s0, s1, s4*s5] = aten.mul.Tensor(%convert_element_type_1, 0.07216878364870322)
%where: f32[s0, s1, s4*s5] = aten.where.self(%bitwise_not, %full, %mul_2)
%amax: f32[s0, s1, 1] = aten.amax.default(%where, [-1], True)
%abs: f32[s0, s1, 1] = aten.abs.default(%amax)
%eq: b8[s0, s1, 1] = aten.eq.Scalar(%abs, inf)
%full_1: f32[] = aten.full.default([], 0.0, dtype=f32, layout=strided, device=cpu, pin_memory=False)
%where_1: f32[s0, s1, 1] = aten.where.self(%eq, %full_1, %amax)
%sub: f32[s0, s1, s4*s5] = aten.sub.Tensor(%where, %where_1)
%exp: f32[s0, s1, s4*s5] = aten.exp.default(%sub)
%sum: f32[s0, s1] = aten.sum.dim_IntList(%exp, [-1])
%log: f32[s0, s1] = aten.log.default(%sum)
%squeeze: f32[s0, s1] = aten.squeeze.dims(%where_1, [-1])
%add: f32[s0, s1] = aten.add.Tensor(%log, %squeeze)
%isinf: b8[s0, s1] = aten.isinf.default(%add)
%full_2: f32[s0, s1] = aten.full.default([%s0, %s1], 0, dtype=f32, layout=strided, device=cpu, pin_memory=False)
%where_2: f32[s0, s1] = aten.where.self(%isinf, %full_2, %add)
%unsqueeze_3: f32[s0, s1, 1] = aten.unsqueeze.default(%where_2, 2)
%sub_1: f32[s0, s1, s4*s5] = aten.sub.Tensor(%where, %unsqueeze_3)
%exp_1: f32[s0, s1, s4*s5] = aten.exp.default(%sub_1)
%convert_element_type_2: bf16[s0, s1, s4*s5] = prims.convert_element_type.default(%exp_1, bf16)
%expand_2: bf16[s0, s1, s4*s5] = aten.expand.default(%convert_element_type_2, [%s0, %s1, %mul])
%slice: bf16[s0, s4*s5, 512] = aten.slice.Tensor(%mul_1, 2, 0, 512)
%expand_3: bf16[s0, s4*s5, 512] = aten.expand.default(%slice, [%s0, %sym_size, 512])
%bmm_1: bf16[s0, s1, 512] = aten.bmm.default(%expand_2, %expand_3)
return (%bmm_1, %add)""")
        self.assertExpectedInline(report.graph_after, """\
%s0: Sym(s0) = input
%s1: Sym(s1) = input
%s2: Sym(576) = input
%q: bf16[s0, s1, 576] = input
%s3: Sym(s3) = input
%s4: Sym(s4) = input
%cache: f8e4m3fn[s3, s4, 576] = input
%s5: Sym(s5) = input
%block_table: i32[s0, s5] = input
%k_scale: f32[] = input
%seq_lens: i32[s0] = input
%mla_decode_fp8: (bf16[s0, s1, 512], f32[s0, s1]) = fx_mla.mla_decode_fp8.default(%q, %cache, %block_table, %seq_lens, %k_scale, None, 0.07216878364870322, 512, bf16)
%getitem: bf16[s0, s1, 512] = getitem(%mla_decode_fp8, 0)
%getitem_1: f32[s0, s1] = getitem(%mla_decode_fp8, 1)
return (%getitem, %getitem_1)""")
        self.assertExpectedInline(only_match(report).detail, """logsumexp attention over the paged f8e4m3fn cache -> mla_decode_fp8 (bf16 query, L=512, sm_scale=0.0721688, lse replaced)""")
        before, after = count_ops(report.graph_before), count_ops(report.graph_after)
        assert (before["aten.bmm.default"], before["aten.index.Tensor"], before.get(OP, 0)) == (2, 1, 0)
        assert after == {OP: 1, "getitem": 2}
        check_outputs(o, lse, args, stored, model_attention(*args))


# ---------------------------------------------------------------- numerics over shapes and cache dtypes

@pytest.mark.parametrize("heads,block_size,kv_dtype", [(16, 16, "fp8"), (128, 64, "fp8"), (16, 64, "auto"),
                                                       (128, 16, "fp8_e5m2")])
def test_decode_attention_model_attention_matches_float64(heads, block_size, kv_dtype):
    args, stored = attention_problem(heads, block_size, kv_dtype, seed=heads + block_size)
    (o, lse), report = compile_run(model_attention, args)
    only_match(report)
    assert count_ops(report.graph_after).get("aten.bmm.default", 0) == 0
    check_outputs(o, lse, args, stored, model_attention(*args))


@pytest.mark.parametrize("fn", [model_attention, softmax_einsum_attention, flat_slots_attention,
                                flat_slots_index_select_attention])
def test_decode_attention_batch_one(fn):
    """Batch 1 is specialised by dynamo (size-1 axes carry no label): the rewrite must still fire and match."""
    args, stored = attention_problem(16, 16, "fp8", seq_lens=[37], seed=11)
    out, report = compile_run(fn, args)
    only_match(report)
    want = fn(*args)
    got, want = (out[0], want[0]) if isinstance(out, tuple) else (out, want)
    assert rel_err(got, want) < 1e-2


@pytest.mark.parametrize("fn,kv_dtype,form", [(softmax_einsum_attention, "fp8", "softmax"),
                                              (where_matmul_attention, "auto", "logsumexp"),
                                              (where_matmul_attention, "fp8", "logsumexp"),
                                              (fused_gather_attention, "fp8", "softmax"),
                                              (index_select_attention, "fp8", "logsumexp"),
                                              (index_select_attention, "auto", "logsumexp")])
def test_decode_attention_user_variants(fn, kv_dtype, form):
    args, stored = attention_problem(16, 16, kv_dtype, seed=3)
    out, report = compile_run(fn, args)
    assert only_match(report).detail.startswith(f"{form} attention")
    plain = fn(*args)
    if isinstance(out, tuple):
        check_outputs(out[0], out[1], args, stored, plain)
    else:  # softmax forms return o only (a plain softmax over an empty request is NaN: compare the others)
        live = args[3] > 0
        ref_o, _ = reference_attention(args[0], stored)
        assert rel_err(out, ref_o) <= 1e-2 and rel_err(out[live], plain[live]) <= 1e-2
        assert out[~live].abs().max() == 0 and not out.isnan().any()
    assert count_ops(report.graph_after).get(OP) == 1


@pytest.mark.parametrize("fn", [where_matmul_attention, index_select_attention])
def test_decode_attention_after_the_cache_gather_pass(fn):
    """The attention is matched whether or not cache_gather replaced its gather first (index_select's flattened
    block table comes back to the 2-D table through the op's unsqueezed index)."""
    args, stored = attention_problem(16, 16, "fp8", seed=5)
    out, report = compile_run(fn, args, passes=("cache_gather", "decode_attention"))
    assert len(report.pass_report("cache_gather").matches) == 1
    assert only_match(report).detail.startswith("logsumexp attention")
    assert count_ops(report.graph_after).get(OP) == 1
    assert "fx_mla.gather_dequant_cache_paged.default" not in count_ops(report.graph_after)  # dead after it
    check_outputs(out[0], out[1], args, stored, fn(*args))


@pytest.mark.parametrize("passes", [("decode_attention",), ("cache_gather", "decode_attention")], ids=len)
@pytest.mark.parametrize("fn,kv_dtype", [(flat_slots_attention, "fp8"), (flat_slots_index_select_attention, "fp8"),
                                         (flat_slots_cast_first_attention, "fp8"),
                                         (flat_slots_uncast_attention, "auto")], ids=str)
def test_decode_attention_flat_slots_from_the_block_table(fn, kv_dtype, passes):
    """cache.view(-1, D)[slots] with slots = block_table[:, p // bs] * bs + p % bs is cache[block_table]: the op
    reads the 3-D cache through the (int32) block table itself, with or without cache_gather's op in between."""
    args, stored = attention_problem(16, 16, kv_dtype, seed=6)
    out, report = compile_run(fn, args, passes=passes)
    assert only_match(report).detail.startswith("logsumexp attention over the paged " +
                                                ("f8e4m3fn" if kv_dtype == "fp8" else "bf16"))
    assert "fx_mla.mla_decode_fp8.default(%q, %cache, %block_table, %seq_lens, %" in report.graph_after
    unscaled = {"aten.full.default": 1} if kv_dtype == "auto" else {}  # the op's k_scale of an unscaled cache
    assert count_ops(report.graph_after) == {OP: 1, "getitem": 2, **unscaled}  # the slots and the gather are gone
    check_outputs(out[0], out[1], args, stored, fn(*args))


@pytest.mark.parametrize("passes", [("decode_attention",), ("cache_gather", "decode_attention")], ids=len)
def test_decode_attention_declines_slots_not_from_a_block_table(passes):
    """Slots passed in (any rows of the flattened cache), and slots of half the cache's block size: declined with
    the reason, the attention left as written (bitwise the plain function)."""
    args, _ = attention_problem(16, 16, "fp8", seed=8)
    q, cache, table, lens, k_scale = args
    bs = cache.shape[1]
    pos = torch.arange(table.shape[1] * bs)
    slots = (table.long()[:, pos // bs] * bs + pos % bs).flip(-1).contiguous()
    for fn, fn_args in ((given_slots_attention, (q, cache, slots, lens, k_scale)),
                        (half_page_slots_attention, (q, cache, table, lens, k_scale))):
        torch._dynamo.reset()
        out, report = compile_run(fn, fn_args, passes=passes)
        pr = report.pass_report("decode_attention")
        if passes[0] == "cache_gather":
            assert len(report.pass_report("cache_gather").matches) == 1
            want = ["the gather reads per-token i64 slots (cache rows as pages of one token); mla_decode_fp8 takes an "
                    "i32 block table"]
        else:
            want = ["the keys are rows of the flattened cache %reshape gathered by per-token slots that are not "
                    "block_table[:, p // block_size] * block_size + p % block_size over p = arange(T); "
                    "mla_decode_fp8 reads the paged cache through a block table"]
        assert not pr.matches and [d.reason for d in pr.declines] == want, fn.__name__
        assert OP not in count_ops(report.graph_after)
        plain = fn(*fn_args)
        assert torch.equal(out[0], plain[0]) and torch.equal(out[1], plain[1]), fn.__name__


def test_decode_attention_fp8_query_on_cpu_passes_the_dequantized_query():
    args, stored = attention_problem(16, 16, "fp8", seed=5)
    q_scale = torch.tensor(0.05)
    (o, lse), report = compile_run(fp8_query_attention, (args[0], q_scale) + args[1:])
    assert only_match(report).detail.endswith("dequantized query (the FP8 x FP8 path is CUDA-only)")
    assert re.search(rf"{OP}\(%mul_1, %cache", report.graph_after), report.graph_after
    qd = quantize_dequantize_query(args[0], q_scale, torch.float8_e4m3fn)
    check_outputs(o, lse, (qd,) + args[1:], stored, fp8_query_attention(args[0], q_scale, *args[1:]))


# ---------------------------------------------------------------- declines

@pytest.fixture(scope="module")
def declined():
    torch._dynamo.reset()
    args, _ = attention_problem(16, 16, "fp8", seed=7)
    keep = torch.rand(args[2].shape[0], args[2].shape[1] * 16, generator=torch.Generator().manual_seed(0)) < 0.7
    return compile_run(declined_attentions, args + (keep,))[1]


def _reasons(report):
    return [d.reason for d in report.pass_report("decode_attention").declines]


def test_decode_attention_declines_leave_the_graph_unchanged(declined):
    assert not declined.pass_report("decode_attention").matches and len(_reasons(declined)) == 4
    assert declined.graph_after == declined.graph_before


def test_decode_attention_declines_a_boolean_mask_input(declined):
    assert "the mask is not a per-request length mask (arange(T) < seq_lens[:, None], broadcast over heads)" \
        in _reasons(declined)


def test_decode_attention_declines_probabilities_with_other_users(declined):
    assert any(re.fullmatch(r"the attention probabilities %div_\d+ also feed %output; rewriting would keep them "
                            r"alive", r) for r in _reasons(declined)), _reasons(declined)


def test_decode_attention_declines_latent_wider_than_the_kernel(declined):
    assert "mla_decode_fp8 does not cover this attention: kv_lora_rank 544 must be in [1, min(head dim 576, 512)]" \
        in _reasons(declined)


def test_decode_attention_declines_unmasked_scores(declined):
    assert "the scores are not masked by sequence length (no where/masked_fill with -inf)" in _reasons(declined)


# ---------------------------------------------------------------- capability guard (pretended CUDA devices)

class _RewriteCopies:
    """Test pass: runs decode_attention on copies of the graph under other (device, capability) contexts."""

    def __init__(self, targets):
        self.targets, self.results = targets, {}

    def run(self, graph, ctx):
        for device, cap in self.targets:
            copy = torch.fx.Graph()
            copy.output(copy.graph_copy(graph, {}))
            namer = GraphNamer(copy)
            sub = PassContext(ctx.options, torch.device(device), cap, CompileReport(ctx.options, "eager"), namer)
            decode_attention.run(copy, sub)
            text = format_graph(copy, namer)
            sub._finish()
            ops = [n for n in copy.nodes if n.target is torch.ops.fx_mla.mla_decode_fp8.default]
            self.results[(device, cap)] = (sub.report.pass_report("decode_attention"), text, ops)


@pytest.fixture(scope="module")
def capability_runs():
    torch._dynamo.reset()
    a8, _ = attention_problem(16, 16, "fp8", seed=11)
    a16, _ = attention_problem(16, 16, "auto", seed=11)
    args = (a8[0], torch.tensor(0.05), a8[1], a8[2], a16[1], a16[2], a8[3], a8[4])
    probe = _RewriteCopies([("cuda", (9, 0)), ("cuda", (8, 0)), ("cpu", None)])
    fx_passes.register_pass("test_rewrite_copies", probe)
    try:
        compile_run(capability_attentions, args, passes=("test_rewrite_copies",))
    finally:
        fx_passes.unregister_pass("test_rewrite_copies")
    return probe.results


def _query_args(op):
    """(q dtype, q_scale is given, sm_scale, L, out_dtype) of an mla_decode_fp8 node."""
    q, *_, q_scale, sm_scale, latent, out_dtype = op.args
    return q.meta["val"].dtype, q_scale is not None, sm_scale, latent, out_dtype


def test_decode_attention_sm90_passes_the_fp8_query_and_q_scale(capability_runs):
    report, _, ops = capability_runs[("cuda", (9, 0))]
    assert len(report.matches) == 2 and not report.declines
    assert all("fp8 query with q_scale" in m.detail for m in report.matches)
    assert [_query_args(op) for op in ops] == [(torch.float8_e4m3fn, True, 192 ** -0.5, L, torch.bfloat16)] * 2
    assert all(op.args[5].op == "placeholder" for op in ops), "q_scale is the input scale"


def test_decode_attention_sm80_declines_fp8_cache_and_falls_back_for_bf16_cache(capability_runs):
    report, _, ops = capability_runs[("cuda", (8, 0))]
    assert [d.reason for d in report.declines] == [
        "mla_decode_fp8 does not cover this attention: fp8 e4m3fn needs compute capability >= 8.9, device has 8.0"]
    assert len(report.matches) == 1
    assert report.matches[0].detail.endswith("dequantized query (fp8 e4m3fn needs compute capability >= 8.9, "
                                             "device has 8.0)")
    assert [_query_args(op) for op in ops] == [(torch.bfloat16, False, 192 ** -0.5, L, torch.bfloat16)]
    assert ops[0].args[1].meta["val"].dtype == torch.bfloat16


def test_decode_attention_cpu_rewrites_both_with_the_dequantized_query(capability_runs):
    report, _, ops = capability_runs[("cpu", None)]
    assert len(report.matches) == 2 and not report.declines
    assert [_query_args(op) for op in ops] == [(torch.bfloat16, False, 192 ** -0.5, L, torch.bfloat16)] * 2


# ---------------------------------------------------------------- the model, with the other passes, and DCP

@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_decode_attention_model_after_quant_and_cache_gather_passes(inner):
    cfg = MLAConfig(num_heads=16, block_size=16, kv_cache_dtype="fp8", quantize_query=True)
    pb = make_problem(cfg, [5, 0, 70, 33], seed=2)
    module, args = rank_inputs(pb, 0)
    out, report = compile_run(module, args, passes=("quant_before_gather", "cache_gather", "decode_attention"),
                               inner=inner)
    only_match(report)
    assert "gather_dequant_cache_paged" not in report.graph_after and count_ops(report.graph_after)[OP] == 1
    with torch.no_grad():
        plain = module(*args)
    assert rel_err(out, model_reference(pb, module, args)) <= 1e-2 and rel_err(out, plain) <= 1e-2
    assert out[1].abs().max() == 0 and not out.isnan().any()


DCP_CASES = {2: dict(num_heads=16, block_size=16, kv_cache_dtype="fp8", quantize_query=True, interleave=1),
             4: dict(num_heads=16, block_size=64, kv_cache_dtype="fp8", quantize_query=False, interleave=16)}
DCP_LENS = [1, 3, 0, 21, 150]


def _dcp_problem(dcp_size, group=None):
    return make_problem(MLAConfig(**DCP_CASES[dcp_size], dcp_size=dcp_size, dcp_group=group), DCP_LENS,
                        seed=dcp_size)


def _dcp_worker(rank, world_size):
    """DCP 4 over the world, DCP 2 over the pairs {0, 1} and {2, 3}: one spawn serves both group sizes."""
    import torch.distributed as dist

    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group, in order
    results = {}
    for dcp_size, group, dcp_rank in ((4, None, rank), (2, pairs[rank // 2], rank % 2)):
        module, args = rank_inputs(_dcp_problem(dcp_size, group), dcp_rank)
        out, report = compile_run(module, args)
        p = report.pass_report("decode_attention")
        results[dcp_size] = (out, len(p.matches), [d.reason for d in p.declines])
    return results


def test_decode_attention_dcp2_and_dcp4_merge_equals_dcp1():
    per_rank = run_ranks(_dcp_worker, 4, timeout=300)
    for dcp_size, groups in ((4, [[0, 1, 2, 3]]), (2, [[0, 1], [2, 3]])):
        assert all(r[dcp_size][1:] == (1, []) for r in per_rank), [r[dcp_size][1:] for r in per_rank]
        pb = make_problem(MLAConfig(**DCP_CASES[dcp_size], dcp_size=1), DCP_LENS, seed=dcp_size)
        module, args = rank_inputs(pb, 0)
        with torch.no_grad():
            want = module(*args)
        ref = model_reference(pb, module, args)
        for ranks in groups:  # the heads of each rank of a group, side by side
            got = torch.cat([per_rank[r][dcp_size][0] for r in ranks], dim=1)
            assert not got.isnan().any() and got[2].abs().max() == 0, (dcp_size, ranks)
            assert rel_err(got, want) <= 1e-2 and rel_err(got, ref) <= 1e-2, (dcp_size, ranks, rel_err(got, want))
