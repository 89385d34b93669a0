"""HierMoE's token deduplication in the cluster simulator: how much faster (or slower) the
hierarchical dispatcher of depth d moves one MoE layer's tokens than the flat AlltoAll, on the
layout's EP group placed on servers, by the same traffic model the dispatcher chooses its depth
with (``fsmoe.comm.traffic``: rows counted from routing, each stage priced per level's links).

    scale = dedup_scale(spec, layout, gpus_per_server, nic_gbps, nvlink_gbps, depth=2)
    a2a_fit.beta *= scale.ratio

Links: a server's ``gpus_per_server`` NICs are its level-0 link (shared by its GPUs, as the
model's links are), NVSwitch each GPU's level-1 link. Routing: top-k ids per rank
(``fsmoe.sim.balance.routing_ids``: uniform, skewed or grouped as ``fsmoe bench dispatch`` draws
them, or drawn with a routing trace's expert frequencies), experts on EP ranks in contiguous
ranges. The ratio multiplies the fabric's flat AlltoAll line, so the fabric's
contention stays in the price and dedup only changes how many bytes cross it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fsmoe.parallel.layout import Layout
from fsmoe.schedule.types import LayerSpec

GBIT = 1e9 / 8


@dataclass(frozen=True)
class DedupScale:
    depth: int  # the depth priced (0: the flat AlltoAll)
    ratio: float  # its dispatch + combine seconds over the flat AlltoAll's
    flat_ms: float  # the model's flat dispatch + combine
    per_depth_ms: tuple[float, ...]  # d = 1 .. D


def dedup_scale(spec: LayerSpec, layout: Layout, gpus_per_server: int, nic_gbps: float, nvlink_gbps: float,
                depth: int | str, routing: str = "uniform", tokens: int = 2048, seed: int = 0) -> DedupScale:
    """``depth``: 0 (flat), 1..D, or "auto" (the dispatcher's own choice, flat included)."""
    from fsmoe.comm.topology import LevelCosts, ep_levels
    from fsmoe.comm.traffic import Wire, candidate_stages, choose_depth, count_traffic, flat_seconds, hier_seconds
    from fsmoe.sim.balance import group_routing

    ep, E, K = layout.ep, spec.num_experts, spec.top_k
    servers = max(1, layout.world // gpus_per_server)
    levels = ep_levels((servers, min(gpus_per_server, layout.world)), ep, layout.esp)
    if levels.depth < 2 or depth == 0:  # one server (or flat asked for): nothing to deduplicate across
        return DedupScale(0, 1.0, 0.0, ())
    inner = levels.stride(0)  # EP ranks per server
    costs = LevelCosts((10e-6, 3e-6), (1 / (inner * nic_gbps * GBIT), 1 / (nvlink_gbps * GBIT)))
    ids = group_routing(spec, layout, routing, tokens, seed)
    dest = ids // (E // ep)
    src = torch.arange(ep).repeat_interleave(len(ids) // ep)
    stages = candidate_stages(levels)
    rows, pairs = count_traffic(dest, src, levels, stages, True), count_traffic(dest, src, levels, stages, False)
    wire = Wire(spec.d_model * spec.dtype_bytes, 4, E // ep, K)
    flat = flat_seconds(pairs, costs, wire)
    per = tuple(hier_seconds(rows, costs, wire, d) for d in range(1, levels.depth + 1))
    if depth == "auto":
        d = choose_depth(rows, pairs, levels, costs, wire).depth
    else:
        if not 1 <= int(depth) <= levels.depth:
            raise ValueError(f"dedup depth {depth} is not 0..{levels.depth} for this EP group's levels")
        d = int(depth)
    t = flat if d == 0 else per[d - 1]
    return DedupScale(d, t / flat, flat * 1e3, tuple(x * 1e3 for x in per))
