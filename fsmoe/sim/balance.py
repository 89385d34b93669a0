"""Expert placement in the cluster simulator: how unevenly a routing loads the EP ranks under the
static placement and after a placement policy (FlexMoE's or the EPLB-style baseline,
``fsmoe.placement.policy``) has replicated and moved experts into spare slots.

    bal = load_balance(spec, layout, "flexmoe", routing="skewed")
    bal.ratio        # the busiest EP rank's rows over the mean (1.0: balanced)

The planner prices every rank as the mean; the step waits for the busiest, so the cluster
simulator scales the expert GEMM and AlltoAll lines by ``ratio`` (the busiest rank computes and
receives that many times the mean rows) and adds the replicas' gradient AllReduce (FlexMoE's
T_sync: every replicated expert's gradient summed over its copies).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from fsmoe.parallel.layout import Layout
from fsmoe.schedule.types import LayerSpec

PLACEMENTS = ("static", "flexmoe", "eplb")


@dataclass(frozen=True)
class LoadBalance:
    policy: str
    ratio: float  # the busiest EP rank's rows / the mean, under the policy's placement
    static_ratio: float  # the same under the static placement
    replicated: int  # experts with more than one copy


def load_balance(spec: LayerSpec, layout: Layout, policy: str, routing: str = "skewed",
                 extra_slots: float = 0.125, tokens: int = 2048, seed: int = 0) -> LoadBalance:
    """``policy`` in ``PLACEMENTS``; ``routing`` as :func:`routing_ids` draws it for every EP
    rank (a name or a routing trace's path); ``extra_slots`` spare slots per rank, as a fraction
    of its E / ep experts."""
    from fsmoe.placement.placement import Placement
    from fsmoe.placement.policy import PlacementCost, balance_ratio, eplb_policy, flexmoe_policy

    if policy not in PLACEMENTS:
        raise ValueError(f"placement {policy!r} is unknown; allowed: {', '.join(PLACEMENTS)}")
    E, ep = spec.num_experts, layout.ep
    ids = group_routing(spec, layout, routing, tokens, seed)
    load = torch.bincount(ids.flatten(), minlength=E).double().tolist()
    static = balance_ratio(load, Placement.contiguous(E, ep))
    if policy == "static" or ep == 1:
        return LoadBalance(policy, static, static, 0)
    start = Placement.initial(E, ep, max(1, math.ceil(extra_slots * E / ep)))
    if policy == "flexmoe":  # balance alone: moves are free here (their cost is amortised over an interval)
        placed = flexmoe_policy(load, start, PlacementCost(), max_moved_fraction=1.0)
    else:
        placed = eplb_policy(load, start)
    replicated = sum(placed.copies(e) > 1 for e in range(E))
    return LoadBalance(policy, balance_ratio(load, placed), static, replicated)


def group_routing(spec: LayerSpec, layout: Layout, routing: str, tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    """[ep * T, K] expert ids of every EP rank's tokens, rank by rank (T = min(tokens, the
    rank's tokens)), drawn by :func:`routing_ids`."""
    T = min(tokens, spec.tokens)
    return torch.cat([routing_ids(routing, T, spec.num_experts, spec.top_k, seed * 1000 + r)
                      for r in range(layout.ep)])


def routing_ids(routing: str, T: int, E: int, K: int, seed: int) -> torch.Tensor:
    """[T, K] expert ids of one rank's tokens: ``uniform`` / ``skewed`` / ``grouped`` as
    ``fsmoe bench dispatch`` draws them, or the path of a routing trace (``fsmoe train --trace``):
    tokens drawn from the trace's sampled choices (the k experts real tokens chose together, over
    every step and layer; what HierMoE's dedup depends on), or, from a trace without them, with
    its experts' frequencies (over every step, layer and source), k distinct experts each."""
    from fsmoe.bench.dispatch import ROUTINGS, make_ids

    if routing in ROUTINGS:
        return make_ids(routing, T, E, K, seed)
    freq, pool_PK = trace_routing(routing)
    if len(freq) != E:
        raise ValueError(f"the routing trace {routing} has {len(freq)} experts, the config {E}")
    g = torch.Generator().manual_seed(seed)
    if pool_PK is not None:
        if pool_PK.shape[1] != K:
            raise ValueError(f"the routing trace {routing} has top-{pool_PK.shape[1]} choices, the config top-{K}")
        return pool_PK[torch.randint(len(pool_PK), (T,), generator=g)]
    return torch.multinomial(freq.expand(T, E), K, replacement=False, generator=g)


@functools.lru_cache(maxsize=4)
def trace_routing(path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([E] rows routed to each expert over a whole routing trace, [P, K] every sampled token's
    choices with none dropped, or None where the trace has none); ValueError if unreadable."""
    from fsmoe.placement.traffic import read_trace

    try:
        trace = read_trace(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable routing trace ({e})") from None
    freq = torch.as_tensor(trace.counts_NMRE.sum(axis=(0, 1, 2)), dtype=torch.float64) + 1e-9
    pool = None
    if trace.choices_NMSK is not None:
        rows = torch.as_tensor(trace.choices_NMSK.reshape(-1, trace.choices_NMSK.shape[-1]))
        rows = rows[(rows < len(freq)).all(1)]  # a dropped choice (id E) is not traffic
        pool = rows if len(rows) else None
    return freq, pool


def replica_sync_s(layout: Layout, spec: LayerSpec, profile, balance: LoadBalance | None) -> float:
    """Seconds per step to sum the replicated experts' gradients over their copies (FlexMoE's
    T_sync), every MoE layer: the copies sit on different ranks, which reduce at once, so a rank
    reduces the gradients of its share of the replicas (at least one expert's), priced with the
    data-parallel AllReduce line."""
    if balance is None or not balance.replicated or not profile.has("allreduce"):
        return 0.0
    per_rank = -(-balance.replicated // layout.ep) * spec.gemms * spec.d_model * spec.d_ff * spec.grad_bytes
    return spec.n_layers * profile.t("allreduce", per_rank)
