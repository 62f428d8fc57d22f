"""Run a function on N gloo ranks on CPU (or NCCL ranks, one per GPU), bounded in time, and
collect each rank's arrays.

Processes come from a forkserver that imports torch and the checked modules once, so a run
costs a fork per rank instead of a fresh interpreter importing torch (seconds each on a
loaded 2-core CI machine). Ranks meet through a FileStore in a temporary directory: no port
to choose, so concurrent test runs cannot collide. A rank's exception fails the run with its
traceback; a hang is killed at ``timeout`` and fails it too. Each rank returns a dict of
numpy arrays, written with ``np.savez`` and read back with ``allow_pickle=False``.

Worker functions must be importable by module name (this package is
``tests.inference.parallel``: the repo root is on ``sys.path`` under pytest).
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PRELOAD = ["torch", "torch.distributed", "inference.parallel", "tests.inference.parallel.rank_checks", "tools.run_inference"]
COLLECTIVE_TIMEOUT = timedelta(seconds=60)


def _entry(rank: int, fn: Callable, world_size: int, root: str, backend: str, args: tuple) -> None:
    torch.set_num_threads(1)          # N ranks share 2 cores
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, store=dist.FileStore(os.path.join(root, "store"), world_size),
                            rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    try:
        arrays = fn(rank, world_size, *args)
        np.savez(os.path.join(root, f"rank{rank}.npz"), **arrays)
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., dict[str, np.ndarray]], world_size: int, *args, timeout: float = 90.0,
              backend: str = "gloo") -> list[dict[str, np.ndarray]]:
    """``fn(rank, world_size, *args)`` on ``world_size`` ranks (gloo on CPU; ``backend="nccl"``:
    rank r on GPU r); returns their dicts by rank."""
    multiprocessing.set_forkserver_preload(PRELOAD)
    with tempfile.TemporaryDirectory(prefix="gloo-ranks-") as root:
        ctx = mp.start_processes(_entry, args=(fn, world_size, root, backend, args), nprocs=world_size,
                                 join=False, start_method="forkserver")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size} gloo ranks still running after {timeout:.0f}s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
        results = []
        for rank in range(world_size):
            with np.load(Path(root) / f"rank{rank}.npz", allow_pickle=False) as data:
                results.append({k: data[k] for k in data.files})
        return results
