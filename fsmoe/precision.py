"""Mixed precision: fp32 master weights and optimizer state, bf16 compute on CUDA.

``train.dtype = "bfloat16"`` runs forward and loss under ``torch.autocast("cuda", bfloat16)``.
Parameters, gradients and AdamW state stay fp32 (so checkpoints, resume and every layout are the
same as in an fp32 run); autocast casts the weights of every op on its list (linear, matmul,
attention) to bf16 as the op runs, and the backward of that cast turns the bf16 weight gradient
back into fp32.

Two kinds of op are not on autocast's list and get their dtype here instead:

* the MoE layer's tokens: ``MoELayer`` casts its input to the compute dtype before Order, so the
  permute kernels and the dispatch AlltoAll move bf16 rows, not fp32 ones (half the bytes);
* the routed experts' grouped GEMMs (``torch._grouped_mm``): the experts cast their stacked fp32
  weights with ``cast_weights`` before the GEMMs, so forward and both backward GEMMs run on bf16
  tensor cores instead of fp32 SIMT kernels;
* the residual stream: the decoder casts the embedding output (an embedding lookup is not on
  autocast's list either) so the residual adds, norms and saved activations are bf16, as in
  Megatron-Core and torchtitan's bf16 training.

Why autocast and not bf16 parameters with an fp32 copy inside the optimizer: one set of
parameters keeps checkpoints, gradient sync, clipping, resume and resharding unchanged; the
price is one weight cast per layer and step (a memory-bound pass, ~1-2% of a step at the sizes
we train). On CPU nothing changes: the fp32 path is exactly the one tested bit for bit.
"""
from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on ``device_type`` right now; None outside autocast."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def to_compute(x: Tensor) -> Tensor:
    """``x`` in the active autocast dtype of its device (floating tensors only); as is otherwise."""
    dtype = compute_dtype(x.device.type)
    return x if dtype is None or not x.is_floating_point() or x.dtype == dtype else x.to(dtype)


class _CastWeight(torch.autograd.Function):
    """``w.to(dtype)`` whose backward writes the gradient in ``w``'s dtype *and* contiguous layout
    in one pass. The grouped GEMM's weight gradient can come out transposed; a plain ``.to()``
    would keep that layout and AccumulateGrad would then copy it once more into the parameter's."""

    @staticmethod
    def forward(ctx, w: Tensor, dtype: torch.dtype) -> Tensor:
        ctx.w_dtype = w.dtype
        return w.to(dtype)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:
        return g.to(ctx.w_dtype, memory_format=torch.contiguous_format), None


def cast_weights(x: Tensor, *weights: Tensor | None) -> tuple[Tensor | None, ...]:
    """Weights in the dtype the activations ``x`` carry (e.g. fp32 master weights -> bf16 under
    autocast); differentiable, so the gradient reaches the fp32 parameter. None passes through."""
    return tuple(w if w is None or w.dtype == x.dtype else _CastWeight.apply(w, x.dtype) for w in weights)
