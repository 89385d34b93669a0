"""The hierarchical dispatcher's choice of d calibrated on the run's own timings.

The cost model prices the flat AlltoAll and each depth d from alpha-beta lines and a fixed cost
per d. Lines fitted on other message sizes can be far off: on 2 H200 as two nodes the quick
profile's line put the flat dispatch + combine of 255 MB at 5.9 ms where it took about 15 ms,
so the model kept the flat AlltoAll although d = 1 was 1.5x faster. So a layer's first
dispatches alternate the flat AlltoAll and the model's best d (``trials`` of each), each timed
over the dispatch and over the combine (CUDA events on a GPU, the host clock on CPU; not the
experts in between); then every later choice adds to the model's prediction of each path (flat,
hierarchical) what that path measured beyond it (its smallest measured - predicted: a run's
first dispatches are cold). An offset rather than a ratio: what the model misses is mostly a
cost it has no line for (host syncs, index building), which does not grow with the prediction;
a ratio over a prediction of microseconds (a small layer's flat AlltoAll) blew up to thousands. The offsets are the slowest rank's
(one small AllReduce), so every rank makes the same choice; the model still follows the routing
of every step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

PATHS = ("flat", "hier")


@dataclass
class Trial:
    """One timed dispatch + combine: its path, the model's prediction for it (seconds), and the
    points (CUDA events, or host seconds) where the dispatch starts and ends and where the combine
    starts and ends. Without the two in the middle, start to end."""

    path: str
    predicted_s: float
    start: object
    end: object = None
    dispatched: object = None
    combining: object = None

    def seconds(self) -> float:
        spans = [(self.start, self.end)] if self.dispatched is None else \
            [(self.start, self.dispatched), (self.combining, self.end)]
        if isinstance(self.start, float):
            return sum(b - a for a, b in spans)
        self.end.synchronize()
        return sum(a.elapsed_time(b) for a, b in spans) / 1e3


def stamp(device: torch.device):
    """A point in time on ``device``'s current stream (a CUDA event), or the host clock."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


@dataclass
class Calibration:
    """``trials`` timed dispatches of each path, then the seconds added to each path's predictions."""

    trials: int = 2
    done: list[Trial] = field(default_factory=list)
    offset_s: dict[str, float] | None = None

    @property
    def active(self) -> bool:
        return self.offset_s is None

    def next_path(self) -> str:
        """The path the next timed dispatch takes: flat, hier, flat, ..."""
        return PATHS[len(self.done) % 2]

    def complete(self) -> bool:
        return self.active and len(self.done) >= 2 * self.trials

    def finish(self, device: torch.device, group=None) -> dict[str, float]:
        """Per path, the smallest measured - predicted seconds of its trials, the slowest rank's
        (collective over ``group`` when it spans several ranks)."""
        offsets = [min(t.seconds() - t.predicted_s for t in self.done if t.path == p) for p in PATHS]
        r = torch.tensor(offsets, dtype=torch.float64, device=device)
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(r, op=dist.ReduceOp.MAX, group=group)
        self.offset_s = dict(zip(PATHS, r.tolist()))
        return self.offset_s
