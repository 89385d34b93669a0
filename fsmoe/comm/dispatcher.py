"""The dispatcher interface: move expert-ordered rows to the ranks holding those experts, and back.

Shape legend: N rows on this rank grouped by global expert (output of Order), E global experts,
R rows received for the local experts, El local experts, D model dim.

A dispatcher is a stateless object, not an ``nn.Module``. One dispatch is:

    1. ``layout(plan)``            the split sizes (a ``DispatchLayout``; a collective for a
                                   sharded backend). It sees the whole ``RoutingPlan`` (token ids
                                   before Order's k-fold copy, expert ids, weights), so a backend
                                   may plan to send a token once per destination and copy it there.
    2. ``launch_dispatch(x_ND, layout)`` -> Pending, ``finish_dispatch(pending)`` -> rows for the
       local experts; ``launch_combine`` / ``finish_combine`` the way back.

``launch`` starts communication and returns; ``finish`` waits and post-processes, so a scheduler
can overlap one chunk's communication with another chunk's compute. Lanes: inter-node
collectives are issued only by ``launch_dispatch`` and ``finish_combine``, intra-node ones only by
``finish_dispatch`` and ``launch_combine``; a scheduler calls each pair from one thread or stream
(its inter and intra lanes), so every group sees its collectives in the same order on all ranks.
A layout may be a chunk of a layer's layout (``DispatchLayout.chunks``): the same calls move one
chunk. ``dispatch`` and ``combine`` are the sequential composition for a whole layer. Backends:
``LocalDispatcher`` (one process, identity), ``ShardedDispatcher`` in ``sharded.py`` (EP AlltoAll stage ``alltoall.py``
+ ESP AllGather/ReduceScatter stage ``esp.py``; chosen by ``fsmoe.parallel.moe.build_dispatcher``).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from fsmoe.comm.layout import DispatchLayout
from fsmoe.routing.plan import RoutingPlan


@dataclass(frozen=True)
class DispatchHandle:
    """What ``combine`` needs to send expert outputs back. Backends subclass it.

    num_rows: N, the rows of the x_ND handed to ``launch_dispatch`` (``combine`` returns as many).
    layout: the split sizes of this dispatch (None on the local fast path).
    """

    num_rows: int
    layout: DispatchLayout | None = None


@dataclass(frozen=True)
class Pending:
    """An in-flight communication: ``work`` is waited on by ``finish``; ``state`` is backend data."""

    work: object | None
    state: object


class Dispatcher(ABC):
    """num_local_experts: El; esp_size: ranks sharing each expert along d_ff. With esp_size > 1,
    ``finish_dispatch`` and ``launch_combine`` run an intra-node collective (a scheduler puts
    them on its intra lane)."""

    num_local_experts: int
    esp_size: int = 1
    # True: combine returns each token's weighted sum in one of its rows, so the layer's I-Order
    # must not weight again (fsmoe.order.SummedIndexOrder); the hierarchical backend does this.
    applies_weights: bool = False

    @abstractmethod
    def layout(self, plan: RoutingPlan) -> DispatchLayout:
        """Step 1: every split size of this layer's dispatch (a collective for sharded backends)."""

    @abstractmethod
    def launch_dispatch(self, x_ND: Tensor, layout: DispatchLayout) -> Pending:
        """Start sending ``layout.take_rows(x_ND)`` to the ranks holding their experts."""

    @abstractmethod
    def finish_dispatch(self, pending: Pending) -> tuple[Tensor, Tensor, DispatchHandle]:
        """Returns (x_RD rows for local experts grouped by local expert, counts_El, handle)."""

    @abstractmethod
    def launch_combine(self, y_RD: Tensor, handle: DispatchHandle) -> Pending: ...

    @abstractmethod
    def finish_combine(self, pending: Pending) -> Tensor:
        """Returns the expert outputs of the rows the layout sent, in its send order."""

    def wait(self, pending: Pending) -> Pending:
        """Block until a launched transfer has arrived (``finish`` then only post-processes)."""
        if pending.work is not None:
            pending.work.wait()
        return pending

    def dispatch(self, x_ND: Tensor, plan: RoutingPlan) -> tuple[Tensor, Tensor, DispatchHandle]:
        """The whole layer at once: ``finish_dispatch(launch_dispatch(x_ND, layout(plan)))``."""
        return self.finish_dispatch(self.launch_dispatch(x_ND, self.layout(plan)))

    def combine(self, y_RD: Tensor, handle: DispatchHandle) -> Tensor:
        """y_ND [N, D] in the order ``dispatch`` received the rows (rows it never sent are 0)."""
        return handle.layout.place_rows(self.finish_combine(self.launch_combine(y_RD, handle)), handle.num_rows)


class LocalDispatcher(Dispatcher):
    """One process holds every expert: dispatch and combine move no data. ``dispatch`` and
    ``combine`` of a whole layer are the identity (no host sync); a layout (for chunks) reads
    the counts on the host."""

    def __init__(self, num_experts: int):
        self.num_local_experts = num_experts

    def layout(self, plan: RoutingPlan) -> DispatchLayout:
        return DispatchLayout.from_counts([[plan.tokens_per_expert_E.tolist()]], 0, 0)

    def launch_dispatch(self, x_ND, layout):
        return Pending(None, (layout.take_rows(x_ND), layout, x_ND.shape[0]))

    def finish_dispatch(self, pending):
        x_RD, layout, num_rows = pending.state
        return x_RD, counts_tensor(layout, x_RD), DispatchHandle(num_rows, layout)

    def launch_combine(self, y_RD, handle):
        return Pending(None, y_RD)

    def finish_combine(self, pending):
        return pending.state

    def dispatch(self, x_ND, plan):
        return x_ND, plan.tokens_per_expert_E, DispatchHandle(num_rows=x_ND.shape[0])

    def combine(self, y_RD, handle):
        return y_RD


def counts_tensor(layout: DispatchLayout, like: Tensor) -> Tensor:
    """[El] int64 on ``like``'s device: the layout's rows per local expert."""
    return torch.tensor(layout.tokens_per_local_expert_El, dtype=torch.int64, device=like.device)
