"""Checkpoints with torch.distributed.checkpoint (DCP), safe against crashes.

Layout inside a run directory::

    ckpt/step_100/      .metadata + __<rank>_0.distcp shards + checksums.json (one complete checkpoint)
    ckpt/step_150/
    ckpt/step_200.tmp/  being written; renamed to step_200/ only once complete
    ckpt/step_250.damaged/  failed its checksums when a run resumed; set aside, kept for inspection

A checkpoint is written into ``step_N.tmp``; once DCP has finished, rank 0 writes
``checksums.json`` (the size and SHA-256 of every file DCP wrote) and renames the directory, so
a crash mid-write never touches the last good checkpoint; the newest ``keep`` complete ones are
kept. Loading verifies every file against the manifest first and refuses a damaged checkpoint
with an error naming the file; :func:`find_intact` picks the newest checkpoint that verifies
(what ``--resume`` loads), setting damaged newer ones aside as ``step_N.damaged`` so that they
are neither loaded nor counted among the ``keep`` newest. A checkpoint without a manifest (written by an older fsmoe) loads
with a warning. DCP works in a single process and under a process group (each rank writes its
shards, rank 0 writes the manifest and renames; rank 0 verifies and tells every rank the
verdict), and reshards on load, so a checkpoint does not fix the parallel layout.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
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
_DAMAGED_SUFFIX = ".damaged"
MANIFEST = "checksums.json"
_HASH = "sha256"
_CHUNK = 1 << 20


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
    2. after a barrier, rank 0 writes the checksum manifest and renames the directory to
       ``step_<step>`` (replacing an older copy of the same step);
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
        write_manifest(tmp)
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


# ---------------------------------------------------------------- checksums


def _digest(path: Path) -> str:
    h = hashlib.new(_HASH)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(ckpt_dir: Path) -> None:
    """Write ``checksums.json``: size and digest of every file in ``ckpt_dir`` (fsynced, last)."""
    files = {p.name: {"size": p.stat().st_size, _HASH: _digest(p)}
             for p in sorted(Path(ckpt_dir).iterdir()) if p.is_file() and p.name != MANIFEST}
    path = Path(ckpt_dir) / MANIFEST
    with path.open("w") as f:
        json.dump({"algorithm": _HASH, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _damaged(path: Path, what: str) -> CheckpointError:
    return CheckpointError("checkpoint", str(path), f"is damaged ({what}); the checkpoint it belongs to cannot be "
                           "used")


def _check_manifest(ckpt_dir: Path) -> list[str]:
    """Verify ``ckpt_dir`` against its manifest (this process). Returns warnings (no manifest);
    raises CheckpointError naming the first missing or damaged file."""
    ckpt_dir = Path(ckpt_dir)
    manifest = ckpt_dir / MANIFEST
    if not ckpt_dir.is_dir():
        raise CheckpointError("checkpoint", str(ckpt_dir), "does not exist")
    if not manifest.exists():
        return [f"{ckpt_dir} has no {MANIFEST} (written by an older fsmoe), so it is loaded unverified"]
    try:
        entries = json.loads(manifest.read_text())["files"]
        expected = {name: (int(e["size"]), str(e[_HASH])) for name, e in entries.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise _damaged(manifest, f"unreadable manifest: {type(e).__name__}") from None
    if not expected:
        raise _damaged(manifest, "the manifest lists no files")
    for name, (size, digest) in sorted(expected.items()):
        path = ckpt_dir / name
        if not path.is_file():
            raise _damaged(path, "missing")
        if path.stat().st_size != size:
            raise _damaged(path, f"{path.stat().st_size} bytes, {size} were written")
        if _digest(path) != digest:
            raise _damaged(path, f"its {_HASH} does not match the one written with it")
    return []


def _rank0_decides(fn, *args) -> Any:
    """``fn(*args)`` run on rank 0 only; every rank returns its result or raises its CheckpointError."""
    verdict = None
    if _is_rank0():
        try:
            verdict = ("ok", fn(*args))
        except CheckpointError as e:
            verdict = ("error", (e.field_name, e.value, e.allowed))
    if _distributed():
        box = [verdict]
        dist.broadcast_object_list(box, src=0)
        verdict = box[0]
    kind, payload = verdict
    if kind == "error":
        raise CheckpointError(*payload)
    return payload


def verify(ckpt_dir: Path) -> list[str]:
    """Check every file of a checkpoint against its manifest (rank 0 reads, every rank gets the
    verdict). Returns warnings to show (e.g. no manifest); a damaged checkpoint raises
    CheckpointError naming the file."""
    return _rank0_decides(_check_manifest, Path(ckpt_dir))


def _newest_intact(run_dir: Path, set_aside: bool = True) -> tuple[int, str, list[str]]:
    """(step, path, warnings) of the newest checkpoint that verifies (this process); damaged
    newer ones are set aside once an intact one is found (``set_aside``; else left in place)."""
    latest_checkpoint(run_dir)  # raises the "holds no checkpoint" error
    skipped: list[tuple[Path, str]] = []
    for step, path in reversed(list_checkpoints(run_dir)):
        try:
            notes = _check_manifest(path)
        except CheckpointError as e:
            skipped.append((path, str(e)))
            continue
        for bad, why in skipped:
            if set_aside:
                notes.insert(0, f"{why}; skipped it and moved {bad.name} to {_set_aside(bad).name}")
            else:
                notes.insert(0, f"{why}; skipped it (left in place)")
        if skipped:
            notes.append(f"{'resuming from' if set_aside else 'reading'} the newest intact checkpoint, {path}")
        return step, str(path), notes
    raise CheckpointError("--resume", str(ckpt_root(run_dir)), "holds no intact checkpoint ("
                          + "; ".join(why for _, why in skipped) + "); start a new run in another --run-dir")


def _set_aside(ckpt_dir: Path) -> Path:
    """Rename a damaged checkpoint to ``step_N.damaged`` (replacing an older one of that name)."""
    aside = ckpt_dir.with_name(ckpt_dir.name + _DAMAGED_SUFFIX)
    shutil.rmtree(aside, ignore_errors=True)
    ckpt_dir.rename(aside)
    return aside


def find_intact(run_dir: Path, set_aside: bool = True) -> tuple[int, Path, list[str]]:
    """(step, path, warnings) of the newest checkpoint of ``run_dir`` whose files match their
    checksums; damaged newer ones are named in the warnings and renamed ``step_N.damaged``
    (``set_aside=False``: left in place, for the commands that only read a run).
    CheckpointError if there is no checkpoint or none is intact (then nothing is renamed).
    Rank 0 decides for every rank."""
    step, path, notes = _rank0_decides(_newest_intact, Path(run_dir), set_aside)
    return step, Path(path), notes


def load(path: Path, state: dict[str, Any], *, verified: bool = False) -> list[str]:
    """Fill ``state`` in place from the checkpoint at ``path`` (tensors are copied into the given
    tensors, other values replaced); returns warnings to show. The files are verified against
    their checksums first unless ``verified`` (by :func:`find_intact`). A missing or damaged
    checkpoint raises CheckpointError naming it."""
    notes = [] if verified else verify(path)
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
    return notes
