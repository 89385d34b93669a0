"""HierarchicalDispatcher: HierMoE's d-level AlltoAll with token deduplication, behind the
:class:`~fsmoe.comm.dispatcher.Dispatcher` interface.

Shape legend: N rows of x_ND (Order's output, K per token, grouped by expert), T tokens,
K experts per token, I items on this rank before a stage, Pn their (item, expert) pairs, S items
and Q pairs it sends at a stage, F items after the last stage (on the rank that holds their
experts), R expert rows of this rank (one per pair there, grouped by local expert), G rows after
the ESP AllGather, El local experts, D model dim, P EP ranks.

An *item* is a copy of a token that serves some of its experts; each of those experts is a
*pair* (item, expert) carrying the expert's combine weight. Dispatch, numbered as the code runs it:

    1. layout (``layout``; metadata only, one collective):
       a. this rank's items: one per token (its kept assignments are its pairs), or with no
          dedup one per assignment;
       b. count the traffic of every candidate depth (rows with dedup, pairs without), and this
          rank's items and pairs per peer of every candidate first stage; one AllReduce over the
          moe group sums the counts and fills every rank's row of the first-stage split matrix;
       c. the cost model picks d (the same on every rank), or 0: the flat AlltoAll
          (``flat``; a fixed or kept d skips the choice but not the AllReduce).
    2. data, per stage of depth d (``launch_dispatch``; autograd):
       a. route: each item goes once to every stage peer that holds any of its experts (the
          routing mask OR-reduced per destination group) with the pairs of those experts;
       b. split sizes (items, pairs per peer): from the AllReduce for the first stage, one small
          AlltoAll for each later one;
       c. one AlltoAll of a flat buffer holding, per peer: the items' features [S_q, D], their
          pairs' weights [Q_q], then the metadata as raw bytes (per item its pair count, uint8;
          per pair the expert's id among the experts below the receiver, uint8 up to 256 of
          them, else int16/int32; padded to the element size), so no metadata needs a
          collective of its own. The receiver unpacks it into its items for the next stage.
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

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from fsmoe.comm.dispatcher import DispatchHandle, Dispatcher, Pending
from fsmoe.comm.esp import EspStage
from fsmoe.comm.functional import all_gather_base, finish, launch_all_to_all
from fsmoe.comm.topology import LevelCosts, Levels, Stage, stages_for_depth
from fsmoe.comm.traffic import (DepthChoice, Traffic, Wire, candidate_stages, choose_depth, count_traffic,
                                id_bytes_for, select)
from fsmoe.placement.placement import Placement
from fsmoe.routing.plan import RoutingPlan

ID_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


@dataclass(frozen=True)
class Items:
    """A rank's items before a stage: ``pair_item_P`` [Pn] the item of each pair (ascending),
    ``pair_rank_P`` / ``pair_slot_P`` [Pn] the EP rank and slot of the pair's expert."""

    num_items: int
    pair_item_P: Tensor
    pair_rank_P: Tensor
    pair_slot_P: Tensor


@dataclass(frozen=True)
class Route:
    """One stage's sends from this rank (device tensors; sizes per peer still on the device).

    send_item_S: items sent, peer-major (items ascending within a peer); send_pair_Q: pairs sent,
    in the order of their items; count_S: pairs per sent item; local_Q: each sent pair's expert
    id among the experts below the receiver; per_peer_W2: [width, 2] items and pairs per peer."""

    stage: Stage
    send_item_S: Tensor
    send_pair_Q: Tensor
    count_S: Tensor
    local_Q: Tensor
    per_peer_W2: Tensor


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

    item_rows_I: [I] row of x_ND carrying each source item's token; pair_rows_P: [Pn] row of
    ``weights_N`` of each source pair; items: the source items; first: the first stage's route
    with its split sizes (items, pairs per peer) sent and received; stats: the group's numbers
    for metrics; ids_IK: [I, K] experts of each item before the first stage (-1: none), what
    the swap policy scores. ``flat`` (depth 0): the flat dispatcher's layout instead."""

    num_rows: int
    depth: int
    item_rows_I: Tensor | None
    pair_rows_P: Tensor | None
    weights_N: Tensor
    items: Items | None
    first: tuple[Route, tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]] | None
    stats: DispatchStats | None
    ids_IK: Tensor = field(repr=False, default=None)
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
    is kept; this counter is the only state a dispatcher keeps, one policy per layer)."""

    def __init__(self, fixed: int = 0, every: int = 1):
        if fixed < 0 or every < 1:
            raise ValueError(f"DepthPolicy: fixed={fixed} must be >= 0 and every={every} >= 1")
        self.fixed, self.every, self.calls, self.last = fixed, every, 0, -1

    def keeps_flat(self) -> bool:
        """True when this dispatch keeps an earlier choice of the flat AlltoAll (then it needs
        no layout of its own; the call is counted)."""
        if self.fixed or self.last != 0 or self.calls % self.every == 0:
            return False
        self.calls += 1
        return True

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

    def with_placement(self, placement: Placement) -> "HierarchicalDispatcher":
        """The same dispatcher (same policy) sending by another placement."""
        return HierarchicalDispatcher(
            self.num_experts, levels=self.levels, ep_rank=self.ep_rank, esp=self.esp_size,
            stage_groups=self.stage_groups, counts_group=self.counts_group, esp_stage=self.esp,
            esp_group=self.esp_group, costs=self.costs, placement=placement, dedup=self.dedup, policy=self.policy,
            row_bytes=self.row_bytes, flat=self.flat.with_placement(placement) if self.flat else None,
            weight_bytes=self.weight_bytes)

    @property
    def wire(self) -> Wire:
        return Wire(self.row_bytes, self.weight_bytes, self.num_local_experts)

    # ------------------------------------------------------------------ layout
    def rank_of_E(self, device) -> Tensor:
        """[E + 1] EP rank of each logical expert; -1 for the dropped id E."""
        return torch.tensor([r for r, _ in self._rank_slot] + [-1], dtype=torch.int64, device=device)

    def slot_of_E(self, device) -> Tensor:
        """[E + 1] slot of each logical expert on its rank; -1 for the dropped id E."""
        return torch.tensor([s for _, s in self._rank_slot] + [-1], dtype=torch.int64, device=device)

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
        """Step 1 (one collective on metadata, one host sync): the dispatch's depth, source items
        and first-stage split sizes."""
        if plan.soft is not None:
            raise ValueError("the hierarchical dispatcher needs a token-choice or expert-choice plan, not SoftMoE's")
        dev = plan.expert_ids_N.device
        item_rows, slots_IK = self.items(plan)
        ids_IK = torch.where(slots_IK >= 0, plan.expert_ids_N[slots_IK.clamp(min=0)], -1)
        if self.flat is not None and self.policy.keeps_flat():
            return HierLayout(plan.num_assignments, 0, None, None, plan.weights_N, None, None, self.last_stats,
                              ids_IK, flat=self.flat.layout(plan))
        rank_of, slot_of = self.rank_of_E(dev), self.slot_of_E(dev)
        dest_IK = torch.where(ids_IK >= 0, rank_of[ids_IK.clamp(min=0)], -1)
        i, k = (slots_IK >= 0).nonzero(as_tuple=True)  # pairs, grouped by item
        pair_ids = ids_IK[i, k]
        items = Items(int(slots_IK.shape[0]), i, rank_of[pair_ids], slot_of[pair_ids])
        first_stages = tuple(dict.fromkeys(stages_for_depth(self.levels, d)[0] for d in self._depths()))
        routes = {st: self._route(st, items) for st in first_stages}
        depth, stats, splits = self._choose(dest_IK, routes)
        if depth == 0:
            return HierLayout(plan.num_assignments, 0, None, None, plan.weights_N, None, None, stats, ids_IK,
                              flat=self.flat.layout(plan))
        st = stages_for_depth(self.levels, depth)[0]
        return HierLayout(plan.num_assignments, depth, item_rows, slots_IK[i, k], plan.weights_N, items,
                          (routes[st], *splits[st]), stats, ids_IK)

    def _depths(self) -> range:
        return range(1, max(self.levels.depth, 1) + 1) if not self.policy.fixed else range(self.policy.fixed,
                                                                                            self.policy.fixed + 1)

    def _choose(self, dest_IK: Tensor, routes: dict) -> tuple[int, DispatchStats, dict]:
        """1b-c: one AllReduce of the traffic of every candidate stage (rows and pairs) and of the
        first stages' split matrices [P, width, 2]; then d. Returns d, the stats and, per first
        stage, this rank's (items, pairs) sent to and received from each peer."""
        lv, P, me = self.levels, self.levels.ranks, self.ep_rank
        src = torch.full((dest_IK.shape[0],), me, dtype=torch.int64, device=dest_IK.device)
        stages = candidate_stages(lv)
        rows = count_traffic(dest_IK, src, lv, stages, self.dedup)
        pairs = count_traffic(dest_IK, src, lv, stages, dedup=False)
        # rows of the split matrices: moe-group ranks (EP rank * ESP + ESP rank), the ranks the
        # AllReduce runs over; a stage peer is the EP rank q with this rank's ESP rank
        esp, esp_rank = self.esp_size, (dist.get_rank(self.esp_group) if self.esp is not None else 0)
        row = lambda q: q * esp + esp_rank
        mats = []
        for st, route in routes.items():
            m = torch.zeros(P * esp, route.per_peer_W2.shape[0], 2, dtype=torch.int64, device=dest_IK.device)
            m[row(me)] = route.per_peer_W2
            mats.append(m)
        parts = [rows.send, rows.recv, pairs.send, pairs.recv, *mats]
        packed = torch.cat([t.flatten() for t in parts])
        if self.counts_group is not None and dist.get_world_size(self.counts_group) > 1:
            dist.all_reduce(packed, group=self.counts_group)
        packed = packed.cpu()  # the one host sync of the layout
        out, off = [], 0
        for t in parts:
            out.append(packed[off:off + t.numel()].view(t.shape))
            off += t.numel()
        total = Traffic(stages, out[0], out[1], lv)
        total_pairs = Traffic(stages, out[2], out[3], lv)
        splits = {}
        for (st, _), m in zip(routes.items(), out[4:]):
            peers = self.peers[st]
            mine = peers.index(me)
            splits[st] = (tuple(map(tuple, m[row(me)].tolist())), tuple(tuple(m[row(q), mine].tolist()) for q in peers))
        choice = choose_depth(total, total_pairs, lv, self.costs, self.wire, allow_flat=self.flat is not None)
        depth = self.policy.depth(choice)
        flat_stage = (Stage(0, lv.depth - 1),)
        flat_rows = select(total_pairs, flat_stage).send.sum(dim=(0, 1))
        if depth == 0:
            used_rows, used_bytes = flat_rows.tolist(), (flat_rows * self.row_bytes).tolist()
        else:
            used = stages_for_depth(lv, depth)
            used_rows = select(total, used).rows_per_level()
            used_bytes = self.wire.bytes_per_level(select(total, used), select(total_pairs, used))
        stats = DispatchStats(depth, choice.predicted_s, tuple(used_rows), tuple(flat_rows.tolist()),
                              tuple(lv.name(i) for i in range(lv.depth)), self.row_bytes, tuple(used_bytes),
                              tuple((flat_rows * self.row_bytes).tolist()), choice.flat_s)
        self.last_stats = stats
        return depth, stats, splits

    def _route(self, stage: Stage, items: Items) -> Route:
        """2a: one stage's sends (no host sync)."""
        lv, El = self.levels, self.num_local_experts
        width, I = lv.stage_size(stage), max(items.num_items, 1)
        peer_P = lv.stage_index(stage, items.pair_rank_P)
        key_P = peer_P * I + items.pair_item_P
        key_Q, send_pair_Q = torch.sort(key_P, stable=True)
        uniq_S, item_of_Q = torch.unique_consecutive(key_Q, return_inverse=True)
        below = lv.stride(stage.last)
        local_Q = (items.pair_rank_P[send_pair_Q] % below) * El + items.pair_slot_P[send_pair_Q]
        per_peer = torch.stack([torch.bincount(uniq_S // I, minlength=width), torch.bincount(peer_P, minlength=width)], 1)
        return Route(stage, uniq_S % I, send_pair_Q, torch.bincount(item_of_Q, minlength=uniq_S.numel()), local_Q,
                     per_peer)

    # ------------------------------------------------------------------ data
    def _send(self, x_I: Tensor, w_P: Tensor, route: Route, sent: tuple, recv: tuple) -> tuple[object, list[int]]:
        """2c: pack this stage's buffer and start its AlltoAll. Returns (launched, recv elements per peer)."""
        stage, D, elem, dt = route.stage, x_I.shape[1], x_I.element_size(), x_I.dtype
        idb = id_bytes_for(self.levels.stride(stage.last) * self.num_local_experts)
        xs = x_I.index_select(0, route.send_item_S).split([n for n, _ in sent])
        ws = w_P.index_select(0, route.send_pair_Q).split([p for _, p in sent])
        counts = route.count_S.to(torch.uint8).split([n for n, _ in sent])
        ids = route.local_Q.to(ID_DTYPES[idb]).view(torch.uint8).split([p * idb for _, p in sent])
        pieces, send_elems, level_bytes = [], [], self.last_sent_bytes
        for q, (n, p) in enumerate(sent):
            meta = n + p * idb
            pad = math.ceil(meta / elem) * elem - meta
            raw = torch.cat([counts[q], ids[q], counts[q].new_zeros(pad)]).view(dt)
            pieces += [xs[q].reshape(-1), ws[q], raw]
            send_elems.append(n * D + p + raw.numel())
            lvl = self.peer_level[stage][q]
            if lvl >= 0:
                level_bytes[lvl] += send_elems[-1] * elem
        recv_elems = [n * D + p + math.ceil((n + p * idb) / elem) for n, p in recv]
        buf = torch.cat(pieces)
        return launch_all_to_all(buf, recv_elems, send_elems, self.stage_groups[stage]), recv_elems

    def _receive(self, buf: Tensor, stage: Stage, recv: tuple, recv_elems: list[int], D: int
                 ) -> tuple[Tensor, Tensor, Items]:
        """2c, receiving: the items (features x_F, weights w_P) and their pairs from the buffer."""
        idb = id_bytes_for(self.levels.stride(stage.last) * self.num_local_experts)
        xs, ws, counts, ids = [], [], [], []
        for (n, p), chunk in zip(recv, buf.split(recv_elems)):
            xs.append(chunk[:n * D].view(n, D))
            ws.append(chunk[n * D:n * D + p])
            raw = chunk[n * D + p:].detach().view(torch.uint8)
            counts.append(raw[:n])
            ids.append(raw[n:n + p * idb])
        x_F, w_P = torch.cat(xs), torch.cat(ws)
        num_pairs = sum(p for _, p in recv)
        count_F = torch.cat(counts).to(torch.int64)
        local = torch.cat(ids).view(ID_DTYPES[idb]).to(torch.int64)
        El, below = self.num_local_experts, self.levels.stride(stage.last)
        pair_item = torch.repeat_interleave(torch.arange(x_F.shape[0], device=buf.device), count_F,
                                            output_size=num_pairs)
        base = (self.ep_rank // below) * below
        return x_F, w_P, Items(x_F.shape[0], pair_item, base + local // El, local % El)

    def _splits(self, route: Route) -> tuple[tuple, tuple]:
        """2b for a later stage: one AlltoAll of (items, pairs) per peer."""
        recv = torch.empty_like(route.per_peer_W2)
        dist.all_to_all_single(recv, route.per_peer_W2.contiguous(), group=self.stage_groups[route.stage])
        both = torch.cat([route.per_peer_W2, recv]).tolist()
        w = route.per_peer_W2.shape[0]
        return tuple(map(tuple, both[:w])), tuple(map(tuple, both[w:]))

    def launch_dispatch(self, x_ND: Tensor, layout: HierLayout) -> Pending:
        """2: the stages; all but the last are waited on here (each needs the previous one's
        items); the last is returned in flight."""
        if layout.depth == 0:
            return Pending(None, ("flat", self.flat.launch_dispatch(x_ND, layout.flat), layout))
        self.row_bytes, self.weight_bytes = x_ND.shape[1] * x_ND.element_size(), x_ND.element_size()
        self.last_sent_bytes = [0] * max(self.levels.depth, 1)
        D = x_ND.shape[1]
        x_I = x_ND.index_select(0, layout.item_rows_I)
        w_P = layout.weights_N.index_select(0, layout.pair_rows_P).to(x_ND.dtype)
        items, moves = layout.items, []
        route, sent, recv = layout.first
        stages = stages_for_depth(self.levels, layout.depth)
        for s, stage in enumerate(stages):
            if s > 0:
                route = self._route(stage, items)
                sent, recv = self._splits(route)
            launched, recv_elems = self._send(x_I, w_P, route, sent, recv)
            moves.append(StageMoves(stage, route.send_item_S, tuple(n for n, _ in sent), tuple(n for n, _ in recv)))
            if s == len(stages) - 1:
                break
            x_I, w_P, items = self._receive(finish(launched), stage, recv, recv_elems, D)
        return Pending(launched.work, ("hier", layout, launched, (stage, recv, recv_elems, D), tuple(moves)))

    def finish_dispatch(self, pending: Pending) -> tuple[Tensor, Tensor, DispatchHandle]:
        if pending.state[0] == "flat":
            _, inner, layout = pending.state
            x, counts, handle = self.flat.finish_dispatch(inner)
            return x, counts, HierHandle(layout.num_rows, None, layout, flat=handle)
        _, layout, launched, (stage, recv, recv_elems, D), moves = pending.state
        x_F, w_P, items = self._receive(finish(launched), stage, recv, recv_elems, D)
        # 3: one row per pair, grouped by local expert (every pair's rank is this one now)
        order = torch.sort(items.pair_slot_P, stable=True).indices
        expand = items.pair_item_P[order]
        counts_t = torch.bincount(items.pair_slot_P, minlength=self.num_local_experts)
        x_R, w_R = x_F.index_select(0, expand), w_P.index_select(0, order)
        if self.esp is None:
            handle = HierHandle(layout.num_rows, None, layout, moves, expand, x_F.shape[0], w_R)
            return x_R, counts_t, handle
        esp_counts = self._esp_counts(tuple(counts_t.tolist()), x_R.device)
        handle = HierHandle(layout.num_rows, None, layout, moves, expand, x_F.shape[0], w_R, esp_counts)
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
        y = self.finish_combine(self.launch_combine(y_RD, handle))
        if handle.flat is not None:
            y_ND = handle.flat.layout.place_rows(y, handle.num_rows)
            return y_ND * handle.hier.weights_N.unsqueeze(1).to(y_ND.dtype)
        return y.new_zeros(handle.num_rows, y.shape[1]).index_add(0, handle.hier.item_rows_I, y)

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
