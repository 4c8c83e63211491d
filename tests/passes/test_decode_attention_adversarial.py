"""The decode_attention pass on adversarial variants of paged MLA decode attention (CPU: the op's reference runs).

A program close to what the pass rewrites but computing something else must be left as written (bitwise the plain
function under the eager inner compiler): casts to FP8, integer or bool types inside the attention (query, keys,
scores, probabilities, values, mask positions and lengths) are part of the computation, not a layout; masks,
softmaxes and value slices that are not the op's are declined with their reason. Exact variants (a query rounded
through FP8 or int8 before the attention, int64 lengths, a scale written as two factors) are rewritten and give the
plain function's result.
"""
from __future__ import annotations

import pytest
import torch
from torch._guards import detect_fake_mode

import fx_mla.passes as fx_passes
from fx_mla.mla.decode import gather_pages
from fx_mla.passes import decode_attention
from fx_mla.passes.manager import PassContext
from fx_mla.report import CompileReport, GraphNamer, count_ops
from tests.passes.decode_attention_cases import L, attention_problem, compile_run, rel_err

OP = "fx_mla.mla_decode_fp8.default"
F8 = torch.float8_e4m3fn
# T = 5 pages of 64 = 320 positions and lengths over 255 (uint8 wraps them), an empty request, ragged lengths
LENS = [300, 0, 261, 37]


def _same(x):
    return x


def _decode(q, kv, seq_lens, query=_same, keys=_same, scores=_same, probs=_same, values=_same, positions=_same,
            lengths=_same):
    """The model's logsumexp attention with a hook on each piece; returns (o, lse)."""
    s = scores(torch.matmul(query(q), keys(kv).transpose(1, 2)).float() * 192 ** -0.5)
    pos = positions(torch.arange(kv.shape[1], device=q.device))
    s = s.masked_fill(~(pos[None, :] < lengths(seq_lens)[:, None])[:, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.matmul(probs(p.to(q.dtype)), values(kv[..., :L])), lse


def _attention(**hooks):
    def fn(q, cache, block_table, seq_lens, k_scale):
        return _decode(q, gather_pages(cache, block_table, q.dtype, k_scale), seq_lens, **hooks)
    return fn


def _recast_gather(q, cache, block_table, seq_lens, k_scale):
    """The gathered e4m3 pages cast to e5m2 (a rounding) before the view, then dequantized."""
    kv = cache[block_table].to(torch.float8_e5m2).view(block_table.shape[0], -1, cache.shape[-1])
    return _decode(q, kv.to(q.dtype) * k_scale, seq_lens)


def _uint8_arange(q, cache, block_table, seq_lens, k_scale):
    """Positions made by arange in uint8 (wrapping past 255)."""
    kv = gather_pages(cache, block_table, q.dtype, k_scale)
    return _decode(q, kv, seq_lens, positions=lambda pos: torch.arange(pos.shape[0], dtype=torch.uint8))


LOSSY = {
    "keys_through_fp8": _attention(keys=lambda kv: kv.to(F8).to(kv.dtype)),
    "scores_through_fp8": _attention(scores=lambda s: s.to(torch.float8_e5m2).float()),
    "probs_through_fp8": _attention(probs=lambda p: p.to(F8).to(p.dtype)),
    "values_through_fp8": _attention(values=lambda v: v.to(F8).to(v.dtype)),
    "gather_recast_to_e5m2": _recast_gather,
    "positions_cast_to_uint8": _attention(positions=lambda pos: pos.to(torch.uint8)),
    "positions_by_uint8_arange": _uint8_arange,
    "lengths_cast_to_uint8": _attention(lengths=lambda lens: lens.to(torch.uint8)),
    "lengths_cast_to_bool": _attention(lengths=lambda lens: lens.bool()),
}


@pytest.fixture(scope="module")
def problem():
    return attention_problem(16, 64, "fp8", seq_lens=LENS, seed=21)


@pytest.mark.parametrize("name", list(LOSSY))
def test_decode_attention_lossy_cast_is_not_dropped(name, problem):
    """Rewriting these would drop a rounding or a wrap the plain function computes (0.03-1.2 relative difference
    before the pass stopped walking such casts): the graph stays as written, bitwise."""
    args, _ = problem
    fn = LOSSY[name]
    (o, lse), report = compile_run(fn, args)
    assert not report.pass_report("decode_attention").matches and OP not in count_ops(report.graph_after)
    assert report.graph_after == report.graph_before
    plain = fn(*args)
    assert torch.equal(o, plain[0]) and torch.equal(lse, plain[1])


EXACT = {
    "query_through_fp8_without_scale": _attention(query=lambda q: q.to(F8).to(q.dtype)),
    "query_through_int8": _attention(query=lambda q: q.to(torch.int8).to(q.dtype)),
    "int64_lengths": _attention(lengths=lambda lens: lens.long()),
    "scale_in_two_factors": _attention(scores=lambda s: s * 2.0 * 0.25),
}


@pytest.mark.parametrize("name", list(EXACT))
def test_decode_attention_exact_variant_is_rewritten_to_the_same_result(name, problem):
    """The op takes the query the plain function multiplies (the rounded one, not the tensor before its casts),
    int64 lengths, and the product of the scale factors."""
    args, _ = problem
    fn = EXACT[name]
    (o, lse), report = compile_run(fn, args)
    assert len(report.pass_report("decode_attention").matches) == 1, report.format(graphs=False)
    assert count_ops(report.graph_after).get(OP) == 1
    plain = fn(*args)
    assert rel_err(o, plain[0]) <= 1e-2 and rel_err(lse, plain[1]) <= 1e-2, (rel_err(o, plain[0]),
                                                                             rel_err(lse, plain[1]))
    empty = args[3] == 0
    assert o[empty].abs().max() == 0 and (lse[empty] == float("-inf")).all()


# ---------------------------------------------------------------- declines (one compile, one defect an attention)

def _declined(q, cache, block_table, seq_lens, k_scale, other_cache):
    """Attentions that each compute something the op does not; distinct queries (power-of-two multiples) keep CSE
    from merging their score matmuls."""
    kv = gather_pages(cache, block_table, q.dtype, k_scale)
    kv2 = gather_pages(other_cache, block_table, q.dtype, k_scale)
    heads = q.shape[1]

    def scores(x):
        return torch.matmul(x, kv.transpose(1, 2)).float() * 192 ** -0.5

    pos = torch.arange(kv.shape[1], device=q.device)
    pad = (pos[None, :] >= seq_lens[:, None])[:, None, :]
    outs = []
    # the last token is kept: pos <= seq_len
    s = scores(q).masked_fill(~(pos[None, :] <= seq_lens[:, None])[:, None, :], float("-inf"))
    outs.append(torch.softmax(s, -1).to(q.dtype) @ kv[..., :L])
    # positions shifted by one
    s = scores(q * 2).masked_fill(~((pos + 1)[None, :] < seq_lens[:, None])[:, None, :], float("-inf"))
    outs.append(torch.softmax(s, -1).to(q.dtype) @ kv[..., :L])
    # causal over heads taken as query tokens (speculative decode): the mask varies along the head dim
    last = seq_lens[:, None, None] - heads + torch.arange(heads, device=q.device)[None, :, None]
    s = scores(q * 4).masked_fill(pos[None, None, :] > last, float("-inf"))
    outs.append(torch.softmax(s, -1).to(q.dtype) @ kv[..., :L])
    # softmax over the heads
    outs.append(torch.softmax(scores(q * 8).masked_fill(pad, float("-inf")), 1).to(q.dtype) @ kv[..., :L])
    # log-normalizer without the max: log(sum(exp(s)))
    s = scores(q * 16).masked_fill(pad, float("-inf"))
    p = torch.exp(s - torch.log(torch.exp(s).sum(-1, keepdim=True)))
    outs.append(p.to(q.dtype) @ kv[..., :L])
    # values: the last L entries
    p = torch.softmax(scores(q * 32).masked_fill(pad, float("-inf")), -1).to(q.dtype)
    outs.append(p @ kv[..., -L:])
    # values: every other entry
    p = torch.softmax(scores(q * 64).masked_fill(pad, float("-inf")), -1).to(q.dtype)
    outs.append(p @ kv[..., 0:576:2])
    # values from another cache
    p = torch.softmax(scores(q * 128).masked_fill(pad, float("-inf")), -1).to(q.dtype)
    outs.append(p @ kv2[..., :L])
    # k_scale applied to the scores (a tensor), not to the cache
    raw = cache[block_table].view(block_table.shape[0], -1, cache.shape[-1]).to(q.dtype)
    s = (torch.matmul(q * 256, raw.transpose(1, 2)).float() * k_scale * 192 ** -0.5).masked_fill(pad, float("-inf"))
    outs.append(torch.softmax(s, -1).to(q.dtype) @ (raw * k_scale)[..., :L])
    return tuple(outs)


def test_decode_attention_declines_adversarial_masks_softmaxes_and_values(problem):
    args, _ = problem
    other = attention_problem(16, 64, "fp8", seq_lens=LENS, seed=22)[0][1]
    out, report = compile_run(_declined, args + (other,))
    pr = report.pass_report("decode_attention")
    assert not pr.matches and OP not in count_ops(report.graph_after)
    assert report.graph_after == report.graph_before
    not_length = "the mask is not a per-request length mask (arange(T) < seq_lens[:, None], broadcast over heads)"
    reasons = sorted(d.reason for d in pr.declines)
    want = sorted([not_length] * 3 + [
        "no bmm of the probabilities with the gathered cache's latent (p @ kv[..., :L]) follows the scores",
        "the scores are scaled by a tensor (a Python float captured as a graph input?); mla_decode_fp8 needs "
        "sm_scale as a constant",
        "the values are not a leading slice kv[..., :L] of the gathered cache",
        "the values are not a leading slice kv[..., :L] of the gathered cache"])
    unrecognized = [r for r in reasons if r.startswith("the probabilities %")]
    assert [r for r in reasons if r not in unrecognized] == want and len(unrecognized) == 2, reasons
    plain = _declined(*args, other)
    assert len(out) == len(plain)
    for a, b in zip(out, plain):  # bitwise; a plain softmax over no token is NaN on both sides
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------- an FP8 query on CUDA (pretended capability 9.0)

def _int_dequantized_query(q, q_scale, cache, block_table, seq_lens, k_scale):
    """q_fp8 truncated to integers before its scale: not the FP8 query the op would take with q_scale."""
    q_fp8 = (q / q_scale).clamp(-448, 448).to(F8)
    return _decode((q_fp8.to(torch.int32) * q_scale).to(q.dtype), gather_pages(cache, block_table, q.dtype, k_scale),
                   seq_lens)


class _RewriteOnCuda:
    """Test pass: runs decode_attention on a copy of the graph as if compiling for a CUDA device of capability 9.0;
    ``cuda_inputs``: the copy's tensor inputs become fake CUDA tensors, except 0-dim ones (CPU scalar tensors, which
    eager multiplies with CUDA tensors)."""

    def __init__(self, cuda_inputs=False):
        self.cuda_inputs, self.report = cuda_inputs, None

    def run(self, graph, ctx):
        copy = torch.fx.Graph()
        copy.output(copy.graph_copy(graph, {}))
        inputs = [n for n in copy.nodes if n.op == "placeholder"]
        if self.cuda_inputs:
            with detect_fake_mode([n.meta.get("val") for n in inputs]):
                for n in inputs:
                    v = n.meta.get("val")
                    if isinstance(v, torch.Tensor) and v.dim() > 0:
                        n.meta["val"] = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="cuda")
        sub = PassContext(ctx.options, torch.device("cuda"), (9, 0), CompileReport(ctx.options, "eager"),
                          GraphNamer(copy))
        decode_attention.run(copy, sub)
        sub._finish()
        self.report = sub.report.pass_report("decode_attention")


def _rewrite_on_cuda(fn, args, cuda_inputs=False):
    probe = _RewriteOnCuda(cuda_inputs)
    fx_passes.register_pass("test_rewrite_on_cuda", probe)
    try:
        compile_run(fn, args, passes=("test_rewrite_on_cuda",))
    finally:
        fx_passes.unregister_pass("test_rewrite_on_cuda")
    return probe.report


def test_decode_attention_cuda_keeps_an_integer_truncated_fp8_query():
    """The FP8 x FP8 path takes q_fp8 and q_scale only from q_fp8.to(float) * q_scale; an integer cast in between
    leaves the fp32 product as the query (which the op does not take: declined)."""
    args, _ = attention_problem(16, 16, "fp8", seed=23)
    report = _rewrite_on_cuda(_int_dequantized_query, (args[0], torch.tensor(0.05)) + args[1:])
    assert not report.matches
    assert [d.reason for d in report.declines] == [
        "mla_decode_fp8 does not cover this attention: query dtype torch.float32 is not bf16, fp16, float8_e4m3fn or "
        "float8_e5m2"]


def test_decode_attention_cuda_declines_a_cpu_k_scale():
    """Eager multiplies a CUDA cache by a CPU 0-dim k_scale; the op takes its inputs on one device. Declined (its
    fake implementation would otherwise fail the compile)."""
    args, _ = attention_problem(16, 16, "fp8", seed=24)
    report = _rewrite_on_cuda(_attention(), args, cuda_inputs=True)
    assert not report.matches
    assert [d.reason for d in report.declines] == [
        "k_scale is on cpu, the query on cuda:0: mla_decode_fp8 takes its inputs on one device"]


def _d_strided_cache_attention(q, cache_dnb, block_table, seq_lens, k_scale):
    """A one-token-page cache stored [D, NB, 1] and read through a permuted view (D not contiguous)."""
    return _attention()(q, cache_dnb.permute(1, 2, 0), block_table, seq_lens, k_scale)


def test_decode_attention_declines_a_cache_not_contiguous_in_d():
    args, _ = attention_problem(16, 1, "fp8", seed=25)
    args = (args[0], args[1].permute(2, 0, 1).contiguous()) + args[2:]
    (o, lse), report = compile_run(_d_strided_cache_attention, args)
    pr = report.pass_report("decode_attention")
    assert not pr.matches and [d.reason for d in pr.declines] == [
        "the cache is not contiguous in its last dim (D); mla_decode_fp8 reads rows of D entries"]
    plain = _d_strided_cache_attention(*args)
    assert torch.equal(o, plain[0]) and torch.equal(lse, plain[1])
