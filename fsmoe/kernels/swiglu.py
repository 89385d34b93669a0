"""SwiGLU activation ``silu(a) * b`` as one kernel each way.

Shape legend: N rows, F hidden dim.

Unfused, autograd runs silu, mul (forward) and three elementwise kernels (backward) and keeps
``silu(a)`` alive; the fused op reads a and b once, writes h once, and its backward reads
a, b, dh and writes da, db (computed in float32).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def swiglu_ref(a_NF: Tensor, b_NF: Tensor) -> Tensor:
    """silu(a) * b, plain PyTorch."""
    return F.silu(a_NF) * b_NF


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        from fsmoe.kernels import triton_ops

        a, b = a.contiguous(), b.contiguous()
        ctx.save_for_backward(a, b)
        return triton_ops.swiglu_fwd(a, b)

    @staticmethod
    def backward(ctx, dh):
        from fsmoe.kernels import triton_ops

        a, b = ctx.saved_tensors
        return triton_ops.swiglu_bwd(a, b, dh.contiguous())


def swiglu(a_NF: Tensor, b_NF: Tensor) -> Tensor:
    """Same as :func:`swiglu_ref`; one Triton kernel forward and one backward on CUDA."""
    if not a_NF.is_cuda:
        return swiglu_ref(a_NF, b_NF)
    return _SwiGLU.apply(a_NF, b_NF)
