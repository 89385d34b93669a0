"""X-MoE router (Chi et al. 2022, "On the Representation Collapse of Sparse Mixture of Experts").

Shape legend: T tokens, D model dim, R routing dim (``xmoe_dim``), E experts, K experts per token.

Routing happens in a small space: tokens are projected D -> R, both the projected tokens and the
learnable expert embeddings ``[E, R]`` are L2-normalised, and the cosine similarities are
divided by a learnable temperature before the softmax. The low dimension and the cosine keep the
router from collapsing token representations onto the expert embeddings (the paper's point).

The temperature is stored as ``log(1/tau)`` (initialised from ``xmoe_temperature``, 0.07 in the
paper) so that the optimiser takes relative steps and weight decay cannot push tau through 0;
``1/tau`` is clamped to at most 100 (tau >= 0.01), as CLIP does for its logit scale, so the
logits stay bounded by 100 in magnitude.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsmoe.config import ConfigError
from fsmoe.routing import register_router
from fsmoe.routing.base import Router, add_common_losses, load_balancing_loss, require_unset
from fsmoe.routing.plan import RoutingPlan, count_experts, expert_capacity

MAX_INV_TEMPERATURE = 100.0


@register_router("xmoe")
class XMoERouter(Router):
    """softmax(cos(x P, e) / tau) -> top-k -> (renormalised) weights; tau learnable."""

    def __init__(self, cfg, d_model, num_experts):
        super().__init__(cfg, d_model, num_experts)
        self.proj = nn.Linear(d_model, cfg.xmoe_dim, bias=False)
        # Orthogonal init spreads the experts evenly on the sphere (gain is irrelevant to the
        # cosine; 0.32 follows the authors' code and only sets the gradient scale).
        self.expert_emb_ER = nn.Parameter(torch.empty(num_experts, cfg.xmoe_dim))
        self.log_inv_temp = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Own parameters only (``proj`` is a Linear the model initialiser handles); also called
        by the model's initialiser on a seeded stream after a meta-device build."""
        with torch.no_grad():
            nn.init.orthogonal_(self.expert_emb_ER, gain=0.32)
            self.log_inv_temp.fill_(math.log(1.0 / self.cfg.xmoe_temperature))

    @classmethod
    def check_config(cls, cfg, num_experts, prefix):
        require_unset(cfg, prefix, "xmoe", ("noise_std",))
        if not isinstance(cfg.xmoe_dim, int):
            raise ConfigError(f"{prefix}.xmoe_dim", cfg.xmoe_dim, "must be a positive integer")
        if cfg.xmoe_temperature < 1.0 / MAX_INV_TEMPERATURE:
            raise ConfigError(f"{prefix}.xmoe_temperature", cfg.xmoe_temperature,
                              f"must be >= {1.0 / MAX_INV_TEMPERATURE} (the clamp on the learnable temperature)")

    def inv_temperature(self) -> Tensor:
        """1/tau as used in forward (scalar, clamped to [0, MAX_INV_TEMPERATURE])."""
        return self.log_inv_temp.clamp(max=math.log(MAX_INV_TEMPERATURE)).exp()

    def logits(self, x_TD: Tensor) -> Tensor:
        """x_TD: [T, D] -> cosine logits [T, E] (float32), cos(x P, e) / tau."""
        z_TR = F.normalize(self.proj(x_TD).float(), dim=-1, eps=1e-6)
        e_ER = F.normalize(self.expert_emb_ER.float(), dim=-1, eps=1e-6)
        return (z_TR @ e_ER.t()) * self.inv_temperature()

    def forward(self, x_TD: Tensor, seq_len: int) -> RoutingPlan:
        """x_TD: [T, D] -> plan with N = T*K assignments."""
        cfg, E, K = self.cfg, self.num_experts, self.cfg.top_k
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        w_TK, ids_TK = probs_TE.topk(K, dim=-1)
        if cfg.normalize_weights and K > 1:
            w_TK = w_TK / w_TK.sum(-1, keepdim=True)
        counts_E = count_experts(ids_TK, E)
        losses: dict[str, Tensor] = {}
        if cfg.aux_loss_coef > 0 and torch.is_grad_enabled():
            losses["load_balance"] = cfg.aux_loss_coef * load_balancing_loss(probs_TE, counts_E, K, self.balance_group)
        add_common_losses(cfg, logits_TE, losses)
        cap = None if cfg.capacity_factor is None else expert_capacity(x_TD.shape[0], K, E, cfg.capacity_factor)
        return RoutingPlan.from_topk(ids_TK, w_TK.to(x_TD.dtype), E, cap, aux_losses=losses, probs_TE=probs_TE)
