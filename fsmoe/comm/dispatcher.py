"""The dispatcher interface: move expert-ordered rows to the ranks holding those experts, and back.

Shape legend: N rows on this rank grouped by global expert (output of Order), E global experts,
R rows received for the local experts, El local experts, D model dim.

A dispatcher is a stateless object, not an ``nn.Module``. Each direction is split into
``launch`` (start communication, return a pending handle) and ``finish`` (wait, post-process),
so a scheduler can overlap one chunk's communication with another chunk's compute; ``dispatch``
and ``combine`` are the sequential composition. Backends: ``LocalDispatcher`` (one process,
identity), ``ShardedDispatcher`` in ``sharded.py`` (EP AlltoAll stage ``alltoall.py`` + ESP
AllGather/ReduceScatter stage ``esp.py``; chosen by ``fsmoe.parallel.moe.build_dispatcher``).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class DispatchHandle:
    """What ``combine`` needs to send expert outputs back. Backends subclass it.

    num_rows: N, the number of rows the caller handed to ``dispatch`` (combine returns as many).
    """

    num_rows: int


@dataclass(frozen=True)
class Pending:
    """An in-flight communication: ``work`` is waited on by ``finish``; ``state`` is backend data."""

    work: object | None
    state: object


class Dispatcher(ABC):
    num_local_experts: int

    @abstractmethod
    def launch_dispatch(self, x_ND: Tensor, tokens_per_expert_E: Tensor) -> Pending: ...

    @abstractmethod
    def finish_dispatch(self, pending: Pending) -> tuple[Tensor, Tensor, DispatchHandle]:
        """Returns (x_RD rows for local experts grouped by local expert, counts_El, handle)."""

    @abstractmethod
    def launch_combine(self, y_RD: Tensor, handle: DispatchHandle) -> Pending: ...

    @abstractmethod
    def finish_combine(self, pending: Pending) -> Tensor:
        """Returns y_ND in the order ``dispatch`` received the rows (rows it never sent are 0)."""

    def dispatch(self, x_ND: Tensor, tokens_per_expert_E: Tensor) -> tuple[Tensor, Tensor, DispatchHandle]:
        return self.finish_dispatch(self.launch_dispatch(x_ND, tokens_per_expert_E))

    def combine(self, y_RD: Tensor, handle: DispatchHandle) -> Tensor:
        return self.finish_combine(self.launch_combine(y_RD, handle))


class LocalDispatcher(Dispatcher):
    """One process holds every expert: dispatch and combine are the identity."""

    def __init__(self, num_experts: int):
        self.num_local_experts = num_experts

    def launch_dispatch(self, x_ND, tokens_per_expert_E):
        return Pending(None, (x_ND, tokens_per_expert_E))

    def finish_dispatch(self, pending):
        x_ND, counts_E = pending.state
        return x_ND, counts_E, DispatchHandle(num_rows=x_ND.shape[0])

    def launch_combine(self, y_RD, handle):
        return Pending(None, y_RD)

    def finish_combine(self, pending):
        return pending.state
