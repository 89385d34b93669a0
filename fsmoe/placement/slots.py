"""Spare expert slots: room on every EP rank for replicas (FlexMoE's vExpert slots).

Shape legend: El = E/P slots per rank without spares, X spare slots per rank, D model dim,
F this rank's d_ff shard.

:func:`add_spare_slots` grows a sharded experts module's tensors from ``[El, ...]`` to
``[El + X, ...]`` (the new rows zero) and gives it :meth:`Placement.initial` (expert p*El + j in
slot j of rank p, the spares free), before the optimizer is built. Rows 0..El-1 are then the
logical experts of a checkpoint (``Placement.holds_logical_prefix``), so checkpoints keep the
layout-independent format.
"""
from __future__ import annotations

import torch
from torch import nn

from fsmoe.parallel.sharding import get_sharding, set_sharding
from fsmoe.placement.placement import Placement


def spare_slots_for(num_experts: int, ep: int, extra_fraction: float) -> int:
    """Spare slots per rank for ``extra_fraction`` more slots than experts (rounded up, >= 1)."""
    El = num_experts // ep
    return max(1, -(-round(extra_fraction * El * 1e6) // int(1e6)))


def add_spare_slots(layer, spare: int) -> None:
    """Give ``layer`` (a ``ParallelMoELayer``) ``spare`` free slots per EP rank. Call it before
    the optimizer exists (the expert parameters are replaced)."""
    experts = layer.experts
    old = experts.placement
    if not old.is_contiguous:
        raise ValueError("add_spare_slots: the layer's experts must still be in the contiguous placement")
    if spare == 0:
        return
    for name, p in list(experts.named_parameters(recurse=False)):
        grown = torch.zeros((p.shape[0] + spare, *p.shape[1:]), dtype=p.dtype, device=p.device)
        grown[:p.shape[0]] = p.detach()
        new = nn.Parameter(grown, requires_grad=p.requires_grad)
        set_sharding(new, get_sharding(p))
        setattr(experts, name, new)
    experts.num_experts = old.slots_per_rank + spare
    placement = Placement.initial(old.num_experts, old.ranks, spare)
    experts.placement = placement
    layer.dispatcher = layer.dispatcher.with_placement(placement)


def pad_spare_rows(state: dict, model: nn.Module) -> dict:
    """A trainer state read from a checkpoint (``{"model": {fqn: t}, "optim": {"state": {fqn: {k: t}}}}``,
    local tensors) with every expert tensor of a layer with spare slots grown from its logical
    ``[E/P, ...]`` rows to the slot count (the spare rows zero, as :func:`add_spare_slots` leaves
    them), so ``set_state_dict`` finds the shapes of the model."""
    slots = {}  # fqn -> (logical rows, slot rows)
    for name, m in model.named_modules():
        pl = getattr(m, "placement", None)
        if isinstance(pl, Placement) and pl.num_slots > pl.num_experts:
            for pname, _ in m.named_parameters(prefix=name):
                slots[pname] = (pl.num_experts // pl.ranks, pl.slots_per_rank)

    def grow(fqn: str, t):
        if fqn not in slots or not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != slots[fqn][0]:
            return t
        return torch.cat([t, t.new_zeros((slots[fqn][1] - t.shape[0], *t.shape[1:]))])

    out = dict(state)
    out["model"] = {k: grow(k, v) for k, v in state.get("model", {}).items()}
    if "optim" in state:
        out["optim"] = dict(state["optim"])
        out["optim"]["state"] = {k: {n: grow(k, v) for n, v in moments.items()}
                                 for k, moments in state["optim"].get("state", {}).items()}
    return out
