"""The EP group's levels and the process groups of the hierarchical dispatcher's stages.

Shape legend: P EP ranks, D levels of the EP group.

The EP group of a moe block (``edp, esp`` fixed) holds world ranks ``edp*moe + p*esp + esp_rank``
for EP ranks p; its levels are the world topology's minus the innermost ``esp`` ranks and the
outer EDP replicas (``fsmoe.comm.topology.ep_levels``). Every stage of every candidate depth
needs a process group on each such EP group: :func:`stage_groups` makes them once (every rank
calls it, in the same order, while building the model) and keeps them in ``groups.lazy``.
"""
from __future__ import annotations

import torch.distributed as dist

from fsmoe.comm.topology import Levels, Stage, ep_levels
from fsmoe.comm.traffic import candidate_stages
from fsmoe.config import ConfigError
from fsmoe.parallel.groups import ParallelGroups


def levels_of(groups: ParallelGroups) -> Levels:
    """The EP group's levels; a ConfigError naming parallel.topology if EP or ESP cut a level."""
    try:
        levels = ep_levels(groups.topology.level_sizes, groups.ep, groups.esp)
    except ValueError as e:
        raise ConfigError("parallel.topology", list(groups.topology.level_sizes), str(e)) from None
    if levels.ranks != groups.ep:
        raise ConfigError("parallel.topology", list(groups.topology.level_sizes),
                          f"its EP part has {levels.ranks} ranks, EP={groups.ep}")
    return levels


def world_ranks(groups: ParallelGroups, ep_ranks: list[int], edp: int, esp_rank: int) -> list[int]:
    lay = groups.layout
    return [edp * lay.moe + p * lay.esp + esp_rank for p in ep_ranks]


def stage_groups(groups: ParallelGroups, levels: Levels) -> dict[Stage, object]:
    """``{stage: this rank's process group}`` for every candidate stage (the EP group for the
    stage covering every level). Collective on first call; cached in ``groups.lazy``."""
    key = ("stage_groups", levels.sizes)
    if key in groups.lazy:
        return groups.lazy[key]
    out = {}
    for stage in candidate_stages(levels):
        if stage == Stage(0, levels.depth - 1):
            out[stage] = groups.ep_group
            continue
        enumeration = [world_ranks(groups, g, x, s) for x in range(groups.edp) for s in range(groups.esp)
                       for g in levels.stage_groups(stage)]
        out[stage], _ = dist.new_subgroups_by_enumeration(enumeration)
    groups.lazy[key] = out
    return out
