"""``train.cuda_graph``: the device part of a training step captured once as a CUDA graph and
replayed every step after, so the host issues one launch per step instead of thousands.

What makes the step capturable (checked in ``RunConfig._validate_cuda_graph`` for what is not):
- static shapes: dropless routing keeps every MoE layer's rows at tokens x top-k, and the
  experts' offsets stay on the device (no host synchronisation anywhere in the step);
- the batch is copied into two fixed device buffers before each replay;
- AdamW runs ``capturable``, with its learning rate in a device tensor that the LR schedule fills
  between replays (a Python float would be frozen into the graph);
- the 1-based step number the non-finite guard records is a device counter the graph advances;
  the guard updates its tensors in place (fsmoe.guard);
- autocast does not cache weight casts (the trainer builds it that way under this option).

The first ``WARMUP_STEPS`` steps run eagerly, on a side stream (lazy initialisation: optimizer
state, cuBLAS workspaces, the expert GEMMs' tile choice), then the step is captured and every
step from there on, the one that triggered the capture included, is a replay. Checkpoints hold
plain floats for the learning rate, so a run resumes with or without graphs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from fsmoe.train import DeviceStep, StepResult, Trainer

WARMUP_STEPS = 3


class GraphedStep:
    """The trainer's step under ``train.cuda_graph`` (``Trainer.train_step`` hands over to ``step``)."""

    def __init__(self, trainer: "Trainer"):
        if trainer.device.type != "cuda":
            from fsmoe.config import ConfigError

            raise ConfigError("train.cuda_graph", True, f"needs a CUDA device (the run is on {trainer.device})")
        self.trainer = trainer
        self.eager_steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: DeviceStep | None = None

    def step(self) -> "StepResult":
        t = self.trainer
        if self.graph is None and self.eager_steps < WARMUP_STEPS:
            self.eager_steps += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                result = t.train_step_eager()
            torch.cuda.current_stream().wait_stream(side)
            return result
        if self.graph is None:
            self._capture()
        lr = self._host_lr()
        t.next_batch(into=(self.x_BL, self.y_BL))
        self.graph.replay()
        return t.finish_step(self.out.clone(), lr)

    def _host_lr(self) -> float:
        """The learning rate this step uses, as the schedule computes it (no device read)."""
        s = self.trainer.scheduler
        return s.base_lrs[0] * s.lr_lambdas[0](s.last_epoch)

    def _capture(self) -> None:
        t = self.trainer
        torch.cuda.synchronize()
        for g in t.optimizer.param_groups:
            # read by the graph from here; the schedule's step() fills it in place (fsmoe.train)
            g["lr"] = torch.tensor(float(g["lr"]), device=t.device)
            g["capturable"] = True
        shape = (t.tcfg.batch_size, t.tcfg.seq_len)  # one process: the whole batch
        self.x_BL = torch.zeros(shape, dtype=torch.long, device=t.device)
        self.y_BL = torch.zeros(shape, dtype=torch.long, device=t.device)
        self.step_number = torch.full((), t.step + 1, dtype=torch.long, device=t.device)
        torch.cuda.empty_cache()  # the warm-up's cached blocks back to the device: the graph has its own pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = t.device_step(self.x_BL, self.y_BL, self.step_number)
            self.step_number += 1
