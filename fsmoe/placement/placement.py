"""Placement: an immutable, versioned map from logical expert to physical (EP rank, slot).

Shape legend: E logical experts, P EP ranks, El slots per rank (E = P * El without spare slots),
K = P * El physical slots, rank-major.

A logical expert is what the router picks (``RoutingPlan.expert_ids``, the checkpoint's expert
index); a physical slot is where its weights live: slot j of EP rank p, i.e. row j of that rank's
``[El, D, F]`` expert tensors. The default, :meth:`Placement.contiguous`, is expert ``p*El + j``
in slot j of rank p.

Replicas and spare slots (FlexMoE): an expert may hold several slots (its *copies*, identical
weights and optimizer state); the dispatcher splits every source rank's rows for that expert
among them (``fsmoe.comm.layout``) — evenly, or by the integer *shares* a policy planned
(``shares_E``: copy i of expert e gets ``shares_E[e][i] / sum(shares_E[e])`` of every source's
rows, up to rounding) — and the copies' gradients are summed before the optimizer step
(``fsmoe.placement.replicas``), so training does not depend on the copies or the shares. A slot
that holds no expert is *free* (``FREE`` in :meth:`experts_on`): it receives no rows.
:meth:`Placement.initial` is the contiguous placement plus ``spare`` free slots per rank.

Everything that needs to know where an expert is reads a Placement: the dispatcher (which rows go
to which rank, in which slot order), the expert shards (which rows of the full tensors they hold),
the performance model (which counts each rank receives) and ``migrate`` (what moves on a change).
Planners never edit one: they make a new one (:meth:`swap`, :meth:`expand`, :meth:`shrink`,
:meth:`move`, :meth:`with_shares`), with ``version`` one higher; expand, shrink and move go back
to the even split (a policy sets shares last).
"""
from __future__ import annotations

from dataclasses import dataclass

Slot = tuple[int, int]  # (EP rank, slot on that rank)
FREE = -1  # experts_on / physical_order entry of a slot that holds no expert


@dataclass(frozen=True)
class Placement:
    """slots_E[e]: the physical slots of logical expert e (one per copy; the first is its
    *primary*); ranks: P; slots_per_rank: El (spare slots included); version: bumped by every
    change; shares_E: per expert, a positive integer weight per copy (order of ``slots_E[e]``)
    saying what part of the expert's rows each copy computes; ``()``: even split. Slots held by
    no expert are free."""

    slots_E: tuple[tuple[Slot, ...], ...]
    ranks: int
    slots_per_rank: int
    version: int = 0
    shares_E: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        seen = [s for slots in self.slots_E for s in slots]
        if any(not slots for slots in self.slots_E):
            raise ValueError("Placement: every expert needs a slot")
        if len(set(seen)) != len(seen):
            raise ValueError("Placement: two experts share a slot")
        if any(not (0 <= p < self.ranks and 0 <= j < self.slots_per_rank) for p, j in seen):
            raise ValueError(f"Placement: a slot is outside {self.ranks} ranks x {self.slots_per_rank} slots")
        if any(len({p for p, _ in slots}) != len(slots) for slots in self.slots_E):
            # two copies on one rank would only split one GPU's work in two
            raise ValueError("Placement: two copies of one expert on the same rank")
        if self.shares_E and (len(self.shares_E) != len(self.slots_E) or any(
                len(w) != len(slots) or any(not isinstance(x, int) or x < 1 for x in w)
                for w, slots in zip(self.shares_E, self.slots_E))):
            raise ValueError("Placement: shares_E needs one positive integer per copy of every expert")

    @staticmethod
    def contiguous(num_experts: int, ranks: int) -> "Placement":
        """Expert p*El + j in slot j of rank p (El = num_experts / ranks)."""
        return Placement.initial(num_experts, ranks, 0)

    @staticmethod
    def initial(num_experts: int, ranks: int, spare: int) -> "Placement":
        """The contiguous placement plus ``spare`` free slots at the end of every rank."""
        if num_experts % ranks:
            raise ValueError(f"EP={ranks} does not divide num_experts={num_experts}")
        if spare < 0:
            raise ValueError(f"spare slots per rank must be >= 0, got {spare}")
        El = num_experts // ranks
        return Placement(tuple(((e // El, e % El),) for e in range(num_experts)), ranks, El + spare)

    @property
    def num_experts(self) -> int:
        return len(self.slots_E)

    @property
    def has_replicas(self) -> bool:
        return any(len(slots) > 1 for slots in self.slots_E)

    @property
    def num_slots(self) -> int:
        return self.ranks * self.slots_per_rank

    @property
    def num_copies(self) -> int:
        """Slots that hold an expert (experts plus their extra copies)."""
        return sum(len(slots) for slots in self.slots_E)

    def copies(self, e: int) -> int:
        return len(self.slots_E[e])

    def weights(self, e: int) -> tuple[int, ...]:
        """Expert e's integer share of each copy (order of ``slots_E[e]``; all 1 for an even split)."""
        return self.shares_E[e] if self.shares_E else (1,) * len(self.slots_E[e])

    def fractions(self, e: int) -> dict[int, float]:
        """EP rank -> the part of expert e's rows the copy on that rank computes."""
        w = self.weights(e)
        return {p: x / sum(w) for (p, _), x in zip(self.slots_E[e], w)}

    @property
    def physical_weights(self) -> tuple[int, ...]:
        """The share weight of every physical slot, rank-major as :attr:`physical_order` (0 for
        a free slot)."""
        by_slot = {s: x for e, slots in enumerate(self.slots_E) for s, x in zip(slots, self.weights(e))}
        return tuple(by_slot.get((p, j), 0) for p in range(self.ranks) for j in range(self.slots_per_rank))

    def with_shares(self, shares_E) -> "Placement":
        """The same slots with other shares (``()`` or all-equal rows: the even split). Moves no
        bytes: only the dispatcher's split changes."""
        shares = tuple(tuple(int(x) for x in w) for w in shares_E)
        if all(len(set(w)) <= 1 for w in shares):
            shares = ()
        if shares == self.shares_E:
            return self
        return Placement(self.slots_E, self.ranks, self.slots_per_rank, self.version + 1, shares)

    def rank_of(self, e: int) -> int:
        """The EP rank of expert e's primary copy."""
        return self.slots_E[e][0][0]

    def ranks_of(self, e: int) -> tuple[int, ...]:
        """The EP ranks holding a copy of expert e (primary first)."""
        return tuple(p for p, _ in self.slots_E[e])

    def experts_on(self, rank: int) -> tuple[int, ...]:
        """The logical expert in each slot of ``rank``, slot order (``FREE`` for a free slot)."""
        by_slot = {j: e for e, slots in enumerate(self.slots_E) for p, j in slots if p == rank}
        return tuple(by_slot.get(j, FREE) for j in range(self.slots_per_rank))

    @property
    def physical_order(self) -> tuple[int, ...]:
        """The logical expert of every physical slot, rank-major: rank 0's slots, then rank 1's, ...
        (``FREE`` for free slots)."""
        return tuple(e for p in range(self.ranks) for e in self.experts_on(p))

    def free_slots(self, rank: int) -> tuple[int, ...]:
        return tuple(j for j, e in enumerate(self.experts_on(rank)) if e == FREE)

    def primary_slots(self, rank: int) -> tuple[int, ...]:
        """The slots of ``rank`` holding the primary copy of their expert (each expert counted
        once over all ranks, e.g. for a gradient norm)."""
        return tuple(sorted(j for slots in self.slots_E for p, j in slots[:1] if p == rank))

    @property
    def is_contiguous(self) -> bool:
        return self.physical_order == tuple(range(self.num_experts)) and not self.has_replicas

    @property
    def holds_logical_prefix(self) -> bool:
        """Slot j < E/P of rank p holds expert p*(E/P) + j (as in :meth:`initial`; the spare slots
        may hold anything): a checkpoint can read and write the leading rows in place."""
        El = self.num_experts // self.ranks
        return self.num_experts % self.ranks == 0 and all(
            (e // El, e % El) in slots for e, slots in enumerate(self.slots_E))

    # ------------------------------------------------------------------ changes (each a new version)
    def _with(self, slots: list[tuple[Slot, ...]]) -> "Placement":
        return Placement(tuple(slots), self.ranks, self.slots_per_rank, self.version + 1)

    def swap(self, a: int, b: int) -> "Placement":
        """A new placement with logical experts a and b in each other's slots."""
        slots = list(self.slots_E)
        slots[a], slots[b] = slots[b], slots[a]
        shares = list(self.shares_E)
        if shares:
            shares[a], shares[b] = shares[b], shares[a]
        return Placement(tuple(slots), self.ranks, self.slots_per_rank, self.version + 1, tuple(shares))

    def expand(self, e: int, slot: Slot) -> "Placement":
        """Expert e gets one more copy, in the free ``slot``."""
        if slot in self._owner:
            raise ValueError(f"Placement.expand: slot {slot} is not free (holds expert {self._owner[slot]})")
        slots = list(self.slots_E)
        slots[e] = slots[e] + (slot,)
        return self._with(slots)

    def shrink(self, e: int, slot: Slot) -> "Placement":
        """Expert e gives up its copy in ``slot`` (it must keep another); the slot becomes free."""
        if slot not in self.slots_E[e] or len(self.slots_E[e]) == 1:
            raise ValueError(f"Placement.shrink: expert {e} has no spare copy in slot {slot}")
        slots = list(self.slots_E)
        slots[e] = tuple(s for s in slots[e] if s != slot)
        return self._with(slots)

    def move(self, e: int, src: Slot, dst: Slot) -> "Placement":
        """Expert e's copy in ``src`` moves to the free slot ``dst`` (Migrate)."""
        if src not in self.slots_E[e]:
            raise ValueError(f"Placement.move: expert {e} has no copy in slot {src}")
        if dst in self._owner:
            raise ValueError(f"Placement.move: slot {dst} is not free (holds expert {self._owner[dst]})")
        slots = list(self.slots_E)
        slots[e] = tuple(dst if s == src else s for s in slots[e])
        return self._with(slots)

    @property
    def _owner(self) -> dict[Slot, int]:
        return {s: e for e, slots in enumerate(self.slots_E) for s in slots}
