"""``fsmoe train``: the training loop — data, optimizer, schedule, metrics, plots, checkpoints.

Shape legend: B sequences per batch (this rank's share), L sequence length, V vocabulary (256 bytes).

One step: draw a batch -> forward (bf16 autocast on GPU if asked; fsmoe.precision) -> loss = CE +
aux_loss -> backward -> ``sync_grads`` -> ``grad_norm`` -> clipped AdamW step (fused on CUDA; skipped if the
loss or grad norm is not finite, fsmoe.guard) -> LR schedule step -> routers' ``after_step`` (e.g.
DeepSeek bias update). On CUDA the step never waits for the GPU: its results stay on the device
(``StepResult``) and are read once per logged or checkpoint step, so the host queues the next
steps while the GPU works. Every ``log_every`` steps a record goes to
``metrics.jsonl`` and TensorBoard; every ``eval_every`` steps and at the end the val split is
scored; every ``ckpt_every`` steps and at the end a DCP checkpoint is written; at the end the
plots are drawn and the final val loss is printed next to the val loss of byte frequencies alone.

Run directory::

    config.json    the resolved RunConfig (the base config of ``--resume``)
    metrics.jsonl  one record per logged step (see fsmoe.metrics)
    routing_trace.jsonl.gz  train.trace: each step's source-rank x expert counts, op timings and a sample of
                            the experts tokens chose together (fsmoe.placement.traffic)
    tb/            TensorBoard events
    ckpt/step_N/   the last two DCP checkpoints
    loss.png, expert_load.png

Distributed seams (filled in by fsmoe.parallel, not here): the Trainer takes an optional
``groups`` (fsmoe.parallel.ParallelGroups; uses ``dp_rank`` and ``dp``) and then draws only its
DP rank's rows of each global batch; ``sync_grads`` and ``grad_norm`` are methods to override;
only rank 0 writes metrics, config and plots; DCP checkpoints work with and without a process group.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from fsmoe import checkpoint, cpu_threads, plots
from fsmoe.config import ConfigError, RunConfig, TrainConfig, model_config_from_dict
from fsmoe.data import BatchSampler, Corpus, check_vocab, eval_batches, load_corpus, nats_to_bits
from fsmoe.graph_step import GraphedStep
from fsmoe.guard import NonFiniteGuard
from fsmoe.metrics import MetricsLog, expert_load, imbalance, read_metrics
from fsmoe.models import ModelOutput, build_model
from fsmoe.models.flops import flops_per_token, peak_tflops
from fsmoe.models.hf.convert import load_weights
from fsmoe.op_clock import OpClock, StepClock
from fsmoe.parallel.groups import ParallelGroups
from fsmoe.placement.traffic import TRACE_FILE, ChoiceSampler, TraceWriter, gather_traffic
from fsmoe.profiling import StepProfiler
from fsmoe.recompute import configure_recompute

if TYPE_CHECKING:  # the pipelined schedule is built by fsmoe.parallel's trainer, never here
    from fsmoe.schedule.run.training import TrainingSchedule

CONFIG_FILE = "config.json"


# ---------------------------------------------------------------- optimizer and schedule


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices (linear, expert weights), none on embeddings,
    norms and biases (every parameter with fewer than 2 dims, and every nn.Embedding weight)."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # each tied parameter once
        if p.requires_grad:
            (no_decay if p.ndim < 2 or id(p) in embedding_ids else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_multiplier(cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier of ``cfg.lr`` for optimizer step ``s`` (0-based): linear warmup over
    ``warmup_steps``, then cosine decay to ``min_lr_ratio`` at ``steps``."""

    def f(s: int) -> float:
        if s < cfg.warmup_steps:
            return (s + 1) / cfg.warmup_steps
        progress = min(1.0, (s - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def resolve_device(cfg: TrainConfig) -> torch.device:
    """``train.device`` -> torch.device; bf16 autocast is only offered on CUDA."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", cfg.device, "no CUDA device is visible; use cpu or auto")
    device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if cfg.dtype == "bfloat16" and device.type != "cuda":
        raise ConfigError("train.dtype", cfg.dtype, "bfloat16 autocast needs a CUDA device; use float32 on CPU")
    if cfg.compile and device.type != "cuda":
        raise ConfigError("train.compile", cfg.compile, "compiles for the GPU; set it to false on CPU")
    return device


def clip_coefficient(grad_norm: Tensor, max_norm: float) -> Tensor | None:
    """The factor that scales gradients to norm ``max_norm`` (``train.grad_clip``; None = off):
    ``min(1, max_norm / (norm + 1e-6))``, torch.nn.utils.clip_grad_norm_'s formula."""
    return torch.clamp(max_norm / (grad_norm + 1e-6), max=1.0) if max_norm > 0 else None


def compile_dense_parts(model: nn.Module) -> None:
    """``train.compile``: torch.compile each block's attention, norms and dense FFN in place
    (parameter names unchanged, so checkpoints are too). The MoE layers stay eager: their token
    counts change every step, which would make the compiler retrace."""
    for block in model.layers:
        for part in (block.attn_norm, block.attn, block.ffn_norm) + (() if block.is_moe else (block.ffn,)):
            part.compile()


# ---------------------------------------------------------------- run directory and config


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """A new run must not overwrite an earlier one; a resumed run needs one to continue; the
    directory (or the nearest existing folder above it) must be a writable directory."""
    existing = next(p for p in (run_dir.absolute(), *run_dir.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not a directory" if not existing.is_dir() else "is not writable"
        raise ConfigError("--run-dir", str(run_dir), f"{existing} {what}; choose another --run-dir")
    holds_run = (run_dir / "metrics.jsonl").exists() or bool(checkpoint.list_checkpoints(run_dir))
    if holds_run and not resume:
        raise ConfigError("--run-dir", str(run_dir), "already holds a run (metrics.jsonl / ckpt/); pass --resume "
                          "to continue it, or choose another --run-dir")


def saved_config(run_dir: Path) -> dict | None:
    """The resolved config a run in ``run_dir`` was started with (None if there is none). An
    older fsmoe saved ``train.data`` as one string of paths joined by ``os.pathsep``: that
    becomes the list it stood for."""
    path = run_dir / CONFIG_FILE
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise checkpoint.CheckpointError("--resume", str(path), f"is not valid JSON ({e})") from None
    if not isinstance(saved, dict):
        raise checkpoint.CheckpointError("--resume", str(path), "does not hold a config (a JSON object)")
    train = saved.get("train")
    if isinstance(train, dict) and isinstance(train.get("data"), str):
        train["data"] = [p for p in train["data"].split(os.pathsep) if p]
    return saved


def load_checked_corpus(cfg: RunConfig) -> Corpus:
    """``train.data`` loaded, with every check that needs the data (its size, and a vocabulary
    that holds all its tokens)."""
    t = cfg.train
    corpus = load_corpus(t.data, t.data_limit_mb, t.val_fraction, min_tokens=t.seq_len + 1)
    check_vocab(corpus, cfg.model.vocab_size)
    return corpus


def unigram_comparison(val_loss: float, unigram: float) -> str:
    """``vs X nats (Y bits) for byte frequencies alone: Z nats below|ABOVE`` (both on the val split)."""
    gap = unigram - val_loss
    return (f"vs {unigram:.3f} nats ({nats_to_bits(unigram):.2f} bits) for byte frequencies alone (the train "
            f"split's, scored on the val split): {abs(gap):.2f} nats {'below' if gap > 0 else 'ABOVE'}, so the "
            f"model {'uses' if gap > 0 else 'does not yet use'} context")


def _first_difference(old: Any, new: Any, prefix: str) -> tuple[str, Any, Any] | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            diff = _first_difference(old.get(key), new.get(key), f"{prefix}.{key}")
            if diff:
                return diff
        return None
    return None if old == new else (prefix, old, new)


# Model fields that choose how the same math runs (kernels), not the model: a resumed run may change them.
IMPLEMENTATION_FIELDS = ("moe.kernels", "moe.experts.gemm")


def _without_implementation_fields(model: dict) -> dict:
    model = copy.deepcopy(model)
    for dotted in IMPLEMENTATION_FIELDS:
        *parents, leaf = dotted.split(".")
        node = model
        for key in parents:
            node = node.get(key, {})
        node.pop(leaf, None)
    return model


def check_resume_config(saved: dict, cfg: RunConfig) -> None:
    """The model of a resumed run must be exactly the checkpointed one (its shape and routing;
    the kernels it runs on may change: IMPLEMENTATION_FIELDS). The saved model config is rebuilt
    first, so fields added to fsmoe since then take their defaults (the rest of the saved config,
    e.g. its layout, does not matter here)."""
    old_model = _without_implementation_fields(dataclasses.asdict(model_config_from_dict(saved.get("model", {}))))
    diff = _first_difference(old_model, _without_implementation_fields(cfg.to_dict()["model"]), "model")
    if diff:
        name, old, new = diff
        raise ConfigError(name, new, f"differs from the checkpointed run ({name}={old!r}); a resumed run keeps "
                          "its model, so drop that override or start a new --run-dir")


def check_resumable(run_dir: Path, cfg: RunConfig) -> None:
    """``run_dir`` holds a run to resume with ``cfg``: a checkpoint (intact or not: that is
    checked when one is picked) and a saved config whose model ``cfg`` keeps."""
    checkpoint.latest_checkpoint(run_dir)
    saved = saved_config(run_dir)
    if saved is None:
        raise checkpoint.CheckpointError("--resume", str(run_dir / CONFIG_FILE),
                                         "is missing, so the checkpoint's model config is unknown")
    check_resume_config(saved, cfg)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------- the trainer


@dataclass(frozen=True)
class StepMetrics:
    """What one optimizer step measured, on the host."""

    loss: float  # cross-entropy, nats per token
    aux_loss: float
    grad_norm: float  # before clipping
    lr: float  # learning rate this step used
    tokens_per_expert: list[Tensor]  # one [E] int64 per MoE layer
    dropped: int
    nonfinite_steps: int  # steps so far (since this process started) whose update was skipped
    first_nonfinite: int  # the first of them (1-based step number), -1 if none


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step measured, still on the device. ``read()`` copies it to the host in
    one transfer, which waits for the step to finish: the loop reads only the steps it logs."""

    loss: Tensor  # scalar (fp32; fp64 once reduced over ranks)
    aux_loss: Tensor  # scalar
    grad_norm: Tensor  # scalar
    lr: float
    tokens_per_expert_ME: Tensor  # [M, E] int64, M MoE layers
    dropped: Tensor  # scalar int64
    nonfinite: Tensor  # [2] int64: (count, first step) from the NonFiniteGuard

    def read(self) -> StepMetrics:
        M_E = self.tokens_per_expert_ME
        packed = torch.cat([torch.stack([self.loss.double(), self.aux_loss.double(), self.grad_norm.double()]),
                            self.dropped.double().view(1), self.nonfinite.double(),
                            M_E.double().flatten()]).cpu()
        loads = packed[6:].view(M_E.shape).long()
        return StepMetrics(float(packed[0]), float(packed[1]), float(packed[2]), self.lr, list(loads),
                           int(packed[3]), int(packed[4]), int(packed[5]))


@dataclass(frozen=True)
class DeviceStep:
    """The device part of a step's results (see ``StepResult`` for the fields)."""

    loss: Tensor
    aux_loss: Tensor
    grad_norm: Tensor
    tokens_per_expert_ME: Tensor
    dropped: Tensor
    nonfinite: Tensor

    def clone(self) -> "DeviceStep":
        return DeviceStep(*(t.clone() for t in dataclasses.astuple(self)))


class Trainer:
    """Trains ``build_model(cfg.model)`` on ``cfg.train``'s data, writing into ``run_dir``.

    Everything that can fail on bad input (run dir, config, data, checkpoint) is checked in the
    constructor before anything is written, so a failed start leaves an earlier run untouched.
    """

    def __init__(self, cfg: RunConfig, run_dir: Path | str, *, resume: bool = False,
                 groups: ParallelGroups | None = None,
                 console: Console | None = None, init_from: Path | None = None):
        self.cfg, self.tcfg, self.run_dir, self.groups = cfg, cfg.train, Path(run_dir), groups
        self.init_from = init_from  # weights to start from (fsmoe run or HF directory); a new optimizer
        self.console = console or Console(soft_wrap=True)
        self.is_writer = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        check_run_dir(self.run_dir, resume)
        ckpt = self._find_checkpoint() if resume else None
        self.device = resolve_device(self.tcfg)
        self.threads_used = (cpu_threads.apply(self.tcfg.cpu_threads, groups is not None and groups.distributed)
                            if self.device.type == "cpu" else None)
        self.graphed: GraphedStep | None = None  # train.cuda_graph: set once the trainer is built
        # A captured step must not keep autocast's cached weight casts from the capture: they
        # would be the weights of that step, not of each replay.
        self.autocast = (functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16,
                                           cache_enabled=not self.tcfg.cuda_graph)
                         if self.tcfg.dtype == "bfloat16" else contextlib.nullcontext)
        torch.manual_seed(self.tcfg.seed)
        self.corpus, self.sampler, self.val_batches = self._build_data()
        self.model = self.build_model().to(self.device)
        configure_recompute(self.model, self.tcfg.activation_checkpointing)
        if self.tcfg.compile:
            compile_dense_parts(self.model)
        self.optimizer, self.scheduler = self._build_optimizer()
        self.guard = NonFiniteGuard(self.tcfg.on_nonfinite, self.device)
        self.step = 0
        if ckpt is not None:
            checkpoint_state = self.state_dict()
            checkpoint.load(ckpt, checkpoint_state, verified=True)
            self.load_state_dict(checkpoint_state)
        self.moe_schedule = self.build_schedule()  # fsmoe.schedule.run.training.TrainingSchedule or None
        if self.tcfg.cuda_graph:
            self.graphed = GraphedStep(self)
        self._schedule_metrics: dict[str, Any] = {}
        if self.groups is not None and self.groups.distributed:
            # every rank has checked the run directory before rank 0 writes into it; without this a
            # slower rank could find rank 0's fresh metrics.jsonl and refuse the run as an old one
            dist.barrier(group=self.groups.world_group)
        if self.is_writer:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _write_json_atomic(self.run_dir / CONFIG_FILE, cfg.to_dict())
        self.metrics = MetricsLog(self.run_dir, self.step, enabled=self.is_writer)
        self.tracer = self._trace_writer() if self.tcfg.trace and self.is_writer else None
        # the trace also carries rank 0's op timings of each step (fsmoe.op_clock)
        self.op_clock = OpClock(self.model.moe_layers(), self.device) if self.tracer is not None else None
        # and which experts rank 0's first tokens chose together (the counts lose that), and the
        # step's phases (forward, backward, gradient sync, optimizer)
        self.choices = ChoiceSampler(self.model.moe_layers()) if self.tracer is not None else None
        self.step_clock = StepClock(self.device) if self.tracer is not None else None

    def _trace_writer(self) -> TraceWriter:
        """``train.trace``: the routing trace of this run (fsmoe.placement.traffic; rank 0 writes)."""
        m = self.cfg.model.moe
        world = self.groups.world if self.groups is not None else 1
        ep_of = [self.groups.layout.coords(r).ep for r in range(world)] if self.groups is not None else [0]
        return TraceWriter(self.run_dir / TRACE_FILE, {
            "num_layers": len(self.model.moe_layers()), "num_experts": m.num_experts, "sources": world,
            "source_ep_rank": ep_of, "ep": self.cfg.parallel.ep, "top_k": m.router.top_k,
            "tokens_per_step": self.tcfg.batch_size * self.tcfg.seq_len, "run": self.cfg.name})

    def _build_data(self) -> tuple[Corpus, BatchSampler, list[tuple[Tensor, Tensor]]]:
        """The corpus, this rank's train sampler, and the fixed validation batches."""
        t = self.tcfg
        corpus = load_checked_corpus(self.cfg)
        dp_rank, dp_size = self._dp_shard()
        sampler = BatchSampler(corpus.train_N, t.batch_size, t.seq_len, t.seed, dp_rank, dp_size)
        return corpus, sampler, eval_batches(corpus.val_N, t.batch_size, t.seq_len, t.eval_batches)

    def _build_optimizer(self) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
        t = self.tcfg
        # Fused on CUDA: one kernel over all parameters instead of a dozen foreach passes. CPU keeps
        # the foreach path its tests were written on.
        optimizer = torch.optim.AdamW(param_groups(self.model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                                      eps=t.eps, fused=self.device.type == "cuda")
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(t))

    def build_model(self) -> nn.Module:
        """The model, initialised from ``train.seed`` on the training device, or loaded from
        ``init_from`` (the full one-process model: fsmoe.parallel's trainer shards it afterwards).
        Drawn on a GPU, gpt2-xl-moe cut to 8 layers (900M parameters) takes well under a second;
        drawn on the CPU first it took most of a minute per rank before the first step."""
        if self.cfg.model.moe.impl != "fsmoe" and self.groups is None:
            raise ConfigError("model.moe.impl", self.cfg.model.moe.impl, "a peer's MoE layer runs under the "
                              "distributed trainer; launch with `fsmoe train --nproc N` (N >= 2) or use 'fsmoe'")
        with torch.device(self.device):
            model = build_model(self.cfg.model, seed=self.tcfg.seed)
        if self.init_from is not None:
            self._say_loaded(load_weights(model, self.init_from))
        return model

    def _say_loaded(self, loaded: str) -> None:
        """Where ``init_from``'s weights came from (rank 0)."""
        if self.is_writer:
            self.console.print(f"weights from {loaded} (new optimizer)", markup=False, highlight=False)

    def build_schedule(self) -> TrainingSchedule | None:
        """The pipelined MoE schedule (``parallel.schedule``); fsmoe.parallel's trainer installs
        it. One process runs the default schedule only."""
        if self.cfg.parallel.schedule != "default":
            raise ConfigError("parallel.schedule", self.cfg.parallel.schedule,
                              "a pipelined schedule runs under the distributed trainer; launch with "
                              "`fsmoe train --nproc N` (N >= 2) or use 'default'")
        return None

    def _find_checkpoint(self) -> Path:
        """The newest intact checkpoint (damaged newer ones are skipped with a warning), after
        checking that the run's saved model config matches this one."""
        check_resumable(self.run_dir, self.cfg)
        _, path, notes = checkpoint.find_intact(self.run_dir)
        for note in notes:
            if self.is_writer:
                self.console.print(f"warning: {note}", style="yellow", markup=False, highlight=False)
        return path

    def _dp_shard(self) -> tuple[int, int]:
        """(rank, size) of this process in the data-parallel group; (0, 1) without groups."""
        if self.groups is None:
            return 0, 1
        return self.groups.dp_rank, self.groups.dp

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit for bit."""
        model_sd, optim_sd = self.model_optim_state()
        sched_sd = self.scheduler.state_dict()
        if self.graphed is not None:  # plain floats, as an eager run saves them (fsmoe.graph_step)
            optim_sd = {**optim_sd, "param_groups": [
                {**g, "lr": float(g["lr"]), "capturable": False} for g in optim_sd["param_groups"]]}
            sched_sd = {**sched_sd, "_last_lr": [float(v) for v in sched_sd.get("_last_lr", [])]}
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"model": model_sd, "optim": optim_sd, "sched": sched_sd, "step": self.step,
                "data": self.sampler.state_dict(), "rng": rng}

    def model_optim_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Model and optimizer state keyed by parameter name (torch.distributed.checkpoint's format)."""
        return get_state_dict(self.model, self.optimizer)

    def load_model_optim_state(self, model_sd: dict[str, Any], optim_sd: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_model_optim_state(state["model"], state["optim"])
        self.scheduler.load_state_dict(state["sched"])
        self.step = int(state["step"])
        # The saved lr belongs to the saved schedule; a resume with another train.steps or
        # train.lr continues on the current one (same expression as LambdaLR: bit-exact otherwise).
        mult = lr_multiplier(self.tcfg)(self.scheduler.last_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = self.tcfg.lr * mult
        self.scheduler.base_lrs = [self.tcfg.lr] * len(self.optimizer.param_groups)
        self.sampler.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)

    def save_checkpoint(self) -> Path:
        self.guard.check_parameters(self.model, self.step)
        return checkpoint.save(self.run_dir, self.step, self.state_dict())

    # ------------------------------------------------------------ one step

    def loss(self, out: ModelOutput, y_BL: Tensor) -> Tensor:
        """Mean cross-entropy over all tokens, in fp32."""
        return F.cross_entropy(out.logits.float().flatten(0, 1), y_BL.flatten())

    def next_batch(self, into: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """The next (x_bL, y_bL) on the device, or copied into the device buffers ``into`` (a
        captured step's inputs). On CUDA from pinned host memory, copied without blocking: the
        copy queues behind the previous step's kernels and the host does not wait."""
        x_BL, y_BL = self.sampler.next()
        if self.device.type == "cuda":
            x_BL, y_BL = x_BL.pin_memory(), y_BL.pin_memory()
        if into is not None:
            return tuple(dst.copy_(src, non_blocking=True) for dst, src in zip(into, (x_BL, y_BL)))
        return x_BL.to(self.device, non_blocking=True), y_BL.to(self.device, non_blocking=True)

    def train_step(self) -> StepResult:
        """One optimizer step on the next batch; advances ``self.step``. Nothing here reads a
        device value on the host (except the pipelined schedule's timeline, when recorded).
        Under ``train.cuda_graph`` the device part is replayed from a captured graph."""
        if self.graphed is not None:
            return self.graphed.step()
        return self.train_step_eager()

    def train_step_eager(self) -> StepResult:
        """``train_step`` with every op launched from Python."""
        x_BL, y_BL = self.next_batch()
        lr = self.optimizer.param_groups[0]["lr"]
        return self.finish_step(self.device_step(x_BL, y_BL, self.step + 1), lr)

    def device_step(self, x_BL: Tensor, y_BL: Tensor, step_number: int | Tensor) -> DeviceStep:
        """Forward, backward, gradient sync, clipping and the guarded AdamW step (gradients freed
        after it): everything of a step that runs on the device. ``step_number``: 1-based."""
        self.model.train()
        step_clock = getattr(self, "step_clock", None)  # train.trace: the step's phases (fsmoe.op_clock)
        clock = step_clock.mark if step_clock is not None else (lambda: None)
        clock()
        if self.moe_schedule is not None:
            self.moe_schedule.begin_step(self.step)
        with self.autocast():
            out = self.model(x_BL)
            ce = self.loss(out, y_BL)
        aux = out.aux_loss.float()
        clock()
        (ce + aux).backward()
        clock()
        self.sync_grads()
        clock()
        grad_norm = self.grad_norm()
        if self.moe_schedule is not None:  # timeline + online refit after its last recorded step
            self._schedule_metrics.update(self.moe_schedule.end_step(self.step))
            while self.moe_schedule.notices:
                notice = self.moe_schedule.notices.pop(0)
                if self.is_writer:
                    self.console.print(notice)
        finite = self.all_finite(torch.isfinite(ce.detach()) & torch.isfinite(aux.detach()) & torch.isfinite(grad_norm))
        clip = clip_coefficient(grad_norm, self.tcfg.grad_clip)
        self.guard.apply(self.optimizer, finite, step_number, grad_coef=clip)
        clock()
        # Released now, not before the next backward: the next forward's activations then never
        # sit beside a full set of gradients (fsmoe.memory: one weight-sized buffer less at the peak)
        self.optimizer.zero_grad(set_to_none=True)
        loads = [s.tokens_per_expert for s in out.moe_stats]
        zero = torch.zeros((), dtype=torch.long, device=self.device)
        return DeviceStep(ce.detach(), aux.detach(), grad_norm.detach().float(),
                          torch.stack(loads) if loads else torch.zeros(0, 0, dtype=torch.long, device=self.device),
                          sum((s.dropped for s in out.moe_stats), zero), torch.stack([self.guard.count, self.guard.first]))

    def finish_step(self, d: DeviceStep, lr: float) -> StepResult:
        """The host's part after the device step: LR schedule, routers' step hooks, the step count,
        the routing observers (trace, placement)."""
        self.scheduler.step()
        for layer in self.model.moe_layers():
            layer.router.after_step()
        self.step += 1
        if d.tokens_per_expert_ME.numel():
            self.observe_routing(d.tokens_per_expert_ME)
        return StepResult(d.loss, d.aux_loss, d.grad_norm, lr, d.tokens_per_expert_ME, d.dropped, d.nonfinite)

    def observe_routing(self, counts_ME: Tensor) -> None:
        """This rank's routing counts of the step just taken (``[M, E]``): every rank's go to the
        routing trace (``train.trace``; then a collective and a host sync per step).
        fsmoe.parallel's trainer also feeds them to the expert placement policy."""
        if self.tcfg.trace:
            if self.device.type == "cuda":
                # the step's queued work is the step's, not tracing's: wait for it before the clock
                # starts (tracing reads the counts on the host right after, so this adds no wait)
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            counts_MRE = gather_traffic(counts_ME, self.groups.world_group if self.groups is not None else None)
            if self.tracer is not None:
                ops, choices, phases = self.op_clock.collect(), self.choices.collect(), self.step_clock.collect()
                if phases is not None:  # what tracing itself took of this step (the gather, the reads)
                    phases["trace"] = round(time.perf_counter() - t0, 7)
                self.tracer.write(self.step, counts_MRE, ops, choices, phases)

    def all_finite(self, finite: Tensor) -> Tensor:
        """Whether every rank's step was finite (one process: its own flag). Every rank must take
        the same decision, or the replicas would drift apart."""
        return finite

    def sync_grads(self) -> None:
        """Average gradients over data-parallel ranks. In one process there is nothing to
        average; fsmoe.parallel's trainer overrides this for DP/EP/ESP."""

    def grad_norm(self) -> Tensor:
        """Total gradient L2 norm (before clipping). Override for group-aware norms
        (expert-parallel shards) under fsmoe.parallel."""
        return torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean cross-entropy over the fixed validation batches (no RNG is consumed)."""
        self.model.eval()
        losses = []
        for x_BL, y_BL in self.val_batches:
            with self.autocast():
                out = self.model(x_BL.to(self.device))
                losses.append(self.loss(out, y_BL.to(self.device)).item())
        self.model.train()
        return sum(losses) / len(losses)

    # ------------------------------------------------------------ the loop

    def fit(self) -> dict[str, Any]:
        """Train to ``train.steps``; returns the summary printed at the end."""
        t = self.tcfg
        self._print_header()
        with self._progress() as progress:
            task = progress.add_task("train", total=t.steps, completed=self.step, stats="")
            clock, tokens = time.perf_counter(), 0
            profiler = self._step_profiler(progress.console)
            while self.step < t.steps:
                result = self.train_step()
                if profiler is not None:
                    profiler.step()
                tokens += t.batch_size * t.seq_len
                last = self.step == t.steps
                evaluate = self.step % t.eval_every == 0 or last
                logged = self.step % t.log_every == 0 or evaluate
                save = bool(t.ckpt_every and self.step % t.ckpt_every == 0) or last
                progress.update(task, completed=self.step)
                if not (logged or save):
                    continue  # nothing read: the host goes on queueing the next step
                metrics = result.read()  # waits for this step: the window's time is now complete
                tokens_per_s = tokens / max(time.perf_counter() - clock, 1e-9)
                self.guard.check(metrics.nonfinite_steps, metrics.first_nonfinite)
                if logged:
                    record = self._record(metrics, tokens_per_s)
                    self._log(record, evaluate, progress.console)
                    progress.update(task, stats=(
                        f"loss {metrics.loss:.3f}  {tokens_per_s:,.0f} tok/s{self._mfu_text(record)}  "
                        f"imbalance {record['imbalance']:.2f}  dropped {metrics.dropped}"))
                if save:
                    self.save_checkpoint()
                # tokens/s covers training only, not evaluation or checkpointing
                clock, tokens = time.perf_counter(), 0
            if profiler is not None:
                profiler.close()
        self.metrics.close()
        if self.tracer is not None:
            self.tracer.close()
            self.op_clock.close()
        return self._finish()

    def _step_profiler(self, console: Console) -> StepProfiler | None:
        """``train.torch_profile_steps``: every rank traces; rank 0 prints its summary."""
        if not self.tcfg.torch_profile_steps:
            return None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return StepProfiler(self.run_dir, self.tcfg.torch_profile_steps, rank,
                            console.print if self.is_writer else None)

    def mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilisation of the job's GPUs at ``tokens_per_s`` (fsmoe.models.flops); None on CPU
        or an unknown card."""
        if self.device.type != "cuda":
            return None
        peak = peak_tflops(torch.cuda.get_device_name(self.device))
        if peak is None:
            return None
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return tokens_per_s * self.flops_per_token / (peak * 1e12 * world)

    @functools.cached_property
    def flops_per_token(self) -> float:
        return flops_per_token(self.cfg.model, self.parameter_counts()[1], self.tcfg.seq_len)

    @staticmethod
    def _mfu_text(record: dict[str, Any]) -> str:
        return f"  {100 * record['mfu']:.1f}% MFU" if record.get("mfu") is not None else ""

    def _record(self, r: StepMetrics, tokens_per_s: float) -> dict[str, Any]:
        load = expert_load(r.tokens_per_expert)
        record = {"step": self.step, "loss": r.loss, "lr": r.lr, "tokens_per_s": tokens_per_s,
                  "grad_norm": r.grad_norm, "aux_loss": r.aux_loss, "dropped": r.dropped, "expert_load": load,
                  "imbalance": imbalance(load), **self._pop_schedule_metrics()}
        mfu = self.mfu(tokens_per_s)
        if mfu is not None:
            record["mfu"] = mfu
        if self.device.type == "cuda":  # peak since the start: weights, optimizer state and activations
            record["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        if self.tcfg.on_nonfinite == "skip":
            record["skipped_steps"] = r.nonfinite_steps
        return record

    def _pop_schedule_metrics(self) -> dict[str, Any]:
        out, self._schedule_metrics = self._schedule_metrics, {}
        return out

    def _log(self, record: dict[str, Any], evaluate: bool, console: Console) -> None:
        """Add ``val_loss`` if evaluating, write the record, and print it where no live bar shows it."""
        if evaluate:
            record["val_loss"] = self.evaluate()
        if self.is_writer and (evaluate or not console.is_terminal):
            console.print(self._log_line(record))
        self.metrics.write(record)

    def _log_line(self, rec: dict[str, Any]) -> str:
        val = f"  val_loss {rec['val_loss']:.4f}" if "val_loss" in rec else ""
        return (f"step {rec['step']:>5}  loss {rec['loss']:.4f}{val}  lr {rec['lr']:.2e}"
                f"  {rec['tokens_per_s']:,.0f} tok/s{self._mfu_text(rec)}"
                f"  imbalance {rec['imbalance']:.2f}  dropped {rec['dropped']}")

    def _progress(self) -> Progress:
        return Progress(TextColumn("[bold blue]step"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(),
                        TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[stats]}"),
                        console=self.console, disable=not (self.is_writer and self.console.is_terminal))

    def parameter_counts(self) -> tuple[int, int]:
        """(all, active per token) parameters of the model; fsmoe.parallel counts global tensors."""
        return self.model.num_parameters(), self.model.num_parameters(active_only=True)

    def _print_header(self) -> None:
        if not self.is_writer:
            return
        m, c, h = self.model, self.corpus, self.corpus.unigram_val_loss_nats()
        total, active = self.parameter_counts()
        self.console.print(
            f"[bold]fsmoe train[/] {self.cfg.name}: {total / 1e6:.2f}M parameters "
            f"({active / 1e6:.2f}M active), {len(m.moe_layers())} MoE layers x "
            f"{self.cfg.model.moe.num_experts} experts (top-{self.cfg.model.moe.router.top_k}, "
            f"{self.cfg.model.moe.router.name}) on {self.device}")
        t = self.tcfg
        precision = ("bf16 compute, fp32 weights and optimizer state" if t.dtype == "bfloat16" else "fp32")
        self.console.print(f"precision: {precision}; AdamW {'fused' if self.device.type == 'cuda' else 'foreach'}; "
                           f"activation checkpointing: {t.activation_checkpointing}"
                           f"{'; torch.compile on dense parts' if t.compile else ''}"
                           f"{f'; CPU threads: {self.threads_used}' if self.threads_used else ''}")
        if self.cfg.parallel.shard != "none" and (self.groups is None or not self.groups.distributed):
            self.console.print(f"parallel.shard={self.cfg.parallel.shard}: one process holds the only copy of "
                               "the optimizer state; nothing to split (it splits over data-parallel replicas)")
        self.console.print(f"data: {c.source}: {c.num_files} files, {len(c.train_N):,} train / {len(c.val_N):,} "
                           f"val bytes; byte frequencies alone score {h:.3f} nats ({nats_to_bits(h):.3f} bits) "
                           "on the val split")
        if self.moe_schedule is not None:
            self.console.print(self.moe_schedule.describe())
        if self.step:
            done = f"; already at train.steps={self.tcfg.steps}, pass a larger --steps to go on" \
                if self.step >= self.tcfg.steps else ""
            self.console.print(f"resumed from step {self.step} in {self.run_dir}{done}")

    def _finish(self) -> dict[str, Any]:
        """Plots, and the final val loss next to the val loss of byte frequencies alone (rank 0 prints)."""
        unigram = self.corpus.unigram_val_loss_nats()
        records = read_metrics(self.run_dir) if self.is_writer else []
        val = [r["val_loss"] for r in records if r.get("val_loss") is not None]
        summary = {"step": self.step, "val_loss": val[-1] if val else None, "unigram_val_loss_nats": unigram,
                   "run_dir": str(self.run_dir)}
        if not self.is_writer:
            return summary
        plots.plot_loss(records, unigram, self.run_dir / "loss.png")
        plots.plot_expert_load(records, self.run_dir / "expert_load.png")
        if summary["val_loss"] is not None:
            self.console.print(f"[bold green]final val loss {summary['val_loss']:.3f} nats[/] "
                               + unigram_comparison(summary["val_loss"], unigram))
        self.console.print(f"outputs in {self.run_dir}/: metrics.jsonl, tb/, ckpt/, loss.png, expert_load.png")
        return summary
