"""argparse types for the command line: values checked when the arguments are parsed, before any
work, so a bad one is a one-line error naming the option, not a traceback after the results are
computed (or half written)."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

# what matplotlib writes (a name without a suffix gets .png)
PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".eps", ".ps", ".tif", ".tiff", ".webp")


def output_file(value: str) -> str:
    """An argparse ``type``: a file to write (its folder is made when missing), not a folder."""
    if Path(value).is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a folder; give a file path")
    return value


def plot_file(value: str) -> str:
    """An argparse ``type``: an image file to draw to, with a suffix matplotlib writes (or none: PNG)."""
    output_file(value)
    suffix = Path(value).suffix.lower()
    if suffix and suffix not in PLOT_SUFFIXES:
        raise argparse.ArgumentTypeError(f"{value}: {suffix} is not an image format written here; "
                                          f"use one of {', '.join(PLOT_SUFFIXES)}")
    return value


def positive_int(value: str) -> int:
    """An argparse ``type``: a whole number >= 1."""
    n = _whole(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return n


def non_negative_int(value: str) -> int:
    """An argparse ``type``: a whole number >= 0."""
    n = _whole(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return n


def positive_float(value: str) -> float:
    """An argparse ``type``: a finite number > 0."""
    x = _finite(value)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return x


def non_negative_float(value: str) -> float:
    """An argparse ``type``: a finite number >= 0."""
    x = _finite(value)
    if x < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return x


def _finite(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"{value} must be a finite number")
    return x


def _whole(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
