"""ShardedDispatcher: the EP AlltoAll stage and the ESP AllGather/ReduceScatter stage composed
behind the :class:`~fsmoe.comm.dispatcher.Dispatcher` interface, so ``MoELayer`` is unchanged.

Shape legend: N rows on this rank grouped by global expert (Order's output; the last
``N - num_sent`` are dropped assignments), R rows after the AlltoAll, G rows after the ESP
AllGather (= rows of this rank's experts from the whole ``moe`` group), El local experts, D
model dim.

Dispatch (numbered as the scheduler sees it)::

    1. exchange counts      all-gather tokens_per_expert over the moe group -> DispatchLayout (layout)
    2. EP AlltoAll          layout.take_rows(x_ND) -> x_RD         (launch_dispatch / ep stage)
    3. ESP AllGather        x_RD -> x_GD                           (finish_dispatch / esp stage)
    4. regroup (local)      blocks (s, p, e) -> (e, s, p)          -> experts(x_GD, counts_El)

Combine is the mirror: regroup back and ESP ReduceScatter of the partial outputs
(launch_combine), EP AlltoAll back (finish_combine; ``combine`` appends zero rows for the dropped
assignments). The EP collectives are issued only in launch_dispatch / finish_combine and the ESP
ones only in finish_dispatch / launch_combine, so a scheduler that calls each pair from one lane
issues every group's collectives in the same order on every rank. Either stage is None when its
group has one rank. A scheduler that pipelines chunks calls ``layout`` once and the same
launch/finish verbs on each of ``layout.chunks(r)``.

Another backend (e.g. hierarchical inter-node then intra-node AlltoAll with token dedup) is a
new stage with the same launch/finish shape plus its own fields derived from the same counts.
"""
from __future__ import annotations

from torch import Tensor
from torch.distributed import ProcessGroup

from fsmoe.comm.alltoall import AllToAllStage
from fsmoe.comm.dispatcher import DispatchHandle, Dispatcher, Pending, counts_tensor
from fsmoe.comm.esp import EspStage
from fsmoe.comm.layout import DispatchLayout, exchange_counts, from_expert_major, to_expert_major
from fsmoe.placement.placement import Placement
from fsmoe.routing.plan import RoutingPlan


class ShardedDispatcher(Dispatcher):
    """EP x ESP dispatch. Stateless: one instance may serve every MoE layer.

    num_experts: E (global); ep, esp: group sizes; ep_rank, esp_rank: this rank's coordinates;
    counts_group: the ``moe`` group (ep*esp ranks) over which counts are exchanged;
    ep_stage / esp_stage: the stages (None for a group of one); placement: which EP rank and slot
    hold each expert (default: contiguous ranges).
    """

    def __init__(self, num_experts: int, *, ep: int, esp: int, ep_rank: int, esp_rank: int,
                 counts_group: ProcessGroup | None, ep_stage: AllToAllStage | None, esp_stage: EspStage | None,
                 placement: Placement | None = None):
        placement = placement or Placement.contiguous(num_experts, ep)
        if placement.num_experts != num_experts or placement.ranks != ep:
            raise ValueError(f"placement of {placement.num_experts} experts on {placement.ranks} ranks does not "
                             f"fit num_experts={num_experts}, EP={ep}")
        self.num_experts, self.num_local_experts = num_experts, placement.slots_per_rank
        self.ep_size, self.esp_size, self.ep_rank, self.esp_rank = ep, esp, ep_rank, esp_rank
        self.counts_group, self.ep, self.esp, self.placement = counts_group, ep_stage, esp_stage, placement

    def with_placement(self, placement: Placement) -> "ShardedDispatcher":
        """The same dispatcher sending by another placement."""
        return ShardedDispatcher(self.num_experts, ep=self.ep_size, esp=self.esp_size, ep_rank=self.ep_rank,
                                 esp_rank=self.esp_rank, counts_group=self.counts_group, ep_stage=self.ep,
                                 esp_stage=self.esp, placement=placement)

    def layout(self, plan: RoutingPlan) -> DispatchLayout:
        """Step 1 (collective, host sync): every rank's counts -> this rank's split sizes."""
        counts = exchange_counts(plan.tokens_per_expert_E, self.counts_group, self.ep_size, self.esp_size)
        return self.layout_from_counts(counts)

    def layout_from_counts(self, counts: list) -> DispatchLayout:
        """The layout from every rank's counts [P][S][E] (nested lists of ints), as exchanged by
        ``layout`` (a caller that gathers them along with its own numbers)."""
        return DispatchLayout.from_counts(counts, self.ep_rank, self.esp_rank, self.placement.physical_order,
                                          weights_K=self.placement.physical_weights if self.placement.shares_E else ())

    def launch_dispatch(self, x_ND: Tensor, layout: DispatchLayout) -> Pending:
        x_sent = layout.take_rows(x_ND)
        if self.ep is None:
            return Pending(None, (layout, x_sent, x_ND.shape[0]))
        launched = self.ep.launch(x_sent, layout.send_splits_P, layout.recv_splits_P)
        return Pending(launched.work, (layout, launched, x_ND.shape[0]))

    def finish_dispatch(self, pending: Pending) -> tuple[Tensor, Tensor, DispatchHandle]:
        layout, in_flight, num_rows = pending.state
        x_RD = in_flight if self.ep is None else self.ep.finish(in_flight)
        x_GD = x_RD if self.esp is None else self.esp.finish_gather(
            self.esp.launch_gather(x_RD, layout.gather_sizes_S))
        return to_expert_major(x_GD, layout), counts_tensor(layout, x_GD), DispatchHandle(num_rows, layout)

    def launch_combine(self, y_GD: Tensor, handle: DispatchHandle) -> Pending:
        layout = handle.layout
        y_GD = from_expert_major(y_GD, layout)
        y_RD = y_GD if self.esp is None else self.esp.finish_scatter(
            self.esp.launch_scatter(y_GD, layout.gather_sizes_S))
        return Pending(None, (y_RD, layout))

    def finish_combine(self, pending: Pending) -> Tensor:
        y_RD, layout = pending.state
        if self.ep is None:
            return y_RD
        return self.ep.finish(self.ep.launch(y_RD, layout.recv_splits_P, layout.send_splits_P))
