"""The ``fsmoe`` command: a small registry of subcommands.

Each subcommand lives in its own module of this package (``fsmoe/cli/<command>.py``), which
exposes ``add_parser(subparsers)``: it adds its parser and sets ``func`` (``args -> exit code``).
Adding a command is one module and one line in COMMANDS. The commands sit above everything they
run (``fsmoe.train``, ``fsmoe.parallel``, ``fsmoe.bench``, ``fsmoe.schedule``), so nothing below
imports them.

Bad input (ConfigError and its subclasses: config, data path, checkpoint) is printed as one red
line naming the field, the value and what is allowed, and the exit code is 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from rich.console import Console

from fsmoe.config import ConfigError

# The registry: one module per subcommand, each with add_parser(subparsers).
COMMANDS = ["fsmoe.cli.train", "fsmoe.cli.bench", "fsmoe.cli.profile", "fsmoe.cli.plan", "fsmoe.cli.convert",
            "fsmoe.cli.generate", "fsmoe.cli.infer", "fsmoe.cli.simulate", "fsmoe.cli.trace"]

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fsmoe", description="Train sparse Mixture-of-Experts models fast.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fsmoe`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # e.g. re-run under torchrun by `train --nproc`
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        Console(stderr=True).print(f"error: {e}", style="bold red", markup=False, highlight=False, soft_wrap=True)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted", style="yellow")
        return 130


if __name__ == "__main__":
    sys.exit(main())
