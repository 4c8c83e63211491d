"""GPU tests of the 16-head Hopper Gluon MLA decode kernel: against the float64 reference on ragged problems
(lengths incl. 0, NaN in every slot the length mask must skip, block sizes 16/32/64), outputs and split workspace
poisoned with NaN, both ring depths and both ring-read orders, the warp-specialized variants ws4 / ws8 / ws8p2 /
ws8p3 / ws8p2o, the register-operand "rs" kernel (TMA ring) and FP8 queries. Skips where gluon16_unsupported_reason
declines (not sm_90, not Triton 3.6)."""
import pytest
import torch

from fx_mla.ops import mla_decode_gluon16 as gmod
from tests.gpu.graphs import capture
from tests.ops.mla_decode_fp8_cases import check_close, make_problem, reference_f64

pytestmark = pytest.mark.cuda
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _skip_unless_supported():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    q = torch.empty(1, 16, 576, dtype=torch.bfloat16, device="cuda")
    reason = gmod.gluon16_unsupported_reason(q, torch.empty(1, 16, 576, dtype=E4M3, device="cuda"), 512)
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("variant", ["ring", "ws4", "ws8", "ws8p2", "ws8p3", "ws8p2o", "rs"])
@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("num_splits", [None, 1, 5])
@pytest.mark.parametrize("cache_dtype,q_dtype,out_dtype", [(E4M3, torch.bfloat16, torch.bfloat16),
                                                           (E5M2, torch.float16, torch.float32)])
def test_gluon16_decode_matches_float64(block_size, num_splits, cache_dtype, q_dtype, out_dtype, variant):
    _skip_unless_supported()
    p = make_problem([0, 1, 65, 700, 333], 16, block_size, cache_dtype, q_dtype, seed=block_size, device="cuda")
    out = torch.full((5, 16, 512), float("nan"), dtype=out_dtype, device="cuda")
    lse = torch.full((5, 16), float("nan"), device="cuda")
    gmod.launch_mla_decode_gluon16(p.q, p.kv_cache, p.block_table, p.seq_lens, p.k_scale, None, p.sm_scale, 512,
                                   out, lse, num_splits=num_splits, poison_workspace=True, variant=variant)
    check_close(out, lse, *reference_f64(p), out_tol=1e-2, what=f"{variant} bs{block_size} splits {num_splits}")


@pytest.mark.parametrize("num_stages,early_read", [(3, False), (3, True), (2, False), (2, True)])
def test_gluon16_variants_match_float64(num_stages, early_read):
    _skip_unless_supported()
    p = make_problem([4096, 0, 77, 640], 16, 64, E4M3, torch.bfloat16, seed=7, device="cuda")
    out = torch.full((4, 16, 512), float("nan"), dtype=torch.bfloat16, device="cuda")
    lse = torch.full((4, 16), float("nan"), device="cuda")
    gmod.launch_mla_decode_gluon16(p.q, p.kv_cache, p.block_table, p.seq_lens, p.k_scale, None, p.sm_scale, 512,
                                   out, lse, num_splits=3, num_stages=num_stages, early_read=early_read,
                                   poison_workspace=True, variant="ring")
    check_close(out, lse, *reference_f64(p), out_tol=1e-2, what=f"stages {num_stages} early {early_read}")


@pytest.mark.parametrize("variant", ["ring", "ws8p2", "ws8p3", "ws8p2o", "rs"])
@pytest.mark.parametrize("q_dtype,cache_dtype,block_size,num_splits", [
    (E4M3, E4M3, 64, None), (E4M3, E4M3, 16, 1), (E5M2, E5M2, 64, 5), (E5M2, E4M3, 32, None)])
def test_gluon16_decode_fp8_query_matches_float64(variant, q_dtype, cache_dtype, block_size, num_splits):
    """An FP8 query (per-tensor q_scale): loaded as fp16 exactly, q_scale folded into the score scale."""
    _skip_unless_supported()
    p = make_problem([0, 1, 65, 700, 333], 16, block_size, cache_dtype, q_dtype, seed=9, device="cuda")
    assert p.q_scale is not None
    out = torch.full((5, 16, 512), float("nan"), dtype=torch.float32, device="cuda")
    lse = torch.full((5, 16), float("nan"), device="cuda")
    gmod.launch_mla_decode_gluon16(p.q, p.kv_cache, p.block_table, p.seq_lens, p.k_scale, p.q_scale, p.sm_scale,
                                   512, out, lse, num_splits=num_splits, poison_workspace=True, variant=variant)
    check_close(out, lse, *reference_f64(p), what=f"{variant} fp8 q {q_dtype} bs{block_size}")  # fp32: 2e-3


def test_gluon16_rs_long_context_matches_float64():
    """"rs" over many tiles a split (the ring wraps many times, P buffers alternate), ragged ends, pages 64."""
    _skip_unless_supported()
    p = make_problem([16384, 4097, 0, 12345], 16, 64, E4M3, torch.bfloat16, seed=11, device="cuda")
    out = torch.full((4, 16, 512), float("nan"), dtype=torch.bfloat16, device="cuda")
    lse = torch.full((4, 16), float("nan"), device="cuda")
    for splits in (1, 3):
        gmod.launch_mla_decode_gluon16(p.q, p.kv_cache, p.block_table, p.seq_lens, p.k_scale, None, p.sm_scale, 512,
                                       out, lse, num_splits=splits, poison_workspace=True, variant="rs")
        check_close(out, lse, *reference_f64(p), out_tol=1e-2, what=f"rs long, {splits} splits")


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_gluon16_rs_dim_major_store_matches_float64(monkeypatch, out_dtype):
    """RS_DIM_MAJOR_STORE: the output leaves as 16-byte vectors of 16 consecutive dims, into out directly (one split)
    and into the fp32 split workspace (3 splits), also into an out whose row stride is not a multiple of 16 elements
    (stores the compiler cannot prove 16-byte aligned)."""
    _skip_unless_supported()
    monkeypatch.setattr(gmod, "RS_DIM_MAJOR_STORE", True)
    p = make_problem([1000, 0, 63, 2049], 16, 64, E4M3, torch.bfloat16, seed=17, device="cuda")
    for splits in (1, 3):
        out = torch.full((4, 16, 512), float("nan"), dtype=out_dtype, device="cuda")
        lse = torch.full((4, 16), float("nan"), device="cuda")
        gmod.launch_mla_decode_gluon16(p.q, p.kv_cache, p.block_table, p.seq_lens, p.k_scale, None, p.sm_scale, 512,
                                       out, lse, num_splits=splits, poison_workspace=True, variant="rs")
        check_close(out, lse, *reference_f64(p), what=f"rs dim-major store, {splits} splits, {out_dtype}")
    wide = torch.full((4, 16, 516), float("nan"), dtype=out_dtype, device="cuda")  # rows 516 apart: narrower stores
    out, lse = wide[..., :512], torch.full((4, 16), float("nan"), device="cuda")
    gmod.launch_mla_decode_gluon16(p.q, p.kv_cache, p.block_table, p.seq_lens, p.k_scale, None, p.sm_scale, 512, out,
                                   lse, num_splits=1, variant="rs")
    check_close(out, lse, *reference_f64(p), what=f"rs dim-major store, padded out rows, {out_dtype}")
    assert torch.isnan(wide[..., 512:]).all(), "wrote past the out rows"


def test_gluon16_rs_default_through_the_op_and_cuda_graph(monkeypatch):
    """VARIANT = "rs" in the op: eager, then captured in a CUDA graph (TMA descriptors are launch parameters) and
    replayed after the lengths changed in place; a cache with padded blocks falls back to ws8p2 (still correct)."""
    _skip_unless_supported()
    monkeypatch.setattr(gmod, "VARIANT", "rs")
    op = torch.ops.fx_mla.mla_decode_fp8.default
    p = make_problem([3000, 0, 129, 700], 16, 64, E4M3, torch.bfloat16, seed=13, device="cuda")
    out, lse = op(*p.args(torch.bfloat16))
    check_close(out, lse, *reference_f64(p), out_tol=1e-2, what="rs via the op")
    graph, (g_out, g_lse) = capture(lambda: op(*p.args(torch.bfloat16)))
    # shorter lengths only: make_problem poisons the slots past each original length with NaN (129 -> 65 drops a
    # page and a split, 700 -> 1 leaves one valid token in the request's first tile)
    p.seq_lens.copy_(torch.tensor([2999, 0, 65, 1], dtype=p.seq_lens.dtype, device="cuda"))
    g_out.fill_(float("nan"))
    g_lse.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check_close(g_out, g_lse, *reference_f64(p), out_tol=1e-2, what="rs graph replay, new lengths")
    padded = torch.full((p.kv_cache.shape[0], 128, 576), float("nan"), device="cuda").to(E4M3)
    padded[:, :64] = p.kv_cache
    p.kv_cache = padded[:, :64]  # blocks 128 rows apart: rs declines, the default falls back to ws8p2
    assert gmod._variant_for(p.kv_cache) == gmod.RS_FALLBACK
    out, lse = op(*p.args(torch.bfloat16))
    check_close(out, lse, *reference_f64(p), out_tol=1e-2, what="rs fallback, padded blocks")


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("num_ctas", [None, 1, 7, 300])
def test_gluon16_rs_balanced_matches_float64(block_size, num_ctas):
    """RS_BALANCED: ragged requests (empty ones, a 1-token one, one longer than the rest together) cut into equal
    shares of CTAs: one CTA (every request whole), 7 (requests split across CTAs, several requests a CTA), the SM
    count, and 300 CTAs for fewer tiles (CTAs without a share between a request's first and last); workspace and
    outputs poisoned with NaN."""
    _skip_unless_supported()
    p = make_problem([0, 1, 65, 700, 333, 0, 4000, 128], 16, block_size, E4M3, torch.bfloat16, seed=21,
                     device="cuda")
    for out_dtype in (torch.bfloat16, torch.float32):
        out = torch.full((8, 16, 512), float("nan"), dtype=out_dtype, device="cuda")
        lse = torch.full((8, 16), float("nan"), device="cuda")
        gmod.launch_mla_decode_gluon16(p.q, p.kv_cache, p.block_table, p.seq_lens, p.k_scale, None, p.sm_scale, 512,
                                       out, lse, num_splits=num_ctas, poison_workspace=True, variant="rs",
                                       balanced=True)
        check_close(out, lse, *reference_f64(p), what=f"rs balanced, {num_ctas} CTAs, bs{block_size}, {out_dtype}")


def test_gluon16_rs_balanced_fp8_query_and_many_requests():
    """RS_BALANCED with an FP8 query (q_scale) over an e5m2 cache, and 96 requests on the default CTA count (many
    requests a CTA: each segment loads its own query)."""
    _skip_unless_supported()
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(0, 900, (96, ), generator=g).tolist()
    p = make_problem(lengths, 16, 64, E5M2, E4M3, seed=22, device="cuda")
    out = torch.full((96, 16, 512), float("nan"), dtype=torch.float32, device="cuda")
    lse = torch.full((96, 16), float("nan"), device="cuda")
    gmod.launch_mla_decode_gluon16(p.q, p.kv_cache, p.block_table, p.seq_lens, p.k_scale, p.q_scale, p.sm_scale, 512,
                                   out, lse, poison_workspace=True, variant="rs", balanced=True)
    check_close(out, lse, *reference_f64(p), what="rs balanced, fp8 query, 96 requests")


def test_gluon16_rs_balanced_in_the_op_and_cuda_graph(monkeypatch):
    """RS_BALANCED through the op, captured in a CUDA graph and replayed after the lengths changed in place (the
    schedule is recomputed from seq_lens on the device: no host sync); bitwise reproducible between two replays."""
    _skip_unless_supported()
    monkeypatch.setattr(gmod, "RS_BALANCED", True)
    op = torch.ops.fx_mla.mla_decode_fp8.default
    p = make_problem([3000, 0, 129, 700, 64], 16, 64, E4M3, torch.bfloat16, seed=23, device="cuda")
    out, lse = op(*p.args(torch.bfloat16))
    check_close(out, lse, *reference_f64(p), out_tol=1e-2, what="rs balanced via the op")
    graph, (g_out, g_lse) = capture(lambda: op(*p.args(torch.bfloat16)))
    p.seq_lens.copy_(torch.tensor([100, 0, 129, 690, 1], dtype=p.seq_lens.dtype, device="cuda"))
    results = []
    for _ in range(2):
        g_out.fill_(float("nan"))
        g_lse.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        results.append((g_out.clone(), g_lse.clone()))
    check_close(g_out, g_lse, *reference_f64(p), out_tol=1e-2, what="rs balanced graph replay, new lengths")
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
