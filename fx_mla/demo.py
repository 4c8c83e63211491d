"""`python -m fx_mla demo`: one DCP 2 MLA decode step, eager and compiled, checked against float64.

Two gloo processes on CPU, or NCCL with one GPU a rank when two GPUs are present.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.fx.experimental._config

from .launch import run_ranks
from .mla import MLAConfig, MLADecode, fill_paged_cache, reference_decode, stored_values

SEQ_LENS = [1, 37, 0, 300, 1000, 64]


def _problem(cfg: MLAConfig, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h, p, l, v, r = cfg.num_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank, cfg.v_head_dim, cfg.qk_rope_head_dim
    return dict(w_uk=torch.randn(h, p, l, generator=g) / p ** 0.5, w_uv=torch.randn(h, l, v, generator=g) / l ** 0.5,
                latents=[torch.randn(s, l + r, generator=g) for s in SEQ_LENS],
                q_nope=torch.randn(len(SEQ_LENS), h, p, generator=g).to(cfg.dtype),
                q_pe=torch.randn(len(SEQ_LENS), h, r, generator=g).to(cfg.dtype),
                k_scale=torch.tensor(3.0 / 448), q_scale=torch.tensor(0.05))


def _rank_step(rank: int, world_size: int, cfg_kwargs: dict, backend_names: list) -> dict:
    warnings.filterwarnings("ignore", message=".*_functional_collectives.*deprecated", category=FutureWarning)
    torch.fx.experimental._config.use_duck_shape = False  # same graph on every rank (see README)
    device = torch.device(f"cuda:{rank}") if torch.cuda.is_available() else torch.device("cpu")
    cfg = MLAConfig(**cfg_kwargs, dcp_size=world_size)
    pb = _problem(cfg)
    module = MLADecode.from_full_weights(cfg, pb["w_uk"], pb["w_uv"], rank).to(device)
    cache, table = fill_paged_cache(cfg, pb["latents"], pb["k_scale"], rank=rank, device=device,
                                    generator=torch.Generator().manual_seed(rank))
    heads = slice(rank * cfg.local_heads, (rank + 1) * cfg.local_heads)
    args = (pb["q_nope"][:, heads].to(device), pb["q_pe"][:, heads].to(device), cache, table,
            torch.tensor(SEQ_LENS, dtype=torch.int32, device=device), pb["k_scale"].to(device),
            pb["q_scale"].to(device))
    results = {}
    for name in ["eager"] + backend_names:
        fn = module if name == "eager" else torch.compile(module, backend=name, dynamic=True, fullgraph=True)
        with torch.no_grad():
            start = time.perf_counter()
            out = fn(*args)
            first = time.perf_counter() - start
            start = time.perf_counter()
            out = fn(*args)
            if device.type == "cuda":
                torch.cuda.synchronize()
            results[name] = dict(out=out.cpu(), first_s=first, step_s=time.perf_counter() - start)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fx_mla demo", description=__doc__)
    parser.add_argument("--kv-cache-dtype", default="fp8", help="auto, fp8 (e4m3) or fp8_e5m2 (default fp8)")
    parser.add_argument("--backends", default="inductor,fx_mla",
                        help="comma-separated torch.compile backends to run besides eager (default inductor,fx_mla)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*_functional_collectives.*deprecated", category=FutureWarning)
    backends = [b for b in args.backends.split(",") if b]
    cfg_kwargs = dict(num_heads=16, kv_cache_dtype=args.kv_cache_dtype, block_size=64, quantize_query=True)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    transport = "nccl" if gpus >= 2 else "gloo"
    per_rank = run_ranks(_rank_step, 2, cfg_kwargs, backends, backend=transport)

    cfg = MLAConfig(**cfg_kwargs)
    pb = _problem(cfg)
    ref, _ = reference_decode(cfg, pb["q_nope"], pb["q_pe"], pb["w_uk"].to(cfg.dtype), pb["w_uv"].to(cfg.dtype),
                              stored_values(cfg, pb["latents"], pb["k_scale"]), pb["q_scale"])
    print(f"fx_mla demo: MLA decode step, DeepSeek-V2-Lite shapes (16 heads, L=512, R=64), DCP 2 over {transport}, "
          f"kv cache {args.kv_cache_dtype}, FP8 query, batch {len(SEQ_LENS)} with lengths {SEQ_LENS}")
    print(f"{'path':<10} {'rel err vs float64':>19} {'max |diff| vs eager':>20} {'first call s':>13} {'step ms':>9}")
    ok = True
    eager = torch.cat([per_rank[r]["eager"]["out"] for r in range(2)], dim=1)
    for name in ["eager"] + backends:
        out = torch.cat([per_rank[r][name]["out"] for r in range(2)], dim=1)
        err = float((out.double() - ref).norm() / ref.norm())
        diff = float((out.float() - eager.float()).abs().max())
        first = max(per_rank[r][name]["first_s"] for r in range(2))
        step = max(per_rank[r][name]["step_s"] for r in range(2)) * 1e3
        ok &= err < 2e-2 and not out.isnan().any()
        print(f"{name:<10} {err:>19.2e} {diff:>20.3g} {first:>13.2f} {step:>9.2f}")
    print("check: relative error < 2e-2 on every path:", "PASS" if ok else "FAIL")
    return 0 if ok else 1
