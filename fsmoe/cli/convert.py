"""``fsmoe convert``: a Hugging Face directory into an fsmoe run directory, or back (``--to-hf``)."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from rich.console import Console

from fsmoe.cli.arg_types import output_file
from fsmoe.config import ConfigError

DTYPES = {"keep": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``fsmoe convert`` (see fsmoe.cli)."""
    p = subparsers.add_parser(
        "convert", help="Hugging Face checkpoint <-> fsmoe run directory (Mixtral, Qwen3-MoE, DeepSeek-V3)",
        description="Convert a Hugging Face directory (config.json + safetensors) into a new fsmoe run directory "
                    "(config + DCP checkpoint loadable at any layout), or with --to-hf an fsmoe run into a "
                    "Hugging Face directory. Streamed tensor by tensor; nothing is written on bad input.")
    p.add_argument("src", type=Path, help="Hugging Face directory (or, with --to-hf, an fsmoe run directory)")
    p.add_argument("out", type=Path, help="new output directory (must not exist, or be empty)")
    p.add_argument("--to-hf", action="store_true", help="fsmoe run -> Hugging Face directory")
    p.add_argument("--family", choices=["mixtral", "qwen3_moe", "deepseek_v3"],
                   help="--to-hf: the Hugging Face architecture (default: the source's, else the one the model fits)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="keep",
                   help="--to-hf: dtype of the written tensors (default: as stored)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="--to-hf: largest output shard (default 5 GiB)")
    p.add_argument("--report", type=output_file, metavar="FILE.json", help="also write the conversion report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fsmoe.models.hf.convert import hf_to_run, run_to_hf

    if not args.max_shard_gb > 0:
        raise ConfigError("--max-shard-gb", args.max_shard_gb, "must be > 0")
    if not args.to_hf and (args.family or args.dtype != "keep"):
        raise ConfigError("--family/--dtype", args.family or args.dtype, "apply to --to-hf only")
    if args.to_hf:
        rep = run_to_hf(args.src, args.out, family=args.family, dtype=DTYPES[args.dtype],
                        max_shard_bytes=int(args.max_shard_gb * 2**30))
    else:
        rep = hf_to_run(args.src, args.out)
    gb = 2**30
    console = Console(soft_wrap=True, highlight=False)
    console.print(f"converted {rep.family} {args.src} -> {args.out}: {rep.tensors} tensors, {rep.bytes / gb:.3f} GiB "
                  f"in {rep.seconds:.1f} s")
    ratio = rep.peak_rss_bytes / rep.largest_shard_bytes
    console.print(f"peak host memory {rep.peak_rss_bytes / gb:.3f} GiB ({ratio:.2f}x "
                  f"the largest shard, {rep.largest_shard_bytes / gb:.3f} GiB); "
                  f"{(rep.peak_rss_bytes - rep.start_rss_bytes) / gb:.3f} GiB above the process's "
                  f"{rep.start_rss_bytes / gb:.3f} GiB before converting")
    if rep.skipped:
        console.print(f"skipped {len(rep.skipped)} tensors outside the model's layers, e.g. {rep.skipped[0]}",
                      style="yellow")
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(dataclasses.asdict(rep), indent=2) + "\n")
    return 0
