"""Moving experts between EP ranks when the placement changes: weights and optimizer state, exact.

Shape legend: P EP ranks, El slots per rank, D model dim, F this rank's d_ff shard.

``migrate(layer, new, ep_group, optimizer)`` on every rank of the layer's EP group (between
steps, after ``optimizer.step``):

    1. Each expert tensor ``[El, ...]`` of this rank (weights, gradients if any, and every
       optimizer tensor of the same shape, e.g. AdamW's exp_avg and exp_avg_sq) is all-gathered
       over the EP group: ``[P*El, ...]``, every expert of this ESP shard in the old physical order.
    2. Each slot keeps the row of the logical expert the new placement puts there, copied into the
       same tensor (parameters keep their identity, so the optimizer still finds its state).
    3. The layer's dispatcher and expert shard switch to the new placement.

Nothing is recomputed, so the moved values are bit-identical; scalar optimizer state (AdamW's
step) is the same on every rank and stays.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from fsmoe.comm.functional import all_gather_base
from fsmoe.placement.placement import Placement


def _gathered(t: Tensor, group: ProcessGroup | None, ranks: int) -> Tensor:
    """[El, ...] on each of the group's ranks -> [P*El, ...] rank-major."""
    if ranks == 1:
        return t.clone()
    out = t.new_empty((ranks * t.shape[0], *t.shape[1:]))
    all_gather_base(out, t.contiguous(), group=group)
    return out


def moved_rows(old: Placement, new: Placement, rank: int) -> list[int]:
    """For each slot of ``rank`` under ``new``: the row of its expert in ``old``'s physical order."""
    where = {e: k for k, e in enumerate(old.physical_order)}
    return [where[e] for e in new.experts_on(rank)]


def migrate(layer, new: Placement, ep_group: ProcessGroup | None,
            optimizer: torch.optim.Optimizer | None = None) -> None:
    """Move ``layer``'s experts (a ``ParallelMoELayer``) to placement ``new`` (see module docstring)."""
    experts = layer.experts
    old = experts.placement
    if (new.num_experts, new.ranks, new.slots_per_rank) != (old.num_experts, old.ranks, old.slots_per_rank):
        raise ValueError(f"placement {new.num_experts}x{new.ranks}x{new.slots_per_rank} does not match the "
                         f"layer's {old.num_experts}x{old.ranks}x{old.slots_per_rank}")
    if new.ranks > 1 and not dist.is_initialized():
        raise ValueError("moving experts between ranks needs the EP process group")
    rows = torch.tensor(moved_rows(old, new, experts.ep_rank))
    state = optimizer.state if optimizer is not None else {}
    with torch.no_grad():
        for p in experts.parameters():
            tensors = [p.data] + ([p.grad] if p.grad is not None else [])
            tensors += [t for t in state.get(p, {}).values() if isinstance(t, Tensor) and t.shape == p.shape]
            for t in tensors:
                t.copy_(_gathered(t, ep_group, new.ranks).index_select(0, rows.to(t.device)))
    experts.placement = new
    layer.dispatcher = layer.dispatcher.with_placement(new)
