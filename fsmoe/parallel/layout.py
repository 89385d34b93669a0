"""Layout: the degrees of a run and its rank arithmetic. Pure (no processes, no torch.distributed),
shared by the parallel runtime (``groups.py`` builds the process groups from it) and the
scheduler's cost models (``fsmoe.schedule``).

The dense part runs ``dp x mp`` ranks; the MoE part runs the same ranks as ``edp x ep x esp``,
and ``moe = ep * esp`` ranks exchange tokens::

    world = dp * mp = edp * ep * esp
    dense: rank = dp_rank * mp + mp_rank
    moe:   rank = edp_rank * moe + ep_rank * esp + esp_rank
    node:  rank // gpus_per_node            (gpus_per_node None: one node)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from fsmoe.config import ConfigError

GROUP_KINDS = ("dp", "mp", "ep", "esp", "edp", "moe")


@dataclass(frozen=True)
class Coords:
    """One rank's index inside each group kind."""

    dp: int
    mp: int
    edp: int
    ep: int
    esp: int


@dataclass(frozen=True)
class Layout:
    """The degrees of a run: ``world = dp * mp`` ranks, split for the MoE part into ``edp``
    replicas of one ``moe = ep * esp`` group, on nodes of ``gpus_per_node`` ranks.

    ``dp`` is also the degree of the dense gradients' AllReduce. The scheduler's ``node``,
    ``ep_inter`` and ``peers`` describe the first moe group (ranks ``0 .. moe-1``); every other
    moe group is the same shifted by whole groups. Bad values raise ``ConfigError``.
    """

    dp: int = 1
    mp: int = 1
    ep: int = 1
    esp: int = 1
    gpus_per_node: int | None = None

    def __post_init__(self) -> None:
        for name in ("dp", "mp", "ep", "esp"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"parallel.{name}", v, "must be an integer >= 1")
        if self.world % self.moe:
            raise ConfigError("parallel.ep*esp", self.moe, f"must divide the world size dp*mp={self.world}")
        gpn = self.gpus_per_node
        if gpn is not None and (not isinstance(gpn, int) or gpn < 1 or self.world % gpn):
            raise ConfigError("parallel.gpus_per_node", gpn, f"must be >= 1 and divide the world size {self.world}")

    @property
    def world(self) -> int:
        return self.dp * self.mp

    @property
    def moe(self) -> int:
        """Ranks of one moe group (the ``ep x esp`` block that exchanges tokens)."""
        return self.ep * self.esp

    @property
    def edp(self) -> int:
        return self.world // self.moe

    def coords(self, rank: int) -> Coords:
        return Coords(dp=rank // self.mp, mp=rank % self.mp, edp=rank // self.moe,
                      ep=(rank % self.moe) // self.esp, esp=rank % self.esp)

    def all_groups(self, kind: str) -> list[list[int]]:
        """Every group of ``kind`` as a list of ranks (what ``new_subgroups_by_enumeration`` takes)."""
        mp, ep, esp, edp, moe = self.mp, self.ep, self.esp, self.edp, self.moe
        if kind == "mp":
            return [[d * mp + j for j in range(mp)] for d in range(self.dp)]
        if kind == "dp":
            return [[d * mp + j for d in range(self.dp)] for j in range(mp)]
        if kind == "esp":
            return [[x * moe + p * esp + s for s in range(esp)] for x in range(edp) for p in range(ep)]
        if kind == "ep":
            return [[x * moe + p * esp + s for p in range(ep)] for x in range(edp) for s in range(esp)]
        if kind == "edp":
            return [[x * moe + k for x in range(edp)] for k in range(moe)]
        if kind == "moe":
            return [[x * moe + k for k in range(moe)] for x in range(edp)]
        raise ValueError(f"group kind {kind!r} is unknown; allowed: {list(GROUP_KINDS)}")

    def group_of(self, kind: str, rank: int) -> list[int]:
        return next(g for g in self.all_groups(kind) if rank in g)

    # ------------------------------------------------------------------ the scheduler's view

    def node(self, w: int) -> int:
        return 0 if self.gpus_per_node is None else w // self.gpus_per_node

    @property
    def ep_inter(self) -> bool:
        """Does the EP group of rank 0 span more than one node?"""
        return len({self.node(p * self.esp) for p in range(self.ep)}) > 1

    def peers(self, kind: str, rank: int) -> tuple[int, ...]:
        """Ranks of the first moe group taking part in op ``kind`` with ``rank`` (< moe)."""
        p, q = divmod(rank, self.esp)
        if kind in ("a2a_dispatch", "a2a_combine"):
            return tuple(pp * self.esp + q for pp in range(self.ep))
        if kind in ("allgather", "reducescatter"):
            return tuple(p * self.esp + qq for qq in range(self.esp))
        if kind in ("allreduce", "counts"):
            return tuple(range(self.moe))
        return (rank,)

    @property
    def a2a_key(self) -> str:
        return "a2a_inter" if self.ep_inter else "a2a_intra"

    @property
    def name(self) -> str:
        """The moe group's shape, e.g. ``ep2-esp4-nodes2x4`` (profiles are keyed by it)."""
        gpn = self.gpus_per_node or self.moe
        return f"ep{self.ep}-esp{self.esp}-nodes{self.moe // gpn}x{gpn}"

    # ------------------------------------------------------------------ constructors

    @staticmethod
    def from_config(cfg, world: int, gpus_per_node: int | None = None) -> "Layout":
        """The layout of ``cfg`` (a ``ParallelConfig``) on ``world`` processes; ``dp`` left at 1 is
        filled in as ``world // mp`` (so ``--nproc 4 --ep 4`` means DP4 x EP4). ``gpus_per_node``
        at least ``world`` means one node (stored as None)."""
        dp = cfg.dp
        if dp == 1 and cfg.mp != world and world % cfg.mp == 0:
            dp = world // cfg.mp
        if dp * cfg.mp != world:
            raise ConfigError("parallel.dp*mp", dp * cfg.mp, f"must equal the number of processes {world}")
        gpn = gpus_per_node if gpus_per_node is not None and gpus_per_node < world else None
        return Layout(dp=dp, mp=cfg.mp, ep=cfg.ep, esp=cfg.esp, gpus_per_node=gpn)

    @staticmethod
    def from_dict(d: dict) -> "Layout":
        """From ``dataclasses.asdict(layout)``. Also reads the older form {ep, esp, gpus_per_node,
        dp_size} (dp = dp_size or ep*esp; it has no mp, so mp is the smallest that makes ep*esp
        divide the world: the moe group, node size and dp, all the cost model reads, are exact)."""
        if "dp_size" not in d:
            return Layout(**d)
        moe = d["ep"] * d["esp"]
        dp = d["dp_size"] or moe
        return Layout(dp=dp, mp=moe // math.gcd(dp, moe), ep=d["ep"], esp=d["esp"],
                      gpus_per_node=d.get("gpus_per_node"))
