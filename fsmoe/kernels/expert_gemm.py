"""The SwiGLU expert MLP on our own Triton grouped GEMMs (``fsmoe.kernels.triton_gmm``), forward
and backward, as one autograd Function.

Shape legend: N rows grouped by expert, D model dim, F hidden dim, E experts.

Against torch's grouped GEMM path (``fsmoe.kernels.experts.expert_mlp``) it saves:
- the up-projection reads each row once for w1 and w3 and writes silu(h1) * h3 from the fp32
  accumulators (no separate SwiGLU pass reading h1 and h3 back);
- the input gradient is one GEMM with two operand pairs, ``dh1 @ w1^T + dh3 @ w3^T`` summed in
  the accumulator, instead of two GEMMs and an add over [N, D].
Same contract as ``expert_mlp``: rows past offs[-1] (dropped) give 0 and get a 0 gradient.
Tile shapes come from ``fsmoe.kernels.gmm_tune`` (measured per shape, cached).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fsmoe.kernels.tiles import MLPTiles


class _TritonSwiGLUMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, w1_EDF, w3_EDF, w2_EFD, offs_E, tiles: MLPTiles):
        from fsmoe.kernels import triton_gmm as tg
        from fsmoe.kernels.triton_ops import zero_tail_rows_

        x_ND = x_ND.contiguous()
        need_grad = any(ctx.needs_input_grad[:4])
        h1, h3, h = tg.gmm_swiglu(x_ND, w1_EDF, w3_EDF, offs_E, store_pre=need_grad, cfg=tiles.up)
        y = zero_tail_rows_(tg.gmm(h, w2_EFD, offs_E, cfg=tiles.down), offs_E)
        if need_grad:
            ctx.save_for_backward(x_ND, w1_EDF, w3_EDF, w2_EFD, offs_E)
            # Intermediates live on ctx (not saved tensors) so backward can free each one as soon
            # as it is used: the peak then holds one [N, F] pair less than autograd's would.
            ctx.h1, ctx.h3, ctx.h, ctx.tiles = h1, h3, h, tiles
        return y

    @staticmethod
    def backward(ctx, dy_ND):
        from fsmoe.kernels import triton_gmm as tg
        from fsmoe.kernels.triton_ops import swiglu_bwd, zero_tail_rows_

        x, w1, w3, w2, offs = ctx.saved_tensors
        tiles, E, need = ctx.tiles, w1.shape[0], ctx.needs_input_grad
        dy_ND = dy_ND.contiguous()
        dh = tg.gmm(dy_ND, w2.transpose(1, 2), offs, cfg=tiles.down)
        dw2 = tg.gmm_wgrad(ctx.h, dy_ND, offs, E, cfg=tiles.wgrad) if need[3] else None
        ctx.h = None
        dh1, dh3 = swiglu_bwd(ctx.h1, ctx.h3, dh)
        ctx.h1 = ctx.h3 = dh = None
        dx = dw1 = dw3 = None
        if need[0]:
            dx = zero_tail_rows_(tg.gmm(dh1, w1.transpose(1, 2), offs, a2=dh3, b2_EIO=w3.transpose(1, 2),
                                        cfg=tiles.dgrad), offs)
        if need[1]:
            dw1 = tg.gmm_wgrad(x, dh1, offs, E, cfg=tiles.wgrad)
        dh1 = None
        if need[2]:
            dw3 = tg.gmm_wgrad(x, dh3, offs, E, cfg=tiles.wgrad)
        return dx, dw1, dw3, dw2, None, None


def triton_swiglu_mlp(x_ND: Tensor, w1_EDF: Tensor, w3_EDF: Tensor, w2_EFD: Tensor, offs_E: Tensor,
                      tiles: MLPTiles = MLPTiles()) -> Tensor:
    """y = (silu(x @ w1[e]) * (x @ w3[e])) @ w2[e] per row's expert e -> [N, D]; rows past
    offs[-1] are 0 and pass no gradient. Any device Triton runs on (the GPU, or the interpreter)."""
    return _TritonSwiGLUMLP.apply(x_ND, w1_EDF, w3_EDF, w2_EFD, offs_E, tiles)
