"""Router base class and the loss terms several routers share.

Shape legend: T tokens, D model dim, E experts, K experts per token.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fsmoe.config import ConfigError, RouterConfig
from fsmoe.routing.plan import RoutingPlan


class Router(nn.Module):
    """Maps tokens ``x_TD`` to a :class:`RoutingPlan`. Knows nothing about ranks.

    Subclasses set ``causal`` (False when a token's routing depends on other tokens of the
    sequence, e.g. SoftMoE and Expert-Choice) and ``order`` (``"index"``: the plan's assignments
    are gathered; ``"soft"``: slots are mixtures of tokens, see SoftPlan).
    """

    causal: ClassVar[bool] = True
    order: ClassVar[str] = "index"

    def __init__(self, cfg: RouterConfig, d_model: int, num_experts: int):
        super().__init__()
        self.cfg, self.d_model, self.num_experts = cfg, d_model, num_experts
        # Process group whose ranks together hold the global batch (set by fsmoe.parallel; None in
        # one process): batch statistics (load-balancing f_e, DeepSeek loads) are summed over it.
        self.balance_group = None

    @classmethod
    def check_config(cls, cfg: RouterConfig, num_experts: int, prefix: str) -> None:
        """Raise ConfigError for settings this router cannot honour (default: none)."""

    def forward(self, x_TD: Tensor, seq_len: int) -> RoutingPlan:  # pragma: no cover - abstract
        """x_TD: [T, D], T = B*seq_len tokens laid out sequence by sequence."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called by the trainer after each optimizer step (e.g. aux-loss-free bias update)."""

    def use_kernels(self, impl: str) -> None:
        """Build-time choice of kernels, ``'torch'`` or ``'triton'`` (see fsmoe.select);
        routers with a fused path override this. Called once by MoELayer after construction."""


def z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def load_balancing_loss(probs_TE: Tensor, tokens_per_expert_E: Tensor, top_k: int, group=None) -> Tensor:
    """Switch/GShard loss E * sum_e f_e * P_e.

    f_e: fraction of the T*K assignments routed to expert e (before capacity drops; no gradient),
    P_e: mean router probability of expert e (carries the gradient). Equals 1 when balanced.
    group: when the batch is split over ranks, f_e is taken over the whole batch (counts and T
    summed over ``group``; a collective) while P_e stays this rank's mean, so the mean over ranks
    of this loss is the one-process loss on the whole batch, value and gradient.
    """
    T, E = probs_TE.shape
    counts_E, total = tokens_per_expert_E.to(probs_TE.dtype), T
    if group is not None:
        stats = torch.cat([counts_E, counts_E.new_full((1,), T)])
        dist.all_reduce(stats, group=group)
        counts_E, total = stats[:E], stats[E]
    f_E = counts_E / (total * top_k)
    return E * (f_E * probs_TE.mean(0)).sum()


def add_common_losses(cfg: RouterConfig, logits_TE: Tensor, losses: dict[str, Tensor]) -> dict[str, Tensor]:
    """Adds the z-loss (if enabled) to ``losses`` and returns it."""
    if cfg.z_loss_coef > 0 and torch.is_grad_enabled():
        losses["z_loss"] = cfg.z_loss_coef * z_loss(logits_TE)
    return losses


def require_unset(cfg: RouterConfig, prefix: str, router: str, names: tuple[str, ...]) -> None:
    """Raise ConfigError for each option in ``names`` that is set (not 0/None) but that
    ``router`` does not implement, so it is never silently ignored."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value != 0:
            raise ConfigError(f"{prefix}.{name}", value, f"must be 0/None: the {router!r} router does not use it")
