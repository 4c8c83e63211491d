"""Run a function on N local ranks (one process each): gloo on CPU, NCCL with one GPU a rank.

Used by the demo, the benchmarks and the multi-rank tests. ``fn(rank, world_size, *args)`` must be importable
(module level); its return value comes back to the caller, rank by rank. A rank that fails or hangs past
``timeout`` fails the whole run with the rank's traceback, and the other ranks are killed.
"""
from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback
from typing import Any, Callable, Sequence

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, backend: str, port: int, out_dir: str, fn: Callable,
               args: Sequence[Any]) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        result = ("ok", fn(rank, world_size, *args))
    except BaseException:  # report every failure, including SystemExit from a failed assertion helper
        result = ("error", traceback.format_exc())
    with open(path, "wb") as f:
        pickle.dump(result, f)
    if dist.is_initialized():
        dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args: Any, backend: str = "gloo", timeout: float = 600.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return the per-rank results."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        port = _free_port()
        procs = [ctx.Process(target=_rank_main, args=(r, world_size, backend, port, out_dir, fn, args))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results, errors = [], []
        for r in range(world_size):
            path = os.path.join(out_dir, f"rank{r}.pkl")
            if not os.path.exists(path):
                errors.append(f"rank {r}: {'hung past %.0f s' % timeout if r in hung else 'died without a result'}")
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                errors.append(f"rank {r}:\n{value}")
            results.append(value)
        if errors:
            raise RuntimeError("multi-rank run failed:\n" + "\n".join(errors))
        return results
