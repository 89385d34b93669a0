"""The traffic of a hierarchical dispatch, counted from routing alone, and its predicted time.
Pure (no processes): the dispatcher chooses its depth with it, the swap policy scores expert
swaps with it, ``fsmoe bench dispatch`` sweeps clusters with it.

Shape legend: T tokens, K experts per token, P ranks of the EP group, D levels, S stages,
L = D levels a row may cross.

A token of source rank ``src`` routed to destination ranks ``dest_TK`` (-1: no expert) crosses
stage ``(first, last)`` as one row per distinct group ``prefix(dest, last + 1)`` of its
destinations (with dedup; without, one row per expert). That row leaves the copy that earlier
stages made, on rank ``prefix(dest, first) . suffix(src)``, and lands on ``prefix(dest, last+1)
. suffix(src)`` (``Levels.stage_peer``); it crosses the outermost level where the two differ
(none when they are the same rank). ``Traffic.send[s, r, l]`` / ``recv[s, r, l]`` count the rows
rank r sends / receives over level l at stage s. Counts are additive over source ranks, so each
rank counts its own tokens and one AllReduce gives the group's.

Time of one stage: ``alpha[first] + max over links of beta[l] * row_bytes * max(send, recv)``,
where a level-l link is shared by the ranks below it (a node's NIC carries the level-0 rows of
all its GPUs, a socket's link the level-1 rows of its GPUs; the innermost level is per GPU), so
its rows are summed over those ranks; links of different levels run at once, and a link is as
busy as its busier direction. Combine moves the same rows back, so dispatch + combine is twice
the sum over stages. With
``gamma`` the max is HierMoE's smooth max (a soft maximum of the loads normalised by their
largest), which the swap policy uses so that relieving the second-busiest rank also counts.

The dispatcher's choice of d prices bytes, not rows (``Wire``, ``hier_seconds``): a row's
features with its K weights and ids (padded to 16 bytes), the features back in combine, the
layout's collective rounds and a measured fixed cost per d; the flat AlltoAll (``flat_seconds``)
competes as d = 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fsmoe.comm.topology import LevelCosts, Levels, Stage, stages_for_depth


@dataclass(frozen=True)
class Traffic:
    """Rows per stage, rank and level: send/recv ``[S, P, L]`` int64 for ``stages`` of ``levels``."""

    stages: tuple[Stage, ...]
    send: Tensor
    recv: Tensor
    levels: Levels

    def rows_per_level(self) -> list[int]:
        """[L] rows crossing each level, summed over stages and ranks."""
        return self.send.sum(dim=(0, 1)).tolist()

    def plus(self, other: "Traffic") -> "Traffic":
        return Traffic(self.stages, self.send + other.send, self.recv + other.recv, self.levels)


def stage_rows(dest_TK: Tensor, src_T: Tensor, levels: Levels, stage: Stage, dedup: bool
               ) -> tuple[Tensor, Tensor, Tensor]:
    """The rows of one stage, one entry per (token, slot): (sender [T, K], receiver [T, K]) EP
    ranks and ``row_TK`` [T, K] 1 where the slot makes a row (valid, and with dedup the first
    of the token's slots towards its destination group), else 0. No host sync: the rows are a
    mask over the slots, not a list.

    dest_TK: [T, K] int64 destination ranks (-1 none); src_T: [T] int64 source ranks."""
    valid = dest_TK >= 0
    s_last = levels.stride(stage.last)
    g = torch.where(valid, dest_TK // s_last, -1)  # prefix(dest, last + 1)
    row = valid
    if dedup:  # an earlier slot of the token towards the same group already makes the row
        K = g.shape[1]
        same = (g.unsqueeze(2) == g.unsqueeze(1)) & torch.ones(K, K, dtype=torch.bool, device=g.device).tril(-1)
        row = valid & ~same.any(2)
    src = src_T.unsqueeze(1)
    s_first = levels.stride(stage.first - 1)
    width = levels.stage_size(stage)
    gc = g.clamp(min=0)
    sender = (gc // width) * s_first + src % s_first
    receiver = gc * s_last + src % s_last
    return sender, receiver, row.to(torch.int64)


def crossed_level(levels: Levels, a: Tensor, b: Tensor) -> Tensor:
    """[M] the outermost level at which ranks a and b differ, -1 where a == b."""
    out = torch.full_like(a, -1)
    for level in reversed(range(levels.depth)):
        out = torch.where(levels.coord(a, level) != levels.coord(b, level), level, out)
    return out


def count_traffic(dest_TK: Tensor, src_T: Tensor, levels: Levels, stages: tuple[Stage, ...],
                  dedup: bool = True) -> Traffic:
    """Rows each rank sends / receives over each level at each stage (see module docstring)."""
    P, L = levels.ranks, max(levels.depth, 1)
    send = torch.zeros(len(stages), P * L, dtype=torch.int64, device=dest_TK.device)
    recv = torch.zeros_like(send)
    for s, stage in enumerate(stages):
        a, b, row = stage_rows(dest_TK, src_T, levels, stage, dedup)
        lvl = crossed_level(levels, a, b)
        n = (row * (lvl >= 0)).flatten()  # rows that cross some level
        lvl = lvl.clamp(min=0)
        # index_add_ (no host sync, atomics); index_put_(accumulate=True) sorts its indices on CUDA
        send[s].index_add_(0, (a * L + lvl).flatten(), n)
        recv[s].index_add_(0, (b * L + lvl).flatten(), n)
    return Traffic(tuple(stages), send.view(-1, P, L), recv.view(-1, P, L), levels)


def soft_max(v: Tensor, gamma: float | None, dim: int = -1) -> Tensor:
    """max over ``dim``; with gamma, ``M * (1 + log(sum exp(gamma * (v / M - 1))) / gamma)``,
    M the max (0 where M is 0). It exceeds the max by at most ``M log(n) / gamma``."""
    m = v.amax(dim=dim)
    if gamma is None:
        return m
    safe = torch.where(m > 0, m, torch.ones_like(m)).unsqueeze(dim)
    soft = m * (1 + torch.logsumexp(gamma * (v / safe - 1), dim=dim) / gamma)
    return torch.where(m > 0, soft, m)


def link_seconds(send: Tensor, recv: Tensor, levels: Levels, costs: LevelCosts, row_bytes: int) -> Tensor:
    """[..., S, X] seconds each link is busy (X links of every level, outermost first); send/recv
    ``[..., S, P, L]``. Level l's link serves ``stride(l)`` consecutive ranks."""
    out = []
    for level in range(levels.depth):
        block = levels.stride(level)
        shape = (*send.shape[:-2], levels.ranks // block, block)
        s = send[..., level].reshape(shape).sum(-1)
        r = recv[..., level].reshape(shape).sum(-1)
        out.append(torch.maximum(s, r).to(torch.float64) * (row_bytes * costs.beta[level]))
    return torch.cat(out, dim=-1)


def stage_times(send: Tensor, recv: Tensor, stages: tuple[Stage, ...], levels: Levels, costs: LevelCosts,
                row_bytes: int, gamma: float | None = None) -> Tensor:
    """[..., S] seconds of each stage; send/recv ``[..., S, P, L]`` (leading batch dims allowed)."""
    busiest = soft_max(link_seconds(send, recv, levels, costs, row_bytes), gamma)
    alpha = torch.tensor([costs.alpha[st.first] if costs.alpha else 0.0 for st in stages], dtype=torch.float64,
                         device=send.device)
    return alpha + busiest


def predict(traffic: Traffic, costs: LevelCosts, row_bytes: int, gamma: float | None = None) -> float:
    """Seconds of dispatch + combine (each stage twice)."""
    return 2.0 * float(stage_times(traffic.send, traffic.recv, traffic.stages, traffic.levels, costs, row_bytes,
                                   gamma).sum())


def candidate_stages(levels: Levels) -> tuple[Stage, ...]:
    """Every stage some depth d = 1..D uses (2D - 1 of them), in a fixed order."""
    seen: dict[Stage, None] = {}
    for d in range(1, max(levels.depth, 1) + 1):
        seen.update(dict.fromkeys(stages_for_depth(levels, d)))
    return tuple(seen)


def select(traffic: Traffic, stages: tuple[Stage, ...]) -> Traffic:
    """The part of ``traffic`` (counted for a superset of stages) that ``stages`` use."""
    idx = [traffic.stages.index(st) for st in stages]
    return Traffic(tuple(stages), traffic.send[idx], traffic.recv[idx], traffic.levels)


def id_bytes_for(n: int) -> int:
    """Bytes of an id among n experts on the wire, with one more value marking an empty slot
    (uint8 up to 255 experts, else int16 or int32)."""
    return 1 if n < 256 else 2 if n < 32768 else 4


def meta_columns(feature: int, weight: int, slots: int, id_bytes: int) -> int:
    """Columns (of ``weight`` bytes, the features' element size) after a row's features and
    ``slots`` weights that hold its ``slots`` ids of ``id_bytes`` each, the row padded to a
    multiple of 16 bytes (so every peer's block of the AlltoAll buffer stays aligned)."""
    cols = -(-slots * id_bytes // weight)
    while (feature + (slots + cols) * weight) % 16 and cols < 16:
        cols += 1
    return cols


@dataclass(frozen=True)
class Wire:
    """What a hierarchical dispatch puts on the wire (``fsmoe.comm.hierarchical``): one row per
    token copy, its ``feature`` bytes, then ``slots`` (K) combine weights (``weight`` bytes each,
    0 for a slot whose expert is not below the receiver) and K ids, each the expert's id among
    the experts of the ranks below the receiver (``id_bytes_for`` of that many: 1 byte up to
    255), the row padded to 16 bytes. Combine sends the features back only. The flat AlltoAll
    sends ``feature`` bytes per (token, expert) pair each way, and no weights (they are applied
    at the source)."""

    feature: int
    weight: int = 4
    experts_per_rank: int = 1
    slots: int = 1

    def id_bytes(self, levels: Levels, stage: Stage) -> int:
        return id_bytes_for(levels.stride(stage.last) * self.experts_per_rank)

    def row_bytes(self, levels: Levels, stage: Stage) -> int:
        """Bytes of one dispatched row at ``stage``."""
        cols = meta_columns(self.feature, self.weight, self.slots, self.id_bytes(levels, stage))
        return self.feature + (self.slots + cols) * self.weight

    def dispatch_bytes(self, rows: Tensor, levels: Levels, stage: Stage) -> Tensor:
        """Bytes of ``rows`` dispatched rows (their (row, expert) pairs ride in the rows' fixed K
        slots, so the pairs add nothing)."""
        return rows * self.row_bytes(levels, stage)

    def bytes_per_level(self, rows: Traffic) -> list[int]:
        """[L] bytes a dispatch moves over each level (summed over stages and ranks)."""
        out = sum(self.dispatch_bytes(r, rows.levels, st) for st, r in zip(rows.stages, rows.send))
        return out.sum(0).tolist()


@dataclass(frozen=True)
class DepthChoice:
    """The chosen depth (0: the flat AlltoAll) and the prediction behind it: seconds of dispatch +
    combine per depth (``predicted_s[d - 1]``) and of the flat AlltoAll (``flat_s``; None when it
    is no candidate)."""

    depth: int
    predicted_s: tuple[float, ...]
    flat_s: float | None = None


def _time(send: Tensor, recv: Tensor, stage: Stage, levels: Levels, costs: LevelCosts) -> float:
    """Seconds of one stage moving send/recv ``[P, L]`` bytes."""
    return float(stage_times(send[None], recv[None], (stage,), levels, costs, 1).sum())


def hier_seconds(rows: Traffic, costs: LevelCosts, wire: Wire, d: int) -> float:
    """Dispatch + combine of depth d: each stage's AlltoAll both ways (dispatch: the rows as
    ``wire`` sends them; combine: the features back), the layout's collective rounds (one
    AllGather of the counts and first splits; a split exchange before every later stage) and the
    measured fixed cost ``costs.overhead_s(d)``. ``rows`` counted with dedup for a superset of
    d's stages."""
    lv = rows.levels
    stages = stages_for_depth(lv, d)
    r = select(rows, stages)
    total = costs.alpha[0] + sum(costs.alpha[st.first] for st in stages[1:]) + costs.overhead_s(d)
    for s, st in enumerate(stages):
        total += _time(wire.dispatch_bytes(r.send[s], lv, st), wire.dispatch_bytes(r.recv[s], lv, st), st, lv, costs)
        total += _time(r.recv[s] * wire.feature, r.send[s] * wire.feature, st, lv, costs)
    return total


def flat_seconds(pairs: Traffic, costs: LevelCosts, wire: Wire) -> float:
    """Dispatch + combine of the flat AlltoAll: its count exchange, then one row of features per
    (token, expert) each way. ``pairs`` counted without dedup, for a set of stages holding the
    flat one."""
    lv = pairs.levels
    st = Stage(0, lv.depth - 1)
    p = select(pairs, (st,))
    return costs.alpha[0] + 2 * _time(p.send[0] * wire.feature, p.recv[0] * wire.feature, st, lv, costs)


def choose_depth(rows: Traffic, pairs: Traffic, levels: Levels, costs: LevelCosts, wire: Wire,
                 allow_flat: bool = True) -> DepthChoice:
    """argmin of the predicted dispatch + combine over d = 1..D (``hier_seconds``) and, with
    ``allow_flat``, the flat AlltoAll (d = 0, ``flat_seconds``). ``rows`` / ``pairs``: the
    traffic with / without dedup, counted for ``candidate_stages``. Ties go to the smaller d
    (fewer collectives; flat first). O(D * (P * L)) once the counts exist; counting them is
    O(D * T * K)."""
    times = tuple(hier_seconds(rows, costs, wire, d) for d in range(1, max(levels.depth, 1) + 1))
    flat = flat_seconds(pairs, costs, wire) if allow_flat else None
    best = min(range(len(times)), key=lambda i: (times[i], i)) + 1
    if flat is not None and flat <= times[best - 1]:
        best = 0
    return DepthChoice(best, times, flat)
