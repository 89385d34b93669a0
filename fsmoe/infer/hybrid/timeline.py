"""The hybrid engine's lane timeline: a Chrome trace (chrome://tracing, Perfetto) and a Gantt PNG
with one row per lane: the thread issuing the GPU work (waiting for a layer's token counts,
choosing the split, issuing the lanes, waiting for the CPU experts), the CPU experts, the PCIe
copies and the GPU compute."""
from __future__ import annotations

import json
from pathlib import Path

LANES = ("host", "cpu", "pcie", "gpu")
DEVICE_LANES = ("cpu", "pcie", "gpu")  # the lanes that do the experts' work (overlap_share)
NAMES = {"host": "GPU issuer", "cpu": "CPU experts", "pcie": "PCIe copies", "gpu": "GPU compute"}
COLORS = {"host": "#8c8c8c", "cpu": "#55a868", "pcie": "#dd8452", "gpu": "#4c72b0"}

Span = tuple[str, str, float, float]  # lane, label, t0 s, t1 s


def chrome_trace(spans: list[Span], path: Path) -> Path:
    events = [{"name": label, "cat": lane, "ph": "X", "pid": 0, "tid": LANES.index(lane) if lane in LANES else 9,
               "ts": t0 * 1e6, "dur": max(t1 - t0, 0.0) * 1e6} for lane, label, t0, t1 in spans]
    events += [{"name": "thread_name", "ph": "M", "pid": 0, "tid": i, "args": {"name": lane}}
               for i, lane in enumerate(LANES)]
    path = Path(path)
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    return path


def gantt_png(spans: list[Span], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 2.6))
    for y, lane in enumerate(LANES):
        for ln, _, t0, t1 in spans:
            if ln == lane:
                ax.barh(y, (t1 - t0) * 1e3, left=t0 * 1e3, height=0.8, color=COLORS[lane],
                        edgecolor="black", linewidth=0.2)
    ax.set_yticks(range(len(LANES)), [NAMES[lane] for lane in LANES], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def overlap_share(spans: list[Span]) -> float:
    """Share of the busy time during which at least two of the CPU, PCIe and GPU lanes are busy (0 =
    they never overlap)."""
    events = sorted((t, d, lane) for lane, _, t0, t1 in spans if t1 > t0 and lane in DEVICE_LANES
                    for t, d in ((t0, 1), (t1, -1)))
    open_by_lane: dict[str, int] = {}
    busy = both = 0.0
    prev = None
    for t, d, lane in events:
        if prev is not None:
            active = sum(1 for v in open_by_lane.values() if v > 0)
            busy += (t - prev) if active else 0.0
            both += (t - prev) if active >= 2 else 0.0
        open_by_lane[lane] = open_by_lane.get(lane, 0) + d
        prev = t
    return both / busy if busy else 0.0


def step_breakdown(spans: list[Span]) -> dict[str, float]:
    """Milliseconds of a recorded forward: its wall time, each lane's busy time, and the GPU
    issuer's time by what it did (summed over layers: ``host: wait for counts`` holds the GPU's
    work before a layer's routing is known, attention included)."""
    if not spans:
        return {}
    out = {"wall": (max(t1 for *_, t1 in spans) - min(t0 for _, _, t0, _ in spans)) * 1e3}
    for lane, label, t0, t1 in spans:
        key = lane if lane != "host" else "host: " + label.split(" ", 1)[-1]
        out[key] = out.get(key, 0.0) + (t1 - t0) * 1e3
    return {k: round(v, 3) for k, v in out.items()}
