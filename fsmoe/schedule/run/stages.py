"""Chunked EP / ESP data movement for the pipelined executor: routes and the four collectives.

Shape legend: N source rows of this rank (grouped by global expert, ``Order``'s output),
S ranks of the moe group (ep * esp), E global experts, El local experts of this EP rank,
D model dim, R rows this rank receives in a chunk's dispatch A2A, G rows after the ESP
AllGather ("gathered" layout, every ESP peer's R in rank order), K rows the expert computes.

Layout (``fsmoe.parallel.groups``): inside a moe group, rank w = p * esp + q; EP group
{p' * esp + q}, ESP group {p * esp + q'}; EP rank p holds experts [p El, (p+1) El), ESP rank q
holds f-shard q. The collectives are the distributed stages (``fsmoe.comm.alltoall`` /
``fsmoe.comm.esp``), each called with launch + finish on its lane.

A chunk i of an (source s, expert e) group of c rows is rows [(i c)//r, ((i+1) c)//r). Rows move:

    source  x_ND --index src_idx--> send rows (grouped by e, so by destination EP rank)
      --A2A (EP)--> recv rows R: by EP source p', then e, then row
      --AllGather (ESP)--> gathered G: by ESP peer q', then p', e, row
      --index gath_idx--> canonical K: by local expert e, then source rank s, then row
    and back the same way (ReduceScatter sums the ESP shards' partial outputs).

``full_idx`` places a chunk's canonical rows in the canonical order of the whole layer (r = 1),
so a backward pass at another degree finds the forward's saved expert inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fsmoe.comm.alltoall import AllToAllStage
from fsmoe.comm.esp import EspStage
from fsmoe.comm.functional import reduce_scatter_impl_for
from fsmoe.comm.layout import exchange_counts
from fsmoe.schedule.model.perf_model import ChunkWork, chunk_bounds, route_work
from fsmoe.schedule.types import Layout


def seg_arange(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of arange(starts[k], starts[k] + counts[k]) over k, without a Python loop."""
    starts, counts = np.asarray(starts, np.int64).ravel(), np.asarray(counts, np.int64).ravel()
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    seg_first = np.cumsum(counts) - counts
    return np.repeat(starts - seg_first, counts) + np.arange(total)


def _excl_cumsum(a: np.ndarray, axis: int) -> np.ndarray:
    return np.cumsum(a, axis=axis) - a


@dataclass(frozen=True)
class ChunkRoute:
    """Where the rows of one chunk go on this rank (all index tensors on the data's device)."""

    src_idx: Tensor  # [n_send] rows of x_ND in this chunk, grouped by expert
    send_splits: list[int]  # rows to each EP peer (dispatch)
    recv_splits: list[int]  # rows from each EP peer (dispatch)
    esp_rows: list[int]  # rows each ESP peer received (its R): the AllGather / ReduceScatter sizes
    gath_idx: Tensor  # [K] gathered-layout row of each canonical row
    counts_El: Tensor  # [El] int64 canonical rows per local expert
    counts_list: list[int]  # the same, on the host
    full_idx: Tensor  # [K] position of each canonical row in the layer's canonical order
    work: ChunkWork


def build_routes(counts_SE: np.ndarray, r: int, layout: Layout, rank: int, device) -> list[ChunkRoute]:
    """The r chunk routes of one layer for ``rank`` from every rank's per-expert counts."""
    S, E = counts_SE.shape
    ep, esp = layout.ep, layout.esp
    El = E // ep
    p, q = divmod(rank, esp)
    e0 = p * El
    C = counts_SE.astype(np.int64)
    bnd = chunk_bounds(C, r)  # [r+1, S, E]
    cc = np.diff(bnd, axis=0)  # [r, S, E]
    src_start_E = _excl_cumsum(C[rank], 0)
    Cl_ES = C[:, e0:e0 + El].T  # [El, S] whole-layer rows of each (local expert, source)
    full_start_ES = _excl_cumsum(Cl_ES.sum(1), 0)[:, None] + _excl_cumsum(Cl_ES, 1)
    works = route_work(C, r, layout, rank)
    as_t = lambda a: torch.as_tensor(a, dtype=torch.long, device=device)
    routes = []
    for i in range(r):
        cnt_ES = cc[i, :, e0:e0 + El].T  # [El, S]
        tot_S = cnt_ES.sum(0)  # rows source s sends to EP rank p this chunk
        tot_PQ = tot_S.reshape(ep, esp)
        esp_rows = tot_PQ.sum(0)  # [esp]
        peer_start_Q = _excl_cumsum(esp_rows, 0)  # where ESP peer q' starts in the gathered rows
        blk_S = _excl_cumsum(tot_PQ, 0).reshape(-1)  # offset of source (p', q') in peer q''s block
        q_of_S = np.arange(S) % esp
        gstart_ES = (peer_start_Q[q_of_S] + blk_S)[None] + _excl_cumsum(cnt_ES, 0)
        fstart_ES = full_start_ES + bnd[i, :, e0:e0 + El].T
        src = seg_arange(src_start_E + bnd[i, rank], cc[i, rank])
        routes.append(ChunkRoute(
            src_idx=as_t(src),
            send_splits=[int(x) for x in cc[i, rank].reshape(ep, El).sum(1)],
            recv_splits=[int(x) for x in tot_PQ[:, q]],
            esp_rows=[int(x) for x in esp_rows],
            gath_idx=as_t(seg_arange(gstart_ES, cnt_ES)),
            counts_El=as_t(cnt_ES.sum(1)), counts_list=[int(x) for x in cnt_ES.sum(1)],
            full_idx=as_t(seg_arange(fstart_ES, cnt_ES)), work=works[i]))
    return routes


class MoEStages:
    """The collectives of one rank's MoE part; each call blocks only its lane (thread or stream).

    ep_stage / esp_stage: ``AllToAllStage`` / ``EspStage`` (None when that degree is 1);
    counts_group: the moe group, over which each layer's counts are all-gathered once.
    Build with :meth:`local` (one process) or :meth:`from_groups` (a ``ParallelGroups``).
    """

    def __init__(self, layout: Layout, rank: int, ep_stage: AllToAllStage | None = None,
                 esp_stage: EspStage | None = None, counts_group=None):
        self.layout, self.rank = layout, rank
        self.ep, self.esp = layout.ep, layout.esp
        self.ep_stage, self.esp_stage, self.counts_group = ep_stage, esp_stage, counts_group

    @staticmethod
    def local() -> "MoEStages":
        return MoEStages(Layout(), 0)

    @staticmethod
    def from_groups(groups, reduce_scatter_impl: str | None = None) -> "MoEStages":
        """From ``fsmoe.parallel.groups.ParallelGroups`` (rank = ep_rank * esp + esp_rank)."""
        layout = Layout.from_groups(groups)
        impl = reduce_scatter_impl or reduce_scatter_impl_for(groups.backend)
        return MoEStages(layout, groups.ep_rank * groups.esp + groups.esp_rank,
                         AllToAllStage(groups.ep_group) if groups.ep > 1 else None,
                         EspStage(groups.esp_group, impl) if groups.esp > 1 else None, groups.moe_group)

    # ------------------------------------------------------------------ per layer
    def exchange_counts(self, counts_E: Tensor) -> np.ndarray:
        """[S, E] every moe-group rank's per-expert row counts (one all-gather; host copy)."""
        counts = exchange_counts(counts_E, self.counts_group, self.ep, self.esp)
        return np.asarray(counts, dtype=np.int64).reshape(self.ep * self.esp, -1)

    # ------------------------------------------------------------------ per chunk
    def dispatch(self, x_ND: Tensor, route: ChunkRoute) -> Tensor:
        """Source rows of the chunk -> rows R for this rank's experts (EP AlltoAll)."""
        x = x_ND.index_select(0, route.src_idx)
        if self.ep_stage is None:
            return x
        return self.ep_stage.finish(self.ep_stage.launch(x, route.send_splits, route.recv_splits))

    def allgather(self, x_RD: Tensor, route: ChunkRoute) -> Tensor:
        """[R, D] -> [G, D]: every ESP peer's rows, in peer order (ESP AllGather)."""
        return self.esp_stage.finish_gather(self.esp_stage.launch_gather(x_RD, route.esp_rows))

    def reducescatter(self, y_GD: Tensor, route: ChunkRoute) -> Tensor:
        """[G, D] partial outputs -> [R, D] this rank's rows, summed over the ESP shards."""
        return self.esp_stage.finish_scatter(self.esp_stage.launch_scatter(y_GD, route.esp_rows))

    def combine(self, y_RD: Tensor, route: ChunkRoute) -> Tensor:
        """Rows R back to their source ranks (EP AlltoAll): [n_send, D] in src_idx order."""
        if self.ep_stage is None:
            return y_RD
        return self.ep_stage.finish(self.ep_stage.launch(y_RD, route.recv_splits, route.send_splits))
