"""A routing trace's AlltoAlls replayed on fabrics: does mFabric's prediction keep up with the
traffic, and what does a static optical topology lose when the traffic moves?

Per recorded step and MoE layer the trace gives an EP-rank traffic matrix (``traces.rank_matrices``,
rows scaled so that each rank dispatches ``mb_per_rank`` MB); each layer runs a dispatch AlltoAll
(that matrix) and a combine (its transpose), replicated over ``groups`` EP groups of consecutive
GPUs. For each AlltoAll:

* electrical: the fat-tree (or any ``LeafSpine``) as it is;
* mFabric, predicted: circuits planned from the same layer's traffic one recorded step earlier
  (mFabric's prediction), set up while the compute before the AlltoAll hides ``hide_ms`` of the
  OCS's delay; the very first set is not predicted and waits the full delay;
* mFabric, oracle: circuits planned from the AlltoAll's own traffic (same delay accounting): the
  bound a perfect predictor reaches;
* static optical: one circuit set for the whole replay, planned from the sum of all its traffic.

The OCS holds one circuit set at a time, so every AlltoAll whose set differs from the one before
it (the previous layer's, or the dispatch's for a combine) pays the reconfiguration.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from fsmoe.sim.fabrics import LeafSpine
from fsmoe.sim.flows import simulate
from fsmoe.sim.optical import RegionalOCS
from fsmoe.sim.patterns import from_matrix

POLICIES = ("electrical", "predicted", "oracle", "static")


@dataclass(frozen=True)
class ReplayResult:
    """Per replayed step [N] of each policy: AlltoAll ms (sum over layers, dispatch + combine)
    and the reconfiguration ms it waited for."""

    steps: list[int]
    a2a_ms: dict[str, list[float]]
    reconfig_ms: dict[str, list[float]]

    def means(self) -> dict[str, float]:
        return {p: float(np.mean(np.add(self.a2a_ms[p], self.reconfig_ms[p]))) for p in POLICIES}

    def to_json(self) -> dict:
        return {**asdict(self), "means_ms": self.means()}


def group_matrix(T_PP: np.ndarray, groups: int) -> np.ndarray:
    """[G, G] block-diagonal bytes of ``groups`` copies of one EP group's [P, P] matrix."""
    P = T_PP.shape[0]
    out = np.zeros((P * groups, P * groups))
    for g in range(groups):
        out[g * P:(g + 1) * P, g * P:(g + 1) * P] = T_PP
    return out


def _makespan_ms(A, cap, size, batch: float, share_tol: float) -> float:
    return simulate(A, cap, size, batch=batch, share_tol=share_tol).makespan_s * 1e3


def replay(mats_NMPP: np.ndarray, steps, ocs: RegionalOCS, tree: LeafSpine, *, groups: int = 1,
           mb_per_rank: float = 64.0, hide_ms: float = 0.0, batch: float = 0.01,
           share_tol: float = 0.01) -> ReplayResult:
    """Replay ``mats_NMPP`` [N, M, P, P] (rows rank p sent rank q) on the four policies."""
    N, M, P, _ = mats_NMPP.shape
    if ocs.gpus != P * groups or tree.gpus != P * groups:
        raise ValueError(f"the fabrics must have {P} x {groups} GPUs (EP ranks x groups)")
    sent = mats_NMPP.sum(-1, keepdims=True)
    scaled = np.divide(mats_NMPP * mb_per_rank * 1e6, sent, out=np.zeros_like(mats_NMPP), where=sent > 0)
    # every AlltoAll in order: (step, layer, dispatch) then (step, layer, combine)
    order = [(n, m, T) for n in range(N) for m in range(M) for T in (scaled[n, m], scaled[n, m].T)]
    flows_all = [from_matrix(group_matrix(T, groups)) for _, _, T in order]
    demand = [ocs.server_demand(f) for f in flows_all]
    plans = [ocs.plan(d) for d in demand]  # each AlltoAll's own set: the oracle's, the next step's prediction
    static_set = ocs.plan(np.sum(demand, axis=0))
    tree_cap = tree.capacity()
    a2a = {p: np.zeros(N) for p in POLICIES}
    wait = {p: np.zeros(N) for p in POLICIES}
    held = {"predicted": None, "oracle": None}
    per_step = 2 * M
    for i, ((n, _, _), flows) in enumerate(zip(order, flows_all)):
        A, size = tree.incidence(flows)
        a2a["electrical"][n] += _makespan_ms(A, tree_cap, size, batch, share_tol)
        A, cap, size = ocs.incidence(flows, static_set)
        a2a["static"][n] += _makespan_ms(A, cap, size, batch, share_tol)
        prev = i - per_step  # the same layer and direction one recorded step earlier
        # the first step's predicted set is its own, not known ahead: it waits the whole delay
        for pol, circuits, known in (("predicted", plans[prev if prev >= 0 else i], prev >= 0),
                                     ("oracle", plans[i], True)):
            wait[pol][n] += ocs.reconfigure(held[pol], circuits, hide_ms if known else 0.0)
            held[pol] = circuits
            A, cap, size = ocs.incidence(flows, circuits)
            a2a[pol][n] += _makespan_ms(A, cap, size, batch, share_tol)
    return ReplayResult([int(s) for s in steps], {p: v.tolist() for p, v in a2a.items()},
                        {p: v.tolist() for p, v in wait.items()})

