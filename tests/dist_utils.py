"""Run a function on N real processes (gloo, CPU) with a hard deadline.

``run_workers(fn, world, *args, timeout_s=...)`` spawns ``world`` processes, each calling
``fn(rank, world, *args)`` after ``init_process_group`` (gloo, env://); returns the list of
``fn``'s return values (rank order). If a process exits non-zero, or the deadline passes (all
processes are then killed), it raises with every rank's exit code, so a hang fails fast.

``fn`` must be a module-level function of an importable module (spawn pickles it by name).
"""
from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world: int, port: int, out_dir: str, coll_timeout_s: float, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=coll_timeout_s))
    try:
        result = fn(rank, world, *args)
    except BaseException:
        traceback.print_exc()
        os._exit(1)  # do not wait for peers in destroy_process_group
    Path(out_dir, f"{rank}.pkl").write_bytes(pickle.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def spawn_workers(fn, world: int, *args, timeout_s: float, coll_timeout_s: float, out_dir: str
                  ) -> tuple[list[int], list[int], float]:
    """Spawn and join with a deadline; returns (exit codes, ranks killed at the deadline, wall
    time when the last process ended, as ``time.time()``). Never raises for worker failures."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, out_dir, coll_timeout_s, args))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    ended = time.time()
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs], hung, ended


def run_workers(fn, world: int, *args, timeout_s: float = 120.0, coll_timeout_s: float = 60.0) -> list:
    """Spawn ``world`` gloo processes running ``fn(rank, world, *args)``; return their results."""
    with tempfile.TemporaryDirectory() as out_dir:
        codes, hung, _ = spawn_workers(fn, world, *args, timeout_s=timeout_s, coll_timeout_s=coll_timeout_s,
                                       out_dir=out_dir)
        if hung:
            raise TimeoutError(f"ranks {hung} still running after {timeout_s}s (exit codes {codes})")
        if any(codes):
            raise RuntimeError(f"worker processes failed, exit codes by rank: {codes}")
        return [pickle.loads(Path(out_dir, f"{r}.pkl").read_bytes()) for r in range(world)]
