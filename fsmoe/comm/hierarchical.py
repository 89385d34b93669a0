"""HierarchicalDispatcher: HierMoE's d-level AlltoAll with token deduplication, behind the
:class:`~fsmoe.comm.dispatcher.Dispatcher` interface.

Shape legend: N rows of x_ND (Order's output, K per token, grouped by expert), T tokens,
K slots per item (a token's experts), I items on this rank before a stage, F items after the
last stage (on the rank that holds their experts), R expert rows of this rank (one per item and
local expert), G rows after the ESP AllGather, El local experts, D model dim, P EP ranks.

An *item* is a copy of a token that serves some of its experts: ``ids_IK`` holds those experts
(-1 elsewhere), ``w`` their combine weights. Dispatch, numbered as the code runs it:

    1. layout (host metadata, collectives on small int tensors):
       a. count the traffic of every candidate depth from this rank's routing, AllReduce it over
          the moe group, choose d by the cost model (``traffic.choose_depth``; or a fixed d);
       b. per stage of depth d: each item goes once to every stage peer that holds any of its
          experts (the routing mask OR-reduced per destination group), carrying only those
          experts; an AlltoAll of split sizes and one of the ids gives the next stage's items;
       c. after the last stage every item is on the rank of its experts: it is expanded to one
          row per (item, local expert), grouped by local expert; with ESP the expert counts of
          the ESP peers are all-gathered.
    2. data (autograd): one row per token taken from x_ND with its K weights appended as
       columns, moved through the d AlltoAlls (``launch_dispatch``), expanded, then the ESP
       AllGather (``finish_dispatch``).

Combine mirrors it: ESP ReduceScatter, each expert row times its weight, summed into its item
(the k outputs of a group added once, before sending back), the stages in reverse, each
summing the copies it had made. So the weighted sum over a token's experts arrives in the
token's first row of y_ND and its other rows are 0: the layer's I-Order must sum rows without
weighting them again (``applies_weights``; ``fsmoe.order.SummedIndexOrder``).

The weights travel with the tokens, so their gradient flows back through the same AlltoAlls.
Every sum is over the same terms as the flat dispatch (in another order): outputs and gradients
equal the flat ones to float rounding. ``dedup=False`` sends one item per (token, expert) pair
through the same stages: Tutel's 2DH AlltoAll (with d = 2), the no-dedup baseline.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from fsmoe.comm.dispatcher import DispatchHandle, Dispatcher, Pending
from fsmoe.comm.esp import EspStage
from fsmoe.comm.functional import all_gather_base, finish, launch_all_to_all
from fsmoe.comm.topology import LevelCosts, Levels, Stage, stages_for_depth
from fsmoe.comm.traffic import DepthChoice, Traffic, candidate_stages, choose_depth, count_traffic, select
from fsmoe.placement.placement import Placement
from fsmoe.routing.plan import RoutingPlan


@dataclass(frozen=True)
class StageMoves:
    """One stage on this rank: ``send_index`` [S] items sent (grouped by peer), split sizes."""

    stage: Stage
    send_index: Tensor
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]


@dataclass(frozen=True)
class DispatchStats:
    """What one layer's dispatch did, over the whole moe group (host ints, for metrics).

    depth: d used; predicted_s: cost-model seconds of dispatch + combine per d (index d - 1);
    rows_per_level: rows crossing each level (dispatch; combine moves as many back);
    flat_rows_per_level: the same for the flat AlltoAll without dedup (dedup factor = flat / rows);
    level_names: one per level."""

    depth: int
    predicted_s: tuple[float, ...]
    rows_per_level: tuple[int, ...]
    flat_rows_per_level: tuple[int, ...]
    level_names: tuple[str, ...]
    row_bytes: int


@dataclass(frozen=True)
class HierLayout:
    """Everything one hierarchical dispatch moves, on this rank (see the module docstring).

    item_rows_I: [I] row of x_ND carrying each item's token; weight_rows_IK: [I, K] row of
    ``weights_N`` of each slot (-1: none); moves: one per stage; expand_item_R / expand_slot_R:
    [R] item (after the last stage) and slot of each expert row, grouped by local expert;
    counts_El: rows per local expert here; esp_counts_SEl: every ESP peer's counts_El;
    stats: the group's numbers for metrics; ids_IK: [I, K] experts of each item before the first
    stage (-1: none), what the swap policy scores."""

    num_rows: int
    item_rows_I: Tensor
    weight_rows_IK: Tensor
    weights_N: Tensor
    moves: tuple[StageMoves, ...]
    expand_item_R: Tensor
    expand_slot_R: Tensor
    counts_El: tuple[int, ...]
    esp_counts_SEl: tuple[tuple[int, ...], ...]
    stats: DispatchStats
    ids_IK: Tensor = field(repr=False, default=None)


@dataclass(frozen=True)
class HierHandle(DispatchHandle):
    """What combine needs: the layout and each expert row's weight ``w_R`` [R] (differentiable)."""

    hier: HierLayout | None = None
    w_R: Tensor | None = None


class DepthPolicy:
    """Which d each dispatch uses: ``fixed`` (1..D), or 0 for the cost model's choice, made
    again every ``every`` dispatches of the layer (in between, the last choice is kept; this
    counter is the only state a dispatcher keeps, one policy per layer)."""

    def __init__(self, fixed: int = 0, every: int = 1):
        if fixed < 0 or every < 1:
            raise ValueError(f"DepthPolicy: fixed={fixed} must be >= 0 and every={every} >= 1")
        self.fixed, self.every, self.calls, self.last = fixed, every, 0, 0

    def depth(self, choice: DepthChoice) -> int:
        """The d of this dispatch, given the cost model's ``choice`` for it."""
        if self.fixed:
            return self.fixed
        if self.calls % self.every == 0:
            self.last = choice.depth
        self.calls += 1
        return self.last


class HierarchicalDispatcher(Dispatcher):
    """d-level dedup dispatch over the EP group ``levels``. Stateless but for ``policy`` and
    ``last_stats`` (the latest dispatch's numbers, read by the trainer's metrics).

    stage_groups: the process group of every stage of ``candidate_stages(levels)`` (the whole
    EP group for the stage covering every level); counts_group: the moe group (traffic is summed
    over it, so every rank chooses the same d); esp_stage / esp_group: the ESP stage (None for
    ESP 1); costs: alpha-beta per level; dedup: False for the 2DH baseline; row_bytes: bytes
    of one token on the wire (d_model * element size), the cost model's unit."""

    applies_weights = True

    def __init__(self, num_experts: int, *, levels: Levels, ep_rank: int, esp: int, stage_groups: dict,
                 counts_group: ProcessGroup | None, esp_stage: EspStage | None, esp_group=None,
                 costs: LevelCosts | None = None, placement: Placement | None = None, dedup: bool = True,
                 policy: DepthPolicy | None = None, row_bytes: int = 4096):
        placement = placement or Placement.contiguous(num_experts, levels.ranks)
        if placement.ranks != levels.ranks or placement.num_experts != num_experts:
            raise ValueError(f"placement of {placement.num_experts} experts on {placement.ranks} ranks does not fit "
                             f"num_experts={num_experts} on {levels.ranks} EP ranks")
        if placement.has_replicas:
            raise ValueError("HierarchicalDispatcher sends each expert's rows to one slot: replicas are not supported")
        self.num_experts, self.num_local_experts = num_experts, placement.slots_per_rank
        self.levels, self.ep_rank, self.esp_size, self.placement = levels, ep_rank, esp, placement
        self.stage_groups, self.counts_group, self.esp, self.esp_group = stage_groups, counts_group, esp_stage, esp_group
        self.costs = costs or LevelCosts.defaults(levels)
        self.dedup, self.row_bytes = dedup, row_bytes
        self.policy = policy or DepthPolicy()
        if not dedup and self.policy.fixed == 0:
            self.policy = DepthPolicy(fixed=min(2, max(levels.depth, 1)))
        self.last_stats: DispatchStats | None = None
        self.last_layout: HierLayout | None = None

    def with_placement(self, placement: Placement) -> "HierarchicalDispatcher":
        """The same dispatcher (same policy) sending by another placement."""
        new = HierarchicalDispatcher(self.num_experts, levels=self.levels, ep_rank=self.ep_rank, esp=self.esp_size,
                                     stage_groups=self.stage_groups, counts_group=self.counts_group,
                                     esp_stage=self.esp, esp_group=self.esp_group, costs=self.costs,
                                     placement=placement, dedup=self.dedup, policy=self.policy,
                                     row_bytes=self.row_bytes)
        return new

    # ------------------------------------------------------------------ layout
    def rank_of_E(self, device) -> Tensor:
        """[E + 1] EP rank of each logical expert; -1 for the dropped id E."""
        ranks = [self.placement.rank_of(e) for e in range(self.num_experts)] + [-1]
        return torch.tensor(ranks, dtype=torch.int64, device=device)

    def items(self, plan: RoutingPlan) -> tuple[Tensor, Tensor]:
        """(item_rows_I, slot_rows_IK): this rank's items before the first stage; slot_rows_IK
        [I, K] are rows of x_ND / weights_N (-1: none). One item per token (its kept
        assignments), or with no dedup (or no per-token slots) one per kept assignment."""
        E, N = plan.num_experts, plan.num_assignments
        dev = plan.expert_ids_N.device
        if self.dedup and plan.token_slots_TK is not None:
            slots = plan.token_slots_TK
        else:
            slots = torch.arange(N, device=dev).unsqueeze(1)
        kept = plan.expert_ids_N.index_select(0, slots.flatten()).view_as(slots) < E
        slots = torch.where(kept, slots, -1)
        any_kept = kept.any(1)
        slots = slots[any_kept]
        first = torch.where(slots >= 0, slots, N).amin(1)  # the token's first kept row carries it
        return first, slots

    def layout(self, plan: RoutingPlan) -> HierLayout:
        """Step 1 (collectives on metadata, host syncs): the whole dispatch's plan."""
        if plan.soft is not None:
            raise ValueError("the hierarchical dispatcher needs a token-choice or expert-choice plan, not SoftMoE's")
        dev = plan.expert_ids_N.device
        item_rows, slots_IK = self.items(plan)
        ids_IK = torch.where(slots_IK >= 0, plan.expert_ids_N[slots_IK.clamp(min=0)], -1)
        rank_of = self.rank_of_E(dev)
        dest_IK = torch.where(ids_IK >= 0, rank_of[ids_IK.clamp(min=0)], -1)
        depth, stats = self._choose(dest_IK)
        moves, ids = [], ids_IK
        for stage in stages_for_depth(self.levels, depth):
            move, ids = self._stage(stage, ids, rank_of)
            moves.append(move)
        expand_item, expand_slot, counts = self._expand(ids)
        esp_counts = self._esp_counts(counts, dev)
        return HierLayout(plan.num_assignments, item_rows, slots_IK, plan.weights_N, tuple(moves), expand_item,
                          expand_slot, counts, esp_counts, stats, ids_IK)

    def _choose(self, dest_IK: Tensor) -> tuple[int, DispatchStats]:
        """1a: the group's traffic for every candidate stage (one AllReduce), then d."""
        lv = self.levels
        src = torch.full((dest_IK.shape[0],), self.ep_rank, dtype=torch.int64, device=dest_IK.device)
        stages = candidate_stages(lv)
        mine = count_traffic(dest_IK, src, lv, stages, self.dedup)
        flat = count_traffic(dest_IK, src, lv, (Stage(0, lv.depth - 1),), dedup=False)
        packed = torch.cat([mine.send.flatten(), mine.recv.flatten(), flat.send.flatten()])
        if self.counts_group is not None and dist.get_world_size(self.counts_group) > 1:
            dist.all_reduce(packed, group=self.counts_group)
        n = mine.send.numel()
        total = Traffic(stages, packed[:n].view_as(mine.send), packed[n:2 * n].view_as(mine.recv), lv)
        flat_rows = packed[2 * n:].view_as(flat.send).sum(dim=(0, 1))
        choice = choose_depth(total, lv, self.costs, self.row_bytes)
        depth = self.policy.depth(choice)
        used = select(total, stages_for_depth(lv, depth))
        stats = DispatchStats(depth, choice.predicted_s, tuple(used.rows_per_level()), tuple(flat_rows.tolist()),
                              tuple(lv.name(i) for i in range(lv.depth)), self.row_bytes)
        self.last_stats = stats
        return depth, stats

    def _stage(self, stage: Stage, ids_IK: Tensor, rank_of: Tensor) -> tuple[StageMoves, Tensor]:
        """1b: one stage. Returns its moves and the items this rank holds after it."""
        lv, dev = self.levels, ids_IK.device
        width = lv.stage_size(stage)
        valid = ids_IK >= 0
        peer_IK = torch.where(valid, lv.stage_index(stage, rank_of[ids_IK.clamp(min=0)]), width)
        mask_IQ = torch.zeros(ids_IK.shape[0], width + 1, dtype=torch.bool, device=dev)
        mask_IQ.scatter_(1, peer_IK, True)
        mask_IQ = mask_IQ[:, :width]
        q, i = mask_IQ.t().nonzero(as_tuple=True)  # peer-major, items in order
        sent_ids = torch.where(peer_IK[i] == q.unsqueeze(1), ids_IK[i], -1)
        send_splits = mask_IQ.sum(0)
        group = self.stage_groups[stage]
        recv_splits = torch.empty_like(send_splits)
        dist.all_to_all_single(recv_splits, send_splits, group=group)
        send, recv = tuple(send_splits.tolist()), tuple(recv_splits.tolist())
        out = sent_ids.new_empty((sum(recv), sent_ids.shape[1]))
        dist.all_to_all_single(out, sent_ids.contiguous(), list(recv), list(send), group=group)
        return StageMoves(stage, i, send, recv), out

    def _expand(self, ids_FK: Tensor) -> tuple[Tensor, Tensor, tuple[int, ...]]:
        """1c: one row per (item, local expert), grouped by local expert (slot order)."""
        El, dev = self.num_local_experts, ids_FK.device
        local = torch.full((self.num_experts + 1,), -1, dtype=torch.int64, device=dev)
        mine = self.placement.experts_on(self.ep_rank)
        local[torch.tensor(mine, device=dev)] = torch.arange(El, device=dev)
        slot_FK = torch.where(ids_FK >= 0, local[ids_FK.clamp(min=0)], -1)
        f, k = (slot_FK >= 0).nonzero(as_tuple=True)
        order = torch.sort(slot_FK[f, k], stable=True).indices
        counts = torch.bincount(slot_FK[f, k], minlength=El)
        return f[order], k[order], tuple(counts.tolist())

    def _esp_counts(self, counts: tuple[int, ...], dev) -> tuple[tuple[int, ...], ...]:
        if self.esp is None:
            return (counts,)
        mine = torch.tensor(counts, dtype=torch.int64, device=dev)
        out = mine.new_empty(self.esp_size * mine.numel())
        all_gather_base(out, mine, group=self.esp_group)
        return tuple(tuple(row) for row in out.view(self.esp_size, -1).tolist())

    # ------------------------------------------------------------------ data
    def launch_dispatch(self, x_ND: Tensor, layout: HierLayout) -> Pending:
        """2: tokens with their weights appended, through the d AlltoAlls (all but the last are
        waited on here: each stage needs the previous one's rows)."""
        K = layout.weight_rows_IK.shape[1]
        w = layout.weights_N.index_select(0, layout.weight_rows_IK.clamp(min=0).flatten()).view(-1, K)
        w = torch.where(layout.weight_rows_IK >= 0, w, 0).to(x_ND.dtype)
        cur = torch.cat([x_ND.index_select(0, layout.item_rows_I), w], dim=1)
        launched = None
        for move in layout.moves:
            if launched is not None:
                cur = finish(launched)
            launched = launch_all_to_all(cur.index_select(0, move.send_index), move.recv_splits, move.send_splits,
                                         self.stage_groups[move.stage])
        return Pending(launched.work, (layout, launched, x_ND.shape[1]))

    def finish_dispatch(self, pending: Pending) -> tuple[Tensor, Tensor, DispatchHandle]:
        layout, launched, D = pending.state
        cur = finish(launched)
        x_F, w_F = cur[:, :D], cur[:, D:]
        x_R = x_F.index_select(0, layout.expand_item_R)
        w_R = w_F[layout.expand_item_R, layout.expand_slot_R]
        handle = HierHandle(layout.num_rows, None, layout, w_R)
        if self.esp is None:
            counts = torch.tensor(layout.counts_El, dtype=torch.int64, device=x_R.device)
            return x_R, counts, handle
        sizes = [sum(c) for c in layout.esp_counts_SEl]
        x_G = self.esp.finish_gather(self.esp.launch_gather(x_R, sizes))
        perm = _expert_major(layout.esp_counts_SEl, x_R.device)
        counts = torch.tensor(layout.esp_counts_SEl, dtype=torch.int64, device=x_R.device).sum(0)
        return x_G.index_select(0, perm), counts, handle

    def launch_combine(self, y_GD: Tensor, handle: HierHandle) -> Pending:
        layout = handle.hier
        if self.esp is not None:
            perm = _expert_major(layout.esp_counts_SEl, y_GD.device)
            y_rank_major = torch.empty_like(y_GD).index_copy(0, perm, y_GD)
            sizes = [sum(c) for c in layout.esp_counts_SEl]
            y_GD = self.esp.finish_scatter(self.esp.launch_scatter(y_rank_major, sizes))
        return Pending(None, (y_GD, handle))

    def finish_combine(self, pending: Pending) -> Tensor:
        """Weighted sum per item, then the stages in reverse: [num_sent items' rows]."""
        y_R, handle = pending.state
        layout = handle.hier
        F = layout.moves[-1].recv_splits if layout.moves else ()
        rows = y_R * handle.w_R.unsqueeze(1).to(y_R.dtype)
        y = y_R.new_zeros(sum(F), y_R.shape[1]).index_add(0, layout.expand_item_R, rows)
        for i in reversed(range(len(layout.moves))):
            move = layout.moves[i]
            back = finish(launch_all_to_all(y, move.send_splits, move.recv_splits, self.stage_groups[move.stage]))
            before = layout.moves[i - 1].recv_splits if i > 0 else None
            n_items = sum(before) if before is not None else layout.item_rows_I.shape[0]
            y = y.new_zeros(n_items, y.shape[1]).index_add(0, move.send_index, back)
        return y

    def combine(self, y_RD: Tensor, handle: HierHandle) -> Tensor:
        """y_ND [N, D]: each token's weighted sum over its experts in its first kept row, 0 in
        every other row (the I-Order sums rows without weights)."""
        y_I = self.finish_combine(self.launch_combine(y_RD, handle))
        return y_I.new_zeros(handle.num_rows, y_I.shape[1]).index_add(0, handle.hier.item_rows_I, y_I)

    def dispatch(self, x_ND: Tensor, plan: RoutingPlan):
        layout = self.layout(plan)
        self.last_layout = layout
        return self.finish_dispatch(self.launch_dispatch(x_ND, layout))


def _expert_major(counts_SEl: tuple[tuple[int, ...], ...], device) -> Tensor:
    """[G] gathered rows (blocks (s, e), rank-major) listed in (e, s) order."""
    S, El = len(counts_SEl), len(counts_SEl[0])
    starts, off = {}, 0
    for s in range(S):
        for e in range(El):
            starts[s, e] = off
            off += counts_SEl[s][e]
    parts = [torch.arange(starts[s, e], starts[s, e] + counts_SEl[s][e]) for e in range(El) for s in range(S)]
    return (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)).to(device)
