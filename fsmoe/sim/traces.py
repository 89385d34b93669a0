"""What a routing trace says about the network: mFabric's three observations, measured on our
own traces (``fsmoe train --trace``) — traffic changes over time, is sparse, and is local.

Per step and MoE layer the trace holds source rank x expert rows; with the static placement
(expert e on EP rank e // (E / P)) that is a [P, P] EP-rank traffic matrix. From it:

* change: the total-variation distance between consecutive steps' matrices, each normalised to
  sum 1 (0 = the same pattern, 1 = disjoint), averaged over layers;
* sparsity: the share of off-rank (source, destination) pairs that together carry 80% of the
  off-rank rows (small = a few pairs dominate), averaged over layers;
* locality: the share of rows that stay on the source's rank, and within its node of
  ``gpus_per_node`` ranks.

A single-process trace (one source) is read as if its tokens came evenly from the P ranks.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from fsmoe.config import ConfigError


@dataclass(frozen=True)
class TraceSummary:
    """Per-step series ([N] or [N - 1] for change) and their means; see the module docstring."""

    steps: list[int]
    layers: int
    ranks: int
    gpus_per_node: int
    change: list[float]
    sparsity: list[float]
    on_rank: list[float]
    in_node: list[float]

    def means(self) -> dict[str, float]:
        def m(x):
            return float(np.mean(x)) if len(x) else float("nan")

        return {"change": m(self.change), "sparsity": m(self.sparsity), "on_rank": m(self.on_rank),
                "in_node": m(self.in_node)}

    def to_json(self) -> dict:
        return {**asdict(self), "means": self.means()}


def rank_matrices(counts_NMRE: np.ndarray, source_ep_rank: list[int] | None, ranks: int) -> np.ndarray:
    """[N, M, P, P] rows EP rank p sent EP rank q under the static placement."""
    N, M, R, E = counts_NMRE.shape
    if ranks < 1 or E % ranks:
        raise ConfigError("--ep", ranks, f"must divide the trace's {E} experts")
    to_rank = counts_NMRE.reshape(N, M, R, ranks, E // ranks).sum(-1).astype(np.float64)  # [N, M, R, P]
    if R == 1:  # one process: its tokens spread evenly over the P source ranks
        return np.broadcast_to(to_rank / ranks, (N, M, ranks, ranks)).copy()
    src = np.asarray(source_ep_rank if source_ep_rank is not None else np.arange(R)) % ranks
    out = np.zeros((N, M, ranks, ranks))
    np.add.at(out, (slice(None), slice(None), src), to_rank)
    return out


def summarize(counts_NMRE: np.ndarray, steps, ranks: int, gpus_per_node: int = 1,
              source_ep_rank: list[int] | None = None, top_share: float = 0.8) -> TraceSummary:
    if gpus_per_node < 1 or ranks % gpus_per_node:
        raise ConfigError("--gpus-per-node", gpus_per_node, f"must be >= 1 and divide --ep={ranks}")
    T = rank_matrices(counts_NMRE, source_ep_rank, ranks)  # [N, M, P, P]
    N, M = T.shape[:2]
    total = T.sum(axis=(2, 3), keepdims=True)
    share = np.divide(T, total, out=np.zeros_like(T), where=total > 0)
    change = 0.5 * np.abs(np.diff(share, axis=0)).sum(axis=(2, 3)).mean(axis=1) if N > 1 else np.zeros(0)
    eye = np.eye(ranks, dtype=bool)
    node = np.arange(ranks) // gpus_per_node
    same_node = node[:, None] == node[None, :]
    rows = np.maximum(total[..., 0, 0], 1e-12)
    on_rank = (T[..., eye].sum(-1) / rows).mean(axis=1)
    in_node = (T[..., same_node].sum(-1) / rows).mean(axis=1)
    off = np.sort(T[..., ~eye], axis=-1)[..., ::-1]  # [N, M, P(P-1)] largest first
    cum = np.cumsum(off, axis=-1)
    need = top_share * cum[..., -1:]
    pairs = (cum < need).sum(-1) + 1  # pairs needed to carry top_share of the off-rank rows
    sparsity = np.where(cum[..., -1] > 0, pairs / off.shape[-1], 0.0).mean(axis=1)
    return TraceSummary([int(s) for s in steps], M, ranks, gpus_per_node, change.tolist(), sparsity.tolist(),
                        on_rank.tolist(), in_node.tolist())


def plot_summary(summary: TraceSummary, png: str, title: str = "") -> None:
    """The three series against step, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    s = summary.steps
    axes[0].plot(s[1:], summary.change)
    axes[0].set_title("change: TV distance to the previous step", fontsize=9)
    axes[1].plot(s, summary.sparsity)
    axes[1].set_title("sparsity: share of rank pairs carrying 80%", fontsize=9)
    axes[2].plot(s, summary.on_rank, label="on the source rank")
    if summary.gpus_per_node > 1:
        axes[2].plot(s, summary.in_node, label=f"in its node ({summary.gpus_per_node} ranks)")
    axes[2].set_title("locality: share of rows", fontsize=9)
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylim(0, 1.02)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def spread_per_token(choices_NMSK: np.ndarray, num_experts: int, ranks: int, gpus_per_node: int = 1
                     ) -> dict[str, float]:
    """Over a trace's sampled tokens (their k experts chosen together, dropped ones left out): the
    mean number of distinct EP ranks and of distinct nodes (``gpus_per_node`` ranks each) a token's
    experts live on under the static placement. k over these is what sending a token once per
    rank (or node) instead of once per expert saves: HierMoE's deduplication."""
    ids = choices_NMSK.reshape(-1, choices_NMSK.shape[-1])
    ids = ids[(ids < num_experts).all(1)]
    if not len(ids):
        return {}
    rank = ids // (num_experts // ranks)
    node = rank // gpus_per_node
    distinct = lambda a: float(np.mean([len(set(r)) for r in a.tolist()]))
    return {"k": int(ids.shape[1]), "ranks_per_token": distinct(rank), "nodes_per_token": distinct(node),
            "tokens": int(len(ids))}

