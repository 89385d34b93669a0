"""HierD-ES: which pair of experts to swap so that the hierarchical dispatch gets faster.

Shape legend: T tokens of the whole group, K experts per token, E experts, P EP ranks, S stages,
L levels, C = 2 * S * P * L entries of a traffic vector (send and recv, ``fsmoe.comm.traffic``).

``Q[r, c]`` is the predicted dispatch + combine time after swapping experts r and c (their
slots), with the smooth max over ranks (``gamma``). Counting the traffic again for each of the
E^2 / 2 pairs costs O(E^2 T K); instead, per token, moving one of its experts from rank a to rank
b changes its traffic in at most four places per stage (HierMoE's four cases): the row towards
a's group disappears iff that expert was the token's only one there, and a row towards b's group
appears iff the token had none there yet (without dedup, both always). So

    G[e, b]  = sum over tokens routed to e of the change when e alone moves to rank b   [E, P, C]
    H[r, c]  = the same, restricted to tokens routed to both r and c, moving r to c's rank
    traffic after swapping r, c = base + G[r, rank c] + G[c, rank r] - H[r, c] - H[c, r]

(a token routed to both keeps its multiset of ranks: its change is 0, and H removes what G
counted for it). G costs O(S T K P), H O(S T K^2) with H kept sparse; the pairs are scored in
chunks. :func:`brute_force_scores` recounts every pair from scratch (the tests compare them).

The SmartMoE-style baseline (:func:`token_scores`) balances raw token counts per rank and
ignores that duplicates of a token to one group travel once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fsmoe.comm.topology import LevelCosts, Levels, Stage
from fsmoe.comm.traffic import count_traffic, crossed_level, soft_max, stage_times
from fsmoe.placement.placement import Placement


@dataclass(frozen=True)
class SwapChoice:
    """The best swap (r, c), the predicted seconds before and after it, and the scores [E, E]
    (inf where a swap changes nothing: same rank, or r == c)."""

    pair: tuple[int, int] | None
    before_s: float
    after_s: float
    scores_EE: Tensor


def rank_of(placement: Placement) -> Tensor:
    """[E] EP rank of each expert."""
    return torch.tensor([placement.rank_of(e) for e in range(placement.num_experts)], dtype=torch.int64)


def _dest(ids_TK: Tensor, ranks_E: Tensor) -> Tensor:
    return torch.where(ids_TK >= 0, ranks_E[ids_TK.clamp(min=0)], -1)


def predicted(ids_TK, src_T, ranks_E, levels, stages, costs, row_bytes, gamma, dedup=True) -> float:
    tr = count_traffic(_dest(ids_TK, ranks_E), src_T, levels, stages, dedup)
    return 2.0 * float(stage_times(tr.send, tr.recv, stages, levels, costs, row_bytes, gamma).sum())


def _row_entries(levels: Levels, si: int, stage: Stage, g: Tensor, src: Tensor, L: int) -> tuple[Tensor, Tensor]:
    """Flat indices into a traffic vector [2, S, P, L] (send half, recv half) of the row a token
    from ``src`` sends towards group ``g`` at stage ``si``; -1 where it crosses no link."""
    S_P = levels.ranks
    s_first, s_last, width = levels.stride(stage.first - 1), levels.stride(stage.last), levels.stage_size(stage)
    sender = (g // width) * s_first + src % s_first
    receiver = g * s_last + src % s_last
    lvl = crossed_level(levels, sender, receiver)
    send = ((si * S_P + sender) * L + lvl)
    recv = ((si * S_P + receiver) * L + lvl)
    return torch.where(lvl >= 0, send, -1), torch.where(lvl >= 0, recv, -1)


def _deltas(ids_TK, src_T, ranks_E, levels, stages, dedup, b_TKB: Tensor):
    """For every valid (t, k) and target rank b (``b_TKB`` [T, K, B]): the traffic entries that
    change when t's k-th expert alone moves to b. Returns (flat entry [M], sign [M], t, k, j) where
    j indexes the last dim of ``b_TKB``; entries in a vector of C = 2 * S * P * L (send, then recv)."""
    T, K = ids_TK.shape
    B = b_TKB.shape[2]
    P, L = levels.ranks, max(levels.depth, 1)
    half = len(stages) * P * L
    dest = _dest(ids_TK, ranks_E)
    valid = dest >= 0
    out_idx, out_sign, out_pos = [], [], []
    pos = torch.arange(T * K * B).view(T, K, B)
    src_TKB = src_T.view(T, 1, 1).expand(T, K, B)
    for si, stage in enumerate(stages):
        s_last = levels.stride(stage.last)
        groups = P // s_last
        g_TK = torch.where(valid, dest // s_last, groups)  # invalid -> an extra column
        mult = torch.zeros(T, groups + 1, dtype=torch.int64)
        mult.scatter_add_(1, g_TK, torch.ones_like(g_TK))
        ga = g_TK.unsqueeze(2).expand(T, K, B)
        gb = b_TKB // s_last
        moved = valid.unsqueeze(2) & (ga != gb)
        if dedup:
            lose = moved & (mult.gather(1, g_TK).unsqueeze(2) == 1)
            gain = moved & (mult.gather(1, gb.reshape(T, -1)).view(T, K, B) == 0)
        else:
            lose = gain = moved
        for mask, g, sign in ((lose, ga, -1), (gain, gb, 1)):
            g_m, src_m = g[mask], src_TKB[mask]
            send, recv = _row_entries(levels, si, stage, g_m, src_m, L)
            for idx in (send, torch.where(recv >= 0, recv + half, -1)):
                keep = idx >= 0
                out_idx.append(idx[keep])
                out_sign.append(torch.full((int(keep.sum()),), sign, dtype=torch.int64))
                out_pos.append(pos[mask][keep])
    return torch.cat(out_idx), torch.cat(out_sign), torch.cat(out_pos)


def hierd_scores(ids_TK: Tensor, src_T: Tensor, placement: Placement, levels: Levels, stages: tuple[Stage, ...],
                 costs: LevelCosts, row_bytes: int, gamma: float | None = 10.0, dedup: bool = True,
                 chunk_entries: int = 1 << 23) -> SwapChoice:
    """Q[r, c] for every pair by the incremental update (see module docstring); ids_TK [T, K]
    expert ids of every token of the group (-1: none), src_T [T] their EP ranks."""
    ids_TK, src_T = ids_TK.cpu(), src_T.cpu()
    T, K = ids_TK.shape
    E, P, L = placement.num_experts, levels.ranks, max(levels.depth, 1)
    S = len(stages)
    C = 2 * S * P * L
    ranks = rank_of(placement)
    dest = _dest(ids_TK, ranks)
    base_tr = count_traffic(dest, src_T, levels, stages, dedup)
    base = torch.cat([base_tr.send.flatten(), base_tr.recv.flatten()])
    # G[e, b]: every (t, k) moved to every rank b
    b_all = torch.arange(P).view(1, 1, P).expand(T, K, P)
    idx, sign, pos = _deltas(ids_TK, src_T, ranks, levels, stages, dedup, b_all)
    t, k, b = pos // (K * P), (pos // P) % K, pos % P
    e = ids_TK[t, k]
    G = torch.zeros(E * P * C, dtype=torch.int64)
    G.index_put_(((e * P + b) * C + idx,), sign, accumulate=True)
    G = G.view(E, P, C)
    # H[r, c] for tokens routed to both: r (slot k) moved to the rank of c (slot j), sparse
    b_pairs = dest.clamp(min=0).unsqueeze(1).expand(T, K, K).clone()  # [t, k, j] = rank of slot j
    idx, sign, pos = _deltas(ids_TK, src_T, ranks, levels, stages, dedup, b_pairs)
    t, k, j = pos // (K * K), (pos // K) % K, pos % K
    keep = (j != k) & (ids_TK[t, j] >= 0)
    r, c = ids_TK[t[keep], k[keep]], ids_TK[t[keep], j[keep]]
    lo, hi = torch.minimum(r, c), torch.maximum(r, c)
    h_key, h_idx, h_val = lo * E + hi, idx[keep], sign[keep]
    scores = torch.full((E, E), float("inf"), dtype=torch.float64)
    rows = max(1, chunk_entries // (E * C))
    for r0 in range(0, E, rows):
        r1 = min(E, r0 + rows)
        rr = torch.arange(r0, r1)
        tr = base + G[rr][:, ranks] + G[:, ranks[rr]].transpose(0, 1)  # [rc, E, C]
        sel = (h_key // E >= r0) & (h_key // E < r1)
        flat = tr.view(-1)
        flat.index_put_((((h_key[sel] // E - r0) * E + h_key[sel] % E) * C + h_idx[sel],), -h_val[sel],
                        accumulate=True)
        tr = tr.view(r1 - r0, E, 2, S, P, L)
        q = 2.0 * stage_times(tr[:, :, 0], tr[:, :, 1], stages, levels, costs, row_bytes, gamma).sum(-1)
        upper = rr.view(-1, 1) < torch.arange(E).view(1, -1)
        moved = ranks[rr].view(-1, 1) != ranks.view(1, -1)
        scores[r0:r1] = torch.where(upper & moved, q, torch.inf)
    scores = torch.minimum(scores, scores.t())
    before = 2.0 * float(stage_times(base_tr.send, base_tr.recv, stages, levels, costs, row_bytes, gamma).sum())
    return _best(scores, before)


def brute_force_scores(ids_TK, src_T, placement, levels, stages, costs, row_bytes, gamma=10.0, dedup=True
                       ) -> SwapChoice:
    """Q by recounting the traffic of every swapped placement (O(E^2 T K)); for tests."""
    E = placement.num_experts
    ranks = rank_of(placement)
    scores = torch.full((E, E), float("inf"), dtype=torch.float64)
    for r in range(E):
        for c in range(r + 1, E):
            if ranks[r] != ranks[c]:
                q = predicted(ids_TK, src_T, rank_of(placement.swap(r, c)), levels, stages, costs, row_bytes, gamma,
                              dedup)
                scores[r, c] = scores[c, r] = q
    return _best(scores, predicted(ids_TK, src_T, ranks, levels, stages, costs, row_bytes, gamma, dedup))


def token_scores(ids_TK: Tensor, placement: Placement, gamma: float | None = 10.0) -> SwapChoice:
    """SmartMoE-style: the smooth max over ranks of raw assignments per rank after each swap
    (duplicates counted; no topology). Scores are in assignments, not seconds."""
    E, P = placement.num_experts, placement.ranks
    ranks = rank_of(placement)
    valid = ids_TK >= 0
    n_E = torch.bincount(ids_TK[valid], minlength=E).to(torch.float64)
    load_P = torch.zeros(P, dtype=torch.float64).index_add(0, ranks, n_E)
    after = load_P.view(1, 1, P).repeat(E, E, 1)
    rr, cc = torch.meshgrid(torch.arange(E), torch.arange(E), indexing="ij")
    diff = (n_E[cc] - n_E[rr])  # rank of r gains c's tokens and loses r's
    after[rr, cc, ranks[rr]] += diff
    after[rr, cc, ranks[cc]] -= diff
    scores = soft_max(after, gamma)
    scores = torch.where(ranks.view(-1, 1) != ranks.view(1, -1), scores, torch.inf)
    return _best(scores, float(soft_max(load_P, gamma)))


def _best(scores: Tensor, before: float) -> SwapChoice:
    flat = int(torch.argmin(scores))
    r, c = divmod(flat, scores.shape[1])
    after = float(scores[r, c])
    if not after < before:
        return SwapChoice(None, before, before, scores)
    return SwapChoice((min(r, c), max(r, c)), before, after, scores)
