"""DispatchLayout: every split size a sharded dispatch needs, from one exchange of counts.

Shape legend: P ranks of the EP group, S ranks of the ESP group, E global experts, El = E/P
local slots (slots ``[p*El, (p+1)*El)`` of the placement's physical order live on EP rank p;
with the default placement those hold expert ids ``[p*El, (p+1)*El)``), K = P*El physical
slots, D model dim.

Counts are exchanged first: each rank of the ``moe`` group (the P*S ranks that trade tokens)
all-gathers every rank's ``tokens_per_expert_E``, giving ``counts[p, s, e]`` = rows that the
rank at (ep_rank p, esp_rank s) sends to expert e. From that matrix every rank derives, with no
further communication:

    EP AlltoAll  (group: same s)   send to p:   sum_{e of p} counts[me_p, me_s, e]
                                   recv from p: sum_{e mine} counts[p, me_s, e], blocks [p][e]
    ESP AllGather (group: same p)  rank s holds sum_{p, e mine} counts[p, s, e], blocks [s][p][e]
    Expert input                   regrouped [e][s][p]; tokens of local expert e =
                                   sum_{p, s} counts[p, s, e]

Replicas: an expert with n copies (slots of the placement) has every source's rows for it cut
into n pieces, one per copy, even or by the placement's planned shares (:func:`replica_shares`), so the matrix above is first turned
into rows per *physical slot*, ``phys[p, s, k]``, and every sum runs over slots; without replicas
``phys`` is ``counts`` with its columns in physical order. Free slots receive no rows.

The counts become Python ints (one host sync per layer and direction-pair), as any uneven
AlltoAll needs. A hierarchical backend would add node-level sums of the same matrix.

A layout is chunkable (:meth:`DispatchLayout.chunks`): chunk i of r takes the i-th r-th of every
(source rank, physical slot) group, and is itself a ``DispatchLayout`` (of the chunk's counts, plus the
rows of x_ND it sends), so the pipelined executor runs the very dispatch the sequential path
runs, once per chunk; r = 1 is the sequential path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup

from fsmoe.comm.functional import all_gather_base
from fsmoe.placement.placement import FREE


Range = tuple[int, int]  # rows [start, stop)


@dataclass(frozen=True)
class DispatchLayout:
    """Split sizes for one dispatch on one rank; all plain ints (no tensors, no device).

    counts_PSE: the count matrix this layout was derived from, by logical expert (a chunk's own
        counts for a chunk).
    ep_rank, esp_rank: this rank's coordinates.
    order_E: the logical expert in each physical slot, rank-major (``Placement.physical_order``;
        ``FREE`` = -1 for a free slot): EP rank p holds slots ``[p*El, (p+1)*El)``. Every field
        below is in physical order.
    phys_PSK: rows that source (p, s) sends to each physical slot (an expert's rows split among
        its copies, see :func:`replica_shares`).
    num_sent: rows of x_ND this rank sends (its kept assignments; dropped rows are not sent).
    send_splits_P / recv_splits_P: EP AlltoAll row counts to / from each EP peer.
    gather_sizes_S: rows each ESP peer holds after the AlltoAll (the uneven AllGather sizes).
    blocks_SPEl: rows in the gathered buffer, block (s, p, e) in that (rank-major) order.
    tokens_per_local_expert_El: rows of each local slot after regrouping, summed over s, p.
    src_ranges: the rows of x_ND this layout sends, in send order (one range per physical slot,
        adjacent ones merged; ``((0, num_sent),)`` for a whole layer without replicas).
    full_ranges: where this layout's expert-major rows sit in the whole layer's expert-major
        rows (``((0, rows),)`` for a whole layer), so a pass at another degree finds them.
    weights_K: the share weight of every physical slot (``Placement.physical_weights``; ``()``:
        an even split among copies).
    """

    counts_PSE: tuple[tuple[tuple[int, ...], ...], ...]
    ep_rank: int
    esp_rank: int
    order_E: tuple[int, ...]
    num_sent: int
    send_splits_P: tuple[int, ...]
    recv_splits_P: tuple[int, ...]
    gather_sizes_S: tuple[int, ...]
    blocks_SPEl: tuple[tuple[tuple[int, ...], ...], ...]
    tokens_per_local_expert_El: tuple[int, ...]
    src_ranges: tuple[Range, ...]
    full_ranges: tuple[Range, ...]
    phys_PSK: tuple[tuple[tuple[int, ...], ...], ...] = ()
    weights_K: tuple[int, ...] = ()

    @staticmethod
    def from_counts(counts_PSE: list, ep_rank: int, esp_rank: int, order_E: tuple[int, ...] | None = None,
                    src_ranges: tuple[Range, ...] | None = None,
                    full_ranges: tuple[Range, ...] | None = None,
                    weights_K: tuple[int, ...] = ()) -> "DispatchLayout":
        """counts_PSE: nested lists [P][S][E] of ints by logical expert (see module docstring);
        order_E: the placement's physical order (default: expert p*El + j in slot j of rank p);
        weights_K: its share weights (``Placement.physical_weights``; ``()`` even); the ranges
        default to those of a whole layer."""
        counts = tuple(tuple(tuple(int(c) for c in row) for row in ps) for ps in counts_PSE)
        E = len(counts[0][0])
        order = tuple(range(E)) if order_E is None else tuple(order_E)
        weights = tuple(weights_K) if weights_K and any(w != 1 for w, e in zip(weights_K, order) if e != FREE) else ()
        pieces = replica_shares(counts, order, weights)  # [P][S][K] (start within the expert's rows, rows)
        phys = tuple(tuple(tuple(n for _, n in row) for row in ps) for ps in pieces)
        if src_ranges is None:
            logical = counts[ep_rank][esp_rank]
            start = [sum(logical[:e]) for e in range(E)]
            src_ranges = _merged(tuple((start[e] + a, start[e] + a + n)
                                       for e, (a, n) in zip(order, pieces[ep_rank][esp_rank]) if n))
        return DispatchLayout.from_physical(counts, phys, ep_rank, esp_rank, order, src_ranges, full_ranges, weights)

    @staticmethod
    def from_physical(counts, phys, ep_rank: int, esp_rank: int, order: tuple[int, ...],
                      src_ranges: tuple[Range, ...], full_ranges: tuple[Range, ...] | None,
                      weights: tuple[int, ...] = ()) -> "DispatchLayout":
        """The split sizes from the rows every source sends to every physical slot (``phys``
        [P][S][K], nested tuples of ints)."""
        P, S, K = len(phys), len(phys[0]), len(order)
        El = K // P
        mine = range(ep_rank * El, (ep_rank + 1) * El)
        own = phys[ep_rank][esp_rank]
        send = tuple(sum(own[q * El:(q + 1) * El]) for q in range(P))
        recv = tuple(sum(phys[p][esp_rank][k] for k in mine) for p in range(P))
        blocks = tuple(tuple(tuple(phys[p][s][k] for k in mine) for p in range(P)) for s in range(S))
        gather = tuple(sum(map(sum, blocks[s])) for s in range(S))
        per_expert = tuple(sum(blocks[s][p][j] for s in range(S) for p in range(P)) for j in range(El))
        return DispatchLayout(counts, ep_rank, esp_rank, order, sum(own), send, recv, gather, blocks, per_expert,
                              src_ranges, full_ranges if full_ranges is not None else ((0, sum(per_expert)),), phys,
                              weights)

    @property
    def block_sizes_rank_major(self) -> list[int]:
        """Block sizes in gathered order (s, p, e)."""
        return [n for s in self.blocks_SPEl for p in s for n in p]

    @property
    def expert_major_order(self) -> list[int]:
        """Indices of the (s, p, e) blocks listed in (e, s, p) order."""
        S, P, El = len(self.blocks_SPEl), len(self.blocks_SPEl[0]), len(self.tokens_per_local_expert_El)
        return [(s * P + p) * El + e for e in range(El) for s in range(S) for p in range(P)]

    # ------------------------------------------------------------------ chunks
    def chunks(self, r: int) -> list["DispatchLayout"]:
        """This (whole-layer) layout cut into r chunks. Chunk i holds rows ``[(i c)//r, ((i+1) c)//r)``
        of every (source rank, physical slot) group of c rows, so every rank cuts every group the
        same way with no communication; r = 1 returns ``[self]``."""
        if r == 1:
            return [self]
        C, order, phys = self.counts_PSE, self.order_E, self.phys_PSK
        P, S, K = len(phys), len(phys[0]), len(order)
        El = K // P
        mine = range(self.ep_rank * El, (self.ep_rank + 1) * El)
        cut = lambda c, i: (i * c) // r
        own = phys[self.ep_rank][self.esp_rank]
        logical = C[self.ep_rank][self.esp_rank]
        src_start = [sum(logical[:e]) + a if e != FREE else 0
                     for e, (a, _) in zip(order, replica_shares(C, order, self.weights_K)[self.ep_rank][self.esp_rank])]
        # whole-layer expert-major order: blocks (slot, s, p)
        full_start, off = {}, 0
        for k in mine:
            for s in range(S):
                for p in range(P):
                    full_start[k, s, p] = off
                    off += phys[p][s][k]
        out = []
        for i in range(r):
            counts = [[[cut(c, i + 1) - cut(c, i) for c in row] for row in ps] for ps in C]
            ph = tuple(tuple(tuple(cut(c, i + 1) - cut(c, i) for c in row) for row in ps) for ps in phys)
            src = tuple((src_start[k] + cut(own[k], i), src_start[k] + cut(own[k], i + 1)) for k in range(K))
            full = tuple((full_start[k, s, p] + cut(phys[p][s][k], i), full_start[k, s, p] + cut(phys[p][s][k], i + 1))
                         for k in mine for s in range(S) for p in range(P))
            counts_t = tuple(tuple(tuple(row) for row in ps) for ps in counts)
            out.append(DispatchLayout.from_physical(counts_t, ph, self.ep_rank, self.esp_rank, order, src, full,
                                                    self.weights_K))
        return out

    def take_rows(self, x_ND: Tensor) -> Tensor:
        """The rows this layout sends, in send order (a view of x_ND for a whole layer)."""
        if len(self.src_ranges) == 1:
            a, b = self.src_ranges[0]
            return x_ND[a:b]
        return torch.cat([x_ND[a:b] for a, b in self.src_ranges])

    def place_rows(self, y_sent: Tensor, num_rows: int) -> Tensor:
        """Inverse of :meth:`take_rows` for a whole layer: [num_sent, D] -> [num_rows, D], the rows
        never sent (dropped assignments, at the end) are 0."""
        return assemble_rows([self], [y_sent], num_rows)


def assemble_rows(layouts: list[DispatchLayout], ys: list[Tensor], num_rows: int) -> Tensor:
    """Rows of layouts that together send each row of x_ND once (a layer's chunks), each in its
    ``src_ranges`` order -> [num_rows, D] in x_ND order; rows never sent (at the end) are 0."""
    if len(layouts) == 1 and len(layouts[0].src_ranges) == 1:
        y = ys[0]
    else:
        pieces = [(a, piece) for c, y in zip(layouts, ys)
                  for (a, b), piece in zip(c.src_ranges, torch.split(y, [b - a for a, b in c.src_ranges]))]
        y = torch.cat([piece for _, piece in sorted(pieces, key=lambda t: t[0])])
    return F.pad(y, (0, 0, 0, num_rows - y.shape[0]))


def _merged(ranges: tuple[Range, ...]) -> tuple[Range, ...]:
    """Adjacent ranges joined (a contiguous placement sends one range: a view, no copy)."""
    out: list[list[int]] = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1][1] = b
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out) or ((0, 0),)


def replica_shares(counts_PSE, order: tuple[int, ...], weights: tuple[int, ...] = ()
                   ) -> list[list[list[tuple[int, int]]]]:
    """How each source's rows for an expert are split among the expert's copies.

    counts_PSE: [P][S][E] rows by logical expert; order: the logical expert of each physical slot
    (``FREE`` = -1 for none); weights: the share weight of each physical slot (``()``: all 1).
    Returns [P][S][K]: (first row within the source's rows of that expert, rows) for every
    physical slot. An expert with n copies (its slots in physical order) cuts source q's c rows
    (q = p*S + s) into n pieces laid out in the order copy ``(k - q) % n`` at position k; the piece
    at position k starts at row ``c * W_k // W`` (W_k: the weights before it, W: all of e's), so
    copy i gets ``c * w_i / W`` rows up to one (even weights: the ``(i + q) % n``-th of n even
    pieces). The rotation spreads the rounding over the copies. Integer arithmetic only:
    every rank derives the same split from the same counts."""
    copy_of, n_of, w_of = [], {}, {}
    for k, e in enumerate(order):
        copy_of.append(n_of.get(e, 0))
        n_of[e] = n_of.get(e, 0) + 1
        w_of.setdefault(e, []).append(weights[k] if weights else 1)
    S = len(counts_PSE[0])
    out = []
    for p, ps in enumerate(counts_PSE):
        rows_S = []
        for s, row in enumerate(ps):
            q, slots = p * S + s, []
            for e, i in zip(order, copy_of):
                if e == FREE:
                    slots.append((0, 0))
                    continue
                n, c, w = n_of[e], row[e], w_of[e]
                piece = (i + q) % n
                if weights:
                    before = sum(w[(k - q) % n] for k in range(piece))
                    a, b = (before * c) // sum(w), ((before + w[i]) * c) // sum(w)
                else:
                    a, b = (piece * c) // n, ((piece + 1) * c) // n
                slots.append((a, b - a))
            rows_S.append(slots)
        out.append(rows_S)
    return out


def range_index(ranges: tuple[Range, ...], device) -> Tensor:
    """[sum of lengths] int64: the concatenated aranges of ``ranges``."""
    parts = [torch.arange(a, b, dtype=torch.int64) for a, b in ranges]
    return (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)).to(device)


def exchange_counts(tokens_per_expert_E: Tensor, group: ProcessGroup | None, ep: int, esp: int) -> list:
    """All-gather ``tokens_per_expert_E`` [E] over the moe group (ep*esp ranks, rank-major
    ``ep_rank*esp + esp_rank``); returns counts as nested lists [P][S][E] of ints."""
    E = tokens_per_expert_E.numel()
    counts = tokens_per_expert_E.to(torch.int64).contiguous()
    if ep * esp > 1:
        out = counts.new_empty(ep * esp * E)
        all_gather_base(out, counts, group=group)
        counts = out
    return counts.view(ep, esp, E).tolist()


def to_expert_major(x_GD: Tensor, layout: DispatchLayout) -> Tensor:
    """Gathered rows, blocks (s, p, e) -> blocks (e, s, p): each local expert's rows contiguous."""
    blocks = torch.split(x_GD, layout.block_sizes_rank_major)
    return torch.cat([blocks[i] for i in layout.expert_major_order])


def from_expert_major(y_GD: Tensor, layout: DispatchLayout) -> Tensor:
    """Inverse of :func:`to_expert_major`: blocks (e, s, p) -> blocks (s, p, e)."""
    order = layout.expert_major_order
    sizes = layout.block_sizes_rank_major
    blocks = torch.split(y_GD, [sizes[i] for i in order])
    position = {block: k for k, block in enumerate(order)}
    return torch.cat([blocks[position[i]] for i in range(len(order))])
