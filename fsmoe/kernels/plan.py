"""The routing plan of a token-choice router in four launches instead of about seventeen.

Shape legend: T tokens, K choices per token, E experts, N = T*K assignments.

``plan_from_topk`` returns exactly what :meth:`RoutingPlan.from_topk` returns (same rows in the
same order: the same stable sort of the same k-major keys), for the dropless case on CUDA:

1. one kernel writes the k-major expert ids as 1-byte keys;
2. ``torch.sort(stable=True)`` (a one-pass radix sort on 1-byte keys);
3. one kernel reads the per-expert counts off the sorted keys (binary searches);
4. one kernel writes token ids, expert ids, weights and each token's slots.

Host time is what this saves: the eager layer's forward starts with ~45 small launches before its
first GEMM, and the GPU idles while the host issues them (docs/performance.md). With a capacity,
on CPU, or with E >= 255 it is the reference.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fsmoe.routing.plan import RoutingPlan


class _PlanFinish(torch.autograd.Function):
    """weights_N[n] = w_TK[t, k] of row n's assignment; backward gathers dw_N by the slots."""

    @staticmethod
    def forward(ctx, perm_N, sorted_keys_N, w_TK):
        from fsmoe.kernels import triton_ops

        tok, exp, w, slots = triton_ops.plan_finish(perm_N, sorted_keys_N, w_TK)
        ctx.save_for_backward(slots)
        ctx.mark_non_differentiable(tok, exp, slots)
        return tok, exp, w, slots

    @staticmethod
    def backward(ctx, _dtok, _dexp, dw_N, _dslots):
        (slots,) = ctx.saved_tensors
        return None, None, dw_N.index_select(0, slots.view(-1)).view(slots.shape)


def fast_plan_from_topk(ids_TK: Tensor, weights_TK: Tensor, num_experts: int, **extra) -> RoutingPlan:
    """The Triton path (dropless, E < 255); any device the kernels run on."""
    from fsmoe.kernels import triton_ops

    T, K = ids_TK.shape
    keys = triton_ops.kmajor_keys(ids_TK, torch.uint8)
    sorted_keys, perm = torch.sort(keys, stable=True)
    counts = triton_ops.sorted_counts(sorted_keys, num_experts)
    tok, exp, w, slots = _PlanFinish.apply(perm, sorted_keys, weights_TK.contiguous())
    return RoutingPlan(tok, exp, w, counts[:num_experts], T, num_experts, dropped=counts[num_experts],
                       token_slots_TK=slots, **extra)


def plan_from_topk(ids_TK: Tensor, weights_TK: Tensor, num_experts: int, capacity: int | None = None,
                   **extra) -> RoutingPlan:
    """Same signature and result as :meth:`RoutingPlan.from_topk`."""
    if capacity is not None or not ids_TK.is_cuda or num_experts >= 255 or ids_TK.numel() == 0:
        return RoutingPlan.from_topk(ids_TK, weights_TK, num_experts, capacity, **extra)
    return fast_plan_from_topk(ids_TK, weights_TK, num_experts, **extra)
