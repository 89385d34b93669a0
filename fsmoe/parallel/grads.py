"""Gradient sync, group-aware grad-norm clipping, and the loss scaling that makes every layout
equal to one process on the global batch.

Loss scaling convention (what the trainer does on every rank)::

    out = model(idx_local)                       # idx_local: this dp rank's B/dp sequences
    loss = cross_entropy_mean(out.logits) + out.aux_loss
    loss.backward()
    sync_grads(model, groups)                    # sum over each param's reduce group, / dp
    norm = clip_grad_norm(model, max_norm, groups)

Why this equals one process: the global loss is ``mean_d ce_d + A``. The CE of dp shard d is
computed identically by the mp ranks of that shard; dense gradients are complete on each of
them, so summing over ``dp`` and dividing by dp gives ``mean_d grad ce_d``. The MoE part gives
each rank of the MP group a share of the tokens, so router/shared-expert gradients are partial
and are summed over the ``world``; routed experts get every token routed to them from the EP
group and are summed over their replicas (``edp``); the copies of an expert that FlexMoE placed
on several EP ranks are then summed over their copies (``fsmoe.placement.replicas``). The aux
losses are token means over this rank's share with batch statistics made global by the router
(``balance_group``), and ``ParallelMoELayer`` divides them by mp, so their sum over the world
divided by dp is ``A``.

Grad-norm: each shard is counted once (``ParamSharding.is_owner``): TP shards summed over mp,
experts over ep x esp, replicated parameters once; then one AllReduce over the world. This is
the bug DeepSpeed #8475 / Megatron #5916 get wrong (averaged or double-counted expert norms).
"""
from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fsmoe.parallel.groups import ParallelGroups
from fsmoe.parallel.sharding import REDUCE_KINDS, get_sharding
from fsmoe.placement.replicas import norm_rows, sync_replica_grads

FLAT_ELEMENTS = 1 << 25  # elements of one flat AllReduce (128 MB of fp32): the copy it costs

if TYPE_CHECKING:
    from fsmoe.parallel.zero_grads import GradReduceScatter


def grad_or_zeros(p: nn.Parameter) -> Tensor:
    """The gradient, created as zeros if this rank produced none (every rank must reduce it)."""
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad


def sync_grads(model: nn.Module, groups: ParallelGroups, kinds: tuple[str, ...] = REDUCE_KINDS,
               skip: Collection[int] = ()) -> None:
    """Sum every gradient over its ParamSharding.reduce group, then divide by dp.

    One flat AllReduce per reduce kind in ``kinds`` (params in ``model.parameters()`` order, the
    same on every rank of a group); ``skip``: ids of parameters reduced elsewhere (a sharded
    optimizer's reduce-scatter, fsmoe.parallel.zero_grads). Collective: every rank calls it every
    step, also with zero tokens.
    """
    if not groups.distributed:
        return
    for kind in kinds:
        grads = [grad_or_zeros(p) for p in model.parameters()
                 if p.requires_grad and get_sharding(p).reduce == kind and id(p) not in skip]
        if not grads:
            continue
        if groups.size(kind) == 1:  # nothing to sum (e.g. experts when edp = 1): divide in place, no flat copy
            if groups.dp > 1:
                torch._foreach_div_(grads, groups.dp)
            continue
        all_reduce_mean(grads, groups.group(kind), groups.dp)
    if "edp" in kinds:  # expert copies (FlexMoE replicas) are one expert: sum their gradients
        sync_replica_grads(model, groups.ep_group)


def all_reduce_mean(grads: list[Tensor], group, dp: int) -> None:
    """``grads`` := their sums over ``group`` divided by ``dp``: one flat AllReduce per chunk of
    at most ``FLAT_ELEMENTS`` (a flat copy of a chunk, never of all the gradients)."""
    for part in _chunks(grads, FLAT_ELEMENTS):
        flat = torch.cat([g.reshape(-1) for g in part])
        dist.all_reduce(flat, group=group)
        write_mean(flat, part, dp)


def _chunks(grads: list[Tensor], max_elements: int) -> list[list[Tensor]]:
    """Consecutive runs of ``grads`` of at most ``max_elements`` elements (a larger one alone)."""
    out: list[list[Tensor]] = [[]]
    used = 0
    for g in grads:
        if out[-1] and used + g.numel() > max_elements:
            out.append([])
            used = 0
        out[-1].append(g)
        used += g.numel()
    return out


def write_mean(flat_n: Tensor, grads: list[Tensor], dp: int) -> None:
    """``grads`` := their reduced sums ``flat_n`` (the grads concatenated, [n]) divided by ``dp``."""
    flat_n /= dp
    for g, part in zip(grads, torch.split(flat_n, [g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def grad_norm(model: nn.Module, groups: ParallelGroups, sliced: GradReduceScatter | None = None) -> Tensor:
    """Global L2 norm of all gradients, every shard counted once; ``sliced``: gradients a sharded
    optimizer reduce-scattered into slices (each slice counted once). Collective."""
    device = next(model.parameters()).device
    rows = norm_rows(model)  # replicated experts: their primary copy only
    owned = [p.grad.detach() if id(p) not in rows else p.grad.detach().index_select(0, rows[id(p)].to(p.device))
             for p in model.parameters() if p.grad is not None and get_sharding(p).is_owner(groups)]
    if sliced is not None:
        owned += sliced.owned_slices()
    sq = torch.zeros((), dtype=torch.float32, device=device)
    if owned:  # one foreach pass (no per-parameter kernels), squares summed in fp32
        sq = torch.stack(torch._foreach_norm(owned, dtype=torch.float32)).square().sum()
    if groups.distributed:
        dist.all_reduce(sq, group=groups.world_group)
    return sq.sqrt()


def clip_grad_norm(model: nn.Module, max_norm: float, groups: ParallelGroups,
                   sliced: GradReduceScatter | None = None) -> Tensor:
    """Scale all gradients so the global norm is at most ``max_norm`` (0 = only measure).

    Same formula as ``torch.nn.utils.clip_grad_norm_``: ``coef = min(1, max_norm / (norm + 1e-6))``.
    Returns the norm before clipping. Collective.
    """
    norm = grad_norm(model, groups, sliced)
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
        grads += sliced.slices() if sliced is not None else []
        if grads:
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return norm


def _world_sum(value: Tensor, groups: ParallelGroups, divisor: int) -> Tensor:
    """Sum over every rank of ``value / divisor`` (detached); ``value`` itself in one process."""
    if not groups.distributed:
        return value.detach()
    v = value.detach().float() / divisor
    dist.all_reduce(v, group=groups.world_group)
    return v


def global_mean(value: Tensor, groups: ParallelGroups) -> Tensor:
    """Mean over dp shards of a per-dp-shard value that the mp ranks share (e.g. the CE loss)."""
    return _world_sum(value, groups, groups.world)


def global_aux(aux_local: Tensor, groups: ParallelGroups) -> Tensor:
    """The one-process aux loss from this rank's (mp-scaled) share: sum over the world / dp."""
    return _world_sum(aux_local, groups, groups.dp)
