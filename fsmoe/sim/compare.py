"""Performance per dollar of fabrics, from ``fsmoe simulate cluster --json`` results.

perf/$ of a fabric = (1 / step time) / network dollars per GPU, divided by the same of the
reference fabric (``leaf-spine``, a fat-tree) for the same model and NIC speed, as mFabric
(MixNet, SIGCOMM'25) reports it: 1.9-2.3x at 400G and 1.2-1.5x at 100G for 1024 GPUs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PAPER_MFABRIC = {100.0: (1.2, 1.5), 400.0: (1.9, 2.3)}  # perf/$ over a fat-tree, 1024 GPUs


@dataclass(frozen=True)
class PerfPerDollar:
    config: str
    fabric: str
    nic_gbps: float
    step_ms: float
    usd_per_gpu: float
    vs_reference: float  # perf/$ over the reference fabric's, same config and NIC


def load_results(paths: list[Path]) -> list[dict]:
    """Every ``fsmoe simulate cluster --json`` report among ``paths`` (files or directories)."""
    files = [f for p in paths for f in (sorted(Path(p).glob("*.json")) if Path(p).is_dir() else [Path(p)])]
    reps = []
    for f in files:
        try:
            reps.append(json.loads(f.read_text()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            from fsmoe.config import ConfigError

            raise ConfigError("results", str(f),
                              f"must be a readable `fsmoe simulate cluster --json` report ({e})") from None
    return [r for r in reps if isinstance(r, dict)
            and {"config", "fabric", "nic_gbps", "network_usd_per_gpu", "results"} <= set(r)]


def perf_per_dollar(reports: list[dict], policy: str = "default", reference: str = "leaf-spine") -> list[PerfPerDollar]:
    """One row per report that has a reference (same config and NIC speed), reference rows included."""
    def step(rep: dict) -> float:
        rows = [r for r in rep["results"] if r["policy"] == policy] or rep["results"][:1]
        return rows[0]["iteration_ms"]

    def ppd(rep: dict) -> float:
        return 1.0 / (step(rep) * rep["network_usd_per_gpu"])

    refs = {(r["config"], r["nic_gbps"]): r for r in reports if r["fabric"].lower().startswith(reference)}
    out = []
    for rep in reports:
        ref = refs.get((rep["config"], rep["nic_gbps"]))
        if ref is not None:
            out.append(PerfPerDollar(rep["config"], rep["fabric"], rep["nic_gbps"], step(rep),
                                     rep["network_usd_per_gpu"], ppd(rep) / ppd(ref)))
    return sorted(out, key=lambda r: (r.config, r.nic_gbps, r.fabric))


def plot_perf_per_dollar(rows: list[PerfPerDollar], png: str, reference: str = "leaf-spine") -> None:
    """Grouped bars: each model's perf/$ of every fabric over the reference, one panel per NIC
    speed, with the band mFabric reports for its fabric over a fat-tree."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speeds = sorted({r.nic_gbps for r in rows})
    fabrics = sorted({r.fabric for r in rows if not r.fabric.lower().startswith(reference)})
    configs = sorted({r.config for r in rows})
    fig, axes = plt.subplots(1, len(speeds), figsize=(5.5 * len(speeds), 3.6), sharey=True, squeeze=False)
    width = 0.8 / max(1, len(fabrics))
    for ax, speed in zip(axes[0], speeds):
        if speed in PAPER_MFABRIC:
            lo, hi = PAPER_MFABRIC[speed]
            ax.axhspan(lo, hi, color="#c44e52", alpha=0.15, label=f"mFabric paper {lo}-{hi}x")
        ax.axhline(1.0, color="k", linewidth=0.8)
        for j, fabric in enumerate(fabrics):
            vals = {r.config: r.vs_reference for r in rows if r.nic_gbps == speed and r.fabric == fabric}
            xs = [i + (j - (len(fabrics) - 1) / 2) * width for i in range(len(configs))]
            ax.bar(xs, [vals.get(c, 0.0) for c in configs], width, label=fabric)
        ax.set_xticks(range(len(configs)), configs, rotation=20, fontsize=8)
        ax.set_title(f"{speed:g}G NICs", fontsize=10)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(f"perf/$ over {reference}")
    fig.suptitle("Simulated performance per network dollar (fsmoe simulate cluster)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
