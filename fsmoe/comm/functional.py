"""Differentiable collectives, launched asynchronously, with the same API on gloo and NCCL.

Shape legend: N rows sent by this rank, R rows received, P ranks in the group, D feature dims
(any trailing shape), Rmax the largest per-rank row count of an uneven gather.

Every forward collective is split in two so a scheduler can overlap it with compute:

    pending = launch_all_to_all(x_ND, out_splits, in_splits, group)   # starts the transfer
    ...                                                               # other work
    y_RD = finish(pending)                                            # waits, post-processes

The launch runs inside an ``autograd.Function`` whose backward is the adjoint collective
(AlltoAll <-> reversed AlltoAll, AllGather <-> ReduceScatter, Split <-> Gather, Copy <->
AllReduce); backward collectives run synchronously. ``finish`` goes through ``_Wait``, an
identity for autograd whose forward waits on the work handle, so nothing reads the output
before it has arrived.

ReduceScatter has two implementations behind one API, chosen when a stage is built
(:func:`reduce_scatter_impl_for`): ``native`` (``reduce_scatter_tensor``; NCCL) and
``alltoall`` (an AlltoAll then a local sum over the P received chunks; any backend, also gloo
builds that lack reduce_scatter). Uneven gathers and scatters pad every rank's rows to Rmax.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup

# torch >= 2.12 renamed the *_into_tensor / *_tensor collectives; use whichever exists.
all_gather_base = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_base = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

REDUCE_SCATTER_IMPLS = ("native", "alltoall")


def reduce_scatter_impl_for(backend: str) -> str:
    """NCCL has a bandwidth-optimal native ReduceScatter; on gloo (and anything else) use the
    AlltoAll form, which every backend supports."""
    return "native" if backend == "nccl" else "alltoall"


@dataclass(frozen=True)
class Launched:
    """A collective in flight. ``out`` must not be read before ``finish``.

    work: the async work handle (None when nothing was sent: a group of one).
    out:  the output buffer (may be padded; ``finish`` trims it).
    post: what ``finish`` does after waiting: ("none",), ("trim", rows), ("unpad", sizes_P, Rmax)
          or ("sum", P, Rmax, rows).
    """

    work: object | None
    out: Tensor
    post: tuple


class _Box:
    """Carries the work handle out of an ``autograd.Function.forward``."""

    work = None


# ---------------------------------------------------------------------------- raw collectives


def _raw_reduce_scatter(out_RD: Tensor, in_PRD: Tensor, group: ProcessGroup | None, impl: str) -> None:
    """Synchronous equal-size ReduceScatter: out = sum over ranks of their chunk for me."""
    if impl == "native":
        reduce_scatter_base(out_RD, in_PRD.contiguous(), group=group)
        return
    P = dist.get_world_size(group)
    recv = torch.empty_like(in_PRD)
    dist.all_to_all_single(recv, in_PRD.contiguous(), group=group)
    torch.sum(recv.view(P, *out_RD.shape), dim=0, out=out_RD)


# ---------------------------------------------------------------------------- autograd functions


class _Wait(torch.autograd.Function):
    """Identity; its forward waits for ``work`` (the collective that fills ``t``)."""

    @staticmethod
    def forward(ctx, t: Tensor, work) -> Tensor:
        if work is not None:
            work.wait()
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, None


class _AllToAll(torch.autograd.Function):
    """x_ND (rows for rank p in ``in_splits[p]``) -> y_RD (rows from rank p in ``out_splits[p]``)."""

    @staticmethod
    def forward(ctx, x_ND: Tensor, out_splits: list[int], in_splits: list[int], group, box: _Box) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        y_RD = x_ND.new_empty((sum(out_splits), *x_ND.shape[1:]))
        box.work = dist.all_to_all_single(y_RD, x_ND.contiguous(), out_splits, in_splits, group=group,
                                          async_op=True)
        return y_RD

    @staticmethod
    def backward(ctx, g_RD: Tensor):
        out_splits, in_splits = ctx.splits
        g_ND = g_RD.new_empty((sum(in_splits), *g_RD.shape[1:]))
        dist.all_to_all_single(g_ND, g_RD.contiguous(), in_splits, out_splits, group=ctx.group)
        return g_ND, None, None, None, None


class _AllGather(torch.autograd.Function):
    """x [R, ...] on each of P ranks -> [P*R, ...] (rank-major). Backward: ReduceScatter."""

    @staticmethod
    def forward(ctx, x: Tensor, group, impl: str, box: _Box) -> Tensor:
        ctx.group, ctx.impl = group, impl
        P = dist.get_world_size(group)
        out = x.new_empty((P * x.shape[0], *x.shape[1:]))
        box.work = all_gather_base(out, x.contiguous(), group=group, async_op=True)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        P = dist.get_world_size(ctx.group)
        gx = g.new_empty((g.shape[0] // P, *g.shape[1:]))
        _raw_reduce_scatter(gx, g, ctx.group, ctx.impl)
        return gx, None, None, None


class _ReduceScatter(torch.autograd.Function):
    """Native ReduceScatter: x [P*R, ...] -> [R, ...] = sum over ranks of chunk ``rank``.
    Backward: AllGather."""

    @staticmethod
    def forward(ctx, x: Tensor, group, box: _Box) -> Tensor:
        ctx.group = group
        P = dist.get_world_size(group)
        out = x.new_empty((x.shape[0] // P, *x.shape[1:]))
        box.work = reduce_scatter_base(out, x.contiguous(), group=group, async_op=True)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        P = dist.get_world_size(ctx.group)
        gx = g.new_empty((P * g.shape[0], *g.shape[1:]))
        all_gather_base(gx, g.contiguous(), group=ctx.group)
        return gx, None, None


class _Split(torch.autograd.Function):
    """Keep chunk ``rank`` of dim 0 (the input is replicated over the group). Backward: AllGather."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        P, r = dist.get_world_size(group), dist.get_rank(group)
        return x.chunk(P, dim=0)[r].contiguous()

    @staticmethod
    def backward(ctx, g: Tensor):
        P = dist.get_world_size(ctx.group)
        out = g.new_empty((P * g.shape[0], *g.shape[1:]))
        all_gather_base(out, g.contiguous(), group=ctx.group)
        return out, None


class _Gather(torch.autograd.Function):
    """AllGather along dim 0 into a replicated tensor. Backward: keep chunk ``rank`` (the
    incoming gradient is replicated over the group, as for every replicated activation)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        P = dist.get_world_size(group)
        out = x.new_empty((P * x.shape[0], *x.shape[1:]))
        all_gather_base(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        P, r = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return g.chunk(P, dim=0)[r].contiguous(), None


class _CopyToGroup(torch.autograd.Function):
    """Megatron's f: identity forward, AllReduce-sum backward (input of a column-parallel op)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromGroup(torch.autograd.Function):
    """Megatron's g: AllReduce-sum forward, identity backward (output of a row-parallel op)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, None


# ---------------------------------------------------------------------------- public API


def launch_all_to_all(x_ND: Tensor, out_splits: list[int], in_splits: list[int],
                      group: ProcessGroup | None) -> Launched:
    """Start an uneven AlltoAll: rows ``[sum(in_splits[:p]), +in_splits[p])`` of x_ND go to
    rank p; ``out_splits[p]`` rows arrive from rank p, rank-major. Returns R = sum(out_splits) rows."""
    box = _Box()
    y_RD = _AllToAll.apply(x_ND, list(out_splits), list(in_splits), group, box)
    return Launched(box.work, y_RD, ("none",))


def launch_all_gather(x_RD: Tensor, sizes_P: list[int], group: ProcessGroup | None, impl: str) -> Launched:
    """Start an uneven AllGather: rank p holds ``sizes_P[p]`` rows (this rank: x_RD); every rank
    gets all of them rank-major, ``sum(sizes_P)`` rows. Rows are padded to Rmax on the wire."""
    Rmax = max(sizes_P)
    if Rmax == 0:  # every rank knows the sizes, so all skip together
        return Launched(None, x_RD, ("none",))
    x_pad = F.pad(x_RD, (0, 0) * (x_RD.dim() - 1) + (0, Rmax - x_RD.shape[0]))
    box = _Box()
    out = _AllGather.apply(x_pad, group, impl, box)
    return Launched(box.work, out, ("unpad", list(sizes_P), Rmax))


def launch_reduce_scatter(y_GD: Tensor, sizes_P: list[int], group: ProcessGroup | None, impl: str) -> Launched:
    """Start an uneven ReduceScatter: y_GD holds ``sizes_P[p]`` rows for each rank p (rank-major,
    G = sum(sizes_P)); rank p receives the sum over all ranks of their rows for p."""
    P, r = len(sizes_P), dist.get_rank(group)
    Rmax = max(sizes_P)
    if Rmax == 0:
        return Launched(None, y_GD, ("none",))
    chunks = torch.split(y_GD, list(sizes_P))
    y_pad = torch.cat([F.pad(c, (0, 0) * (c.dim() - 1) + (0, Rmax - c.shape[0])) for c in chunks])
    box = _Box()
    if impl == "native":
        out = _ReduceScatter.apply(y_pad, group, box)
        return Launched(box.work, out, ("trim", sizes_P[r]))
    out = _AllToAll.apply(y_pad, [Rmax] * P, [Rmax] * P, group, box)
    return Launched(box.work, out, ("sum", P, Rmax, sizes_P[r]))


def finish(launched: Launched) -> Tensor:
    """Wait for a launched collective and return its (trimmed / summed) output."""
    out = _Wait.apply(launched.out, launched.work)
    kind = launched.post[0]
    if kind == "none":
        return out
    if kind == "trim":
        return out[: launched.post[1]]
    if kind == "sum":
        _, P, Rmax, rows = launched.post
        return out.view(P, Rmax, *out.shape[1:]).sum(0)[:rows]
    _, sizes_P, Rmax = launched.post  # "unpad"
    keep = torch.cat([torch.arange(p * Rmax, p * Rmax + n, device=out.device) for p, n in enumerate(sizes_P)])
    return out.index_select(0, keep)


def split_to_group(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """Replicated x [P*B, ...] -> this rank's chunk [B, ...] (backward: AllGather)."""
    return _Split.apply(x, group)


def gather_from_group(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """Per-rank chunks [B, ...] -> replicated [P*B, ...] (backward: keep own chunk)."""
    return _Gather.apply(x, group)


def copy_to_group(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """Identity forward, AllReduce backward: the input of column-parallel compute."""
    return _CopyToGroup.apply(x, group)


def reduce_from_group(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """AllReduce forward, identity backward: the output of row-parallel compute."""
    return _ReduceFromGroup.apply(x, group)
