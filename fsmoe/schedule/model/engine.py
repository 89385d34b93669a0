"""The engine interface and the simulated engine: the verbs a schedule program is written in.

A schedule program (``fsmoe.schedule.model.program``) is written once against three verbs:

    h = eng.launch(lane, op, fn, *args)   run fn(*args) on ``lane`` after the handles in args
    h = eng.compute(op, fn, *args)        run fn(*args) on the compute lane (the calling thread)
    v = eng.wait(h)                       the value of h, once it is done

A lane is an in-order queue, exactly like a CUDA stream: an op starts when the lane is free and
its inputs are done, and blocks the lane until then. ``SimEngine`` (here) has no data: it advances
virtual clocks by the Profile's predicted op times, running the *same* program as the real
engines (``fsmoe.schedule.run.engine``: threads on CPU, CUDA streams on GPU), so the predicted
timeline is the executed schedule's. Every engine appends one ``OpRecord`` per op to its recorder.
"""
from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from typing import Any, Callable

from fsmoe.schedule.types import COMPUTE_LANE, Op, OpRecord


class Records:
    """Collects OpRecords of one rank (host clock). ``enabled=False`` makes ``add`` a no-op.
    The runtime's ``Recorder`` adds CUDA-event timing on top."""

    def __init__(self, rank: int = 0, enabled: bool = True, max_records: int = 1_000_000):
        self.rank, self.enabled, self.max_records = rank, enabled, max_records
        self.epoch = time.perf_counter()
        self.records: list[OpRecord] = []
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.perf_counter() - self.epoch

    def add(self, op: Op, lane: str, t0: float, t1: float) -> None:
        if self.enabled and len(self.records) < self.max_records:
            with self._lock:
                self.records.append(OpRecord(op, lane, self.rank, t0, t1))

    def flush(self) -> None:
        """Resolve pending timings into records (nothing pending on the host clock)."""

    def take(self) -> list[OpRecord]:
        """Return and clear the records."""
        self.flush()
        with self._lock:
            out, self.records = self.records, []
        return out


class Engine(ABC):
    recorder: Records

    @abstractmethod
    def launch(self, lane: str, op: Op, fn: Callable | None, *args) -> Any: ...

    @abstractmethod
    def compute(self, op: Op, fn: Callable | None, *args) -> Any: ...

    @abstractmethod
    def wait(self, h: Any) -> Any: ...

    def close(self) -> None:
        pass



# ---------------------------------------------------------------------------- simulation


class _SimHandle:
    __slots__ = ("end",)

    def __init__(self, end: float):
        self.end = end


class SimEngine(Engine):
    """Predicts the program's timeline: op time = ``duration(op)`` (the Profile by default)."""

    def __init__(self, duration: Callable[[Op], float], rank: int = 0, recorder: Records | None = None):
        self.duration = duration
        self.recorder = recorder or Records(rank=rank)
        self.host = 0.0
        self.free: dict[str, float] = {}

    @staticmethod
    def from_profile(profile, rank: int = 0) -> "SimEngine":
        """Op time from the Profile; ops it has no fit for (unmodelled, e.g. no dense fits) take 0."""
        return SimEngine(lambda op: profile.t(op.key, op.n) if op.key and profile.has(op.key) else 0.0, rank)

    def _deps(self, args) -> float:
        return max([a.end for a in args if isinstance(a, _SimHandle)], default=0.0)

    def launch(self, lane, op, fn, *args):
        t0 = max(self.host, self.free.get(lane, 0.0), self._deps(args))
        t1 = t0 + self.duration(op)
        self.free[lane] = t1
        self.recorder.add(op, lane, t0, t1)
        return _SimHandle(t1)

    def compute(self, op, fn, *args):
        t0 = max(self.host, self._deps(args))
        self.host = t0 + self.duration(op)
        self.recorder.add(op, COMPUTE_LANE, t0, self.host)
        return _SimHandle(self.host)

    def wait(self, h):
        if isinstance(h, _SimHandle):
            self.host = max(self.host, h.end)
        return None

    def drain(self) -> float:
        """Wait for every lane; returns the end time."""
        self.host = max([self.host, *self.free.values()])
        return self.host
