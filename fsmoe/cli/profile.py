"""``fsmoe profile``: measure collectives and expert GEMMs on the real process groups and fit the
scheduler's cost models (fsmoe.schedule.run.profiler), or refit a profile from executor records."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

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
    p.add_argument("--out", default=None, help="Profile JSON (default runs/profiles/<hardware>_<layout>.json)")
    p.add_argument("--refit", default=None, metavar="RECORDS.jsonl",
                   help="instead of measuring: refit --profile from executor op records "
                        "(timeline_records.jsonl of `fsmoe train --timeline`)")
    p.add_argument("--profile", default=None, help="the profile to refit (with --refit)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.refit:
        if not args.profile:
            raise ConfigError("--profile", None, "--refit needs the profile to refit: --profile PATH")
        prof = refit(Profile.load(args.profile), load_samples(Path(args.refit)))
        out = Path(args.out or args.profile)
        prof.save(out)
        print(prof.summary())
        print(f"refitted profile written to {out}")
        return 0
    return run_command(args, lambda groups, device: _profile_main(args, groups, device))


def _profile_main(args, groups: ParallelGroups, device: torch.device) -> int:
    cfg = ProfileConfig.gpu(args.quick) if device.type == "cuda" else ProfileConfig.cpu(args.quick)
    prof = run_profile(groups, device, cfg)
    if groups.rank == 0:
        out = Path(args.out or f"runs/profiles/{prof.hardware}_{prof.layout}.json")
        prof.save(out)
        print(prof.summary())
        print(f"profiled in {prof.meta['seconds']:.1f}s; written to {out}")
    return 0
