"""``fsmoe trace summary``: what a routing trace (``fsmoe train --trace``) says about the network
traffic of expert parallelism: how fast it changes, how sparse it is, how local it is, and the
step's op timings. ``fsmoe trace check``: each traced op beside what a profile predicts for it.

    fsmoe trace summary runs/tiny/routing_trace.jsonl.gz --ep 8 --gpus-per-node 4 --plot trace.png
    fsmoe trace check runs/tiny/routing_trace.jsonl.gz --profile profile.json

See docs/simulation.md ("Routing traces").
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from fsmoe.cli.arg_types import output_file, plot_file


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("trace", help="summarise routing traces recorded by `fsmoe train --trace`",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="trace_command", metavar="WHAT", required=True)
    s = sub.add_parser("summary", help="change over time, sparsity and locality of the EP traffic",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("path", help="routing_trace.jsonl.gz")
    s.add_argument("--ep", type=int, default=None, help="EP ranks to read it for (default: the run's EP)")
    s.add_argument("--gpus-per-node", type=int, default=1, help="ranks per node, for the in-node share")
    s.add_argument("--plot", type=plot_file, default=None, help="draw the three series to this PNG")
    s.add_argument("--json", type=output_file, default=None, help="write the series and their means here")
    s.set_defaults(func=run_summary)
    c = sub.add_parser("check", help="each traced op's time beside the performance model's prediction",
                       description="Each MoE op timed in a routing trace (rank 0; forward and backward) beside "
                                   "what a measured profile predicts for the run's shapes and layout "
                                   "(fsmoe.sim.op_check; see docs/simulation.md).")
    c.add_argument("path", help="routing_trace.jsonl.gz of a run (its config.json beside it)")
    c.add_argument("--profile", required=True, help="a Profile (fsmoe profile) of the run's layout and hardware")
    c.add_argument("--json", type=output_file, default=None, help="write the table here")
    c.set_defaults(func=run_check)


def load_trace(path: str):
    """The routing trace at ``path``; ConfigError naming the path when it is missing or unreadable."""
    from fsmoe.config import ConfigError
    from fsmoe.placement.traffic import read_trace

    if not Path(path).is_file():
        raise ConfigError("path", path, "must be a routing trace file (routing_trace.jsonl.gz)")
    try:
        return read_trace(path)
    except (ValueError, OSError) as e:
        raise ConfigError("path", path, f"is not a readable routing trace ({e})") from None


def load_for_ep(path: str, ep: int | None):
    """(the routing trace at ``path``, the EP ranks to read it for: ``ep`` or the run's own);
    ConfigError naming the path or ``--ep`` when either is unusable."""
    from fsmoe.config import ConfigError

    trace = load_trace(path)
    ranks = ep or max(int(trace.header.get("ep", 1)), 1)
    if ranks < 2:
        raise ConfigError("--ep", ranks,
                          "must be >= 2 (the run had no expert parallelism: say how many ranks to read it for)")
    return trace, ranks


def op_medians(ops_NMO: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """phase -> op -> ms: each step's mean over layers, then the median over steps (NaN-free)."""
    import warnings

    from fsmoe.op_clock import OPS

    out = {}
    for phase, arr in ops_NMO.items():
        with warnings.catch_warnings():  # a step without timings is all NaN: left out, not warned about
            warnings.simplefilter("ignore", RuntimeWarning)
            per_step = np.nanmean(arr, axis=1) if arr.size else np.zeros((0, len(OPS) + 1))
        out[phase] = {op: float(np.nanmedian(per_step[:, j]) * 1e3) if np.isfinite(per_step[:, j]).any()
                      else float("nan") for j, op in enumerate((*OPS, "layer"))}
    return out


def run_summary(args) -> int:
    from rich.console import Console

    from fsmoe.sim.traces import plot_summary, spread_per_token, summarize

    trace, ranks = load_for_ep(args.path, args.ep)
    h = trace.header
    summary = summarize(trace.counts_NMRE, trace.steps, ranks, args.gpus_per_node, h.get("source_ep_rank"))
    m = summary.means()
    n = len(summary.steps)
    con = Console()
    con.print(f"{args.path}: {n} steps, {summary.layers} MoE layers x {h['num_experts']} experts, read for EP={ranks}"
              + (f", {args.gpus_per_node} ranks per node" if args.gpus_per_node > 1 else ""))
    tenth = max(n // 10, 1)
    early, late = summary.change[:tenth], summary.change[-tenth:]
    con.print(f"  change   : {m['change']:.3f} mean total-variation distance between consecutive steps "
              f"(first tenth {sum(early) / max(len(early), 1):.3f}, last tenth {sum(late) / max(len(late), 1):.3f})")
    con.print(f"  sparsity : {m['sparsity']:.3f} of the off-rank pairs carry 80% of the off-rank rows")
    con.print(f"  locality : {m['on_rank']:.3f} of the rows stay on their rank"
              + (f", {m['in_node']:.3f} in their node" if args.gpus_per_node > 1 else ""))
    out = summary.to_json()
    if trace.choices_NMSK is not None:
        spread = spread_per_token(trace.choices_NMSK, h["num_experts"], ranks, args.gpus_per_node)
        if spread:
            out["spread"] = spread
            con.print(f"  spread   : a token's {spread['k']} experts sit on {spread['ranks_per_token']:.2f} EP ranks"
                      + (f", {spread['nodes_per_token']:.2f} nodes" if args.gpus_per_node > 1 else "")
                      + f" on average ({spread['tokens']} sampled tokens; sending each token once per rank "
                        f"instead of once per expert moves {spread['ranks_per_token'] / spread['k']:.2f} of the rows)")
    secs = trace.step_s[np.isfinite(trace.step_s)] if trace.step_s is not None else np.zeros(0)
    if len(secs):
        p10, p50, p90 = np.percentile(secs, [10, 50, 90]) * 1e3
        con.print(f"  step time: median {p50:.1f} ms (10th-90th percentile {p10:.1f}-{p90:.1f}) over {len(secs)} steps")
        out["step_ms"] = {"median": p50, "p10": p10, "p90": p90, "steps": len(secs)}
    if trace.ops_NMO is not None:
        out["op_ms"] = op_medians(trace.ops_NMO)
        names = list(next(iter(out["op_ms"].values())))
        con.print("  ops (ms per MoE layer, median over steps, mean over layers; rank 0): " + ", ".join(
            f"{op} {out['op_ms']['forward'][op]:.3g} / {out['op_ms']['backward'][op]:.3g}" for op in names)
            + "  (forward / backward)")
    if args.plot:
        plot_summary(summary, args.plot, f"{Path(args.path).name}, EP={ranks}")
        con.print(f"  plot: {args.plot}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out))
    return 0


def run_check(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from fsmoe.config import ConfigError, config_from_dict
    from fsmoe.schedule.model.profile import Profile
    from fsmoe.sim.op_check import check_ops, median_error, predicted_ops
    from fsmoe.train import saved_config

    trace = load_trace(args.path)
    if trace.ops_NMO is None:
        raise ConfigError("path", args.path, "holds no op timings (traced by an older fsmoe); trace the run again")
    saved = saved_config(Path(args.path).parent)
    if saved is None:
        raise ConfigError("path", args.path, "needs the run's config.json beside it")
    cfg = config_from_dict(saved)
    profile = Profile.load(args.profile, field="--profile")
    try:
        predicted = predicted_ops(cfg, int(trace.header["sources"]), profile)
    except KeyError as e:
        raise ConfigError("--profile", args.profile, str(e).strip("'\"")) from None
    checks = check_ops(op_medians(trace.ops_NMO), predicted)
    table = Table(title=f"{args.path}: ms per MoE layer (rank 0, median over steps) against {profile.hardware}")
    for col in ("phase", "op", "predicted", "measured", "predicted / measured"):
        table.add_column(col, justify="right")
    for c in checks:
        table.add_row(c.phase, c.op, "-" if c.predicted_ms is None else f"{c.predicted_ms:.3g}", f"{c.measured_ms:.3g}",
                      "-" if c.ratio is None else f"{c.ratio:.2f}")
    con = Console()
    con.print(table)
    err = median_error(checks)
    con.print(f"median |error| over the predicted ops: {100 * err:.1f}%")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"median_abs_error": err, "ops": [
            {"phase": c.phase, "op": c.op, "predicted_ms": c.predicted_ms, "measured_ms": c.measured_ms}
            for c in checks]},
            indent=1))
    return 0
