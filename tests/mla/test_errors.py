"""Bad input is a clear error naming the argument, raised before any gather reads the cache."""
import pytest
import torch

from fx_mla.mla import ContextGather, MLAConfig

from .problems import context_inputs, make_problem, rank_inputs


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_size=64, interleave=48), "interleave"),
    (dict(num_heads=6, dcp_size=4), "num_heads"),
    (dict(kv_cache_dtype="int8"), "kv_cache_dtype"),
    (dict(block_size=0), "block_size"),
    (dict(dtype=torch.int32), "dtype"),
])
def test_config_rejects_bad_combination(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MLAConfig(**{"num_heads": 16, **kwargs})


def _decode(cfg=None, lens=(5, 40)):
    cfg = cfg or MLAConfig.deepseek_v2_lite(kv_cache_dtype="fp8", block_size=16)
    return rank_inputs(make_problem(cfg, list(lens)), 0)



def test_block_id_out_of_range():
    module, args = _decode()
    table = args[3].clone()
    table[1, 2] = args[2].shape[0] + 5
    with pytest.raises(ValueError, match=r"block_table\[1, 2\]"):
        module(*args[:3], table, *args[4:])


def test_seq_len_past_pages():
    module, args = _decode()
    lens = args[4].clone()
    lens[0] = args[3].shape[1] * 16 + 1
    with pytest.raises(ValueError, match=r"seq_lens\[0\]"):
        module(*args[:4], lens, *args[5:])


@pytest.mark.parametrize("index,value,match", [
    (0, lambda a: a.float(), "q_nope"),
    (2, lambda a: a.view(torch.uint8), "kv_cache"),
    (3, lambda a: a.long(), "block_table"),
    (4, lambda a: a.float(), "seq_lens"),
    (5, lambda a: a.double(), "k_scale"),
    (5, lambda a: a.repeat(2), "k_scale"),
    (1, lambda a: a[:, :, :32], "q_pe"),
])
def test_wrong_dtype_or_shape(index, value, match):
    module, args = _decode()
    args = list(args)
    args[index] = value(args[index])
    with pytest.raises((TypeError, ValueError), match=match):
        module(*args)


def test_wrong_device():
    module, args = _decode()
    args = list(args)
    args[3] = args[3].to("meta")
    with pytest.raises(ValueError, match="block_table must be on cpu"):
        module(*args)


def test_missing_q_scale():
    module, args = _decode(MLAConfig.deepseek_v2_lite(kv_cache_dtype="fp8", quantize_query=True))
    with pytest.raises(ValueError, match="q_scale"):
        module(*args[:6], None)


def test_context_position_past_pages():
    cfg = MLAConfig.deepseek_v2_lite(kv_cache_dtype="fp8", block_size=16)
    lat = [torch.randn(20, 576), torch.randn(5, 576)]
    cache, table, cu, tts, ss, ks, _ = context_inputs(cfg, lat, [20, 5], [0, 0], torch.tensor(0.01), 0)
    ss = ss.clone()
    ss[1] = 30   # request 1 holds one page of 16 positions
    with pytest.raises(ValueError, match="request 1"):
        ContextGather(cfg)(cache, table, cu, tts, ss, ks)
    table = table.clone()
    table[0, 1] = -1
    with pytest.raises(ValueError, match=r"block_table\[0, 1\]"):
        ContextGather(cfg)(cache, table, cu, tts, None, ks)
