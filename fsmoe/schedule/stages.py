"""Chunked EP / ESP data movement for the pipelined executor: routes and the four collectives.

Shape legend: N source rows of this rank (grouped by global expert, ``Order``'s output),
S world ranks, E global experts, El local experts of this EP rank, D model dim,
R rows this rank receives in a chunk's dispatch A2A, P padded rows per ESP peer,
G = esp * P rows after the ESP AllGather ("gathered" layout), K rows the expert computes.

Layout (``fsmoe.schedule.perf_model.Layout``): rank w = p * esp + q; EP group {p' * esp + q},
ESP group {p * esp + q'}; EP rank p holds experts [p El, (p+1) El), ESP rank q holds f-shard q.

A chunk i of an (source s, expert e) group of c rows is rows [(i c)//r, ((i+1) c)//r). Rows move:

    source  x_ND --index src_idx--> send rows (grouped by e, so by destination EP rank)
      --A2A (EP)--> recv rows R: by EP source p', then e, then row
      --AllGather (ESP), each peer padded to P--> gathered G: by ESP peer q', p', e, row
      --index gath_idx--> canonical K: by local expert e, then source rank s, then row
    and back the same way (ReduceScatter sums the ESP shards' partial outputs).

``full_idx`` places a chunk's canonical rows in the canonical order of the whole layer (r = 1),
so a backward pass at another degree finds the forward's saved expert inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from fsmoe.schedule.perf_model import ChunkWork, Layout, chunk_bounds, route_work


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
    esp_rows: list[int]  # rows each ESP peer received (its R)
    pad_rows: int  # P = max(esp_rows)
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
        pad = int(esp_rows.max()) if esp_rows.size else 0
        blk_S = _excl_cumsum(tot_PQ, 0).reshape(-1)  # offset of source (p', q') in peer q's block
        q_of_S = np.arange(S) % esp
        gstart_ES = q_of_S[None] * pad + blk_S[None] + _excl_cumsum(cnt_ES, 0)
        fstart_ES = full_start_ES + bnd[i, :, e0:e0 + El].T
        src = seg_arange(src_start_E + bnd[i, rank], cc[i, rank])
        routes.append(ChunkRoute(
            src_idx=as_t(src),
            send_splits=[int(x) for x in cc[i, rank].reshape(ep, El).sum(1)],
            recv_splits=[int(x) for x in tot_PQ[:, q]],
            esp_rows=[int(x) for x in esp_rows], pad_rows=pad,
            gath_idx=as_t(seg_arange(gstart_ES, cnt_ES)),
            counts_El=as_t(cnt_ES.sum(1)), counts_list=[int(x) for x in cnt_ES.sum(1)],
            full_idx=as_t(seg_arange(fstart_ES, cnt_ES)), work=works[i]))
    return routes


class MoEStages:
    """The collectives of one rank's MoE part. Each call blocks its lane (thread or stream) only.

    groups: ``ep_group`` / ``esp_group`` (None when that degree is 1) and ``world_group`` for the
    per-layer count exchange. Build with :meth:`local` (one process) or :meth:`build` (creates the
    groups for ``layout`` on an initialised default group; every rank must call it).
    """

    def __init__(self, layout: Layout, rank: int, ep_group=None, esp_group=None, world_group=None):
        self.layout, self.rank = layout, rank
        self.ep, self.esp = layout.ep, layout.esp
        self.ep_group, self.esp_group, self.world_group = ep_group, esp_group, world_group

    @staticmethod
    def local() -> "MoEStages":
        return MoEStages(Layout(), 0)

    @staticmethod
    def build(layout: Layout, timeout=None) -> "MoEStages":
        world, rank = dist.get_world_size(), dist.get_rank()
        if world != layout.world:
            raise ValueError(f"layout ep*esp={layout.world} does not match the world size {world}")
        kw = {} if timeout is None else {"timeout": timeout}
        ep_group = esp_group = None
        for q in range(layout.esp):  # every rank creates every group, in the same order
            g = dist.new_group([p * layout.esp + q for p in range(layout.ep)], **kw)
            if rank % layout.esp == q:
                ep_group = g
        for p in range(layout.ep):
            g = dist.new_group([p * layout.esp + q for q in range(layout.esp)], **kw)
            if rank // layout.esp == p:
                esp_group = g
        return MoEStages(layout, rank, ep_group if layout.ep > 1 else None,
                         esp_group if layout.esp > 1 else None, dist.group.WORLD)

    @staticmethod
    def from_groups(layout: Layout, ep_group, esp_group, world_group=None) -> "MoEStages":
        """Use existing groups; checks they follow the rank = p * esp + q convention."""
        rank = dist.get_rank()
        if ep_group is not None and layout.ep > 1:
            want = [p * layout.esp + rank % layout.esp for p in range(layout.ep)]
            got = dist.get_process_group_ranks(ep_group)
            if got != want:
                raise ValueError(f"EP group ranks {got} do not follow rank = p*esp + q (expected {want})")
        if esp_group is not None and layout.esp > 1:
            want = [rank // layout.esp * layout.esp + q for q in range(layout.esp)]
            got = dist.get_process_group_ranks(esp_group)
            if got != want:
                raise ValueError(f"ESP group ranks {got} are not consecutive (expected {want})")
        return MoEStages(layout, rank, ep_group if layout.ep > 1 else None,
                         esp_group if layout.esp > 1 else None, world_group or dist.group.WORLD)

    # ------------------------------------------------------------------ per layer
    def exchange_counts(self, counts_E: Tensor) -> np.ndarray:
        """[S, E] every rank's per-expert row counts (one all_gather; host copy)."""
        if self.layout.world == 1:
            return counts_E.detach().cpu().numpy()[None]
        out = [torch.empty_like(counts_E) for _ in range(self.layout.world)]
        dist.all_gather(out, counts_E.contiguous(), group=self.world_group)
        return torch.stack(out).cpu().numpy()

    # ------------------------------------------------------------------ per chunk
    def dispatch(self, x_ND: Tensor, route: ChunkRoute) -> Tensor:
        """Source rows of the chunk -> rows R for this rank's experts (EP AlltoAll)."""
        x = x_ND.index_select(0, route.src_idx)
        if self.ep_group is None:
            return x
        out = x.new_empty(sum(route.recv_splits), x.shape[1])
        dist.all_to_all_single(out, x, route.recv_splits, route.send_splits, group=self.ep_group)
        return out

    def allgather(self, x_RD: Tensor, route: ChunkRoute) -> Tensor:
        """[R, D] -> [esp * P, D]: every ESP peer's rows, each padded to P (ESP AllGather)."""
        P = route.pad_rows
        padded = x_RD if x_RD.shape[0] == P else torch.cat([x_RD, x_RD.new_zeros(P - x_RD.shape[0], x_RD.shape[1])])
        out = x_RD.new_empty(self.esp * P, x_RD.shape[1])
        if P:  # P is the same on every ESP peer (all know every count), so all skip together
            dist.all_gather(list(out.chunk(self.esp)), padded.contiguous(), group=self.esp_group)
        return out

    def reducescatter(self, y_GD: Tensor, route: ChunkRoute) -> Tensor:
        """[esp * P, D] partial outputs -> [R, D] this rank's rows, summed over ESP shards."""
        P = route.pad_rows
        out = y_GD.new_empty(P, y_GD.shape[1])
        if P:
            dist.reduce_scatter(out, list(y_GD.chunk(self.esp)), group=self.esp_group)
        return out[:route.esp_rows[self.rank % self.esp]]

    def combine(self, y_RD: Tensor, route: ChunkRoute) -> Tensor:
        """Rows R back to their source ranks (EP AlltoAll): [n_send, D] in src_idx order."""
        if self.ep_group is None:
            return y_RD
        out = y_RD.new_empty(sum(route.send_splits), y_RD.shape[1])
        dist.all_to_all_single(out, y_RD.contiguous(), route.send_splits, route.recv_splits, group=self.ep_group)
        return out
