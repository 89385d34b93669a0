"""Process groups of a layout.

The dense part (attention, dense MLPs, embeddings) runs ``DP x MP`` (MP = Megatron tensor
parallelism); the MoE part runs the same ranks as ``EDP x EP x ESP``: EP splits the experts,
ESP splits each expert's hidden dim f, and EDP (expert data parallel) replicates the
experts when ``EP x ESP`` is smaller than the world (e.g. plain DP or MP with EP=1).
:class:`Layout` (``fsmoe.parallel.layout``, re-exported here) holds the degrees and the rank
numbering (row-major, innermost fastest, so the innermost group sits inside a node)::

    world = dp * mp = edp * ep * esp
    dense: rank = dp_rank * mp + mp_rank
    moe:   rank = edp_rank * (ep * esp) + ep_rank * esp + esp_rank

With ``esp == mp`` the ESP group *is* the MP group (FSMoE Fig. 2: ESP inside a node, EP across
nodes). Group kinds: ``dp mp ep esp edp`` plus ``moe`` (the ``ep x esp`` block of ranks that
exchange tokens) and ``world``.

:class:`ParallelGroups` is built once by :func:`build_groups` and passed explicitly to whoever
needs a group; it is never global and never stored in a config.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from fsmoe.config import ParallelConfig
from fsmoe.parallel.layout import GROUP_KINDS, Coords, Layout
from fsmoe.parallel.topology import Topology


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's place in the layout and the process groups it belongs to.

    A group whose size is 1 is still a valid group (collectives on it are skipped by callers
    that check the size). On one process without ``torch.distributed`` every group is None.
    ``layout.gpus_per_node`` is the topology's node size (None: one node).
    """

    layout: Layout
    rank: int
    topology: Topology
    backend: str  # "gloo" | "nccl" | "none" (one process, no process group)
    world_group: object | None = None
    dp_group: object | None = None
    mp_group: object | None = None
    ep_group: object | None = None
    esp_group: object | None = None
    edp_group: object | None = None
    moe_group: object | None = None
    # groups made on first use by every rank together (the hierarchical dispatcher's stage
    # groups: fsmoe.parallel.levels), kept here so that every layer shares them
    lazy: dict = field(default_factory=dict, compare=False, repr=False)

    def size(self, kind: str) -> int:
        """Number of ranks in a group of ``kind`` (``world`` or one of GROUP_KINDS)."""
        sizes = {"world": self.world, "dp": self.layout.dp, "mp": self.layout.mp, "ep": self.layout.ep,
                 "esp": self.layout.esp, "edp": self.layout.edp, "moe": self.layout.moe}
        return sizes[kind]

    def group(self, kind: str):
        """The process group of ``kind`` this rank belongs to (``world`` or one of GROUP_KINDS)."""
        return getattr(self, f"{kind}_group")

    @property
    def world(self) -> int:
        return self.layout.world

    @property
    def coords(self) -> Coords:
        return self.layout.coords(self.rank)

    @property
    def dp(self) -> int:
        return self.layout.dp

    @property
    def mp(self) -> int:
        return self.layout.mp

    @property
    def ep(self) -> int:
        return self.layout.ep

    @property
    def esp(self) -> int:
        return self.layout.esp

    @property
    def edp(self) -> int:
        return self.layout.edp

    @property
    def dp_rank(self) -> int:
        return self.coords.dp

    @property
    def mp_rank(self) -> int:
        return self.coords.mp

    @property
    def ep_rank(self) -> int:
        return self.coords.ep

    @property
    def esp_rank(self) -> int:
        return self.coords.esp

    @property
    def edp_rank(self) -> int:
        return self.coords.edp

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @staticmethod
    def single() -> "ParallelGroups":
        """One process, no process group."""
        return ParallelGroups(Layout(), 0, Topology(1, 1), "none")


def build_groups(cfg: ParallelConfig, *, world: int | None = None, rank: int | None = None) -> ParallelGroups:
    """Create every process group of the layout. Collective: every rank calls it, in the same order.

    Needs ``torch.distributed`` initialised unless the world has one process.
    """
    if not dist.is_available() or not dist.is_initialized():
        if (world or 1) != 1:
            raise RuntimeError("build_groups: torch.distributed is not initialised (use init_distributed)")
        Layout.from_config(cfg, 1)
        return ParallelGroups.single()
    world = dist.get_world_size() if world is None else world
    rank = dist.get_rank() if rank is None else rank
    topology = Topology.detect(world, cfg.gpus_per_node, cfg.topology)
    layout = Layout.from_config(cfg, world, topology.ranks_per_node)
    mine = {kind: _my_group(layout.all_groups(kind)) for kind in GROUP_KINDS}
    return ParallelGroups(layout, rank, topology, dist.get_backend(), world_group=dist.group.WORLD,
                          **{f"{k}_group": g for k, g in mine.items()})


def _my_group(enumeration: list[list[int]]):
    group, _ = dist.new_subgroups_by_enumeration(enumeration)
    return group


def device_for(backend: str) -> torch.device:
    """The device this rank computes on: its GPU under NCCL, else the CPU."""
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
