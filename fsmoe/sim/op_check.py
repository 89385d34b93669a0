"""A traced run's op timings beside what the scheduler's performance model predicts for them.

``fsmoe train --trace`` records rank 0's time of every MoE layer's ops (fsmoe.op_clock). For the
run's own shapes (``LayerSpec.from_run_config``) and layout, a measured ``Profile`` predicts each
op with the same fits the planner and the cluster simulator use (``layer_work``,
``chunk_times`` at r = 1):

    dispatch  the exchange of every rank's per-expert counts (forward only; priced as an
              AlltoAll of its bytes where the profile has no ``counts`` fit, as the cluster
              simulator does), the AlltoAll to the experts' ranks, then the ESP AllGather
    experts   the expert GEMMs of this rank's shard
    combine   the AlltoAll back, after the ESP ReduceScatter

and in backward the same ops transposed (dispatch's gradient is an AlltoAll and a
ReduceScatter, combine's an AllGather and an AlltoAll). The router, permutation and shared
experts (route, unroute) are host glue the model prices per block, not per op: reported, not
predicted.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PREDICTED_OPS = ("dispatch", "experts", "combine")


@dataclass(frozen=True)
class OpCheck:
    phase: str
    op: str
    predicted_ms: float | None
    measured_ms: float

    @property
    def ratio(self) -> float | None:
        """predicted / measured."""
        if self.predicted_ms is None or not self.measured_ms > 0:
            return None
        return self.predicted_ms / self.measured_ms


def predicted_ops(cfg, world: int, profile) -> dict[str, dict[str, float]]:
    """phase -> op -> predicted ms of one MoE layer of the run ``cfg`` on ``world`` processes."""
    from fsmoe.parallel.layout import Layout
    from fsmoe.schedule.model.perf_model import layer_op_seconds
    from fsmoe.schedule.types import LayerSpec

    layout = Layout.from_config(cfg.parallel, world, cfg.parallel.gpus_per_node)
    seconds = layer_op_seconds(LayerSpec.from_run_config(cfg), layout, profile)
    return {phase: {op: t * 1e3 for op, t in ops.items()} for phase, ops in seconds.items()}


def check_ops(measured: dict[str, dict[str, float]], predicted: dict[str, dict[str, float]]) -> list[OpCheck]:
    """Every measured op (``fsmoe.cli.trace.op_medians``) beside its prediction, where there is one."""
    out = []
    for phase, ops in measured.items():
        for op, ms in ops.items():
            out.append(OpCheck(phase, op, predicted.get(phase, {}).get(op), float(ms)))
    return out


def median_error(checks: list[OpCheck]) -> float:
    """Median |predicted / measured - 1| over the predicted ops."""
    r = [abs(c.ratio - 1) for c in checks if c.ratio is not None]
    return float(np.median(r)) if r else float("nan")
