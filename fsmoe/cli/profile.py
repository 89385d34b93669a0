"""``fsmoe profile``: measure collectives and expert GEMMs on the real process groups and fit the
scheduler's cost models (fsmoe.schedule.run.profiler), or refit a profile from executor records."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from fsmoe import cpu_threads
from fsmoe.config import ConfigError
from fsmoe.parallel.groups import ParallelGroups
from fsmoe.parallel.launch import add_command_arguments, run_command
from fsmoe.schedule.model.profile import Profile, refit
from fsmoe.schedule.run import profiler
from fsmoe.schedule.run.profiler import ProfileConfig, load_samples, run_profile


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("profile", help="measure collectives and expert GEMMs, fit alpha-beta models",
                              description=profiler.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_command_arguments(p)
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    p.add_argument("--config", default=None,
                   help="a run's preset or TOML: measure at its shapes (each process one data-parallel rank of "
                        "it), and also its head, optimizer and per-block host work, so `fsmoe simulate step` "
                        "can predict its whole training step")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="overrides of --config")
    p.add_argument("--out", default=None, help="Profile JSON (default runs/profiles/<hardware>_<layout>.json)")
    p.add_argument("--refit", default=None, metavar="RECORDS",
                   help="instead of measuring: refit --profile from executor op records "
                        "(timeline_records.jsonl of `fsmoe train --timeline`) or from a routing trace's op "
                        "timings (routing_trace.jsonl.gz of `fsmoe train --trace`, its config.json beside it)")
    p.add_argument("--profile", default=None, help="the profile to refit (with --refit)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.refit:
        if not args.profile:
            raise ConfigError("--profile", None, "--refit needs the profile to refit: --profile PATH")
        prof = Profile.load(args.profile, field="--profile")
        src = Path(args.refit)
        if src.name.endswith(".jsonl.gz"):  # a routing trace: its op timings, then its steps' variation
            from fsmoe.cli.trace import load_trace

            trace = load_trace(str(src))
            prof = _traced_jitter(trace, refit(prof, _trace_samples(trace, src, prof)))
        else:
            prof = refit(prof, load_samples(src))
        out = Path(args.out or args.profile)
        prof.save(out)
        print(prof.summary())
        print(f"refitted profile written to {out}")
        return 0
    # a run's profile keeps the threads its training has; the grid's, one per process (its lanes)
    return run_command(args, lambda groups, device: _profile_main(args, groups, device),
                       cpu_threads=None if args.config else 1)


def _profile_main(args, groups: ParallelGroups, device: torch.device) -> int:
    run, dtype = _run_of(args, groups, device)
    if run is not None:
        from fsmoe.schedule.run.model_parts import run_spec

        if device.type == "cpu":  # the threads its training computes with
            cpu_threads.apply(run.train.cpu_threads, groups.distributed)

        cfg = ProfileConfig.for_run(run_spec(run, groups.layout.dp, groups.layout.mp), groups.layout, device)
        cfg = dataclasses.replace(cfg, allreduce_bytes=_step_gradient_sizes(run, groups, cfg))
    else:
        cfg = ProfileConfig.gpu(args.quick) if device.type == "cuda" else ProfileConfig.cpu(args.quick)
    prof = run_profile(groups, device, cfg, dtype, run)
    overhead = _hier_overhead(groups, device, prof)
    if groups.rank == 0:
        if overhead:
            print("hierarchical dispatch, fixed cost per d beyond the alpha-beta lines (small messages): "
                  + ", ".join(f"d={d} {s * 1e3:.3f} ms (dispatch+combine {h:.3f} ms, layout {l:.3f} ms; flat "
                              f"{overhead['flat_ms']:.3f} ms)"
                              for d, (s, h, l) in enumerate(zip(overhead["overhead_s"], overhead["hier_ms"],
                                                                overhead["layout_ms"]), 1)))
        out = Path(args.out or f"runs/profiles/{prof.hardware}_{prof.layout}.json")
        prof.save(out)
        print(prof.summary())
        print(f"profiled in {prof.meta['seconds']:.1f}s; written to {out}")
    return 0


def _trace_samples(trace, path: Path, prof: Profile) -> list[tuple[str, float, float]]:
    """Refit samples of a routing trace's op timings (``fsmoe.sim.trace_refit``), at the shapes
    and layout of the run in its directory (``path``'s)."""
    from fsmoe.schedule.run.model_parts import run_spec
    from fsmoe.sim.step import saved_run
    from fsmoe.sim.trace_refit import trace_samples

    cfg, layout = saved_run(path.parent, "--refit", str(path))
    try:
        samples = trace_samples(trace, run_spec(cfg, layout.dp, layout.mp), layout, prof)
    except ValueError as e:
        raise ConfigError("--refit", str(path), str(e)) from None
    if not samples:
        raise ConfigError("--refit", str(path), "has no timed op with a size (a pipelined schedule times whole "
                                                 "layers only; trace a run of the default schedule)")
    return samples


def _traced_jitter(trace, prof: Profile, skip: int = 5) -> Profile:
    """``prof`` with ``step_jitter`` from ``trace``'s step phases: the standard deviation of rank
    0's forward + backward over the traced steps (the first ``skip``, at most half, left out:
    warm-up). Training's steps vary more than the profile's timed runs, each of which starts
    after a barrier."""
    import numpy as np

    from fsmoe.schedule.run.model_parts import with_model_parts

    ph = trace.phases_N
    if not ph or "forward" not in ph:
        return prof
    both = ph["forward"] + ph["backward"]
    both = both[min(skip, len(both) // 2):]
    both = both[np.isfinite(both)]
    if len(both) < 2:
        return prof
    return with_model_parts(prof, {"step_jitter": [[1.0, float(np.std(both, ddof=1))]]})


def _step_gradient_sizes(run, groups: ParallelGroups, cfg: ProfileConfig) -> tuple[int, ...]:
    """AllReduce sizes up to a step's gradients on a rank (fp32, at most 256 MiB), beyond the
    layer's sizes: ``fsmoe simulate step`` prices the whole step's reduction with this line."""
    import numpy as np

    from fsmoe.sim.step import ParamSplit

    top = min(4 * ParamSplit.of(run).on_rank(groups.layout), 256 << 20)
    low = max(cfg.comm_bytes)
    return tuple(int(x) for x in np.geomspace(low, top, 4)[1:]) if top > low else ()


def _run_of(args, groups: ParallelGroups, device: torch.device):
    """(``--config``'s RunConfig or None, the compute dtype its training uses on ``device``)."""
    if args.config is None:
        if args.set:
            raise ConfigError("--set", args.set[0], "needs --config (the run it overrides)")
        return None, torch.float32
    from fsmoe.config import load_config

    run = load_config(args.config, args.set)
    if run.model.moe.num_experts % groups.ep:
        raise ConfigError("--ep", groups.ep, f"must divide the config's model.moe.num_experts="
                          f"{run.model.moe.num_experts}")
    bf16 = run.train.dtype == "bfloat16" and device.type == "cuda"  # as fsmoe.precision
    return run, torch.bfloat16 if bf16 else torch.float32


def _hier_overhead(groups: ParallelGroups, device: torch.device, prof: Profile) -> dict | None:
    """With EP over 2+ ranks and a topology the EP group fits (``--topology``): the hierarchical
    dispatcher's fixed cost per d (``fsmoe.bench.dispatch.measure_overhead``), stored in the
    profile as ``hier_overhead_d{d}`` (alpha, seconds; read by ``LevelCosts.from_profile``)."""
    from fsmoe.bench.dispatch import measure_overhead
    from fsmoe.comm.topology import LevelCosts
    from fsmoe.parallel.levels import levels_of
    from fsmoe.schedule.model.profile import LinearFit

    if groups.ep < 2:
        return None
    try:
        levels = levels_of(groups)
    except ConfigError:
        return None
    out = measure_overhead(groups, device, LevelCosts.from_profile(prof, levels))
    for d, s in enumerate(out["overhead_s"], 1):
        prof.fits[f"hier_overhead_d{d}"] = LinearFit(s, 0.0, 1.0, 1)
    prof.meta["hier_overhead"] = out
    return out
