"""Launching: process-group setup with timeouts, fail-fast on any rank's error, torchrun spawning.

    torchrun --nproc-per-node 4 -m fsmoe.cli train --ep 4      # what `fsmoe train --nproc 4 --ep 4` runs

``init_distributed`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``), picks the backend (NCCL on GPUs, gloo on CPUs; same code above
it), starts the process group with ``parallel.timeout_s`` as the collective timeout, starts the
fail-fast watchdog and builds the :class:`ParallelGroups`.

No hangs: when one rank raises, :func:`run_guarded` prints its error once, posts it to the
rendezvous store and exits non-zero; every other rank's watchdog thread sees the post (or loses
the store) within ``POLL_S`` and exits non-zero too, even if it is blocked inside a collective. A
rank that hangs without raising is caught by the collective timeout on its peers, which then fail
the same way.

One clear error: ``fsmoe train --nproc N`` checks everything it can before it starts workers
(fsmoe.cli.train.preflight). The workers it starts (:func:`spawn_torchrun`) do not print their error:
the first failing rank writes it into the directory named by ``FSMOE_ERROR_DIR``, and the
launching process prints it once, as one line for bad input (exit code 2) or with the failing
rank's traceback otherwise (exit code 1), with no torchrun failure summary.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from fsmoe.cli.arg_types import positive_float, positive_int
from fsmoe.config import ConfigError, ParallelConfig
from fsmoe.environ import patched_environ
from fsmoe.parallel.groups import ParallelGroups, build_groups

ERROR_DIR_ENV = "FSMOE_ERROR_DIR"  # set by spawn_torchrun: where a failing worker leaves its error
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

    def stop(self) -> None:
        """End the thread and close its store connection while the interpreter is fully alive
        (a client still open at exit can abort the process during teardown)."""
        self.stopped = True
        self.thread.join(timeout=POLL_S + 1.0)
        if not self.thread.is_alive():
            self.store = None

    def post(self, error: str, when: int) -> bool | None:
        """Record this rank's failure; True if it is the first failure of the job, None if the
        store cannot say (its host has exited)."""
        self.failing = True
        try:
            first = self.store.add(FIRST_KEY, 1) == 1
            if first:
                self.store.set(ABORT_KEY, json.dumps({"rank": self.rank, "time": when, "error": error}))
            return first
        except Exception:  # store unreachable
            return None


def shutdown_distributed() -> None:
    """Clean end of a run: stop the watchdog, wait for every rank, destroy the process group.
    (Stopping first matters: the store's host may exit before a slower peer is done.)"""
    if Watchdog.current is not None:
        Watchdog.current.stop()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def report_failure(exc: BaseException) -> None:
    """Report this rank's error (only if it is the job's first) and tell every other rank. Bad
    input (ConfigError) is one line, anything else comes with its traceback; under
    :func:`spawn_torchrun` the launching process prints it, else this rank does."""
    rank, now = int(os.environ.get("RANK", "0")), int(time.time())
    bad_input = isinstance(exc, ConfigError)
    error = str(exc) if bad_input else f"{type(exc).__name__}: {exc}"
    watchdog = Watchdog.current
    first = watchdog.post(error, now) if watchdog else True
    if first is None:  # the store's host has exited: if a peer's exit is all this rank saw, that peer's
        first = not _lost_a_peer(exc)  # failure is the job's first, and it was reported there
    if first:
        text = (f"error: {exc}" if bad_input else
                f"[fsmoe rank {rank}] failed; stopping every rank:\n" + "".join(traceback.format_exception(exc)))
        if not _leave_for_launcher(rank, now, bad_input, text):
            sys.stderr.write(text if not bad_input else f"[fsmoe rank {rank}] {text}\n")
        write_error_file(error if bad_input else f"{error} (traceback above, printed by rank {rank})", now)
    elif watchdog:
        watchdog.note_peer_failure()
    sys.stderr.flush()


def _lost_a_peer(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because a peer process went away (gloo's
    "Connection closed by peer" or "reset by peer", or the store's DistNetworkError): the error of
    a rank stopped by another's failure, not a failure of its own."""
    if isinstance(exc, getattr(dist, "DistNetworkError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("closed by peer" in text or "reset by peer" in text)


def _leave_for_launcher(rank: int, when: int, bad_input: bool, text: str) -> bool:
    """Write the error for the launching process (``FSMOE_ERROR_DIR``); False if there is none."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder or not os.path.isdir(folder):
        return False
    tmp = os.path.join(folder, f".rank{rank}.tmp")
    with open(tmp, "w") as f:
        json.dump({"rank": rank, "time": when, "bad_input": bad_input, "text": text}, f)
    os.replace(tmp, os.path.join(folder, f"rank{rank}.json"))
    return True


def first_worker_error(folder: str) -> dict | None:
    """The earliest error a worker left in ``folder`` (ties: the lowest rank), or None."""
    errors = []
    for name in sorted(os.listdir(folder)):
        if name.startswith("rank") and name.endswith(".json"):
            try:
                with open(os.path.join(folder, name)) as f:
                    errors.append(json.load(f))
            except (OSError, ValueError):
                continue
    return min(errors, key=lambda e: (e["time"], e["rank"]), default=None)


def write_error_file(message: str, when: int) -> None:
    """Under torchrun, leave the message for its failure summary; the smallest timestamp is what
    torchrun names as the root cause, so peers that stop because of it stamp ``when + 1``."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        # Written aside and renamed: a rank's watchdog thread may end the process (os._exit) while
        # its main thread writes here, and torchrun fails on a truncated file instead of reporting.
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": {"timestamp": str(when)}}}, f)
        os.replace(tmp, path)


def run_guarded(fn, *args) -> int:
    """Run ``fn(*args)``; if it raises under a process group (or in a torchrun worker before the
    group exists), report it and exit the process with status 1 right away (never wait for peers
    that may be blocked in a collective)."""
    try:
        return fn(*args)
    except SystemExit as e:
        if not _guarded() or not e.code:
            raise
        report_failure(e)
    except BaseException as e:
        if not _guarded():
            raise
        report_failure(e)
    time.sleep(0.0 if under_torchrun() else LINGER_S)
    os._exit(1)


def _guarded() -> bool:
    return dist.is_initialized() or under_torchrun()


# ---------------------------------------------------------------- torchrun


def torchrun_args(nproc: int, argv: list[str]) -> list[str]:
    """torchrun's arguments for ``--standalone --nproc-per-node N -m fsmoe.cli <argv>``;
    ``--standalone`` picks a free rendezvous port, so runs on one machine never collide."""
    return ["--standalone", f"--nproc-per-node={nproc}", "-m", "fsmoe.cli", *argv]


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
    """Run ``fsmoe <argv>`` on ``nproc`` local processes under torchrun's agent (in this process,
    its own logging silenced); returns the exit code. A worker's error is printed here, once:
    bad input as one red line (exit code 2), anything else with the failing rank's traceback (1)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    with tempfile.TemporaryDirectory(prefix="fsmoe-errors-") as folder, _worker_env(folder), _agent_quiet():
        try:
            run(parse_args(torchrun_args(nproc, argv)))
            return 0
        except SignalException as e:  # the agent turns SIGINT/SIGTERM into this, after stopping the workers
            return _stopped_by(e.sigval)
        except ChildFailedError as e:
            rank, failure = e.get_first_failure()
            error = first_worker_error(folder) or {"bad_input": False, "text": (
                f"error: worker rank {rank} {_exit_status(failure.exitcode)} without reporting an error (its output, "
                "if any, is above)")}
        except Exception:  # the agent itself failed while summarising; a worker's own report still wins
            error = first_worker_error(folder)
            if error is None:
                raise
    _print_worker_error(error)
    return 2 if error["bad_input"] else 1


def _stopped_by(sig: signal.Signals) -> int:
    """One line instead of the agent's traceback when the job is interrupted; 128 + signal number."""
    from rich.console import Console

    Console(stderr=True).print(f"interrupted ({signal.Signals(sig).name}): every worker was stopped; the run "
                               "directory keeps its last checkpoint", style="yellow", highlight=False)
    return 128 + int(sig)


def _exit_status(code: int | None) -> str:
    """``exited with code N`` or ``was killed by SIGNAME`` (negative codes are signals)."""
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exited with code {code}"


def _print_worker_error(error: dict) -> None:
    """A one-line error in red, as ``fsmoe`` prints bad input; a traceback as it is."""
    from rich.console import Console

    style = "bold red" if error["text"].startswith("error:") else None
    Console(stderr=True).print(error["text"].rstrip("\n"), style=style, markup=False, highlight=False,
                               soft_wrap=True)


def _worker_env(folder: str) -> contextlib.AbstractContextManager[None]:
    """Environment the workers inherit: ``FSMOE_ERROR_DIR`` and one OpenMP thread unless set."""
    return patched_environ({ERROR_DIR_ENV: folder, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


@contextlib.contextmanager
def _agent_quiet() -> Iterator[None]:
    """Silence torchrun's agent logging (rendezvous notices, its failure report) in this process."""
    level = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(level)


# ---------------------------------------------------------------- command line


def add_parallel_arguments(parser) -> None:
    """``--nproc --dp --mp --ep --esp --gpus-per-node --shard`` for ``fsmoe train``."""
    group = parser.add_argument_group("parallelism (see docs/parallelism.md)")
    group.add_argument("--nproc", type=int, help="start this many local processes under torchrun")
    for flag, text in (("dp", "data parallel (default: processes / mp)"), ("mp", "tensor parallel (attention, MLP)"),
                       ("ep", "expert parallel"), ("esp", "expert sharding along d_ff")):
        group.add_argument(f"--{flag}", type=int, help=f"{text}: parallel.{flag}")
    group.add_argument("--gpus-per-node", type=int, help="ranks per (simulated) node: parallel.gpus_per_node")
    group.add_argument("--shard", choices=["none", "optimizer", "full"],
                       help="split AdamW's state and the gradients over the data-parallel replicas (optimizer: "
                            "ZeRO-1/2), and the blocks' weights too (full: ZeRO-3): parallel.shard")


def processes(args) -> int:
    """How many processes train: ``--nproc`` (an integer >= 1) or torchrun's ``WORLD_SIZE``."""
    nproc = getattr(args, "nproc", None)
    if nproc is None:
        return world_size_from_env()
    if nproc < 1:
        raise ConfigError("--nproc", nproc, "must be an integer >= 1 (the number of processes)")
    return nproc


def check_world(cfg: ParallelConfig, world: int) -> None:
    """The layout must use exactly the processes there are."""
    if cfg.world != world:
        raise ConfigError("parallel.dp*mp", cfg.world, f"must equal the number of processes, {world} (set "
                          f"--nproc {cfg.world}, or --dp/--mp so that dp*mp = {world})")


def parallel_overrides(args) -> list[str]:
    """Config overrides from the parallel flags. The process count (``--nproc`` or torchrun's
    ``WORLD_SIZE``) sets ``parallel.dp = processes / mp`` unless ``--dp`` is given; it comes
    first, so an explicit ``--set parallel.dp=..`` still wins."""
    world = processes(args)
    out = []
    if getattr(args, "dp", None) is None and world > 1 and world % (args.mp or 1) == 0:
        out.append(f"parallel.dp={world // (args.mp or 1)}")
    for flag in ("dp", "mp", "ep", "esp", "gpus_per_node", "shard"):
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
    parser.add_argument("--nproc", type=positive_int, default=nproc, help="processes (started under torchrun)")
    parser.add_argument("--ep", type=positive_int, default=ep)
    parser.add_argument("--esp", type=positive_int, default=esp)
    parser.add_argument("--gpus-per-node", type=int, default=gpus_per_node, help="simulated node size")
    parser.add_argument("--topology", type=_int_list, default=None, metavar="N,N,..",
                        help="levels of the machine, outermost first, e.g. 2,2,2 = 2 nodes x 2 sockets x 2 "
                             "(parallel.topology; product = --nproc)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--timeout", type=positive_float, default=ParallelConfig.timeout_s, metavar="S",
                        help="collective timeout: a rank stuck this long fails, and every rank stops")


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 2,2,2, got {text!r}") from None


def run_command(args, main, cpu_threads: int | None = 1) -> int:
    """The launcher of every multi-process command besides ``fsmoe train``.

    1. ``--nproc N`` outside torchrun: this process only spawns N workers running the same
       command line under torchrun, and returns their exit code.
    2. In a worker (or in one process): start the process group with ``--timeout`` as the
       collective timeout, the fail-fast watchdog and the groups (``--ep --esp
       --gpus-per-node``, every process data-parallel); on the CPU ``cpu_threads`` torch threads
       (None: as ``fsmoe train`` has them, all cores in one process, one per worker).
    3. Run ``main(groups, device) -> exit code`` under :func:`run_guarded`: a rank that raises
       stops every rank; a rank that hangs is caught by its peers' collective timeout.
    """
    if wants_torchrun(args):
        return spawn_torchrun(args.nproc, strip_flag(getattr(args, "argv", None) or sys.argv[1:], "--nproc"))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if not use_cuda and cpu_threads:
        torch.set_num_threads(cpu_threads)  # the lanes' threads and the peers share the cores
    cfg = ParallelConfig(dp=world_size_from_env(), ep=args.ep, esp=args.esp, gpus_per_node=args.gpus_per_node,
                         timeout_s=args.timeout, topology=getattr(args, "topology", None))

    def guarded() -> int:
        groups = init_distributed(cfg, "cuda" if use_cuda else "cpu")
        device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        code = main(groups, device)
        shutdown_distributed()
        return code

    return run_guarded(guarded)
