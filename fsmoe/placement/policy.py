"""Placement policies: pure functions ``(load, placement, cost) -> new placement``.

Shape legend: E logical experts, P EP ranks, S slots per rank (spares included).

The load is what the traffic monitor measured over a window (``load_E``: rows routed to each
expert, summed over source ranks; ``fsmoe.placement.traffic``), or a prediction of the next
window from several (:class:`fsmoe.placement.traffic.LoadPredictor`). A copy of expert e computes
its share ``x_eq`` of e's rows (even, ``1 / n_e``, unless the placement plans shares), so rank q's
load is ``L_q = sum over the experts e it holds of x_eq * load_e`` and the *balance ratio* is
``max_q L_q / mean_q L_q``.

With planned shares the best a set of holders can do is known exactly (a fractional assignment,
Hall's condition): ``T*(H) = max over rank sets Q of (load of the experts held only inside Q) /
|Q|`` (:func:`best_max_load`), and the shares reaching it are the load vector of least
``sum L_q^2`` (:func:`plan_shares`, which also minimizes the maximum: water-filling one
replicated expert at a time).

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
  copies trade ranks), Replace (Shrink a cold copy where Expand needs its slot) — that moves an
  expert out of the tightest rank set of ``T*`` and that the cost model (with ``T*`` as the
  slowest rank's load) says shortens the step most, until none does or the move budget
  (``max_moved_fraction`` of the experts) is spent; then plan the shares. Starting from the
  current placement and paying for every move keeps a rebalance small; the shares cost no bytes.
- :func:`eplb_policy` (DeepSeek EPLB-style baseline): from scratch, give every spare slot to the
  expert with the highest load per copy, then pack the copies onto ranks heaviest first (each on
  the least loaded rank with room that holds no copy of it yet); with ``nodes`` > 1, expert
  groups are first packed onto nodes the same way and each node is solved alone. Copies that
  stay on their rank keep their slot, but nothing else limits how much moves.

Both return a :class:`Placement`; the slot of every copy that stays on its rank is kept
(:func:`to_placement`), so only copies that change rank move bytes. The EPLB-style baseline keeps
the even split (as DeepSeek's EPLB spreads tokens evenly over replicas).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fsmoe.placement.placement import Placement

Holders = list[set[int]]  # per expert: the EP ranks holding a copy
Shares = list[dict[int, float]]  # per expert: EP rank -> the part of its rows that rank's copy computes
SHARE_UNITS = 4096  # a planned share is an integer number of 1/4096ths of an expert's rows
HALL_MAX_RANKS = 12  # T* enumerates the 2^P rank sets; above this the even split is scored


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


def shares_of(placement: Placement) -> Shares:
    return [placement.fractions(e) for e in range(placement.num_experts)]


def rank_loads(load_E, holders: Holders, ranks: int, shares: Shares | None = None) -> list[float]:
    """[P] the rows each rank computes: the copy of e on q gets ``shares[e][q] * load_e`` (even
    ``load_e / n_e`` without shares)."""
    out = [0.0] * ranks
    for e, hs in enumerate(holders):
        for q in hs:
            out[q] += load_E[e] * (shares[e][q] if shares is not None else 1.0 / len(hs))
    return out


def balance_ratio(load_E, placement: Placement) -> float:
    """max / mean rank load under the placement's shares (1.0 = balanced; 1.0 when nothing was routed)."""
    loads = rank_loads(load_E, holders_of(placement), placement.ranks, shares_of(placement))
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0


def _subset_loads(load_E, holders: Holders, ranks: int) -> np.ndarray:
    """[2^P]: for every rank set Q (a bit mask), the load of the experts held only inside Q."""
    masks = np.fromiter((sum(1 << q for q in hs) for hs in holders), dtype=np.int64, count=len(holders))
    f = np.bincount(masks, weights=np.asarray(load_E, dtype=np.float64), minlength=1 << ranks)
    for q in range(ranks):  # sum over subsets, one rank at a time
        v = f.reshape(-1, 2, 1 << q)
        v[:, 1, :] += v[:, 0, :]
    return f


_SIZES: dict[int, np.ndarray] = {}


def _set_sizes(ranks: int) -> np.ndarray:
    if ranks not in _SIZES:
        sizes = np.array([bin(m).count("1") for m in range(1 << ranks)], dtype=np.float64)
        sizes[0] = np.inf  # the empty set holds nothing
        _SIZES[ranks] = sizes
    return _SIZES[ranks]


def best_max_load(load_E, holders: Holders, ranks: int) -> float:
    """T*(H): the least max rank load any shares give these holders (module docstring); above
    ``HALL_MAX_RANKS`` ranks, the even split's max."""
    if ranks > HALL_MAX_RANKS:
        return max(rank_loads(load_E, holders, ranks))
    return float((_subset_loads(load_E, holders, ranks) / _set_sizes(ranks)).max())


def plan_shares(load_E, holders: Holders, ranks: int, sweeps: int = 200) -> Shares:
    """Shares of every copy that minimize ``sum_q L_q^2`` (and so the max rank load): start even,
    then water-fill one replicated expert at a time over its holders (exact block coordinate
    descent of a convex function) until a sweep changes no load by more than 1e-9 of the total."""
    shares: Shares = [{q: 1.0 / len(hs) for q in hs} for hs in holders]
    loads = rank_loads(load_E, holders, ranks)
    replicated = [e for e, hs in enumerate(holders) if len(hs) > 1 and load_E[e] > 0]
    tol = 1e-9 * max(1e-30, float(sum(load_E)))
    for _ in range(sweeps):
        change = 0.0
        for e in replicated:
            le, hs = float(load_E[e]), sorted(holders[e])
            other = {q: loads[q] - le * shares[e][q] for q in hs}
            level = _water_level(sorted(other.values()), le)
            for q in hs:
                x = max(0.0, level - other[q]) / le
                change = max(change, abs(x - shares[e][q]) * le)
                shares[e][q] = x
                loads[q] = other[q] + le * x
        if change <= tol:
            break
    return shares


def _water_level(others: list[float], amount: float) -> float:
    """The level L with sum_i max(0, L - others_i) = amount (``others`` ascending)."""
    acc = 0.0
    for j, o in enumerate(others):
        acc += o
        level = (amount + acc) / (j + 1)
        if j + 1 == len(others) or level <= others[j + 1]:
            return level
    return others[-1]


def moved_copies(old: Holders, new: Holders) -> int:
    """Copies on a rank that held no copy of that expert before (each crosses ranks once)."""
    return sum(len(n - o) for o, n in zip(old, new))


def step_cost(load_E, holders: Holders, old: Holders, ranks: int, cost: PlacementCost,
              max_load: float | None = None) -> float:
    """T(new) of the module docstring; ``max_load``: the slowest rank's load (default: the even
    split's)."""
    replicated = sum(len(h) > 1 for h in holders)
    if max_load is None:
        max_load = max(rank_loads(load_E, holders, ranks))
    return (max_load * cost.seconds_per_row + replicated * cost.sync_seconds
            + moved_copies(old, holders) * cost.move_seconds / max(1, cost.interval))


# ---------------------------------------------------------------------------- FlexMoE


def _tight_set(load_E, holders: Holders, ranks: int) -> set[int]:
    """The rank set Q that attains T* (the largest such, so every rank waiting on it is in it);
    the most loaded rank of the even split above ``HALL_MAX_RANKS``."""
    if ranks > HALL_MAX_RANKS:
        loads = rank_loads(load_E, holders, ranks)
        return {max(range(ranks), key=lambda q: (loads[q], -q))}
    ratio = _subset_loads(load_E, holders, ranks) / _set_sizes(ranks)
    top = ratio.max()
    best = max((m for m in np.flatnonzero(ratio >= top * (1 - 1e-12))), key=lambda m: bin(int(m)).count("1"))
    return {q for q in range(ranks) if int(best) >> q & 1}


def _neighbours(load_E, holders: Holders, ranks: int, slots: int, width: int = 12):
    """Every single primitive that takes load out of the tightest rank set (its ``width``
    heaviest experts), plus Shrink anywhere."""
    tight = _tight_set(load_E, holders, ranks)
    used = [0] * ranks
    for hs in holders:
        for q in hs:
            used[q] += 1
    inside = sorted((e for e, hs in enumerate(holders) if hs <= tight), key=lambda e: (-load_E[e], e))[:width]
    outside = [q for q in range(ranks) if q not in tight]
    for e in inside:
        for q in outside:
            if used[q] < slots:
                yield ("expand", e, q)
                for p in sorted(holders[e]):
                    yield ("migrate", e, p, q)
            for f, hs in enumerate(holders):
                if q not in hs or f == e:
                    continue
                if len(hs) > 1:
                    yield ("replace", e, q, f)
                for p in sorted(holders[e] - hs):
                    yield ("exchange", e, p, f, q)
                    if used[p] < slots:  # Expand e onto q and bring f to p
                        yield ("expand_back", e, q, f, p)
                        if used[q] < slots:
                            yield ("expand_pair", e, q, f, p)
    for e, hs in enumerate(holders):
        if len(hs) > 1:
            for q in sorted(hs):
                yield ("shrink", e, q)


def _apply(holders: Holders, op) -> Holders:
    new = list(holders)
    kind, e = op[0], op[1]
    if kind == "expand":
        new[e] = holders[e] | {op[2]}
    elif kind == "shrink":
        new[e] = holders[e] - {op[2]}
    elif kind == "migrate":
        _, e, p, q = op
        new[e] = (holders[e] - {p}) | {q}
    elif kind == "exchange":
        _, e, p, f, q = op
        new[e] = (holders[e] - {p}) | {q}
        new[f] = (holders[f] - {q}) | {p}
    elif kind == "expand_back":
        _, e, q, f, p = op
        new[e] = holders[e] | {q}
        new[f] = (holders[f] - {q}) | {p}
    elif kind == "expand_pair":
        _, e, q, f, p = op
        new[e] = holders[e] | {q}
        new[f] = holders[f] | {p}
    elif kind == "replace":
        _, e, q, f = op
        new[f] = holders[f] - {q}
        new[e] = holders[e] | {q}
    return new


def flexmoe_policy(load_E, placement: Placement, cost: PlacementCost, threshold: float = 1.05,
                   max_moved_fraction: float = 0.1, max_ops: int = 64) -> Placement:
    """FlexMoE's policy (module docstring). ``load_E``: rows per expert over the window (or predicted)."""
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
    return with_planned_shares(load_E, to_placement(current, placement))


def with_planned_shares(load_E, placement: Placement) -> Placement:
    """The placement with the shares of :func:`plan_shares` (in 1/SHARE_UNITS); a copy whose
    share rounds to nothing is dropped (a Shrink: no bytes move)."""
    holders = holders_of(placement)
    shares = plan_shares(load_E, holders, placement.ranks)
    idle = [(e, q) for e, hs in enumerate(holders) for q in hs if len(hs) > 1 and shares[e][q] * SHARE_UNITS < 0.5]
    if idle:
        for e, q in idle:
            if len(holders[e]) > 1:
                holders[e] = holders[e] - {q}
        placement = to_placement(holders, placement)
        shares = plan_shares(load_E, holders, placement.ranks)
    units = [tuple(max(1, round(shares[e][p] * SHARE_UNITS)) for p in placement.ranks_of(e))
             for e in range(placement.num_experts)]
    return placement.with_shares(units)


def _key(load_E, holders: Holders, old: Holders, ranks: int, cost: PlacementCost) -> tuple[float, float]:
    """(predicted step time with the best shares, how far the rank sets stand above the mean):
    the second breaks ties where several sets share the maximum, so the search can loosen one of
    them on the way to loosening all."""
    if ranks > HALL_MAX_RANKS:
        loads = rank_loads(load_E, holders, ranks)
        return step_cost(load_E, holders, old, ranks, cost, max(loads)), sum(x * x for x in loads)
    ratio = _subset_loads(load_E, holders, ranks) / _set_sizes(ranks)
    mean = float(sum(load_E)) / ranks
    return (step_cost(load_E, holders, old, ranks, cost, float(ratio.max())),
            float(np.square(np.maximum(ratio - mean, 0.0)).sum()))


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
