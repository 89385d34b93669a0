"""The profiler behind ``fsmoe profile`` (fsmoe.cli.profile): measure the ops the scheduler places, on the real process groups, and fit
``t = alpha + n beta`` to each (``profile.py``); plus the online refit from executor timings.

What is measured (every rank at once, as in training; per size the median of ``reps`` runs,
then the mean over ranks):

    a2a_inter / a2a_intra   the EP AlltoAll stage over the EP group (inter-node when it spans
                            nodes), and over the ESP group for the intra-node fit
    a2a_level{i}            with a topology of 2+ levels in the EP group (``--topology``): the
                            AlltoAll among the ranks that differ only at level i (one line per
                            level, read by the hierarchical dispatcher's cost model)
    allgather/reducescatter the ESP stage (same implementation as the executor)
    allreduce               the DP group (dense gradients)
    expert_fwd/expert_bwd   the executor's expert forward / backward (its expert step) over row
                            counts and (d_model, d_ff shard) shapes; n = forward multiply-adds
    dense_fwd/dense_bwd     the attention block (fsmoe.models.attention) over batch shapes
    overlap (eta)           an AlltoAll on the inter lane beside an expert GEMM on the compute
                            lane, against each alone: how much communication really hides

Comm sizes follow FSMoE (2^18 .. 24 * 2^18 floats on GPUs), scaled down on CPU (``--quick``).
"""
from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from fsmoe.config import ConfigError, RunConfig
from fsmoe.parallel.grads import all_reduce_mean
from fsmoe.parallel.groups import ParallelGroups, device_for
from fsmoe.schedule.model.perf_model import ExpertDims
from fsmoe.schedule.model.profile import Profile, profile_from_points, qualified, refit
from fsmoe.schedule.model.timeline import read_records, refit_samples
from fsmoe.schedule.run.executor import expert_backward, expert_forward
from fsmoe.select import experts_class, resolve_kernels
from fsmoe.schedule.types import LayerSpec, Layout, OpRecord


@dataclass(frozen=True)
class ProfileConfig:
    comm_bytes: tuple[int, ...]  # per-rank payload of each collective
    expert_shapes: tuple[tuple[int, int, int], ...]  # (d_model, f_shard, gemms)
    expert_rows: tuple[int, ...]
    local_experts: int = 2
    dense_shapes: tuple[tuple[int, int, int, int], ...] = ()  # (batch, seq_len, d_model, heads)
    reps: int = 5
    warmup: int = 2
    allreduce_bytes: tuple[int, ...] = ()  # more AllReduce sizes (a whole step's gradients), beyond comm_bytes

    @staticmethod
    def cpu(quick: bool = False) -> "ProfileConfig":
        """Sizes of the CPU layer grid (``fsmoe bench schedule``)."""
        comm = tuple(int(x) for x in np.geomspace(4 << 10, 2 << 20, 6 if quick else 10))
        rows = tuple(int(x) for x in np.geomspace(64, 4096, 5 if quick else 7))
        shapes = ((64, 64, 2), (128, 256, 3), (64, 128, 3), (128, 128, 2))
        dense = ((1, 128, 64, 2), (2, 256, 128, 4), (2, 256, 64, 4), (1, 256, 128, 2))
        return ProfileConfig(comm, shapes[:2] if quick else shapes, rows, 2, dense[:2] if quick else dense,
                             reps=3 if quick else 7)

    @staticmethod
    def gpu(quick: bool = False) -> "ProfileConfig":
        """FSMoE's sizes (2^18 .. 24 * 2^18 floats) and the GPU layer grid's shapes."""
        comm = tuple(int(x) * 4 for x in np.linspace(1 << 18, 24 << 18, 6 if quick else 12))
        rows = tuple(int(x) for x in np.geomspace(256, 16384, 5 if quick else 7))
        shapes = ((2048, 4096, 2), (4096, 16384, 3), (2048, 8192, 3), (4096, 8192, 2))
        dense = ((2, 1024, 2048, 16), (4, 2048, 4096, 32), (2, 2048, 2048, 16), (4, 1024, 4096, 32))
        return ProfileConfig(comm, shapes[:1] if quick else shapes, rows, 8, dense[:1] if quick else dense,
                             reps=10, warmup=3)


    @staticmethod
    def for_run(spec: LayerSpec, layout: Layout, device: torch.device) -> "ProfileConfig":
        """The sizes one run's ops have: its expert shape and local experts, its attention shape,
        rows and messages from an eighth of a layer's (a chunk at r = 8) to 1.5x (routing skew),
        the AllReduce up to a block's dense gradients. ``fsmoe train`` profiles these at start-up,
        so every fit it plans with is measured at the shapes it runs, not extrapolated from a grid."""
        rows = spec.routed_rows
        msg = rows * spec.d_model * spec.dtype_bytes
        comm = np.geomspace(max(4096, msg // 8), max(msg * 3 // 2, spec.gar_bytes, 8192), 6)
        expert = ((spec.d_model, spec.d_ff // layout.esp, spec.gemms),)
        dense = ((spec.batch, spec.seq_len, spec.d_model, spec.n_heads),)
        gpu = device.type == "cuda"
        return ProfileConfig(tuple(int(x) for x in comm), expert,
                             tuple(int(x) for x in np.geomspace(max(8, rows // 8), max(16, rows * 3 // 2), 5)),
                             max(1, spec.num_experts // layout.ep), dense, reps=10 if gpu else 7,
                             warmup=3 if gpu else 2)


def hardware_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}".replace(" ", "_") + "-nccl"
    cpu = platform.processor() or platform.machine()
    return f"cpu-{cpu}-{torch.get_num_threads()}thr-gloo"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], None], device: torch.device, reps: int, warmup: int,
                 group: ProcessGroup | None = None) -> float:
    return _interleaved_medians((fn,), device, reps, warmup, group)[0]


def _median_prepared_time(prepare: Callable[[], object], fn: Callable[[object], None], device: torch.device,
                          reps: int, warmup: int, group: ProcessGroup | None = None) -> float:
    """Median seconds of ``fn(prepare())`` with ``prepare`` untimed. A backward needs a fresh
    graph each run: the experts' kernels free their intermediates as backward uses them, so one
    graph cannot be run backward twice."""
    held = []
    return _interleaved_medians((lambda: fn(held.pop()),), device, reps, warmup, group,
                                before=lambda: held.append(prepare()))[0]


def _interleaved_medians(fns: list[Callable[[], None]], device: torch.device, reps: int, warmup: int,
                         group: ProcessGroup | None = None, before: Callable[[], None] | None = None) -> list[float]:
    """Median seconds of each of ``fns``, run round-robin (with ``group``: every rank in step,
    a barrier before each run; ``before``: called untimed ahead of each run, before the barrier)."""
    times = [[] for _ in fns]
    for k in range(warmup + reps):
        for i, fn in enumerate(fns):
            if before is not None:
                before()
            if group is not None:
                dist.barrier(group=group)
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if k >= warmup:
                times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def measure(groups: ParallelGroups, cfg: ProfileConfig, device: torch.device,
            dtype=torch.float32) -> dict[str, list[list[float]]]:
    """Every rank runs this; returns points {key: [[n, seconds], ...]} averaged over ranks."""
    from fsmoe.comm.alltoall import AllToAllStage
    from fsmoe.comm.esp import EspStage
    from fsmoe.comm.functional import reduce_scatter_impl_for

    layout = groups.layout
    elem = torch.empty(0, dtype=dtype).element_size()
    D = 64
    pts: dict[str, list[list[float]]] = {}
    add = lambda key, n, t: pts.setdefault(key, []).append([float(n), float(t)])

    def a2a_points(group, size, key):
        stage = AllToAllStage(group)
        for nbytes in cfg.comm_bytes:
            rows = max(size, nbytes // (D * elem) // size * size)
            x = torch.randn(rows, D, device=device, dtype=dtype)
            splits = (rows // size,) * size
            t = _median_time(lambda: stage.finish(stage.launch(x, splits, splits)), device, cfg.reps, cfg.warmup,
                             group)
            add(key, rows * D * elem, t)

    if groups.ep > 1:
        a2a_points(groups.ep_group, groups.ep, layout.a2a_key)
        for group, size, key in level_groups(groups):
            a2a_points(group, size, key)
    if groups.esp > 1:
        if "a2a_intra" not in pts:
            a2a_points(groups.esp_group, groups.esp, "a2a_intra")
        esp = EspStage(groups.esp_group, reduce_scatter_impl_for(groups.backend))
        for nbytes in cfg.comm_bytes:  # n = gathered bytes
            rows = max(1, nbytes // (D * elem) // groups.esp)
            x = torch.randn(rows, D, device=device, dtype=dtype)
            sizes = (rows,) * groups.esp
            y = torch.randn(rows * groups.esp, D, device=device, dtype=dtype)
            add("allgather", rows * groups.esp * D * elem,
                _median_time(lambda: esp.finish_gather(esp.launch_gather(x, sizes)), device, cfg.reps, cfg.warmup,
                             groups.esp_group))
            add("reducescatter", rows * groups.esp * D * elem,
                _median_time(lambda: esp.finish_scatter(esp.launch_scatter(y, sizes)), device, cfg.reps,
                             cfg.warmup, groups.esp_group))
    if groups.dp > 1:
        for nbytes in cfg.comm_bytes + cfg.allreduce_bytes:
            buf = torch.randn(max(1, nbytes // elem), device=device, dtype=dtype)
            add("allreduce", buf.numel() * elem,
                _median_time(lambda: dist.all_reduce(buf, group=groups.dp_group), device, cfg.reps, cfg.warmup,
                             groups.dp_group))
            if cfg.allreduce_bytes:  # a run's profile: also as training reduces its gradients (sync_grads)
                from fsmoe.schedule.run.model_parts import _cold_median_time

                # with the caches flushed first: in training the gradients come straight out of backward
                grads = list(torch.randn(max(32, nbytes // 4), device=device).chunk(32))
                add("grad_sync", nbytes, _cold_median_time(lambda: all_reduce_mean(grads, groups.dp_group, groups.dp),
                                                           device, cfg.reps, cfg.warmup, groups.dp_group))
    # every rank times its GEMMs at once, as in training (ranks of one host share its cores and
    # memory bandwidth: alone, each would measure faster than it runs)
    for key, n, t in measure_compute(cfg, device, dtype, groups.world_group if groups.distributed else None):
        add(key, n, t)
    return _mean_over_ranks(pts, groups)


def level_groups(groups: ParallelGroups) -> list[tuple[ProcessGroup, int, str]]:
    """(group, size, key ``a2a_level{i}``) of each level of the EP group's topology when it has
    two or more (the hierarchical dispatcher's per-level alpha-beta lines); [] otherwise, or
    when EP/ESP cut through a level."""
    from fsmoe.comm.topology import Stage
    from fsmoe.parallel.levels import levels_of, stage_groups

    try:
        levels = levels_of(groups)
    except ConfigError:
        return []
    if levels.depth < 2:
        return []
    made = stage_groups(groups, levels)
    return [(made[Stage(i, i)], levels.sizes[i], f"a2a_level{i}") for i in range(levels.depth)]


def measure_overlap(groups: ParallelGroups, cfg: ProfileConfig, device: torch.device,
                    dtype=torch.float32) -> tuple[float, tuple[tuple[float, float], ...]]:
    """eta = (t_comm + t_compute - t_both) / min(t_comm, t_compute), clamped to [0, 1]: how much
    of an AlltoAll on the inter lane hides under an expert GEMM (sized to take as long) on the
    compute lane, the executor's own engine running both. The three timings are interleaved
    (one of each per round, so a slow spell of the machine hits all three), at three AlltoAll
    sizes, each the mean over ranks. Returns (the median over sizes, ((bytes, eta), ...) per
    size: ``Profile.overlap_at`` interpolates them). 1.0 and none when there is nothing to measure."""
    if groups.ep * groups.esp == 1:
        return 1.0, ()
    n = len(cfg.comm_bytes)
    sizes = sorted({cfg.comm_bytes[i] for i in (n // 4, n // 2, 3 * n // 4)})
    v = torch.tensor([_overlap_at(groups, cfg, device, dtype, b) for b in sizes], dtype=torch.float64,
                     device=device_for(groups.backend))  # NCCL: a GPU tensor
    dist.all_reduce(v, group=groups.world_group)
    etas = (v / groups.world).tolist()
    return sorted(etas)[len(etas) // 2], tuple(zip(map(float, sizes), etas))


def _overlap_at(groups: ParallelGroups, cfg: ProfileConfig, device: torch.device, dtype, nbytes: int) -> float:
    from fsmoe.comm.alltoall import AllToAllStage
    from fsmoe.schedule.run.engine import make_engine

    group, size = (groups.ep_group, groups.ep) if groups.ep > 1 else (groups.esp_group, groups.esp)
    stage, D = AllToAllStage(group), 64
    elem = torch.empty(0, dtype=dtype).element_size()
    rows = max(size, nbytes // (D * elem) // size * size)
    x = torch.randn(rows, D, device=device, dtype=dtype)
    splits = (rows // size,) * size
    a2a = lambda: stage.finish(stage.launch(x, splits, splits))
    d, f, gemms = cfg.expert_shapes[0]
    experts = experts_class(resolve_kernels("auto"))(2, d, f, "gelu").to(device=device, dtype=dtype)
    reps, warm = max(cfg.reps, 5), cfg.warmup
    t_a = _median_time(a2a, device, reps, warm, group)
    n = cfg.expert_rows[len(cfg.expert_rows) // 2]
    for _ in range(2):  # size the GEMM to take about as long as the AlltoAll
        xe = torch.randn(n, d, device=device, dtype=dtype)
        ce = torch.tensor([n // 2, n - n // 2], device=device)
        comp = lambda xe=xe, ce=ce: expert_forward(experts, xe, ce, keep_graph=False)
        with torch.no_grad():
            t_c = _median_time(comp, device, reps, warm, group)
        n = int(min(max(8, n * t_a / max(t_c, 1e-9)), 1 << 16))
    eng = make_engine(device)
    eng.recorder.enabled = False

    def both():
        h = eng.launch("inter", None, lambda: a2a())
        eng.compute(None, comp)
        eng.wait(h)

    with torch.no_grad():
        t_a, t_c, t_b = _interleaved_medians((a2a, comp, both), device, reps, warm, group)
    eng.close()
    return min(1.0, max(0.0, (t_a + t_c - t_b) / min(t_a, t_c)))


def measure_compute(cfg: ProfileConfig, device: torch.device, dtype=torch.float32,
                    group: ProcessGroup | None = None) -> list[tuple[str, float, float]]:
    """Expert forward/backward (the executor's expert step) and attention forward/backward, on this rank
    (with ``group``: its ranks start each repeat together). Each point is returned under the base key
    and under its shape-qualified key (``profile.py``)."""
    out = []
    for key, n, t, tag in _compute_points(cfg, device, dtype, group):
        out += [(key, n, t), (qualified(key, tag), n, t)]
    return out


def _compute_points(cfg: ProfileConfig, device: torch.device, dtype,
                    group: ProcessGroup | None = None) -> list[tuple[str, float, float, str]]:
    from fsmoe.models.attention import Attention

    out = []
    El = cfg.local_experts
    elem = torch.empty(0, dtype=dtype).element_size()
    for d, f, gemms in cfg.expert_shapes:
        tag = ExpertDims(d, f, gemms, elem, El).tag
        # the executor's expert op: the experts module the layer builds on this device
        experts = experts_class(resolve_kernels("auto"))(El, d, f, "swiglu" if gemms == 3 else "gelu")
        experts = experts.to(device=device, dtype=dtype)
        params = tuple(experts.parameters())
        for rows in cfg.expert_rows:
            counts = [rows // El + (1 if e < rows % El else 0) for e in range(El)]
            c = torch.tensor(counts, device=device)
            x = torch.randn(rows, d, device=device, dtype=dtype)
            dy = torch.randn(rows, d, device=device, dtype=dtype)
            macs = rows * d * f * gemms
            fwd = lambda: expert_forward(experts, x, c, keep_graph=True)
            bwd = lambda graph: expert_backward(experts, graph, c, dy, params)
            out.append(("expert_fwd", macs, _median_time(fwd, device, cfg.reps, cfg.warmup, group), tag))
            out.append(("expert_bwd", macs, _median_prepared_time(lambda: fwd()[1], bwd, device, cfg.reps,
                                                                  cfg.warmup, group), tag))
    for B, L, d, heads in cfg.dense_shapes:
        tag = LayerSpec(batch=B, seq_len=L, d_model=d, d_ff=d, num_experts=1, n_heads=heads, dtype_bytes=elem).dense_tag
        attn = Attention(d, heads, heads, d // heads, bias=True, qk_norm=False, norm_eps=1e-5, dropout=0.0)
        attn = attn.to(device=device, dtype=dtype)
        x = torch.randn(B, L, d, device=device, dtype=dtype, requires_grad=True)
        g = torch.randn(B, L, d, device=device, dtype=dtype)
        macs = 4 * B * L * d * d + 2 * B * L * L * d
        out.append(("dense_fwd", macs, _median_time(lambda: attn(x, None), device, cfg.reps, cfg.warmup, group),
                    tag))
        bwd = _median_prepared_time(lambda: attn(x, None), lambda y: y.backward(g), device, cfg.reps, cfg.warmup,
                                    group)
        out.append(("dense_bwd", macs, bwd, tag))
    return out


def _mean_over_ranks(pts: dict[str, list[list[float]]], groups: ParallelGroups) -> dict[str, list[list[float]]]:
    if not groups.distributed:
        return pts
    keys = sorted(pts)
    flat = torch.tensor([t for k in keys for _, t in pts[k]], dtype=torch.float64, device=device_for(groups.backend))
    dist.all_reduce(flat, group=groups.world_group)
    flat = flat.cpu() / groups.world
    out, i = {}, 0
    for k in keys:
        out[k] = [[n, float(flat[i + j])] for j, (n, _) in enumerate(pts[k])]
        i += len(pts[k])
    return out


def run_profile(groups: ParallelGroups, device: torch.device, cfg: ProfileConfig | None = None,
                dtype: torch.dtype = torch.float32, run: RunConfig | None = None) -> Profile:
    """Measure and fit; the same Profile is returned on every rank. With ``run``: also the
    step's other parts at that run's shapes (head, optimizer, glue: ``model_parts``)."""
    from fsmoe.schedule.run.model_parts import dispatcher_extra, measure_model_parts, run_spec, with_model_parts

    t0 = time.perf_counter()
    cfg = cfg or (ProfileConfig.gpu() if device.type == "cuda" else ProfileConfig.cpu())
    pts = measure(groups, cfg, device, dtype)
    eta, per_size = measure_overlap(groups, cfg, device, dtype)
    layout = groups.layout
    meta = {"world": groups.world, "reps": cfg.reps, "torch": torch.__version__}
    prof = profile_from_points(hardware_name(device), layout.name, pts, meta, overlap=eta, overlap_points=per_size)
    if run is not None:
        spec, reps = run_spec(run, layout.dp, layout.mp), max(7, cfg.reps)
        extra = dispatcher_extra(run, spec, groups, prof, device, dtype, reps, cfg.warmup)
        parts = measure_model_parts(run, spec, prof, device, dtype, reps, cfg.warmup,
                                    groups.world_group if groups.distributed else None, extra)
        prof.meta["dispatcher_extra_ms"] = [1e3 * t for t in extra]
        prof = with_model_parts(prof, _mean_over_ranks(parts, groups))
        prof.meta["run"] = run.name
    prof.meta["seconds"] = time.perf_counter() - t0
    return prof


# ---------------------------------------------------------------------------- online


def load_samples(path: Path) -> list[tuple[str, float, float]]:
    """Refit samples from a records file (``timeline_records.jsonl`` of ``fsmoe train --timeline``:
    collectives timed from their last participant's arrival, with the layout in its header; a
    file of bare records: each op's own duration). ConfigError names the file and bad line."""
    if not path.is_file():
        raise ConfigError("--refit", str(path), "no such file (op records: `timeline_records.jsonl` of "
                                                "`fsmoe train --timeline`, or one OpRecord JSON per line)")
    try:
        header, iterations = read_records(path)
    except ValueError as e:
        raise ConfigError("--refit", str(path), str(e)) from None
    if "layout" in header:
        return refit_samples(iterations, Layout.from_dict(header["layout"]).peers)
    return samples_from_records([r for recs in iterations for r in recs])


def samples_from_records(records: list[OpRecord]) -> list[tuple[str, float, float]]:
    return [(r.op.key, r.op.n, r.dur) for r in records if r.op.key and r.op.n > 0]


class OnlineProfiler:
    """Refits the profile from the executor's recorded op timings every ``every`` steps.

        online = OnlineProfiler(profile, recorder, every=50)
        ...each step: if (p := online.step()) is not None: schedule = plan(spec, layout, p)
    """

    def __init__(self, profile: Profile, recorder, every: int = 50, min_points: int = 4):
        self.profile, self.recorder, self.every, self.min_points = profile, recorder, every, min_points
        self._steps, self._samples = 0, []

    def step(self) -> Profile | None:
        self._steps += 1
        self._samples += samples_from_records(self.recorder.take())
        if self._steps % self.every:
            return None
        self.profile = refit(self.profile, self._samples, min_points=self.min_points)
        self._samples = []
        return self.profile


# ---------------------------------------------------------------------------- CLI
