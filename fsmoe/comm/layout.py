"""DispatchLayout: every split size a sharded dispatch needs, from one exchange of counts.

Shape legend: P ranks of the EP group, S ranks of the ESP group, E global experts, El = E/P
local experts (expert ids ``[p*El, (p+1)*El)`` live on EP rank p), D model dim.

Counts are exchanged first: each rank of the ``moe`` group (the P*S ranks that trade tokens)
all-gathers every rank's ``tokens_per_expert_E``, giving ``counts[p, s, e]`` = rows that the
rank at (ep_rank p, esp_rank s) sends to expert e. From that matrix every rank derives, with no
further communication:

    EP AlltoAll  (group: same s)   send to p:   sum_{e of p} counts[me_p, me_s, e]
                                   recv from p: sum_{e mine} counts[p, me_s, e], blocks [p][e]
    ESP AllGather (group: same p)  rank s holds sum_{p, e mine} counts[p, s, e], blocks [s][p][e]
    Expert input                   regrouped [e][s][p]; tokens of local expert e =
                                   sum_{p, s} counts[p, s, e]

The counts become Python ints (one host sync per layer and direction-pair), as any uneven
AlltoAll needs. A hierarchical backend would add node-level sums of the same matrix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fsmoe.comm.functional import all_gather_base


@dataclass(frozen=True)
class DispatchLayout:
    """Split sizes for one dispatch on one rank; all plain ints (no tensors, no device).

    num_sent: rows of x_ND this rank sends (its kept assignments; dropped rows are not sent).
    send_splits_P / recv_splits_P: EP AlltoAll row counts to / from each EP peer.
    gather_sizes_S: rows each ESP peer holds after the AlltoAll (the uneven AllGather sizes).
    blocks_SPEl: rows in the gathered buffer, block (s, p, e) in that (rank-major) order.
    tokens_per_local_expert_El: rows of each local expert after regrouping, summed over s, p.
    """

    num_sent: int
    send_splits_P: tuple[int, ...]
    recv_splits_P: tuple[int, ...]
    gather_sizes_S: tuple[int, ...]
    blocks_SPEl: tuple[tuple[tuple[int, ...], ...], ...]
    tokens_per_local_expert_El: tuple[int, ...]

    @staticmethod
    def from_counts(counts_PSE: list, ep_rank: int, esp_rank: int) -> "DispatchLayout":
        """counts_PSE: nested lists [P][S][E] of ints (see module docstring)."""
        P, S, E = len(counts_PSE), len(counts_PSE[0]), len(counts_PSE[0][0])
        El = E // P
        mine = range(ep_rank * El, (ep_rank + 1) * El)
        own = counts_PSE[ep_rank][esp_rank]
        send = tuple(sum(own[q * El:(q + 1) * El]) for q in range(P))
        recv = tuple(sum(counts_PSE[p][esp_rank][e] for e in mine) for p in range(P))
        blocks = tuple(tuple(tuple(counts_PSE[p][s][e] for e in mine) for p in range(P)) for s in range(S))
        gather = tuple(sum(map(sum, blocks[s])) for s in range(S))
        per_expert = tuple(sum(blocks[s][p][j] for s in range(S) for p in range(P)) for j in range(El))
        return DispatchLayout(sum(own), send, recv, gather, blocks, per_expert)

    @property
    def block_sizes_rank_major(self) -> list[int]:
        """Block sizes in gathered order (s, p, e)."""
        return [n for s in self.blocks_SPEl for p in s for n in p]

    @property
    def expert_major_order(self) -> list[int]:
        """Indices of the (s, p, e) blocks listed in (e, s, p) order."""
        S, P, El = len(self.blocks_SPEl), len(self.blocks_SPEl[0]), len(self.tokens_per_local_expert_El)
        return [(s * P + p) * El + e for e in range(El) for s in range(S) for p in range(P)]


def exchange_counts(tokens_per_expert_E: Tensor, group, ep: int, esp: int) -> list:
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
