"""Expert-Choice router (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").

Shape legend: T tokens, D model dim, E experts, C tokens per expert, N = E*C assignments.

Instead of tokens picking experts, every expert picks its C highest-scoring tokens::

    scores_TE = softmax over experts of (x W)
    C = ceil(ec_capacity_factor * T * top_k / E), clamped to [1, T]

so each expert gets exactly C tokens (perfect balance by construction, no aux loss; the
``aux_loss_coef`` option is ignored). A token may be picked by several experts or by none; a
token picked by none gets a zero MoE output (the residual carries it). The combine weight is
the token's score for that expert, not renormalised (as in the paper).

The choice is made over *all* T tokens of the batch (every sequence together), so a token's
routing depends on the other tokens, future ones included: the router is non-causal, and the
result depends on the batch (at inference, a batch of one sequence routes differently).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fsmoe.routing import register_router
from fsmoe.routing.base import Router, add_common_losses, require_unset
from fsmoe.routing.plan import RoutingPlan, expert_capacity


def expert_choice_capacity(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    """C = ceil(factor * T * K / E), at least 1 and at most T (an expert cannot pick a token twice)."""
    return min(num_tokens, expert_capacity(num_tokens, top_k, num_experts, factor))


@register_router("expert_choice")
class ExpertChoiceRouter(Router):
    """softmax(x W) over experts -> each expert takes its top-C tokens."""

    causal = False

    def __init__(self, cfg, d_model, num_experts):
        super().__init__(cfg, d_model, num_experts)
        self.proj = nn.Linear(d_model, num_experts, bias=False)

    @classmethod
    def check_config(cls, cfg, num_experts, prefix):
        # Capacity is the router's own C (ec_capacity_factor); a second, token-choice capacity
        # would be meaningless.
        require_unset(cfg, prefix, "expert_choice", ("capacity_factor", "noise_std"))

    def forward(self, x_TD: Tensor, seq_len: int) -> RoutingPlan:
        """x_TD: [T, D] (all sequences of the batch) -> plan with N = E*C assignments."""
        cfg, E, T = self.cfg, self.num_experts, x_TD.shape[0]
        logits_TE = self.proj(x_TD).float()
        scores_TE = logits_TE.softmax(dim=-1)
        C = expert_choice_capacity(T, cfg.top_k, E, cfg.ec_capacity_factor)
        w_EC, tok_EC = scores_TE.t().topk(C, dim=-1)
        exp_EC = torch.arange(E, device=x_TD.device).unsqueeze(1).expand(E, C)
        losses = add_common_losses(cfg, logits_TE, {})
        return RoutingPlan.from_assignments(tok_EC.reshape(-1), exp_EC.reshape(-1), w_EC.reshape(-1).to(x_TD.dtype),
                                            T, E, aux_losses=losses, probs_TE=scores_TE)
