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
    # [T, K] int64: row (position in N) of each token's k-th choice; set by ``from_topk``. Lets
    # I-Order gather-and-sum a token's rows instead of scattering (no atomics; fsmoe.kernels).
    token_slots_TK: Tensor | None = None

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
        perm, exp, kept, dropped = _sort_assignments(ids_N, num_experts, capacity)
        # Input assignment i = k*T + t landed at row slots[i]: invert the permutation (no sort).
        slots_N = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))
        return RoutingPlan(perm % T, exp, _take(w_N, perm, exp, num_experts, capacity), kept, T, num_experts,
                           dropped=dropped, token_slots_TK=slots_N.view(K, T).t().contiguous(), **extra)

    @staticmethod
    def from_assignments(token_ids_N: Tensor, expert_ids_N: Tensor, weights_N: Tensor, num_tokens: int,
                         num_experts: int, capacity: int | None = None, **extra) -> "RoutingPlan":
        """Plan from an unsorted list of (token, expert, weight); earlier entries win capacity."""
        perm, exp, kept, dropped = _sort_assignments(expert_ids_N, num_experts, capacity)
        w = _take(weights_N, perm, exp, num_experts, capacity)
        return RoutingPlan(token_ids_N.index_select(0, perm), exp, w, kept, num_tokens, num_experts,
                           dropped=dropped, **extra)


def count_experts(ids: Tensor, num_experts: int) -> Tensor:
    """Assignments per expert, [E] int64, without the host synchronisation of ``bincount``
    (which reads the max id back on CUDA). Ids outside [0, E) are not allowed."""
    ids = ids.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(
        0, ids, torch.ones_like(ids, dtype=torch.int64))


def _sort_keys(expert_ids_N: Tensor, num_experts: int) -> Tensor:
    """The narrowest integer type that holds 0..E (a radix sort then makes fewer passes)."""
    if num_experts < 255:
        return expert_ids_N.to(torch.uint8)
    if num_experts < 32767:
        return expert_ids_N.to(torch.int16)
    return expert_ids_N.to(torch.int32)


def _sort_assignments(expert_ids_N: Tensor, num_experts: int, capacity: int | None):
    """Stable sort by expert, capacity drops moved to the end with id E. No host sync.

    Returns (perm_N: input index of each output row, expert_ids_N sorted (int64, E = dropped),
    kept per expert [E], dropped scalar).
    """
    E = num_experts
    keys, perm = torch.sort(_sort_keys(expert_ids_N, E), stable=True)
    bounds = torch.searchsorted(keys, torch.arange(E + 1, device=keys.device, dtype=keys.dtype))
    counts = (bounds[1:] - bounds[:-1]).to(torch.int64)  # keys are sorted: counts from boundaries
    exp = keys.to(torch.int64)
    if capacity is None:
        return perm, exp, counts, counts.new_zeros(())
    # Rank of each assignment inside its expert group: position - start of the group.
    rank = torch.arange(exp.numel(), device=exp.device) - bounds[:-1].to(torch.int64)[exp]
    exp = torch.where(rank < capacity, exp, torch.full_like(exp, E))
    # Move dropped assignments to the end (stable: kept ones stay grouped by expert).
    keys2, order2 = torch.sort(_sort_keys(exp, E), stable=True)
    kept = torch.clamp(counts, max=capacity)
    return perm[order2], keys2.to(torch.int64), kept, (counts - kept).sum()


def _take(weights_N: Tensor, perm_N: Tensor, exp_N: Tensor, num_experts: int, capacity: int | None) -> Tensor:
    """Weights in row order (index_select: perm is a permutation, so its backward is a plain
    scatter); with a capacity, 0 for dropped rows."""
    w = weights_N.index_select(0, perm_N)
    if capacity is None:
        return w
    return torch.where(exp_N < num_experts, w, torch.zeros_like(w))


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """GShard capacity: ceil(factor * T * K / E), at least 1.

    The tiny slack stops float error from adding a slot (1.1 * 10 = 11.000000000000002 -> 11).
    """
    exact = capacity_factor * num_tokens * top_k / num_experts
    return max(1, math.ceil(exact - 1e-9 * max(1.0, exact)))
