"""The hierarchical dispatcher's choice of d calibrated on the run's own timings.

The cost model prices the flat AlltoAll and each depth d from alpha-beta lines and a fixed cost
per d. Lines fitted on other message sizes can be far off: on 2 H200 as two nodes the quick
profile's line put the flat dispatch + combine of 255 MB at 5.9 ms where it took about 15 ms,
so the model kept the flat AlltoAll although d = 1 was 1.5x faster. So a layer's first
dispatches alternate the flat AlltoAll and the model's best d (``trials`` of each), each timed
from the dispatch's start to its combine's end (CUDA events on a GPU, the host clock on CPU);
then every later choice scales the model's predictions by the median measured / predicted ratio
of its path (flat, hierarchical). The ratios are the slowest rank's (one small AllReduce), so
every rank makes the same choice; the model still follows the routing of every step.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

PATHS = ("flat", "hier")


@dataclass
class Trial:
    """One timed dispatch + combine: its path, the model's prediction for it (seconds), and its
    start and end (CUDA events, or host seconds)."""

    path: str
    predicted_s: float
    start: object
    end: object = None

    def seconds(self) -> float:
        if isinstance(self.start, float):
            return self.end - self.start
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1e3


def stamp(device: torch.device):
    """A point in time on ``device``'s current stream (a CUDA event), or the host clock."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


@dataclass
class Calibration:
    """``trials`` timed dispatches of each path, then the scale of each path's predictions."""

    trials: int = 2
    done: list[Trial] = field(default_factory=list)
    scale: dict[str, float] | None = None

    @property
    def active(self) -> bool:
        return self.scale is None

    def next_path(self) -> str:
        """The path the next timed dispatch takes: flat, hier, flat, ..."""
        return PATHS[len(self.done) % 2]

    def complete(self) -> bool:
        return self.active and len(self.done) >= 2 * self.trials

    def finish(self, device: torch.device, group=None) -> dict[str, float]:
        """The median measured / predicted ratio per path, the slowest rank's (collective over
        ``group`` when it spans several ranks)."""
        ratios = [statistics.median(t.seconds() / max(t.predicted_s, 1e-9) for t in self.done if t.path == p)
                  for p in PATHS]
        r = torch.tensor(ratios, dtype=torch.float64, device=device)
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(r, op=dist.ReduceOp.MAX, group=group)
        self.scale = dict(zip(PATHS, r.tolist()))
        return self.scale
