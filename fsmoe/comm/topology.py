"""Levels: the EP group's ranks as a D-level hierarchy (node, socket, switch, GPU), and the
alpha-beta cost of each level's links. Pure: no processes, no torch.distributed.

Shape legend: P ranks of the EP group, D levels (outermost first), n_i ranks-or-groups at level i.

Ranks are numbered in mixed radix, outermost level first: with sizes ``(n_0, .., n_{D-1})`` the
rank with coordinates ``(c_0, .., c_{D-1})`` is ``sum_i c_i * stride_i``, ``stride_i = n_{i+1} *
.. * n_{D-1}``. So ``prefix(r, i) = r // stride_{i-1}`` names the level-i group of rank r
(prefix 0 is the whole group, prefix D the rank itself) and two ranks first differ at the
level whose link a message between them crosses.

A *stage* is one AlltoAll of a hierarchical dispatch: it resolves the levels ``first..last`` of
a row's destination, among the ranks that agree with the sender everywhere else. HierMoE's
d-dim AlltoAll (``stages_for_depth``) resolves levels 0, 1, .., d-2 one at a time, then the
rest at once; depth 1 is the flat AlltoAll.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

LEVEL_NAMES = ("node", "socket", "switch", "gpu")


@dataclass(frozen=True)
class Stage:
    """One AlltoAll resolving levels ``first..last`` (inclusive) of each row's destination."""

    first: int
    last: int


@dataclass(frozen=True)
class Levels:
    """sizes: ``(n_0, .., n_{D-1})``, outermost first, each >= 2 (size-1 levels carry no link);
    names: one per level (for reports)."""

    sizes: tuple[int, ...]
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if any(not isinstance(n, int) or n < 2 for n in self.sizes):
            raise ValueError(f"Levels: every level size must be an integer >= 2, got {self.sizes}")
        if self.names and len(self.names) != len(self.sizes):
            raise ValueError(f"Levels: {len(self.names)} names for {len(self.sizes)} levels")

    @staticmethod
    def of(sizes, names=None) -> "Levels":
        """Levels from sizes that may contain 1s (dropped, with their names)."""
        names = tuple(names) if names is not None else default_names(len(sizes))
        kept = [(n, nm) for n, nm in zip(sizes, names) if n > 1]
        return Levels(tuple(n for n, _ in kept), tuple(nm for _, nm in kept))

    @property
    def depth(self) -> int:
        """D (0 for one rank)."""
        return len(self.sizes)

    @property
    def ranks(self) -> int:
        return math.prod(self.sizes)

    def name(self, level: int) -> str:
        return self.names[level] if self.names else f"level{level}"

    def stride(self, level: int) -> int:
        """Ranks in one group of level ``level + 1`` (``stride(-1) = P``, ``stride(D-1) = 1``)."""
        return math.prod(self.sizes[level + 1:])

    def prefix(self, rank, depth: int):
        """The group of depth ``depth`` holding ``rank`` (0 = the whole EP group, D = the rank);
        works on ints and integer tensors alike."""
        return rank // self.stride(depth - 1)

    def coord(self, rank, level: int):
        return (rank // self.stride(level)) % self.sizes[level]

    def stage_peer(self, stage: Stage, sender, dest):
        """Where a row sent by ``sender`` towards ``dest`` lands after ``stage``: dest's levels
        up to ``stage.last``, sender's below (ints or tensors)."""
        s = self.stride(stage.last)
        return (dest // s) * s + sender % s

    def stage_size(self, stage: Stage) -> int:
        return math.prod(self.sizes[stage.first:stage.last + 1])

    def stage_index(self, stage: Stage, rank):
        """Rank's index inside its group of ``stage`` (the group's rank order)."""
        return (rank // self.stride(stage.last)) % self.stage_size(stage)

    def stage_groups(self, stage: Stage) -> list[list[int]]:
        """Every group of ``stage`` as a list of EP ranks in group-rank order."""
        lo, hi = self.stride(stage.first - 1), self.stride(stage.last)
        return [[p * lo + q * hi + s for q in range(self.stage_size(stage))]
                for p in range(self.ranks // lo) for s in range(hi)]

    def crossed(self, a, b) -> int:
        """The outermost level at which ranks a and b differ (-1 when a == b); ints only."""
        for level in range(self.depth):
            if self.coord(a, level) != self.coord(b, level):
                return level
        return -1


def default_names(depth: int) -> tuple[str, ...]:
    """Names for a topology of ``depth`` levels: node, (socket,) (switch,) gpu."""
    table = {1: ("node",), 2: ("node", "gpu"), 3: ("node", "socket", "gpu"), 4: LEVEL_NAMES}
    return table.get(depth, tuple(f"level{i}" for i in range(depth)))


def stages_for_depth(levels: Levels, d: int) -> tuple[Stage, ...]:
    """HierMoE's d-dim AlltoAll: levels 0 .. d-2 one stage each, then levels d-1 .. D-1 in one
    stage. d = 1: the flat AlltoAll over the whole group. Needs 1 <= d <= D."""
    D = levels.depth
    if not 1 <= d <= max(D, 1):
        raise ValueError(f"dedup depth d={d} is out of range: allowed 1..{max(D, 1)} for {D} levels")
    if D == 0:
        return (Stage(0, -1),)
    return tuple(Stage(i, i) for i in range(d - 1)) + (Stage(d - 1, D - 1),)


# Seconds a dispatch + combine of the hierarchical dispatcher costs beyond its AlltoAlls' alpha-beta
# time when nothing was measured (``fsmoe profile --topology`` measures it per d): 2 H200 as 2 nodes
# (NCCL, no P2P), the current row format: dispatch + combine of small messages took 7.3 ms at
# d = 1 against the flat AlltoAll's 0.64 ms (3.7 ms of it the layout). Deeper d: the same per
# stage (not measured).
DEFAULT_OVERHEAD_S = 6.7e-3


@dataclass(frozen=True)
class LevelCosts:
    """alpha_L [s] and beta_L [s/byte] of an AlltoAll whose bytes cross level L's links;
    overhead [s] per d = 1..D: the hierarchical dispatcher's fixed cost per dispatch + combine
    beyond its collectives' alpha-beta time (host-side index building and syncs, launches;
    ``fsmoe profile --topology`` measures it against the flat AlltoAll).

    A stage's time is ``alpha[first] + max over levels L, ranks r of beta[L] * bytes of r over L``
    (sent or received; the links of different levels work at once)."""

    alpha: tuple[float, ...]
    beta: tuple[float, ...]
    overhead: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if len(self.alpha) != len(self.beta) or any(x < 0 for x in self.alpha + self.beta + self.overhead):
            raise ValueError(f"LevelCosts: alpha {self.alpha} and beta {self.beta} must be as long, and they and "
                             f"overhead {self.overhead} >= 0")

    def overhead_s(self, d: int) -> float:
        """The fixed cost of depth d (the deepest measured one's, scaled by d, past the measured)."""
        if not self.overhead:
            return 0.0
        n = len(self.overhead)
        return self.overhead[d - 1] if d <= n else self.overhead[-1] * d / n

    @staticmethod
    def defaults(levels: Levels) -> "LevelCosts":
        """Typical links when nothing was measured: node 25 GB/s (one 200 Gb/s NIC per node),
        socket 40 GB/s (two UPI/QPI links), switch 24 GB/s (PCIe 4.0 x16), gpu 112 GB/s (an
        NVLink pair). A link serves every rank below it (``fsmoe.comm.traffic``). Overhead:
        ``DEFAULT_OVERHEAD_S`` per stage."""
        table = {"node": (10e-6, 25e9), "socket": (5e-6, 40e9), "switch": (5e-6, 24e9), "gpu": (3e-6, 112e9)}
        pairs = [table.get(levels.name(i), (5e-6, 50e9)) for i in range(levels.depth)]
        overhead = tuple(DEFAULT_OVERHEAD_S * d for d in range(1, max(levels.depth, 1) + 1))
        return LevelCosts(tuple(a for a, _ in pairs), tuple(1.0 / bw for _, bw in pairs), overhead)

    @staticmethod
    def from_profile(profile, levels: Levels) -> "LevelCosts":
        """From a Profile's ``a2a_level{i}`` fits (``fsmoe profile`` with a topology), else its
        ``a2a_inter`` (level 0) / ``a2a_intra`` (inner levels) fits, else the defaults. A fit's
        n is the bytes one rank sends. Overhead: the ``hier_overhead_d{d}`` entries (alpha, s)
        when the profile has them all, else the default."""
        base = LevelCosts.defaults(levels)
        alpha, beta = list(base.alpha), list(base.beta)
        for i in range(levels.depth):
            for key in (f"a2a_level{i}", "a2a_inter" if i == 0 else "a2a_intra"):
                if profile is not None and key in profile.fits:
                    alpha[i], beta[i] = profile.fits[key].alpha, profile.fits[key].beta
                    break
        keys = [f"hier_overhead_d{d}" for d in range(1, max(levels.depth, 1) + 1)]
        overhead = base.overhead
        if profile is not None and all(k in profile.fits for k in keys):
            overhead = tuple(profile.fits[k].alpha for k in keys)
        return LevelCosts(tuple(alpha), tuple(beta), overhead)


def ep_levels(topology: tuple[int, ...], ep: int, esp: int) -> Levels:
    """The levels of one EP group from the world's topology (outermost first, product = world).

    Ranks are numbered ``edp, ep, esp`` (esp innermost): the innermost ``esp`` ranks of the
    world's levels belong to one ESP group (they share experts, so no dispatch crosses them), the
    next ``ep`` to the EP group, the rest to EDP replicas. Each boundary must fall inside a level
    size (ValueError naming parallel.topology otherwise)."""
    sizes = list(topology)
    _take_inner(sizes, esp, "esp")
    return Levels.of(_take_inner(sizes, ep, "ep"), default_names(len(topology)))


def _take_inner(sizes: list[int], count: int, what: str) -> list[int]:
    """Remove ``count`` ranks from the innermost levels of ``sizes`` (in place); returns the
    removed part's level sizes (outermost first, same length as ``sizes``)."""
    taken = [1] * len(sizes)
    for i in reversed(range(len(sizes))):
        g = math.gcd(sizes[i], count)
        if g != sizes[i] and g != count:
            raise ValueError(f"parallel.topology={tuple(sizes)}: {what}={count} ranks do not fill whole levels "
                             f"from the inside (level size {sizes[i]})")
        taken[i], sizes[i], count = g, sizes[i] // g, count // g
        if count == 1:
            break
    if count != 1:
        raise ValueError(f"parallel.topology: {what} does not fit in the levels {tuple(sizes)}")
    return taken
