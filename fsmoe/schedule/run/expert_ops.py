"""The expert FFN of one chunk, forward and backward written out, for the pipelined executor.

Shape legend: K rows of the chunk grouped by local expert, D model dim, F hidden dim of this
ESP shard, El local experts.

The executor runs the backward at its own pipeline degree, so it cannot keep one autograd graph
per forward chunk: the forward saves each chunk's expert input ``x_KD`` and pre-activations
(``a_KF`` = x w1, ``b_KF`` = x w3 for SwiGLU), and the backward recomputes only the elementwise
activation. The math is ``fsmoe.experts.GroupedExperts`` exactly:

    gelu:   y = gelu(x w1) w2            swiglu: y = (silu(x w1) * (x w3)) w2
    dW2 += h^T dy      dh = dy w2^T      (da, db) = activation vjp      dW1 += x^T da
    dW3 += x^T db      dx = da w1^T + db w3^T
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fsmoe.kernels.grouped_mm import grouped_mm


@dataclass
class ExpertWeights:
    """The shard's weights: w1_EDF, w3_EDF (None for GeLU), w2_EFD."""

    w1_EDF: Tensor
    w3_EDF: Tensor | None
    w2_EFD: Tensor

    def tensors(self) -> tuple[Tensor, ...]:
        return tuple(w for w in (self.w1_EDF, self.w3_EDF, self.w2_EFD) if w is not None)

    @staticmethod
    def of(experts) -> "ExpertWeights":
        """From a ``GroupedExperts`` module."""
        return ExpertWeights(experts.w1_EDF, experts.w3_EDF, experts.w2_EFD)


def _offs(counts_El: Tensor) -> Tensor:
    return torch.cumsum(counts_El, 0).to(torch.int32)


def _act(a_KF: Tensor, b_KF: Tensor | None) -> Tensor:
    return F.gelu(a_KF) if b_KF is None else F.silu(a_KF) * b_KF


def expert_forward(x_KD: Tensor, counts_El: Tensor, w: ExpertWeights) -> tuple[Tensor, tuple]:
    """Returns (y_KD, saved) for :func:`expert_backward`."""
    offs = _offs(counts_El)
    a_KF = grouped_mm(x_KD, w.w1_EDF, offs)
    b_KF = grouped_mm(x_KD, w.w3_EDF, offs) if w.w3_EDF is not None else None
    y_KD = grouped_mm(_act(a_KF, b_KF), w.w2_EFD, offs)
    return y_KD, (x_KD, a_KF, b_KF)


def wgrad(x_KI: Tensor, dy_KO: Tensor, counts: list[int]) -> Tensor:
    """[El, I, O]: per local expert, x_e^T dy_e (one matmul per expert; El is small)."""
    out = x_KI.new_zeros(len(counts), x_KI.shape[1], dy_KO.shape[1])
    start = 0
    for e, c in enumerate(counts):
        if c:
            torch.mm(x_KI[start:start + c].t(), dy_KO[start:start + c], out=out[e])
        start += c
    return out


def expert_backward(saved: tuple, dy_KD: Tensor, counts_El: Tensor, counts: list[int], w: ExpertWeights,
                    wT: tuple[Tensor, Tensor | None, Tensor], grads: list[Tensor]) -> Tensor:
    """dx_KD; adds the weight gradients into ``grads`` = [dw1, (dw3), dw2] (same order as
    ``ExpertWeights.tensors``). ``wT`` = (w1^T [El,F,D], w3^T or None, w2^T [El,D,F]), contiguous."""
    x_KD, a_KF, b_KF = saved
    offs = _offs(counts_El)
    with torch.enable_grad():
        a = a_KF.detach().requires_grad_()
        b = b_KF.detach().requires_grad_() if b_KF is not None else None
        h_KF = _act(a, b)
    dh_KF = grouped_mm(dy_KD, wT[2], offs)
    grads[-1] += wgrad(h_KF.detach(), dy_KD, counts)
    da_KF, *db = torch.autograd.grad(h_KF, [a] + ([b] if b is not None else []), dh_KF)
    grads[0] += wgrad(x_KD, da_KF, counts)
    dx_KD = grouped_mm(da_KF, wT[0], offs)
    if b is not None:
        grads[1] += wgrad(x_KD, db[0], counts)
        dx_KD = dx_KD + grouped_mm(db[0], wT[1], offs)
    return dx_KD
