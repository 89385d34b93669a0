"""Timelines: the start/end of every scheduled op per rank, measured or predicted.

An :class:`OpRecord` is one op on one lane of one rank. The executor's engines append measured
records; :class:`~fsmoe.schedule.model.engine.SimEngine` produces predicted ones for the same program.
This file turns them into a Chrome trace (``chrome://tracing`` / Perfetto: pid = rank,
tid = lane), a Gantt PNG (measured above predicted), an ASCII Gantt for ``fsmoe plan --explain``,
a per-op predicted-vs-measured table (``fsmoe train --timeline``: ``timeline_ops.csv``), and
the op records themselves (``timeline_records.jsonl``: a header line, then one record per line
with its iteration), which ``fsmoe profile --refit`` reads.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from fsmoe.schedule.types import COMPUTE_LANE, Op, OpRecord

LANE_ORDER = ("compute", "intra", "inter")
NOT_SCHEDULED = ("block", "glue", "counts")  # kinds outside the per-op error of the scheduled ops
COLORS = {"a2a_dispatch": "#4c72b0", "a2a_combine": "#55a8d8", "allgather": "#dd8452", "reducescatter": "#c44e52",
          "expert": "#55a868", "allreduce": "#8172b3", "dense": "#937860", "counts": "#999999",
          "glue": "#cccccc"}


def shift(records: Sequence[OpRecord], t: float) -> list[OpRecord]:
    return [OpRecord(r.op, r.lane, r.rank, r.t0 - t, r.t1 - t) for r in records]


def span(records: Sequence[OpRecord]) -> float:
    return max(r.t1 for r in records) - min(r.t0 for r in records) if records else 0.0


# ---------------------------------------------------------------------------- outputs


def chrome_trace(records: Iterable[OpRecord], path: str | Path, predicted: Iterable[OpRecord] = ()) -> Path:
    """Chrome trace JSON: one process per rank (measured) and one per rank for the prediction."""
    events = []
    for pid_base, recs, tag in ((0, records, "measured"), (1000, predicted, "predicted")):
        seen = set()
        for r in recs:
            pid = pid_base + r.rank
            if pid not in seen:
                seen.add(pid)
                events.append({"name": "process_name", "ph": "M", "pid": pid,
                               "args": {"name": f"rank {r.rank} ({tag})"}})
            events.append({"name": r.op.label, "cat": r.op.kind, "ph": "X", "pid": pid, "tid": r.lane,
                           "ts": r.t0 * 1e6, "dur": max(r.dur, 0.0) * 1e6,
                           "args": {"key": r.op.key, "n": r.op.n}})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    return path


def gantt_png(records: Sequence[OpRecord], path: str | Path, predicted: Sequence[OpRecord] = (),
              title: str = "") -> Path:
    """Gantt chart: one row per (rank, lane); measured rows on top, predicted rows (hatched) below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: list[tuple[str, Sequence[OpRecord], bool]] = []
    for tag, recs, pred in (("", records, False), ("pred ", predicted, True)):
        for rank in sorted({r.rank for r in recs}):
            for lane in LANE_ORDER:
                sel = [r for r in recs if r.rank == rank and r.lane == lane]
                if sel:
                    rows.append((f"{tag}r{rank} {lane}", sel, pred))
    fig, ax = plt.subplots(figsize=(12, 0.35 * len(rows) + 1.2))
    for y, (_, sel, pred) in enumerate(rows):
        for r in sel:
            ax.barh(y, r.dur * 1e3, left=r.t0 * 1e3, height=0.8, color=COLORS.get(r.op.kind, "#cccccc"),
                    edgecolor="black", linewidth=0.3, hatch="//" if pred else None)
    ax.set_yticks(range(len(rows)), [name for name, _, _ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_title(title, fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    ax.legend(handles, list(COLORS), fontsize=6, ncol=4, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def ascii_gantt(records: Sequence[OpRecord], width: int = 96, rank: int | None = None) -> str:
    """Text Gantt of one rank's lanes; each op drawn with the first letter of its kind."""
    recs = [r for r in records if rank is None or r.rank == rank]
    if not recs:
        return "(empty)"
    t0 = min(r.t0 for r in recs)
    total = max(r.t1 for r in recs) - t0 or 1e-12
    letter = {"a2a_dispatch": "D", "a2a_combine": "C", "allgather": "G", "reducescatter": "S", "expert": "X",
              "allreduce": "R", "dense": "d", "counts": "."}
    lines = []
    for lane in LANE_ORDER:
        row = [" "] * width
        for r in recs:
            if r.lane != lane:
                continue
            a = int((r.t0 - t0) / total * width)
            b = max(a + 1, int((r.t1 - t0) / total * width))
            for k in range(a, min(b, width)):
                row[k] = letter.get(r.op.kind, "?")
        lines.append(f"  {lane:>7} |{''.join(row)}|")
    lines.append(f"  {'':>7}  0{'':>{width - 12}}{total * 1e3:9.3f} ms")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- prediction error


def with_glue(records: Sequence[OpRecord]) -> list[OpRecord]:
    """Replace every block span (kind ``block``) by a ``glue`` op on the compute lane lasting the
    part of the span that no recorded op of that rank covers, the gradient AllReduce excepted:
    the router, Order and I-Order, norms, residuals, route building and Python between the
    scheduled ops. Its key and size are the block's (``glue_fwd@<LayerSpec.glue_tag>``, tokens).
    The glue record starts with the block; only its duration is meaningful."""
    rest = [r for r in records if r.op.kind != "block"]
    out = list(rest)
    for b in (r for r in records if r.op.kind == "block"):
        spans = sorted((max(r.t0, b.t0), min(r.t1, b.t1)) for r in rest
                       if r.rank == b.rank and r.op.kind != "allreduce" and r.t1 > b.t0 and r.t0 < b.t1)
        covered, end = 0.0, b.t0
        for t0, t1 in spans:  # length of the union of the intervals
            covered += max(0.0, t1 - max(t0, end))
            end = max(end, t1)
        glue = max(0.0, b.dur - covered)
        out.append(OpRecord(Op("glue", b.op.phase, b.op.layer, 0, b.op.key, b.op.n), COMPUTE_LANE, b.rank,
                            b.t0, b.t0 + glue))
    return out


OP_IDENTITY = ("key", "kind", "phase", "layer", "chunk", "rank")


def timed_ops(iterations: Sequence[Sequence[OpRecord]], peers) -> dict[tuple, list[tuple[float, float]]]:
    """Op identity (:data:`OP_IDENTITY`) -> [(n, effective seconds)], one per iteration it ran in,
    for every keyed op (glue derived from the block spans). The size is not part of the identity:
    in training the routing, hence the rows of the combine AlltoAll, the AllGather and the
    expert, changes every step."""
    out: dict[tuple, list[tuple[float, float]]] = {}
    for recs in iterations:
        for r, d in effective_durations(with_glue(recs), peers):
            if r.op.key and r.op.n > 0 and d > 0:
                out.setdefault((r.op.key, r.op.kind, r.op.phase, r.op.layer, r.op.chunk, r.rank), []).append((r.op.n, d))
    return out


def refit_samples(iterations: Sequence[Sequence[OpRecord]], peers) -> list[tuple[str, float, float]]:
    """``(key, n, effective seconds)`` of every run of every keyed op: what ``profile.refit``
    learns from."""
    return [(k[0], n, d) for k, nts in timed_ops(iterations, peers).items() for n, d in nts]


def write_records(path: str | Path, iterations: Sequence[Sequence[OpRecord]], header: dict) -> Path:
    """``header`` (e.g. the layout) as the first line, then every record with its iteration."""
    lines = [json.dumps({"header": header, "iterations": len(iterations)})]
    lines += [json.dumps({**r.to_dict(), "iter": i}) for i, recs in enumerate(iterations) for r in recs]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def read_records(path: str | Path) -> tuple[dict, list[list[OpRecord]]]:
    """(header, iterations) of a :func:`write_records` file; a file without a header line is one
    iteration. ValueError names the line that is not a record."""
    header, its = {}, {}
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            if i == 1 and "header" in d:
                header = d["header"]
                continue
            its.setdefault(int(d.get("iter", 0)), []).append(OpRecord.from_dict(d))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"line {i} is not an op record {{kind, phase, layer, chunk, key, n, lane, rank, t0, t1}}"
                             f" ({e!r}): {line[:80]}") from None
    return header, [its[k] for k in sorted(its)]


def effective_durations(records: Sequence[OpRecord], peers) -> list[tuple[OpRecord, float]]:
    """Durations as the cost model means them. ``records``: one iteration, every rank;
    ``peers(kind, rank)``: the ranks of that op's group. A collective cannot progress before its
    last participant arrives, so it is timed from the latest start in its group to this rank's
    end (a rank that came early waited, it did not communicate)."""
    by_op = {(r.op.kind, r.op.phase, r.op.layer, r.op.chunk, r.rank): r for r in records}
    out = []
    for (kind, phase, layer, chunk, rank), r in by_op.items():
        starts = [by_op[(kind, phase, layer, chunk, p)].t0 for p in peers(kind, rank)
                  if (kind, phase, layer, chunk, p) in by_op]
        out.append((r, r.t1 - max(starts + [r.t0])))
    return out
