"""The expert MLP as one dense cuBLAS GEMM per expert (``moe.experts.gemm = "cublas"``, or chosen
by ``auto`` where it measures fastest).

Shape legend: N rows grouped by expert, M of them routed (the rest dropped), D model dim, F hidden
dim, E experts.

With a few large experts (Mixtral's shape: 8 experts of 2048 rows each at 8k tokens) every
expert's GEMM is a big dense GEMM, and cuBLAS runs those at the dense chain's speed, where torch's
grouped GEMM (CUTLASS) took 12-16% longer for the same FLOPs on Hopper. The price is one device
synchronisation per layer: the row offsets are read on the host in forward (backward reuses them),
so the host stops running ahead of the GPU there, and the layer cannot be captured in a CUDA graph
(inside a capture the grouped path runs instead). Same contract as the grouped paths: rows past
offs[-1] give 0 and get a 0 gradient. Runs on any device (the tests run it on the CPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _spans(ends: list[int]) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of every expert that has rows."""
    starts = [0] + ends[:-1]
    return [(e, s, t) for e, (s, t) in enumerate(zip(starts, ends)) if t > s]


def _act(h1: Tensor, h3: Tensor | None) -> Tensor:
    if h3 is None:
        return F.gelu(h1)
    if h1.is_cuda:
        from fsmoe.kernels import triton_ops

        return triton_ops.swiglu_fwd(h1, h3)
    return F.silu(h1) * h3


def _act_bwd(h1: Tensor, h3: Tensor | None, dh: Tensor) -> tuple[Tensor, Tensor | None]:
    if h3 is None:
        return torch.ops.aten.gelu_backward(dh, h1), None
    if h1.is_cuda:
        from fsmoe.kernels import triton_ops

        return triton_ops.swiglu_bwd(h1, h3, dh)
    dt = torch.promote_types(h1.dtype, torch.float32)  # at least float32, as the Triton kernel computes
    a, b, g = h1.to(dt), h3.to(dt), dh.to(dt)
    s = torch.sigmoid(a)
    return (g * b * s * (1 + a * (1 - s))).to(h1.dtype), (g * a * s).to(h3.dtype)


def _weight_grad(a_MI: Tensor, b_MO: Tensor, spans, E: int) -> Tensor:
    """[E, I, O]: a[rows of e]^T @ b[rows of e]; 0 for experts without rows."""
    g = a_MI.new_empty(E, a_MI.shape[1], b_MO.shape[1])
    busy = [False] * E
    for e, s, t in spans:
        torch.mm(a_MI[s:t].t(), b_MO[s:t], out=g[e])
        busy[e] = True
    for e in (e for e in range(E) if not busy[e]):
        g[e].zero_()
    return g


class _PerExpertMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, w1_EDF, w3_EDF, w2_EFD, offs_E):
        ends = offs_E.tolist()  # the one host synchronisation
        spans, M = _spans(ends), (ends[-1] if ends else 0)
        x = x_ND.contiguous()
        h1 = x.new_empty(M, w1_EDF.shape[2])
        h3 = None if w3_EDF is None else torch.empty_like(h1)
        for e, s, t in spans:
            torch.mm(x[s:t], w1_EDF[e], out=h1[s:t])
            if h3 is not None:
                torch.mm(x[s:t], w3_EDF[e], out=h3[s:t])
        h = _act(h1, h3)
        y = x.new_empty(x.shape[0], w2_EFD.shape[2])
        for e, s, t in spans:
            torch.mm(h[s:t], w2_EFD[e], out=y[s:t])
        y[M:].zero_()
        ctx.save_for_backward(x, w1_EDF, w3_EDF, w2_EFD)
        # the [M, F] intermediates live on ctx (not saved tensors) so that backward frees each as
        # soon as it has used it: the step's peak holds fewer of them at once
        ctx.h1, ctx.h3, ctx.h, ctx.spans, ctx.M = h1, h3, h, spans, M
        return y

    @staticmethod
    def backward(ctx, dy_ND):
        x, w1, w3, w2 = ctx.saved_tensors
        spans, M, E, need = ctx.spans, ctx.M, w1.shape[0], ctx.needs_input_grad
        dy = dy_ND.contiguous()
        dh = dy.new_empty(M, w2.shape[1])
        for e, s, t in spans:
            torch.mm(dy[s:t], w2[e].t(), out=dh[s:t])
        dw2 = _weight_grad(ctx.h, dy, spans, E) if need[3] else None
        ctx.h = dy = None
        da, db = _act_bwd(ctx.h1, ctx.h3, dh)
        ctx.h1 = ctx.h3 = dh = None
        dx = dw1 = dw3 = None
        if need[0]:
            dx = x.new_empty(x.shape)
            for e, s, t in spans:
                torch.mm(da[s:t], w1[e].t(), out=dx[s:t])
                if db is not None:
                    dx[s:t].addmm_(db[s:t], w3[e].t())  # accumulated by cuBLAS, no extra pass
            dx[M:].zero_()
        if need[1]:
            dw1 = _weight_grad(x, da, spans, E)
        if need[2] and db is not None:
            dw3 = _weight_grad(x, db, spans, E)
        return dx, dw1, dw3, dw2, None


def per_expert_mlp(x_ND: Tensor, w1_EDF: Tensor, w3_EDF: Tensor | None, w2_EFD: Tensor, offs_E: Tensor) -> Tensor:
    """y = act(x @ w1[e], x @ w3[e]) @ w2[e] per row's expert e -> [N, D] (SwiGLU, or GeLU when
    w3 is None), one GEMM per expert and matrix; rows past offs[-1] are 0 and pass no gradient.
    Reads ``offs_E`` on the host (one device sync)."""
    return _PerExpertMLP.apply(x_ND, w1_EDF, w3_EDF, w2_EFD, offs_E)
