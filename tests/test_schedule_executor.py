"""The pipelined executor equals the unpipelined layer, for every r, forward and backward; the
gradient partitions average exactly; timelines and the layer-grid benchmark run end to end.

Single-process tests use the LocalDispatcher; the multi-process ones run real gloo
processes (EP x ESP layouts with simulated nodes) against the one-process MoELayer.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_workers
from torch import nn

from fsmoe.config import ExpertsConfig, MoEConfig, ParallelConfig, RouterConfig
from fsmoe.layer import MoELayer
from fsmoe.schedule.model.timeline import chrome_trace, gantt_png, shift
from fsmoe.schedule.run.engine import Recorder, ThreadEngine
from fsmoe.schedule.run.executor import PipelinedExecutor
from fsmoe.schedule.run.grad_sync import GradSync
from fsmoe.schedule.types import GarPlan, LayerSchedule

R_PAIRS = [(1, 1), (2, 2), (4, 4), (8, 8), (1, 8), (8, 1), (2, 4), (4, 2), (3, 1), (1, 3)]


def _cfg(act: str, cap) -> MoEConfig:
    return MoEConfig(num_experts=4, router=RouterConfig(top_k=2, capacity_factor=cap),
                     experts=ExpertsConfig(d_ff=16, activation=act))


def _loss(y):
    return (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y).sin()).sum()


@pytest.mark.parametrize("act,cap", [("gelu", None), ("swiglu", None), ("swiglu", 1.0)])
def test_pipelined_equals_unpipelined_every_r(act, cap):
    torch.manual_seed(0)
    ref = MoELayer(_cfg(act, cap), 8).double()
    x = torch.randn(3, 10, 8, dtype=torch.double, requires_grad=True)
    y, _ = ref(x)
    _loss(y).backward()
    grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    eng = ThreadEngine()
    try:
        for rf, rb in R_PAIRS:
            for iio in (True, False):
                lay = copy.deepcopy(ref)
                lay.zero_grad()
                lay.executor = PipelinedExecutor(eng, LayerSchedule(rf, rb, iio))
                x2 = x.detach().clone().requires_grad_()
                y2, _ = lay(x2)
                _loss(y2).backward()
                torch.testing.assert_close(y2, y, rtol=0, atol=1e-12)
                torch.testing.assert_close(x2.grad, x.grad, rtol=0, atol=1e-12)
                for n, p in lay.named_parameters():
                    torch.testing.assert_close(p.grad, grads[n], rtol=0, atol=1e-12, msg=lambda m: f"{n} r={rf}/{rb}: {m}")
    finally:
        eng.close()


def test_fp32_and_records_every_chunk(tmp_path):
    torch.manual_seed(1)
    ref = MoELayer(_cfg("swiglu", None), 16)
    x = torch.randn(2, 12, 16, requires_grad=True)
    y, _ = ref(x)
    rec = Recorder()
    eng = ThreadEngine(rec)
    lay = copy.deepcopy(ref)
    lay.executor = PipelinedExecutor(eng, LayerSchedule(4, 2))
    y2, _ = lay(x)
    _loss(y2).backward()
    eng.close()
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-6)
    recs = rec.take()
    experts = [r for r in recs if r.op.kind == "expert"]
    assert sorted((r.op.phase, r.op.chunk) for r in experts) == [("bwd", 0), ("bwd", 1)] + [("fwd", i) for i in range(4)]
    assert {r.lane for r in recs} == {"compute", "inter"}  # ep = esp = 1: no intra-lane ops
    assert all(r.t1 >= r.t0 for r in recs)
    trace = chrome_trace(shift(recs, min(r.t0 for r in recs)), tmp_path / "trace.json", recs)
    events = json.loads(Path(trace).read_text())["traceEvents"]
    assert any(e.get("cat") == "expert" for e in events)
    png = gantt_png(recs, tmp_path / "gantt.png", recs, title="t")
    assert png.stat().st_size > 1000


def test_executor_rejects_modules_without_grouped_weights():
    lay = MoELayer(_cfg("gelu", None), 8, executor=PipelinedExecutor(ThreadEngine()))
    lay.experts = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="GroupedExperts"):
        lay(torch.randn(4, 8))
    with pytest.raises(ValueError, match="r_fwd"):
        LayerSchedule(0, 1)


@pytest.mark.parametrize("rf,rb", [(1, 1), (3, 3), (2, 4)])
def test_hooks_fire_under_the_pipelined_executor(rf, rb):
    """Every hook fires (the middle two once per chunk) and a replacing hook changes the result,
    forward and backward, exactly as under the sequential executor."""
    from fsmoe.layer import HOOK_POINTS

    torch.manual_seed(2)
    cfg = _cfg("swiglu", None)
    x = torch.randn(2, 9, 8, dtype=torch.double)
    ref = MoELayer(cfg, 8).double()
    double = lambda _layer, t: 2 * t  # a replacing hook inside the expert section
    ref.register_hook("after_dispatch", double)
    xr = x.clone().requires_grad_()
    y_ref, _ = ref(xr)
    _loss(y_ref).backward()
    eng = ThreadEngine()
    try:
        lay = MoELayer(cfg, 8, executor=PipelinedExecutor(eng, LayerSchedule(rf, rb))).double()
        lay.load_state_dict(ref.state_dict())
        seen = []
        for point in HOOK_POINTS:
            lay.register_hook(point, lambda _layer, t, p=point: seen.append(p))
        lay.register_hook("after_dispatch", double)
        x2 = x.clone().requires_grad_()
        y, _ = lay(x2)
        _loss(y).backward()
    finally:
        eng.close()
    forward = seen[:2 + 2 * rf + 2]
    assert forward[:2] == ["layer_start", "before_dispatch"] and forward[-2:] == ["after_combine", "layer_end"]
    assert forward[2:-2] == ["after_dispatch", "before_combine"] * rf
    assert seen[len(forward):] == ([] if rf == rb else ["after_dispatch", "before_combine"] * rb)  # recomputed
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(x2.grad, xr.grad, rtol=0, atol=1e-12)
    for n, p in lay.named_parameters():
        torch.testing.assert_close(p.grad, dict(ref.named_parameters())[n].grad, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------- real processes


def _layer_worker(rank, world, ep, esp, act, cap):
    from fsmoe.parallel.groups import build_groups
    from fsmoe.parallel.moe import ParallelMoELayer

    groups = build_groups(ParallelConfig(dp=world, ep=ep, esp=esp, gpus_per_node=esp))
    layout = groups.layout
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=2 * ep, router=RouterConfig(top_k=2, capacity_factor=cap),
                    experts=ExpertsConfig(d_ff=8 * esp, activation=act))
    ref = MoELayer(cfg, 8).double()
    xs = [torch.randn(2, 5 + 3 * w, 8, dtype=torch.double) for w in range(world)]
    ys, gxs = [], []
    for w in range(world):  # the one-process layer on every rank's tokens
        x = xs[w].clone().requires_grad_()
        y, _ = ref(x)
        _loss(y).backward()
        ys.append(y.detach())
        gxs.append(x.grad)
        if w == rank:
            grouter = {n: p.grad.clone() for n, p in ref.router.named_parameters()}
        ref.router.zero_grad()
    eng = ThreadEngine()
    worst = 0.0
    for rf, rb in [(1, 1), (2, 4), (4, 2), (8, 8), (3, 1)]:
        lay = ParallelMoELayer.from_layer(copy.deepcopy(ref), groups).double()
        lay.router.balance_group = None
        lay.executor = PipelinedExecutor(eng, LayerSchedule(rf, rb, iio=rf % 2 == 0), layout)
        x = xs[rank].clone().requires_grad_()
        y, _ = lay(x)
        _loss(y).backward()
        errs = [(y - ys[rank]).abs().max(), (x.grad - gxs[rank]).abs().max()]
        e0, El, f0, F = lay.experts.expert_offset, lay.experts.num_experts, lay.experts.f_offset, lay.experts.w1_EDF.shape[2]
        for n, p in lay.experts.named_parameters():
            errs.append((p.grad - getattr(ref.experts, n).grad[e0:e0 + El].narrow(1 if n == "w2_EFD" else 2, f0, F))
                        .abs().max())
        errs += [(p.grad - grouter[n]).abs().max() for n, p in lay.router.named_parameters()]
        worst = max(worst, max(float(e) for e in errs))
    eng.close()
    return worst


@pytest.mark.dist
@pytest.mark.parametrize("ep,esp,act,cap", [(2, 2, "swiglu", None), (4, 1, "gelu", 1.0), (1, 2, "gelu", None)])
def test_pipelined_equals_one_process_on_gloo(ep, esp, act, cap):
    worst = run_workers(_layer_worker, ep * esp, ep, esp, act, cap, timeout_s=150)
    assert max(worst) < 1e-10


def _gradsync_worker(rank, world):
    torch.manual_seed(0)
    blocks = [nn.Linear(5, 7), nn.Linear(7, 3), nn.Linear(3, 2)]
    params = [list(b.parameters()) for b in blocks]
    x = torch.randn(4, 5) + rank
    out = {}
    for mode, kw in (("end", {}), ("ready", {}), ("chunks", {"chunk_bytes": 40}),
                     ("windows", {"window_bytes": (0, 60, 1000)})):
        eng = ThreadEngine()
        gs = GradSync.for_blocks(params, GarPlan(mode, **kw), eng)
        for b in blocks:
            b.zero_grad(set_to_none=True)
        loss = blocks[2](blocks[1](blocks[0](x))).square().sum()
        loss.backward()
        for layer in (2, 1, 0):  # what the MoE executors' backward windows would do
            for slot in ("mid", 0):
                gs.window(eng, layer, slot, 2)
        gs.finish()
        gs.remove()
        eng.close()
        out[mode] = [p.grad.clone() for ps in params for p in ps]
    for b in blocks:  # reference: plain AllReduce average
        b.zero_grad(set_to_none=True)
    blocks[2](blocks[1](blocks[0](x))).square().sum().backward()
    ref = []
    for ps in params:
        for p in ps:
            g = p.grad.clone()
            dist.all_reduce(g)
            ref.append(g / world)
    return max(float((a - b).abs().max()) for grads in out.values() for a, b in zip(grads, ref))


@pytest.mark.dist
def test_gradient_partitions_average_like_one_allreduce():
    assert max(run_workers(_gradsync_worker, 2, timeout_s=90)) < 1e-6


def _bench_worker(rank, world, run_dir):
    from fsmoe.parallel.groups import build_groups
    from fsmoe.bench.schedule import run_bench
    from fsmoe.bench.schedule_report import merge_runs, report_markdown
    from fsmoe.schedule.run.profiler import ProfileConfig, run_profile

    groups = build_groups(ParallelConfig(dp=world, ep=2, esp=2, gpus_per_node=2))
    cfg = ProfileConfig((8 << 10, 64 << 10), ((64, 64, 2),), (64, 256), 2, ((1, 128, 64, 2), (1, 256, 64, 2)),
                        reps=1, warmup=1)
    prof = run_profile(groups, torch.device("cpu"), cfg)
    res = run_bench(groups, torch.device("cpu"), profile=prof, n_configs=1, iters=1, warmup=0, n_layers=2,
                    run_dir=Path(run_dir), calib_iters=1, quick_sweep=True, log=lambda m: None)
    if rank:
        return None
    ops = res.pop("ops")
    assert ops and {"key", "n", "rank", "runs", "offline", "refitted", "schedule"} <= set(ops[0])
    assert any("@" in o["key"] for o in ops)  # expert and attention ops carry their shape
    for part in ("a", "b"):  # two "parts" of a grid, merged as `--merge` does
        d = Path(run_dir) / part
        d.mkdir()
        (d / "results.json").write_text(json.dumps(res))
        (d / "ops.jsonl").write_text("".join(json.dumps(o) + "\n" for o in ops))
    merged = merge_runs([Path(run_dir) / "a", Path(run_dir) / "b"])
    scheduled = [o for o in ops if o["kind"] not in ("glue", "counts")]
    assert {"glue", "counts"} <= {o["kind"] for o in ops} and all(o["refitted"] for o in ops if o["kind"] == "glue")
    assert merged["summary"]["configs"] == 2 and merged["op_errors"]["offline"]["all"]["ops"] == 2 * len(scheduled)
    assert 0 < res["summary"]["iteration_predicted_over_measured_median"]["fsmoe"]
    return report_markdown(res, "test")


@pytest.mark.dist
def test_bench_schedule_smoke(tmp_path):
    md = run_workers(_bench_worker, 4, str(tmp_path), timeout_s=150)[0]
    assert "chosen within 5%" in md and "FSMoE speedup over Default" in md
    for f in ("trace_fsmoe.json", "gantt_fsmoe.png", "trace_default.json"):
        assert (tmp_path / f).exists()


def test_pipelined_forward_without_grad_equals_sequential():
    torch.manual_seed(3)
    ref = MoELayer(_cfg("swiglu", None), 8).double()
    x = torch.randn(2, 7, 8, dtype=torch.double)
    eng = ThreadEngine()
    try:
        lay = copy.deepcopy(ref)
        lay.executor = PipelinedExecutor(eng, LayerSchedule(3, 1))
        with torch.no_grad():
            y, _ = lay(x)
            y_ref, _ = ref(x)
    finally:
        eng.close()
    assert not y.requires_grad
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)


class _OnceBackward(torch.autograd.Function):
    """Identity whose backward frees what it saved, as the GPU experts' kernels do: a graph
    cannot be run backward twice."""

    @staticmethod
    def forward(ctx, x):
        ctx.kept = x
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        assert ctx.kept is not None, "backward ran twice on one graph"
        ctx.kept = None
        return g


def test_the_profile_times_each_expert_backward_on_a_fresh_graph(monkeypatch):
    from fsmoe.experts import GroupedExperts
    from fsmoe.schedule.run import profiler

    class OnceExperts(GroupedExperts):
        def forward(self, x_ND, tokens_per_expert_E):
            return super().forward(_OnceBackward.apply(x_ND), tokens_per_expert_E)

    monkeypatch.setattr(profiler, "experts_class", lambda impl: OnceExperts)
    cfg = profiler.ProfileConfig((8 << 10,), ((32, 64, 3),), (16, 64), 2, ((1, 32, 32, 2),), reps=2, warmup=1)
    points = profiler._compute_points(cfg, torch.device("cpu"), torch.float32)
    keys = [p[0] for p in points]
    assert keys.count("expert_bwd") == 2 and keys.count("dense_bwd") == 1 and all(p[2] > 0 for p in points)
