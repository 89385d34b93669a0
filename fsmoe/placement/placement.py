"""Placement: an immutable, versioned map from logical expert to physical (EP rank, slot).

Shape legend: E logical experts, P EP ranks, El slots per rank (E = P * El with one slot each).

A logical expert is what the router picks (``RoutingPlan.expert_ids``, the checkpoint's expert
index); a physical slot is where its weights live: slot j of EP rank p, i.e. row j of that rank's
``[El, D, F]`` expert tensors. The default, :meth:`Placement.contiguous`, is expert ``p*El + j``
in slot j of rank p. A replica would be a second slot of the same logical expert (the field is a
tuple per expert for that reason); the dispatchers here route to an expert's first slot and
reject placements with replicas.

Everything that needs to know where an expert is reads a Placement: the dispatcher (which rows go
to which rank, in which slot order), the expert shards (which rows of the full tensors they hold),
the performance model (which counts each rank receives) and ``migrate`` (what moves on a change).
Planners never edit one: they make a new one (:meth:`swap`), with ``version`` one higher.
"""
from __future__ import annotations

from dataclasses import dataclass

Slot = tuple[int, int]  # (EP rank, slot on that rank)


@dataclass(frozen=True)
class Placement:
    """slots_E[e]: the physical slots of logical expert e (first = where dispatch sends);
    ranks: P; slots_per_rank: El; version: bumped by every change."""

    slots_E: tuple[tuple[Slot, ...], ...]
    ranks: int
    slots_per_rank: int
    version: int = 0

    def __post_init__(self) -> None:
        seen = [s for slots in self.slots_E for s in slots]
        if any(not slots for slots in self.slots_E):
            raise ValueError("Placement: every expert needs a slot")
        if len(set(seen)) != len(seen):
            raise ValueError("Placement: two experts share a slot")
        if any(not (0 <= p < self.ranks and 0 <= j < self.slots_per_rank) for p, j in seen):
            raise ValueError(f"Placement: a slot is outside {self.ranks} ranks x {self.slots_per_rank} slots")
        if len(seen) != self.ranks * self.slots_per_rank:
            raise ValueError(f"Placement: {len(seen)} slots used, {self.ranks * self.slots_per_rank} exist")

    @staticmethod
    def contiguous(num_experts: int, ranks: int) -> "Placement":
        """Expert p*El + j in slot j of rank p (El = num_experts / ranks)."""
        if num_experts % ranks:
            raise ValueError(f"EP={ranks} does not divide num_experts={num_experts}")
        El = num_experts // ranks
        return Placement(tuple(((e // El, e % El),) for e in range(num_experts)), ranks, El)

    @property
    def num_experts(self) -> int:
        return len(self.slots_E)

    @property
    def has_replicas(self) -> bool:
        return any(len(slots) > 1 for slots in self.slots_E)

    def rank_of(self, e: int) -> int:
        """The EP rank dispatch sends expert e's rows to."""
        return self.slots_E[e][0][0]

    def experts_on(self, rank: int) -> tuple[int, ...]:
        """The logical expert in each slot of ``rank``, slot order."""
        by_slot = {j: e for e, slots in enumerate(self.slots_E) for p, j in slots if p == rank}
        return tuple(by_slot[j] for j in range(self.slots_per_rank))

    @property
    def physical_order(self) -> tuple[int, ...]:
        """The logical expert of every physical slot, rank-major: rank 0's slots, then rank 1's, ..."""
        return tuple(e for p in range(self.ranks) for e in self.experts_on(p))

    @property
    def is_contiguous(self) -> bool:
        return self.physical_order == tuple(range(self.num_experts)) and not self.has_replicas

    def swap(self, a: int, b: int) -> "Placement":
        """A new placement with logical experts a and b in each other's slots."""
        slots = list(self.slots_E)
        slots[a], slots[b] = slots[b], slots[a]
        return Placement(tuple(slots), self.ranks, self.slots_per_rank, self.version + 1)
