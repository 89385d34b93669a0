"""Expert swaps during training (HierD-ES, or the SmartMoE-style token-count baseline) and the
hierarchical dispatch's numbers for metrics.jsonl.

Every ``parallel.expert_swap_every`` steps, after the optimizer step, for each MoE layer:

    1. every rank all-gathers the routing of the layer's last dispatch (each token's experts,
       with its EP rank) over the world, so every rank scores the same traffic;
    2. the policy scores every pair (``fsmoe.placement.swap``): ``hierd`` by the predicted
       hierarchical dispatch time at the layer's current d, ``tokens`` by raw tokens per rank;
    3. if the best pair improves its score, ``Placement.swap`` makes the new placement and
       ``migrate`` moves both experts' weights and AdamW state exactly (the same choice on every
       rank, and on every EDP replica).

The seconds this takes on this rank are returned, to compare with the step's.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from fsmoe.comm.hierarchical import HierarchicalDispatcher
from fsmoe.comm.topology import stages_for_depth
from fsmoe.parallel.groups import ParallelGroups
from fsmoe.placement.migrate import migrate
from fsmoe.placement.swap import SwapChoice, hierd_scores, token_scores


def gathered_routing(ids_IK: torch.Tensor, groups: ParallelGroups) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [T_all, K], src EP rank [T_all]) of every rank's tokens, on the CPU."""
    K = ids_IK.shape[1]
    n = torch.tensor([ids_IK.shape[0]], dtype=torch.int64, device=ids_IK.device)
    sizes = [torch.zeros_like(n) for _ in range(groups.world)]
    dist.all_gather(sizes, n, group=groups.world_group)
    sizes = [int(s) for s in sizes]
    padded = torch.full((max(sizes), K), -1, dtype=torch.int64, device=ids_IK.device)
    padded[:ids_IK.shape[0]] = ids_IK
    parts = [torch.empty_like(padded) for _ in range(groups.world)]
    dist.all_gather(parts, padded, group=groups.world_group)
    ids = torch.cat([p[:s] for p, s in zip(parts, sizes)]).cpu()
    src = torch.cat([torch.full((s,), groups.layout.coords(r).ep, dtype=torch.int64) for r, s in enumerate(sizes)])
    return ids, src


def choose_swap(dispatcher: HierarchicalDispatcher, ids, src, policy: str, gamma: float) -> SwapChoice:
    if policy == "tokens":
        return token_scores(ids, dispatcher.placement, gamma)
    depth = max(dispatcher.last_stats.depth, 1) if dispatcher.last_stats else 1  # 0: flat; score d = 1
    return hierd_scores(ids, src, dispatcher.placement, dispatcher.levels, stages_for_depth(dispatcher.levels, depth),
                        dispatcher.costs, dispatcher.row_bytes, gamma)


def swap_experts(layer, groups: ParallelGroups, optimizer, policy: str, gamma: float) -> dict:
    """Steps 1-3 for one layer; returns {pair, before, after, seconds} (pair None: no swap)."""
    t0 = time.perf_counter()
    disp = layer.dispatcher
    ids, src = gathered_routing(disp.item_ids(disp.last_layout), groups)
    choice = choose_swap(disp, ids, src, policy, gamma)
    if choice.pair is not None:
        migrate(layer, disp.placement.swap(*choice.pair), groups.ep_group, optimizer)
    return {"pair": list(choice.pair) if choice.pair else None, "before": choice.before_s, "after": choice.after_s,
            "seconds": time.perf_counter() - t0}


def dispatch_metrics(model) -> dict:
    """Per MoE layer with a hierarchical dispatcher: d, bytes per level of its last dispatch, the
    flat AlltoAll's bytes per level on the same routing, the predicted ms per d, and once
    calibrated the milliseconds each path measured beyond the model (``dispatch_calibration_ms``)."""
    disps = [layer.dispatcher for layer in model.moe_layers()
             if isinstance(layer.dispatcher, HierarchicalDispatcher) and layer.dispatcher.last_stats is not None]
    stats = [d.last_stats for d in disps]
    if not stats:
        return {}
    offsets = [d.policy.calibration.offset_s if d.policy.calibration is not None else None for d in disps]
    calibrated = {"dispatch_calibration_ms": [None if o is None else {p: round(s * 1e3, 4) for p, s in o.items()}
                                              for o in offsets]} if any(o is not None for o in offsets) else {}
    return {**calibrated, "dispatch_depth": [s.depth for s in stats],
            "dispatch_levels": list(stats[0].level_names),
            "dispatch_bytes_per_level": [list(s.bytes_per_level) for s in stats],
            "flat_bytes_per_level": [list(s.flat_bytes_per_level) for s in stats],
            "dispatch_predicted_ms": [[round(t * 1e3, 4) for t in s.predicted_s] for s in stats],
            "flat_predicted_ms": [None if s.flat_s is None else round(s.flat_s * 1e3, 4) for s in stats]}
