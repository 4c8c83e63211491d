"""GPU tests of fx_mla::gather_dequant_cache{,_paged} (marker cuda; skip without CUDA; no expecttest):
real sizes bitwise against the CPU reference, every dtype pair, the fp8_ds_mla layout, launch configurations,
out-of-range indices (zeros, nothing read outside the cache or a block-table row), NaN propagation, checked
mode, opcheck, and CUDA-graph capture of the unchecked ops with inputs changed in place between replays.

    PYTHONPATH=. python -m pytest -q -m cuda tests/gpu/test_gather_dequant_cache_gpu.py
"""
import pytest
import torch

from fx_mla.ops import gather_dequant_cache as gmod  # registers the ops
from tests.gpu.graphs import capture, pdl_writer
from tests.ops.gather_dequant_cache_cases import (FP8, NAN_BYTE, assert_bitwise, poisoned_case, ragged_lengths,
                                                  random_cache, random_scale, token_problem)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                                 reason="fp8 kernels need compute capability >= 8.9")]
OPS = torch.ops.fx_mla
DEV = "cuda"


def _problem(seed, n, d, cache_dtype, layout="plain", bs=64, batch=24, padding=37):
    g = torch.Generator().manual_seed(seed)
    lengths = ragged_lengths(n, batch, g, empty=2)
    starts = torch.randint(0, 3 * bs, (batch,), generator=g).tolist()
    p = token_problem(lengths, bs, g, starts=starts, padding=padding)
    cache = random_cache(p.num_blocks, bs, d, cache_dtype, g, layout)
    scale = random_scale(g) if layout == "plain" and cache_dtype in FP8 else None
    return cache, p, scale


def _run_token(cache, p, scale, out_dtype, layout="plain"):
    dv = p.to(DEV)
    out = OPS.gather_dequant_cache(cache.to(DEV), dv.block_table, dv.cu_seq_lens, dv.token_to_seq, dv.seq_starts,
                                   None if scale is None else scale.to(DEV), out_dtype, layout)
    ref = gmod.gather_dequant_cache_reference(cache, p.block_table, p.cu_seq_lens, p.token_to_seq, p.seq_starts,
                                              scale, out_dtype, layout)
    return out.cpu(), ref


def test_token_form_64k_e4m3_bf16_bitwise():
    cache, p, scale = _problem(0, 65536, 576, torch.float8_e4m3fn)
    out, ref = _run_token(cache, p, scale, torch.bfloat16)
    assert_bitwise(out, ref, "64K tokens e4m3 -> bf16")


@pytest.mark.parametrize("cache_dtype,out_dtype", [
    (torch.float8_e4m3fn, torch.float16), (torch.float8_e4m3fn, torch.float32),
    (torch.float8_e5m2, torch.bfloat16), (torch.float8_e5m2, torch.float16), (torch.float8_e5m2, torch.float32),
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.bfloat16), (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float32), (torch.float32, torch.float16)], ids=str)
def test_token_form_dtype_pairs_bitwise(cache_dtype, out_dtype):
    cache, p, scale = _problem(1, 5000, 576, cache_dtype)
    out, ref = _run_token(cache, p, scale, out_dtype)
    assert_bitwise(out, ref, f"{cache_dtype} -> {out_dtype}")


@pytest.mark.parametrize("d", [320, 288, 100, 1100])
def test_token_form_entry_sizes_bitwise(d):
    cache, p, scale = _problem(2, 3000, d, torch.float8_e4m3fn, bs=16)
    out, ref = _run_token(cache, p, scale, torch.bfloat16)
    assert_bitwise(out, ref, f"D={d}")


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_fp8_ds_mla_64k_bitwise(out_dtype):
    cache, p, _ = _problem(3, 65536, 656, None, layout="fp8_ds_mla")
    out, ref = _run_token(cache, p, None, out_dtype, "fp8_ds_mla")
    assert_bitwise(out, ref, f"fp8_ds_mla -> {out_dtype}")


@pytest.mark.parametrize("layout", ["plain", "fp8_ds_mla"])
def test_paged_form_64k_bitwise(layout):
    g = torch.Generator().manual_seed(4)
    cache = random_cache(1100, 64, 576, torch.float8_e4m3fn, g, layout)
    bt = torch.randperm(1100, generator=g)[:1024].view(32, 32).to(torch.int32)
    scale = random_scale(g) if layout == "plain" else None
    out = OPS.gather_dequant_cache_paged(cache.to(DEV), bt.to(DEV), None if scale is None else scale.to(DEV),
                                         torch.bfloat16, layout)
    assert_bitwise(out.cpu(), gmod.gather_dequant_cache_paged_reference(cache, bt, scale, torch.bfloat16, layout))


@pytest.mark.parametrize("config", [(8, 2, 0), (64, 8, 0), (16, 4, 6), (32, 8, 1), (8, 4, 0, "v"), (4, 2, 0, "vs"),
                                    (16, 8, 0, "vsp"), (8, 4, 4, "vs"), (8, 4, 0, "p"), (8, 4, 0, "pe"),
                                    (16, 4, 6, "pe"), (8, 4, 0, "per"), (16, 4, 6, "per"), (8, 2, 0, "vr")], ids=str)
@pytest.mark.parametrize("layout", ["plain", "fp8_ds_mla"])
def test_launch_configs_bitwise(config, layout):
    cache, p, scale = _problem(5, 20000, 576 if layout == "plain" else 656, torch.float8_e4m3fn, layout)
    dv = p.to(DEV)
    out = torch.full((p.token_to_seq.numel(), 576), float("nan"), dtype=torch.bfloat16, device=DEV)
    gmod.launch_gather_dequant_cache(cache.to(DEV), dv.block_table, dv.cu_seq_lens, dv.token_to_seq, dv.seq_starts,
                                     None if scale is None else scale.to(DEV), out, layout, config)
    ref = gmod.gather_dequant_cache_reference(cache, p.block_table, p.cu_seq_lens, p.token_to_seq, p.seq_starts,
                                              scale, torch.bfloat16, layout)
    assert_bitwise(out.cpu(), ref, f"config {config}")


def test_out_of_range_indices_write_zeros_and_read_nothing_outside():
    """The cache sits inside a buffer whose first and last blocks are NaN codes; the block table is a view
    of a wider one whose extra columns name a NaN block: any stray read would put NaN in the output."""
    c = poisoned_case(6)
    big_d, wide_d = c.big.to(DEV), c.wide.to(DEV)
    cache_d, cache_c = c.cache("plain", big_d), c.cache("plain")
    out = OPS.gather_dequant_cache(cache_d, wide_d[:, 1:-1], c.problem.cu_seq_lens.to(DEV), c.token_to_seq.to(DEV),
                                   c.seq_starts.to(DEV), c.scale.to(DEV), torch.bfloat16).cpu()
    ref = gmod.gather_dequant_cache_reference(cache_c, c.wide[:, 1:-1], c.problem.cu_seq_lens, c.token_to_seq,
                                              c.seq_starts, c.scale, torch.bfloat16)
    assert not bool(out.isnan().any())
    assert bool((out[7] == 0).all())
    assert_bitwise(out, ref, "out-of-range token form")
    paged = OPS.gather_dequant_cache_paged(cache_d, wide_d[:, 1:-1], c.scale.to(DEV), torch.bfloat16).cpu()
    assert not bool(paged.isnan().any())
    assert_bitwise(paged, gmod.gather_dequant_cache_paged_reference(cache_c, c.wide[:, 1:-1], c.scale,
                                                                    torch.bfloat16))


def test_nan_codes_stay_nan():
    cache, p, scale = _problem(7, 2000, 576, torch.float8_e4m3fn)
    raw = cache.view(torch.uint8)
    raw[:, :, ::97] = NAN_BYTE[torch.float8_e4m3fn]
    out, ref = _run_token(cache, p, scale, torch.bfloat16)
    assert bool(ref.isnan().any())
    assert_bitwise(out, ref, "NaN codes")


def test_checked_mode_raises_on_cuda():
    cache, p, scale = _problem(8, 500, 64, torch.float8_e4m3fn, bs=16, batch=4, padding=0)
    dv = p.to(DEV)
    bt = dv.block_table.clone()
    bt[1, 0] = 9001
    with pytest.raises(ValueError, match=rf"block_table\[1, 0\] = 9001 is out of range for num_blocks={p.num_blocks}"):
        OPS.gather_dequant_cache_paged(cache.to(DEV), bt, scale.to(DEV), torch.bfloat16, checked=True)
    b = int(((p.cu_seq_lens[1:] - p.cu_seq_lens[:-1]) > 0).nonzero()[-1])  # a request that has tokens
    ss = dv.seq_starts.clone()
    ss[b] = 10 ** 6
    with pytest.raises(ValueError, match=rf"seq_starts\[{b}\] \+ length = 1000000 \+ \d+ exceeds the pages "
                                         rf"request {b}"):
        OPS.gather_dequant_cache(cache.to(DEV), dv.block_table, dv.cu_seq_lens, dv.token_to_seq, ss, scale.to(DEV),
                                 torch.bfloat16, checked=True)


def test_opcheck_cuda():
    cache, p, scale = _problem(9, 300, 64, torch.float8_e4m3fn, bs=16, batch=4, padding=2)
    dv = p.to(DEV)
    utils = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    torch.library.opcheck(OPS.gather_dequant_cache.default,
                          (cache.to(DEV), dv.block_table, dv.cu_seq_lens, dv.token_to_seq, dv.seq_starts,
                           scale.to(DEV), torch.bfloat16), test_utils=utils)
    rows, _, _ = _problem(9, 300, 656, None, "fp8_ds_mla", bs=16, batch=4, padding=2)
    torch.library.opcheck(OPS.gather_dequant_cache_paged.default,
                          (rows.to(DEV), dv.block_table, None, torch.float16, "fp8_ds_mla"))


@pytest.mark.parametrize("layout", ["plain", "fp8_ds_mla"])
def test_cuda_graph_capture_reads_inputs_on_device(layout):
    """Capture both ops once; then overwrite the cache, scale, block table and metadata in place and replay:
    the outputs must follow the new inputs (nothing was baked in on the host at capture time)."""
    d = 576 if layout == "plain" else 656
    cache, p, scale = _problem(10, 4000, d, torch.float8_e4m3fn, layout)
    g = torch.Generator().manual_seed(12)
    cache2 = random_cache(p.num_blocks, 64, d, torch.float8_e4m3fn, g, layout)
    scale2 = None if scale is None else random_scale(g)
    bt2 = p.block_table[torch.randperm(p.block_table.shape[0], generator=g)]
    ss2 = torch.randint(0, 3 * 64, p.seq_starts.shape, generator=g).to(torch.int32)
    ss2 = torch.minimum(ss2, p.block_table.shape[1] * 64 - (p.cu_seq_lens[1:] - p.cu_seq_lens[:-1]))
    dv = p.to(DEV)
    c_d = cache.to(DEV)
    s_d = None if scale is None else scale.to(DEV)

    def step():
        return (OPS.gather_dequant_cache(c_d, dv.block_table, dv.cu_seq_lens, dv.token_to_seq, dv.seq_starts, s_d,
                                         torch.bfloat16, layout),
                OPS.gather_dequant_cache_paged(c_d, dv.block_table, s_d, torch.bfloat16, layout))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tok, pag = step()
    c_d.copy_(cache2.to(DEV))
    if s_d is not None:
        s_d.copy_(scale2.to(DEV).reshape(s_d.shape))
    dv.block_table.copy_(bt2.to(DEV))
    dv.seq_starts.copy_(ss2.to(DEV))
    graph.replay()
    torch.cuda.synchronize()
    ref_tok = gmod.gather_dequant_cache_reference(cache2, bt2, p.cu_seq_lens, p.token_to_seq, ss2, scale2,
                                                  torch.bfloat16, layout)
    ref_pag = gmod.gather_dequant_cache_paged_reference(cache2, bt2, scale2, torch.bfloat16, layout)
    assert_bitwise(tok.cpu(), ref_tok, "graph replay, token form")
    assert_bitwise(pag.cpu(), ref_pag, "graph replay, paged form")


@pytest.mark.parametrize("cfg", [(8, 4, 0, "vsp"), (8, 4, 0, "vspe"), (8, 4, 0, "pe")], ids=str)
def test_pdl_launches_in_cuda_graph_see_the_previous_kernels_writes(cfg):
    """Config flag "p" (programmatic dependent launch): launch B reads, as its cache, the output launch A wrote
    right before it in the same captured graph, after a NaN fill; B must see all of A's writes (its programs
    wait for A to finish before reading). Replayed after the inputs change. With "e" B's programs prefetch
    those rows into L2 while A may still be writing them: the values B reads after the wait are still A's."""
    n, bs, d = 20000, 16, 576
    cache, p, scale = _problem(13, n, d, torch.float8_e4m3fn, bs=bs)
    dv = p.to(DEV)
    c_d, s_d = cache.to(DEV), scale.to(DEV)
    m = -(-p.token_to_seq.numel() // bs) * bs
    mid = torch.empty((m, d), dtype=torch.bfloat16, device=DEV)
    ident = torch.arange(m // bs, dtype=torch.int32, device=DEV).view(1, -1)
    out = torch.empty((1, m, d), dtype=torch.float32, device=DEV)

    def step():
        mid.fill_(float("nan"))
        gmod.launch_gather_dequant_cache(c_d, dv.block_table, dv.cu_seq_lens, dv.token_to_seq, dv.seq_starts, s_d,
                                         mid[:p.token_to_seq.numel()], "plain", cfg)
        gmod.launch_gather_dequant_cache(mid.view(m // bs, bs, d), ident, None, None, None, None, out, "plain", cfg)

    graph, _ = capture(step)
    for seed in (14, 15):
        new = random_cache(p.num_blocks, bs, d, torch.float8_e4m3fn, torch.Generator().manual_seed(seed))
        c_d.copy_(new.to(DEV))
        graph.replay()
        torch.cuda.synchronize()
        ref = gmod.gather_dequant_cache_reference(new, p.block_table, p.cu_seq_lens, p.token_to_seq, p.seq_starts,
                                                  scale, torch.bfloat16).float()
        assert_bitwise(out[0, :ref.shape[0]].cpu(), ref, f"PDL chain, cache seed {seed}")


@pytest.mark.parametrize("layout", ["plain", "fp8_ds_mla"])
@pytest.mark.parametrize("cfg", [(8, 4, 0, "p"), (8, 4, 0, "pe"), (8, 4, 0, "per"), (32, 4, 2, "ape", 3)], ids=str)
def test_indices_written_by_the_previous_kernel_under_pdl(layout, cfg):
    """The kernel right before the gather in a captured graph (a PDL primary that lets its dependents start at
    once) writes the block table and token_to_seq the gather reads; before it they hold garbage (huge, negative,
    out of range). With flag "e" the gather's programs read those indices before their PDL wait (prefetch
    addresses only): whatever they saw, the output is the reference's with the final indices, every replay. The
    last config is the Gluon cp.async kernel (sm_90+; its flag "e" prefetches the first group's rows the same way)."""
    if "a" in cfg[3] and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the cp.async gather needs compute capability >= 9.0")
    n, d = 30000, 576 if layout == "plain" else 656
    cache, p, scale = _problem(17, n, d, torch.float8_e4m3fn, layout)
    dv = p.to(DEV)
    bt_live, tts_live = torch.empty_like(dv.block_table), torch.empty_like(dv.token_to_seq)
    g = torch.Generator().manual_seed(18)
    bad_bt = torch.randint(-2 ** 31, 2 ** 31 - 1, tuple(p.block_table.shape), generator=g, dtype=torch.int64)
    bad_tts = torch.randint(-2 ** 31, 2 ** 31 - 1, tuple(p.token_to_seq.shape), generator=g, dtype=torch.int64)
    bad_bt, bad_tts = bad_bt.to(torch.int32).to(DEV), bad_tts.to(torch.int32).to(DEV)
    c_d, s_d = cache.to(DEV), None if scale is None else scale.to(DEV)
    out = torch.empty((p.token_to_seq.numel(), 576), dtype=torch.bfloat16, device=DEV)
    if "a" in cfg[3]:  # the Gluon kernel itself runs, not its Triton fallback
        assert gmod.async_unsupported(c_d, out, layout, cfg) is None

    def step():
        bt_live.copy_(bad_bt)
        tts_live.copy_(bad_tts)
        out.fill_(float("nan"))
        pdl_writer([(dv.block_table, bt_live), (dv.token_to_seq, tts_live)])
        gmod.launch_gather_dequant_cache(c_d, bt_live, dv.cu_seq_lens, tts_live, dv.seq_starts, s_d, out, layout,
                                         cfg)

    graph, _ = capture(step)
    ref = gmod.gather_dequant_cache_reference(cache, p.block_table, p.cu_seq_lens, p.token_to_seq, p.seq_starts,
                                              scale, torch.bfloat16, layout)
    for i in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert_bitwise(out.cpu(), ref, f"replay {i}, config {cfg}")
