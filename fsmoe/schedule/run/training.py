"""The scheduler inside ``fsmoe train``: plan once at start-up, install, record a timeline.

Chosen at build time (``parallel.schedule``), never inside forward::

    ts = TrainingSchedule.build(cfg, model, groups, device, run_dir)   # None for "default"
    ... each step: ts.begin_step(step); forward; backward
    ts.sync_dense(model)            # finish the partitioned dense AllReduce (GradSync), before
                                    # the other reduce kinds and before the grad-norm
    metrics = ts.end_step(step)     # timeline: trace + Gantt + refit error after the last recorded step

What it installs: a ``PipelinedExecutor`` (the plan's r_fwd / r_bwd / IIO) on every MoE layer,
and a ``GradSync`` over the parameters reduced over the data-parallel group (attention, norms,
embeddings; ``ParamSharding.reduce == "dp"``), one block per transformer block plus one for
everything outside the blocks, whose partitions the executor's backward windows launch. Router
and shared-expert gradients ("world") and expert gradients ("edp") keep the plain flat AllReduce.
With a timeline, hooks on every block's attention also time ``dense_fwd`` / ``dense_bwd``.

Profile: ``parallel.profile`` if set, else a profile of the run's own ops on the actual groups at
start-up (``ProfileConfig.for_run``), written to ``<run_dir>/profile.json``.
"""
from __future__ import annotations

import csv
import dataclasses
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from fsmoe.config import RunConfig
from fsmoe.layer import sequential
from fsmoe.parallel.groups import ParallelGroups
from fsmoe.schedule.model.baselines import with_prediction
from fsmoe.schedule.model.engine import Engine
from fsmoe.schedule.model.plan import plan
from fsmoe.schedule.model.profile import Profile, refit
from fsmoe.schedule.model.simulate import record_block_ops, simulate_iteration
from fsmoe.schedule.model.timeline import (NOT_SCHEDULED, chrome_trace, gantt_png, refit_samples, shift, timed_ops,
                                           write_records)
from fsmoe.schedule.run.check import ScheduleCheck
from fsmoe.schedule.run.engine import Recorder, make_engine
from fsmoe.schedule.run.executor import PipelinedExecutor
from fsmoe.schedule.run.grad_sync import GradSync
from fsmoe.schedule.types import Lanes, LayerSchedule, LayerSpec, Layout, OpRecord, Schedule

TIMELINE_JSON, TIMELINE_PNG = "timeline.json", "timeline.png"
TIMELINE_RECORDS, TIMELINE_OPS = "timeline_records.jsonl", "timeline_ops.csv"


# ---------------------------------------------------------------------------- planning


def load_or_profile(path: str | None, groups: ParallelGroups, device: torch.device, run_dir: Path,
                    is_writer: bool, spec: LayerSpec) -> Profile:
    """``parallel.profile`` if given; else profile the run's own shapes (``spec``) in its compute
    dtype on ``groups`` (collective) and save it."""
    if path is not None:
        return Profile.load(path, field="parallel.profile")
    from fsmoe.schedule.run.profiler import ProfileConfig, run_profile

    dtype = torch.bfloat16 if spec.dtype_bytes == 2 and device.type == "cuda" else torch.float32  # as precision.py
    profile = run_profile(groups, device, ProfileConfig.for_run(spec, groups.layout, device), dtype)
    if is_writer:
        profile.save(Path(run_dir) / "profile.json")
    return profile


def plan_for_run(cfg: RunConfig, layout: Layout, profile: Profile) -> tuple[LayerSpec, Schedule]:
    """The Schedule of ``parallel.schedule`` for this model and layout; ``pipeline_degree`` forces r."""
    spec = LayerSpec.from_run_config(cfg)
    schedule = plan(spec, layout, profile, cfg.parallel.schedule)
    k = cfg.parallel.pipeline_degree
    if k:
        forced = dataclasses.replace(schedule, r_fwd=k, r_bwd=k, meta=dict(schedule.meta, forced_r=k))
        schedule = with_prediction(forced, spec, layout, profile)
    return spec, schedule


def describe(schedule: Schedule) -> str:
    """One line: policy, FSMoE case, r, lanes, gradient partitions."""
    g = schedule.gar
    parts = {"windows": f"windows {list(g.window_bytes)} bytes per MoE layer, rest after backward",
             "chunks": f"chunks of {g.chunk_bytes} bytes", "ready": "each block as soon as ready",
             "end": "one AllReduce after backward"}[g.mode]
    forced = " (forced by parallel.pipeline_degree)" if schedule.meta.get("forced_r") else ""
    return (f"schedule {schedule.policy}: r_fwd={schedule.r_fwd} r_bwd={schedule.r_bwd}{forced}, "
            f"case fwd/bwd {schedule.case_fwd}/{schedule.case_bwd}, IIO {'on' if schedule.iio else 'off'}; "
            f"dense gradient AllReduce: {parts}; predicted iteration {schedule.predicted_iter_s * 1e3:.2f} ms "
            f"(the MoE blocks; their router/norm glue only once a profile has been refitted online)")


# ---------------------------------------------------------------------------- gradient blocks


def dense_blocks(model: nn.Module) -> list[list[nn.Parameter]]:
    """Parameters reduced over the DP group, forward order: [outside the blocks] + one per block.

    The first entry (embeddings, final norm, head) becomes ready last in backward (the embedding
    gradient is complete only at the very end), so it is the last piece of the buffer."""
    from fsmoe.parallel.sharding import get_sharding

    def dp_params(module: nn.Module) -> list[nn.Parameter]:
        return [p for p in module.parameters() if p.requires_grad and get_sharding(p).reduce == "dp"]

    in_blocks = {id(p) for blk in model.layers for p in blk.parameters()}
    outside = [p for p in dp_params(model) if id(p) not in in_blocks]
    blocks = [outside] + [dp_params(blk) for blk in model.layers]
    return [ps for ps in blocks if ps]


# ---------------------------------------------------------------------------- timeline


def op_timings(iterations: list[list[OpRecord]], layout: Layout, profile: Profile) -> dict[tuple, list]:
    """``timeline.timed_ops`` of the scheduled ops ``profile`` has a fit for (the per-op error's ops)."""
    return {k: v for k, v in timed_ops(iterations, layout.peers).items()
            if k[1] not in NOT_SCHEDULED and profile.has(k[0])}


def write_op_table(iterations: list[list[OpRecord]], layout: Layout, profiles: dict[str, Profile], path: Path) -> Path:
    """``timeline_ops.csv``: per op, its median size and measured time over the recorded steps
    and each profile's prediction (ms) with its relative error; empty where a profile has no fit."""
    cols = ["rank", "phase", "layer", "kind", "chunk", "key", "runs", "n_median", "measured_ms"]
    for name in profiles:
        cols += [f"predicted_{name}_ms", f"error_{name}"]
    rows = []
    for (key, kind, phase, layer, chunk, rank), nts in sorted(timed_ops(iterations, layout.peers).items(),
                                                              key=lambda kv: (kv[0][5], kv[0][2] == "bwd", kv[0][3])):
        m = statistics.median(t for _, t in nts)
        row = {"rank": rank, "phase": phase, "layer": layer, "kind": kind, "chunk": chunk, "key": key,
               "runs": len(nts), "n_median": statistics.median(n for n, _ in nts), "measured_ms": f"{m * 1e3:.4f}"}
        for name, prof in profiles.items():
            p = statistics.median(prof.t(key, n) for n, _ in nts) if prof.has(key) else None
            row[f"predicted_{name}_ms"] = "" if p is None else f"{p * 1e3:.4f}"
            row[f"error_{name}"] = "" if p is None else f"{abs(p - m) / m:.4f}"
        rows.append(row)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return path


def op_errors(iterations: list[list[OpRecord]], layout: Layout, profile: Profile) -> list[float]:
    """Per op: |median predicted - median measured| / median measured, medians over the recorded
    iterations (the prediction of each iteration at that iteration's size)."""
    out = []
    for (key, *_), nts in op_timings(iterations, layout, profile).items():
        m = statistics.median(t for _, t in nts)
        out.append(abs(statistics.median(profile.t(key, n) for n, _ in nts) - m) / m)
    return out


def single_errors(iterations: list[list[OpRecord]], layout: Layout, profile: Profile) -> list[float]:
    """Per op and iteration: |predicted - measured| / measured of that one run (includes the
    iteration-to-iteration noise of the op)."""
    return [abs(profile.t(key, n) - t) / t for (key, *_), nts in op_timings(iterations, layout, profile).items()
            for n, t in nts]


def noise_floor(iterations: list[list[OpRecord]], layout: Layout, profile: Profile) -> float:
    """Median of |single run - the op's own median| / single run, over ops recorded more than once."""
    spread = [abs(t - statistics.median(u for _, u in nts)) / t
              for nts in op_timings(iterations, layout, profile).values() if len(nts) > 1 for _, t in nts]
    return statistics.median(spread) if spread else float("nan")


def write_trace(iterations: list[list[OpRecord]], predicted: list[OpRecord], run_dir: Path) -> list[OpRecord]:
    """Chrome trace of every recorded step (measured) + the prediction aligned with the last step.
    Returns the last step's records from t = 0 (for the Gantt)."""
    t0 = min(r.t0 for recs in iterations for r in recs)
    t_last = min(r.t0 for r in iterations[-1])
    chrome_trace(shift([r for recs in iterations for r in recs], t0), run_dir / TIMELINE_JSON,
                 shift(predicted, t0 - t_last))
    return shift(iterations[-1], t_last)


def record_moe_blocks(model: nn.Module, spec: LayerSpec, recorder: Recorder, device: torch.device) -> list:
    """Time every MoE block (host lane: its glue) and its attention (compute lane: ``dense_fwd`` /
    ``dense_bwd`` of the LayerSpec's shape); layer = the block's index among the MoE blocks, as
    the executors and the simulator number them. Returns the hook handles."""
    handles = []
    for i, blk in enumerate(b for b in model.layers if b.is_moe):
        handles += record_block_ops(blk, blk.attn, spec, i, recorder, device)
    return handles


# ---------------------------------------------------------------------------- the object


@dataclass
class TrainingSchedule:
    """The installed schedule of one rank (see the module docstring)."""

    schedule: Schedule
    spec: LayerSpec
    layout: Layout
    profile: Profile
    groups: ParallelGroups
    engine: Engine
    recorder: Recorder
    executors: list[PipelinedExecutor]
    grad_sync: GradSync | None
    run_dir: Path
    is_writer: bool
    timeline_steps: int = 0
    timeline_first: int = 0
    check: ScheduleCheck | None = None  # the plan's executors timed against the default path
    device: torch.device = torch.device("cpu")
    notices: list[str] = field(default_factory=list)  # lines for the trainer to print (rank 0)
    _layers: list = field(default_factory=list)  # (MoE layer, its executor): to switch paths
    planner: Callable[[Profile], Schedule] | None = None  # re-plans with a refitted profile
    _iterations: list = field(default_factory=list)
    _dense_hooks: list = field(default_factory=list)
    _metrics: dict = field(default_factory=dict)
    # Drawn in close(), after the lanes stop: drawn mid-run, rank 0 aborted at exit ("terminate called
    # without an active exception") in 2 of 5 CPU runs; drawn at close, 0 of 13 (cause not isolated).
    _gantt: tuple | None = None

    @staticmethod
    def build(cfg: RunConfig, model: nn.Module, groups: ParallelGroups, device: torch.device, run_dir: Path,
              is_writer: bool, start_step: int = 0) -> "TrainingSchedule | None":
        """Plan and install ``cfg.parallel.schedule`` on ``model`` (None for "default"). Collective."""
        if cfg.parallel.schedule == "default":
            return None
        layout = groups.layout
        profile = load_or_profile(cfg.parallel.profile, groups, device, run_dir, is_writer,
                                  LayerSpec.from_run_config(cfg))
        spec, schedule = plan_for_run(cfg, layout, profile)
        recorder = Recorder(rank=groups.rank, enabled=False)
        _share_epoch(recorder, groups, device)
        engine = make_engine(device, recorder)
        n = cfg.train.timeline_steps
        plain = runs_default_path(schedule, groups.backend, n)
        executors = [] if plain else install_executors(model, engine, schedule.layer_schedule(), layout)
        gs = None
        if groups.dp > 1 and not buckets_dense_gradients(groups.backend, n):
            gs = GradSync.for_blocks(dense_blocks(model), schedule.gar, engine, Lanes.of(schedule.iio),
                                     group=groups.dp_group)
            gs.attach(executors)
        first = start_step + (1 if cfg.train.steps - start_step > n else 0)  # skip the first (warm-up) step
        ts = TrainingSchedule(schedule, spec, layout, profile, groups, engine, recorder, executors, gs,
                              Path(run_dir), is_writer, n, first, device=device)
        ts.check = plan_check(cfg, schedule, executors, gs, device, start_step)
        ts._layers = list(zip(model.moe_layers(), executors))
        ts.planner = lambda prof: plan_for_run(cfg, layout, prof)[1]
        if n:  # attention timings for the timeline (hooks only when a timeline is asked for)
            ts._dense_hooks = record_moe_blocks(model, spec, recorder, device)
        return ts

    def describe(self) -> str:
        note = self.profile.layout_note(self.layout)
        lines = [describe(self.schedule)]
        if not self.executors:
            lines.append("r = 1 both ways: the MoE layers run the default data path (no lanes)")
        if self.check is not None:
            lines.append(f"schedule check: steps {self.check.first + 1}-{self.check.end} alternate the plan and the "
                         f"default path ({self.check.steps} timed steps each); the faster is kept")
        if self.grad_sync is None and self.groups.dp > 1:
            lines.append("dense gradients: AllReduced in buckets during backward on NCCL's own stream, as "
                         "parallel.schedule='default' does (the partitions above are what the model predicts with)")
        return "\n".join(lines + ([note] if note else []))

    # ------------------------------------------------------------ per step
    def _recording(self, step: int) -> bool:
        return self.timeline_first <= step < self.timeline_first + self.timeline_steps

    def begin_step(self, step: int) -> None:
        """``step``: the 0-based index of the step about to run."""
        self.recorder.take()
        self.recorder.enabled = self._recording(step)
        if self.check is not None and self.check.path(step) is not None:
            self._use_executors(self.check.path(step) == "plan")
            self.check.begin(step, self.device)

    def sync_dense(self, model: nn.Module) -> None:
        """Wait for every dense-gradient partition and write the DP mean into ``.grad``."""
        if self.grad_sync is None:
            return
        for ps in self.grad_sync.params:  # every rank must reduce every slice, also unused params
            for p in ps:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        self.grad_sync.finish()

    def end_step(self, step: int) -> dict[str, float]:
        """After the step's gradient sync. On the last recorded step: gather every rank's records,
        write the timeline (rank 0), refit the profile; returns metrics to log (else {})."""
        if self.check is not None and self.check.path(step) is not None:
            self._check_step(step)
        if not self._recording(step):
            return self.pop_metrics()
        self.recorder.enabled = False
        self._iterations.append(self.recorder.take())
        if step + 1 == self.timeline_first + self.timeline_steps:
            self._finish_timeline()
        return self.pop_metrics()

    def _use_executors(self, on: bool) -> None:
        for layer, ex in self._layers:
            layer.executor = ex if on else sequential

    def _check_step(self, step: int) -> None:
        c = self.check
        c.finish(step, self.device)
        if step + 1 < c.end:
            return
        kept = c.decide(self.device, self.groups.world_group if self.groups.distributed else None)
        self._use_executors(kept == "plan")
        if kept == "default":
            self.executors = []
        self._metrics.update(c.metrics())
        s = self.schedule
        self.notices.append(c.describe(f"r_fwd={s.r_fwd} r_bwd={s.r_bwd}"))
        self.check = None

    def _replan(self, profile: Profile) -> None:
        """Plan again with the refitted ``profile``; a new r goes to the executors for the rest of the
        run (the gradient partitions stay as planned at start-up: GradSync's buffers are built)."""
        if self.planner is None or not self.executors or self.schedule.meta.get("forced_r"):
            return
        new = self.planner(profile)
        old = self.schedule
        self._metrics.update(replanned_r_fwd=new.r_fwd, replanned_r_bwd=new.r_bwd)
        if (new.r_fwd, new.r_bwd) == (old.r_fwd, old.r_bwd):
            return
        for ex in self.executors:
            ex.schedule = dataclasses.replace(ex.schedule, r_fwd=new.r_fwd, r_bwd=new.r_bwd)
        self.schedule = dataclasses.replace(old, r_fwd=new.r_fwd, r_bwd=new.r_bwd,
                                            meta=dict(old.meta, replanned_from=[old.r_fwd, old.r_bwd]))
        self.notices.append(f"re-planned with the profile refitted on the timeline: r_fwd {old.r_fwd} -> {new.r_fwd}, "
                            f"r_bwd {old.r_bwd} -> {new.r_bwd}")

    def pop_metrics(self) -> dict[str, float]:
        out, self._metrics = self._metrics, {}
        return out

    def _finish_timeline(self) -> None:
        per_rank = [self._iterations]
        if self.groups.distributed:
            per_rank = [None] * self.groups.world
            dist.all_gather_object(per_rank, self._iterations, group=self.groups.world_group)
        iterations = [[r for part in per_rank for r in part[i]] for i in range(len(self._iterations))]
        self._iterations = []
        before = op_errors(iterations, self.layout, self.profile)
        refitted = refit(self.profile, refit_samples(iterations, self.layout.peers))
        after = op_errors(iterations, self.layout, refitted)
        med = lambda xs: statistics.median(xs) if xs else float("nan")
        self._metrics = {"timeline_ops": len(before),
                         "op_error_median_offline": med(before), "op_error_median_refit": med(after),
                         "op_error_single_offline": med(single_errors(iterations, self.layout, self.profile)),
                         "op_error_single_refit": med(single_errors(iterations, self.layout, refitted)),
                         "op_noise_floor": noise_floor(iterations, self.layout, self.profile)}
        if len(iterations) >= 2:  # out of sample: refit on the first half of the steps, score the rest
            half = len(iterations) // 2
            held = refit(self.profile, refit_samples(iterations[:half], self.layout.peers),
                         holdout=refit_samples(iterations[half:], self.layout.peers))
            self._metrics["op_error_median_refit_heldout"] = med(op_errors(iterations[half:], self.layout, held))
            self._metrics["op_error_median_offline_heldout"] = med(op_errors(iterations[half:], self.layout,
                                                                             self.profile))
        if self.is_writer:
            s = self.schedule
            pred = [r for rank in range(self.layout.moe) for r in simulate_iteration(
                self.spec, self.layout, self.profile, s.r_fwd, s.r_bwd, s.iio, s.gar, rank=rank).records]
            last = write_trace(iterations, pred, self.run_dir)
            write_records(self.run_dir / TIMELINE_RECORDS, iterations,
                          {"layout": dataclasses.asdict(self.layout), "profile": "profile used at start-up"})
            write_op_table(iterations, self.layout, {"offline": self.profile, "refit": refitted},
                           self.run_dir / TIMELINE_OPS)
            self._gantt = (last, pred, f"{s.policy} r={s.r_fwd}/{s.r_bwd}: measured (top), predicted (hatched)")
            refitted.save(self.run_dir / "profile_refit.json")
        if len(iterations) >= 2:  # after the trace, which predicts the schedule that was recorded
            self._replan(held)

    def close(self) -> None:
        """Stop the lanes and hooks, then draw the Gantt chart (timeline.png) if one was recorded."""
        if self.grad_sync is not None:
            self.grad_sync.remove()
        for h in self._dense_hooks:
            h.remove()
        self.engine.close()
        if self._gantt is not None:
            last, pred, title = self._gantt
            gantt_png(last, self.run_dir / TIMELINE_PNG, pred, title=title)
            self._gantt = None


def runs_default_path(schedule: Schedule, backend: str, timeline_steps: int = 0) -> bool:
    """Whether a plan of r = 1 both ways runs the default data path instead of its executors:
    under NCCL, where the executor at r = 1 adds lanes and events and overlaps nothing. A timeline
    records the executors' ops, so it keeps them."""
    return schedule.r_fwd == 1 and schedule.r_bwd == 1 and buckets_dense_gradients(backend, timeline_steps)


def buckets_dense_gradients(backend: str, timeline_steps: int = 0) -> bool:
    """Whether the dense gradients go out in the default path's buckets rather than the plan's
    partitions (GradSync).

    Under NCCL the buckets are AllReduced as backward produces them, on NCCL's own stream beside the
    AlltoAlls. The plan's partitions sit on the executors' inter lane, in order with the AlltoAlls,
    and whatever does not fit a window waits for the end of backward: on two H200 as two nodes
    (gpt2-xl-moe, 8 layers, EP2) that made the schedule 0.85-0.89x the default at r = 1 and r = 2
    (98-104k vs 116k tokens/s), about the time of the exposed AllReduce. Under gloo the default
    reduces after backward, so the partitions win there and are kept; a timeline keeps them too,
    to time them against the model."""
    return backend == "nccl" and timeline_steps == 0


def plan_check(cfg: RunConfig, schedule: Schedule, executors: list[PipelinedExecutor], grad_sync: GradSync | None,
               device: torch.device, start_step: int) -> ScheduleCheck | None:
    """The check of a plan that runs executors (see ``check.py``), where it can run: on a GPU, with
    the dense gradients in buckets (a GradSync rides the executors' windows, so it cannot switch),
    r not forced by ``parallel.pipeline_degree``, no timeline, and steps enough left for it. FSMoE's
    policies only: a baseline runs as its paper describes it, even where it loses."""
    k = cfg.parallel.schedule_check_steps
    if not (k and executors and grad_sync is None and device.type == "cuda" and not schedule.meta.get("forced_r")
            and not cfg.train.timeline_steps and schedule.policy in ("fsmoe", "fsmoe_no_iio")):
        return None
    check = ScheduleCheck(first=start_step + 1, steps=k)  # after the first step (allocator, autotuning)
    return check if check.end < cfg.train.steps else None


def install_executors(model: nn.Module, engine: Engine, layer_schedule: LayerSchedule,
                      layout: Layout) -> list[PipelinedExecutor]:
    """A ``PipelinedExecutor`` on every MoE layer of a model the trainer has built (layer id = its
    index among the MoE layers); the layers keep their dispatcher and experts."""
    executors = []
    for i, layer in enumerate(model.moe_layers()):
        layer.executor = PipelinedExecutor(engine, layer_schedule, layout, layer=i)
        executors.append(layer.executor)
    return executors


def _share_epoch(recorder: Recorder, groups: ParallelGroups, device: torch.device) -> None:
    """One clock origin for every rank (rank 0's; exact on one host, as the bench assumes)."""
    if not groups.distributed:
        return
    epoch = torch.tensor([recorder.epoch], dtype=torch.float64, device=device)
    dist.broadcast(epoch, 0, group=groups.world_group)
    recorder.epoch = float(epoch.cpu())
