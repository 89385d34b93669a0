"""Tokenizers for ``fsmoe generate``: raw bytes for fsmoe's own byte-level runs, and a Hugging Face
``tokenizer.json`` (the ``tokenizers`` library) for converted models, which keep the source's
tokenizer files in their run directory."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fsmoe.config import ConfigError


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes are the tokens (fsmoe.data's tokenization); no end-of-sequence token."""

    eos_ids: frozenset[int] = frozenset()
    name: str = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class HFTokenizer:
    """A ``tokenizer.json``; encoding adds the special tokens its post-processor adds (e.g. BOS)."""

    tok: object  # tokenizers.Tokenizer
    eos_ids: frozenset[int]
    name: str = "tokenizer.json"

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def eos_ids(model_dir: Path) -> frozenset[int]:
    """End-of-sequence ids from ``generation_config.json``, else the HF ``config.json`` kept with the model."""
    for name in ("generation_config.json", "hf_config.json", "config.json"):
        path = Path(model_dir) / name
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        if value is not None:
            return frozenset(value if isinstance(value, list) else [value])
    return frozenset()


def load_tokenizer(model_dir: Path, vocab_size: int, converted: bool):
    """``tokenizer.json`` when ``model_dir`` has one; bytes for an fsmoe byte-level run."""
    path = Path(model_dir) / "tokenizer.json"
    if path.is_file():
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ConfigError("tokenizer", str(path), "needs the 'tokenizers' package (pip install tokenizers), "
                              "or pass token ids with --prompt-ids") from None
        return HFTokenizer(Tokenizer.from_file(str(path)), eos_ids(model_dir))
    if converted or vocab_size < 256:
        raise ConfigError("tokenizer", str(path), "is missing: a converted model needs its tokenizer.json in the "
                          "directory (copy it there), or pass token ids with --prompt-ids")
    return ByteTokenizer()
