"""Shared pieces of the backend / inspect / CLI tests: a small decode step, tiny test passes, a fake DCP group."""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Sequence

import torch
import torch.distributed as dist

import fx_mla.passes as fx_passes
from fx_mla.mla import MLAConfig, MLADecode, fill_paged_cache

aten = torch.ops.aten

# Static dims of SMALL: heads 4 (2 a rank at DCP 2), L 32, P 16, R 8, V 16, block 4, entry 40. Sizes that become
# symbolic (batch, blocks) must avoid these values when a graph is captured, or duck sizing ties them together.
SMALL = dict(num_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, block_size=4)


def small_config(dcp_size: int = 1, **overrides) -> MLAConfig:
    return MLAConfig(**{**SMALL, "kv_cache_dtype": "fp8", "quantize_query": True, "dcp_size": dcp_size,
                        **overrides})


def decode_step(cfg: MLAConfig, seq_lens: Sequence[int], seed: int = 0, rank: int = 0):
    """(module, args) of one rank's decode step on fresh random data (never zeros)."""
    g = torch.Generator().manual_seed(seed)
    h, p, l, v, r = cfg.num_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank, cfg.v_head_dim, cfg.qk_rope_head_dim
    module = MLADecode.from_full_weights(cfg, torch.randn(h, p, l, generator=g) / p ** 0.5,
                                         torch.randn(h, l, v, generator=g) / l ** 0.5, rank)
    k_scale = torch.tensor(3.0 / 448)
    cache, table = fill_paged_cache(cfg, [torch.randn(s, l + r, generator=g) for s in seq_lens], k_scale, rank=rank,
                                    generator=g)
    b, hl = len(seq_lens), cfg.local_heads
    args = (torch.randn(b, hl, p, generator=g).to(cfg.dtype), torch.randn(b, hl, r, generator=g).to(cfg.dtype),
            cache, table, torch.tensor(seq_lens, dtype=torch.int32), k_scale, torch.tensor(0.05))
    return module, args


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


class DeclineMul:
    """Test pass: declines every aten.mul.Tensor, with a reason."""
    name = "test_decline_mul"

    def run(self, graph: torch.fx.Graph, ctx) -> None:
        for node in graph.nodes:
            if node.target is aten.mul.Tensor:
                ctx.declined(self.name, node, "test pass: declines every aten.mul")


class MulByTwoToAdd:
    """Test pass: rewrites ``mul(x, 2)`` into ``add(x, x)`` (bitwise the same); leaves meta['val'] to the manager."""
    name = "test_mul_by_two"

    def run(self, graph: torch.fx.Graph, ctx) -> None:
        for node in list(graph.nodes):
            if node.target is aten.mul.Tensor and len(node.args) == 2 and node.args[1] == 2:
                x = node.args[0]
                with graph.inserting_before(node):
                    add = graph.call_function(aten.add.Tensor, (x, x))
                node.replace_all_uses_with(add)
                ctx.matched(self.name, [node, add], "mul(x, 2) -> add(x, x)")
                graph.erase_node(node)


class RecordContext:
    """Test pass: remembers the ctx it saw."""
    name = "test_record_ctx"

    def __init__(self):
        self.seen = []

    def run(self, graph, ctx) -> None:
        self.seen.append((ctx.device, ctx.capability, ctx.options))


@contextlib.contextmanager
def registered(*passes):
    """Register test passes for the duration of a test."""
    for p in passes:
        fx_passes.register_pass(p.name, p)
    try:
        yield
    finally:
        for p in passes:
            fx_passes.unregister_pass(p.name)


@contextlib.contextmanager
def fake_dcp_group(world_size: int = 2):
    """A fake (no-communication) default process group so one process traces a DCP rank's graph."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    elif dist.get_world_size() != world_size:
        raise RuntimeError(f"a process group of world size {dist.get_world_size()} is already initialised")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*_functional_collectives.*deprecated", category=FutureWarning)
            yield
    finally:
        if owned:
            dist.destroy_process_group()


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list = []

    def emit(self, record):
        self.records.append(record)


@contextlib.contextmanager
def fx_mla_logs(level=logging.DEBUG):
    """Records logged on the "fx_mla" logger (without pytest's logging plugin)."""
    logger, handler = logging.getLogger("fx_mla"), _ListHandler()
    old = logger.level
    logger.setLevel(level)
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
