"""Order and I-Order: put tokens into expert order and back.

Shape legend: T tokens, D model dim, E experts, N assignments, B sequences, L sequence length,
X = E*S slots (SoftMoE).

``IndexOrder`` gathers one row per assignment (``[N, D]``, grouped by expert) and, on the way
back, scales each row by its routing weight and sums the rows of each token (scatter-add).
``SoftOrder`` mixes tokens into slots (SoftMoE). Both are plain PyTorch; GPU kernels with the
same signatures live in ``fsmoe.kernels`` and are chosen at build time.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from fsmoe.kernels.permute import combine_rows, combine_rows_ref, permute_rows
from fsmoe.routing.plan import RoutingPlan


class Order(ABC):
    """Stateless: ``permute(x_TD, plan) -> x_ND``, ``unpermute(y_ND, plan) -> y_TD``."""

    @abstractmethod
    def permute(self, x_TD: Tensor, plan: RoutingPlan) -> Tensor: ...

    @abstractmethod
    def unpermute(self, y_ND: Tensor, plan: RoutingPlan) -> Tensor: ...


class IndexOrder(Order):
    def permute(self, x_TD: Tensor, plan: RoutingPlan) -> Tensor:
        """x_TD [T, D] -> [N, D], row n = x[token_ids_N[n]] (dropped rows included, at the end)."""
        return x_TD.index_select(0, plan.token_ids_N)

    def unpermute(self, y_ND: Tensor, plan: RoutingPlan) -> Tensor:
        """y_ND [N, D] -> [T, D]: y[t] = sum over t's assignments of weight * row; dropped rows
        carry weight 0 (:func:`~fsmoe.kernels.permute.combine_rows_ref`)."""
        return combine_rows_ref(y_ND, plan.weights_N, plan.token_ids_N, plan.token_slots_TK, plan.expert_ids_N,
                                plan.num_experts, plan.num_tokens)


class SoftOrder(Order):
    """SoftMoE: slots = dispatch^T x per sequence; tokens = combine · slots."""

    def permute(self, x_TD: Tensor, plan: RoutingPlan) -> Tensor:
        soft = plan.soft
        B, L, X = soft.dispatch_BLX.shape
        S = soft.slots_per_expert
        E = X // S
        slots_BXD = torch.einsum("blx,bld->bxd", soft.dispatch_BLX.to(x_TD.dtype), x_TD.view(B, L, -1))
        # expert-major: [B, E, S, D] -> [E, B, S, D] -> [E*B*S, D]
        return slots_BXD.view(B, E, S, -1).transpose(0, 1).reshape(E * B * S, -1)

    def unpermute(self, y_ND: Tensor, plan: RoutingPlan) -> Tensor:
        soft = plan.soft
        B, L, X = soft.combine_BLX.shape
        S = soft.slots_per_expert
        E = X // S
        slots_BXD = y_ND.view(E, B, S, -1).transpose(0, 1).reshape(B, X, -1)
        y_BLD = torch.einsum("blx,bxd->bld", soft.combine_BLX.to(y_ND.dtype), slots_BXD)
        return y_BLD.reshape(B * L, -1)


ORDERS = {"index": IndexOrder, "soft": SoftOrder}


class FusedIndexOrder(IndexOrder):
    """The index Order on the kernels of ``fsmoe.kernels.permute``. Plans from
    ``RoutingPlan.from_topk`` carry ``token_slots_TK`` (each token's K rows), which turns both the
    permute backward and the unpermute forward into gathers (no atomics). Plans without it
    (expert choice: a token may have any number of rows) take the reference path."""

    def permute(self, x_TD: Tensor, plan: RoutingPlan) -> Tensor:
        """x_TD [T, D] -> [N, D], row n = x[token_ids_N[n]] (dropped rows included, at the end)."""
        if plan.token_slots_TK is None:
            return super().permute(x_TD, plan)
        return permute_rows(x_TD, plan.token_ids_N, plan.token_slots_TK, plan.expert_ids_N, plan.num_experts)

    def unpermute(self, y_ND: Tensor, plan: RoutingPlan) -> Tensor:
        """y_ND [N, D] -> [T, D]: y[t] = sum over t's kept assignments of weight * row."""
        if plan.token_slots_TK is None:
            return super().unpermute(y_ND, plan)
        return combine_rows(y_ND, plan.weights_N, plan.token_ids_N, plan.token_slots_TK, plan.expert_ids_N,
                            plan.num_experts, plan.num_tokens)


class SummedIndexOrder(IndexOrder):
    """The index Order for a dispatcher that applies the routing weights itself and returns each
    token's weighted sum in one of its rows (``Dispatcher.applies_weights``: the hierarchical
    dispatcher). Permute is the index Order's; unpermute sums a token's rows, unweighted."""

    def unpermute(self, y_ND: Tensor, plan: RoutingPlan) -> Tensor:
        """y_ND [N, D] -> [T, D]: y[t] = sum of t's rows (every other row is 0)."""
        return y_ND.new_zeros(plan.num_tokens, y_ND.shape[1]).index_add(0, plan.token_ids_N, y_ND)
