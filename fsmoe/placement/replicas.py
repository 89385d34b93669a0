"""Replica gradients: the copies of an expert are one expert, so their gradients are summed.

Shape legend: P EP ranks, El slots per rank, X experts with more than one copy, D, F the
expert's dims on this ESP shard.

The dispatcher gives every copy of expert e a share of e's rows; each copy's backward gives the
gradient of its share. Their sum is the gradient one copy would get from all of e's rows, so
after :func:`sync_replica_grads` every copy holds that sum, the optimizer applies the same
update to every copy, and copies stay identical (weights and optimizer state) with no
communication in the optimizer. Plan (collective over the EP group, every step, also with no
tokens):

    1. each rank sums the gradient rows of its copies of every replicated expert into a buffer
       ``[X, ...]`` (zeros where it holds none);
    2. one AllReduce (sum) of the buffers over the EP group (FlexMoE's T_sync);
    3. every copy's gradient row := its expert's row of the sum.

The grad norm counts each expert once: its primary copy (:func:`norm_rows`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from fsmoe.placement.placement import Placement


def placed_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that hold expert rows by a Placement (``placement`` and ``ep_rank`` attributes:
    the sharded experts), in ``model.modules()`` order (the same on every rank)."""
    return [m for m in model.modules()
            if isinstance(getattr(m, "placement", None), Placement) and hasattr(m, "ep_rank")]


def replicated_experts(placement: Placement) -> list[int]:
    return [e for e in range(placement.num_experts) if placement.copies(e) > 1]


def sync_replica_grads(model: nn.Module, ep_group: ProcessGroup | None) -> None:
    """Sum every replicated expert's gradient over its copies (see module docstring). Collective
    over the EP group when some layer has replicas; a no-op otherwise."""
    for experts in placed_modules(model):
        pl: Placement = experts.placement
        shared = replicated_experts(pl)
        if not shared:
            continue
        mine = pl.experts_on(experts.ep_rank)
        params = [p for p in experts.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        buf = torch.zeros(len(shared), sum(p[0].numel() for p in params), dtype=params[0].dtype,
                          device=params[0].device)
        for x, e in enumerate(shared):
            for j in (j for j, held in enumerate(mine) if held == e):
                buf[x] += torch.cat([p.grad[j].reshape(-1) for p in params])
        if pl.ranks > 1:
            dist.all_reduce(buf, group=ep_group)
        sizes = [p[0].numel() for p in params]
        for x, e in enumerate(shared):
            rows = torch.split(buf[x], sizes)
            for j in (j for j, held in enumerate(mine) if held == e):
                for p, row in zip(params, rows):
                    p.grad[j].copy_(row.view_as(p.grad[j]))


def norm_rows(model: nn.Module) -> dict[int, Tensor]:
    """id(expert parameter) -> the rows (slots) the grad norm counts on this rank: primary copies
    only, for the layers whose placement has replicas or free slots."""
    out = {}
    for experts in placed_modules(model):
        pl: Placement = experts.placement
        if pl.num_slots == pl.num_experts:
            continue
        rows = torch.tensor(pl.primary_slots(experts.ep_rank), dtype=torch.int64)
        for p in experts.parameters():
            out[id(p)] = rows
    return out
