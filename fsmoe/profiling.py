"""``fsmoe train --torch-profile STEPS``: a PyTorch profiler trace of STEPS training steps and a
summary of where the device's time went.

The trace (``torch_trace_rank<R>.json.gz``, open it in Perfetto or chrome://tracing) holds every
kernel on every stream. The summary answers the questions a step's time raises on a GPU without
opening it: how long the device computed, how long it communicated (NCCL kernels), how much of
the communication ran under compute (the overlap the schedules are there to win), how long it
sat idle (the host did not keep it fed), and which kernels took the time. It is printed, written
to ``torch_profile_rank<R>.json`` and kept with the records.

Recording starts after ``WAIT_STEPS`` steps (the allocator, autotuning and NCCL's set-up are done
by then) and covers STEPS steps; it costs some host time per op while active, so the tokens/s of
the window it falls in is lower than the rest.
"""
from __future__ import annotations

import gzip
import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

WAIT_STEPS = 8  # steps before recording (warm-up: allocator, Triton autotuning, NCCL communicators)
WARMUP_STEPS = 1  # the profiler's own warm-up step (traced, then dropped)


@dataclass
class TraceSummary:
    """What the device did during the recorded steps (milliseconds per step)."""

    steps: int
    step_ms: float  # from the first kernel's start to the last kernel's end, per step
    compute_ms: float  # union of the non-communication kernels' spans
    comm_ms: float  # union of the communication kernels' spans (NCCL)
    overlap_ms: float  # communication under compute
    idle_ms: float  # no kernel on any stream
    streams: int
    top_kernels: list[tuple[str, float, int]] = field(default_factory=list)  # (name, ms per step, launches per step)

    @property
    def exposed_comm_ms(self) -> float:
        return self.comm_ms - self.overlap_ms

    def describe(self) -> str:
        s = self
        hidden = 100 * s.overlap_ms / s.comm_ms if s.comm_ms else 0.0
        lines = [f"GPU time per step over {s.steps} steps on {s.streams} streams: {s.step_ms:.1f} ms = compute "
                 f"{s.compute_ms:.1f} + exposed communication {s.exposed_comm_ms:.1f} + idle {s.idle_ms:.1f}; "
                 f"communication {s.comm_ms:.1f} ms, {hidden:.0f}% of it under compute"]
        lines += [f"  {ms:8.2f} ms {n:5d}x  {name[:110]}" for name, ms, n in s.top_kernels]
        return "\n".join(lines)


def is_comm_kernel(name: str) -> bool:
    return "nccl" in name.lower()


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _length(spans: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in spans)


def _intersection(x: list[tuple[float, float]], y: list[tuple[float, float]]) -> float:
    """Length of the intersection of two sorted disjoint span lists."""
    i = j = 0
    total = 0.0
    while i < len(x) and j < len(y):
        lo, hi = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        total += max(0.0, hi - lo)
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


def summarize(events: list[dict], steps: int, top: int = 12) -> TraceSummary:
    """The summary of a Chrome trace's ``traceEvents`` (kernels: ``cat == "kernel"``, ``ts``/``dur``
    in microseconds) recorded over ``steps`` steps."""
    kernels = [e for e in events if e.get("cat") == "kernel" and e.get("ph") == "X"]
    if not kernels:
        return TraceSummary(steps, 0.0, 0.0, 0.0, 0.0, 0.0, 0)
    comm = _union([(e["ts"], e["ts"] + e["dur"]) for e in kernels if is_comm_kernel(e["name"])])
    compute = _union([(e["ts"], e["ts"] + e["dur"]) for e in kernels if not is_comm_kernel(e["name"])])
    start = min(e["ts"] for e in kernels)
    end = max(e["ts"] + e["dur"] for e in kernels)
    busy = _length(_union(comm + compute))
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in kernels:
        by_name[e["name"]][0] += e["dur"]
        by_name[e["name"]][1] += 1
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    per = 1e3 * steps  # microseconds per step -> milliseconds
    return TraceSummary(
        steps=steps, step_ms=(end - start) / per, compute_ms=_length(compute) / per, comm_ms=_length(comm) / per,
        overlap_ms=_intersection(comm, compute) / per, idle_ms=((end - start) - busy) / per,
        streams=len({e.get("args", {}).get("stream") for e in kernels}),
        top_kernels=[(name, d / per, round(n / steps)) for name, (d, n) in ranked])


class StepProfiler:
    """``torch.profiler`` over ``steps`` training steps after ``wait`` steps; call :meth:`step`
    after each training step. On the last recorded step it writes the trace and the summary into
    ``run_dir`` and prints the summary (rank 0) with ``print_fn``."""

    def __init__(self, run_dir: Path, steps: int, rank: int = 0, print_fn=None, wait: int = WAIT_STEPS):
        self.run_dir, self.steps, self.rank, self.print_fn = Path(run_dir), steps, rank, print_fn
        self.summary: TraceSummary | None = None
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=wait, warmup=WARMUP_STEPS, active=steps, repeat=1),
            on_trace_ready=self._ready)
        self._prof.start()
        self._open = True

    def step(self) -> None:
        if self._open:
            self._prof.step()

    def close(self) -> None:
        if self._open:
            self._open = False
            self._prof.stop()

    def _ready(self, prof) -> None:
        path = self.run_dir / f"torch_trace_rank{self.rank}.json.gz"
        prof.export_chrome_trace(str(path))  # torch gzips a path ending in .gz
        with gzip.open(path, "rt") as f:
            events = json.load(f).get("traceEvents", [])
        self.summary = summarize(events, self.steps)
        out = self.run_dir / f"torch_profile_rank{self.rank}.json"
        out.write_text(json.dumps(asdict(self.summary), indent=1))
        if self.print_fn is None:
            return
        if self.summary.streams:
            text = self.summary.describe()
        else:  # a CPU run: no kernels, so the host ops by their own time
            text = "no GPU kernels (a CPU run); ops by self time:\n" + prof.key_averages().table(
                sort_by="self_cpu_time_total", row_limit=12)
        self.print_fn(f"torch profile (rank {self.rank}, {path.name}):\n{text}")
