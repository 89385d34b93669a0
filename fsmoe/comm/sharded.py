"""ShardedDispatcher: the EP AlltoAll stage and the ESP AllGather/ReduceScatter stage composed
behind the :class:`~fsmoe.comm.dispatcher.Dispatcher` interface, so ``MoELayer`` is unchanged.

Shape legend: N rows on this rank grouped by global expert (Order's output; the last
``N - num_sent`` are dropped assignments), R rows after the AlltoAll, G rows after the ESP
AllGather (= rows of this rank's experts from the whole ``moe`` group), El local experts, D
model dim.

Dispatch (numbered as the scheduler sees it)::

    1. exchange counts      all-gather tokens_per_expert over the moe group -> DispatchLayout
    2. EP AlltoAll          x_ND[:num_sent] -> x_RD                (launch_dispatch / ep stage)
    3. ESP AllGather        x_RD -> x_GD                           (finish_dispatch / esp stage)
    4. regroup (local)      blocks (s, p, e) -> (e, s, p)          -> experts(x_GD, counts_El)

Combine is the mirror: regroup back, ESP ReduceScatter of the partial outputs, EP AlltoAll
back, zero rows appended for the dropped assignments. Either stage is None when its group has
one rank. A scheduler that pipelines chunks calls ``exchange`` once and then the stages
(``self.ep``, ``self.esp``) and the regroup functions in ``fsmoe.comm.layout`` per chunk.

Another backend (e.g. hierarchical inter-node then intra-node AlltoAll with token dedup) is a
new stage with the same launch/finish shape plus its own fields derived from the same counts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fsmoe.comm.alltoall import AllToAllStage
from fsmoe.comm.dispatcher import DispatchHandle, Dispatcher, Pending
from fsmoe.comm.esp import EspStage
from fsmoe.comm.layout import DispatchLayout, exchange_counts, from_expert_major, to_expert_major


@dataclass(frozen=True)
class ShardedHandle(DispatchHandle):
    """num_rows: N; layout: the split sizes of this dispatch (combine reuses them)."""

    layout: DispatchLayout


class ShardedDispatcher(Dispatcher):
    """EP x ESP dispatch. Stateless: one instance may serve every MoE layer.

    num_experts: E (global); ep, esp: group sizes; ep_rank, esp_rank: this rank's coordinates;
    counts_group: the ``moe`` group (ep*esp ranks) over which counts are exchanged;
    ep_stage / esp_stage: the stages (None for a group of one).
    """

    def __init__(self, num_experts: int, *, ep: int, esp: int, ep_rank: int, esp_rank: int, counts_group,
                 ep_stage: AllToAllStage | None, esp_stage: EspStage | None):
        if num_experts % ep:
            raise ValueError(f"EP={ep} does not divide num_experts={num_experts}")
        self.num_experts, self.num_local_experts = num_experts, num_experts // ep
        self.ep_size, self.esp_size, self.ep_rank, self.esp_rank = ep, esp, ep_rank, esp_rank
        self.counts_group, self.ep, self.esp = counts_group, ep_stage, esp_stage

    def exchange(self, tokens_per_expert_E: Tensor) -> DispatchLayout:
        """Step 1 (collective, host sync): every rank's counts -> this rank's split sizes."""
        counts = exchange_counts(tokens_per_expert_E, self.counts_group, self.ep_size, self.esp_size)
        return DispatchLayout.from_counts(counts, self.ep_rank, self.esp_rank)

    def launch_dispatch(self, x_ND: Tensor, tokens_per_expert_E: Tensor) -> Pending:
        layout = self.exchange(tokens_per_expert_E)
        x_sent = x_ND[: layout.num_sent]
        if self.ep is None:
            return Pending(None, (layout, x_sent, x_ND.shape[0]))
        launched = self.ep.launch(x_sent, layout.send_splits_P, layout.recv_splits_P)
        return Pending(launched.work, (layout, launched, x_ND.shape[0]))

    def finish_dispatch(self, pending: Pending) -> tuple[Tensor, Tensor, ShardedHandle]:
        layout, in_flight, num_rows = pending.state
        x_RD = in_flight if self.ep is None else self.ep.finish(in_flight)
        x_GD = x_RD if self.esp is None else self.esp.finish_gather(
            self.esp.launch_gather(x_RD, layout.gather_sizes_S))
        counts_El = torch.tensor(layout.tokens_per_local_expert_El, dtype=torch.int64, device=x_GD.device)
        return to_expert_major(x_GD, layout), counts_El, ShardedHandle(num_rows, layout)

    def launch_combine(self, y_GD: Tensor, handle: ShardedHandle) -> Pending:
        layout = handle.layout
        y_GD = from_expert_major(y_GD, layout)
        y_RD = y_GD if self.esp is None else self.esp.finish_scatter(
            self.esp.launch_scatter(y_GD, layout.gather_sizes_S))
        if self.ep is None:
            return Pending(None, (y_RD, handle))
        launched = self.ep.launch(y_RD, layout.recv_splits_P, layout.send_splits_P)
        return Pending(launched.work, (launched, handle))

    def finish_combine(self, pending: Pending) -> Tensor:
        in_flight, handle = pending.state
        y_sent = in_flight if self.ep is None else self.ep.finish(in_flight)
        return F.pad(y_sent, (0, 0, 0, handle.num_rows - y_sent.shape[0]))
