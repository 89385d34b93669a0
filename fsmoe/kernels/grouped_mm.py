"""Grouped matmul over experts: rows of ``x`` grouped by expert, one weight matrix per expert.

Shape legend: N rows, E experts, I input dim, O output dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# torch >= 2.10 exposes F.grouped_mm; older builds (e.g. the GPU machine's 2.11 may) have the same op
# as torch._grouped_mm.
_GMM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_supported(x: Tensor, w: Tensor) -> bool:
    """torch's grouped_mm needs fp32/bf16/fp16 and 16-byte aligned rows."""
    if _GMM is None or x.dtype not in _GROUPED_MM_DTYPES or w.dtype != x.dtype:
        return False
    align = 16 // x.element_size()
    return x.shape[1] % align == 0 and w.shape[2] % align == 0


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped_mm rejects the
    stride-0 gradients that e.g. ``y.sum().backward()`` produces."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def grouped_mm(x_NI: Tensor, w_EIO: Tensor, offs_E: Tensor) -> Tensor:
    """y[n] = x[n] @ w[e(n)] where rows [offs[e-1], offs[e]) belong to expert e.

    x_NI: [N, I]; w_EIO: [E, I, O]; offs_E: [E] int32 cumulative row ends. Rows past offs[-1]
    (dropped assignments) give 0 and get a 0 gradient: grouped_mm leaves them uninitialised,
    in the output and in the input gradient, so both sides are masked. On the CPU, where reading
    offs[-1] costs no device sync, a matmul without such rows (every dropless one) skips the two
    masks: four full passes over [N, I] and [N, O] (forward and backward) that took about a fifth
    of a small model's training step.
    """
    if _dropless_on_host(x_NI, offs_E) and grouped_mm_supported(x_NI, w_EIO):
        return _ContiguousGrad.apply(_GMM(x_NI, w_EIO, offs=offs_E))
    valid_N1 = (torch.arange(x_NI.shape[0], device=x_NI.device) < offs_E[-1]).unsqueeze(1)
    x_NI = torch.where(valid_N1, x_NI, 0)
    if grouped_mm_supported(x_NI, w_EIO):
        y = _ContiguousGrad.apply(_GMM(x_NI, w_EIO, offs=offs_E))
    else:
        y = padded_grouped_mm(x_NI, w_EIO, offs_E)
    return torch.where(valid_N1, y, 0)


def _dropless_on_host(x_NI: Tensor, offs_E: Tensor) -> bool:
    """Whether x_NI is a CPU tensor every row of which belongs to an expert. offs is read through
    numpy (host memory), not by a tensor op that would stand for a device sync."""
    return x_NI.device.type == "cpu" and int(offs_E.numpy()[-1]) == x_NI.shape[0]


def grouped_mm_unmasked(x_NI: Tensor, w_EIO: Tensor, offs_E: Tensor) -> Tensor:
    """torch's grouped_mm as is: rows past offs[-1] of the output and of the input gradient are
    left unspecified (uninitialised on CUDA). For callers that mask the tail themselves
    (``fsmoe.kernels.experts``), which saves two full passes over the rows per matmul.
    Needs ``grouped_mm_supported(x_NI, w_EIO)``."""
    return _GMM(x_NI, w_EIO, offs=offs_E)


def padded_grouped_mm(x_NI: Tensor, w_EIO: Tensor, offs_E: Tensor) -> Tensor:
    """Reference/fallback with no per-expert loop: scatter rows into [E, C, I] (C = busiest
    expert), one bmm, gather back. Memory grows with the busiest expert, so it is only the
    fallback for dtypes/shapes grouped_mm does not take."""
    N, E = x_NI.shape[0], w_EIO.shape[0]
    offs = offs_E.long()
    counts = torch.diff(offs, prepend=offs.new_zeros(1))
    starts = offs - counts
    row = torch.arange(N, device=x_NI.device)
    expert = torch.bucketize(row, offs, right=True).clamp(max=E - 1)
    valid = row < offs[-1]
    C = int(counts.max().item()) if E else 0
    pos = torch.where(valid, row - starts[expert], C)  # rows past the end go to a spare slot C
    buf = x_NI.new_zeros(E, C + 1, x_NI.shape[1])
    buf = buf.index_put((expert, pos), x_NI)
    out = torch.bmm(buf, w_EIO)
    return out[expert, pos]
