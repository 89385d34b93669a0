"""HierarchicalDispatcher: HierMoE's d-level AlltoAll with token deduplication, behind the
:class:`~fsmoe.comm.dispatcher.Dispatcher` interface.

Shape legend: N rows of x_ND (Order's output, K per token, grouped by expert), T tokens,
K experts per token, I items on this rank before a stage, Pn their (item, expert) pairs, S items
and Q pairs it sends at a stage, F items after the last stage (on the rank that holds their
experts), R expert rows of this rank (one per pair there, grouped by local expert), G rows after
the ESP AllGather, El local experts, D model dim, P EP ranks.

An *item* is a copy of a token that serves some of its experts; each of those experts is a
*pair* (item, expert) carrying the expert's combine weight. Dispatch, numbered as the code runs it:

    1. layout (``layout``; metadata only, one collective, one host read):
       a. this rank's tokens and their kept assignments' destination ranks (no host sync);
       b. count the traffic of every candidate depth (rows with dedup, pairs without) and the
          items per peer of every candidate first stage; one AllGather over the moe group of
          these (and of the tokens per expert when flat is a candidate), read once;
       c. the cost model picks d (the same on every rank), or 0: the flat AlltoAll, whose
          layout comes from the same gathered counts (``flat``). A kept choice of flat
          (``dedup_every``) runs the flat dispatcher's layout alone.
    2. data, per stage of depth d (``launch_dispatch``; autograd):
       a. route: each item goes once to every stage peer that holds any of its experts (the
          routing mask OR-reduced per destination group);
       b. items per peer: from the AllGather for the first stage, one small AlltoAll for each
          later one;
       c. one AlltoAll of rows [S, D + K + M]: the item's features, its K weights (0 for a slot
          whose expert is not below the receiver) and, as raw bytes, its K expert ids among the
          experts below the receiver (uint8 up to 255 of them, else int16/int32; the count is
          the empty slot), padded to 16 bytes per row so every peer's block stays aligned.
    3. after the last stage every pair is on the rank of its expert (``finish_dispatch``): one
       row per pair, grouped by local expert; with ESP the counts are all-gathered, then the
       ESP AllGather.

Combine mirrors it: ESP ReduceScatter, each expert row times its weight, summed into its item
(the k outputs of a group added once, before sending back), the stages in reverse, each
summing the copies it had made. So the weighted sum over a token's experts arrives in the
token's first row of y_ND and its other rows are 0: the layer's I-Order must sum rows without
weighting them again (``applies_weights``; ``fsmoe.order.SummedIndexOrder``). With d = 0 the
flat dispatcher runs and combine weights its rows the same way.

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

from fsmoe.comm.calibration import Calibration, Trial, stamp
from fsmoe.comm.dispatcher import DispatchHandle, Dispatcher, Pending
from fsmoe.comm.esp import EspStage
from fsmoe.comm.functional import all_gather_base, finish, launch_all_to_all
from fsmoe.comm.topology import LevelCosts, Levels, Stage, stages_for_depth
from fsmoe.comm.traffic import (DepthChoice, Traffic, Wire, candidate_stages, choose_depth, count_traffic,
                                id_bytes_for, meta_columns, select)
from fsmoe.placement.placement import Placement
from fsmoe.routing.plan import RoutingPlan

ID_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


@dataclass(frozen=True)
class Route:
    """One stage's sends from this rank (device tensors).

    send_item_S: [S] items sent, peer-major (items ascending within a peer); local_SK: [S, K]
    each sent slot's expert id among the experts below the receiver (that count, the
    sentinel, where the slot's expert is not below it or there is none); per_peer_W: [width]
    items per peer."""

    stage: Stage
    send_item_S: Tensor
    local_SK: Tensor
    per_peer_W: Tensor


@dataclass(frozen=True)
class StageMoves:
    """One stage on this rank, as combine needs it: ``send_item_S`` [S] items sent (peer-major)
    and the items per peer sent / received."""

    stage: Stage
    send_item_S: Tensor
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]


@dataclass(frozen=True)
class DispatchStats:
    """What one layer's dispatch did, over the whole moe group (host ints, for metrics).

    depth: d used (0: the flat AlltoAll); predicted_s: cost-model seconds of dispatch + combine
    per d (index d - 1); flat_s: the flat AlltoAll's (None when it was no candidate);
    rows_per_level: token rows crossing each level (dispatch; combine moves as many back);
    flat_rows_per_level: the same for the flat AlltoAll without dedup (dedup factor = flat / rows);
    bytes_per_level / flat_bytes_per_level: what crosses each level on the wire (a hierarchical
    row's features, its weights and metadata; flat: the features); level_names: one per level."""

    depth: int
    predicted_s: tuple[float, ...]
    rows_per_level: tuple[int, ...]
    flat_rows_per_level: tuple[int, ...]
    level_names: tuple[str, ...]
    row_bytes: int
    bytes_per_level: tuple[int, ...] = ()
    flat_bytes_per_level: tuple[int, ...] = ()
    flat_s: float | None = None


@dataclass(frozen=True)
class HierLayout:
    """One dispatch's plan on this rank, made before any data moves (see the module docstring).

    item_rows_I: [I] row of x_ND carrying each source item's token; slot_rows_IK: [I, K] row of
    ``weights_N`` of each slot (-1: none); rank_IK / slot_IK: [I, K] EP rank and slot of each
    slot's expert (-1: none); first: the first stage's route with its items per peer sent and
    received; stats: the group's numbers for metrics; ids_IK: [I, K] experts of each item before
    the first stage (-1: none), what the swap policy scores (None with depth 0: see
    ``HierarchicalDispatcher.item_ids``); plan: the routing. ``flat`` (depth 0): the flat
    dispatcher's layout instead."""

    num_rows: int
    depth: int
    weights_N: Tensor
    item_rows_I: Tensor | None = None
    slot_rows_IK: Tensor | None = None
    rank_IK: Tensor | None = None
    slot_IK: Tensor | None = None
    first: tuple[Route, tuple[int, ...], tuple[int, ...]] | None = None
    stats: DispatchStats | None = None
    ids_IK: Tensor | None = field(repr=False, default=None)
    plan: RoutingPlan | None = field(repr=False, default=None)
    flat: object = None


@dataclass(frozen=True)
class HierHandle(DispatchHandle):
    """What combine needs: the layout, each stage's moves, each expert row's item after the
    last stage ``expand_item_R`` [R] and weight ``w_R`` [R] (differentiable); with d = 0 the
    flat dispatcher's handle ``flat`` instead."""

    hier: HierLayout | None = None
    moves: tuple[StageMoves, ...] = ()
    expand_item_R: Tensor | None = None
    num_items_F: int = 0
    w_R: Tensor | None = None
    esp_counts_SEl: tuple[tuple[int, ...], ...] = ()
    flat: DispatchHandle | None = None


class DepthPolicy:
    """Which d each dispatch uses: ``fixed`` (1..D), or 0 for the cost model's choice (0 = flat
    among them), made again every ``every`` dispatches of the layer (in between, the last choice
    is kept; the counter and the calibration are the only state a dispatcher keeps, one policy
    per layer). With ``calibrate`` > 0 (and the flat AlltoAll a candidate) the first
    2 * ``calibrate`` dispatches alternate flat and the model's best d and are timed; later
    choices add to the model's predictions what each path measured beyond them (``calibration.py``)."""

    def __init__(self, fixed: int = 0, every: int = 1, calibrate: int = 0):
        if fixed < 0 or every < 1 or calibrate < 0:
            raise ValueError(f"DepthPolicy: fixed={fixed} must be >= 0, every={every} >= 1, calibrate={calibrate} >= 0")
        self.fixed, self.every, self.calls, self.last = fixed, every, 0, -1
        self.calibration = Calibration(calibrate) if calibrate and not fixed else None

    def calibrating(self) -> bool:
        return self.calibration is not None and self.calibration.active

    def calibrated(self, device, group=None) -> None:
        """End the calibration (collective over ``group``); the count restarts, so this dispatch
        makes the first calibrated choice instead of keeping the last trial's path."""
        self.calibration.finish(device, group)
        self.calls = 0

    def keeps_flat(self) -> bool:
        """True when this dispatch keeps an earlier choice of the flat AlltoAll (then it needs
        no layout of its own; the call is counted)."""
        if self.fixed or self.calibrating() or self.last != 0 or self.calls % self.every == 0:
            return False
        self.calls += 1
        return True

    def depth(self, choice: DepthChoice) -> int:
        """The d of this dispatch, given the cost model's ``choice`` for it."""
        if self.fixed:
            return self.fixed
        if self.calls % self.every == 0 or self.calibrating():
            self.last = self._pick(choice)
        self.calls += 1
        return self.last

    def _pick(self, choice: DepthChoice) -> int:
        c = self.calibration
        if c is None or choice.flat_s is None:
            return choice.depth
        best = min(range(len(choice.predicted_s)), key=lambda i: (choice.predicted_s[i], i)) + 1
        if c.active:
            return 0 if c.next_path() == "flat" else best
        return 0 if choice.flat_s + c.offset_s["flat"] <= choice.predicted_s[best - 1] + c.offset_s["hier"] else best


class HierarchicalDispatcher(Dispatcher):
    """d-level dedup dispatch over the EP group ``levels``. Stateless but for ``policy`` and
    ``last_stats`` / ``last_layout`` (the latest dispatch's, read by metrics and swaps).

    stage_groups: the process group of every stage of ``candidate_stages(levels)`` (the whole
    EP group for the stage covering every level); counts_group: the moe group (traffic is summed
    over it, so every rank chooses the same d); esp_stage / esp_group: the ESP stage (None for
    ESP 1); costs: alpha-beta per level and the fixed cost per d; dedup: False for the 2DH
    baseline; flat: the flat dispatcher (``ShardedDispatcher``) the cost model may pick instead
    (None: never); row_bytes: bytes of one token's features on the wire (d_model * element
    size), updated from each dispatch's x; weight_bytes: of one weight."""

    applies_weights = True

    def __init__(self, num_experts: int, *, levels: Levels, ep_rank: int, esp: int, stage_groups: dict,
                 counts_group: ProcessGroup | None, esp_stage: EspStage | None, esp_group=None,
                 costs: LevelCosts | None = None, placement: Placement | None = None, dedup: bool = True,
                 policy: DepthPolicy | None = None, row_bytes: int = 4096, flat: Dispatcher | None = None,
                 weight_bytes: int = 4):
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
        self.dedup, self.row_bytes, self.weight_bytes = dedup, row_bytes, weight_bytes
        self.policy = policy or DepthPolicy()
        if not dedup and self.policy.fixed == 0:
            self.policy = DepthPolicy(fixed=min(2, max(levels.depth, 1)))
        self.flat = flat if dedup else None
        self.last_stats: DispatchStats | None = None
        self.last_layout: HierLayout | None = None
        self.last_sent_bytes: list[int] = [0] * max(levels.depth, 1)  # this rank's last dispatch, per level
        # every stage's peers (EP ranks, in the stage group's order) and the level each one's
        # messages cross; each expert's rank and slot
        self.peers = {st: next(g for g in levels.stage_groups(st) if ep_rank in g) for st in candidate_stages(levels)}
        self.peer_level = {st: [levels.crossed(ep_rank, q) for q in g] for st, g in self.peers.items()}
        self._rank_slot = [placement.slots_E[e][0] for e in range(num_experts)]
        self._tables: dict = {}
        self.slots = 1  # K slots per item, from the latest layout (the wire's row size)
        self._trial: Trial | None = None  # the timed dispatch in flight (calibration), ended by combine
        self._chosen_at = 0.0  # when the last calibrating layout chose flat (host seconds)

    def with_placement(self, placement: Placement) -> "HierarchicalDispatcher":
        """The same dispatcher (same policy, same last choice's stats: a kept choice of flat
        computes none) sending by another placement."""
        moved = HierarchicalDispatcher(
            self.num_experts, levels=self.levels, ep_rank=self.ep_rank, esp=self.esp_size,
            stage_groups=self.stage_groups, counts_group=self.counts_group, esp_stage=self.esp,
            esp_group=self.esp_group, costs=self.costs, placement=placement, dedup=self.dedup, policy=self.policy,
            row_bytes=self.row_bytes, flat=self.flat.with_placement(placement) if self.flat else None,
            weight_bytes=self.weight_bytes)
        moved.last_stats = self.last_stats
        return moved

    @property
    def wire(self) -> Wire:
        return Wire(self.row_bytes, self.weight_bytes, self.num_local_experts, self.slots)

    # ------------------------------------------------------------------ layout
    def rank_of_E(self, device) -> Tensor:
        """[E + 1] EP rank of each logical expert; -1 for the dropped id E."""
        return self._table(0, device)

    def slot_of_E(self, device) -> Tensor:
        """[E + 1] slot of each logical expert on its rank; -1 for the dropped id E."""
        return self._table(1, device)

    def _table(self, which: int, device) -> Tensor:
        key = (which, str(device))
        if key not in self._tables:  # built once per device, not copied to it every dispatch
            self._tables[key] = torch.tensor([rs[which] for rs in self._rank_slot] + [-1], dtype=torch.int64,
                                             device=device)
        return self._tables[key]

    def token_slots(self, plan: RoutingPlan) -> Tensor:
        """slot_rows_TK [T, K]: rows of x_ND / weights_N of each token's kept assignments (-1:
        none; a token may have none). One row per token, or with no dedup (or no per-token
        slots) one per assignment. No host sync."""
        E, N = plan.num_experts, plan.num_assignments
        if self.dedup and plan.token_slots_TK is not None:
            slots = plan.token_slots_TK
        else:
            slots = torch.arange(N, device=plan.expert_ids_N.device).unsqueeze(1)
        kept = plan.expert_ids_N.index_select(0, slots.flatten()).view_as(slots) < E
        return torch.where(kept, slots, -1)

    def items(self, plan: RoutingPlan) -> tuple[Tensor, Tensor]:
        """(item_rows_I, slot_rows_IK): this rank's items before the first stage, the tokens of
        ``token_slots`` with some kept assignment (one host sync)."""
        slots = self.token_slots(plan)
        slots = slots[(slots >= 0).any(1)]
        first = torch.where(slots >= 0, slots, plan.num_assignments).amin(1)  # the first kept row carries it
        return first, slots

    def item_ids(self, layout: HierLayout) -> Tensor:
        """[I, K] experts of each item before the first stage (-1: none), for the swap policy."""
        if layout.ids_IK is not None:
            return layout.ids_IK
        _, slots = self.items(layout.plan)
        return torch.where(slots >= 0, layout.plan.expert_ids_N[slots.clamp(min=0)], -1)

    def layout(self, plan: RoutingPlan) -> HierLayout:
        """Step 1: the dispatch's depth and first-stage split sizes from one collective (an
        AllGather of this rank's counts) and one host read; with d >= 1 then this rank's items
        and first route (a host sync for their sizes). A kept choice of flat runs the flat
        dispatcher's layout alone."""
        if plan.soft is not None:
            raise ValueError("the hierarchical dispatcher needs a token-choice or expert-choice plan, not SoftMoE's")
        if self.flat is not None and self.policy.keeps_flat():
            return HierLayout(plan.num_assignments, 0, plan.weights_N, stats=self.last_stats, plan=plan,
                              flat=self.flat.layout(plan))
        dev = plan.expert_ids_N.device
        slots_TK = self.token_slots(plan)
        ids_TK = torch.where(slots_TK >= 0, plan.expert_ids_N[slots_TK.clamp(min=0)], -1)
        dest_TK = torch.where(ids_TK >= 0, self.rank_of_E(dev)[ids_TK.clamp(min=0)], -1)
        first_stages = tuple(dict.fromkeys(stages_for_depth(self.levels, d)[0] for d in self._depths()))
        masks = {st: self._peer_mask(st, dest_TK) for st in first_stages}
        self.slots = slots_TK.shape[1]
        depth, stats, splits, counts = self._choose(plan, dest_TK, {st: m.sum(0) for st, m in masks.items()})
        if depth == 0 and self.policy.calibrating():
            self._chosen_at = stamp(dev)  # a flat trial's start: kept, flat runs without the choosing
        if depth == 0:
            return HierLayout(plan.num_assignments, 0, plan.weights_N, stats=stats, plan=plan,
                              flat=self.flat.layout_from_counts(counts))
        idx = (slots_TK >= 0).any(1).nonzero().squeeze(1)  # the tokens with a kept assignment: the items
        slots_IK, ids_IK, rank_IK = slots_TK[idx], ids_TK[idx], dest_TK[idx]
        item_rows = torch.where(slots_IK >= 0, slots_IK, plan.num_assignments).amin(1)
        slot_IK = torch.where(ids_IK >= 0, self.slot_of_E(dev)[ids_IK.clamp(min=0)], -1)
        st = stages_for_depth(self.levels, depth)[0]
        route = self._route(st, rank_IK, slot_IK, masks[st][idx])
        return HierLayout(plan.num_assignments, depth, plan.weights_N, item_rows, slots_IK, rank_IK, slot_IK,
                          (route, *splits[st]), stats, ids_IK, plan)

    def _depths(self) -> range:
        return range(1, max(self.levels.depth, 1) + 1) if not self.policy.fixed else range(self.policy.fixed,
                                                                                            self.policy.fixed + 1)

    def _choose(self, plan: RoutingPlan, dest_TK: Tensor, per_peer: dict) -> tuple[int, DispatchStats, dict, list]:
        """1b-c: one AllGather over the moe group of this rank's traffic for every candidate stage
        (rows and pairs), its items per peer of every first stage and, when flat is a candidate,
        its tokens per expert (the flat layout's counts); one host read; then d. Returns d, the
        stats, per first stage this rank's items sent to and received from each peer, and the
        counts [P][S][E] (None when flat is no candidate)."""
        lv, P, me = self.levels, self.levels.ranks, self.ep_rank
        src = torch.full((dest_TK.shape[0],), me, dtype=torch.int64, device=dest_TK.device)
        stages = candidate_stages(lv)
        rows = count_traffic(dest_TK, src, lv, stages, self.dedup)
        pairs = count_traffic(dest_TK, src, lv, stages, dedup=False)
        parts = [rows.send, rows.recv, pairs.send, pairs.recv, *per_peer.values()]
        if self.flat is not None:
            parts.append(plan.tokens_per_expert_E.to(torch.int64))
        mine = torch.cat([t.flatten() for t in parts])
        W = dist.get_world_size(self.counts_group) if self.counts_group is not None else 1
        if W > 1:
            out = mine.new_empty(W * mine.numel())
            all_gather_base(out, mine, group=self.counts_group)
            mine = out
        every = mine.view(W, -1).cpu()  # the one host sync of the choice
        # rows of ``every``: moe-group ranks (EP rank * ESP + ESP rank); a stage peer is the EP
        # rank q with this rank's ESP rank
        esp, esp_rank = self.esp_size, (dist.get_rank(self.esp_group) if self.esp is not None else 0)
        row = lambda q: q * esp + esp_rank
        out, off = [], 0
        for t in parts:
            out.append(every[:, off:off + t.numel()])
            off += t.numel()
        total = Traffic(stages, out[0].sum(0).view(rows.send.shape), out[1].sum(0).view(rows.send.shape), lv)
        total_pairs = Traffic(stages, out[2].sum(0).view(rows.send.shape), out[3].sum(0).view(rows.send.shape), lv)
        splits = {}
        for st, m in zip(per_peer, out[4:4 + len(per_peer)]):
            peers = self.peers[st]
            mine_at = peers.index(me)
            splits[st] = (tuple(m[row(me)].tolist()), tuple(int(m[row(q), mine_at]) for q in peers))
        counts = out[-1].reshape(P, esp, -1).tolist() if self.flat is not None else None
        choice = choose_depth(total, total_pairs, lv, self.costs, self.wire, allow_flat=self.flat is not None)
        cal = self.policy.calibration
        if cal is not None and cal.complete():  # every rank at the same dispatch: one small AllReduce
            self.policy.calibrated(dest_TK.device, self.counts_group)
        depth = self.policy.depth(choice)
        flat_stage = (Stage(0, lv.depth - 1),)
        flat_rows = select(total_pairs, flat_stage).send.sum(dim=(0, 1))
        if depth == 0:
            used_rows, used_bytes = flat_rows.tolist(), (flat_rows * self.row_bytes).tolist()
        else:
            used = stages_for_depth(lv, depth)
            used_rows = select(total, used).rows_per_level()
            used_bytes = self.wire.bytes_per_level(select(total, used))
        stats = DispatchStats(depth, choice.predicted_s, tuple(used_rows), tuple(flat_rows.tolist()),
                              tuple(lv.name(i) for i in range(lv.depth)), self.row_bytes, tuple(used_bytes),
                              tuple((flat_rows * self.row_bytes).tolist()), choice.flat_s)
        self.last_stats = stats
        return depth, stats, splits, counts

    def _peer_mask(self, stage: Stage, rank_IK: Tensor) -> Tensor:
        """[I, width] which stage peers hold some expert of each item (no host sync)."""
        width = self.levels.stage_size(stage)
        peer = torch.where(rank_IK >= 0, self.levels.stage_index(stage, rank_IK.clamp(min=0)), width)
        mask = torch.zeros(rank_IK.shape[0], width + 1, dtype=torch.bool, device=rank_IK.device)
        return mask.scatter_(1, peer, True)[:, :width]

    def _route(self, stage: Stage, rank_IK: Tensor, slot_IK: Tensor, mask_IW: Tensor | None = None) -> Route:
        """2a: one stage's sends (one host sync, for the number of items sent)."""
        lv, El = self.levels, self.num_local_experts
        mask = self._peer_mask(stage, rank_IK) if mask_IW is None else mask_IW
        q, i = mask.t().nonzero(as_tuple=True)  # peer-major, items in order
        width, below = lv.stage_size(stage), lv.stride(stage.last)
        rank_SK = rank_IK[i]
        peer_SK = torch.where(rank_SK >= 0, lv.stage_index(stage, rank_SK.clamp(min=0)), width)
        local = torch.where(peer_SK == q.unsqueeze(1), (rank_SK % below) * El + slot_IK[i], below * El)
        return Route(stage, i, local, mask.sum(0))

    # ------------------------------------------------------------------ data
    def _send(self, row_I: Tensor, route: Route, sent: tuple, recv: tuple, D: int):
        """2c: this stage's rows (features, K weights, K ids as raw bytes, padding) and its
        AlltoAll. Returns the launched AlltoAll."""
        stage, K, elem, dt = route.stage, route.local_SK.shape[1], row_I.element_size(), row_I.dtype
        idb = id_bytes_for(self.levels.stride(stage.last) * self.num_local_experts)
        cols = meta_columns(D * elem, elem, K, idb)
        meta = torch.zeros(route.local_SK.shape[0], cols * elem, dtype=torch.uint8, device=row_I.device)
        meta[:, :K * idb] = route.local_SK.to(ID_DTYPES[idb]).view(torch.uint8)
        buf = torch.cat([row_I.index_select(0, route.send_item_S), meta.view(dt)], dim=1)
        for q, n in enumerate(sent):
            lvl = self.peer_level[stage][q]
            if lvl >= 0:
                self.last_sent_bytes[lvl] += n * buf.shape[1] * elem
        return launch_all_to_all(buf, list(recv), list(sent), self.stage_groups[stage])

    def _receive(self, buf: Tensor, stage: Stage, D: int, K: int) -> tuple[Tensor, Tensor, Tensor]:
        """2c, receiving: the items' rows [F, D + K] (features, weights) and their experts'
        EP ranks and slots [F, K] (-1: none)."""
        El, below = self.num_local_experts, self.levels.stride(stage.last)
        idb = id_bytes_for(below * El)
        raw = buf[:, D + K:].detach().contiguous().view(torch.uint8)[:, :K * idb].contiguous()
        local = raw.view(ID_DTYPES[idb]).to(torch.int64)
        valid = local < below * El
        base = (self.ep_rank // below) * below
        return (buf[:, :D + K], torch.where(valid, base + local // El, -1), torch.where(valid, local % El, -1))

    def _splits(self, route: Route) -> tuple[tuple, tuple]:
        """2b for a later stage: one AlltoAll of the items per peer."""
        send = route.per_peer_W.contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.stage_groups[route.stage])
        both = torch.cat([send, recv]).tolist()
        w = send.shape[0]
        return tuple(both[:w]), tuple(both[w:])

    def launch_dispatch(self, x_ND: Tensor, layout: HierLayout) -> Pending:
        """2: the stages; all but the last are waited on here (each needs the previous one's
        items); the last is returned in flight."""
        if layout.depth == 0:
            return Pending(None, ("flat", self.flat.launch_dispatch(x_ND, layout.flat), layout))
        self.row_bytes, self.weight_bytes = x_ND.shape[1] * x_ND.element_size(), x_ND.element_size()
        self.last_sent_bytes = [0] * max(self.levels.depth, 1)
        D, K = x_ND.shape[1], layout.slot_rows_IK.shape[1]
        slots = layout.slot_rows_IK
        w = layout.weights_N.index_select(0, slots.clamp(min=0).flatten()).view(-1, K)
        w = torch.where(slots >= 0, w, 0).to(x_ND.dtype)
        row = torch.cat([x_ND.index_select(0, layout.item_rows_I), w], dim=1)  # [I, D + K]
        rank, slot, moves = layout.rank_IK, layout.slot_IK, []
        route, sent, recv = layout.first
        stages = stages_for_depth(self.levels, layout.depth)
        for s, stage in enumerate(stages):
            if s > 0:
                route = self._route(stage, rank, slot)
                sent, recv = self._splits(route)
            launched = self._send(row, route, sent, recv, D)
            moves.append(StageMoves(stage, route.send_item_S, tuple(sent), tuple(recv)))
            if s == len(stages) - 1:
                break
            row, rank, slot = self._receive(finish(launched), stage, D, K)
        return Pending(launched.work, ("hier", layout, launched, (stage, D, K), tuple(moves)))

    def finish_dispatch(self, pending: Pending) -> tuple[Tensor, Tensor, DispatchHandle]:
        if pending.state[0] == "flat":
            _, inner, layout = pending.state
            x, counts, handle = self.flat.finish_dispatch(inner)
            return x, counts, HierHandle(layout.num_rows, None, layout, flat=handle)
        _, layout, launched, (stage, D, K), moves = pending.state
        row_F, _, slot_FK = self._receive(finish(launched), stage, D, K)
        # 3: one row per pair, grouped by local expert (every pair's rank is this one now)
        f, k = (slot_FK >= 0).nonzero(as_tuple=True)
        slot_P = slot_FK[f, k]
        order = torch.sort(slot_P, stable=True).indices
        expand, k = f[order], k[order]
        counts_t = torch.zeros(self.num_local_experts, dtype=torch.int64, device=slot_P.device).index_add_(
            0, slot_P, torch.ones_like(slot_P))
        x_R, w_R = row_F[:, :D].index_select(0, expand), row_F[:, D:][expand, k]
        if self.esp is None:
            handle = HierHandle(layout.num_rows, None, layout, moves, expand, row_F.shape[0], w_R)
            return x_R, counts_t, handle
        esp_counts = self._esp_counts(tuple(counts_t.tolist()), x_R.device)
        handle = HierHandle(layout.num_rows, None, layout, moves, expand, row_F.shape[0], w_R, esp_counts)
        sizes = [sum(c) for c in esp_counts]
        x_G = self.esp.finish_gather(self.esp.launch_gather(x_R, sizes))
        perm = _expert_major(esp_counts, x_R.device)
        counts = torch.tensor(esp_counts, dtype=torch.int64, device=x_R.device).sum(0)
        return x_G.index_select(0, perm), counts, handle

    def _esp_counts(self, counts: tuple[int, ...], dev) -> tuple[tuple[int, ...], ...]:
        mine = torch.tensor(counts, dtype=torch.int64, device=dev)
        out = mine.new_empty(self.esp_size * mine.numel())
        all_gather_base(out, mine, group=self.esp_group)
        return tuple(tuple(row) for row in out.view(self.esp_size, -1).tolist())

    def launch_combine(self, y_GD: Tensor, handle: HierHandle) -> Pending:
        if handle.flat is not None:
            return Pending(None, ("flat", self.flat.launch_combine(y_GD, handle.flat), handle))
        if self.esp is not None:
            perm = _expert_major(handle.esp_counts_SEl, y_GD.device)
            y_rank_major = torch.empty_like(y_GD).index_copy(0, perm, y_GD)
            sizes = [sum(c) for c in handle.esp_counts_SEl]
            y_GD = self.esp.finish_scatter(self.esp.launch_scatter(y_rank_major, sizes))
        return Pending(None, ("hier", y_GD, handle))

    def finish_combine(self, pending: Pending) -> Tensor:
        """Weighted sum per item, then the stages in reverse: [source items' rows] (d = 0: the
        flat dispatcher's rows, weighted)."""
        if pending.state[0] == "flat":
            _, inner, handle = pending.state
            return self.flat.finish_combine(inner)
        _, y_R, handle = pending.state
        rows = y_R * handle.w_R.unsqueeze(1).to(y_R.dtype)
        y = y_R.new_zeros(handle.num_items_F, y_R.shape[1]).index_add(0, handle.expand_item_R, rows)
        moves = handle.moves
        for i in reversed(range(len(moves))):
            move = moves[i]
            back = finish(launch_all_to_all(y, move.send_splits, move.recv_splits, self.stage_groups[move.stage]))
            n_items = sum(moves[i - 1].recv_splits) if i > 0 else handle.hier.item_rows_I.shape[0]
            y = y.new_zeros(n_items, y.shape[1]).index_add(0, move.send_item_S, back)
        return y

    def combine(self, y_RD: Tensor, handle: HierHandle) -> Tensor:
        """y_ND [N, D]: each token's weighted sum over its experts in its first kept row, 0 in
        every other row (the I-Order sums rows without weights)."""
        if self._trial is not None:
            self._trial.combining = stamp(y_RD.device)
        with torch.profiler.record_function(_trace_name("combine", handle.hier)):
            y = self.finish_combine(self.launch_combine(y_RD, handle))
        if self._trial is not None:
            self._trial.end = stamp(y.device)
            self.policy.calibration.done.append(self._trial)
            self._trial = None
        if handle.flat is not None:
            y_ND = handle.flat.layout.place_rows(y, handle.num_rows)
            return y_ND * handle.hier.weights_N.unsqueeze(1).to(y_ND.dtype)
        return y.new_zeros(handle.num_rows, y.shape[1]).index_add(0, handle.hier.item_rows_I, y)

    def dispatch(self, x_ND: Tensor, plan: RoutingPlan):
        # the wire's row sizes before the layout prices the paths (the dispatcher is built
        # assuming fp32; a bf16 run's first choice, and first calibration trial, would be off 2x)
        self.row_bytes, self.weight_bytes = x_ND.shape[1] * x_ND.element_size(), x_ND.element_size()
        start = stamp(x_ND.device) if self.policy.calibrating() else None
        layout = self.layout(plan)
        self.last_layout = layout
        with torch.profiler.record_function(_trace_name("dispatch", layout)):
            out = self.finish_dispatch(self.launch_dispatch(x_ND, layout))
        st = layout.stats
        if start is not None and self.policy.calibrating() and st is not None and st.flat_s is not None:
            # a timed dispatch, ended by its combine (not the one whose layout finished the calibration)
            self._trial = Trial("flat", st.flat_s, self._chosen_at) if layout.depth == 0 else \
                Trial("hier", st.predicted_s[layout.depth - 1], start)
            self._trial.dispatched = stamp(x_ND.device)
        return out


def _trace_name(op: str, layout: HierLayout) -> str:
    """The range a torch profile (``fsmoe train --torch-profile``) shows around a dispatch or
    combine: its d (0 = flat) and the MB it puts on each level, e.g.
    ``hier_dispatch d=1 MB node=63.2``."""
    st = layout.stats
    if st is None:
        return f"hier_{op} d={layout.depth}"
    mb = " ".join(f"{n}={b / 1e6:.3g}" for n, b in zip(st.level_names, st.bytes_per_level))
    return f"hier_{op} d={layout.depth} MB {mb}"


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
