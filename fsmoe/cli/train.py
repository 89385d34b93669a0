"""``fsmoe train``: the command line of :class:`fsmoe.train.Trainer` (one process, or ``--nproc N``
workers under torchrun, each running this same command as a rank of fsmoe.parallel's trainer)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fsmoe import train
from fsmoe.config import ConfigError, RunConfig, apply_overrides, config_from_dict, raw_config
from fsmoe.parallel.launch import (add_parallel_arguments, check_world, parallel_overrides, processes, run_guarded,
                                   spawn_torchrun, strip_flag, wants_torchrun, world_size_from_env)
from fsmoe.train import (Trainer, check_resumable, check_run_dir, load_checked_corpus, resolve_device,
                         saved_config)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PRESET|FILE.toml",
                        help="preset name or TOML file (default: tiny; with --resume: the run's saved config)")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                        help="override a config field, e.g. --set model.moe.num_experts=16 train.lr=1e-3")
    parser.add_argument("--steps", type=int, help="optimizer steps (train.steps)")
    parser.add_argument("--seed", type=int, help="random seed (train.seed)")
    parser.add_argument("--run-dir", type=Path, help="output directory (default: runs/<config name>)")
    parser.add_argument("--data", nargs="+", metavar="PATH",
                        help="text files or directories (recursive) instead of the stdlib default")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --run-dir from its latest checkpoint")
    parser.add_argument("--init-from", type=Path, metavar="RUN_OR_HF_DIR",
                        help="start from these weights (an fsmoe run's newest checkpoint, or a Hugging Face "
                             "directory) with a new optimizer; the model config is theirs")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="train.device")
    parser.add_argument("--timeline", type=int, nargs="?", const=3, metavar="STEPS",
                        help="record STEPS (default 3) steps' op timeline: timeline.json + timeline.png in the "
                             "run dir, refit error in metrics (train.timeline_steps; needs parallel.schedule)")
    parser.add_argument("--torch-profile", type=int, nargs="?", const=3, metavar="STEPS",
                        help="profile STEPS (default 3) steps with torch.profiler after 8 warm-up steps: "
                             "torch_trace_rank<R>.json.gz (Perfetto) and a printed summary of compute, "
                             "communication, their overlap and idle time (train.torch_profile_steps)")
    parser.add_argument("--trace", action="store_true", default=None,
                        help="write every step's source-rank x expert routing counts to routing_trace.jsonl.gz in "
                             "the run dir (train.trace; docs/placement.md)")
    add_parallel_arguments(parser)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``fsmoe train`` (see fsmoe.cli)."""
    parser = subparsers.add_parser("train", help="train an MoE model (default: tiny preset on the stdlib sources)",
                                   description=train.__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.set_defaults(func=run)


# set by each launch, not kept by --resume (a checkpoint loads under any of them)
LAYOUT_FIELDS = ("dp", "mp", "ep", "esp", "gpus_per_node", "shard")


def resolve_config(args: argparse.Namespace) -> tuple[RunConfig, Path]:
    """Config and run dir from the command line: preset or file (or, on --resume without
    --config, the run's saved config, less its parallel layout, which this launch's flags set)
    + ``--set`` + the shortcut flags, which win."""
    overrides = parallel_overrides(args) + list(args.overrides)
    for flag, key in (("steps", "train.steps"), ("seed", "train.seed"), ("device", "train.device"),
                      ("timeline", "train.timeline_steps"), ("trace", "train.trace"),
                      ("torch_profile", "train.torch_profile_steps")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={json.dumps(getattr(args, flag))}")
    saved = saved_config(args.run_dir) if args.resume and args.run_dir and not args.config else None
    if args.init_from is not None:
        if args.resume:
            raise ConfigError("--init-from", str(args.init_from), "starts a new run; --resume continues one (drop one)")
        from fsmoe.models.hf.convert import run_name, source_model

        data = raw_config(args.config or "tiny")
        data["model"] = source_model(args.init_from)  # the weights fix the model; --set may still tune it
        if not args.config:
            data["name"] = run_name(args.init_from)
            train_data = data.setdefault("train", {})
            train_data["seq_len"] = min(train_data.get("seq_len", 128), data["model"]["max_seq_len"])
        data = apply_overrides(data, overrides)
    elif saved is not None:
        if isinstance(saved.get("parallel"), dict):
            saved["parallel"] = {k: v for k, v in saved["parallel"].items() if k not in LAYOUT_FIELDS}
        data = apply_overrides(saved, overrides)
    else:
        data = raw_config(args.config or "tiny", overrides)
    if args.data:  # set directly, not as TOML text: any character may appear in a path
        train = data.setdefault("train", {})
        if isinstance(train, dict):
            train["data"] = [str(Path(p).expanduser().absolute()) for p in args.data]
    cfg = config_from_dict(data)
    return cfg, args.run_dir or Path("runs") / cfg.name


def preflight(cfg: RunConfig, run_dir: Path, resume: bool, nproc: int) -> None:
    """What the workers of ``--nproc N`` would refuse, checked before any starts: the run dir, the
    run to resume (its config and a checkpoint; rank 0 verifies the checksums), the data, the
    device. (The config and layout were checked when ``cfg`` was built.)"""
    check_run_dir(run_dir, resume)
    if resume:
        check_resumable(run_dir, cfg)
    load_checked_corpus(cfg)
    device = resolve_device(cfg.train)
    if device.type == "cuda" and torch.cuda.device_count() < nproc:
        raise ConfigError("--nproc", nproc, f"more processes than GPUs ({torch.cuda.device_count()}); use fewer "
                          "or --device cpu")
    if cfg.parallel.backend == "nccl" and (device.type != "cuda" or not torch.distributed.is_nccl_available()):
        raise ConfigError("parallel.backend", "nccl", "needs CUDA devices and a torch built with NCCL; use gloo here")


def run(args: argparse.Namespace) -> int:
    if world_size_from_env() > 1:  # a torchrun worker: any error is reported once for the whole job
        return run_guarded(_run_worker, args)
    cfg, run_dir = resolve_config(args)
    nproc = processes(args)
    check_world(cfg.parallel, nproc)
    if wants_torchrun(args):  # --nproc N: check, then start N workers under torchrun, each runs this command
        preflight(cfg, run_dir, args.resume, nproc)
        return spawn_torchrun(nproc, strip_flag(getattr(args, "argv", None) or sys.argv[1:], "--nproc"))
    Trainer(cfg, run_dir, resume=args.resume, init_from=args.init_from).fit()
    return 0


def _run_worker(args: argparse.Namespace) -> int:
    from fsmoe.parallel.trainer import run_parallel

    cfg, run_dir = resolve_config(args)
    check_world(cfg.parallel, world_size_from_env())
    return run_parallel(cfg, run_dir, resume=args.resume, init_from=args.init_from)
