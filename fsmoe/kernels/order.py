"""FusedIndexOrder: the index Order (permute / weighted unpermute) on the kernels of permute.py.

Shape legend: T tokens, D model dim, N assignments in expert order.

Plans from ``RoutingPlan.from_topk`` carry ``token_slots_TK`` (each token's K rows), which turns
both the permute backward and the unpermute forward into gathers (no atomics). Plans without
it (expert choice: a token may have any number of rows) use the reference IndexOrder.
"""
from __future__ import annotations

from torch import Tensor

from fsmoe.kernels.permute import combine_rows, permute_rows
from fsmoe.order import IndexOrder
from fsmoe.routing.plan import RoutingPlan


class FusedIndexOrder(IndexOrder):
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
