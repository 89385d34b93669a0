"""Moving experts between EP ranks when the placement changes: weights and optimizer state, exact.

Shape legend: P EP ranks, El slots per rank, n transfers, R numbers per slot row (one row of every
expert weight, its gradient and its optimizer tensors, flattened and concatenated).

Expand (a new copy in a free slot), Shrink (a copy's slot becomes free) and Migrate (a copy
moves to a free slot) are all placement changes ``old -> new``; :class:`MigrationPlan` says which
slot's row each slot of ``new`` copies, and ``migrate(layer, new, ep_group, optimizer)`` runs it
on every rank of the layer's EP group (between steps, after ``optimizer.step``):

    1. Plan (pure, the same on every rank): every slot of ``new`` that holds an expert its old
       contents were not gets a copy of a slot that held that expert in ``old``: one on the
       same rank if there is one (a local copy), else the holder that sends least so far.
       A slot that keeps its expert, or becomes free, is left alone.
    2. Pack: each slot row this rank sends, or copies locally, is read *before* anything is
       written (a row may be both read and overwritten): weights, gradients (if any) and every
       optimizer tensor of the parameter's shape (AdamW's exp_avg, exp_avg_sq), ``[n, R]``.
    3. One uneven AlltoAll over the EP group moves the remote rows (skipped by every rank when
       no row crosses ranks); each received or local row is written into its slot of the same
       tensors (parameters keep their identity, so the optimizer still finds its state).
    4. The layer's dispatcher and expert shard switch to the new placement.

Nothing is recomputed, so the moved values are bit-identical; scalar optimizer state (AdamW's
step) is the same on every rank and stays. The bytes that cross ranks and the time taken come
back as :class:`MigrationStats`.

Overlapped with compute (:func:`launch_migration`, what training uses): steps 1-2 run right
after the optimizer step and the AlltoAll of step 3 is launched asynchronously (``async_op``:
gloo's worker threads on CPUs, NCCL's stream on GPUs); :meth:`PendingMigration.commit` — called
just before the layer's next forward — waits for it, writes the rows and switches the placement
(step 4). Nothing reads or writes the expert tensors in between (the next step's earlier layers
run), so the result is the same bytes as :func:`migrate`. Gradients are not moved: after the
optimizer step they are dead (the next step sets them to None before its backward).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from fsmoe.placement.placement import FREE, Placement, Slot


@dataclass(frozen=True)
class Transfer:
    """Slot ``dst`` receives a copy of slot ``src``'s row (both (EP rank, slot)); ``expert``: whose."""

    src: Slot
    dst: Slot
    expert: int

    @property
    def remote(self) -> bool:
        return self.src[0] != self.dst[0]


@dataclass(frozen=True)
class MigrationPlan:
    """The transfers from ``old`` to ``new``, sorted by (source rank, destination rank, slot):
    the order in which a sender packs and a receiver unpacks its rows."""

    old: Placement
    new: Placement
    transfers: tuple[Transfer, ...]

    @staticmethod
    def between(old: Placement, new: Placement) -> "MigrationPlan":
        if (new.num_experts, new.ranks, new.slots_per_rank) != (old.num_experts, old.ranks, old.slots_per_rank):
            raise ValueError(f"placement {new.num_experts}x{new.ranks}x{new.slots_per_rank} does not match the "
                             f"layer's {old.num_experts}x{old.ranks}x{old.slots_per_rank}")
        old_on = [old.experts_on(p) for p in range(old.ranks)]
        sends = [0] * old.ranks
        out = []
        for q in range(new.ranks):
            for j, e in enumerate(new.experts_on(q)):
                if e == FREE or old_on[q][j] == e:
                    continue
                holders = old.slots_E[e]
                local = [s for s in holders if s[0] == q]
                src = local[0] if local else min(holders, key=lambda s: (sends[s[0]], s[0]))
                if not local:
                    sends[src[0]] += 1
                out.append(Transfer(src, (q, j), e))
        return MigrationPlan(old, new, tuple(sorted(out, key=lambda t: (t.src[0], t.dst[0], t.dst[1]))))

    @property
    def remote_rows(self) -> int:
        """Slot rows that cross ranks (each one expert's weights and optimizer state)."""
        return sum(t.remote for t in self.transfers)

    def moved_fraction(self) -> float:
        """Remote rows / logical experts: the share of the layer's expert bytes that moves."""
        return self.remote_rows / self.old.num_experts


@dataclass(frozen=True)
class MigrationStats:
    """What one ``migrate`` call did on this rank: rows that crossed ranks (whole EP group),
    bytes this rank sent, bytes of all remote rows (whole EP group), seconds it took."""

    remote_rows: int
    sent_bytes: int
    moved_bytes: int
    seconds: float


def slot_tensors(experts, optimizer: torch.optim.Optimizer | None, grads: bool = True) -> list[Tensor]:
    """Every tensor whose dim 0 is the slot: each expert weight, its gradient if any (and
    ``grads``), and its optimizer tensors of the same shape (sorted by name), in
    ``experts.parameters()`` order."""
    state = optimizer.state if optimizer is not None else {}
    out = []
    for p in experts.parameters():
        out.append(p.data)
        if grads and p.grad is not None:
            out.append(p.grad)
        moments = state.get(p, {})
        out += [moments[k] for k in sorted(moments) if isinstance(moments[k], Tensor) and moments[k].shape == p.shape]
    return out


def _rows(tensors: list[Tensor], slots: list[int]) -> Tensor:
    """[len(slots), R]: the given rows of every tensor, flattened and concatenated."""
    if len({t.dtype for t in tensors}) > 1:  # one packed buffer: a cast would not be exact
        raise TypeError(f"migrate packs expert tensors of one dtype, got {sorted({str(t.dtype) for t in tensors})}")
    idx = torch.tensor(slots, dtype=torch.int64, device=tensors[0].device)
    return torch.cat([t.index_select(0, idx).reshape(len(slots), -1) for t in tensors], 1)


def _write(tensors: list[Tensor], slots: list[int], rows_nR: Tensor) -> None:
    widths = [t[0].numel() for t in tensors]
    for t, part in zip(tensors, torch.split(rows_nR, widths, dim=1)):
        idx = torch.tensor(slots, dtype=torch.int64, device=t.device)
        t.index_copy_(0, idx, part.reshape(len(slots), *t.shape[1:]))


def apply_plan(tensors: list[Tensor], plan: MigrationPlan, rank: int, ep_group: ProcessGroup | None) -> int:
    """Run ``plan`` on this rank's slot tensors (steps 2-3 of the module docstring); returns the
    bytes this rank sent. Collective over the EP group when some row crosses ranks."""
    P = plan.new.ranks
    mine_out = [t for t in plan.transfers if t.src[0] == rank and t.remote]
    local = [t for t in plan.transfers if t.src[0] == rank and not t.remote]
    send = _rows(tensors, [t.src[1] for t in mine_out]) if mine_out else None
    local_rows = _rows(tensors, [t.src[1] for t in local]) if local else None
    if plan.remote_rows:
        if P > 1 and not dist.is_initialized():
            raise ValueError("moving experts between ranks needs the EP process group")
        width = sum(t[0].numel() for t in tensors)
        incoming = [t for t in plan.transfers if t.dst[0] == rank and t.remote]
        recv = tensors[0].new_empty((len(incoming), width))
        out_splits = [sum(1 for t in mine_out if t.dst[0] == q) for q in range(P)]
        in_splits = [sum(1 for t in incoming if t.src[0] == q) for q in range(P)]
        buf = send if send is not None else tensors[0].new_empty((0, width))
        dist.all_to_all_single(recv, buf.contiguous(), in_splits, out_splits, group=ep_group)
        if incoming:
            _write(tensors, [t.dst[1] for t in incoming], recv)
    if local:
        _write(tensors, [t.dst[1] for t in local], local_rows)
    return 0 if send is None else send.numel() * send.element_size()


class PendingMigration:
    """A migration in flight (:func:`launch_migration`); :meth:`commit` finishes it."""

    def __init__(self, layer, plan: MigrationPlan, tensors: list[Tensor], rank: int, ep_group, t0: float):
        self.layer, self.plan, self.tensors, self.rank = layer, plan, tensors, rank
        self.row_bytes = sum(t[0].numel() * t.element_size() for t in tensors)
        mine_out = [t for t in plan.transfers if t.src[0] == rank and t.remote]
        self.local = [t for t in plan.transfers if t.src[0] == rank and not t.remote]
        self.incoming = [t for t in plan.transfers if t.dst[0] == rank and t.remote]
        with torch.no_grad():
            self.local_rows = _rows(tensors, [t.src[1] for t in self.local]) if self.local else None
            send = _rows(tensors, [t.src[1] for t in mine_out]) if mine_out else None
        self.sent_bytes = 0 if send is None else send.numel() * send.element_size()
        self.work, self.recv, self.done_at = None, None, None
        if plan.remote_rows:
            P = plan.new.ranks
            if P > 1 and not dist.is_initialized():
                raise ValueError("moving experts between ranks needs the EP process group")
            width = sum(t[0].numel() for t in tensors)
            self.recv = tensors[0].new_empty((len(self.incoming), width))
            out_splits = [sum(1 for t in mine_out if t.dst[0] == q) for q in range(P)]
            in_splits = [sum(1 for t in self.incoming if t.src[0] == q) for q in range(P)]
            buf = send if send is not None else tensors[0].new_empty((0, width))
            self.work = dist.all_to_all_single(self.recv, buf.contiguous(), in_splits, out_splits, group=ep_group,
                                               async_op=True)
            if tensors[0].device.type == "cpu":  # gloo completes the future on its worker thread
                self.work.get_future().then(self._finished)
        self.launched_at = time.perf_counter()
        self.launch_s = self.launched_at - t0

    def _finished(self, fut):
        self.done_at = time.perf_counter()
        return None

    def commit(self) -> tuple[float, float]:
        """Wait for the AlltoAll, write the rows, switch the layer to the new placement. Returns
        (seconds this call took: the exposed wait and writes, seconds the transfer ran hidden
        behind compute: launch to completion, or to this call where completion is not seen on
        the host)."""
        t0 = time.perf_counter()
        if self.work is not None and self.done_at is None and self.work.is_completed():
            self.done_at = t0
        hidden = ((self.done_at if self.done_at is not None else t0) - self.launched_at) if self.work else 0.0
        with torch.no_grad():
            if self.work is not None:
                self.work.wait()
                if self.incoming:
                    _write(self.tensors, [t.dst[1] for t in self.incoming], self.recv)
            if self.local:
                _write(self.tensors, [t.dst[1] for t in self.local], self.local_rows)
        _switch(self.layer, self.plan.new)
        return time.perf_counter() - t0, max(0.0, hidden)


def launch_migration(layer, new: Placement, ep_group: ProcessGroup | None,
                     optimizer: torch.optim.Optimizer | None = None) -> PendingMigration:
    """Start moving ``layer``'s experts to ``new`` (weights and optimizer state; module
    docstring, "Overlapped"); the caller commits it before the layer's next forward."""
    t0 = time.perf_counter()
    experts = layer.experts
    plan = MigrationPlan.between(experts.placement, new)
    return PendingMigration(layer, plan, slot_tensors(experts, optimizer, grads=False), experts.ep_rank, ep_group, t0)


def _switch(layer, new: Placement) -> None:
    layer.experts.placement = new
    layer.dispatcher = layer.dispatcher.with_placement(new)


def migrate(layer, new: Placement, ep_group: ProcessGroup | None,
            optimizer: torch.optim.Optimizer | None = None) -> MigrationStats:
    """Move ``layer``'s experts (a ``ParallelMoELayer``) to placement ``new`` (see module docstring)."""
    t0 = time.perf_counter()
    experts = layer.experts
    plan = MigrationPlan.between(experts.placement, new)
    tensors = slot_tensors(experts, optimizer)
    with torch.no_grad():
        sent = apply_plan(tensors, plan, experts.ep_rank, ep_group)
    _switch(layer, new)
    row_bytes = sum(t[0].numel() * t.element_size() for t in tensors)
    return MigrationStats(plan.remote_rows, sent, plan.remote_rows * row_bytes, time.perf_counter() - t0)


@contextlib.contextmanager
def logical_layout(layers: list, ep_group: ProcessGroup | None, optimizer: torch.optim.Optimizer | None = None):
    """Inside the block every layer's experts sit in ``Placement.initial`` (expert p*E/P + j in
    slot j of rank p; spare slots kept), as a checkpoint stores them; after it, back where they
    were. Both moves are exact (``migrate``)."""
    saved = [ly.experts.placement for ly in layers]
    for ly, pl in zip(layers, saved):
        if not pl.holds_logical_prefix:
            migrate(ly, Placement.initial(pl.num_experts, pl.ranks, pl.slots_per_rank - pl.num_experts // pl.ranks),
                    ep_group, optimizer)
    try:
        yield
    finally:
        for ly, pl in zip(layers, saved):
            if ly.experts.placement is not pl:
                migrate(ly, pl, ep_group, optimizer)
