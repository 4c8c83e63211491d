"""``python -m fx_mla``: ``demo`` (one DCP decode step, eager vs compiled) and ``explain`` (what the passes did)."""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Optional, Sequence

EXPLAIN_HELP = """Print fx_mla's CompileReport for one decode step of the demo model: the graph the passes see
(Inductor's post-grad ATen form, symbolic batch size), each rewrite, each declined match with its reason, and
the graph after the passes. The model is MLAConfig.deepseek_v2_lite(block_size=16) with a paged cache, traced
on CPU as rank 0 of a DCP group through a fake process group (one process, no communication)."""


def _explain_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fx_mla explain", description=EXPLAIN_HELP)
    p.add_argument("--passes", default=None,
                   help="comma-separated pass names to run, in order ('' for none; default: every available pass)")
    p.add_argument("--inner", default="inductor", choices=["inductor", "eager"],
                   help="inner compiler for the rest of the graph (default inductor; eager is faster on CPU)")
    p.add_argument("--kv-cache-dtype", default="fp8", choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"],
                   help="KV-cache storage dtype (default fp8 = e4m3)")
    p.add_argument("--heads", type=int, default=16, help="query heads of the whole DCP group (default 16, V2-Lite)")
    p.add_argument("--dcp", type=int, default=2, help="decode context parallel size (default 2)")
    p.add_argument("--batch", type=int, default=4, help="requests in the decode step (default 4)")
    p.add_argument("--no-quantize-query", action="store_true", help="keep the query in bf16 (default: static FP8)")
    p.add_argument("--strict", action="store_true", help="fail if a pass declines a match")
    p.add_argument("--no-graphs", action="store_true", help="print the decisions only, not the graphs")
    return p


def _demo_step(args: argparse.Namespace):
    """(module, inputs) of rank 0's decode step."""
    import torch

    from .mla import MLAConfig, MLADecode, fill_paged_cache

    cfg = MLAConfig.deepseek_v2_lite(num_heads=args.heads, kv_cache_dtype=args.kv_cache_dtype, dcp_size=args.dcp,
                                     quantize_query=not args.no_quantize_query, block_size=16)
    g = torch.Generator().manual_seed(0)
    h, p, l, v, r = cfg.num_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank, cfg.v_head_dim, cfg.qk_rope_head_dim
    module = MLADecode.from_full_weights(cfg, torch.randn(h, p, l, generator=g) / p ** 0.5,
                                         torch.randn(h, l, v, generator=g) / l ** 0.5, rank=0)
    seq_lens = [(37 * (b + 1)) % 200 + 1 for b in range(args.batch)]
    k_scale, q_scale = torch.tensor(3.0 / 448), torch.tensor(0.05)
    cache, table = fill_paged_cache(cfg, [torch.randn(s, l + r, generator=g) for s in seq_lens], k_scale,
                                    rank=0, generator=g)
    hl = cfg.local_heads
    inputs = (torch.randn(args.batch, hl, p, generator=g).to(cfg.dtype),
              torch.randn(args.batch, hl, r, generator=g).to(cfg.dtype), cache, table,
              torch.tensor(seq_lens, dtype=torch.int32), k_scale, q_scale)
    return module, inputs


def _fake_process_group(world_size: int) -> bool:
    """Initialise a fake (no-communication) default group for tracing; False if one already exists."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        return False
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    return True


def explain(argv: Optional[Sequence[str]] = None) -> int:
    args = _explain_parser().parse_args(argv)
    import torch.distributed as dist

    from . import inspect
    from .backend import FxMlaOptions

    passes = None if args.passes is None else tuple(p.strip() for p in args.passes.split(",") if p.strip())
    try:
        opts = FxMlaOptions(passes=passes, inner=args.inner, strict=args.strict)
        module, inputs = _demo_step(args)
    except (TypeError, ValueError) as e:
        print(f"python -m fx_mla explain: {e}", file=sys.stderr)
        return 2
    owned = _fake_process_group(args.dcp) if args.dcp > 1 else False
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*_functional_collectives.*deprecated", category=FutureWarning)
            report = inspect(module, *inputs, options=opts)
    finally:
        if owned:
            dist.destroy_process_group()
    print(f"# decode step: {args.heads} heads, DCP {args.dcp} (rank 0 of {args.dcp}), kv cache {args.kv_cache_dtype}, "
          f"query {'bf16' if args.no_quantize_query else 'static fp8'}, batch {args.batch} (symbolic)")
    print(report.format(graphs=not args.no_graphs))
    return 0


def demo(argv: Optional[Sequence[str]] = None) -> int:
    from . import demo as demo_module  # the lead's module; imported only when asked for

    return int(demo_module.main(list(argv) if argv is not None else None) or 0)


COMMANDS = {"demo": demo, "explain": explain}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m fx_mla", description="fx_mla command line.")
    parser.add_argument("command", choices=sorted(COMMANDS),
                        help="demo: one DCP 2 decode step, eager vs compiled, checked against float64; "
                             "explain: print what fx_mla's passes do to the demo decode step "
                             "(python -m fx_mla explain --help)")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv[:1])  # prints help or the usage error and exits
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
