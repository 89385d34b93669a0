"""Byte-level training data: the embedded default corpus, user text files, and batch sampling.

Shape legend: N tokens in a split, B sequences per batch (b per data-parallel rank), L sequence length.

The embedded default is this Python's own standard-library ``.py`` sources (every machine has
them, nothing is downloaded). Files are read in sorted order until ``train.data_limit_mb`` is
reached; the last ``train.val_fraction`` of the byte stream is the validation split, so the
split depends only on the files and the two config values. Tokens are raw bytes (vocab 256).
"""
from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fsmoe.config import ConfigError

_BINARY_SNIFF_BYTES = 8192  # a file with a NUL byte in its first 8 KiB is taken as binary and skipped
_NOT_STDLIB = ("site-packages", "dist-packages", "__pycache__")


class DataError(ConfigError):
    """A data path is missing, empty or unreadable; names the path and what is expected."""


@dataclass(frozen=True)
class Corpus:
    """Byte tokens of one dataset, split into train and validation.

    train_N / val_N: [N] uint8 byte tokens. ``source`` says where they came from.
    """

    train_N: Tensor
    val_N: Tensor
    source: str
    num_files: int

    def unigram_val_loss_nats(self) -> float:
        """The val loss of byte frequencies alone: the train split's byte frequencies (add-one
        smoothed) scored on the val split, in nats. A model that ignores context does no better;
        compare it with the val loss, which is also in nats on the same split."""
        return unigram_cross_entropy_nats(self.train_N, self.val_N)

    def max_token(self) -> int:
        """The largest token id in either split (the vocabulary must exceed it)."""
        return int(max(self.train_N.max(), self.val_N.max()))


def unigram_entropy_nats(tokens_N: Tensor, vocab_size: int = 256) -> float:
    """H = -sum_v p_v ln p_v of the token histogram of ``tokens_N`` ([N] integer tokens)."""
    counts_V = torch.bincount(tokens_N.long(), minlength=vocab_size).double()
    p_V = counts_V[counts_V > 0] / counts_V.sum()
    return float(-(p_V * p_V.log()).sum())


def unigram_cross_entropy_nats(fit_N: Tensor, score_N: Tensor, vocab_size: int = 256) -> float:
    """Mean -ln p(token) over ``score_N`` under the add-one smoothed token frequencies of ``fit_N``."""
    counts_V = torch.bincount(fit_N.long(), minlength=vocab_size).double() + 1.0
    logp_V = (counts_V / counts_V.sum()).log()
    return float(-logp_V[score_N.long()].mean())


def nats_to_bits(nats: float) -> float:
    return nats / math.log(2)


# ---------------------------------------------------------------- finding files


def stdlib_files() -> list[Path]:
    """Sorted ``.py`` files of this interpreter's standard library (no site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if p.is_file() and not any(part in _NOT_STDLIB for part in p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _is_text(path: Path) -> bool:
    with path.open("rb") as f:
        return b"\0" not in f.read(_BINARY_SNIFF_BYTES)


def _readable_text(path: Path, raw: str) -> bool:
    """``_is_text`` of a file named by the user; unreadable is a DataError naming it."""
    try:
        return _is_text(path)
    except OSError as e:
        raise DataError("train.data", raw, f"cannot be read ({e.strerror})") from None


def text_files(paths: list[str]) -> list[Path]:
    """Expand ``--data`` paths: files as given, directories recursively (sorted, hidden entries
    and binary files skipped). Raises DataError naming the first path that is missing, empty,
    unreadable, or a file named explicitly that is binary."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise DataError("train.data", raw, "path does not exist; give text files or directories of them")
        if path.is_file():
            found = [path] if path.stat().st_size > 0 else []
            if found and not _readable_text(path, raw):
                raise DataError("train.data", raw, "is a binary file (it has a NUL byte in its first "
                                f"{_BINARY_SNIFF_BYTES // 1024} KiB); give text files or directories of them")
        elif not path.is_dir():
            raise DataError("train.data", raw, "is neither a file nor a directory")
        else:
            found = sorted(p for p in path.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts)
                           and p.stat().st_size > 0 and _is_text(p))
        if not found:
            what = "file is empty" if path.is_file() else "directory holds no non-empty text files"
            raise DataError("train.data", raw, f"{what}; give text files or directories of them")
        files.extend(found)
    return files


# ---------------------------------------------------------------- reading


def read_bytes(files: list[Path], limit_bytes: int) -> bytes:
    """Concatenate ``files`` in order, stopping after ``limit_bytes`` bytes."""
    chunks, total = [], 0
    for path in files:
        if total >= limit_bytes:
            break
        try:
            with path.open("rb") as f:
                chunk = f.read(limit_bytes - total)
        except OSError as e:
            raise DataError("train.data", str(path), f"cannot be read ({e.strerror})") from None
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def load_corpus(paths: list[str] | None, limit_mb: float, val_fraction: float, min_tokens: int) -> Corpus:
    """Load the corpus named by ``train.data`` (a list of paths; None = the embedded stdlib default).

    ``min_tokens``: each split must hold at least this many bytes (one sequence plus its target),
    otherwise a DataError says how much data there is and what would help.
    """
    files = stdlib_files() if paths is None else text_files(paths)
    source = f"python stdlib .py sources ({sysconfig.get_paths()['stdlib']})" if paths is None else ", ".join(paths)
    if not files:
        raise DataError("train.data", source, "no .py files found; pass --data PATH with text files")
    raw = read_bytes(files, int(limit_mb * 2**20))
    tokens_N = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)
    n_val = int(len(tokens_N) * val_fraction)
    train_N, val_N = tokens_N[: len(tokens_N) - n_val], tokens_N[len(tokens_N) - n_val:]
    if min(len(train_N), len(val_N)) < min_tokens:
        raise DataError("train.data", source,
                        f"holds {len(tokens_N)} bytes; with val_fraction={val_fraction} each split needs at "
                        f"least seq_len+1={min_tokens} bytes (add text or raise train.data_limit_mb)")
    return Corpus(train_N.clone(), val_N.clone(), source, len(files))


def check_vocab(corpus: Corpus, vocab_size: int) -> None:
    """The model's vocabulary must hold every token of the data (bytes: 0..255)."""
    top = corpus.max_token()
    if vocab_size <= top:
        raise ConfigError("model.vocab_size", vocab_size, f"must be >= {top + 1}: the data ({corpus.source}) "
                          f"holds token {top} (tokens are bytes, so 256 always fits)")


# ---------------------------------------------------------------- batches


class BatchSampler:
    """Random windows of a token stream, drawn with a seeded ``torch.Generator``.

    Every data-parallel rank draws the same global batch of ``batch_size`` offsets and keeps its
    own contiguous slice of rows, so the global batch is the same whatever the layout.
    ``state_dict`` holds the generator state, so a resumed run draws exactly the same batches.
    """

    def __init__(self, tokens_N: Tensor, batch_size: int, seq_len: int, seed: int,
                 dp_rank: int = 0, dp_size: int = 1):
        if batch_size % dp_size:
            raise ConfigError("train.batch_size", batch_size, f"must be divisible by the data-parallel size {dp_size}")
        self.tokens_N, self.batch_size, self.seq_len = tokens_N, batch_size, seq_len
        self.rows = slice(dp_rank * batch_size // dp_size, (dp_rank + 1) * batch_size // dp_size)
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[Tensor, Tensor]:
        """Returns (x_bL, y_bL) int64 on CPU, y = x shifted by one token; b = batch_size / dp_size."""
        high = len(self.tokens_N) - self.seq_len
        offsets_B = torch.randint(0, high, (self.batch_size,), generator=self.generator)
        return windows(self.tokens_N, offsets_B[self.rows], self.seq_len)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def windows(tokens_N: Tensor, offsets_B: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """Windows of ``seq_len + 1`` tokens at ``offsets_B`` -> (x_BL, y_BL) int64."""
    idx_BL = offsets_B[:, None] + torch.arange(seq_len + 1)[None, :]
    chunk_BL = tokens_N[idx_BL].long()
    return chunk_BL[:, :-1], chunk_BL[:, 1:]


def eval_batches(tokens_N: Tensor, batch_size: int, seq_len: int, num_batches: int) -> list[tuple[Tensor, Tensor]]:
    """A fixed validation set: ``num_batches * batch_size`` windows at evenly spaced offsets
    (no randomness, so every evaluation of every run scores the same text)."""
    count = num_batches * batch_size
    offsets = torch.linspace(0, len(tokens_N) - seq_len - 1, count).long()
    return [windows(tokens_N, offsets[i * batch_size:(i + 1) * batch_size], seq_len) for i in range(num_batches)]
