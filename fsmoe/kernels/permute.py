"""Permute (Order) and weighted combine (I-Order) for token-choice plans.

Shape legend: T tokens, D model dim, N assignments in expert order, K choices per token,
E experts.

Inputs from a :class:`~fsmoe.routing.plan.RoutingPlan`: ``token_ids_N`` (source token of each
row), ``expert_ids_N`` (E marks a dropped row), ``weights_N`` and ``token_slots_TK`` (the row
of each token's k-th choice). With the slots, both directions are *gathers*: the backward of the
permute and the forward of the combine read each token's K rows and sum them, so no atomics, a
fixed summation order, and no ``[N, D]`` product of rows and weights is ever materialised.

``permute_rows`` / ``combine_rows`` run Triton kernels on CUDA tensors and the references
(``*_ref``, plain PyTorch, same signature) elsewhere.
"""
from __future__ import annotations

import torch
from torch import Tensor


# ----------------------------------------------------------------------------- references
def kept_rows(expert_ids_N: Tensor, num_experts: int) -> Tensor | None:
    """[N, 1] bool: the rows that are not dropped; None where every row is kept and that is known
    without a device sync (CPU tensors, every dropless plan), so the masks can be skipped: each
    is a full pass over [N, D]."""
    if expert_ids_N.device.type == "cpu" and bool((expert_ids_N.numpy() < num_experts).all()):
        return None  # (read through numpy: host memory, no tensor op that stands for a device sync)
    return (expert_ids_N < num_experts).unsqueeze(1)


def permute_rows_ref(x_TD: Tensor, token_ids_N: Tensor, token_slots_TK: Tensor, expert_ids_N: Tensor,
                     num_experts: int) -> Tensor:
    """x_TD [T, D] -> x_ND [N, D], row n = x[token_ids_N[n]] (dropped rows included).
    Backward: dx[t] = sum of the gradients of t's kept rows."""
    kept_N1 = kept_rows(expert_ids_N, num_experts)
    x_ND = x_TD.index_select(0, token_ids_N)
    if x_ND.requires_grad and kept_N1 is not None:  # dropped rows pass no gradient back, as in the fast path
        x_ND.register_hook(lambda g: torch.where(kept_N1, g, 0))
    return x_ND


def combine_rows_ref(y_ND: Tensor, weights_N: Tensor, token_ids_N: Tensor, token_slots_TK: Tensor,
                     expert_ids_N: Tensor, num_experts: int, num_tokens: int) -> Tensor:
    """y_ND [N, D] -> y_TD [T, D]: y[t] = sum over t's kept rows of weight * row. Dropped rows are
    set to 0 by ``where`` (not a product), which keeps garbage there from turning into NaN."""
    rows, kept_N1 = y_ND * weights_N.unsqueeze(1).to(y_ND.dtype), kept_rows(expert_ids_N, num_experts)
    rows = rows if kept_N1 is None else torch.where(kept_N1, rows, 0)
    return y_ND.new_zeros(num_tokens, y_ND.shape[1]).index_add(0, token_ids_N, rows)


# ----------------------------------------------------------------------------- Triton
def _ops():
    from fsmoe.kernels import triton_ops

    return triton_ops


def _rows(t: Tensor) -> Tensor:
    """Rows with unit stride along D (expanded gradients from ``y.sum()`` are materialised)."""
    return t if t.dim() == 2 and t.stride(1) == 1 else t.contiguous()


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, token_ids_N, token_slots_TK, expert_ids_N, num_experts):
        ctx.save_for_backward(token_slots_TK, expert_ids_N)
        ctx.num_experts = num_experts
        return _ops().gather_rows(_rows(x_TD), token_ids_N)

    @staticmethod
    def backward(ctx, g_ND):
        slots_TK, expert_ids_N = ctx.saved_tensors
        dx = _ops().gather_sum(_rows(g_ND), slots_TK, expert_ids_N, ctx.num_experts)
        return dx, None, None, None, None


class _CombineRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_ND, weights_N, token_ids_N, token_slots_TK, expert_ids_N, num_experts, num_tokens):
        y_ND = _rows(y_ND)
        ctx.save_for_backward(y_ND, weights_N, token_ids_N, expert_ids_N)
        ctx.num_experts = num_experts
        return _ops().gather_sum(y_ND, token_slots_TK, expert_ids_N, num_experts, weights_N)

    @staticmethod
    def backward(ctx, g_TD):
        y_ND, weights_N, token_ids_N, expert_ids_N = ctx.saved_tensors
        need_dw = ctx.needs_input_grad[1]
        dy_ND, dw_N = _ops().combine_bwd(_rows(g_TD), y_ND, token_ids_N, expert_ids_N, weights_N,
                                         ctx.num_experts, need_dw)
        return dy_ND, (dw_N.to(weights_N.dtype) if need_dw else None), None, None, None, None, None


def permute_rows(x_TD: Tensor, token_ids_N: Tensor, token_slots_TK: Tensor, expert_ids_N: Tensor,
                 num_experts: int) -> Tensor:
    """Same as :func:`permute_rows_ref`; a Triton gather (and gather-sum backward) on CUDA."""
    if not x_TD.is_cuda:
        return permute_rows_ref(x_TD, token_ids_N, token_slots_TK, expert_ids_N, num_experts)
    return _PermuteRows.apply(x_TD, token_ids_N, token_slots_TK, expert_ids_N, num_experts)


def combine_rows(y_ND: Tensor, weights_N: Tensor, token_ids_N: Tensor, token_slots_TK: Tensor,
                 expert_ids_N: Tensor, num_experts: int, num_tokens: int) -> Tensor:
    """Same as :func:`combine_rows_ref`; one Triton gather-sum with the weights fused on CUDA,
    and a backward that writes ``w * dy[token]`` and ``<dy[token], y_n>`` in one pass."""
    if not y_ND.is_cuda:
        return combine_rows_ref(y_ND, weights_N, token_ids_N, token_slots_TK, expert_ids_N, num_experts, num_tokens)
    return _CombineRows.apply(y_ND, weights_N, token_ids_N, token_slots_TK, expert_ids_N, num_experts, num_tokens)
