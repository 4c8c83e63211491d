"""GPU tests of the op's CUDA dispatch on inputs the kernel-specific tests do not cover: non-contiguous q and
block_table, int64 lengths and fp32 / fp16 outputs on every kernel choice (auto: the seesaw launcher, by default its
scorer kernel, for 128 heads, gluon16 for 16 on sm_90 + Triton 3.6; triton), shapes without tokens (B = 0, no cache
block, no table column) and inputs on a GPU other than the current one (needs 2 GPUs)."""
import pytest
import torch
import triton

import fx_mla.ops.mla_decode_fp8 as dmod
import fx_mla.ops.mla_decode_gluon16 as g16mod
import fx_mla.ops.mla_decode_seesaw as smod
from fx_mla.ops import _decode_launch as launch_mod
from fx_mla.ops._decode_launch import GLUON_TRITON_VERSION
from tests.ops.mla_decode_fp8_cases import check_close, make_problem, reference_f64

pytestmark = pytest.mark.cuda
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

OP = torch.ops.fx_mla.mla_decode_fp8.default
E4M3 = torch.float8_e4m3fn


@pytest.fixture(params=["auto", "triton"])
def kernel(request, monkeypatch):
    monkeypatch.setattr(dmod, "DECODE_KERNEL", request.param)
    return request.param


@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_strided_inputs_int64_lengths_and_out_dtypes(kernel, heads, out_dtype):
    p = make_problem([700, 0, 129, 64], heads, 64, E4M3, seed=heads, device="cuda", seq_dtype=torch.int64)
    wide_q = torch.randn(4, heads, 640, device="cuda").to(p.q.dtype)
    wide_q[..., :576] = p.q
    q = wide_q[..., :576]                                   # rows 640 apart: not contiguous
    bt = p.block_table.t().contiguous().t()                 # column-major block table
    out, lse = OP(q, p.kv_cache, bt, p.seq_lens, p.k_scale, None, p.sm_scale, 512, out_dtype)
    choice = dmod.cuda_kernel_choice(q, p.kv_cache, 512)
    check_close(out, lse, *reference_f64(p), lse_tol=1e-3, what=f"{choice} H{heads} {out_dtype}")


@pytest.mark.parametrize("heads", [16, 128])
def test_fp8_query(kernel, heads):
    """An FP8 query with its q_scale: on auto the Gluon kernels take it (fp16 exactly, q_scale in the score scale),
    on triton the FP8 x FP8 kernel; both against the float64 reference."""
    p = make_problem([700, 0, 129, 64], heads, 64, E4M3, E4M3, seed=heads + 1, device="cuda")
    out, lse = OP(*p.args(torch.bfloat16))
    choice = dmod.cuda_kernel_choice(p.q, p.kv_cache, 512)
    hopper = torch.cuda.get_device_capability() == (9, 0) and triton.__version__.startswith(GLUON_TRITON_VERSION)
    if kernel == "auto" and hopper:
        assert choice == ("gluon16" if heads == 16 else "seesaw")
    # the Triton FP8 x FP8 warpgroup MMA accumulates in reduced precision (see test_mla_decode_fp8_gpu.py)
    lse_tol = 5e-3 if (choice == "triton" and heads > 16) else 1e-3
    check_close(out, lse, *reference_f64(p), lse_tol=lse_tol, what=f"{choice} fp8 q H{heads}")


@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("flag", ["PARTIAL_BF16", "COMBINE_PDL"])
def test_opt_in_split_options(kernel, monkeypatch, heads, flag):
    """bf16 split partials and the combine as a programmatic dependent launch (both opt-in, session 3): the op on
    several splits against the float64 reference, eagerly and replayed from a CUDA graph."""
    monkeypatch.setattr(launch_mod, flag, True)
    seen = []
    for mod in (dmod, smod, g16mod):  # each launcher calls the combine it imported: record what it merges
        real = mod.combine_splits
        monkeypatch.setattr(mod, "combine_splits", lambda po, pl, o, l_, splits, rank, *a, _real=real, **k: (
            seen.append((splits, po.dtype, launch_mod.COMBINE_PDL)), _real(po, pl, o, l_, splits, rank, *a, **k)))
    p = make_problem([3000, 0, 129, 700], heads, 64, E4M3, seed=heads + 7, device="cuda")
    out, lse = OP(*p.args(torch.bfloat16))
    check_close(out, lse, *reference_f64(p), what=f"{flag} H{heads}")
    [(splits, part_dtype, pdl)] = seen
    assert splits > 1, "the option only acts on split launches"
    lean = False  # the seesaw kernel's own bf16 partials for short splits (smod.output_plan), whatever the flag
    if dmod.cuda_kernel_choice(p.q, p.kv_cache, 512) == "seesaw" and smod.VARIANT in ("seesaw", "producer"):
        capacity = p.block_table.shape[1] * p.kv_cache.shape[1]
        lean = smod.output_plan(splits, capacity, torch.bfloat16)[1] is True
    assert part_dtype == (torch.bfloat16 if flag == "PARTIAL_BF16" or lean else torch.float32)
    assert pdl == (flag == "COMBINE_PDL")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        OP(*p.args(torch.bfloat16))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_lse = OP(*p.args(torch.bfloat16))
    g_out.fill_(float("nan"))
    g_lse.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check_close(g_out, g_lse, *reference_f64(p), what=f"{flag} H{heads} graph")


@pytest.mark.parametrize("batch,num_blocks,max_blocks", [(0, 8, 4), (2, 0, 4), (2, 8, 0)])
@pytest.mark.parametrize("heads", [16, 128])
def test_no_token_shapes(kernel, batch, num_blocks, max_blocks, heads):
    q = torch.randn(batch, heads, 576, device="cuda").bfloat16()
    kv = torch.randn(num_blocks, 64, 576, device="cuda").to(E4M3)
    bt = torch.zeros(batch, max_blocks, dtype=torch.int32, device="cuda")
    lens = torch.full((batch,), 100, dtype=torch.int32, device="cuda")  # past the capacity: clamped on CUDA
    out, lse = OP(q, kv, bt, lens, torch.ones(1, device="cuda"), None, 0.07, 512, torch.bfloat16)
    torch.cuda.synchronize()
    assert out.shape == (batch, heads, 512) and bool((out == 0).all()) and bool((lse == float("-inf")).all())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("heads", [16, 128])
def test_inputs_on_a_non_current_gpu(kernel, heads):
    torch.cuda.set_device(0)
    p = make_problem([700, 0, 129], heads, 64, E4M3, seed=5, device="cuda:1")
    out, lse = OP(*p.args(torch.bfloat16))
    torch.cuda.synchronize(1)
    assert out.device == torch.device("cuda", 1)
    check_close(out, lse, *reference_f64(p), what=f"cuda:1 H{heads}")
