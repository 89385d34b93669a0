"""Sigmoid top-k router (BASE Layers / StableMoE style gate).

Shape legend: T tokens, D model dim, E experts, K experts per token.

Each expert gets an independent score ``sigmoid(x W)``; a token takes its K best experts and
combines them with those scores (renormalised to sum 1 when ``normalize_weights`` and K > 1;
with K = 1 the raw score is kept, otherwise the weight would be 1 and the gate would get no
gradient). Sigmoid scores do not sum to 1, so the load-balancing loss uses them normalised per
token, ``s / sum_j s_j``, as the "probabilities". There is no z-loss: the logits feed
independent sigmoids, not a softmax.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fsmoe.routing import register_router
from fsmoe.routing.base import Router, load_balancing_loss, require_unset
from fsmoe.routing.plan import RoutingPlan, count_experts, expert_capacity


@register_router("sigmoid")
class SigmoidRouter(Router):
    """scores = sigmoid(x W) -> top-k -> weights = scores (optionally renormalised)."""

    def __init__(self, cfg, d_model, num_experts):
        super().__init__(cfg, d_model, num_experts)
        self.proj = nn.Linear(d_model, num_experts, bias=False)

    @classmethod
    def check_config(cls, cfg, num_experts, prefix):
        require_unset(cfg, prefix, "sigmoid", ("z_loss_coef", "noise_std"))

    def forward(self, x_TD: Tensor, seq_len: int) -> RoutingPlan:
        """x_TD: [T, D] -> plan with N = T*K assignments."""
        cfg, E, K = self.cfg, self.num_experts, self.cfg.top_k
        scores_TE = torch.sigmoid(self.proj(x_TD).float())
        w_TK, ids_TK = scores_TE.topk(K, dim=-1)
        if cfg.normalize_weights and K > 1:
            w_TK = w_TK / w_TK.sum(-1, keepdim=True)
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        counts_E = count_experts(ids_TK, E)
        losses: dict[str, Tensor] = {}
        if cfg.aux_loss_coef > 0 and torch.is_grad_enabled():
            losses["load_balance"] = cfg.aux_loss_coef * load_balancing_loss(probs_TE, counts_E, K, self.balance_group)
        cap = None if cfg.capacity_factor is None else expert_capacity(x_TD.shape[0], K, E, cfg.capacity_factor)
        return RoutingPlan.from_topk(ids_TK, w_TK.to(x_TD.dtype), E, cap, aux_losses=losses, probs_TE=probs_TE)
