"""GPU tests of the Gluon cp.async gather (config flag "a", kernels/gather_dequant_cache_async.py; marker cuda; skip
without an sm_90+ GPU; no expecttest): bitwise the CPU reference for both layouts, every fp8 -> output dtype pair,
entry sizes with one, two and three parts (the third masked), the token form with seq_starts and padding tokens,
the paged form, launch shapes (BLOCK_T, warps, CTAs an SM, stages), token counts below one tile an SM, indices out
of range (zeros, nothing read outside the cache or a block-table row), a PDL chain in a CUDA graph, and the calls
it declines (they take the Triton kernels, same results). Indices written by a PDL primary right before it:
test_gather_dequant_cache_gpu.py's test_indices_written_by_the_previous_kernel_under_pdl (an async config there).

    PYTHONPATH=. python -m pytest -q -m cuda tests/gpu/test_gather_async_gpu.py
"""
import pytest
import torch

from fx_mla.ops import gather_dequant_cache as gmod  # registers the ops
from tests.gpu.graphs import capture
from tests.ops.gather_dequant_cache_cases import (assert_bitwise, poisoned_case, ragged_lengths, random_cache,
                                                  random_scale, token_problem)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (9, 0),
                                 reason="the cp.async gather needs compute capability >= 9.0")]
DEV = "cuda"
CFG = (32, 4, 2, "ape", 3)
CONFIGS = [(32, 4, 1, "a", 4), (32, 4, 1, "ap", 6, 8), (32, 4, 2, "ap", 3, 1), (16, 4, 3, "ap", 4, 2),
           (8, 8, 1, "a", 2), (32, 8, 2, "pa", 5), (32, 4, 1, "ape", 6)]


def _problem(seed, n, d, cache_dtype, layout="plain", bs=64, batch=24, padding=37, seq_starts=True):
    g = torch.Generator().manual_seed(seed)
    lengths = ragged_lengths(n, batch, g, empty=2) if n >= batch else [n] + [0] * (batch - 1)
    starts = torch.randint(0, 3 * bs, (batch,), generator=g).tolist() if seq_starts else None
    p = token_problem(lengths, bs, g, starts=starts, padding=padding)
    cache = random_cache(p.num_blocks, bs, d, cache_dtype, g, layout)
    scale = random_scale(g) if layout == "plain" else None
    return cache, p, scale


def _token(cache, p, scale, out_dtype, layout, cfg, check_async=True):
    dv = p.to(DEV)
    c_d = cache.to(DEV)
    d_out = 576 if layout == "fp8_ds_mla" else cache.shape[2]
    out = torch.full((p.token_to_seq.numel(), d_out), float("nan"), dtype=out_dtype, device=DEV)
    if check_async:
        assert gmod.async_unsupported(c_d, out, layout, cfg) is None
    gmod.launch_gather_dequant_cache(c_d, dv.block_table, dv.cu_seq_lens, dv.token_to_seq, dv.seq_starts,
                                     None if scale is None else scale.to(DEV), out, layout, cfg)
    ref = gmod.gather_dequant_cache_reference(cache, p.block_table, p.cu_seq_lens, p.token_to_seq, p.seq_starts,
                                              scale, out_dtype, layout)
    return out.cpu(), ref


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("layout", ["plain", "fp8_ds_mla"])
def test_async_configs_bitwise(cfg, layout):
    cache, p, scale = _problem(31, 20000, 576 if layout == "plain" else 656, torch.float8_e4m3fn, layout)
    out, ref = _token(cache, p, scale, torch.bfloat16, layout, cfg)
    assert_bitwise(out, ref, f"config {cfg} {layout}")


@pytest.mark.parametrize("layout", ["plain", "fp8_ds_mla"])
def test_async_64k_bitwise(layout):
    cache, p, scale = _problem(32, 65536, 576 if layout == "plain" else 656, torch.float8_e4m3fn, layout)
    out, ref = _token(cache, p, scale, torch.bfloat16, layout, CFG)
    assert_bitwise(out, ref, f"64K {layout}")


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_async_dtype_pairs_bitwise(cache_dtype, out_dtype):
    cache, p, scale = _problem(33, 5000, 576, cache_dtype)
    out, ref = _token(cache, p, scale, out_dtype, "plain", CFG)
    assert_bitwise(out, ref, f"{cache_dtype} -> {out_dtype}")


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32], ids=str)
def test_async_ds_mla_out_dtypes_bitwise(out_dtype):
    cache, p, _ = _problem(34, 5000, 656, None, "fp8_ds_mla")
    out, ref = _token(cache, p, None, out_dtype, "fp8_ds_mla", CFG)
    assert_bitwise(out, ref, f"fp8_ds_mla -> {out_dtype}")


@pytest.mark.parametrize("d", [320, 288, 624, 16, 1024, 592], ids=str)
def test_async_entry_sizes_bitwise(d):
    """One part (16, 1024), two (320, 288), three (592 = 512 + 64 + 16) and a masked third (624 = 512 + 64 + 48)."""
    cache, p, scale = _problem(35, 3000, d, torch.float8_e4m3fn, bs=16)
    out, ref = _token(cache, p, scale, torch.bfloat16, "plain", CFG)
    assert_bitwise(out, ref, f"D={d}")


@pytest.mark.parametrize("n", [1, 7, 33, 1000], ids=str)
@pytest.mark.parametrize("layout", ["plain", "fp8_ds_mla"])
def test_async_few_tokens_and_no_seq_starts(n, layout):
    """Fewer tokens than one tile an SM (the grid shrinks to one CTA a tile), seq_starts None, no padding."""
    cache, p, scale = _problem(36 + n, n, 576 if layout == "plain" else 656, torch.float8_e4m3fn, layout,
                               bs=16, batch=4, padding=0, seq_starts=False)
    out, ref = _token(cache, p, scale, torch.bfloat16, layout, CFG)
    assert_bitwise(out, ref, f"{n} tokens {layout}")


@pytest.mark.parametrize("layout", ["plain", "fp8_ds_mla"])
def test_async_paged_form_bitwise(layout):
    g = torch.Generator().manual_seed(40)
    cache = random_cache(1100, 64, 576, torch.float8_e4m3fn, g, layout)
    bt = torch.randperm(1100, generator=g)[:1024].view(32, 32).to(torch.int32)
    scale = random_scale(g) if layout == "plain" else None
    out = torch.full((32, 32 * 64, 576), float("nan"), dtype=torch.bfloat16, device=DEV)
    c_d = cache.to(DEV)
    assert gmod.async_unsupported(c_d, out, layout, CFG) is None
    gmod.launch_gather_dequant_cache(c_d, bt.to(DEV), None, None, None, None if scale is None else scale.to(DEV),
                                     out, layout, CFG)
    assert_bitwise(out.cpu(), gmod.gather_dequant_cache_paged_reference(cache, bt, scale, torch.bfloat16, layout))


@pytest.mark.parametrize("layout", ["plain", "fp8_ds_mla"])
def test_async_out_of_range_indices_write_zeros_and_read_nothing_outside(layout):
    """Out-of-range block ids, request ids and positions, and a token before its request's start (a negative offset:
    floor division and the block-table wrap), over a poisoned cache and block table (poisoned_case): a stray read
    puts NaN (plain) or huge values (fp8_ds_mla's poisoned scales) in the output, which the bitwise comparison
    catches; out-of-range tokens' rows must be the reference's zeros."""
    c = poisoned_case(41, layout)
    big_d, wide_d = c.big.to(DEV), c.wide.to(DEV)
    cache_d, cache_c = c.cache(layout, big_d), c.cache(layout)
    s_d = None if c.scale is None else c.scale.to(DEV)
    out = torch.full((c.token_to_seq.numel(), 576), float("nan"), dtype=torch.bfloat16, device=DEV)
    assert gmod.async_unsupported(cache_d, out, layout, CFG) is None
    gmod.launch_gather_dequant_cache(cache_d, wide_d[:, 1:-1], c.problem.cu_seq_lens.to(DEV), c.token_to_seq.to(DEV),
                                     c.seq_starts.to(DEV), s_d, out, layout, CFG)
    out = out.cpu()
    ref = gmod.gather_dequant_cache_reference(cache_c, c.wide[:, 1:-1], c.problem.cu_seq_lens, c.token_to_seq,
                                              c.seq_starts, c.scale, torch.bfloat16, layout)
    assert not bool(out.isnan().any())
    assert bool((out[7] == 0).all())
    assert_bitwise(out, ref, f"out-of-range token form {layout}")
    bt = c.wide[:, 1:-1]
    pag = torch.full((bt.shape[0], bt.shape[1] * 16, 576), float("nan"), dtype=torch.bfloat16, device=DEV)
    gmod.launch_gather_dequant_cache(cache_d, wide_d[:, 1:-1], None, None, None, s_d, pag, layout, CFG)
    pag = pag.cpu()
    assert not bool(pag.isnan().any())
    assert_bitwise(pag, gmod.gather_dequant_cache_paged_reference(cache_c, bt, c.scale, torch.bfloat16, layout))


def test_async_pdl_chain_in_cuda_graph():
    """In one captured graph: a NaN fill, gather A (async, PDL) over the cache, a copy of A's output back to fp8 (the
    op has no fp8 output), gather B (async, PDL) with that copy as its cache. Each PDL launch must see all writes of
    the kernel before it. Replayed after the cache changes."""
    n, bs, d = 20000, 16, 576
    cache, p, scale = _problem(42, n, d, torch.float8_e4m3fn, bs=bs)
    dv = p.to(DEV)
    c_d, s_d = cache.to(DEV), scale.to(DEV)
    m = -(-p.token_to_seq.numel() // bs) * bs
    mid = torch.empty((m, d), dtype=torch.float8_e4m3fn, device=DEV)
    mid16 = torch.empty((p.token_to_seq.numel(), d), dtype=torch.bfloat16, device=DEV)
    ident = torch.arange(m // bs, dtype=torch.int32, device=DEV).view(1, -1)
    out = torch.empty((1, m, d), dtype=torch.float32, device=DEV)

    def step():
        mid16.fill_(float("nan"))
        gmod.launch_gather_dequant_cache(c_d, dv.block_table, dv.cu_seq_lens, dv.token_to_seq, dv.seq_starts, s_d,
                                         mid16, "plain", CFG)
        mid[:mid16.shape[0]].copy_(mid16)  # fp8 again (exact where the values are fp8 codes times 1)
        gmod.launch_gather_dequant_cache(mid.view(m // bs, bs, d), ident, None, None, None, None, out, "plain", CFG)

    one = torch.ones((), dtype=torch.float32, device=DEV)
    s_d.copy_(one)  # scale 1: the first gather's output is the fp8 values themselves
    assert gmod.async_unsupported(c_d, mid16, "plain", CFG) is None
    assert gmod.async_unsupported(mid.view(m // bs, bs, d), out, "plain", CFG) is None
    graph, _ = capture(step)
    for seed in (43, 44):
        new = random_cache(p.num_blocks, bs, d, torch.float8_e4m3fn, torch.Generator().manual_seed(seed))
        c_d.copy_(new.to(DEV))
        mid.zero_()
        graph.replay()
        torch.cuda.synchronize()
        ref = gmod.gather_dequant_cache_reference(new, p.block_table, p.cu_seq_lens, p.token_to_seq, p.seq_starts,
                                                  one.cpu(), torch.float32)
        assert_bitwise(out[0, :ref.shape[0]].cpu(), ref, f"PDL chain, cache seed {seed}")


def test_async_declines_and_falls_back():
    """A bf16 cache, an entry that is no multiple of 16, and a cache whose rows are not 16-byte aligned: the
    reasons name what is missing, and the calls still give the reference's bits (through the Triton kernels)."""
    g = torch.Generator().manual_seed(45)
    p = token_problem([300, 200], 16, g, padding=3)
    dv = p.to(DEV)
    cases = [("plain", random_cache(p.num_blocks, 16, 576, torch.bfloat16, g), None, "bfloat16 cache"),
             ("plain", random_cache(p.num_blocks, 16, 100, torch.float8_e4m3fn, g), random_scale(g), "entry size")]
    wide = random_cache(p.num_blocks, 16, 584, torch.float8_e4m3fn, g)
    cases.append(("plain", wide[:, :, 8:], random_scale(g), "16-byte aligned"))
    for layout, cache, scale, why in cases:
        c_d = cache.to(DEV) if cache.is_contiguous() else wide.to(DEV)[:, :, 8:]
        out = torch.full((p.token_to_seq.numel(), cache.shape[2]), float("nan"), dtype=torch.bfloat16, device=DEV)
        reason = gmod.async_unsupported(c_d, out, layout, CFG)
        assert reason is not None and why in reason, (why, reason)
        gmod.launch_gather_dequant_cache(c_d, dv.block_table, dv.cu_seq_lens, dv.token_to_seq, dv.seq_starts,
                                         None if scale is None else scale.to(DEV), out, layout, CFG)
        ref = gmod.gather_dequant_cache_reference(cache, p.block_table, p.cu_seq_lens, p.token_to_seq, p.seq_starts,
                                                  scale, torch.bfloat16, layout)
        assert_bitwise(out.cpu(), ref, why)
