"""Checkpoints with torch.distributed.checkpoint (DCP), safe against crashes.

Layout inside a run directory::

    ckpt/step_100/      .metadata + __<rank>_0.distcp shards (one complete checkpoint)
    ckpt/step_150/
    ckpt/step_200.tmp/  being written; renamed to step_200/ only once complete

A checkpoint is written into ``step_N.tmp`` and renamed when DCP has finished, so a crash
mid-write never touches the last good checkpoint; the newest ``keep`` complete ones are kept.
DCP works in a single process and under a process group (each rank writes its shards, rank 0
renames), and reshards on load, so a checkpoint does not fix the parallel layout.
"""
from __future__ import annotations

import contextlib
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

from fsmoe.config import ConfigError

_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_SUFFIX = ".tmp"


class CheckpointError(ConfigError):
    """No usable checkpoint where one was asked for; names the path and what to do."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_rank0() -> bool:
    return not _distributed() or dist.get_rank() == 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """Silence DCP's "assuming the intent is to save in a single process" notice (that is the intent)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to .* in a single process")
        yield


def ckpt_root(run_dir: Path) -> Path:
    return Path(run_dir) / "ckpt"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of ``run_dir`` as (step, path), oldest first (``.tmp`` dirs ignored)."""
    root = ckpt_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> tuple[int, Path]:
    """(step, path) of the newest complete checkpoint; CheckpointError if there is none."""
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError("--resume", str(ckpt_root(run_dir)),
                              "holds no checkpoint (expected step_N/ directories written by an earlier "
                              "`fsmoe train --run-dir` of this run); drop --resume to start a new run")
    return found[-1]


def save(run_dir: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` (nested dicts of tensors and small picklable values) as ``ckpt/step_<step>``.

    1. every rank writes its shards into ``step_<step>.tmp`` (rank 0 first clears a stale one);
    2. rank 0 renames it to ``step_<step>`` (replacing an older copy of the same step);
    3. rank 0 deletes all but the newest ``keep`` checkpoints.
    """
    root = ckpt_root(run_dir)
    final, tmp = root / f"step_{step}", root / f"step_{step}{_TMP_SUFFIX}"
    if _is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=tmp, no_dist=not _distributed())
    _barrier()
    if _is_rank0():
        _replace_dir(tmp, final)
        for _, old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    _barrier()
    return final


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` is moved aside first and removed after."""
    if dst.exists():
        aside = dst.with_name(dst.name + ".old")
        shutil.rmtree(aside, ignore_errors=True)
        dst.rename(aside)
        src.rename(dst)
        shutil.rmtree(aside)
    else:
        src.rename(dst)


def load(path: Path, state: dict[str, Any]) -> None:
    """Fill ``state`` in place from the checkpoint at ``path`` (tensors are copied into the given
    tensors, other values replaced). A missing or damaged checkpoint raises CheckpointError."""
    try:
        dcp.FileSystemReader(path).read_metadata()  # a damaged .metadata fails here, before DCP logs fallbacks
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=path, no_dist=not _distributed())
    except (Exception, CheckpointException) as e:  # DCP raises many types (pickle, IO, ...): all mean "unusable"
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        older = [p.name for _, p in list_checkpoints(Path(path).parent.parent) if p != Path(path)]
        fallback = (f"move it away to resume from {older[-1]}" if older
                    else "no older checkpoint exists; drop --resume to start a new run in another --run-dir")
        why = f"{type(e).__name__}: {reason[:300]}"
        raise CheckpointError("--resume", str(path), f"is not a readable checkpoint ({why}); {fallback}") from None
