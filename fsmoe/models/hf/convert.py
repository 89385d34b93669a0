"""Hugging Face directory <-> fsmoe run directory, streamed tensor by tensor.

HF -> fsmoe (:func:`hf_to_run`):

1. read ``config.json`` and every shard's header (no weights): pick the family, translate the
   config, build the model on the meta device for fsmoe's tensor names and shapes, expand the
   family's table and check that every HF tensor it needs exists with the shape the config implies
   and that no HF tensor is left over. Every error is raised here, before anything is written.
2. write the run into ``OUT.partial``: ``config.json``, the source's ``hf_config.json`` and its
   tokenizer files, and a DCP checkpoint ``ckpt/step_0`` holding ``{"model": state}`` as full
   (global) tensors, so it loads at any EP/ESP/MP layout. DCP asks for each tensor when it writes
   it (:class:`_LazyPlanner`): it is read from its shard(s), converted, written and dropped, so
   host memory holds one tensor at a time, whatever the size of the model. Each tensor gets its own
   ``.distcp`` file: DCP's writer keeps every tensor of a file alive until that file is finished.
3. write the checksum manifest and rename ``OUT.partial`` to ``OUT``.

fsmoe -> HF (:func:`run_to_hf`) goes the other way from the run's newest intact checkpoint into
``OUT.partial`` and then ``OUT``: each shard's header is written first (every name and shape is
known from the config), then each fsmoe tensor is loaded alone, converted, appended and dropped. Tensors keep the dtype they are stored in (``dtype`` casts them), so HF -> fsmoe ->
HF is byte for byte the same.
"""
from __future__ import annotations

import dataclasses
import json
import re
import resource
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from fsmoe import checkpoint
from fsmoe.config import ConfigError, ModelConfig, config_from_dict, model_config_from_dict
from fsmoe.models.decoder import build_model
from fsmoe.models.hf import FAMILIES, Family, family_of
from fsmoe.models.hf.family import ConversionError
from fsmoe.models.hf.files import (CONFIG, TOKENIZER_FILES, TORCH_DTYPES, HFCheckpoint, ShardWriter, read_json,
                                   shard_names, write_index)
from fsmoe.models.hf.mapping import Entry, Layout, expand, hf_shape, to_hf, to_ours

HF_CONFIG = "hf_config.json"  # the source's config.json, kept in a converted run for --to-hf
CKPT_STEP = 0
_STRAY = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # buffers some old checkpoints saved; derived, not weights
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class ConvertReport:
    """What one conversion did, for the command to print and the device script to record."""

    tensors: int  # fsmoe tensors written or read
    bytes: int  # bytes of weights converted
    seconds: float
    start_rss_bytes: int  # resident memory before the conversion started
    peak_rss_bytes: int  # the process's peak resident memory
    largest_shard_bytes: int  # the largest HF shard read or written
    skipped: tuple[str, ...]  # HF tensors not converted (e.g. a multi-token-prediction layer)
    family: str


@dataclass(frozen=True)
class ImportPlan:
    family: Family
    model: ModelConfig
    model_dict: dict
    layout: Layout
    entries: list[Entry]
    shapes: dict[str, tuple[int, ...]]  # fsmoe name -> shape
    dtypes: dict[str, torch.dtype]  # fsmoe name -> dtype stored in the HF shards
    skipped: tuple[str, ...]


def _rss_bytes(peak: bool) -> int:
    """This process's peak (``peak``) or current resident memory, in bytes (Linux; 0 where unknown)."""
    if peak:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.exists() else []
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith("VmRSS:")), 0)


def model_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """fsmoe's state-dict names and shapes of the one-process model ``cfg`` (built on meta)."""
    with torch.device("meta"):
        model = build_model(cfg, seed=0)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _model_entries(family: Family, cfg: ModelConfig) -> list[Entry]:
    entries = expand(family.table, cfg)
    if cfg.tie_embeddings:  # fsmoe's state dict names the tied tensor twice; HF stores it once
        entries.append(Entry("lm_head.weight", ("model.embed_tokens.weight",), "copy"))
    return entries


def plan_import(ckpt: HFCheckpoint) -> ImportPlan:
    """Step 1 of :func:`hf_to_run`: every check, nothing read but headers."""
    where = str(ckpt.root / CONFIG)
    family = family_of(ckpt.config, where)
    model_dict = family.model_config(ckpt.config)
    try:
        cfg = model_config_from_dict(model_dict)
        cfg.validate()
    except ConversionError:
        raise
    except ConfigError as e:
        raise ConversionError(f"{where} -> {e.field_name}", e.value, e.allowed) from None
    shapes = model_shapes(cfg)
    entries = _model_entries(family, cfg)
    assert {e.ours for e in entries} == set(shapes), "the family table does not cover the model"
    dtypes: dict[str, torch.dtype] = {}
    for e in entries:
        want = hf_shape(e, shapes[e.ours])
        for name in e.hf:
            info = ckpt.tensors.get(name)
            if info is None:
                raise ConversionError(f"{ckpt.root}: {name}", "missing", f"{family.architecture} with this config.json "
                                      f"needs this tensor (for fsmoe's {e.ours}); no shard holds it")
            if info.shape != want:
                raise ConversionError(ckpt.where(name), list(info.shape), f"config.json implies shape {list(want)}")
            if info.dtype not in TORCH_DTYPES:
                raise ConversionError(ckpt.where(name), info.dtype, f"allowed dtypes are {sorted(TORCH_DTYPES)} "
                                      "(quantized checkpoints must be dequantized first)")
        kinds = {ckpt.tensors[n].dtype for n in e.hf}
        if len(kinds) > 1:
            raise ConversionError(ckpt.where(e.hf[0]), sorted(kinds), "the experts of one layer must share a dtype")
        dtypes[e.ours] = TORCH_DTYPES[kinds.pop()]
    used = {n for e in entries for n in e.hf}
    skipped = []
    for name in sorted(set(ckpt.tensors) - used):
        layer = _LAYER.match(name)
        if _STRAY.search(name) or (layer and int(layer.group(1)) >= cfg.n_layers):
            skipped.append(name)  # derived buffers; layers past num_hidden_layers (DeepSeek's MTP module)
            continue
        raise ConversionError(ckpt.where(name), "unexpected", f"is not part of the {family.architecture} model that "
                              "config.json describes (fsmoe would drop it)")
    layout = Layout(cfg, family.rope_interleaved(ckpt.config))
    return ImportPlan(family, cfg, model_dict, layout, entries, shapes, dtypes, tuple(skipped))


def check_out_dir(out: Path, flag: str = "OUT") -> None:
    """The output must be new (or an empty directory) and its parent writable."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(flag, str(out), "already exists and is not empty; choose a new directory")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConversionError(flag, str(out), f"{parent} is not a directory")


def _partial(out: Path) -> Path:
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _finish(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()  # checked empty
    tmp.rename(out)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


class _LazyPlanner(DefaultSavePlanner):
    """DCP plans from meta tensors, then asks for each tensor's data only when it writes it."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def resolve_data(self, write_item):
        return self.make(write_item.index.fqn)


def _quiet():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("ignore", message=".*single process.*")
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    return ctx


def run_name(hf_dir: Path) -> str:
    """A run name (letters, digits, . _ -) from the HF directory's name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(hf_dir).absolute().name).strip(".-") or "hf"


def hf_to_run(hf_dir: Path, out: Path) -> ConvertReport:
    """Convert the HF directory ``hf_dir`` into a new fsmoe run directory ``out``."""
    start_rss, t0 = _rss_bytes(False), time.perf_counter()
    ckpt = HFCheckpoint(Path(hf_dir))
    plan = plan_import(ckpt)
    check_out_dir(out)
    max_len = plan.model.max_seq_len
    run_cfg = config_from_dict({"name": run_name(hf_dir), "model": plan.model_dict,
                                "train": {"seq_len": min(128, max_len)}})
    tmp = _partial(Path(out))
    (tmp / "config.json").write_text(json.dumps(run_cfg.to_dict(), indent=2) + "\n")
    (tmp / HF_CONFIG).write_text(json.dumps(ckpt.config, indent=2) + "\n")
    _copy_tokenizer(ckpt.root, tmp)
    by_fqn = {f"model.{e.ours}": e for e in plan.entries}

    def make(fqn: str) -> Tensor:
        e = by_fqn[fqn]
        return to_ours(e, (ckpt.read([name])[0] for name in e.hf), plan.layout).contiguous()

    state = {"model": {e.ours: torch.empty(plan.shapes[e.ours], dtype=plan.dtypes[e.ours], device="meta")
                       for e in plan.entries}}
    step_dir = tmp / "ckpt" / f"step_{CKPT_STEP}"
    step_dir.mkdir(parents=True)
    ctx = _quiet()
    try:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(step_dir, single_file_per_rank=False),
                 planner=_LazyPlanner(make), no_dist=True)
    finally:
        ctx.__exit__(None, None, None)
    checkpoint.write_manifest(step_dir)
    _finish(tmp, Path(out))
    total = sum(ckpt.tensors[n].nbytes for e in plan.entries for n in e.hf)
    return ConvertReport(len(plan.entries), total, time.perf_counter() - t0, start_rss, _rss_bytes(True),
                         ckpt.largest_shard_bytes, plan.skipped, plan.family.name)


# ---------------------------------------------------------------- fsmoe -> HF


def run_model_config(run_dir: Path) -> ModelConfig:
    """The model config saved in an fsmoe run directory."""
    saved = read_json(Path(run_dir) / "config.json")
    if not isinstance(saved.get("model"), dict):
        raise ConversionError(str(Path(run_dir) / "config.json"), sorted(saved)[:4], "is not an fsmoe run's config "
                              "(it has no 'model' section); a Hugging Face directory converts without --to-hf")
    try:
        cfg = model_config_from_dict(saved.get("model", {}))
        cfg.validate()
    except ConfigError as e:
        raise ConversionError(f"{Path(run_dir) / 'config.json'} -> {e.field_name}", e.value, e.allowed) from None
    return cfg


def export_family(cfg: ModelConfig, base: dict | None, name: str | None) -> Family:
    """The family to export as: ``name``, else the source's, else the one fsmoe's model matches."""
    if name is not None:
        if name not in FAMILIES:
            raise ConversionError("--family", name, f"allowed values are {sorted(FAMILIES)}")
        return FAMILIES[name]
    if base is not None:
        return family_of(base, HF_CONFIG)
    if cfg.attention == "mla":
        return FAMILIES["deepseek_v3"]
    return FAMILIES["qwen3_moe" if cfg.qk_norm else "mixtral"]


def _stored(md, key: str, ckpt_dir: Path, shape: tuple[int, ...]) -> torch.dtype:
    meta = md.state_dict_metadata.get(key)
    if meta is None or not hasattr(meta, "size"):
        raise ConversionError(f"{ckpt_dir}: {key}", "missing", "the checkpoint holds no such tensor")
    if tuple(meta.size) != tuple(shape):
        raise ConversionError(f"{ckpt_dir}: {key}", list(meta.size), f"config.json implies shape {list(shape)}")
    return meta.properties.dtype


def _group_shards(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Consecutive entries packed into shards of at most ``max_bytes`` (a larger entry alone)."""
    shards: list[list[int]] = [[]]
    acc = 0
    for k, n in enumerate(sizes):
        if shards[-1] and acc + n > max_bytes:
            shards.append([])
            acc = 0
        shards[-1].append(k)
        acc += n
    return shards


def run_to_hf(run_dir: Path, out: Path, *, family: str | None = None, dtype: torch.dtype | None = None,
              max_shard_bytes: int = 5 * 2**30) -> ConvertReport:
    """Write the newest intact checkpoint of the fsmoe run ``run_dir`` as a HF directory ``out``."""
    start_rss, t0 = _rss_bytes(False), time.perf_counter()
    run_dir = Path(run_dir)
    cfg = run_model_config(run_dir)
    base = read_json(run_dir / HF_CONFIG) if (run_dir / HF_CONFIG).is_file() else None
    fam = export_family(cfg, base, family)
    hf_cfg = {**(base or {}), **fam.hf_config(cfg)}
    check_out_dir(out)
    _, ckpt_dir, _ = checkpoint.find_intact(run_dir, set_aside=False)  # converting only reads the run
    md = _read_metadata(ckpt_dir)
    shapes = model_shapes(cfg)
    entries = expand(fam.table, cfg)
    stored = {e.ours: _stored(md, f"model.{e.ours}", ckpt_dir, shapes[e.ours]) for e in entries}
    out_dtype = {e.ours: dtype or stored[e.ours] for e in entries}
    sizes = [torch.Size(shapes[e.ours]).numel() * out_dtype[e.ours].itemsize for e in entries]
    layout = Layout(cfg, fam.rope_interleaved(hf_cfg))
    shards = _group_shards(sizes, max_shard_bytes)
    files = shard_names(len(shards))
    tmp = _partial(Path(out))
    weight_map: dict[str, str] = {}
    ctx = _quiet()
    try:
        for file, members in zip(files, shards):
            group = [entries[k] for k in members]
            writer = ShardWriter(tmp / file, [(name, out_dtype[e.ours], hf_shape(e, shapes[e.ours]))
                                              for e in group for name in e.hf])
            for e in group:  # one fsmoe tensor in memory at a time (and its HF pieces)
                state = {"model": {e.ours: torch.empty(shapes[e.ours], dtype=stored[e.ours])}}
                _load(state, ckpt_dir)
                for name, t in zip(e.hf, to_hf(e, state["model"].pop(e.ours), layout)):
                    writer.write(name, t.to(out_dtype[e.ours]))
                    weight_map[name] = file
            writer.close()
    finally:
        ctx.__exit__(None, None, None)
    if len(files) > 1:
        write_index(tmp, weight_map, sum(sizes))
    kinds = {str(d).removeprefix("torch.") for d in out_dtype.values()}
    hf_cfg["dtype"] = hf_cfg["torch_dtype"] = kinds.pop() if len(kinds) == 1 else "float32"
    (tmp / CONFIG).write_text(json.dumps(hf_cfg, indent=2) + "\n")
    _copy_tokenizer(run_dir, tmp)
    largest = max((tmp / f).stat().st_size for f in files)
    _finish(tmp, Path(out))
    return ConvertReport(len(entries), sum(sizes), time.perf_counter() - t0, start_rss, _rss_bytes(True), largest,
                         (), fam.name)


# ---------------------------------------------------------------- weights into a built model


def is_hf_dir(path: Path) -> bool:
    """A HF directory has a config.json naming ``architectures`` and no fsmoe checkpoints."""
    path = Path(path)
    return (path / CONFIG).is_file() and not (path / "ckpt").is_dir() and "architectures" in read_json(path / CONFIG)


def source_model(path: Path, option: str = "--init-from") -> dict:
    """The ``model`` section of the model stored at ``path`` (an fsmoe run or a HF directory);
    ``option``: what the command calls it, named when it is neither."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(option, str(path), "must be an fsmoe run directory or a Hugging Face directory")
    if is_hf_dir(path):
        return plan_import(HFCheckpoint(path)).model_dict
    return dataclasses.asdict(run_model_config(path))


def _read_metadata(ckpt_dir: Path):
    """The checkpoint's DCP metadata; ConversionError naming it when the file is damaged."""
    try:
        return dcp.FileSystemReader(ckpt_dir).read_metadata()
    except (Exception, CheckpointException) as e:  # DCP raises many types (pickle, IO, ...): all mean "unusable"
        raise _damaged(ckpt_dir, e) from None


def _load(state: dict, ckpt_dir: Path) -> None:
    """``dcp.load`` of ``state`` from ``ckpt_dir``; ConversionError naming it when a file is damaged."""
    try:
        dcp.load(state, checkpoint_id=ckpt_dir, no_dist=True)
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        raise _damaged(ckpt_dir, e) from None


def _damaged(ckpt_dir: Path, e: BaseException) -> ConversionError:
    reason = str(e).strip().splitlines()[-1][:300] if str(e).strip() else ""
    return ConversionError("checkpoint", str(ckpt_dir), f"is damaged ({type(e).__name__}: {reason}); move it away "
                           "to use an older one of the run")


def load_weights(model: nn.Module, path: Path) -> str:
    """Copy the weights stored at ``path`` (fsmoe run: its newest intact checkpoint; or a HF
    directory) into the one-process ``model``, whose config must match. Returns what was loaded."""
    path = Path(path)
    own = model.state_dict()
    shapes = {name: tuple(t.shape) for name, t in own.items()}
    if is_hf_dir(path):
        label, tensors = hf_tensors(path, shapes)
        with torch.no_grad():
            for name, full in tensors:
                own[name].copy_(full)
        return label
    ckpt_dir = run_checkpoint(path, shapes)
    ctx = _quiet()
    try:
        _load({"model": own}, ckpt_dir)
    finally:
        ctx.__exit__(None, None, None)
    return str(ckpt_dir)


def hf_tensors(path: Path, shapes: dict[str, tuple[int, ...]]):
    """(what is loaded, an iterator of (fsmoe name, tensor)) for the HF directory ``path``: each
    tensor converted whole, one at a time, after checking the directory against ``shapes`` (name
    -> the model's global shape)."""
    ckpt = HFCheckpoint(path)
    plan = plan_import(ckpt)
    _check_shapes(shapes, plan.shapes, str(path))
    tensors = ((e.ours, to_ours(e, (ckpt.read([name])[0] for name in e.hf), plan.layout)) for e in plan.entries)
    return f"{path} ({plan.family.architecture})", tensors


def run_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """The newest intact checkpoint of the fsmoe run ``path``, checked to hold ``model.<name>`` of
    every shape in ``shapes``; ConversionError otherwise."""
    try:
        _, ckpt_dir, _ = checkpoint.find_intact(path, set_aside=False)  # loading weights only reads the run
    except checkpoint.CheckpointError as e:
        reason = e.allowed.split("; drop --resume")[0].split("; start a new run")[0]  # advice for resuming: not here
        raise ConversionError("model", str(path), f"is an fsmoe run without an intact checkpoint ({reason})") from None
    md = _read_metadata(ckpt_dir)
    for name, shape in shapes.items():
        _stored(md, f"model.{name}", ckpt_dir, shape)
    return ckpt_dir


def _check_shapes(own: dict[str, tuple[int, ...]], theirs: dict[str, tuple[int, ...]], where: str) -> None:
    for name, shape in own.items():
        if name not in theirs or tuple(shape) != theirs[name]:
            raise ConversionError(f"{where}: {name}", list(theirs.get(name, ())) or "missing",
                                  f"the model being built has shape {list(shape)}")


__all__ = ["ConvertReport", "hf_tensors", "hf_to_run", "load_weights", "run_checkpoint", "run_to_hf", "source_model"]
