"""Fused router step: softmax -> top-k -> (renormalised) weights in one kernel.

Shape legend: T tokens, E experts, K experts per token.

``softmax_topk(logits_TE, k, normalize) -> (probs_TE, weights_TK, ids_TK)``: probabilities in
float32 (the load-balancing loss differentiates through them), the K best experts in descending
order and their weights. The backward (a few [T, E] elementwise ops, small next to the layer)
is plain PyTorch: ``dlogits = p * (dp - <p, dp>)`` with ``dp`` gathering the gradients of both
outputs.
"""
from __future__ import annotations

import torch
from torch import Tensor


def softmax_topk_ref(logits_TE: Tensor, k: int, normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Plain PyTorch: softmax in float32, topk (sorted), optional renormalisation."""
    probs_TE = logits_TE.float().softmax(dim=-1)
    w_TK, ids_TK = probs_TE.topk(k, dim=-1)
    if normalize:
        w_TK = w_TK / w_TK.sum(-1, keepdim=True)
    return probs_TE, w_TK, ids_TK


class _SoftmaxTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, k, normalize):
        from fsmoe.kernels import triton_ops

        probs, w, ids = triton_ops.softmax_topk(logits_TE.float(), k, normalize)
        ctx.save_for_backward(probs, w, ids)
        ctx.normalize = normalize
        ctx.in_dtype = logits_TE.dtype
        ctx.mark_non_differentiable(ids)
        return probs, w, ids

    @staticmethod
    def backward(ctx, dprobs, dw, _dids):
        probs, w, ids = ctx.saved_tensors
        dp = dprobs.float() if dprobs is not None else torch.zeros_like(probs)
        if dw is not None:
            dw = dw.float()
            if ctx.normalize:  # w = p_sel / sum(p_sel): d p_sel = (dw - <dw, w>) / sum(p_sel)
                p_sel = probs.gather(1, ids)
                dw = (dw - (dw * w).sum(-1, keepdim=True)) / p_sel.sum(-1, keepdim=True)
            dp = dp.scatter_add(1, ids, dw)
        dlogits = probs * (dp - (probs * dp).sum(-1, keepdim=True))
        return dlogits.to(ctx.in_dtype), None, None


def softmax_topk(logits_TE: Tensor, k: int, normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Same as :func:`softmax_topk_ref`; one Triton kernel forward on CUDA."""
    if not logits_TE.is_cuda:
        return softmax_topk_ref(logits_TE, k, normalize)
    return _SoftmaxTopK.apply(logits_TE, k, normalize)


def softmax_topk_fn(impl: str):
    """``(logits_TE, k, normalize) -> (probs_TE, weights_TK, ids_TK)`` for ``impl`` 'torch' | 'triton'."""
    return softmax_topk if impl == "triton" else softmax_topk_ref
