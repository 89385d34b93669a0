"""Launching: process-group setup with timeouts, fail-fast on any rank's error, torchrun spawning.

    torchrun --nproc-per-node 4 -m fsmoe.train --ep 4      # what `fsmoe train --nproc 4 --ep 4` runs

``init_distributed`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``), picks the backend (NCCL on GPUs, gloo on CPUs; same code above
it), starts the process group with ``parallel.timeout_s`` as the collective timeout, starts the
fail-fast watchdog and builds the :class:`ParallelGroups`.

No hangs: when one rank raises, :func:`run_guarded` prints its error once,
posts it to the rendezvous store and exits non-zero; every other rank's watchdog thread sees the
post (or loses the store) within ``POLL_S`` and exits non-zero too, even if it is blocked inside a
collective. A rank that hangs without raising is caught by the collective timeout on its peers,
which then fail the same way.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from fsmoe.config import ConfigError, ParallelConfig
from fsmoe.parallel.groups import ParallelGroups, build_groups

ABORT_KEY = "fsmoe/abort"  # value: "rank R: <error>" of the first rank that failed
FIRST_KEY = "fsmoe/failures"  # counter: the rank that takes 1 prints its error
POLL_S = 0.2  # how often each rank's watchdog looks at the store
# Who exits first matters: without torchrun the store may live in the failing rank (rank 0), so it
# lingers while the others read the post; under torchrun the agent holds the store, so the failing
# rank exits at once and the others wait, letting torchrun name it as the root cause.
LINGER_S = 1.0


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def pick_backend(cfg: ParallelConfig, device_type: str) -> str:
    """``parallel.backend``, or for ``auto`` the one that fits the training device."""
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if device_type == "cuda" else "gloo"


def init_distributed(cfg: ParallelConfig, device_type: str = "cpu") -> ParallelGroups:
    """Start the process group (if torchrun started several processes) and build the groups.
    ``device_type``: where this rank computes ("cuda": one GPU per local rank). In one process
    without torchrun: no process group, ``ParallelGroups.single()``."""
    if world_size_from_env() == 1 and not dist.is_initialized():
        return build_groups(cfg)
    if not dist.is_initialized():
        backend = pick_backend(cfg, device_type)
        if device_type == "cuda":
            local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
            if local_rank >= gpus:
                raise ConfigError("--nproc", os.environ.get("LOCAL_WORLD_SIZE"),
                                  f"more processes per node than GPUs ({gpus}); use fewer or --device cpu")
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg.timeout_s))
    Watchdog.start_from_env(dist.get_rank())
    return build_groups(cfg)


class Watchdog:
    """A daemon thread that exits this process when another rank has posted a failure.

    It talks to the rendezvous store through its own client connection, so it never competes
    with the main thread's use of the store.
    """

    current: "Watchdog | None" = None  # the one watchdog of this process (run_guarded reports to it)

    def __init__(self, store, rank: int):
        self.store, self.rank, self.failing, self.stopped = store, rank, False, False
        self.thread = threading.Thread(target=self._loop, name="fsmoe-watchdog", daemon=True)

    @staticmethod
    def start_from_env(rank: int) -> "Watchdog | None":
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not addr or not port or Watchdog.current is not None:
            return Watchdog.current
        store = dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=30))
        Watchdog.current = Watchdog(store, rank)
        Watchdog.current.thread.start()
        return Watchdog.current

    def _loop(self) -> None:
        while not self.stopped:
            time.sleep(POLL_S)
            try:
                posted = self.store.check([ABORT_KEY])
            except Exception:  # the store is gone: its host (a peer or torchrun) has died
                posted = True
            if posted and not self.failing and not self.stopped:
                self._stop_because_of_peer()

    def _stop_because_of_peer(self) -> None:
        self.note_peer_failure()
        time.sleep(LINGER_S if under_torchrun() else 0.0)
        os._exit(1)

    def note_peer_failure(self) -> None:
        """For torchrun's summary: this rank stopped because of the first failure."""
        try:
            post = json.loads(self.store.get(ABORT_KEY))
            write_error_file(f"stopped because rank {post['rank']} failed ({post['error']})", post["time"] + 1)
        except Exception:  # no post readable: nothing better to say
            pass

    def post(self, error: str, when: int) -> bool:
        """Record this rank's failure; True if it is the first failure of the job."""
        self.failing = True
        try:
            first = self.store.add(FIRST_KEY, 1) == 1
            if first:
                self.store.set(ABORT_KEY, json.dumps({"rank": self.rank, "time": when, "error": error}))
            return first
        except Exception:  # store unreachable: say it ourselves
            return True


def shutdown_distributed() -> None:
    """Clean end of a run: stop the watchdog, wait for every rank, destroy the process group.
    (Stopping first matters: the store's host may exit before a slower peer is done.)"""
    if Watchdog.current is not None:
        Watchdog.current.stopped = True
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def report_failure(exc: BaseException) -> None:
    """Print this rank's error (only if it is the job's first) and tell every other rank."""
    rank, now = int(os.environ.get("RANK", "0")), int(time.time())
    error = f"{type(exc).__name__}: {exc}"
    watchdog = Watchdog.current
    first = watchdog.post(error, now) if watchdog else True
    if first:
        sys.stderr.write(f"[fsmoe rank {rank}] failed; stopping every rank:\n"
                         + "".join(traceback.format_exception(exc)))
        write_error_file(f"{error} (traceback above, printed by rank {rank})", now)
    elif watchdog:
        watchdog.note_peer_failure()
    sys.stderr.flush()


def write_error_file(message: str, when: int) -> None:
    """Under torchrun, leave the message for its failure summary; the smallest timestamp is what
    torchrun names as the root cause, so peers that stop because of it stamp ``when + 1``."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": {"timestamp": str(when)}}}, f)


def run_guarded(fn, *args) -> int:
    """Run ``fn(*args)``; if it raises under a process group, report it and exit the process
    with status 1 right away (never wait for peers that may be blocked in a collective)."""
    try:
        return fn(*args)
    except SystemExit as e:
        if not dist.is_initialized() or not e.code:
            raise
        report_failure(e)
    except BaseException as e:
        if not dist.is_initialized():
            raise
        report_failure(e)
    time.sleep(0.0 if under_torchrun() else LINGER_S)
    os._exit(1)


# ---------------------------------------------------------------- torchrun


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m fsmoe.cli <argv>``;
    ``--standalone`` picks a free rendezvous port, so runs on one machine never collide."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "fsmoe.cli", *argv]


def strip_flag(argv: list[str], flag: str) -> list[str]:
    """``argv`` without ``flag VALUE`` / ``flag=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def spawn_torchrun(nproc: int, argv: list[str]) -> int:
    """Run ``fsmoe <argv>`` on ``nproc`` local processes under torchrun; returns its exit code."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.call(torchrun_command(nproc, argv), env=env)


# ---------------------------------------------------------------- command line


def add_parallel_arguments(parser) -> None:
    """``--nproc --dp --mp --ep --esp --gpus-per-node`` for ``fsmoe train``."""
    group = parser.add_argument_group("parallelism (see docs/parallelism.md)")
    group.add_argument("--nproc", type=int, help="start this many local processes under torchrun")
    for flag, text in (("dp", "data parallel (default: processes / mp)"), ("mp", "tensor parallel (attention, MLP)"),
                       ("ep", "expert parallel"), ("esp", "expert sharding along d_ff")):
        group.add_argument(f"--{flag}", type=int, help=f"{text}: parallel.{flag}")
    group.add_argument("--gpus-per-node", type=int, help="ranks per (simulated) node: parallel.gpus_per_node")


def parallel_overrides(args) -> list[str]:
    """Config overrides from the parallel flags. The process count (``--nproc`` or torchrun's
    ``WORLD_SIZE``) sets ``parallel.dp = processes / mp`` unless ``--dp`` is given; it comes
    first, so an explicit ``--set parallel.dp=..`` still wins."""
    world = getattr(args, "nproc", None) or world_size_from_env()
    out = []
    if getattr(args, "dp", None) is None and world > 1 and world % (args.mp or 1) == 0:
        out.append(f"parallel.dp={world // (args.mp or 1)}")
    for flag in ("dp", "mp", "ep", "esp", "gpus_per_node"):
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"parallel.{flag}={value}")
    return out


def wants_torchrun(args) -> bool:
    """``--nproc N`` (N > 1) outside torchrun: this process only launches the workers."""
    return (getattr(args, "nproc", None) or 1) > 1 and "TORCHELASTIC_RUN_ID" not in os.environ


# ---------------------------------------------------------------- other multi-process commands


def add_command_arguments(parser, *, nproc: int = 1, ep: int = 1, esp: int = 1, gpus_per_node: int | None = None
                          ) -> None:
    """``--nproc --ep --esp --gpus-per-node --device --timeout`` of a command that runs on the
    MoE groups only (``fsmoe profile``, ``fsmoe bench schedule``); every process is data-parallel."""
    parser.add_argument("--nproc", type=int, default=nproc, help="processes (started under torchrun)")
    parser.add_argument("--ep", type=int, default=ep)
    parser.add_argument("--esp", type=int, default=esp)
    parser.add_argument("--gpus-per-node", type=int, default=gpus_per_node, help="simulated node size")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--timeout", type=float, default=ParallelConfig.timeout_s, metavar="S",
                        help="collective timeout: a rank stuck this long fails, and every rank stops")


def run_command(args, main) -> int:
    """The launcher of every multi-process command besides ``fsmoe train``.

    1. ``--nproc N`` outside torchrun: this process only spawns N workers running the same
       command line under torchrun, and returns their exit code.
    2. In a worker (or in one process): start the process group with ``--timeout`` as the
       collective timeout, the fail-fast watchdog and the groups (``--ep --esp
       --gpus-per-node``, every process data-parallel).
    3. Run ``main(groups, device) -> exit code`` under :func:`run_guarded`: a rank that raises
       stops every rank; a rank that hangs is caught by its peers' collective timeout.
    """
    if wants_torchrun(args):
        return spawn_torchrun(args.nproc, strip_flag(getattr(args, "argv", None) or sys.argv[1:], "--nproc"))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if not use_cuda:
        torch.set_num_threads(1)  # the lanes' threads and the peers share the cores
    cfg = ParallelConfig(dp=world_size_from_env(), ep=args.ep, esp=args.esp, gpus_per_node=args.gpus_per_node,
                         timeout_s=args.timeout)

    def guarded() -> int:
        groups = init_distributed(cfg, "cuda" if use_cuda else "cpu")
        device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        code = main(groups, device)
        shutdown_distributed()
        return code

    return run_guarded(guarded)
