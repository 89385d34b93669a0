"""SoftMoE router (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts").

Shape legend: T tokens, D model dim, E experts, S slots per expert, X = E*S slots,
B sequences, L sequence length (T = B*L), N = E*B*S rows handed to the experts.

Each expert processes S *slots* per sequence; a slot is a convex mix of that sequence's tokens
and each token's output is a convex mix of the slots' outputs::

    logits_BLX = scale * normalize(x) @ normalize(Phi)    (Phi: [D, X], normalised per column)
    dispatch_BLX = softmax over L (the tokens feeding one slot)
    combine_BLX  = softmax over X (the slots feeding one token)

The L2 normalisation and learnable scalar ``scale`` (initialised to 1) follow the paper's
recipe for stable training at large D. Mixing over L makes the router non-causal.

The plan describes the slot rows for the dispatcher and experts, expert-major: row
``n = e*(B*S) + b*S + s`` is slot s of expert e for sequence b, so ``tokens_per_expert_E`` is B*S
for every expert and ``expert_ids_N`` is the row's expert. A slot has no single source token:
``token_ids_N = arange(N) % T`` is a placeholder that keeps the index range valid, and
``weights_N`` is 1; the real mixing weights are in ``plan.soft`` and are applied by
``fsmoe.order.SoftOrder`` (selected through ``order = "soft"``). Anything that reads token ids
(e.g. token deduplication) must skip plans with ``soft`` set.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsmoe.config import ConfigError
from fsmoe.routing import register_router
from fsmoe.routing.base import Router, add_common_losses, require_unset
from fsmoe.routing.plan import RoutingPlan, SoftPlan


@register_router("softmoe")
class SoftMoERouter(Router):
    """Per-sequence soft slots; ``top_k`` is unused (every expert sees every sequence)."""

    causal = False
    order = "soft"

    def __init__(self, cfg, d_model, num_experts):
        super().__init__(cfg, d_model, num_experts)
        X = num_experts * cfg.slots_per_expert
        self.phi_DX = nn.Parameter(torch.empty(d_model, X))
        self.scale = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Also called by the model's initialiser (on a seeded stream) after a meta-device build."""
        with torch.no_grad():
            self.phi_DX.normal_(0.0, 1.0 / math.sqrt(self.d_model))
            self.scale.fill_(1.0)

    @classmethod
    def check_config(cls, cfg, num_experts, prefix):
        require_unset(cfg, prefix, "softmoe", ("capacity_factor", "noise_std"))
        if not isinstance(cfg.slots_per_expert, int) or cfg.slots_per_expert < 1:
            raise ConfigError(f"{prefix}.slots_per_expert", cfg.slots_per_expert, "must be an integer >= 1")

    def logits(self, x_TD: Tensor) -> Tensor:
        """x_TD: [T, D] -> slot logits [T, X] (float32)."""
        x_n = F.normalize(x_TD.float(), dim=-1, eps=1e-6)
        phi_n = F.normalize(self.phi_DX.float(), dim=0, eps=1e-6)
        return self.scale * (x_n @ phi_n)

    def forward(self, x_TD: Tensor, seq_len: int) -> RoutingPlan:
        """x_TD: [T, D] with T = B*seq_len, sequence by sequence -> soft plan, N = E*B*S."""
        T = x_TD.shape[0]
        if seq_len < 1 or T % seq_len:
            raise ValueError(f"softmoe: {T} tokens are not a whole number of sequences of length {seq_len}")
        B, L, E, S = T // seq_len, seq_len, self.num_experts, self.cfg.slots_per_expert
        logits_TX = self.logits(x_TD)
        logits_BLX = logits_TX.view(B, L, E * S)
        soft = SoftPlan(dispatch_BLX=logits_BLX.softmax(dim=1), combine_BLX=logits_BLX.softmax(dim=2),
                        slots_per_expert=S)
        losses = add_common_losses(self.cfg, logits_TX, {})
        N, dev = E * B * S, x_TD.device
        return RoutingPlan(
            token_ids_N=torch.arange(N, device=dev) % T,  # placeholder, see module docstring
            expert_ids_N=torch.arange(E, device=dev).repeat_interleave(B * S),
            weights_N=torch.ones(N, device=dev, dtype=x_TD.dtype),
            tokens_per_expert_E=torch.full((E,), B * S, device=dev, dtype=torch.int64),
            num_tokens=T, num_experts=E, aux_losses=losses, dropped=torch.zeros((), dtype=torch.int64, device=dev),
            probs_TE=soft.combine_BLX.reshape(T, E, S).sum(-1).detach(),  # each token's mass per expert
            soft=soft)
