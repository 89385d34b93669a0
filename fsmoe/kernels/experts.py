"""The routed experts' MLP on the GPU fast path (``expert_mlp``; ``fsmoe.experts.FusedGroupedExperts`` calls it).

Shape legend: N rows grouped by expert, D model dim, F hidden dim of this shard, E local experts.

Same parameters, initialisation, ESP sharding and contract as :class:`fsmoe.experts.GroupedExperts`
(so checkpoints and layouts are interchangeable); only ``forward`` differs, on CUDA:

1. x_ND -> torch grouped_mm with w1 and w3 (CUTLASS grouped GEMM, bf16), offsets stay on device;
2. fused SwiGLU (one Triton kernel each way) instead of silu + mul;
3. grouped_mm with w2;
4. rows past the last expert's end (dropped assignments) are zeroed in place by a kernel whose
   blocks before the end return at once, instead of ``where`` passes over all N rows around
   every matmul; their input gradient is zeroed the same way in backward.

Memory grows with the routed rows N, never with the busiest expert; no host synchronisation.
CPU tensors, and dtypes or shapes grouped_mm does not take, use the reference forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fsmoe.kernels.grouped_mm import grouped_mm_unmasked
from fsmoe.kernels.swiglu import swiglu


class _ZeroTailRows(torch.autograd.Function):
    """Forward: rows >= offs[-1] of y become 0 (in place). Backward: the gradient as is
    (grouped_mm never reads those rows of its output gradient), made contiguous."""

    @staticmethod
    def forward(ctx, y_ND, offs_E):
        from fsmoe.kernels import triton_ops

        triton_ops.zero_tail_rows_(y_ND, offs_E)
        ctx.mark_dirty(y_ND)
        return y_ND

    @staticmethod
    def backward(ctx, g):
        return g.contiguous(), None


class _ZeroTailGrad(torch.autograd.Function):
    """Forward: identity. Backward: rows >= offs[-1] of the gradient become 0 (grouped_mm leaves
    them uninitialised)."""

    @staticmethod
    def forward(ctx, x_ND, offs_E):
        ctx.save_for_backward(offs_E)
        return x_ND.view_as(x_ND)

    @staticmethod
    def backward(ctx, g):
        from fsmoe.kernels import triton_ops

        (offs_E,) = ctx.saved_tensors
        g = g.contiguous()
        if g.requires_grad:  # double backward: stay out of place
            g = g.clone()
        return triton_ops.zero_tail_rows_(g, offs_E), None


def expert_mlp(x_ND: Tensor, w1_EDF: Tensor, w3_EDF: Tensor | None, w2_EFD: Tensor, offs_E: Tensor) -> Tensor:
    """The fast expert MLP on CUDA; rows past offs[-1] are 0 and pass no gradient."""
    x = _ZeroTailGrad.apply(x_ND, offs_E)
    h = grouped_mm_unmasked(x, w1_EDF, offs_E)
    h = swiglu(h, grouped_mm_unmasked(x, w3_EDF, offs_E)) if w3_EDF is not None else F.gelu(h)
    return _ZeroTailRows.apply(grouped_mm_unmasked(h, w2_EFD, offs_E), offs_E)
