"""Running a scheduler command on N processes: torchrun re-executes the same command line.

``fsmoe profile --nproc 4 ...`` (and ``fsmoe bench schedule --nproc 4``) call
:func:`relaunch_under_torchrun`, which starts ``python -m torch.distributed.run --nproc-per-node 4
-m fsmoe.cli <the same arguments>`` and returns its exit code; inside, each process calls
:func:`init_from_env`. No launcher of our own: torchrun does the spawning and the rendezvous.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import timedelta

import torch
import torch.distributed as dist


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch_under_torchrun(nproc: int, argv: list[str] | None = None, timeout_s: float | None = None) -> int:
    """Run ``fsmoe <argv>`` on ``nproc`` local processes; returns torchrun's exit code."""
    argv = _without_nproc(list(sys.argv[1:] if argv is None else argv))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={port}", "-m", "fsmoe.cli", *argv]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    try:
        return subprocess.run(cmd, env=env, timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        print(f"fsmoe: {nproc} processes did not finish within {timeout_s}s", file=sys.stderr)
        return 124


def _without_nproc(argv: list[str]) -> list[str]:
    """Drop ``--nproc N`` / ``--nproc=N``: the workers run under torchrun already (and torchrun's
    own parser would take ``--nproc`` for an abbreviation of ``--nproc-per-node``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def init_from_env(device: str = "auto", timeout_s: float = 120.0) -> torch.device:
    """init_process_group from torchrun's environment (NCCL on GPU, gloo on CPU); the device."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        torch.set_num_threads(1)
    if under_torchrun() and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")


def groups_from_args(args):
    """``(ParallelGroups, device)`` of a scheduler command run by torchrun (or as one process):
    the process group from the environment, EP/ESP from ``--ep --esp --gpus-per-node``, every
    process data-parallel for the dense gradients."""
    from fsmoe.config import ParallelConfig
    from fsmoe.parallel.groups import build_groups

    device = init_from_env(args.device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    return build_groups(ParallelConfig(dp=world, ep=args.ep, esp=args.esp, gpus_per_node=args.gpus_per_node)), device
