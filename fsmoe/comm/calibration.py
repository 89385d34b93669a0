"""The hierarchical dispatcher's choice of d calibrated on the run's own timings.

The cost model prices the flat AlltoAll and each depth d from alpha-beta lines and a fixed cost
per d. Lines fitted on other message sizes can be far off: on 2 H200 as two nodes the quick
profile's line put the flat dispatch + combine of 255 MB at 5.9 ms where it took about 15 ms,
so the model kept the flat AlltoAll although d = 1 was 1.5x faster. So a layer's first
dispatches alternate the flat AlltoAll and the model's best d (``trials`` of each), each timed
over the dispatch and over the combine: the host clock with the device synced, not the experts
in between, and a flat trial from the moment d is chosen (a kept choice of flat skips choosing).
Every later choice then adds to the model's prediction of each path (flat, hierarchical) what
that path measured beyond it: its smallest measured - predicted, since a run's first dispatches
are cold. An offset rather than a ratio: what the model misses is mostly a cost it has no line
for (host syncs, index building), which does not grow with the prediction; a ratio over a
prediction of microseconds (a small layer's flat AlltoAll) came out in the thousands. The
offsets are the slowest rank's (one small AllReduce), so every rank makes the same choice; the
model still follows the routing of every step.
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
    host seconds (``stamp``) where the dispatch starts and ends and where the combine starts and
    ends. Without the two in the middle, start to end."""

    path: str
    predicted_s: float
    start: float
    end: float | None = None
    dispatched: float | None = None
    combining: float | None = None

    def seconds(self) -> float:
        if self.dispatched is None:
            return self.end - self.start
        return (self.dispatched - self.start) + (self.end - self.combining)


def stamp(device: torch.device) -> float:
    """The host clock once ``device`` has finished its queued work. Only the few calibration
    dispatches pay the sync: CUDA events would time the GPU's stream alone, and so miss the host
    work and syncs of the layout, which is most of what the model leaves out."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
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
