"""Reading and writing Hugging Face checkpoint directories: ``config.json`` plus safetensors shards
(``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` listed in
``model.safetensors.index.json``).

Reading is lazy: :class:`HFCheckpoint` parses only the shards' JSON headers (names, shapes, dtypes,
byte ranges) when it opens a directory, so every check runs before a byte of weights is read;
:meth:`read` then reads exactly the bytes of the tensors asked for (no memory map, whose touched
pages would stay resident), so the process never keeps more than the tensors it is converting.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor

from fsmoe.models.hf.family import ConversionError

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Files a converted run keeps beside its weights so that `fsmoe generate` and `--to-hf` find them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "tokenizer.model", "vocab.json", "merges.txt")
TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class TensorInfo:
    file: str  # shard file name, relative to the directory
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name: F32, BF16, ...
    start: int = 0  # byte offset of the data in the file

    @property
    def nbytes(self) -> int:
        n = _DTYPE_BYTES.get(self.dtype, 4)
        for d in self.shape:
            n *= d
        return n


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(str(path), "missing", "a Hugging Face model directory needs this file")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(str(path), "unreadable", f"is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConversionError(str(path), type(data).__name__, "must hold a JSON object")
    return data


def read_header(path: Path) -> dict[str, dict]:
    """The safetensors header of ``path``: {name: {"dtype", "shape", "data_offsets", "start"}},
    ``start`` being the absolute file offset of the tensor's bytes."""
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > path.stat().st_size - 8:  # garbage read as a length: do not try to read it
                raise ValueError(f"header of {n} bytes in a file of {path.stat().st_size}")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for entry in header.values():
            entry["start"] = 8 + n + int(entry["data_offsets"][0])
    except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConversionError(str(path), "unreadable", f"is not a safetensors file ({type(e).__name__})") from None
    return header


class HFCheckpoint:
    """A Hugging Face directory: its config and the name, shard, shape and dtype of every tensor."""

    def __init__(self, root: Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConversionError(str(self.root), "missing", "must be a directory holding config.json and "
                                  "safetensors shards")
        self.config = read_json(self.root / CONFIG)

    @cached_property
    def largest_shard_bytes(self) -> int:
        return max((self.root / f).stat().st_size for f in {t.file for t in self.tensors.values()})

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor's shard, shape and dtype, from the index and the shards' headers (read on
        first use, so a config that is refused never gets that far)."""
        if (self.root / INDEX).is_file():
            weight_map = read_json(self.root / INDEX).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(str(self.root / INDEX), weight_map, "must have a non-empty 'weight_map'")
        elif (self.root / SINGLE).is_file():
            weight_map = {name: SINGLE for name in read_header(self.root / SINGLE)}
        else:
            raise ConversionError(str(self.root), "no weights", f"holds neither {SINGLE} nor {INDEX} (only "
                                  "safetensors checkpoints are read, not pytorch_model.bin)")
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, []).append(name)
        out: dict[str, TensorInfo] = {}
        for file, names in sorted(by_file.items()):
            path = self.root / file
            if not path.is_file():
                raise ConversionError(str(path), "missing", f"is listed in {INDEX} for tensor {names[0]} "
                                      f"({len(names)} tensors in all); the shard must be in the directory")
            header = read_header(path)
            for name in names:
                if name not in header:
                    raise ConversionError(f"{path}: {name}", "missing", f"{INDEX} places this tensor in {file}, "
                                          "whose header does not list it")
                h = header[name]
                out[name] = TensorInfo(file, tuple(h["shape"]), h["dtype"], h["start"])
        return out

    def where(self, name: str) -> str:
        """``path: tensor`` for error messages."""
        info = self.tensors.get(name)
        return f"{self.root / info.file}: {name}" if info else f"{self.root}: {name}"

    def read(self, names: list[str]) -> list[Tensor]:
        """The tensors ``names``, in that order: each read straight into its own buffer."""
        out: dict[str, Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.tensors[name].file, []).append(name)
        for file, group in by_file.items():
            with (self.root / file).open("rb") as f:
                for name in group:
                    info = self.tensors[name]
                    buf = bytearray(info.nbytes)
                    f.seek(info.start)
                    if f.readinto(buf) != info.nbytes:
                        raise ConversionError(self.where(name), "truncated", "the shard ends before this tensor's bytes")
                    dtype = TORCH_DTYPES[info.dtype]
                    out[name] = (torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
                                 ).reshape(info.shape)
        return [out[n] for n in names]


def shard_names(n: int) -> list[str]:
    """The file names transformers gives ``n`` shards."""
    if n == 1:
        return [SINGLE]
    return [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]


class ShardWriter:
    """One safetensors file written tensor by tensor: the header (names, dtypes, shapes, byte ranges)
    is known up front, so each tensor can be written as soon as it exists and dropped right after.
    (safetensors' own ``save_file`` takes every tensor at once and copies them all into one more
    buffer.) Tensors must come in the order of ``specs``."""

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in specs:
            n = torch.Size(shape).numel() * dtype.itemsize
            header[name] = {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.specs, self.next = specs, 0
        self.file = Path(path).open("wb")
        self.file.write(struct.pack("<Q", len(raw)))
        self.file.write(raw)

    def write(self, name: str, t: Tensor) -> None:
        want, dtype, shape = self.specs[self.next]
        assert (name, t.dtype, tuple(t.shape)) == (want, dtype, tuple(shape)), f"{name} out of order or reshaped"
        self.file.write(memoryview(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))
        self.next += 1

    def close(self) -> None:
        assert self.next == len(self.specs), f"{len(self.specs) - self.next} tensors were not written"
        self.file.close()


def write_shard(path: Path, tensors: dict[str, Tensor]) -> None:
    """Write ``tensors`` as one safetensors file (sorted by name), emptying the dict as it goes."""
    names = sorted(tensors)
    writer = ShardWriter(path, [(n, tensors[n].dtype, tuple(tensors[n].shape)) for n in names])
    for name in names:
        writer.write(name, tensors.pop(name))
    writer.close()


def write_index(root: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (root / INDEX).write_text(json.dumps(index, indent=2) + "\n")
