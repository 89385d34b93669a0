"""The whole-step predictor (fsmoe.sim.step), the profile's step parts (fsmoe profile --config)
and ``fsmoe simulate step``."""
from __future__ import annotations

import dataclasses
import json
import numpy as np

import pytest
import torch

from fsmoe.config import load_config
from fsmoe.parallel.layout import Layout
from fsmoe.placement.traffic import read_trace
from fsmoe.schedule.model.profile import LinearFit, Profile
from fsmoe.sim.step import PARTS, ParamSplit, measured_step_s, predict_step

FITS = {"expert_fwd": LinearFit(0.0, 1e-10), "expert_bwd": LinearFit(0.0, 2e-10),
        "dense_fwd": LinearFit(0.0, 1e-10), "dense_bwd": LinearFit(0.0, 2e-10),
        "glue_fwd": LinearFit(0.0, 1e-6), "glue_bwd": LinearFit(0.0, 1e-6),
        "a2a_intra": LinearFit(1e-4, 1e-9), "allreduce": LinearFit(1e-4, 1e-9), "allgather": LinearFit(1e-4, 1e-9),
        "head_fwd": LinearFit(0.0, 1e-10), "head_bwd": LinearFit(0.0, 2e-10), "optimizer": LinearFit(1e-3, 1e-9),
        "loop": LinearFit(2e-3, 0.0)}
PROFILE = Profile("test", "any", FITS)


def _cfg(*sets):
    return load_config("tiny", ["train.batch_size=8", *sets])


def test_param_split_counts_every_parameter_once_by_its_sharding():
    cfg = _cfg("model.moe_every=2")
    split = ParamSplit.of(cfg)
    m = cfg.model
    experts = 2 * m.moe.num_experts * 2 * m.d_model * m.moe.experts.d_ff  # 2 MoE layers, GeLU w1 + w2
    assert split.experts == pytest.approx(experts, rel=0.01)
    from fsmoe.models.decoder import build_model

    assert split.experts + split.tensor_par + split.other == build_model(m, seed=0).num_parameters()
    assert split.on_rank(Layout(dp=4, mp=2, ep=4)) == split.experts // 4 + split.tensor_par // 2 + split.other


def test_parts_by_hand_and_what_each_layout_adds():
    cfg = _cfg()
    one = predict_step(cfg, Layout(), PROFILE)
    T, D, V = 8 * 128, 128, 256
    assert one.head == pytest.approx(3e-10 * T * D * V)
    assert one.optimizer == pytest.approx(1e-3 + 1e-9 * ParamSplit.of(cfg).on_rank(Layout()))
    assert one.gradients == 0 and one.tensor_par == 0 and one.dense_blocks == 0 and not one.missing
    assert one.loop == pytest.approx(2e-3)
    assert one.total_s == pytest.approx(sum(getattr(one, p) for p in PARTS))
    ep = predict_step(cfg, Layout(dp=2, ep=2), PROFILE)  # half the tokens per rank, an AlltoAll, experts halved
    assert ep.head == pytest.approx(one.head / 2) and ep.gradients > 0 and ep.optimizer < one.optimizer
    dp = predict_step(cfg, Layout(dp=2), PROFILE)  # experts replicated: their gradients are reduced too
    assert dp.gradients > ep.gradients
    mp = predict_step(cfg, Layout(dp=1, mp=2, ep=2), PROFILE)
    nbytes = T * D * 4  # the dp shard's activations, fp32
    assert mp.tensor_par == pytest.approx(2 * 4 * (1e-4 + 1e-9 * nbytes) * 2)  # 4 MoE blocks: AR + AG, fwd + bwd
    assert mp.head == pytest.approx(one.head)  # every mp rank computes the shard's loss


def test_dense_blocks_are_priced_and_missing_fits_are_named():
    cfg = _cfg("model.moe_every=2")
    parts = predict_step(cfg, Layout(), PROFILE)
    assert parts.dense_blocks > 0
    bare = Profile("old", "any", {k: f for k, f in FITS.items() if not k.startswith(("head", "optimizer", "loop"))})
    old = predict_step(cfg, Layout(), bare)
    assert old.head == 0 and old.optimizer == 0 and old.loop == 0
    assert set(old.missing) == {"head_fwd", "head_bwd", "optimizer", "loop"}


def test_measured_step_skips_the_warm_up_window():
    recs = [{"tokens_per_s": 10.0}, {"tokens_per_s": 100.0}, {"tokens_per_s": 50.0}, {"loss": 1.0}]
    assert measured_step_s(recs, 100) == pytest.approx(100 / 75)
    assert measured_step_s(recs[:1], 100) == pytest.approx(10.0) and measured_step_s([], 100) is None


def test_model_parts_are_measured_at_the_runs_shapes():
    from fsmoe.schedule.run.model_parts import measure_model_parts, run_spec, with_model_parts

    cfg = _cfg("model.n_layers=2", "model.moe_every=2")
    spec = run_spec(cfg, dp=2)
    assert spec.batch == 4 and spec.n_layers == 1
    pts = measure_model_parts(cfg, spec, PROFILE, torch.device("cpu"), torch.float32, reps=1, warmup=0)
    assert pts["head_fwd"][0][0] == spec.tokens * 128 * 256 and pts["head_bwd"][0][1] > 0
    assert [p[0] for p in pts["optimizer"]] == [ParamSplit.of(cfg).experts + ParamSplit.of(cfg).tensor_par
                                                + ParamSplit.of(cfg).other, ParamSplit.of(cfg).tensor_par
                                                + ParamSplit.of(cfg).other]
    assert pts[f"glue_fwd@{spec.glue_tag}"] == pts["glue_fwd"] and pts["glue_fwd"][0][0] == spec.tokens
    assert pts["loop"][0][0] == 1 and pts["loop"][0][1] >= 0 and pts["step_jitter"][0][1] >= 0
    merged = with_model_parts(PROFILE, pts)
    assert merged.has("optimizer") and merged.fits["expert_fwd"] == FITS["expert_fwd"]


def test_profile_and_simulate_step_commands(tmp_path, capsys):
    from fsmoe.cli import main

    run, prof = tmp_path / "run", tmp_path / "p.json"
    sets = ["--set", "model.n_layers=2", "train.batch_size=4", "train.seq_len=32", "train.log_every=2",
            "train.eval_every=100", "train.ckpt_every=0", "train.data_limit_mb=0.2"]
    assert main(["train", "--config", "tiny", "--steps", "6", "--run-dir", str(run), "--trace", *sets]) == 0
    assert main(["profile", "--config", "tiny", "--quick", "--out", str(prof), *sets]) == 0
    assert Profile.load(prof).has("optimizer") and Profile.load(prof).meta["run"] == "tiny"
    capsys.readouterr()
    assert main(["simulate", "step", str(run), "--profile", str(prof), "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "predicted / measured" in out and "optimizer" in out and "where the step goes" in out
    rep = json.loads((tmp_path / "s.json").read_text())
    # the traced step's phases beside the prediction; the comparison leaves tracing's own cost out
    assert set(rep["by_phase_s"]) == {"forward + backward", "gradient sync", "optimizer", "rest (loop)"}
    assert rep["trace_s"] > 0 and rep["measured_untraced_s"] == pytest.approx(rep["measured_step_s"] - rep["trace_s"])
    assert rep["routing"].startswith("traced") and rep["ratio"] == pytest.approx(rep["predicted_s"]["total"]
                                                                                 / rep["measured_untraced_s"])
    assert ("fsmoe profile --refit" in " ".join(out.split())) == (abs(rep["ratio"] - 1) > 0.10)  # the hint when off
    phases = read_trace(run / "routing_trace.jsonl.gz").phases_N
    assert set(phases) == {"forward", "backward", "grad_sync", "optimizer", "trace"}
    assert all(len(v) == 6 and (v >= 0).all() for v in phases.values()) and (phases["grad_sync"] < 1e-3).all()
    assert main(["simulate", "step", str(tmp_path), "--profile", str(prof)]) == 2
    assert "needs the run's config.json" in capsys.readouterr().err
    refitted = tmp_path / "r.json"  # the traced op timings refit the expert lines
    assert main(["profile", "--refit", str(run / "routing_trace.jsonl.gz"), "--profile", str(prof),
                 "--out", str(refitted)]) == 0
    assert Profile.load(refitted).points != Profile.load(prof).points
    # and the step's jitter from the traced phases (training's steps, not the profile's runs)
    both = read_trace(run / "routing_trace.jsonl.gz").phases_N
    both = (both["forward"] + both["backward"])[3:]
    assert Profile.load(refitted).t("step_jitter", 1.0) == pytest.approx(float(np.std(both, ddof=1)), rel=1e-6)
    lone = tmp_path / "lone" / "routing_trace.jsonl.gz"
    lone.parent.mkdir()
    lone.write_bytes((run / "routing_trace.jsonl.gz").read_bytes())
    assert main(["profile", "--refit", str(lone), "--profile", str(prof)]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["profile", "--set", "train.batch_size=2"]) == 2
    assert "--set" in capsys.readouterr().err
    planned = ["simulate", "step", "--config", "tiny", "--profile", str(prof), "--set", "train.batch_size=8"]
    assert main(planned + ["--nproc", "2", "--json", str(tmp_path / "planned.json")]) == 0
    rep = json.loads((tmp_path / "planned.json").read_text())  # DP2, priced with a one-process profile
    assert rep["world"] == 2 and rep["measured_step_s"] is None and "allreduce" in rep["predicted_s"]["missing"]
    assert "a planned run" in capsys.readouterr().out
    assert main(planned + ["--nproc", "4", "--ep", "4"]) == 2  # the profile has no AlltoAll fit
    assert "a2a_intra" in capsys.readouterr().err
    assert main(planned + ["--nproc", "4", "--ep", "3"]) == 2
    assert "parallel.ep" in capsys.readouterr().err
    assert main(["simulate", "step", "--profile", str(prof)]) == 2
    assert "--config of a planned run" in capsys.readouterr().err


def test_a_recorded_routing_prices_the_slowest_rank_of_each_layer():
    import numpy as np

    from fsmoe.schedule.model.perf_model import balanced_counts
    from fsmoe.schedule.run.model_parts import run_spec

    cfg, layout = _cfg(), Layout(dp=2, ep=2)
    spec = run_spec(cfg, 2)
    C = balanced_counts(spec, layout).astype(np.float64)  # [S, E]
    even = np.broadcast_to(C, (3, spec.n_layers, *C.shape)).copy()
    plain = predict_step(cfg, layout, PROFILE)
    assert predict_step(cfg, layout, PROFILE, routing_NMSE=even).moe_blocks == pytest.approx(plain.moe_blocks,
                                                                                              rel=1e-6)
    skew = even.copy()
    skew[..., :4] *= 1.5  # rank 0's experts get three quarters of the tokens
    skew[..., 4:] *= 0.5
    assert predict_step(cfg, layout, PROFILE, routing_NMSE=skew).moe_blocks > plain.moe_blocks * 1.1
    with pytest.raises(ValueError, match="does not match"):
        predict_step(cfg, layout, PROFILE, routing_NMSE=even[:, :2])


@pytest.mark.dist
def test_a_two_process_ep_profile_of_a_run_prices_its_dispatcher_and_every_part(tmp_path):
    """`fsmoe profile --config --nproc 2 --ep 2`: the run's parts under EP, its dispatcher's
    cost beyond the collectives' lines in the glue; the step predictor reads every part from it."""
    import os
    import subprocess
    import sys

    out = tmp_path / "p.json"
    cmd = [sys.executable, "-m", "fsmoe.cli", "profile", "--config", "tiny", "--nproc", "2", "--ep", "2",
           "--device", "cpu", "--out", str(out), "--set", "model.n_layers=2", "train.batch_size=4",
           "train.seq_len=32", 'model.arch="llama"']  # rotary tables in the block the dispatcher is timed in
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    prof = Profile.load(out)
    fwd, bwd = prof.meta["dispatcher_extra_ms"]
    assert fwd >= 0 and bwd >= 0 and prof.has("a2a_intra") and prof.has("allreduce") and prof.has("grad_sync")
    cfg = load_config("tiny", ["model.n_layers=2", "train.batch_size=4", "train.seq_len=32", 'model.arch="llama"'])
    parts = predict_step(cfg, Layout(dp=2, ep=2), prof)
    assert not parts.missing and parts.moe_blocks > 0 and parts.gradients > 0 and parts.optimizer > 0


def test_trace_samples_pair_each_op_with_the_size_its_routing_gave_it():
    import numpy as np

    from fsmoe.op_clock import OPS
    from fsmoe.placement.traffic import RoutingTrace
    from fsmoe.schedule.run.model_parts import run_spec
    from fsmoe.sim.trace_refit import trace_samples

    cfg, layout = _cfg(), Layout(dp=2, ep=2)
    spec = run_spec(cfg, 2)
    N, M, E = 3, spec.n_layers, spec.num_experts
    counts = np.zeros((N, M, 2, E), dtype=np.int64)
    counts[:, :, 0, :4] = 100  # rank 0 sends 400 rows to its own experts and 300 to rank 1's
    counts[:, :, 0, 4:7] = 100
    counts[:, :, 1, :4] = 50  # rank 1 sends 200 to rank 0's experts
    ops = np.full((N, M, len(OPS) + 1), 1e-3)
    ops[1, 0] = np.nan  # a step timed as a whole layer only: left out
    prof = dataclasses.replace(PROFILE, meta={"dispatcher_extra_ms": [0.5, 0.25]})
    trace = RoutingTrace({}, np.arange(N), counts, None, {"forward": ops, "backward": ops})
    samples = trace_samples(trace, spec, layout, prof)
    assert len(samples) == (N - 1) * M * 6 - 6  # the warm-up step and the NaN layer left out
    rb = spec.d_model * spec.dtype_bytes
    a2a = [s for s in samples if s[0] == layout.a2a_key][:4]
    assert [n for _, n, _ in a2a] == [700 * rb, 600 * rb, 700 * rb, 600 * rb]
    assert a2a[1][2] == pytest.approx(1e-3 - 0.25e-3)  # half the dispatcher's own forward work taken off
    assert a2a[3][2] == pytest.approx(1e-3 - 0.125e-3)  # and half its backward work
    experts = next(s for s in samples if s[0].startswith("expert_fwd"))
    assert experts[1] == 600 * spec.d_model * spec.d_ff * spec.gemms
    with pytest.raises(ValueError, match="no op timings"):
        trace_samples(RoutingTrace({}, np.arange(N), counts), spec, layout, prof)
    # data parallelism (moe groups of one rank): rank 1's tokens never reach rank 0's experts
    dp = trace_samples(trace, run_spec(_cfg(), 2), Layout(dp=2), prof)
    experts = next(s for s in dp if s[0].startswith("expert_fwd"))
    assert experts[1] == 700 * spec.d_model * spec.d_ff * spec.gemms  # rank 0's own 700 rows, not 900


def test_gradients_overlapped_with_backward_by_hand():
    """Buckets reduced while backward runs (fsmoe train on NCCL, default schedule): the head's
    gradients are ready first, each dense block's as its backward ends, the embeddings' last; one
    stream, first come first served; only what outlasts the backward counts."""
    from types import SimpleNamespace

    from fsmoe.sim.step import BUCKET_BYTES, overlapped_gradients_s

    prof = Profile("t", "any", {"allreduce": LinearFit(0.0, 1e-9)})  # 1 ns per byte, no fixed cost
    spec = SimpleNamespace(grad_bytes=4)
    MB = 2**20 // 4  # parameters in one MiB of fp32 gradients
    split = ParamSplit(experts=0, tensor_par=20 * MB, other=30 * MB, head=10 * MB, embedding=10 * MB,
                       outside_tp=20 * MB, outside_other=30 * MB)
    lay, sec = Layout(dp=2, ep=2), 2**20 * 1e-9  # one MiB's reduction
    blocks, moe = [0.0, 0.0], [False, False]
    # no backward to hide behind: every byte counts (dense 50 MiB = head 10 + blocks 30 + embedding 10)
    assert overlapped_gradients_s(split, lay, spec, prof, 0.0, blocks, moe, []) == pytest.approx(50 * sec)
    # a long backward hides all but what is ready only at its end: the first block's (15 MiB, its
    # backward runs last) and the embeddings' (10 MiB)
    long = overlapped_gradients_s(split, lay, spec, prof, 1.0, [1.0, 1.0], moe, [])
    assert long == pytest.approx(25 * sec)
    # head (10 MiB) ready at 5 MiB-times, blocks 15 MiB each ready at 10 and 20: the stream runs
    # 5..15, 15..30, 30..45, then the embeddings 45..55; backward ends at 20 -> 35 exposed
    mid = overlapped_gradients_s(split, lay, spec, prof, 5 * sec, [5 * sec, 10 * sec], moe, [])
    assert mid == pytest.approx(35 * sec)
    # a reduction pays its fixed cost per 25 MiB bucket
    fixed = Profile("t", "any", {"allreduce": LinearFit(1e-3, 0.0)})
    big = ParamSplit(experts=0, tensor_par=0, other=60 * MB, head=0, embedding=60 * MB, outside_other=60 * MB)
    assert overlapped_gradients_s(big, lay, spec, fixed, 0.0, [], [], []) == pytest.approx(
        -(-60 * 2**20 // BUCKET_BYTES) * 1e-3)


def test_overlap_hides_gradients_under_every_schedule():
    """On NCCL the runtime buckets the dense gradients into the backward under every schedule."""
    cfg = _cfg("model.moe_every=2")
    lay = Layout(dp=2, ep=2)
    for policy in ("default", "fsmoe"):
        plain = predict_step(cfg, lay, PROFILE, policy)
        over = predict_step(cfg, lay, PROFILE, policy, overlap_grads=True)
        assert 0 < over.gradients < plain.gradients


def test_gradients_outside_the_moe_blocks_are_counted_for_a_gqa_model():
    """Mixtral (grouped-query attention, every block MoE): what is reduced besides the blocks'
    schedule is the embeddings, the head and the final norm (they were lost when the blocks' dense
    parameters were counted as full multi-head attention and subtracted)."""
    cfg = load_config("mixtral-8x7b", [])
    split, m = ParamSplit.of(cfg), cfg.model
    assert split.embedding == split.head == m.vocab_size * m.d_model
    assert split.outside_tp == 0 and split.outside_other == split.embedding + split.head + m.d_model
    dense = ParamSplit.of(_cfg("model.moe_every=2"))
    assert dense.outside_tp > 0 and dense.outside_on_rank(Layout(dp=2, mp=2)) == dense.outside_tp // 2 + dense.outside_other


def test_the_step_waits_for_its_slowest_rank():
    """sigma (the profile's step_jitter) times the expected maximum of the ranks' standard normals."""
    from fsmoe.sim.step import expected_max_normal, waiting_s

    assert expected_max_normal(1) == pytest.approx(0.0, abs=1e-6)
    assert expected_max_normal(2) == pytest.approx(1 / np.sqrt(np.pi), rel=1e-4)  # closed form for two
    assert expected_max_normal(4) == pytest.approx(1.0294, abs=1e-3)
    jittery = dataclasses.replace(PROFILE, fits={**PROFILE.fits, "step_jitter": LinearFit(0.0, 4e-3)})
    assert waiting_s(jittery, 1) == 0 and waiting_s(PROFILE, 8) == 0
    assert waiting_s(jittery, 8) == pytest.approx(4e-3 * expected_max_normal(8))
    cfg, lay = _cfg(), Layout(dp=2, ep=2)
    base, slow = predict_step(cfg, lay, PROFILE), predict_step(cfg, lay, jittery)
    assert lay.world == 2 and slow.waiting == pytest.approx(waiting_s(jittery, 2))
    assert slow.total_s == pytest.approx(base.total_s + slow.waiting)


def test_the_measured_loop_is_each_steps_time_less_its_own_phases():
    """On a shared host a step's phases swing together (78 to 470 ms steps seen on 16 threads):
    the step's median less the phases' medians would call tens of ms of slow backward "loop"."""
    from fsmoe.cli.simulate_step import measured_phases
    from fsmoe.placement.traffic import RoutingTrace

    fwd = np.full(10, 0.03)
    bwd = np.array([0.03, 0.03, 0.30, 0.03, 0.30, 0.03, 0.30, 0.30, 0.03, 0.30])
    zero = np.zeros(10)
    phases = {"forward": fwd, "backward": bwd, "grad_sync": zero, "optimizer": np.full(10, 0.01),
              "trace": np.full(10, 0.001)}
    step_s = fwd + bwd + 0.011 + 0.002  # a 2 ms loop in every step
    trace = RoutingTrace({}, np.arange(10), np.zeros((10, 1, 1, 1)), step_s, phases_N=phases)
    got = measured_phases(trace, float(np.median(step_s)), skip=0)
    assert got["rest"] == pytest.approx(0.002)
    assert got["compute"] == pytest.approx(0.03 + np.median(bwd))
    # a trace without step times: the step less the phases' medians, as before
    old = measured_phases(RoutingTrace({}, np.arange(10), np.zeros((10, 1, 1, 1)), phases_N=phases), 0.3, skip=0)
    assert old["rest"] == pytest.approx(0.3 - old["compute"] - 0.011)
