"""The non-finite guard (``train.on_nonfinite``): a NaN or Inf never reaches the weights or a checkpoint.

Every step computes ``finite = isfinite(loss) & isfinite(aux loss) & isfinite(grad norm)`` on the
device. A step that is not finite is never applied: on CUDA the fused AdamW skips it by itself
(its ``found_inf`` input, the mechanism ``torch.amp.GradScaler`` uses), so the host never waits
for the flag; on CPU the flag is read directly (free there). The LR schedule advances either way.

    stop  (default) the run ends with an error at the next step whose results are read (a logged
          or checkpoint step), naming the first non-finite step; nothing is written after it,
          so the newest checkpoint is the last good one
    skip  training goes on; ``skipped_steps`` in metrics.jsonl counts the steps not applied

Before a checkpoint is written every parameter is checked to be finite, whatever the policy.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fsmoe.config import ConfigError

class NonFiniteError(ConfigError):
    """Training produced NaN/Inf; the message says at which step and what to change."""

    def __init__(self, what: str, step: int, hint: str):
        self.field_name, self.value, self.allowed = "train.on_nonfinite", what, hint
        ValueError.__init__(self, f"{what} at step {step}: {hint}")


class NonFiniteGuard:
    """Skips non-finite steps on the device and keeps, on the device, how many there were and
    the first one (so reading them costs nothing extra: they travel with the step's metrics)."""

    def __init__(self, policy: str, device: torch.device):
        self.policy = policy
        self.count = torch.zeros((), dtype=torch.int64, device=device)  # non-finite steps so far
        self.first = torch.full((), -1, dtype=torch.int64, device=device)  # first such step (1-based), -1: none

    def apply(self, optimizer: torch.optim.Optimizer, finite: Tensor, step: int | Tensor,
              grad_coef: Tensor | None = None) -> None:
        """``optimizer.step()`` if ``finite`` (a scalar bool tensor), on gradients scaled by
        ``grad_coef`` (gradient clipping; None = as they are); ``step``: the 1-based step number
        (a device scalar in a captured step, which advances it itself).

        A fused optimizer takes both inside its one kernel (``found_inf``; ``grad_scale``, by which
        it divides the gradients), which saves a read and write of every gradient; otherwise the
        gradients are scaled in place first."""
        bad = ~finite
        prepare = getattr(optimizer, "prepare_step", None)
        if prepare is not None:  # an optimizer with gradient slices of its own (fsmoe.parallel.zero)
            prepare()
        # in place: a captured step (train.cuda_graph) must update the tensors the host reads
        self.first.copy_(torch.where(bad & (self.first < 0), step, self.first))
        self.count += bad
        if optimizer.defaults.get("fused"):
            optimizer.found_inf = bad.float()  # fused AdamW leaves params, moments and its step count
            optimizer.grad_scale = None if grad_coef is None else 1.0 / grad_coef
            optimizer.step()
            return
        if grad_coef is not None:
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, grad_coef.to(grads[0].device))
        if bool(finite):
            optimizer.step()

    def check(self, count: int, first: int) -> None:
        """Under 'stop', raise if any step so far was non-finite (``count``, ``first`` as read)."""
        if self.policy == "stop" and count:
            raise NonFiniteError(
                "the loss or gradient norm became NaN/Inf", first,
                "that update was not applied and nothing was saved after it, so the newest checkpoint "
                "is the last good one; lower train.lr (or raise train.warmup_steps, set train.grad_clip), "
                "or set train.on_nonfinite=skip to skip such steps and go on")

    @staticmethod
    def check_parameters(model: nn.Module, step: int) -> None:
        """Refuse to checkpoint weights that hold NaN/Inf (one host read for all parameters)."""
        flags = [torch.isfinite(p).all() for p in model.parameters()]
        if flags and not bool(torch.stack(flags).all()):
            raise NonFiniteError("a parameter holds NaN/Inf", step,
                                 "the checkpoint was not written, so the newest one on disk is the last good one; "
                                 "lower train.lr")
