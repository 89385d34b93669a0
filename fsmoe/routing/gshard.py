"""GShard noisy top-k softmax router (k=1 is Switch), optional capacity, load-balancing loss.

Shape legend: T tokens, D model dim, E experts, K experts per token.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fsmoe.kernels.router import softmax_topk_fn
from fsmoe.routing import register_router
from fsmoe.routing.base import Router, add_common_losses, load_balancing_loss
from fsmoe.routing.plan import RoutingPlan, count_experts, expert_capacity


@register_router("gshard")
class GShardRouter(Router):
    """softmax(x W + noise) -> top-k -> (renormalised) weights.

    Noise ~ N(0, noise_std^2) is added to the logits in training only (GShard's noisy top-k).
    """

    def __init__(self, cfg, d_model, num_experts):
        super().__init__(cfg, d_model, num_experts)
        self.proj = nn.Linear(d_model, num_experts, bias=False)
        self.softmax_topk = softmax_topk_fn("torch")  # (logits, k, normalize) -> probs, weights, ids

    def use_kernels(self, impl: str) -> None:
        self.softmax_topk = softmax_topk_fn(impl)

    def forward(self, x_TD: Tensor, seq_len: int) -> RoutingPlan:
        cfg, E, K = self.cfg, self.num_experts, self.cfg.top_k
        logits_TE = self.proj(x_TD).float()
        noisy_TE = logits_TE
        if self.training and cfg.noise_std > 0:
            noisy_TE = logits_TE + torch.randn_like(logits_TE) * cfg.noise_std
        probs_TE, w_TK, ids_TK = self.softmax_topk(noisy_TE, K, cfg.normalize_weights and K > 1)
        counts_E = count_experts(ids_TK, E)
        losses: dict[str, Tensor] = {}
        if cfg.aux_loss_coef > 0 and torch.is_grad_enabled():
            losses["load_balance"] = cfg.aux_loss_coef * load_balancing_loss(probs_TE, counts_E, K, self.balance_group)
        add_common_losses(cfg, logits_TE, losses)  # z-loss on the learned logits, not the noise
        cap = None if cfg.capacity_factor is None else expert_capacity(x_TD.shape[0], K, E, cfg.capacity_factor)
        return RoutingPlan.from_topk(ids_TK, w_TK.to(x_TD.dtype), E, cap, aux_losses=losses, probs_TE=probs_TE)
