"""GPU tests of the seesaw launcher's Gluon MLA decode kernels: against the float64 reference on ragged problems
(lengths incl. 0, odd tile counts, NaN in every slot the length mask must skip, block sizes 16/64), outputs and split
workspace poisoned with NaN; every variant (VARIANTS: the scorer kernel ("auto"), the seesaw kernel, its producer
form); the opt-in STAGED_O form, the scorer's options and its PDL launches bitwise against the defaults. Skips where
seesaw_unsupported_reason declines (not sm_90, not Triton 3.6)."""
import pytest
import torch

from fx_mla.ops import mla_decode_seesaw as smod
from tests.gpu.graphs import capture, pdl_writer
from tests.ops.mla_decode_fp8_cases import check_close, make_problem, reference_f64

pytestmark = pytest.mark.cuda
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _skip_unless_supported():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    q = torch.empty(1, 128, 576, dtype=torch.bfloat16, device="cuda")
    reason = smod.seesaw_unsupported_reason(q, torch.empty(1, 16, 576, dtype=E4M3, device="cuda"), 512)
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("variant", smod.VARIANTS)
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("num_splits", [None, 1, 7])
@pytest.mark.parametrize("cache_dtype,q_dtype,out_dtype", [(E4M3, torch.bfloat16, torch.bfloat16),
                                                           (E5M2, torch.float16, torch.float32)])
def test_seesaw_decode_matches_float64(block_size, num_splits, cache_dtype, q_dtype, out_dtype, variant):
    _skip_unless_supported()
    lengths = [0, 1, 33, 65, 700, 96]  # 1, 2, 3 tiles: fully masked second tiles of the last pair
    p = make_problem(lengths, 128, block_size, cache_dtype, q_dtype, seed=block_size, device="cuda")
    out = torch.full((len(lengths), 128, 512), float("nan"), dtype=out_dtype, device="cuda")
    lse = torch.full((len(lengths), 128), float("nan"), device="cuda")
    smod.launch_mla_decode_seesaw(p.q, p.kv_cache, p.block_table, p.seq_lens, p.k_scale, None, p.sm_scale, 512,
                                  out, lse, num_splits=num_splits, poison_workspace=True, one_page=False,
                                  variant=variant)
    check_close(out, lse, *reference_f64(p), out_tol=1e-2, what=f"{variant} bs{block_size} splits {num_splits}")


@pytest.mark.parametrize("variant", smod.VARIANTS)
@pytest.mark.parametrize("num_splits", [None, 1])
def test_seesaw_decode_one_page_matches_float64(num_splits, variant):
    _skip_unless_supported()
    p = make_problem([0, 1, 95, 700, 333], 128, 64, E4M3, torch.bfloat16, seed=3, device="cuda")
    out = torch.full((5, 128, 512), float("nan"), dtype=torch.bfloat16, device="cuda")
    lse = torch.full((5, 128), float("nan"), device="cuda")
    smod.launch_mla_decode_seesaw(p.q, p.kv_cache, p.block_table, p.seq_lens, p.k_scale, None, p.sm_scale, 512,
                                  out, lse, num_splits=num_splits, poison_workspace=True, one_page=True,
                                  variant=variant)
    check_close(out, lse, *reference_f64(p), out_tol=1e-2, what=f"{variant} one_page splits {num_splits}")


@pytest.mark.parametrize("variant", ["seesaw", "producer"])
@pytest.mark.parametrize("num_splits,out_dtype,partial_bf16", [
    (None, torch.bfloat16, False), (1, torch.bfloat16, False), (1, torch.float32, False), (7, torch.float16, False),
    (7, torch.bfloat16, True)])
def test_seesaw_decode_staged_output_matches_float64(num_splits, out_dtype, partial_bf16, variant, monkeypatch):
    """STAGED_O: the output through shared memory in whole rows; bitwise the same as the MMA-layout stores (fp32 and
    bf16 split partials, 16- and 32-bit outputs of a single split)."""
    _skip_unless_supported()
    from fx_mla.ops import _decode_launch as launch_mod
    monkeypatch.setattr(launch_mod, "PARTIAL_BF16", partial_bf16)
    p = make_problem([0, 1, 33, 65, 700, 96], 128, 64, E4M3, torch.bfloat16, seed=13, device="cuda")
    outs = []
    for staged in (False, True):
        monkeypatch.setattr(smod, "STAGED_O", staged)
        out = torch.full((6, 128, 512), float("nan"), dtype=out_dtype, device="cuda")
        lse = torch.full((6, 128), float("nan"), device="cuda")
        smod.launch_mla_decode_seesaw(p.q, p.kv_cache, p.block_table, p.seq_lens, p.k_scale, None, p.sm_scale, 512,
                                      out, lse, num_splits=num_splits, poison_workspace=True, one_page=True,
                                      variant=variant)
        check_close(out, lse, *reference_f64(p), out_tol=1e-2, what=f"{variant} STAGED_O={staged} splits {num_splits}")
        outs.append((out, lse))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_seesaw_decode_rejects_a_scale_with_a_bf16_query():
    _skip_unless_supported()
    p = make_problem([5], 128, 64, E4M3, torch.bfloat16, seed=1, device="cuda")
    out = torch.empty(1, 128, 512, dtype=torch.bfloat16, device="cuda")
    lse = torch.empty(1, 128, device="cuda")
    with pytest.raises(ValueError, match="q_scale"):
        smod.launch_mla_decode_seesaw(p.q, p.kv_cache, p.block_table, p.seq_lens, p.k_scale, torch.ones(1),
                                      p.sm_scale, 512, out, lse)


@pytest.mark.parametrize("variant", smod.VARIANTS)
@pytest.mark.parametrize("q_dtype,cache_dtype,block_size,num_splits", [
    (E4M3, E4M3, 64, None), (E4M3, E4M3, 16, 1), (E5M2, E5M2, 64, 7), (E5M2, E4M3, 32, None)])
def test_seesaw_decode_fp8_query_matches_float64(q_dtype, cache_dtype, block_size, num_splits, variant):
    """An FP8 query (per-tensor q_scale): loaded as fp16 exactly, q_scale folded into the score scale."""
    _skip_unless_supported()
    p = make_problem([0, 1, 33, 65, 700, 96], 128, block_size, cache_dtype, q_dtype, seed=5, device="cuda")
    assert p.q_scale is not None
    out = torch.full((6, 128, 512), float("nan"), dtype=torch.bfloat16, device="cuda")
    lse = torch.full((6, 128), float("nan"), device="cuda")
    smod.launch_mla_decode_seesaw(p.q, p.kv_cache, p.block_table, p.seq_lens, p.k_scale, p.q_scale, p.sm_scale, 512,
                                  out, lse, num_splits=num_splits, poison_workspace=True, variant=variant)
    check_close(out, lse, *reference_f64(p), out_tol=1e-2,
                what=f"{variant} fp8 q {q_dtype} bs{block_size} splits {num_splits}")


@pytest.mark.parametrize("splits,max_blocks,lean", [(32, 12, True), (32, 288, True), (32, 600, False), (7, 12, False)])
def test_seesaw_auto_output_plan_is_the_forced_one(splits, max_blocks, lean, monkeypatch):
    """STAGED_O "auto": at 32 splits a 12- or 288-block table (1 / 9 pairs a split, bf16 output) takes the lean plan
    (staged, bf16 partials), a 600-block one (19 pairs) the plain one, and so does 7 splits (too few); bitwise the
    launch with those settings forced, and within the float64 reference's bounds."""
    _skip_unless_supported()
    from fx_mla.ops import _decode_launch as launch_mod
    p = make_problem([0, 1, 33, 65, 700, 96], 128, 64, E4M3, torch.bfloat16, seed=21, device="cuda")
    bt = torch.zeros(6, max_blocks, dtype=torch.int32, device="cuda")
    width = min(max_blocks, p.block_table.shape[1])
    bt[:, :width] = p.block_table[:, :width]
    p.block_table = bt
    assert smod.output_plan(splits, max_blocks * 64, torch.bfloat16) == ((True, True) if lean else (False, None))
    outs = []
    for staged, bf16 in (("auto", False), (lean, lean)):
        monkeypatch.setattr(smod, "STAGED_O", staged)
        monkeypatch.setattr(launch_mod, "PARTIAL_BF16", bf16)
        out = torch.full((6, 128, 512), float("nan"), dtype=torch.bfloat16, device="cuda")
        lse = torch.full((6, 128), float("nan"), device="cuda")
        smod.launch_mla_decode_seesaw(p.q, p.kv_cache, p.block_table, p.seq_lens, p.k_scale, None, p.sm_scale, 512,
                                      out, lse, num_splits=splits, poison_workspace=True, variant="seesaw")
        check_close(out, lse, *reference_f64(p), out_tol=1e-2,
                    what=f"STAGED_O={staged} splits {splits} blocks {max_blocks}")
        outs.append((out, lse))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("prefetch,early_q,staged", [
    (0, False, False), (1, False, False), (2, False, False), (4, False, False), (2, True, False), (2, False, True),
    (2, True, True)])
@pytest.mark.parametrize("block_size,one_page", [(16, False), (64, False), (64, True)])
@pytest.mark.parametrize("num_splits", [None, 1, 7])
def test_scorer_options_are_bitwise_the_plain_scorer(prefetch, early_q, staged, block_size, one_page,
                                                     num_splits, monkeypatch):
    """The scorer kernel's L2 prefetch (per-row quarters; one whole-half prefetch where a 32-token half lies in one
    page), its query loaded inside the partitions and its staged output change no result:
    bitwise the scorer without them (fp32 partials either way), and both against float64."""
    _skip_unless_supported()
    lengths = [0, 1, 33, 65, 700, 96, 1500]
    p = make_problem(lengths, 128, block_size, E4M3, torch.bfloat16, seed=prefetch + block_size, device="cuda")
    outs = []
    for pf, eq, st in ((0, False, False), (prefetch, early_q, staged)):
        monkeypatch.setattr(smod, "SCORER_PREFETCH", pf)
        monkeypatch.setattr(smod, "SCORER_EARLY_Q", eq)
        monkeypatch.setattr(smod, "SCORER_STAGED", st)
        out = torch.full((len(lengths), 128, 512), float("nan"), dtype=torch.bfloat16, device="cuda")
        lse = torch.full((len(lengths), 128), float("nan"), device="cuda")
        smod.launch_mla_decode_seesaw(p.q, p.kv_cache, p.block_table, p.seq_lens, p.k_scale, None, p.sm_scale, 512,
                                      out, lse, num_splits=num_splits, poison_workspace=True, one_page=one_page,
                                      variant="scorer")
        check_close(out, lse, *reference_f64(p), out_tol=1e-2, what=f"scorer prefetch {pf} early_q {eq} staged {st}")
        outs.append((out, lse))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("num_splits,out_dtype", [(None, torch.bfloat16), (1, torch.float32), (1, torch.float16),
                                                  (40, torch.bfloat16), (7, torch.float16)])
def test_scorer_output_plan_matches_float64(num_splits, out_dtype, monkeypatch):
    """SCORER_STAGED "plan": the seesaw kernel's output plan on the scorer (staged one-split launches, bf16 partials
    for many short splits of a bf16 output: 40 splits of at most 16 tiles here) against float64."""
    _skip_unless_supported()
    monkeypatch.setattr(smod, "SCORER_STAGED", "plan")
    lengths = [0, 1, 33, 700, 2000, 96]
    p = make_problem(lengths, 128, 64, E4M3, torch.bfloat16, seed=11, device="cuda")
    out = torch.full((len(lengths), 128, 512), float("nan"), dtype=out_dtype, device="cuda")
    lse = torch.full((len(lengths), 128), float("nan"), device="cuda")
    smod.launch_mla_decode_seesaw(p.q, p.kv_cache, p.block_table, p.seq_lens, p.k_scale, None, p.sm_scale, 512,
                                  out, lse, num_splits=num_splits, poison_workspace=True, variant="scorer")
    check_close(out, lse, *reference_f64(p), out_tol=1e-2, what=f"scorer plan splits {num_splits} {out_dtype}")


def _plain_scorer(p, num_splits):
    """(out bf16, lse) of the scorer kernel on problem p, launched eagerly with the module's settings."""
    out = torch.empty((p.q.shape[0], 128, 512), dtype=torch.bfloat16, device="cuda")
    lse = torch.empty((p.q.shape[0], 128), device="cuda")
    smod.launch_mla_decode_seesaw(p.q, p.kv_cache, p.block_table, p.seq_lens, p.k_scale, None, p.sm_scale, 512, out,
                                  lse, num_splits=num_splits, variant="scorer")
    return out, lse


def _new_queries(probs):
    """Fresh random queries written in place (a captured graph reads them at its next replay)."""
    for p in probs:
        p.q.copy_(torch.randn_like(p.q, dtype=torch.float32).to(p.q.dtype))


def _replay_poisoned(graph, outs):
    """Replay `graph` once with its (out, lse) pairs filled with NaN first, and wait for it."""
    for out, lse in outs:
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()


@pytest.mark.parametrize("pdl", [True, "early"])
@pytest.mark.parametrize("num_splits", [None, 1, 7])
def test_scorer_pdl_back_to_back_in_a_cuda_graph_is_bitwise_the_plain_scorer(num_splits, pdl, monkeypatch):
    """SCORER_PDL: the scorer and its combine as programmatic dependent launches ("early": with the first tile
    prefetched into L2 before the wait). Three launches back to back in one captured graph (each scorer grid may
    start while the previous combine runs; the workspaces come from the graph's memory pool, so one launch's partials
    may sit where the previous combine reads; with one split there is no combine and each scorer waits for the one
    before), replayed after the queries change in place: every output bitwise the scorer without PDL, and against
    float64."""
    _skip_unless_supported()
    lengths = [0, 1, 33, 700, 2000, 96]
    probs = [make_problem(lengths, 128, 64, E4M3, torch.bfloat16, seed=40 + i, device="cuda") for i in range(3)]
    outs = [(torch.full((len(lengths), 128, 512), float("nan"), dtype=torch.bfloat16, device="cuda"),
             torch.full((len(lengths), 128), float("nan"), device="cuda")) for _ in probs]

    def step():
        for p, (out, lse) in zip(probs, outs):
            smod.launch_mla_decode_seesaw(p.q, p.kv_cache, p.block_table, p.seq_lens, p.k_scale, None, p.sm_scale,
                                          512, out, lse, num_splits=num_splits, variant="scorer")

    want = [_plain_scorer(p, num_splits) for p in probs]
    monkeypatch.setattr(smod, "SCORER_PDL", pdl)
    graph, _ = capture(step)
    ptx = smod.launch_mla_decode_seesaw.last_kernel.asm["ptx"]  # PDL kernels captured
    assert "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx
    for replay in range(2):
        if replay:  # new queries in place; the expected outputs recomputed without PDL
            _new_queries(probs)
            monkeypatch.setattr(smod, "SCORER_PDL", False)
            want = [_plain_scorer(p, num_splits) for p in probs]
            monkeypatch.setattr(smod, "SCORER_PDL", pdl)
        _replay_poisoned(graph, outs)
        for i, (p, (out, lse), (w_out, w_lse)) in enumerate(zip(probs, outs, want)):
            check_close(out, lse, *reference_f64(p), out_tol=1e-2, what=f"PDL launch {i} replay {replay}")
            assert torch.equal(out, w_out) and torch.equal(lse, w_lse), (i, replay)


@pytest.mark.parametrize("pdl", [True, "early"])
@pytest.mark.parametrize("num_splits", [None, 1])
def test_scorer_pdl_reads_what_the_kernel_before_it_wrote(num_splits, pdl, monkeypatch):
    """SCORER_PDL, read after write: right before each scorer launch in a captured graph, a PDL writer kernel (it
    lets its dependents start at once) writes the query, seq_lens and block table the scorer reads; before it they
    hold garbage (NaN / huge / negative bits). The scorer may be scheduled while the writer runs ("early": it then
    prefetches by whatever indices it sees); its outputs must be those of the final inputs: bitwise the scorer
    without PDL on them, every replay."""
    _skip_unless_supported()
    lengths = [0, 1, 33, 700, 2000, 96]
    probs = [make_problem(lengths, 128, 64, E4M3, torch.bfloat16, seed=50 + i, device="cuda") for i in range(2)]
    g = torch.Generator(device="cuda").manual_seed(51)
    live = [(torch.empty_like(p.q), torch.empty_like(p.seq_lens), torch.empty_like(p.block_table)) for p in probs]
    junk = [tuple(torch.randint(-2 ** 31, 2 ** 31 - 1, (t.numel() * t.element_size() // 4,), generator=g,
                                dtype=torch.int64, device="cuda").to(torch.int32) for t in lv) for lv in live]
    outs = [(torch.empty((len(lengths), 128, 512), dtype=torch.bfloat16, device="cuda"),
             torch.empty((len(lengths), 128), device="cuda")) for _ in probs]
    i32 = lambda t: t.view(-1).view(torch.int32)  # noqa: E731

    def step():
        for lv, jk in zip(live, junk):
            for t, j in zip(lv, jk):
                i32(t).copy_(j)
        for p, (q, lens, bt), (out, lse) in zip(probs, live, outs):
            pdl_writer([(i32(p.q), i32(q)), (p.seq_lens, lens), (p.block_table, bt)], wait=True)
            smod.launch_mla_decode_seesaw(q, p.kv_cache, bt, lens, p.k_scale, None, p.sm_scale, 512, out, lse,
                                          num_splits=num_splits, variant="scorer")

    want = [_plain_scorer(p, num_splits) for p in probs]
    monkeypatch.setattr(smod, "SCORER_PDL", pdl)
    graph, _ = capture(step)
    assert "griddepcontrol.wait" in smod.launch_mla_decode_seesaw.last_kernel.asm["ptx"]  # PDL kernels captured
    for replay in range(3):
        _replay_poisoned(graph, outs)
        for i, ((out, lse), (w_out, w_lse)) in enumerate(zip(outs, want)):
            assert torch.equal(out, w_out) and torch.equal(lse, w_lse), (i, replay)


def _merge_launch(p, num_splits, out_dtype, merge, monkeypatch, min_splits=2):
    """(out, lse) of the scorer on problem p, SCORER_MERGE as `merge`, workspace and outputs poisoned with NaN; with
    merge on, asserts that the launch merged in the kernel (its grid barrier's nanosleep is in the PTX).
    min_splits: MERGE_MIN_SPLITS (2: the kernel's merge at any split count; None: the module's rule)."""
    monkeypatch.setattr(smod, "SCORER_MERGE", merge)
    if min_splits is not None:
        monkeypatch.setattr(smod, "MERGE_MIN_SPLITS", min_splits)
    out = torch.full((p.q.shape[0], 128, 512), float("nan"), dtype=out_dtype, device="cuda")
    lse = torch.full((p.q.shape[0], 128), float("nan"), device="cuda")
    smod.launch_mla_decode_seesaw(p.q, p.kv_cache, p.block_table, p.seq_lens, p.k_scale, None, p.sm_scale, 512, out,
                                  lse, num_splits=num_splits, poison_workspace=True, variant="scorer")
    assert ("nanosleep" in smod.launch_mla_decode_seesaw.last_kernel.asm["ptx"]) == merge
    return out, lse


ULP_REL = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 1e-5}


@pytest.mark.parametrize("lengths,num_splits,out_dtype,min_splits", [
    ([0, 1, 33, 700, 2000, 96], None, torch.bfloat16, 2),   # 9 splits of fp32 partials (4 heads a merge step)
    ([0, 1, 33, 700, 2000, 96], 7, torch.float16, 2),
    ([0, 1, 33, 700, 2000, 96], 7, torch.float32, 2),
    ([5000], 40, torch.bfloat16, 2),                        # 40 short splits: bf16 partials, 64-row merge steps
    ([3000, 0], 33, torch.bfloat16, 2),                     # 33 splits, 132 CTAs: some CTAs merge two head blocks
    ([0, 0], 4, torch.bfloat16, 2),                         # no tokens anywhere: out 0, lse -inf
    ([3000], 32, torch.bfloat16, None),                     # the default rule: 32 splits of bf16, 32-row steps
    ([3000, 17], 32, torch.float16, None),                  # the default rule: 32 splits of fp32 partials
    ([5000], 40, torch.bfloat16, None),
])
def test_scorer_merge_matches_the_combine_and_float64(lengths, num_splits, out_dtype, min_splits, monkeypatch):
    """SCORER_MERGE: the split merge in the scorer kernel (cooperative grid, grid barrier) against float64 and
    against the combine kernel's merge of the same partials (the same formula; sums in another order, so within an
    output ulp and lse within 1e-6); with MERGE_MIN_SPLITS lowered to 2 (the kernel's forms at few splits) and at the
    module's rule (>= 32 splits: the forms the op runs)."""
    _skip_unless_supported()
    p = make_problem(lengths, 128, 64, E4M3, torch.bfloat16, seed=60 + len(lengths), device="cuda")
    splits = num_splits or smod.num_splits_for(len(lengths), 2, p.block_table.shape[1] * 64, 64,
                                               torch.cuda.get_device_properties(0).multi_processor_count, 1)
    if len(lengths) * 2 * splits > torch.cuda.get_device_properties(0).multi_processor_count:
        pytest.skip("more CTAs than this GPU's SMs: no in-kernel merge")
    out, lse = _merge_launch(p, num_splits, out_dtype, True, monkeypatch, min_splits)
    check_close(out, lse, *reference_f64(p), out_tol=1e-2, what=f"merge {lengths} splits {num_splits}")
    c_out, c_lse = _merge_launch(p, num_splits, out_dtype, False, monkeypatch, min_splits)
    torch.testing.assert_close(out.float(), c_out.float(), rtol=ULP_REL[out_dtype], atol=1e-6)
    torch.testing.assert_close(lse, c_lse, rtol=1e-6, atol=1e-6)
    if not any(lengths):
        assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())


def test_scorer_merge_in_a_cuda_graph_is_bitwise_its_eager_launch(monkeypatch):
    """SCORER_MERGE captured: three merging launches back to back in one graph (each with its counter zeroed by a
    memset node), replayed 20 times with new queries written in place before some replays: every output bitwise the
    eager merging launch on the same inputs (so no launch reads another's counter or partials), and against
    float64."""
    _skip_unless_supported()
    if torch.cuda.get_device_properties(0).multi_processor_count < 132:
        pytest.skip("a 132-CTA case: needs 132 SMs for the in-kernel merge")
    cases = [([0, 1, 33, 700, 2000, 96], None), ([5000], 40), ([3000, 0], 33)]
    probs = [make_problem(lengths, 128, 64, E4M3, torch.bfloat16, seed=70 + i, device="cuda")
             for i, (lengths, _) in enumerate(cases)]
    outs = [(torch.empty((p.q.shape[0], 128, 512), dtype=torch.bfloat16, device="cuda"),
             torch.empty((p.q.shape[0], 128), device="cuda")) for p in probs]
    monkeypatch.setattr(smod, "SCORER_MERGE", True)
    monkeypatch.setattr(smod, "MERGE_MIN_SPLITS", 2)

    def step():
        for p, (out, lse), (_, splits) in zip(probs, outs, cases):
            smod.launch_mla_decode_seesaw(p.q, p.kv_cache, p.block_table, p.seq_lens, p.k_scale, None, p.sm_scale,
                                          512, out, lse, num_splits=splits, variant="scorer")

    graph, _ = capture(step)
    assert "nanosleep" in smod.launch_mla_decode_seesaw.last_kernel.asm["ptx"]
    for replay in range(20):
        if replay % 7 == 1:
            _new_queries(probs)
        _replay_poisoned(graph, outs)
        for i, (p, (out, lse), (_, splits)) in enumerate(zip(probs, outs, cases)):
            w_out, w_lse = _merge_launch(p, splits, torch.bfloat16, True, monkeypatch)
            assert torch.equal(out, w_out) and torch.equal(lse, w_lse), (i, replay)
            if replay % 7 == 1:
                check_close(out, lse, *reference_f64(p), out_tol=1e-2, what=f"merge graph {i} replay {replay}")
