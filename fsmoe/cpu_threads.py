"""How many torch threads a training process on the CPU computes with (``train.cpu_threads``).

On the 16-vCPU host of an H200 machine, one process training the ``tiny`` preset took a median
step of 80 ms with 16 threads, 84 with 15, 67 with 12 and 67 with 8, but a mean step of 125, 104,
72 and 67 ms: with a thread on every logical CPU (likely hyperthread pairs of fewer physical
cores) an OpenMP region often waits for a thread descheduled by the trainer's other threads or
the host's, for up to 330 ms a step. So by default a process takes half of the logical CPUs
from eight on (never fewer than four), and all of them below that; ``OMP_NUM_THREADS``, when set,
or ``train.cpu_threads`` decide instead. Workers of ``--nproc`` keep one thread each unless
``train.cpu_threads`` says otherwise.
"""
from __future__ import annotations

import os

MIN_AUTO = 4  # at most this many logical CPUs: all of them


def logical_cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def auto_threads(cpus: int) -> int:
    """The default for ``cpus`` logical CPUs: all up to :data:`MIN_AUTO`, else half (at least MIN_AUTO)."""
    return cpus if cpus <= MIN_AUTO else max(MIN_AUTO, cpus // 2)


def resolve(requested: int, cpus: int | None = None, environ=None) -> tuple[int, str]:
    """(threads, why) for ``train.cpu_threads = requested`` (0: automatic)."""
    environ = os.environ if environ is None else environ
    cpus = logical_cpus() if cpus is None else cpus
    if requested:
        return requested, "train.cpu_threads"
    env = environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    n = auto_threads(cpus)
    return n, (f"all {cpus} logical CPUs" if n == cpus else f"half of {cpus} logical CPUs") + \
        "; train.cpu_threads or OMP_NUM_THREADS set it"


def apply(requested: int, distributed: bool) -> str | None:
    """Set torch's threads for a training process on the CPU (or its profile); returns what it set,
    for the log, or None where it keeps the launcher's (a worker of ``--nproc`` without
    ``train.cpu_threads``: one thread each)."""
    import torch

    if distributed and not requested:
        return None
    n, why = resolve(requested)
    torch.set_num_threads(n)
    return f"{n} ({why})"
