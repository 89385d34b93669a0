"""RoutingPlan: what a router decided, in a form every Order/Dispatch backend can consume.

Shape legend: T tokens, D model dim, E experts, K experts per token, N assignments
(token, expert) pairs (N = T*K for token-choice routers, E*C for expert choice),
B sequences, L sequence length, S slots per expert (SoftMoE).

The plan is a flat list of assignments sorted by expert (stable), with dropped assignments
(over capacity) moved to the end with expert id ``E`` and weight 0. Its length N is fixed by the
router's shapes, never by the data, so nothing needs a host synchronisation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class SoftPlan:
    """SoftMoE: every slot is a convex mix of the tokens of one sequence.

    dispatch_BLX: [B, L, E*S] softmax over L (which tokens feed a slot).
    combine_BLX:  [B, L, E*S] softmax over E*S (which slots feed a token).
    """

    dispatch_BLX: Tensor
    combine_BLX: Tensor
    slots_per_expert: int


@dataclass(frozen=True)
class RoutingPlan:
    token_ids_N: Tensor  # [N] int64: source token of each assignment, grouped by expert
    expert_ids_N: Tensor  # [N] int64: expert of each assignment; E marks a dropped one
    weights_N: Tensor  # [N] float: combine weight (differentiable w.r.t. the router), 0 if dropped
    tokens_per_expert_E: Tensor  # [E] int64: assignments kept per expert (sums to N - dropped)
    num_tokens: int  # T
    num_experts: int  # E
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # name -> weighted scalar loss
    dropped: Tensor | None = None  # scalar int64: assignments dropped by capacity
    probs_TE: Tensor | None = None  # [T, E] router probabilities (for statistics)
    soft: SoftPlan | None = None  # only for SoftMoE

    @property
    def num_assignments(self) -> int:
        return self.token_ids_N.numel()

    def aux_loss(self) -> Tensor:
        """Sum of the weighted auxiliary losses (0 if none)."""
        if not self.aux_losses:
            return self.weights_N.new_zeros(())
        return torch.stack(list(self.aux_losses.values())).sum()

    @staticmethod
    def from_topk(ids_TK: Tensor, weights_TK: Tensor, num_experts: int, capacity: int | None = None,
                  **extra) -> "RoutingPlan":
        """Plan from per-token choices.

        ids_TK: [T, K] int64 expert ids; weights_TK: [T, K] combine weights.
        capacity: max assignments per expert, or None for dropless. Priority within an expert
        goes to first choices (k=0) over second choices, then to earlier tokens (GShard).
        """
        T, K = ids_TK.shape
        # k-major flattening: all first choices before all second choices -> first-choice priority.
        ids_N = ids_TK.t().reshape(-1)
        w_N = weights_TK.t().reshape(-1)
        tok_N = torch.arange(T, device=ids_TK.device).repeat(K)
        return RoutingPlan.from_assignments(tok_N, ids_N, w_N, T, num_experts, capacity, **extra)

    @staticmethod
    def from_assignments(token_ids_N: Tensor, expert_ids_N: Tensor, weights_N: Tensor, num_tokens: int,
                         num_experts: int, capacity: int | None = None, **extra) -> "RoutingPlan":
        """Plan from an unsorted list of (token, expert, weight); earlier entries win capacity."""
        E = num_experts
        order = torch.argsort(expert_ids_N, stable=True)
        tok, exp, w = token_ids_N[order], expert_ids_N[order], weights_N[order]
        counts = torch.bincount(exp, minlength=E)
        if capacity is None:
            return RoutingPlan(tok, exp, w, counts, num_tokens, E, dropped=counts.new_zeros(()), **extra)
        # Rank of each assignment inside its expert group: position - start of the group.
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(exp.numel(), device=exp.device) - starts[exp]
        keep = rank < capacity
        exp = torch.where(keep, exp, torch.full_like(exp, E))
        w = torch.where(keep, w, torch.zeros_like(w))
        # Move dropped assignments to the end (stable: kept ones stay grouped by expert).
        order = torch.argsort(exp, stable=True)
        tok, exp, w = tok[order], exp[order], w[order]
        kept = torch.clamp(counts, max=capacity)
        return RoutingPlan(tok, exp, w, kept, num_tokens, E, dropped=(counts - kept).sum(), **extra)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """GShard capacity: ceil(factor * T * K / E), at least 1.

    The tiny slack stops float error from adding a slot (1.1 * 10 = 11.000000000000002 -> 11).
    """
    exact = capacity_factor * num_tokens * top_k / num_experts
    return max(1, math.ceil(exact - 1e-9 * max(1.0, exact)))
