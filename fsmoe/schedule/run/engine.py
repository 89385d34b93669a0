"""The runtime engines: a schedule program's lanes as CPU threads or CUDA streams.

The verbs (``launch``, ``compute``, ``wait``) and ``SimEngine`` are in
``fsmoe.schedule.model.engine``; here:

    ThreadEngine  CPU: one worker thread per lane; collectives (gloo) block that thread only,
                  so comm on the inter/intra lanes overlaps compute on the calling thread.
    StreamEngine  CUDA: one stream per lane, dependencies as events; NCCL work issued on a lane
                  stream is ordered with it. Host never blocks in launch/compute/wait.
    Recorder      the op records, with CUDA-event timing on a GPU.

The engine is chosen when the executor is built (``make_engine``), never inside forward.
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from fsmoe.schedule.model.engine import Engine, Records
from fsmoe.schedule.types import COMPUTE_LANE as COMPUTE, Op


class Recorder(Records):
    """Records with CUDA-event spans (resolved by :meth:`flush`) and module timing hooks."""

    def __init__(self, rank: int = 0, enabled: bool = True, max_records: int = 1_000_000):
        super().__init__(rank, enabled, max_records)
        self._pending: list[tuple[Op, str, Any, Any]] = []  # CUDA events, resolved by flush()
        self._base_event = None

    def stamp(self, device: torch.device):
        """A point in time on ``device``'s current stream (a CUDA event) or the host clock."""
        if device.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return self.now()

    def add_span(self, op: Op, lane: str, s0, s1) -> None:
        """Record an op between two :meth:`stamp` results."""
        if isinstance(s0, float):
            self.add(op, lane, s0, s1)
        else:
            self.add_events(op, lane, s0, s1)

    def time_module(self, module: torch.nn.Module, fwd: Op, bwd: Op, lane: str, device: torch.device) -> list:
        """Record ``module``'s forward as ``fwd`` and its backward as ``bwd`` on ``lane`` (module
        hooks; CUDA events on a GPU). Returns the hook handles."""
        t: dict[str, Any] = {}

        def pre_f(m, a):
            t["f"] = self.stamp(device)

        def post_f(m, a, o):
            self.add_span(fwd, lane, t["f"], self.stamp(device))

        def pre_b(m, g):
            t["b"] = self.stamp(device)

        def post_b(m, gi, go):
            self.add_span(bwd, lane, t["b"], self.stamp(device))

        return [module.register_forward_pre_hook(pre_f), module.register_forward_hook(post_f),
                module.register_full_backward_pre_hook(pre_b), module.register_full_backward_hook(post_b)]

    def add_events(self, op: Op, lane: str, e0, e1) -> None:
        if self.enabled:
            if self._base_event is None:
                self._base_event = torch.cuda.Event(enable_timing=True)
                self._base_event.record()
                self._base_time = self.now()
            self._pending.append((op, lane, e0, e1))

    def flush(self) -> None:
        """Resolve CUDA events into records (synchronises the device)."""
        if self._pending:
            torch.cuda.synchronize()
            base = self._base_event
            for op, lane, e0, e1 in self._pending:
                self.add(op, lane, self._base_time + base.elapsed_time(e0) / 1e3,
                         self._base_time + base.elapsed_time(e1) / 1e3)
            self._pending.clear()


# ---------------------------------------------------------------------------- CPU threads


class _Done:
    """An already-finished handle (the result of ``compute`` on the calling thread)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def _resolve(a):
    if isinstance(a, Future):
        return a.result()
    if isinstance(a, _Done):
        return a.value
    return a


class ThreadEngine(Engine):
    """CPU lanes: one single-thread executor per lane name, created on first use."""

    def __init__(self, recorder: Recorder | None = None):
        self.recorder = recorder or Recorder(enabled=False)
        self._lanes: dict[str, ThreadPoolExecutor] = {}

    def _lane(self, name: str) -> ThreadPoolExecutor:
        if name not in self._lanes:
            self._lanes[name] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"fsmoe-{name}")
        return self._lanes[name]

    def launch(self, lane, op, fn, *args):
        rec, grad = self.recorder, torch.is_grad_enabled()  # grad mode is per thread: carry it over

        def task():
            vals = [_resolve(a) for a in args]
            with torch.set_grad_enabled(grad):
                t0 = rec.now()
                out = fn(*vals)
                rec.add(op, lane, t0, rec.now())
            return out

        return self._lane(lane).submit(task)

    def compute(self, op, fn, *args):
        vals = [_resolve(a) for a in args]
        t0 = self.recorder.now()
        out = fn(*vals)
        self.recorder.add(op, COMPUTE, t0, self.recorder.now())
        return _Done(out)

    def wait(self, h):
        return _resolve(h)

    def close(self):
        for ex in self._lanes.values():
            ex.shutdown(wait=True)
        self._lanes.clear()


# ---------------------------------------------------------------------------- CUDA streams


class _StreamHandle:
    __slots__ = ("value", "event")

    def __init__(self, value, event):
        self.value, self.event = value, event


def _record_stream(v, stream) -> None:
    """Mark every CUDA tensor in ``v`` (tensors, tuples, lists, dataclasses such as a dispatcher's
    Pending) as used on ``stream``, so the allocator does not reuse it while that stream reads it."""
    if isinstance(v, torch.Tensor):
        if v.is_cuda:
            v.record_stream(stream)
    elif isinstance(v, (tuple, list)):
        for x in v:
            _record_stream(x, stream)
    elif dataclasses.is_dataclass(v) and not isinstance(v, type):
        for f in dataclasses.fields(v):
            _record_stream(getattr(v, f.name), stream)


class StreamEngine(Engine):
    """CUDA lanes: one stream per lane name; the compute lane is the current stream."""

    def __init__(self, recorder: Recorder | None = None, device=None):
        self.recorder = recorder or Recorder(enabled=False)
        self.device = device
        self._streams: dict[str, torch.cuda.Stream] = {}

    def _stream(self, name: str) -> torch.cuda.Stream:
        if name not in self._streams:
            self._streams[name] = torch.cuda.Stream(device=self.device)
        return self._streams[name]

    def _run(self, stream, lane, op, fn, args):
        vals = []
        for a in args:
            if isinstance(a, _StreamHandle):
                stream.wait_event(a.event)
                a = a.value
            _record_stream(a, stream)
            vals.append(a)
        e0 = torch.cuda.Event(enable_timing=True)
        e1 = torch.cuda.Event(enable_timing=True)
        e0.record(stream)
        out = fn(*vals)
        e1.record(stream)
        self.recorder.add_events(op, lane, e0, e1)
        return _StreamHandle(out, e1)

    def launch(self, lane, op, fn, *args):
        s = self._stream(lane)
        s.wait_stream(torch.cuda.current_stream())  # inputs produced on the compute lane so far
        with torch.cuda.stream(s):
            return self._run(s, lane, op, fn, args)

    def compute(self, op, fn, *args):
        return self._run(torch.cuda.current_stream(), COMPUTE, op, fn, args)

    def wait(self, h):
        if isinstance(h, _StreamHandle):
            cur = torch.cuda.current_stream()
            cur.wait_event(h.event)
            _record_stream(h.value, cur)
            return h.value
        return h


def make_engine(device: torch.device | str, recorder: Recorder | None = None) -> Engine:
    """CUDA streams on a GPU, worker threads on CPU: the same program runs on both."""
    device = torch.device(device)
    if device.type == "cuda":
        return StreamEngine(recorder, device)
    return ThreadEngine(recorder)
