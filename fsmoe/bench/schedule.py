"""``fsmoe bench schedule``: FSMoE's layer grid, scaled down, under the five schedules.

Per layer config (a stack of ``--layers`` blocks: attention + MoE, FSMoE §6.2's "configured
layers"), on every rank of the run (e.g. 4 CPU processes as 2 simulated nodes x 2):

  A. calibration (online profiling): a few recorded iterations of the five schedules (after the
     same warm-up as the timed pass); the Profile (offline microbenchmark, ``fsmoe profile``)
     is refitted from the records of this config and every config before it;
  B. the five schedules (``baselines.py``) planned with the refitted profile, plus the sweep
     r_fwd x r_bwd in {1,2,4,8}^2 x {no partition, FSMoE's partitions, everything ready} with
     intra/inter overlap; all measured round-robin, ``--iters`` timed iterations each after
     ``--warmup``; an iteration's time is the slowest rank's forward + backward + gradient sync.
     The chosen schedule and the sweep's best are then re-measured head to head (2 x iters),
     unless the sweep's best is the chosen schedule itself (ratio 1).

Reported: per-op prediction error (offline and refitted profile; measured op durations from
the executor's timeline vs alpha + n beta at the same n), the chosen schedule against the best
of the sweep (both re-measured head to head, since the minimum of many noisy medians is biased
low), measured speedups of FSMoE over Default and Tutel-Improved, and a Chrome trace +
Gantt PNG (measured and predicted) of the first config in ``--run-dir``.

Grid (FSMoE: B, heads, L, M, H/M, f, FFN; k = 2, E = 2 ep): B {1,2}, heads {2,4},
L {128,256}, M {64,128}, H/M {2,4}, f {1.2, dropless}, FFN {simple GeLU, Mixtral SwiGLU};
``--configs`` of these 128 are drawn with a fixed seed.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fsmoe.bench.schedule_report import merge_runs, report_markdown, spec_dict, spec_str, summarize, summarize_errors
from fsmoe.cli.arg_types import non_negative_int, output_file, positive_int
from fsmoe.config import ConfigError
from fsmoe.parallel.groups import ParallelGroups, device_for
from fsmoe.parallel.launch import add_command_arguments, run_command
from fsmoe.schedule.model.baselines import POLICY_NAMES, fsmoe_partitions
from fsmoe.schedule.model.optimizer import R_CHOICES
from fsmoe.schedule.model.plan import plan_all
from fsmoe.schedule.model.profile import Profile, refit
from fsmoe.schedule.model.simulate import record_block_ops, simulate_iteration
from fsmoe.schedule.model.timeline import (NOT_SCHEDULED, OP_IDENTITY, chrome_trace, gantt_png, refit_samples, shift,
                                           timed_ops)
from fsmoe.schedule.run.engine import Recorder, make_engine
from fsmoe.schedule.run.executor import PipelinedExecutor
from fsmoe.schedule.run.grad_sync import GradSync
from fsmoe.schedule.run.profiler import ProfileConfig, run_profile
from fsmoe.schedule.types import GarPlan, Lanes, LayerSpec, Layout, OpRecord, Schedule

GRIDS = {  # FSMoE's axes, scaled to the hardware
    "cpu": {"batch": (1, 2), "n_heads": (2, 4), "seq_len": (128, 256), "d_model": (64, 128), "h_over_m": (2, 4),
            "capacity_factor": (1.2, None), "activation": ("gelu", "swiglu")},
    # one GPU holds all 8 experts: FSMoE's upper values of B, L, M (the ops are then GPU-bound,
    # not host-bound; "gpu-small" is the earlier, launch-bound scale)
    "gpu": {"batch": (2, 4), "n_heads": (16, 32), "seq_len": (1024, 2048), "d_model": (2048, 4096),
            "h_over_m": (2, 4), "capacity_factor": (1.2, None), "activation": ("gelu", "swiglu")},
    "gpu-small": {"batch": (1, 2), "n_heads": (8, 16), "seq_len": (512, 1024), "d_model": (1024, 2048),
                  "h_over_m": (2, 4), "capacity_factor": (1.2, None), "activation": ("gelu", "swiglu")},
}


def grid_specs(n: int, ep: int, n_layers: int = 2, seed: int = 0, grid: str = "cpu",
               dtype_bytes: int = 4, first: int = 0) -> list[LayerSpec]:
    """Configs ``first .. first + n - 1`` of the grid in a fixed shuffled order (so a long run can
    be split into parts and merged: ``--first-config``, ``--merge``)."""
    combos = list(itertools.product(*GRIDS[grid].values()))
    random.Random(seed).shuffle(combos)
    E = 2 * ep if grid == "cpu" else max(8, 2 * ep)  # GPU grids: 8 experts (Mixtral's count) or 2 per EP rank
    out = []
    for B, h, L, M, hm, f, act in combos[first:first + n]:
        out.append(LayerSpec(batch=B, seq_len=L, d_model=M, d_ff=hm * M, num_experts=E, top_k=2, n_heads=h,
                             capacity_factor=f, activation=act, n_layers=n_layers, dtype_bytes=dtype_bytes,
                             grad_bytes=dtype_bytes))  # the bench casts its parameters to dtype
    return out


# ---------------------------------------------------------------------------- the model


@dataclass
class BenchModel:
    blocks: nn.ModuleList
    executors: list[PipelinedExecutor]
    grad_sync: GradSync
    x: torch.Tensor
    g: torch.Tensor


def build_model(spec: LayerSpec, groups: ParallelGroups, engine, device, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> BenchModel:
    from fsmoe.config import ExpertsConfig, MoEConfig, RouterConfig
    from fsmoe.models.attention import Attention
    from fsmoe.models.block import Block
    from fsmoe.parallel.moe import ParallelMoELayer

    torch.manual_seed(seed)
    M = spec.d_model
    cfg = MoEConfig(num_experts=spec.num_experts,
                    router=RouterConfig(top_k=spec.top_k, capacity_factor=spec.capacity_factor),
                    experts=ExpertsConfig(d_ff=spec.d_ff, activation=spec.activation))
    blocks, executors, dense = nn.ModuleList(), [], []
    with torch.device(device):  # initialise on the device (GPU configs are ~10^8 parameters)
        for layer in range(spec.n_layers):
            attn = Attention(M, spec.n_heads, spec.n_heads, M // spec.n_heads, bias=True, qk_norm=False, norm_eps=1e-5,
                             dropout=0.0)
            executor = PipelinedExecutor(engine, layout=groups.layout, layer=layer)
            moe = ParallelMoELayer(cfg, M, groups, executor=executor)
            moe.router.balance_group = None  # no world-wide load statistics: an unscheduled collective
            blk = Block(attn, moe, nn.LayerNorm(M), nn.LayerNorm(M), is_moe=True, dropout=0.0).to(device, dtype)
            record_block_ops(blk, attn, spec, layer, engine.recorder, torch.device(device))
            blocks.append(blk)
            executors.append(executor)
            dense.append([p for n, p in blk.named_parameters() if ".experts." not in f".{n}"])
    sizes = [sum(p.numel() for p in ps) for ps in dense]
    if sizes != [spec.dense_params] * spec.n_layers:
        raise AssertionError(f"dense parameter count {sizes} != LayerSpec.dense_params {spec.dense_params}")
    gs = GradSync.for_blocks(dense, GarPlan(), engine, group=groups.dp_group if groups.dp > 1 else None)
    gs.attach(executors)
    gen = torch.Generator().manual_seed(1000 + groups.rank)  # every rank its own tokens
    x = torch.randn(spec.batch, spec.seq_len, M, generator=gen).to(device, dtype)
    g = torch.randn(spec.batch, spec.seq_len, M, generator=gen).to(device, dtype)
    return BenchModel(blocks, executors, gs, x, g)


def set_schedule(bm: BenchModel, s: Schedule) -> None:
    for ex in bm.executors:
        ex.schedule = s.layer_schedule()
    bm.grad_sync.plan, bm.grad_sync.lanes = s.gar, Lanes.of(s.iio)


def run_iteration(bm: BenchModel, device) -> float:
    """One forward + backward + gradient sync; returns this rank's seconds."""
    for blk in bm.blocks:
        blk.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    h = bm.x
    for blk in bm.blocks:
        h, _ = blk(h, None)
    (h * bm.g).sum().backward()
    bm.grad_sync.finish()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _max_over_ranks(t: float, groups: ParallelGroups) -> float:
    if not groups.distributed:
        return t
    v = torch.tensor([t], dtype=torch.float64, device=device_for(groups.backend))  # NCCL: a GPU tensor
    dist.all_reduce(v, op=dist.ReduceOp.MAX, group=groups.world_group)
    return float(v)


def measure(bm: BenchModel, scheds: dict[str, Schedule], groups: ParallelGroups, device, iters: int, warmup: int,
            recorder: Recorder, keep: set[str] = frozenset()) -> tuple[dict[str, float], dict[str, list]]:
    """Round-robin over the schedules; median (over iterations) of the slowest rank's time.
    Returns (seconds per name, this rank's records of the timed iterations of names in ``keep``)."""
    times = {k: [] for k in scheds}
    recs: dict[str, list] = {k: [] for k in keep}
    for it in range(warmup + iters):
        for name, s in scheds.items():
            set_schedule(bm, s)
            if groups.distributed:
                dist.barrier(group=groups.world_group)
            recorder.take()
            t = _max_over_ranks(run_iteration(bm, device), groups)
            got = recorder.take()
            if it >= warmup:
                times[name].append(t)
                if name in keep:
                    recs[name].append(got)
    return {k: statistics.median(v) for k, v in times.items()}, recs


def sweep(spec: LayerSpec, layout: Layout, profile: Profile, quick: bool = False) -> dict[str, Schedule]:
    """FSMoE's space: r_fwd x r_bwd in {1,2,4,8} ({1,2} when ``quick``) x partitions {end,
    fsmoe, all-ready}, with IIO. With one data-parallel rank there is no gradient AllReduce: the
    partitions are the same program, so only ``end`` is kept."""
    G = spec.gar_bytes
    out = {}
    rs = [r for r in R_CHOICES if not quick or r <= 2]
    for rf, rb in itertools.product(rs, rs):
        parts = {"end": GarPlan("end")}
        if layout.dp > 1:
            parts |= {"all": GarPlan("windows", tuple((spec.n_layers - 1 - l) * G for l in range(spec.n_layers))),
                      "fsmoe": fsmoe_partitions(spec, layout, profile, rb, True)[0]}
        for pname, gar in parts.items():
            out[f"sweep/{rf}/{rb}/{pname}"] = Schedule("sweep", rf, rb, True, gar)
    return out


# ---------------------------------------------------------------------------- main loop


def _gather(obj, groups: ParallelGroups) -> list:
    if not groups.distributed:
        return [obj]
    out = [None] * groups.world
    dist.all_gather_object(out, obj, group=groups.world_group)
    return out


def _merge_iterations(recs: dict[str, list[list[OpRecord]]], groups: ParallelGroups) -> dict[str, list[list[OpRecord]]]:
    """Every rank's records of each timed iteration, on every rank: name -> [iteration records]."""
    parts = _gather(recs, groups)
    return {name: [[r for part in parts for r in part[name][i]] for i in range(len(recs[name]))] for name in recs}


def op_errors(timings: dict[tuple, list[tuple[float, float]]], profiles: dict[str, Profile]) -> list[tuple]:
    """(key, n, median measured, every measured, {profile: predicted}) per scheduled op
    (``timeline.timed_ops``; in the bench an op keeps its size across iterations). The glue and
    the count exchange are modelled too, but are not scheduled ops."""
    out = []
    for k, nts in timings.items():
        if k[1] in NOT_SCHEDULED:
            continue
        n, runs = nts[0][0], [d for _, d in nts]
        out.append((k[0], n, statistics.median(runs), runs, {name: p.t(k[0], n) for name, p in profiles.items()}))
    return out


def run_bench(groups: ParallelGroups, device, *, profile: Profile | None, n_configs: int, iters: int, warmup: int,
              n_layers: int, run_dir: Path, calib_iters: int = 3, quick_sweep: bool = False, log=print,
              grid: str = "cpu", dtype: torch.dtype = torch.float32, first_config: int = 0) -> dict:
    layout = groups.layout
    recorder = Recorder(rank=groups.rank)
    epoch = torch.tensor([recorder.epoch], dtype=torch.float64, device=device_for(groups.backend))
    if groups.distributed:
        dist.broadcast(epoch, 0, group=groups.world_group)
    recorder.epoch = float(epoch)  # one clock for every rank (same host)
    engine = make_engine(device, recorder)
    t_start = time.perf_counter()
    if profile is None:
        profile = run_profile(groups, device, ProfileConfig.cpu() if device.type == "cpu" else ProfileConfig.gpu(),
                              dtype)
    specs = grid_specs(n_configs, layout.ep, n_layers, grid=grid, dtype_bytes=torch.empty(0, dtype=dtype).element_size(),
                       first=first_config)
    if not specs:
        raise ConfigError("--first-config", first_config, f"is past the {grid} grid's last config")
    log(f"profile ready ({time.perf_counter() - t_start:.0f}s); {len(specs)} configs; layout {layout.name}")
    log(profile.summary())

    # Per config: A. calibration (online profiling): record iterations of the five schedules and
    # refit the offline profile from every record so far; B. plan with the refitted profile and
    # measure. The model is built once per config (on the device: large GPU configs would
    # otherwise spend most of the run initialising on the host).
    samples, rows, errors, op_rows = [], [], [], []
    refitted = profile
    for ci, spec in enumerate(specs):
        bm = build_model(spec, groups, engine, device, dtype=dtype)
        calib = plan_all(spec, layout, refitted)  # the five schedules, under the timed pass's conditions
        _, recs = measure(bm, calib, groups, device, calib_iters, max(warmup, 1), recorder, keep=set(calib))
        for its in _merge_iterations(recs, groups).values():
            samples += refit_samples(its, layout.peers)
        refitted = refit(profile, samples)
        named = plan_all(spec, layout, refitted)
        sw = sweep(spec, layout, refitted, quick_sweep)
        secs, recs = measure(bm, {**named, **sw}, groups, device, iters, warmup, recorder, keep=set(POLICY_NAMES))
        merged = _merge_iterations(recs, groups)
        errs, ops = per_op(ci, merged, layout, {"offline": profile, "refitted": refitted})
        errors, op_rows = errors + errs, op_rows + ops
        if ci == 0 and groups.rank == 0:
            _timeline_artifacts(spec, layout, refitted, named, merged, run_dir)
        best_name = min(sw, key=lambda k: secs[k])
        # The minimum of ~50 noisy medians is biased low (winner's curse): measure the chosen and
        # the sweep's best again, head to head, with fresh iterations, and compare those; unless
        # the sweep's best is the chosen schedule itself (a schedule against itself measures noise).
        if same_schedule(named["fsmoe"], sw[best_name]):
            conf = {"fsmoe": secs["fsmoe"], "best": secs["fsmoe"]}
        else:
            conf, _ = measure(bm, {"fsmoe": named["fsmoe"], "best": sw[best_name]}, groups, device, 2 * iters, 0,
                              recorder)
        rows.append(config_row(spec, named, sw, secs, best_name, conf))
        log(f"[{ci + 1}/{len(specs)}] {spec_str(spec)}  default {secs['default'] * 1e3:.1f} ms  tutel "
            f"{secs['tutel_improved'] * 1e3:.1f}  fsmoe {secs['fsmoe'] * 1e3:.1f} "
            f"(r {named['fsmoe'].r_fwd}/{named['fsmoe'].r_bwd})  best {best_name} {secs[best_name] * 1e3:.1f}  "
            f"({time.perf_counter() - t_start:.0f}s)")
    return {"layout": layout.name, "world": groups.world, "device": str(device), "profile": profile.to_dict(),
            "refitted": refitted.to_dict(), "rows": rows, "op_errors": summarize_errors(errors),
            "summary": summarize(rows), "seconds": time.perf_counter() - t_start, "calibration_samples": len(samples),
            "ops": op_rows}


def per_op(ci: int, merged: dict[str, list[list[OpRecord]]], layout: Layout,
           profiles: dict[str, Profile]) -> tuple[list[tuple], list[dict]]:
    """The five schedules' ops of one config: (per-op errors of the scheduled ops, ``ops.jsonl``
    rows of every keyed op with each profile's prediction)."""
    errors, rows = [], []
    for name in POLICY_NAMES:
        timings = timed_ops(merged[name], layout.peers)
        errors += op_errors(timings, profiles)
        rows += [{"config": ci, "schedule": name, **dict(zip(OP_IDENTITY, k)), "n": nts[0][0],
                  "runs": [d for _, d in nts], **{p: pr.t(k[0], nts[0][0]) if pr.has(k[0]) else None
                                                  for p, pr in profiles.items()}}
                 for k, nts in timings.items()]
    return errors, rows


def same_schedule(a: Schedule, b: Schedule) -> bool:
    """The same program: degrees, lanes and gradient partitions (the policy name aside)."""
    return (a.r_fwd, a.r_bwd, a.iio, a.gar) == (b.r_fwd, b.r_bwd, b.iio, b.gar)


def config_row(spec: LayerSpec, named: dict[str, Schedule], sw: dict[str, Schedule], secs: dict[str, float],
               best_name: str, conf: dict[str, float]) -> dict:
    """One config's line of results.json: the five schedules' times and predictions, FSMoE's
    choice, the sweep's best (one pass, and re-measured head to head against the choice)."""
    fs, best = named["fsmoe"], sw[best_name]
    return {"config": spec_dict(spec), "seconds": {k: secs[k] for k in POLICY_NAMES},
            "predicted": {k: named[k].predicted_iter_s for k in POLICY_NAMES},
            "chosen": {"r_fwd": fs.r_fwd, "r_bwd": fs.r_bwd, "gar": list(fs.gar.window_bytes),
                       "case_fwd": fs.case_fwd, "case_bwd": fs.case_bwd},
            "best_sweep": {"name": best_name, "seconds": secs[best_name], "confirmed": conf["best"]},
            "chosen_confirmed": conf["fsmoe"],
            "same_as_best": same_schedule(fs, best),
            "chosen_over_best": conf["fsmoe"] / conf["best"],
            "chosen_over_best_sweep_pass": secs["fsmoe"] / secs[best_name],
            "sweep": {k: secs[k] for k in sw}}


def _timeline_artifacts(spec, layout, profile, named, merged, run_dir: Path) -> None:
    """Chrome trace + Gantt of one timed iteration of FSMoE and of Default (all ranks)."""
    for name in ("fsmoe", "default"):
        allr = merged[name][-1] if merged[name] else []
        if not allr:
            continue
        t0 = min(r.t0 for r in allr)
        measured = shift(allr, t0)
        s = named[name]
        pred = []
        for rank in range(layout.moe):
            sim = simulate_iteration(spec, layout, profile, s.r_fwd, s.r_bwd, s.iio, s.gar, rank=rank)
            pred += sim.records
        chrome_trace(measured, run_dir / f"trace_{name}.json", pred)
        gantt_png(measured, run_dir / f"gantt_{name}.png", pred,
                  title=f"{name}: {spec_str(spec)} r={s.r_fwd}/{s.r_bwd} (top measured, hatched predicted)")


# ---------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_command_arguments(p, nproc=4, ep=2, esp=2, gpus_per_node=2)
    p.add_argument("--configs", type=positive_int, default=24, help="layer configs drawn from the grid")
    p.add_argument("--first-config", type=non_negative_int, default=0,
                   help="start at this config of the grid's fixed order")
    p.add_argument("--merge", nargs="+", default=None, metavar="RUN_DIR",
                   help="instead of measuring: merge the results.json + ops.jsonl of these run dirs "
                        "(parts of one grid) into one report in --run-dir")
    p.add_argument("--layers", type=positive_int, default=2, help="blocks per config (gradient windows need >= 2)")
    p.add_argument("--iters", type=positive_int, default=5)
    p.add_argument("--warmup", type=non_negative_int, default=2)
    p.add_argument("--profile", default=None, help="Profile JSON (default: measure one first)")
    p.add_argument("--assume-overlap", type=float, default=None, metavar="ETA",
                   help="override the profile's measured overlap efficiency (1.0 = FSMoE's own model)")
    p.add_argument("--quick-sweep", action="store_true", help="sweep r in {1,2} only (smoke runs)")
    p.add_argument("--grid", default=None, choices=list(GRIDS), help="default: cpu on CPU, gpu on CUDA")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: fp32 CPU, bf16 GPU")
    p.add_argument("--run-dir", default="runs/bench_schedule")
    p.add_argument("--json", type=output_file, default=None,
                   help="write the results here (default RUN_DIR/results.json)")


def run(args) -> int:
    if args.merge:
        res = merge_runs([Path(d) for d in args.merge])
        run_dir = Path(args.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "results.json").write_text(json.dumps(res, indent=1))
        md = report_markdown(res, "fsmoe " + " ".join(sys.argv[1:]))
        (run_dir / "report.md").write_text(md)
        print(md)
        return 0

    return run_command(args, lambda groups, device: _bench_main(args, groups, device))


def _bench_main(args, groups: ParallelGroups, device: torch.device) -> int:
    run_dir = Path(args.run_dir)
    log = (lambda m: print(m, flush=True)) if groups.rank == 0 else (lambda m: None)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    profile = Profile.load(args.profile) if args.profile else None
    if args.assume_overlap is not None:
        if profile is None:
            profile = run_profile(groups, device, ProfileConfig.cpu() if device.type == "cpu" else ProfileConfig.gpu(),
                                  dtype)
        profile = dataclasses.replace(profile, overlap=args.assume_overlap)
    res = run_bench(groups, device, profile=profile,
                    n_configs=args.configs, iters=args.iters, warmup=args.warmup, n_layers=args.layers,
                    run_dir=run_dir, quick_sweep=args.quick_sweep, log=log,
                    grid=args.grid or ("gpu" if device.type == "cuda" else "cpu"), dtype=dtype,
                    first_config=args.first_config)
    if groups.rank == 0:
        command = "fsmoe " + " ".join(sys.argv[1:])
        out = Path(args.json or run_dir / "results.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        ops = res.pop("ops")
        (run_dir / "ops.jsonl").write_text("".join(json.dumps(o) + "\n" for o in ops))
        out.write_text(json.dumps(res, indent=1))
        md = report_markdown(res, command)
        (run_dir / "report.md").write_text(md)
        print(md)
    return 0


if __name__ == "__main__":  # python -m fsmoe.bench.schedule ... (where the console script is not installed)
    from fsmoe.cli import main

    raise SystemExit(main(["bench", "schedule", *sys.argv[1:]]))
