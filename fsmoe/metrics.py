"""Training metrics: expert-load statistics, ``metrics.jsonl`` and TensorBoard events.

Shape legend: E experts of one MoE layer, M MoE layers.

``metrics.jsonl`` holds one JSON object per logged step::

    step, loss (cross-entropy, nats), val_loss (only where evaluated), lr, tokens_per_s,
    grad_norm, aux_loss, dropped (assignments dropped by capacity, all layers),
    expert_load ([M][E] fraction of the step's assignments each expert received),
    imbalance (max/mean tokens per expert, averaged over layers; 1.0 = perfectly balanced),
    mfu (CUDA only: model FLOPs utilisation of the job's GPUs, fsmoe.models.flops),
    peak_mem_gb (CUDA only: this rank's peak allocated GPU memory so far, GiB),
    skipped_steps (train.on_nonfinite=skip only: non-finite steps not applied so far)
    rank_balance (EP runs: max/mean expert rows per EP rank under the expert placement)
    placement_* (parallel.placement != static, after a rebalance: balance before/after, bytes
    moved, pause; see docs/placement.md)

On resume, records after the checkpoint's step are removed (they are recomputed identically) and
TensorBoard purges its events after that step, so both logs read like one uninterrupted run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
TB_SCALARS = ("loss", "val_loss", "lr", "tokens_per_s", "mfu", "peak_mem_gb", "grad_norm", "aux_loss", "dropped",
              "imbalance", "skipped_steps")


def expert_load(tokens_per_expert: Sequence[Tensor]) -> list[list[float]]:
    """Per-layer fractions of assignments per expert: M tensors [E] -> [M][E] floats summing to 1."""
    load = []
    for counts_E in tokens_per_expert:
        counts_E = counts_E.double().cpu()
        total = float(counts_E.sum())
        load.append([float(c) / total if total else 0.0 for c in counts_E])
    return load


def imbalance(load_ME: list[list[float]]) -> float:
    """max/mean of tokens per expert, averaged over layers (1.0 = balanced, E = all to one expert)."""
    ratios = [max(row) * len(row) / sum(row) for row in load_ME if sum(row) > 0]
    return sum(ratios) / len(ratios) if ratios else 1.0


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Records of ``run_dir/metrics.jsonl`` in order; a torn last line (crash mid-write) is skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _truncate_after(run_dir: Path, step: int) -> None:
    """Keep only records with ``step <= step``; rewrite via a temp file + rename (atomic)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


class MetricsLog:
    """Appends records to ``metrics.jsonl`` and TensorBoard ``tb/``. Disabled (writes nothing)
    on ranks other than 0. ``start_step`` > 0 continues a run that was checkpointed at that step."""

    def __init__(self, run_dir: Path, start_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.tb: SummaryWriter | None = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        _truncate_after(run_dir, start_step)
        self.file = (run_dir / METRICS_FILE).open("a")
        self.tb = SummaryWriter(str(run_dir / TB_DIR), purge_step=start_step + 1 if start_step else None)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for name in TB_SCALARS:
            if record.get(name) is not None:
                self.tb.add_scalar(f"train/{name}", record[name], record["step"])
        for m, load_E in enumerate(record.get("expert_load", [])):
            self.tb.add_scalar(f"imbalance/moe_layer{m}", imbalance([load_E]), record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()
