"""The compiled MLA decode step with DCP over NCCL: DeepSeek-V3 shapes, all fx_mla passes on.

One process a GPU. For each (interleave, context, batch): checks the output against DCP 1 on one GPU with the same
stored values (relative error, every rank), checks that every rank's CompileReport is identical, times the step
(fixed iteration count on every rank after a barrier, CUDA events: never do_bench around collectives), and reports
the query all-gather bytes with and without the quantize-before-gather pass and the KV tokens a GPU holds.

    python benchmarks/bench_dcp_step.py --world-size 4 [--contexts 32768,131072] [--batches 1,8,64]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fx_mla.launch import run_ranks  # noqa: E402
from fx_mla.mla import MLAConfig, MLADecode, local_count  # noqa: E402

HEADS, P, L, R, V = 128, 128, 512, 64, 128
ITERS = 20


def _request_latent(b, context, device):
    """Deterministic [context, 576] latent of request b (float32), the same on every rank."""
    g = torch.Generator(device=device).manual_seed(1234 + b)
    return torch.randn(context, L + R, generator=g, device=device) * 0.5


def _build_rank(cfg, rank, batch, context, device):
    """This rank's cache and block table, filled on the GPU request by request from the shared latents."""
    k_scale = torch.tensor(3.0 / 448, device=device)
    pos = torch.arange(context, device=device)
    mine = pos[(pos // cfg.interleave) % cfg.dcp_size == rank]
    local = local_count(context, cfg.dcp_size, rank, cfg.interleave)
    blocks = -(-local // cfg.block_size)
    table = torch.randperm(batch * blocks, device=device).view(batch, blocks).to(torch.int32)
    cache = torch.zeros(batch * blocks, cfg.block_size, L + R, dtype=cfg.cache_dtype, device=device)
    flat = cache.view(-1, L + R)
    lpos = torch.arange(local, device=device)
    for b in range(batch):
        stored = (_request_latent(b, context, device)[mine] / k_scale).clamp(-448, 448).to(cfg.cache_dtype)
        flat[table[b].long()[lpos // cfg.block_size] * cfg.block_size + lpos % cfg.block_size] = stored
    return cache, table, k_scale


def _weights(device):
    g = torch.Generator(device=device).manual_seed(99)
    return (torch.randn(HEADS, P, L, generator=g, device=device) / P ** 0.5,
            torch.randn(HEADS, L, V, generator=g, device=device) / L ** 0.5)


def _inputs(cfg, rank, batch, context, device):
    g = torch.Generator(device=device).manual_seed(7 + batch)
    q_nope = torch.randn(batch, HEADS, P, generator=g, device=device).to(cfg.dtype)
    q_pe = torch.randn(batch, HEADS, R, generator=g, device=device).to(cfg.dtype)
    heads = slice(rank * cfg.local_heads, (rank + 1) * cfg.local_heads)
    cache, table, k_scale = _build_rank(cfg, rank, batch, context, device)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    # clone: a view of rank r's heads has a rank-dependent storage offset, which dynamo would make a symbol
    return (q_nope[:, heads].clone(), q_pe[:, heads].clone(), cache, table, seq_lens, k_scale,
            torch.tensor(0.05, device=device))


def _timed(fn, args, dist_barrier):
    for _ in range(10):
        fn(*args)
    if args[0].device.type != "cuda":   # --cpu-smoke: checks the script's logic, times nothing
        return float("nan")
    torch.cuda.synchronize()
    dist_barrier()
    times = []
    for _ in range(ITERS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _q_gather_bytes(report_text, batch, world_size):
    """Bytes this rank receives in the query all-gather, from the dtype the compiled graph gathers."""
    for line in report_text.splitlines():
        if "all_gather_into_tensor.default" in line and "576" in line:
            dtype = re.search(r"= *(\w+)\[", line) or re.search(r": *(\w+)\[", line)
            size = {"bf16": 2, "f16": 2, "f32": 4, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1}[dtype.group(1)]
            return batch * HEADS * (L + R) * size * (world_size - 1) // world_size
    return 0


def _rank_main(rank, world_size, cases, cpu=False):
    import torch._inductor.config
    import torch.distributed as dist
    import torch.fx.experimental._config

    warnings.filterwarnings("ignore")
    torch._inductor.config.fx_graph_cache = False   # a rank served from the cache would print no graphs
    # Duck sizing gives equal sizes one symbol, and which sizes coincide differs by rank (block counts): keep every
    # size its own symbol so all ranks capture the same graph (README: "DCP and identical graphs").
    torch.fx.experimental._config.use_duck_shape = False
    device = torch.device("cpu" if cpu else f"cuda:{rank}")
    w_uk, w_uv = _weights(device)
    rows = {case: dict(interleave=case[0], context=case[1], batch=case[2]) for case in cases}
    labels = (("all_passes", None), ("no_quant_before_gather", ("cache_gather", "decode_attention")))
    for interleave in sorted({c[0] for c in cases}):
        cfg = MLAConfig.deepseek_v3(kv_cache_dtype="fp8", quantize_query=True, dcp_size=world_size,
                                    interleave=interleave, block_size=64)
        module = MLADecode.from_full_weights(cfg, w_uk, w_uv, rank).to(device)
        for label, passes in labels:
            # One compile serves every batch and context (dynamic shapes); reports come from that compile.
            torch._dynamo.reset()
            reports = []
            fn = torch.compile(module, backend="fx_mla", dynamic=True,
                               options={"report": reports, **({} if passes is None else {"passes": passes})})
            for case in [c for c in cases if c[0] == interleave]:
                args = _inputs(cfg, rank, case[2], case[1], device)
                row = rows[case]
                with torch.no_grad():
                    out = fn(*args)
                    row[f"{label}_ms"] = _timed(fn, args, dist.barrier)
                # The device line names this rank's GPU; everything else must be identical on every rank.
                text = re.sub(r"cuda:\d+", "cuda", "\n".join(line for r in reports for line in r.format().splitlines()
                                                        if not line.startswith("inner compiler:")))
                row[f"{label}_q_gather_bytes"] = _q_gather_bytes(reports[-1].graph_after, case[2], world_size)
                row[f"{label}_report_hash"] = hashlib.sha256(text.encode()).hexdigest()
                row[f"{label}_compiles"] = len(reports)
                if label == "all_passes":
                    row["out"] = out.float().cpu()
                    row["report_summary"] = [r.format(graphs=False) for r in reports]
                    row["rewrites"] = sorted({m.pass_name for r in reports for m in r.matches})
                    free = torch.cuda.mem_get_info(device)[0] if not cpu else 0
                    row["kv_tokens_per_gpu"] = int((free + args[2].numel()) // (L + R))
                del args
                torch.cuda.empty_cache()
    return [rows[c] for c in cases]


def _dcp1_out(interleave, context, batch, cpu=False):
    cfg = MLAConfig.deepseek_v3(kv_cache_dtype="fp8", quantize_query=True, block_size=64)
    device = torch.device("cpu" if cpu else "cuda:0")
    w_uk, w_uv = _weights(device)
    module = MLADecode.from_full_weights(cfg, w_uk, w_uv, 0).to(device)
    with torch.no_grad():
        return module(*_inputs(cfg, 0, batch, context, device)).float().cpu()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=torch.cuda.device_count())
    parser.add_argument("--interleaves", default="1,64")
    parser.add_argument("--contexts", default="32768,131072")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--check-max-tokens", type=int, default=8 * 131072,
                        help="check against DCP 1 when batch*context is at most this (memory of one GPU)")
    parser.add_argument("--cpu-smoke", action="store_true", help="gloo on CPU, logic only (no timing)")
    parser.add_argument("--out", default="benchmarks/results/dcp_step.json")
    a = parser.parse_args()
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    cases = [(i, c, b) for i in ints(a.interleaves) for c in ints(a.contexts) for b in ints(a.batches)]
    per_rank = run_ranks(_rank_main, a.world_size, cases, a.cpu_smoke, backend="gloo" if a.cpu_smoke else "nccl",
                         timeout=580)
    card = "cpu" if a.cpu_smoke else torch.cuda.get_device_name(0)
    print(f"DCP {a.world_size} decode step, DeepSeek-V3 shapes (128 heads, L=512, R=64), fp8 e4m3 cache, FP8 query, "
          f"backend fx_mla; {card}, torch {torch.__version__}")
    print(f"{'I':>3} {'context':>8} {'B':>4} {'step ms':>8} {'no-qbg ms':>10} {'q bytes':>10} {'q bytes no-qbg':>15} "
          f"{'rel err vs DCP1':>16} {'reports equal':>14} {'KV tok/GPU x N':>15}")
    results = []
    for k, (interleave, context, batch) in enumerate(cases):
        rows = [per_rank[r][k] for r in range(a.world_size)]
        err = None
        if batch * context <= a.check_max_tokens:
            ref = _dcp1_out(interleave, context, batch, a.cpu_smoke)
            got = torch.cat([r.pop("out") for r in rows], dim=1)
            err = float((got - ref).norm() / ref.norm())
        else:
            for r in rows:
                r.pop("out")
        equal = len({r["all_passes_report_hash"] for r in rows}) == 1
        row = dict(rows[0], step_ms_max_rank=max(r["all_passes_ms"] for r in rows), rel_err_vs_dcp1=err,
                   reports_equal_on_all_ranks=equal, world_size=a.world_size,
                   kv_tokens_group=min(r["kv_tokens_per_gpu"] for r in rows) * a.world_size)
        for key in ("all_passes_report_hash", "no_quant_before_gather_report_hash"):
            row.pop(key)
        results.append(row)
        print(f"{interleave:>3} {context:>8} {batch:>4} {row['step_ms_max_rank']:>8.3f} "
              f"{row['no_quant_before_gather_ms']:>10.3f} {row['all_passes_q_gather_bytes']:>10} "
              f"{row['no_quant_before_gather_q_gather_bytes']:>15} "
              f"{'-' if err is None else f'{err:.2e}':>16} {str(equal):>14} {row['kv_tokens_group']:>15}")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(dict(device=card, torch=torch.__version__, world_size=a.world_size,
                       rows=results), f, indent=1)


if __name__ == "__main__":
    main()
