"""PNG plots of a run, drawn from its ``metrics.jsonl`` records (matplotlib, no pyplot state).

Shape legend: E experts of one MoE layer, S logged steps.

- ``loss.png``: train and validation loss against step, with the val loss of byte frequencies
  alone (unigram) as a horizontal line (a model that ignores context cannot go below it).
- ``expert_load.png``: one heatmap per MoE layer, experts x steps, colour = share of the
  step's assignments that went to the expert.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure


def plot_loss(records: list[dict[str, Any]], unigram_nats: float, path: Path) -> Path:
    """Train loss of every record and val_loss where present, vs step; returns ``path``."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", color="tab:orange")
    ax.axhline(unigram_nats, color="gray", linestyle="--",
               label=f"byte frequencies alone {unigram_nats:.2f} nats ({unigram_nats / math.log(2):.2f} bits)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per byte)")
    ax.set_title("fsmoe training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_expert_load(records: list[dict[str, Any]], path: Path) -> Path:
    """One heatmap per MoE layer of ``expert_load`` over the logged steps; returns ``path``."""
    logged = [r for r in records if r.get("expert_load")]
    num_layers = len(logged[0]["expert_load"]) if logged else 0
    fig = Figure(figsize=(8, 1.0 + 1.8 * max(num_layers, 1)), layout="constrained")
    if not logged:
        fig.text(0.5, 0.5, "no expert-load records", ha="center")
        fig.savefig(path, dpi=110)
        return Path(path)
    steps = [r["step"] for r in logged]
    axes = fig.subplots(num_layers, 1, squeeze=False, sharex=True)[:, 0]
    for m, ax in enumerate(axes):
        load_ES = [list(col) for col in zip(*(r["expert_load"][m] for r in logged))]
        num_experts = len(load_ES)
        image = ax.imshow(load_ES, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, num_experts - 0.5), vmin=0)
        ax.set_ylabel(f"MoE layer {m}\nexpert")
        fig.colorbar(image, ax=ax, label="share of tokens")
    axes[-1].set_xlabel("step")
    fig.suptitle("expert load per MoE layer (balanced = 1/E per expert)")
    fig.savefig(path, dpi=110)
    return Path(path)
