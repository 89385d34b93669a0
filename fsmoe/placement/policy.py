"""Placement policies: pure functions ``(load, placement, cost) -> new placement``.

Shape legend: E logical experts, P EP ranks, S slots per rank (spares included).

The load is what the traffic monitor measured over a window (``load_E``: rows routed to each
expert, summed over source ranks; ``fsmoe.placement.traffic``). A copy of an expert with n copies
gets ``load_e / n`` of it (the dispatcher's even split), so rank q's load is
``L_q = sum over the experts e it holds of load_e / n_e`` and the *balance ratio* is
``max_q L_q / mean_q L_q``.

The cost model (:class:`PlacementCost`) predicts one step's time under a placement ``new``
reached from ``old``::

    T(new) = max_q L_q * seconds_per_row                (the slowest rank's expert compute)
           + (experts with > 1 copy) * sync_seconds      (replica gradient AllReduce, FlexMoE's T_sync)
           + (copies that cross ranks) * move_seconds / interval   (the pause, amortized: the
                                                         *stability* term)

Policies:

- :func:`flexmoe_policy` (FlexMoE): do nothing while the balance ratio is at most ``threshold``;
  otherwise, starting from the current placement, repeatedly apply the single primitive — Expand
  (a copy in a free slot), Shrink (drop a copy), Migrate (a copy to another rank), Exchange (two
  copies trade ranks), Replace (Shrink a cold copy where Expand needs its slot) — touching the
  most loaded rank that the cost model says shortens the step most, until none does or the move
  budget (``max_moved_fraction`` of the experts) is spent. Starting from the current placement
  and paying for every move keeps a rebalance small.
- :func:`eplb_policy` (DeepSeek EPLB-style baseline): from scratch, give every spare slot to the
  expert with the highest load per copy, then pack the copies onto ranks heaviest first (each on
  the least loaded rank with room that holds no copy of it yet); with ``nodes`` > 1, expert
  groups are first packed onto nodes the same way and each node is solved alone. Copies that
  stay on their rank keep their slot, but nothing else limits how much moves.

Both return a :class:`Placement`; the slot of every copy that stays on its rank is kept
(:func:`to_placement`), so only copies that change rank move bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

from fsmoe.placement.placement import Placement

Holders = list[set[int]]  # per expert: the EP ranks holding a copy


@dataclass(frozen=True)
class PlacementCost:
    """The cost model's constants (seconds): expert compute per routed row (fwd + bwd), the
    replica gradient sync per replicated expert, moving one expert copy (weights + optimizer
    state) to another rank; ``interval``: steps until the next rebalance (amortizes moves)."""

    seconds_per_row: float = 1.0
    sync_seconds: float = 0.0
    move_seconds: float = 0.0
    interval: int = 1

    @staticmethod
    def estimate(expert_params: int, d_model: int, d_ff: int, gemms: int, bytes_per_value: int,
                 flops_per_s: float, bytes_per_s: float, interval: int) -> "PlacementCost":
        """From shapes and two rates: a row costs 3 x (2 flops per weight) x gemms x D x F (forward
        and twice for backward); the sync is a ring AllReduce (~2x the expert's gradient bytes);
        a move carries the weights, gradient and two AdamW moments (4x the expert's bytes)."""
        row = 6.0 * gemms * d_model * d_ff / flops_per_s
        expert_bytes = expert_params * bytes_per_value
        return PlacementCost(row, 2.0 * expert_bytes / bytes_per_s, 4.0 * expert_bytes / bytes_per_s, interval)


# ---------------------------------------------------------------------------- evaluation


def holders_of(placement: Placement) -> Holders:
    return [set(placement.ranks_of(e)) for e in range(placement.num_experts)]


def rank_loads(load_E, holders: Holders, ranks: int) -> list[float]:
    """[P] the rows each rank computes: every copy of e gets load_e / n_e."""
    out = [0.0] * ranks
    for e, hs in enumerate(holders):
        for q in hs:
            out[q] += load_E[e] / len(hs)
    return out


def balance_ratio(load_E, placement: Placement) -> float:
    """max / mean rank load (1.0 = balanced; 1.0 when nothing was routed)."""
    loads = rank_loads(load_E, holders_of(placement), placement.ranks)
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0


def moved_copies(old: Holders, new: Holders) -> int:
    """Copies on a rank that held no copy of that expert before (each crosses ranks once)."""
    return sum(len(n - o) for o, n in zip(old, new))


def step_cost(load_E, holders: Holders, old: Holders, ranks: int, cost: PlacementCost) -> float:
    """T(new) of the module docstring."""
    replicated = sum(len(h) > 1 for h in holders)
    return (max(rank_loads(load_E, holders, ranks)) * cost.seconds_per_row + replicated * cost.sync_seconds
            + moved_copies(old, holders) * cost.move_seconds / max(1, cost.interval))


# ---------------------------------------------------------------------------- FlexMoE


def _neighbours(load_E, holders: Holders, ranks: int, slots: int):
    """Every single primitive that touches the most loaded rank (plus Shrink anywhere)."""
    loads = rank_loads(load_E, holders, ranks)
    hot = max(range(ranks), key=lambda q: (loads[q], -q))
    used = [0] * ranks
    for hs in holders:
        for q in hs:
            used[q] += 1
    on_hot = sorted((e for e, hs in enumerate(holders) if hot in hs), key=lambda e: -load_E[e] / len(holders[e]))
    for e in on_hot:
        for q in range(ranks):
            if q in holders[e]:
                continue
            if used[q] < slots:
                yield ("expand", e, q)
                yield ("migrate", e, hot, q)
            for f, hs in enumerate(holders):
                if q in hs and hot not in hs and f != e:
                    yield ("exchange", e, hot, f, q)
                    if len(hs) > 1:
                        yield ("replace", e, q, f)
                    if used[hot] < slots:  # Expand e onto q and bring f to the hot rank
                        yield ("expand_back", e, q, f, hot)
                        if used[q] < slots:
                            yield ("expand_pair", e, q, f, hot)
        if len(holders[e]) > 1:
            yield ("shrink", e, hot)
    for e, hs in enumerate(holders):
        if len(hs) > 1:
            for q in hs:
                if q != hot:
                    yield ("shrink", e, q)


def _apply(holders: Holders, op) -> Holders:
    new = [set(h) for h in holders]
    kind = op[0]
    if kind == "expand":
        new[op[1]].add(op[2])
    elif kind == "shrink":
        new[op[1]].discard(op[2])
    elif kind == "migrate":
        _, e, p, q = op
        new[e].discard(p)
        new[e].add(q)
    elif kind == "exchange":
        _, e, p, f, q = op
        new[e].discard(p)
        new[e].add(q)
        new[f].discard(q)
        new[f].add(p)
    elif kind == "expand_back":
        _, e, q, f, p = op
        new[e].add(q)
        new[f].discard(q)
        new[f].add(p)
    elif kind == "expand_pair":
        _, e, q, f, p = op
        new[e].add(q)
        new[f].add(p)
    elif kind == "replace":
        _, e, q, f = op
        new[f].discard(q)
        new[e].add(q)
    return new


def flexmoe_policy(load_E, placement: Placement, cost: PlacementCost, threshold: float = 1.05,
                   max_moved_fraction: float = 0.1, max_ops: int = 64) -> Placement:
    """FlexMoE's policy (module docstring). ``load_E``: rows per expert over the window."""
    if balance_ratio(load_E, placement) <= threshold:
        return placement
    P, S = placement.ranks, placement.slots_per_rank
    start = holders_of(placement)
    budget = max(1, int(max_moved_fraction * placement.num_experts + 1e-9))
    current, best_key = start, _key(load_E, start, start, P, cost)
    for _ in range(max_ops):
        best = None
        for op in _neighbours(load_E, current, P, S):
            cand = _apply(current, op)
            if moved_copies(start, cand) > budget:
                continue
            key = _key(load_E, cand, start, P, cost)
            if _better(key, best_key) and (best is None or _better(key, best[0])):
                best = (key, cand)
        if best is None:
            break
        best_key, current = best
    return to_placement(current, placement)


def _key(load_E, holders: Holders, old: Holders, ranks: int, cost: PlacementCost) -> tuple[float, float]:
    """(predicted step time, sum of squared rank loads): the second breaks ties where several
    ranks share the maximum, so the search can lower one of them on the way to lowering all."""
    return step_cost(load_E, holders, old, ranks, cost), sum(x * x for x in rank_loads(load_E, holders, ranks))


def _better(a: tuple[float, float], b: tuple[float, float]) -> bool:
    if a[0] < b[0] * (1 - 1e-9):
        return True
    return a[0] <= b[0] * (1 + 1e-12) and a[1] < b[1] * (1 - 1e-9)


# ---------------------------------------------------------------------------- EPLB-style


def _replicate(load_E, experts: list[int], total: int, max_copies: int) -> dict[int, int]:
    """Copies per expert: each of ``total - len(experts)`` spare slots to the highest load per copy."""
    n = {e: 1 for e in experts}
    for _ in range(total - len(experts)):
        open_ = [e for e in experts if n[e] < max_copies]
        if not open_:
            break
        e = max(open_, key=lambda e: (load_E[e] / n[e], -e))
        n[e] += 1
    return n


def _pack(load_E, copies: dict[int, int], ranks: list[int], slots: int) -> dict[int, set[int]]:
    """Copies onto ``ranks`` heaviest first, each on the least loaded rank with room and no copy
    of that expert yet."""
    items = sorted(((load_E[e] / n, e) for e, n in copies.items() for _ in range(n)), key=lambda t: (-t[0], t[1]))
    load = {q: 0.0 for q in ranks}
    used = {q: 0 for q in ranks}
    out: dict[int, set[int]] = {e: set() for e in copies}
    for w, e in items:
        room = [q for q in ranks if used[q] < slots and q not in out[e]]
        if not room:  # every rank with room already holds a copy of e: one copy fewer
            continue
        q = min(room, key=lambda q: (load[q], used[q], q))
        out[e].add(q)
        load[q] += w
        used[q] += 1
    return out


def eplb_policy(load_E, placement: Placement, cost: PlacementCost | None = None, nodes: int = 1) -> Placement:
    """The EPLB-style baseline (module docstring). ``nodes`` > 1: hierarchical (groups of E/nodes
    experts packed onto nodes of P/nodes ranks first)."""
    E, P, S = placement.num_experts, placement.ranks, placement.slots_per_rank
    if nodes > 1 and (P % nodes or E % nodes):
        raise ValueError(f"eplb_policy: nodes={nodes} must divide EP={P} and num_experts={E}")
    holders: Holders = [set() for _ in range(E)]
    per_node = P // nodes
    groups = [list(range(g * E // nodes, (g + 1) * E // nodes)) for g in range(nodes)]
    group_load = {g: float(sum(load_E[e] for e in members)) for g, members in enumerate(groups)}
    node_of = {g: n for n, g in enumerate(sorted(group_load, key=lambda g: (-group_load[g], g)))}
    for g, members in enumerate(groups):
        ranks = list(range(node_of[g] * per_node, (node_of[g] + 1) * per_node))
        copies = _replicate(load_E, members, per_node * S, per_node)
        for e, hs in _pack(load_E, copies, ranks, S).items():
            holders[e] = hs
    return to_placement(holders, placement)


# ---------------------------------------------------------------------------- slots


def to_placement(holders: Holders, old: Placement) -> Placement:
    """Holders -> a Placement: a copy that stays on its rank keeps its slot (and the primary stays
    primary), new copies take the lowest free slots of their rank."""
    if holders == holders_of(old):
        return old
    P, S = old.ranks, old.slots_per_rank
    kept = {e: [(p, j) for p, j in old.slots_E[e] if p in holders[e]] for e in range(old.num_experts)}
    taken = [{j for e in kept for p, j in kept[e] if p == q} for q in range(P)]
    slots = []
    for e, hs in enumerate(holders):
        have = {p for p, _ in kept[e]}
        mine = list(kept[e])
        for q in sorted(hs - have):
            j = min(set(range(S)) - taken[q])
            taken[q].add(j)
            mine.append((q, j))
        slots.append(tuple(mine))
    return Placement(tuple(slots), P, S, old.version + 1)
