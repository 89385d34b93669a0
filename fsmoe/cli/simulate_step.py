"""``fsmoe simulate step``: a run's whole training step predicted from a profile, part by part,
beside the step time the run measured (``fsmoe.sim.step``)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fsmoe.cli.arg_types import output_file


def add_parser(sub) -> None:
    from fsmoe.sim import step

    s = sub.add_parser("step", help="a run's training step predicted part by part from a profile, against its "
                                    "measured step time", description=step.__doc__ + USAGE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("run", nargs="?", default=None,
                   help="a run directory of `fsmoe train` (its config.json and metrics.jsonl); or none and a "
                        "planned run: --config with --nproc / --ep / --esp / --mp")
    s.add_argument("--config", default=None, help="a planned run's preset or TOML (instead of a run directory)")
    s.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="overrides of --config")
    s.add_argument("--nproc", type=int, default=1, help="processes of the planned run")
    s.add_argument("--ep", type=int, default=None, help="the planned run's EP (default: the config's)")
    s.add_argument("--esp", type=int, default=None)
    s.add_argument("--mp", type=int, default=None)
    s.add_argument("--profile", required=True,
                   help="a Profile of the same layout, best `fsmoe profile --config` of the same run")
    s.add_argument("--policy", default=None, help="the MoE schedule to price (default: the run's parallel.schedule)")
    s.add_argument("--routing", choices=["trace", "balanced"], default="trace",
                   help="trace: price the MoE blocks with the tokens each rank sent to each expert, from the "
                        "run's routing_trace.jsonl.gz (`fsmoe train --trace`) when it has one; balanced: as the "
                        "planner does, every expert the same rows")
    s.add_argument("--steps", type=int, default=8, help="traced steps to price (evenly spaced, the first left out)")
    s.add_argument("--json", type=output_file, default=None, help="write the prediction and the measurement here")
    s.set_defaults(func=run_step)


USAGE = """
    fsmoe train --config tiny --nproc 4 --ep 4 --steps 60 --run-dir runs/ep4
    fsmoe profile --config tiny --nproc 4 --ep 4 --out runs/ep4_profile.json
    fsmoe simulate step runs/ep4 --profile runs/ep4_profile.json
    fsmoe simulate step --config tiny --nproc 8 --ep 8 --profile runs/ep4_profile.json   # before running it
"""


REFIT_HINT = 0.10  # off by more than this: point at `fsmoe profile --refit` with the run's trace


def run_trace(run_dir: Path | None):
    """The run's routing trace (``fsmoe train --trace``), or None without one."""
    from fsmoe.cli.trace import load_trace

    path = run_dir / "routing_trace.jsonl.gz" if run_dir is not None else None
    return load_trace(str(path)) if path is not None and path.exists() else None


def routing_of(trace, layout, steps: int):
    """[N, M, S, E] tokens per (step, MoE layer, source rank, expert) of up to ``steps`` steps of
    the run's ``trace`` (the first step left out), or None without a trace."""
    import numpy as np

    if trace is None:
        return None
    counts = trace.counts_NMRE[1:]
    if len(counts) == 0 or counts.shape[2] != layout.moe:
        return None
    pick = np.unique(np.linspace(0, len(counts) - 1, max(1, steps)).round().astype(int))
    return counts[pick].astype(np.float64)


def planned_run(args):
    """(RunConfig, Layout) of a run not yet made: ``--config`` on ``--nproc`` processes."""
    import dataclasses

    from fsmoe.config import ConfigError, load_config
    from fsmoe.parallel.layout import Layout

    if args.config is None:
        raise ConfigError("run", None, "give a run directory of `fsmoe train`, or --config of a planned run")
    cfg = load_config(args.config, args.set)
    p = cfg.parallel
    p = dataclasses.replace(p, dp=1, ep=args.ep or p.ep, esp=args.esp or p.esp, mp=args.mp or p.mp)
    layout = Layout.from_config(p, args.nproc, p.gpus_per_node)
    planned = dataclasses.replace(cfg, parallel=dataclasses.replace(p, dp=layout.dp))
    planned.validate()  # EP dividing the experts, ESP the expert width, MP the heads
    return planned, layout


def step_report(run_dir: Path | None, profile_path: str, policy: str | None, routing: str = "trace",
                steps: int = 8, planned=None) -> dict:
    """The prediction of ``run_dir``'s step beside its measurement, or of a ``planned`` (cfg, layout)."""
    from fsmoe.config import ConfigError
    from fsmoe.metrics import read_metrics
    from fsmoe.schedule.model.profile import Profile
    from fsmoe.sim.step import measured_step_s, predict_step, saved_run

    cfg, layout = saved_run(run_dir, "run", str(run_dir)) if run_dir is not None else planned
    profile = Profile.load(profile_path, field="--profile")
    if steps < 1:
        raise ConfigError("--steps", steps, "must be >= 1")
    trace = run_trace(run_dir)  # read once: the routing and the step's phases
    routed = routing_of(trace, layout, steps) if routing == "trace" else None
    parts = predict_step(cfg, layout, profile, policy or cfg.parallel.schedule, routing_NMSE=routed)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    records = read_metrics(run_dir) if run_dir is not None else []
    measured = measured_step_s([r for r in records if "tokens_per_s" in r], tokens)
    rep = {"run": str(run_dir or cfg.name), "layout": layout.name, "world": layout.world, "profile": profile_path,
           "hardware": profile.hardware, "predicted_s": parts.as_dict(), "measured_step_s": measured,
           "routing": "balanced" if routed is None else f"traced ({len(routed)} steps)"}
    phases = measured_phases(trace, measured)
    if measured and phases and phases["trace"] > 0:
        # the traced run paid for its own tracing (the counts' gather, the reads): not the model's
        rep["trace_s"] = phases["trace"]
        measured = rep["measured_untraced_s"] = measured - phases["trace"]
    if measured:
        rep["ratio"] = parts.total_s / measured
    if phases:
        p = parts
        rep["by_phase_s"] = {  # (predicted, measured) per phase of the step
            "forward + backward": (p.moe_blocks + p.dense_blocks + p.head + p.tensor_par, phases["compute"]),
            "gradient sync": (p.gradients, phases["grad_sync"]),
            "optimizer": (p.optimizer, phases["optimizer"]),
            "rest (loop)": (p.loop, phases["rest"])}
    return rep


def measured_phases(trace, step_s: float | None, skip: int = 5) -> dict[str, float] | None:
    """Medians of rank 0's step phases in ``trace`` (fsmoe.op_clock.StepClock), the first ``skip``
    steps left out: compute (forward + backward), grad_sync, optimizer, trace (what tracing took),
    and the rest (the loop): each traced step's own time less its phases, or, in a trace without
    step times, ``step_s`` less the phases' medians. Where steps vary a lot (a shared host), the
    median of sums and the sum of medians differ by tens of ms, so the loop is taken per step.
    None without a trace or phases."""
    import numpy as np

    ph = trace.phases_N if trace is not None else None
    if not ph or not {"forward", "backward", "grad_sync", "optimizer"} <= set(ph):
        return None
    n = len(ph["forward"])
    tail = slice(skip if n > skip else 0, None)
    med = {k: float(np.nanmedian(v[tail])) for k, v in ph.items()}
    out = {"compute": med["forward"] + med["backward"], "grad_sync": med["grad_sync"], "optimizer": med["optimizer"],
           "trace": med.get("trace", 0.0)}
    secs = trace.step_s if trace.step_s is not None and len(trace.step_s) == n else None
    if secs is not None and np.isfinite(secs[tail]).any():
        phases = sum(np.nan_to_num(v) for v in ph.values())
        out["rest"] = max(0.0, float(np.nanmedian((secs - phases)[tail])))
    else:
        out["rest"] = max(0.0, step_s - sum(out.values())) if step_s else float("nan")
    return out


def run_step(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from fsmoe.sim.step import PARTS

    if args.run is not None:
        rep = step_report(Path(args.run), args.profile, args.policy, args.routing, args.steps)
    else:
        rep = step_report(None, args.profile, args.policy, args.routing, args.steps, planned_run(args))
    pred = rep["predicted_s"]
    con = Console()
    t = Table(title=f"{rep['run']} ({rep['layout']}, {rep['world']} processes) priced with {rep['hardware']}, "
                    f"schedule {pred['policy']}, routing {rep['routing']}")
    t.add_column("part")
    t.add_column("ms", justify="right")
    for part in PARTS:
        t.add_row(part, f"{pred[part] * 1e3:.2f}")
    t.add_row("step, predicted", f"{pred['total'] * 1e3:.2f}", style="bold")
    if rep["measured_step_s"]:
        t.add_row("step, measured", f"{rep['measured_step_s'] * 1e3:.2f}", style="bold")
    if rep.get("trace_s"):
        t.add_row("  less tracing's own", f"{rep['measured_untraced_s'] * 1e3:.2f}", style="bold")
    con.print(t)
    if rep.get("by_phase_s"):
        by = Table(title="where the step goes: predicted beside rank 0's traced phases (medians)")
        for col in ("phase", "predicted ms", "measured ms"):
            by.add_column(col, justify="left" if col == "phase" else "right")
        for name, (pr, me) in rep["by_phase_s"].items():
            by.add_row(name, f"{pr * 1e3:.2f}", f"{me * 1e3:.2f}")
        con.print(by)
        con.print("the MoE blocks' own gradient AllReduce is in forward + backward when predicted, in the gradient "
                  "sync when measured (data parallelism reduces it there); the predicted waiting for the slowest "
                  "rank falls in whichever measured phase holds the rank's next collective", style="dim")
    if pred["missing"]:
        con.print(f"not priced (the profile has no fit for {', '.join(pred['missing'])}): measure them with "
                  "`fsmoe profile --config` of this run", style="yellow")
    if "ratio" in rep:
        con.print(f"predicted / measured: {rep['ratio']:.3f}")
        trace = Path(args.run) / "routing_trace.jsonl.gz" if args.run is not None else None
        if abs(rep["ratio"] - 1) > REFIT_HINT and trace is not None and trace.exists():
            con.print(f"more than {REFIT_HINT:.0%} off: refit the profile from this run's trace (its op timings and "
                      f"how much its steps vary), then price this layout's next runs with it: fsmoe profile "
                      f"--refit {trace} --profile {args.profile} --out REFITTED.json", style="yellow")
    elif args.run is None:
        con.print("a planned run: nothing measured to compare")
    else:
        con.print("the run logged no training step time (metrics.jsonl): nothing to compare", style="yellow")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rep, indent=1))
    return 0
