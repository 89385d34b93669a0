"""Layout-independent checkpoints: sharded tensors are saved as *global* tensors.

Before ``torch.distributed.checkpoint`` (DCP) saves or loads a state dict, every tensor of a
sharded parameter (the parameter itself and its optimizer moments) is wrapped as a DTensor that
says where this rank's shard sits in the global tensor:

    TP weights      mesh (dp, mp)        [Replicate, Shard(d)]
    routed experts  mesh (edp, ep, esp)  [Replicate, Shard(0), Shard(f)]
    everything else plain tensor         (replicated: one copy is written)

With ``parallel.shard = "optimizer"`` (fsmoe.parallel.zero) a rank holds only a slice of each
moment, split over the parameter's replica group: one more ``Shard`` placement, on the dp (dense)
or edp (experts) mesh dimension.

DCP writes each shard once with its global offsets and, on load, reads whatever slice the
loading layout needs, so a checkpoint saved at EP=4 loads at EP=1, 2 or 8, under any MP/ESP, or
in one process (plain full tensors). Spare expert slots (FlexMoE replicas,
``fsmoe.placement.slots``) are left out: with the experts in ``Placement.initial`` the leading
E/P rows of each shard are the logical experts, and only they are wrapped. The wrapping shares
storage with the parameters, so DCP's in-place load fills the model directly; :func:`to_local_state` unwraps afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from fsmoe.parallel.groups import ParallelGroups
from fsmoe.parallel.sharding import ParamSharding, get_sharding
from fsmoe.parallel.zero import ZeroSlice
from fsmoe.placement.placement import Placement

MESH_DIMS = {"dense": ("dp", "mp"), "moe": ("edp", "ep", "esp")}


@dataclass(frozen=True)
class Meshes:
    """DeviceMeshes over the same ranks as ParallelGroups (row-major, same numbering)."""

    dense: Any
    moe: Any

    @staticmethod
    def build(groups: ParallelGroups) -> "Meshes | None":
        """Collective (creates process groups); None in one process."""
        if not groups.distributed:
            return None
        from torch.distributed.device_mesh import init_device_mesh

        device = "cuda" if groups.backend == "nccl" else "cpu"
        return Meshes(
            dense=init_device_mesh(device, (groups.dp, groups.mp), mesh_dim_names=MESH_DIMS["dense"]),
            moe=init_device_mesh(device, (groups.edp, groups.ep, groups.esp), mesh_dim_names=MESH_DIMS["moe"]))


def to_global(t: Tensor, sharding: ParamSharding, groups: ParallelGroups, meshes: Meshes | None,
              zero: ZeroSlice | None = None):
    """This rank's shard ``t`` as a DTensor of the global shape (``t`` itself if replicated).
    ``zero``: ``t`` is this rank's slice of optimizer state split over the parameter's replica
    group (``parallel.shard = "optimizer"``, fsmoe.parallel.zero), one more ``Shard`` placement."""
    if (not sharding.dims and zero is None) or meshes is None:
        return t
    from torch.distributed.tensor import DTensor, Replicate, Shard

    kinds = {kind for _, kind in sharding.dims} | ({zero.kind} if zero is not None else set())
    which = "dense" if kinds <= set(MESH_DIMS["dense"]) else "moe"
    split = {kind: dim for dim, kind in sharding.dims}
    if zero is not None:
        split[zero.kind] = zero.dim
    placements = [Shard(split[name]) if name in split else Replicate() for name in MESH_DIMS[which]]
    local = list(t.shape)
    if zero is not None:  # the parameter's size along the split dim (no other split shares it)
        local[zero.dim] = zero.size
    shape = sharding.global_shape(local, groups)
    stride = tuple(_contiguous_strides(shape))
    return DTensor.from_local(t, getattr(meshes, which), placements, run_check=False, shape=shape, stride=stride)


def _contiguous_strides(shape) -> list[int]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return list(reversed(strides))


def to_global_state(state: dict[str, Any], model: nn.Module, groups: ParallelGroups,
                    meshes: Meshes | None, zero: dict[str, ZeroSlice] | None = None) -> dict[str, Any]:
    """A trainer state (``{"model": {fqn: t}, "optim": {"state": {fqn: {k: t}}, ...}, ...}``) with
    parameters and their same-shaped optimizer tensors as global DTensors. New dicts (the input's
    may be the optimizer's own); the tensors are shared, so DCP loads into them in place.
    ``zero``: parameter name -> the slice of its optimizer state this rank holds (sharded
    optimizer state); those moments are wrapped as slices of the global tensor."""
    zero = zero or {}
    params = dict(model.named_parameters())
    logical_rows = {}  # expert parameter name -> E/P: its leading rows are the logical experts
    for name, m in model.named_modules():
        placement = getattr(m, "placement", None)
        if not isinstance(placement, Placement) or placement.is_contiguous:
            continue
        if not placement.holds_logical_prefix:
            raise ValueError(f"{name}: checkpoints hold experts in logical order, by contiguous EP shards; "
                             f"migrate back to Placement.initial before saving")
        for pname, _ in m.named_parameters(prefix=name):
            logical_rows[pname] = placement.num_experts // placement.ranks

    def wrap(name: str, t: Any, moment: bool = False) -> Any:
        p = params.get(name)
        zs = zero.get(name) if moment else None
        if zs is not None and isinstance(t, Tensor) and t.ndim == p.ndim:
            return to_global(t, get_sharding(p), groups, meshes, zs)
        if p is None or not isinstance(t, Tensor) or t.shape != p.shape:
            return t
        if name in logical_rows:  # spare slots (replicas) are not saved: a view of the logical rows
            t = t[:logical_rows[name]]
        return to_global(t, get_sharding(p), groups, meshes)

    out = dict(state)
    if "model" in state:
        out["model"] = {name: wrap(name, t) for name, t in state["model"].items()}
    if "optim" in state:
        out["optim"] = dict(state["optim"])
        out["optim"]["state"] = {name: {key: wrap(name, t, moment=True) for key, t in moments.items()}
                                 for name, moments in state["optim"].get("state", {}).items()}
    return out


def to_local_state(state: Any) -> Any:
    """A copy of a (nested) state with every DTensor replaced by its local shard."""
    if isinstance(state, dict):
        return {key: to_local_state(value) for key, value in state.items()}
    if isinstance(state, list):
        return [to_local_state(v) for v in state]
    return state.to_local() if hasattr(state, "to_local") and hasattr(state, "placements") else state
