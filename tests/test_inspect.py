"""fx_mla.inspect and the stable printer: snapshots (EXPECTTEST_ACCEPT=1 pytest tests/test_inspect.py updates them)."""
from __future__ import annotations

import expecttest
import pytest
import torch

import fx_mla
from fx_mla.report import count_ops

from .backend_helpers import DeclineMul, MulByTwoToAdd, decode_step, fake_dcp_group, registered, small_config

# rank 0 of DCP 2 holds 19, 5, 11 tokens: block-table width 5, 11 blocks; batch 3. None equals a static dim.
DCP2_SEQ_LENS = [37, 9, 21]


def _tiny(x, y):
    return (x * y + 1).sum(dim=-1) * 2


def _dcp2_report(inner: str = "eager") -> fx_mla.CompileReport:
    module, args = decode_step(small_config(dcp_size=2), DCP2_SEQ_LENS)
    with fake_dcp_group(2):
        return fx_mla.inspect(module, *args, options={"passes": [], "inner": inner})


class TestSnapshots(expecttest.TestCase):
    def test_dcp2_decode_step_graph_as_passes_see_it(self):
        report = _dcp2_report()
        self.assertExpectedInline(report.graph_before, """\
%s0: Sym(s0) = input
%q_nope: bf16[s0, 2, 16] = input
%q_pe: bf16[s0, 2, 8] = input
%s1: Sym(s1) = input
%kv_cache: f8e4m3fn[s1, 4, 40] = input
%k_scale: f32[] = input
%s2: Sym(s2) = input
%block_table: i32[s0, s2] = input
%seq_lens: i32[s0] = input
%q_scale: f32[] = input
%self.w_uk: bf16[2, 16, 32] = input
%self.dcp_rank: i64[] = input
%self.w_uv: bf16[2, 32, 16] = input
%unsqueeze: bf16[s0, 2, 16, 1] = aten.unsqueeze.default(%q_nope, 3)
%permute: bf16[s0, 2, 1, 16] = aten.permute.default(%unsqueeze, [0, 1, 3, 2])
%permute_1: bf16[2, s0, 16, 1] = aten.permute.default(%permute, [1, 0, 3, 2])
%reshape: bf16[2, s0, 16] = aten.reshape.default(%permute_1, [2, %s0, 16])
%unsqueeze_1: bf16[2, 16, 32, 1] = aten.unsqueeze.default(%self.w_uk, 3)
%reshape_1: bf16[2, 16, 32] = aten.reshape.default(%unsqueeze_1, [2, 16, 32])
%bmm: bf16[2, s0, 32] = aten.bmm.default(%reshape, %reshape_1)
%reshape_2: bf16[2, s0, 1, 32] = aten.reshape.default(%bmm, [2, %s0, 1, 32])
%permute_2: bf16[s0, 2, 32, 1] = aten.permute.default(%reshape_2, [1, 0, 3, 2])
%reshape_3: bf16[s0, 2, 32] = aten.reshape.default(%permute_2, [%s0, 2, 32])
%cat: bf16[s0, 2, 40] = aten.cat.default([%reshape_3, %q_pe], -1)
%all_gather_into_tensor: bf16[2*s0, 2, 40] = _c10d_functional.all_gather_into_tensor.default(%cat, 2, '0')
%wait_tensor: bf16[2*s0, 2, 40] = _c10d_functional.wait_tensor.default(%all_gather_into_tensor)
%split: (bf16[s0, 2, 40], bf16[s0, 2, 40]) = aten.split.Tensor(%wait_tensor, %s0)
%getitem: bf16[s0, 2, 40] = getitem(%split, 0)
%getitem_1: bf16[s0, 2, 40] = getitem(%split, 1)
%mul: Sym(4*s2) = operator.mul(4, %s2)
%iota: i64[4*s2] = prims.iota.default(%mul, start=0, step=1, dtype=i64, device=cpu, requires_grad=False)
%unsqueeze_2: i64[1, 4*s2] = aten.unsqueeze.default(%iota, 0)
%div: i32[s0] = aten.div.Tensor_mode(%seq_lens, 2, rounding_mode='floor')
%mul_1: i32[s0] = aten.mul.Tensor(%div, 1)
%mul_2: i32[s0] = aten.mul.Tensor(%mul_1, 2)
%sub: i32[s0] = aten.sub.Tensor(%seq_lens, %mul_2)
%mul_3: i64[] = aten.mul.Tensor(%self.dcp_rank, 1)
%sub_1: i32[s0] = aten.sub.Tensor(%sub, %mul_3)
%clamp_min: i32[s0] = aten.clamp_min.default(%sub_1, 0)
%clamp_max: i32[s0] = aten.clamp_max.default(%clamp_min, 1)
%add: i32[s0] = aten.add.Tensor(%mul_1, %clamp_max)
%unsqueeze_3: i32[s0, 1] = aten.unsqueeze.default(%add, 1)
%lt: b8[s0, 4*s2] = aten.lt.Tensor(%unsqueeze_2, %unsqueeze_3)
%unsqueeze_4: b8[s0, 1, 4*s2] = aten.unsqueeze.default(%lt, 1)
%bitwise_not: b8[s0, 1, 4*s2] = aten.bitwise_not.default(%unsqueeze_4)
%full: f32[] = aten.full.default([], -inf, dtype=f32, layout=strided, device=cpu, pin_memory=False)
%cat_1: bf16[s0, 4, 40] = aten.cat.default([%getitem, %getitem_1], 1)
%div_1: bf16[s0, 4, 40] = aten.div.Tensor(%cat_1, %q_scale)
%convert_element_type: f32[s0, 4, 40] = prims.convert_element_type.default(%div_1, f32)
%clamp_min_1: f32[s0, 4, 40] = aten.clamp_min.default(%convert_element_type, -448.0)
%clamp_max_1: f32[s0, 4, 40] = aten.clamp_max.default(%clamp_min_1, 448.0)
%convert_element_type_1: bf16[s0, 4, 40] = prims.convert_element_type.default(%clamp_max_1, bf16)
%convert_element_type_2: f8e4m3fn[s0, 4, 40] = prims.convert_element_type.default(%convert_element_type_1, f8e4m3fn)
%convert_element_type_3: bf16[s0, 4, 40] = prims.convert_element_type.default(%convert_element_type_2, bf16)
%mul_4: bf16[s0, 4, 40] = aten.mul.Tensor(%convert_element_type_3, %q_scale)
%expand: bf16[s0, 4, 40] = aten.expand.default(%mul_4, [%s0, 4, 40])
%index: f8e4m3fn[s0, s2, 4, 40] = aten.index.Tensor(%kv_cache, [%block_table])
%reshape_4: f8e4m3fn[s0, 4*s2, 40] = aten.reshape.default(%index, [%s0, -1, 40])
%convert_element_type_4: bf16[s0, 4*s2, 40] = prims.convert_element_type.default(%reshape_4, bf16)
%mul_5: bf16[s0, 4*s2, 40] = aten.mul.Tensor(%convert_element_type_4, %k_scale)
%permute_3: bf16[s0, 40, 4*s2] = aten.permute.default(%mul_5, [0, 2, 1])
%sym_size: Sym(4*s2) = aten.sym_size.int(%reshape_4, 1)
%expand_1: bf16[s0, 40, 4*s2] = aten.expand.default(%permute_3, [%s0, 40, %sym_size])
%bmm_1: bf16[s0, 4, 4*s2] = aten.bmm.default(%expand, %expand_1)
%convert_element_type_5: f32[s0, 4, 4*s2] = prims.convert_element_type.default(%bmm_1, f32)
%mul_6: f32[s0, 4, 4*s2] = aten.mul.Tensor(%convert_element_type_5, 0.20412414523193154)
%where: f32[s0, 4, 4*s2] = aten.where.self(%bitwise_not, %full, %mul_6)
%amax: f32[s0, 4, 1] = aten.amax.default(%where, [-1], True)
%abs: f32[s0, 4, 1] = aten.abs.default(%amax)
%eq: b8[s0, 4, 1] = aten.eq.Scalar(%abs, inf)
%full_1: f32[] = aten.full.default([], 0.0, dtype=f32, layout=strided, device=cpu, pin_memory=False)
%where_1: f32[s0, 4, 1] = aten.where.self(%eq, %full_1, %amax)
%sub_2: f32[s0, 4, 4*s2] = aten.sub.Tensor(%where, %where_1)
%exp: f32[s0, 4, 4*s2] = aten.exp.default(%sub_2)
%sum: f32[s0, 4] = aten.sum.dim_IntList(%exp, [-1])
%log: f32[s0, 4] = aten.log.default(%sum)
%squeeze: f32[s0, 4] = aten.squeeze.dims(%where_1, [-1])
%add_1: f32[s0, 4] = aten.add.Tensor(%log, %squeeze)
%all_gather_into_tensor_1: f32[2*s0, 4] = _c10d_functional.all_gather_into_tensor.default(%add_1, 2, '0')
%isinf: b8[s0, 4] = aten.isinf.default(%add_1)
%full_2: f32[s0, 4] = aten.full.default([%s0, 4], 0, dtype=f32, layout=strided, device=cpu, pin_memory=False)
%where_2: f32[s0, 4] = aten.where.self(%isinf, %full_2, %add_1)
%unsqueeze_5: f32[s0, 4, 1] = aten.unsqueeze.default(%where_2, 2)
%sub_3: f32[s0, 4, 4*s2] = aten.sub.Tensor(%where, %unsqueeze_5)
%exp_1: f32[s0, 4, 4*s2] = aten.exp.default(%sub_3)
%convert_element_type_6: bf16[s0, 4, 4*s2] = prims.convert_element_type.default(%exp_1, bf16)
%expand_2: bf16[s0, 4, 4*s2] = aten.expand.default(%convert_element_type_6, [%s0, 4, %mul])
%slice: bf16[s0, 4*s2, 32] = aten.slice.Tensor(%mul_5, 2, 0, 32)
%expand_3: bf16[s0, 4*s2, 32] = aten.expand.default(%slice, [%s0, %sym_size, 32])
%bmm_2: bf16[s0, 4, 32] = aten.bmm.default(%expand_2, %expand_3)
%convert_element_type_7: f32[s0, 4, 32] = prims.convert_element_type.default(%bmm_2, f32)
%wait_tensor_1: f32[2*s0, 4] = _c10d_functional.wait_tensor.default(%all_gather_into_tensor_1)
%reshape_5: f32[2, s0, 4] = aten.reshape.default(%wait_tensor_1, [2, %s0, 4])
%amax_1: f32[1, s0, 4] = aten.amax.default(%reshape_5, [0], True)
%abs_1: f32[1, s0, 4] = aten.abs.default(%amax_1)
%eq_1: b8[1, s0, 4] = aten.eq.Scalar(%abs_1, inf)
%full_3: f32[] = aten.full.default([], 0.0, dtype=f32, layout=strided, device=cpu, pin_memory=False)
%where_3: f32[1, s0, 4] = aten.where.self(%eq_1, %full_3, %amax_1)
%sub_4: f32[2, s0, 4] = aten.sub.Tensor(%reshape_5, %where_3)
%exp_2: f32[2, s0, 4] = aten.exp.default(%sub_4)
%sum_1: f32[s0, 4] = aten.sum.dim_IntList(%exp_2, [0])
%log_1: f32[s0, 4] = aten.log.default(%sum_1)
%squeeze_1: f32[s0, 4] = aten.squeeze.dims(%where_3, [0])
%add_2: f32[s0, 4] = aten.add.Tensor(%log_1, %squeeze_1)
%isinf_1: b8[s0, 4] = aten.isinf.default(%add_2)
%full_4: f32[s0, 4] = aten.full.default([%s0, 4], 0, dtype=f32, layout=strided, device=cpu, pin_memory=False)
%where_4: f32[s0, 4] = aten.where.self(%isinf_1, %full_4, %add_2)
%sub_5: f32[s0, 4] = aten.sub.Tensor(%add_1, %where_4)
%exp_3: f32[s0, 4] = aten.exp.default(%sub_5)
%unsqueeze_6: f32[s0, 4, 1] = aten.unsqueeze.default(%exp_3, 2)
%mul_7: f32[s0, 4, 32] = aten.mul.Tensor(%convert_element_type_7, %unsqueeze_6)
%convert_element_type_8: bf16[s0, 4, 32] = prims.convert_element_type.default(%mul_7, bf16)
%split_1: (bf16[s0, 2, 32], bf16[s0, 2, 32]) = aten.split.Tensor(%convert_element_type_8, 2, 1)
%getitem_2: bf16[s0, 2, 32] = getitem(%split_1, 0)
%getitem_3: bf16[s0, 2, 32] = getitem(%split_1, 1)
%cat_2: bf16[2*s0, 2, 32] = aten.cat.default([%getitem_2, %getitem_3])
%reduce_scatter_tensor: bf16[s0, 2, 32] = _c10d_functional.reduce_scatter_tensor.default(%cat_2, 'sum', 2, '0')
%wait_tensor_2: bf16[s0, 2, 32] = _c10d_functional.wait_tensor.default(%reduce_scatter_tensor)
%unsqueeze_7: bf16[s0, 2, 32, 1] = aten.unsqueeze.default(%wait_tensor_2, 3)
%permute_4: bf16[s0, 2, 1, 32] = aten.permute.default(%unsqueeze_7, [0, 1, 3, 2])
%permute_5: bf16[2, s0, 32, 1] = aten.permute.default(%permute_4, [1, 0, 3, 2])
%reshape_6: bf16[2, s0, 32] = aten.reshape.default(%permute_5, [2, %s0, 32])
%unsqueeze_8: bf16[2, 32, 16, 1] = aten.unsqueeze.default(%self.w_uv, 3)
%reshape_7: bf16[2, 32, 16] = aten.reshape.default(%unsqueeze_8, [2, 32, 16])
%bmm_3: bf16[2, s0, 16] = aten.bmm.default(%reshape_6, %reshape_7)
%reshape_8: bf16[2, s0, 1, 16] = aten.reshape.default(%bmm_3, [2, %s0, 1, 16])
%permute_6: bf16[s0, 2, 16, 1] = aten.permute.default(%reshape_8, [1, 0, 3, 2])
%reshape_9: bf16[s0, 2, 16] = aten.reshape.default(%permute_6, [%s0, 2, 16])
return (%reshape_9,)""")
        self.assertFalse(report.changed)

    def test_report_with_a_rewrite_and_a_declined_match(self):
        with registered(MulByTwoToAdd(), DeclineMul()):
            report = fx_mla.inspect(_tiny, torch.randn(3, 5), torch.randn(3, 5),
                                    options={"passes": ["test_mul_by_two", "test_decline_mul"], "inner": "eager"})
        self.assertExpectedInline(str(report), """\
fx_mla compile report
inner compiler: eager; device: cpu (compute capability none)
passes: test_mul_by_two, test_decline_mul
pass test_mul_by_two: 1 rewritten, 0 declined
  rewrote %mul_1, %add_1: mul(x, 2) -> add(x, x)
pass test_decline_mul: 0 rewritten, 1 declined
  declined %mul: test pass: declines every aten.mul
graph before passes (8 nodes):
  %s0: Sym(s0) = input
  %s1: Sym(s1) = input
  %x: f32[s0, s1] = input
  %y: f32[s0, s1] = input
  %mul: f32[s0, s1] = aten.mul.Tensor(%x, %y)
  %add: f32[s0, s1] = aten.add.Tensor(%mul, 1)
  %sum: f32[s0] = aten.sum.dim_IntList(%add, [-1])
  %mul_1: f32[s0] = aten.mul.Tensor(%sum, 2)
  return (%mul_1,)
graph after passes (8 nodes):
  %s0: Sym(s0) = input
  %s1: Sym(s1) = input
  %x: f32[s0, s1] = input
  %y: f32[s0, s1] = input
  %mul: f32[s0, s1] = aten.mul.Tensor(%x, %y)
  %add: f32[s0, s1] = aten.add.Tensor(%mul, 1)
  %sum: f32[s0] = aten.sum.dim_IntList(%add, [-1])
  %add_1: f32[s0] = aten.add.Tensor(%sum, %sum)
  return (%add_1,)""")


def test_eager_and_inductor_inner_compilers_show_passes_the_same_graph():
    eager, inductor = _dcp2_report("eager"), _dcp2_report("inductor")
    assert eager.inner == "eager" and inductor.inner == "inductor"
    assert eager.graph_before == inductor.graph_before
    ops = count_ops(eager.graph_before)
    assert ops["_c10d_functional.all_gather_into_tensor.default"] == 2  # query heads and LSEs
    assert ops["_c10d_functional.reduce_scatter_tensor.default"] == 1


def test_printout_is_stable_across_compiles():
    x, y = torch.randn(3, 5), torch.randn(3, 5)
    first = fx_mla.inspect(_tiny, x, y, options={"passes": [], "inner": "eager"})
    torch._dynamo.reset()
    second = fx_mla.inspect(_tiny, torch.randn(4, 6), torch.randn(4, 6), options={"passes": [], "inner": "eager"})
    assert str(first) == str(second)
    assert "0x" not in str(first) and ".py" not in str(first)


def test_not_traceable_is_a_clear_error():
    def breaks(x):
        y = x + 1
        torch._dynamo.graph_break()
        return y * 2

    with pytest.raises(fx_mla.NotTraceableError, match="fx_mla cannot capture .*breaks as one graph"):
        fx_mla.inspect(breaks, torch.randn(3))


def test_inspect_errors_are_unwrapped():
    with pytest.raises(TypeError, match="fn must be a function or module"):
        fx_mla.inspect(3, torch.randn(3))
    with pytest.raises(ValueError, match="unknown pass 'nope'"):
        fx_mla.inspect(_tiny, torch.randn(3, 5), torch.randn(3, 5), options={"passes": ["nope"]})
