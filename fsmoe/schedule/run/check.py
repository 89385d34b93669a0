"""The plan checked in the run itself: its executors against the default path, on alternate steps.

The planner predicts from fitted costs; on GPUs each chunk of the pipelined executor also costs
launches, events and smaller GEMMs that no fit holds, and NCCL's kernels contend with the GEMMs
beside them. So before trusting a plan of r > 1, the trainer runs it and the default data path on
alternate steps (plan, default, plan, ...): one warm-up step of each, then ``steps`` timed steps of
each, and keeps the path with the lower median step time (forward, backward and the gradient sync;
the optimizer step is the same for both). Alternating puts both paths under the same drift of
routing and clocks. Every rank takes the slowest rank's times, so all ranks keep the same path.

Both paths compute the same function (the pipelined executor equals the sequential one, see the
schedule tests), so switching changes the speed of the run, not what it learns.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

PATHS = ("plan", "default")


@dataclass
class ScheduleCheck:
    """Which path each step of the check runs, and the timed steps' seconds per path."""

    first: int  # the first step of the check (0-based step index)
    steps: int  # timed steps per path
    times: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PATHS})
    kept: str | None = None  # the decision, once made
    medians: dict[str, float] = field(default_factory=dict)  # seconds per step per path, the slowest rank's
    _t0: float = 0.0

    @property
    def end(self) -> int:
        """The first step after the check."""
        return self.first + 2 * (self.steps + 1)

    def path(self, step: int) -> str | None:
        """The path ``step`` runs during the check; None outside it."""
        if not self.first <= step < self.end:
            return None
        return PATHS[(step - self.first) % 2]

    def timed(self, step: int) -> bool:
        return self.first + 2 <= step < self.end

    def begin(self, step: int, device: torch.device) -> None:
        if self.timed(step):
            _sync(device)
            self._t0 = time.perf_counter()

    def finish(self, step: int, device: torch.device) -> None:
        if self.timed(step):
            _sync(device)
            self.times[self.path(step)].append(time.perf_counter() - self._t0)

    def decide(self, device: torch.device, group=None) -> str:
        """The path with the lower median step time over the slowest rank (collective when
        ``group`` spans several ranks); ties keep the default path."""
        med = torch.tensor([statistics.median(self.times[p]) for p in PATHS], dtype=torch.float64, device=device)
        if group is not None:
            dist.all_reduce(med, op=dist.ReduceOp.MAX, group=group)
        self.medians = dict(zip(PATHS, med.tolist()))
        self.kept = "plan" if self.medians["plan"] < self.medians["default"] else "default"
        return self.kept

    def metrics(self) -> dict[str, float | str]:
        return {"schedule_check_plan_ms": 1e3 * self.medians["plan"],
                "schedule_check_default_ms": 1e3 * self.medians["default"], "schedule_check_kept": self.kept}

    def describe(self, plan: str) -> str:
        m = self.medians
        verdict = ("keeping the plan" if self.kept == "plan" else
                   "keeping the default data path (parallel.schedule_check_steps=0 keeps the plan regardless)")
        return (f"schedule check over {self.steps} steps each: the plan ({plan}) {1e3 * m['plan']:.1f} ms/step, "
                f"the default path {1e3 * m['default']:.1f} ms/step: {verdict}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
