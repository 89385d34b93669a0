"""ParamSharding: where each parameter lives and how its gradient is reduced.

Every parameter carries one (as the attribute ``_fsmoe_sharding``, set by ``parallelize`` and
the parallel modules; untagged parameters are replicated dense parameters). One table drives
gradient sync, grad-norm clipping and checkpoint resharding, so the three can never disagree.

=====================  ===================  ===========  ==================  ================
parameter              split along          reduce       counted in norm by  in checkpoint
=====================  ===================  ===========  ==================  ================
embeddings, norms,     -                    ``dp``       rank 0              replicated
lm_head, biases after
row-parallel ops
attention q/k/v        dim 0 over ``mp``    ``dp``       dp_rank 0           global, dim 0
(+ bias), dense w1/w3
attention o, dense w2  dim 1 over ``mp``    ``dp``       dp_rank 0           global, dim 1
qk-norms inside a      -                    ``world``    rank 0              replicated
TP attention
router, shared experts -                    ``world``    rank 0              replicated
routed experts w1/w3   dim 0 over ``ep``,   ``edp``      edp_rank 0          global [E, D, F]
[E, D, F]; w2 [E,F,D]  f over ``esp``
=====================  ===================  ===========  ==================  ================

``reduce``: the group over which this rank's gradient is *summed* to give the full gradient of
the sum of the per-rank losses; ``sync_grads`` then divides everything by ``dp`` (each rank's loss
is a mean over its dp shard). Router, shared experts and qk-norms see only this rank's slice of the
tokens (the MoE part splits the MP group's tokens, and TP attention splits heads), hence
``world``; routed experts see every token routed to them from the whole EP group, hence only
their replicas (``edp``).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fsmoe.parallel.groups import ParallelGroups

_ATTR = "_fsmoe_sharding"
REDUCE_KINDS = ("dp", "world", "edp")


@dataclass(frozen=True)
class ParamSharding:
    """reduce: group kind whose sum of per-rank gradients is the full gradient (``dp`` | ``world`` | ``edp``).
    dims: ``(tensor_dim, group_kind)`` pairs this parameter is split along, e.g. ``((0, "mp"),)``."""

    reduce: str = "dp"
    dims: tuple[tuple[int, str], ...] = ()

    def __post_init__(self) -> None:
        if self.reduce not in REDUCE_KINDS:
            raise ValueError(f"ParamSharding.reduce={self.reduce!r}; allowed: {list(REDUCE_KINDS)}")

    def global_shape(self, local_shape, groups: ParallelGroups) -> tuple[int, ...]:
        shape = list(local_shape)
        for dim, kind in self.dims:
            shape[dim] *= groups.size(kind)
        return tuple(shape)

    def offsets(self, local_shape, groups: ParallelGroups) -> tuple[int, ...]:
        """Where this rank's shard starts in the global tensor."""
        off = [0] * len(local_shape)
        for dim, kind in self.dims:
            off[dim] = getattr(groups.coords, kind) * local_shape[dim]
        return tuple(off)

    def shard_of(self, full, groups: ParallelGroups):
        """This rank's shard (a view) of the global tensor ``full``."""
        for dim, kind in self.dims:
            n = full.shape[dim] // groups.size(kind)
            full = full.narrow(dim, getattr(groups.coords, kind) * n, n)
        return full

    def is_owner(self, groups: ParallelGroups, also: tuple[str, ...] = ()) -> bool:
        """True on exactly one of the ranks holding this rank's shard (the lowest rank), so a
        global sum over ranks counts every shard once. ``also``: group kinds that split the shard
        further (a sharded optimizer's slices over ``dp`` / ``edp``)."""
        layout, mine = groups.layout, groups.coords
        kinds = [kind for _, kind in self.dims] + list(also)
        same = (r for r in range(groups.world)
                if all(getattr(layout.coords(r), k) == getattr(mine, k) for k in kinds))
        return next(same) == groups.rank


REPLICATED = ParamSharding()


def set_sharding(param: nn.Parameter, sharding: ParamSharding) -> None:
    setattr(param, _ATTR, sharding)


def get_sharding(param: nn.Parameter) -> ParamSharding:
    return getattr(param, _ATTR, REPLICATED)


def tags_of(module: nn.Module) -> dict[str, ParamSharding]:
    """Parameter name -> its tag, for the tagged parameters of ``module`` (to carry them over to
    new Parameter objects, e.g. after ``to_empty``)."""
    return {name: getattr(p, _ATTR) for name, p in module.named_parameters() if hasattr(p, _ATTR)}


def tag_module(module: nn.Module, sharding: ParamSharding) -> None:
    """Tag every parameter under ``module`` that is not tagged yet."""
    for p in module.parameters():
        if not hasattr(p, _ATTR):
            set_sharding(p, sharding)
