"""The scheduler inside ``fsmoe train``: config validation, and on 4 real gloo processes
(EP2 x ESP2 on 2 simulated nodes) the FSMoE schedule at a forced r = 2 logs the default
schedule's losses, while writing a timeline (Chrome trace + Gantt) and the refit error."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fsmoe.config import SCHEDULES, ConfigError, load_config
from fsmoe.schedule.model.baselines import POLICY_NAMES
from fsmoe.schedule.model.profile import profile_from_points

LAYOUT = ["--nproc", "4", "--ep", "2", "--esp", "2", "--gpus-per-node", "2"]
SMALL = ["--set", "model.d_model=32", "model.n_layers=2", "model.d_ff=64", "model.moe.experts.d_ff=32",
         "model.max_seq_len=32", "train.seq_len=32", "train.batch_size=8", "train.log_every=1", "train.eval_every=4",
         "train.eval_batches=1", "train.ckpt_every=0", "train.data_limit_mb=0.5", "train.warmup_steps=2"]


def fsmoe_train(run_dir: Path, *flags: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fsmoe.cli", "train", "--seed", "0", "--device", "cpu", "--run-dir", str(run_dir),
           *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"{' '.join(done.args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def synthetic_profile(path: Path) -> Path:
    """alpha-beta lines for every key the planner reads (no measuring: the test is about numerics)."""
    lines = {"a2a_inter": (50e-6, 1e-9), "a2a_intra": (30e-6, 5e-10), "allgather": (30e-6, 5e-10),
             "reducescatter": (30e-6, 5e-10), "allreduce": (60e-6, 1e-9), "expert_fwd": (20e-6, 1e-10),
             "expert_bwd": (40e-6, 2e-10), "dense_fwd": (50e-6, 1e-10), "dense_bwd": (100e-6, 2e-10)}
    pts = {k: [[n, a + b * n] for n in (1e3, 1e4, 1e5, 1e6)] for k, (a, b) in lines.items()}
    return profile_from_points("synthetic", "ep2-esp2-nodes2x2", pts, overlap=1.0).save(path)


# ---------------------------------------------------------------------------- config


def test_schedule_names_are_the_planner_policies():
    assert set(SCHEDULES) == set(POLICY_NAMES) and SCHEDULES[0] == "default"


@pytest.mark.parametrize("overrides, field, allowed", [
    (['parallel.schedule="fsmo"'], "parallel.schedule", "'fsmoe_no_iio'"),
    (['parallel.schedule="fsmoe"', "parallel.pipeline_degree=-1"], "parallel.pipeline_degree", ">= 0"),
    (["parallel.pipeline_degree=2"], "parallel.pipeline_degree", "pipelined parallel.schedule"),
    (['parallel.schedule="fsmoe"', 'parallel.profile=""'], "parallel.profile", "Profile JSON"),
    (["train.timeline_steps=-1"], "train.timeline_steps", ">= 0"),
    (["train.timeline_steps=2"], "train.timeline_steps", "parallel.schedule"),
])
def test_bad_schedule_fields_name_field_value_and_allowed(overrides, field, allowed):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides)
    assert e.value.field_name == field
    assert field in str(e.value) and allowed in str(e.value)


def test_schedule_fields_accept_every_policy():
    for name in SCHEDULES[1:]:
        cfg = load_config("tiny", [f'parallel.schedule="{name}"', "parallel.pipeline_degree=2",
                                   "train.timeline_steps=3"])
        assert (cfg.parallel.schedule, cfg.parallel.pipeline_degree, cfg.train.timeline_steps) == (name, 2, 3)
    assert load_config("tiny").parallel.schedule == "default"


# ---------------------------------------------------------------------------- command line


def test_bad_schedule_name_is_a_clear_cli_error(tmp_path):
    done = fsmoe_train(tmp_path / "bad", "--steps", "1", "--set", 'parallel.schedule="fsmo"', timeout=60)
    assert done.returncode != 0
    assert "parallel.schedule='fsmo' is invalid" in done.stderr and "'fsmoe'" in done.stderr
    assert not (tmp_path / "bad").exists()


def test_one_process_refuses_a_pipelined_schedule_before_writing(tmp_path):
    done = fsmoe_train(tmp_path / "one", "--steps", "1", "--set", 'parallel.schedule="fsmoe"',
                       "train.data_limit_mb=0.1", timeout=60)
    assert done.returncode != 0 and "--nproc N" in done.stderr
    assert not (tmp_path / "one").exists()


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> list[dict]:
    """The default schedule's metrics on the test layout (the reference of the tests below)."""
    run_dir = tmp_path_factory.mktemp("default") / "run"
    ok(fsmoe_train(run_dir, *LAYOUT, "--steps", "4", *SMALL))
    return records(run_dir)


def assert_same_losses(ref: list[dict], got: list[dict], tol: float = 1e-5) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [1, 2, 3, 4]
    for a, b in zip(ref, got):
        for key in ("loss", "grad_norm"):
            assert abs(a[key] - b[key]) < tol, (a["step"], key, a[key], b[key])
    assert abs(ref[-1]["val_loss"] - got[-1]["val_loss"]) < tol


@pytest.mark.dist
def test_fsmoe_schedule_r2_matches_default_and_writes_timeline(tmp_path, default_run):
    """EP2 x ESP2 x DP4 on 2 simulated nodes: FSMoE at r = 2 (pipelined chunks, IIO lanes, GradSync
    partitions in the backward windows) logs the default schedule's losses and gradient norms within 1e-5."""
    profile = synthetic_profile(tmp_path / "profile.json")
    out = ok(fsmoe_train(tmp_path / "fsmoe", *LAYOUT, "--steps", "4", "--timeline", "2", *SMALL,
                         'parallel.schedule="fsmoe"', f'parallel.profile="{profile}"', "parallel.pipeline_degree=2"))
    assert "schedule fsmoe: r_fwd=2 r_bwd=2 (forced by parallel.pipeline_degree)" in out
    assert out.count("schedule fsmoe:") == 1  # rank 0 only
    got = records(tmp_path / "fsmoe")
    assert_same_losses(default_run, got)

    # timeline: steps 2-3 recorded on every rank; Chrome trace parses, Gantt is a PNG
    trace = json.loads((tmp_path / "fsmoe" / "timeline.json").read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    measured = {e["pid"] for e in spans if e["pid"] < 1000}
    assert measured == {0, 1, 2, 3} and {e["pid"] for e in spans} - measured == {1000, 1001, 1002, 1003}
    assert {e["cat"] for e in spans} >= {"a2a_dispatch", "allgather", "expert", "reducescatter", "a2a_combine",
                                         "allreduce", "dense"}
    assert (tmp_path / "fsmoe" / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    refit = [r for r in got if "op_error_median_refit" in r]
    assert len(refit) == 1 and refit[0]["step"] == 3 and refit[0]["timeline_ops"] > 0
    assert refit[0]["op_error_median_refit"] >= 0 and (tmp_path / "fsmoe" / "profile_refit.json").exists()
    assert refit[0]["op_error_median_refit_heldout"] >= 0  # refit on step 2, scored on step 3
    # the per-op table and the records, which `fsmoe profile --refit` reads (the layout in their header)
    import csv

    from fsmoe.cli import main
    from fsmoe.schedule.model.profile import Profile

    rows = list(csv.DictReader(open(tmp_path / "fsmoe" / "timeline_ops.csv")))
    assert {r["rank"] for r in rows} == {"0", "1", "2", "3"} and {"glue", "expert", "a2a_combine"} <= {r["kind"] for r in rows}
    assert all(float(r["measured_ms"]) > 0 and r["predicted_refit_ms"] for r in rows)
    out_p = tmp_path / "refit_cli.json"
    assert main(["profile", "--refit", str(tmp_path / "fsmoe" / "timeline_records.jsonl"), "--profile", str(profile),
                 "--out", str(out_p)]) == 0
    assert any(k.startswith("glue_fwd@") for k in Profile.load(out_p).fits)


@pytest.mark.dist
def test_fsmoe_schedule_with_sharded_weights_matches_default(tmp_path, default_run):
    """FSMoE at r = 2 with the blocks' weights split and gathered around each use (``--shard
    full``): the pipelined executor reads the expert weights on the compute lane only, so it logs
    the default schedule's losses and gradient norms."""
    profile = synthetic_profile(tmp_path / "profile.json")
    out = ok(fsmoe_train(tmp_path / "full", *LAYOUT, "--steps", "4", "--shard", "full", *SMALL,
                         'parallel.schedule="fsmoe"', f'parallel.profile="{profile}"', "parallel.pipeline_degree=2"))
    assert "parallel.shard=full" in out
    assert_same_losses(default_run, records(tmp_path / "full"))


@pytest.mark.dist
def test_startup_profile_and_tutel_schedule_r3_match_default(tmp_path, default_run):
    """No parallel.profile: a quick profile on the real groups at start-up (saved as profile.json);
    Tutel-Improved at r = 3 (chunks of unequal size; each block's gradients reduced as soon as ready),
    with the optimizer state split over the replicas (``--shard optimizer``): still the default's losses."""
    out = ok(fsmoe_train(tmp_path / "tutel", *LAYOUT, "--steps", "4", "--shard", "optimizer", *SMALL,
                         'parallel.schedule="tutel_improved"', "parallel.pipeline_degree=3"))
    assert "optimizer state split over replicas" in out
    assert "schedule tutel_improved: r_fwd=3 r_bwd=3" in out and "each block as soon as ready" in out
    assert_same_losses(default_run, records(tmp_path / "tutel"))
    profile = json.loads((tmp_path / "tutel" / "profile.json").read_text())
    assert {"allreduce", "expert_fwd", "expert_bwd"} <= set(profile["fits"])
    # measured at the run's own shapes: d_model 32, d_ff 32 / ESP2, 2 GELU GEMMs, 4 experts per EP rank
    # (the tiny preset's 8 / EP2), fp32 on CPU; the attention at this rank's batch (8 / DP4), 4 heads
    assert {"expert_fwd@E4m32f16g2B4", "expert_bwd@E4m32f16g2B4", "dense_fwd@b2l32m32h4B4"} <= set(profile["fits"])
    assert not (tmp_path / "tutel" / "timeline.json").exists()


def test_r1_plan_runs_the_default_data_path_under_nccl_only():
    """At r = 1 both ways under NCCL the schedule installs no executors, and under NCCL the dense
    gradients go in the default path's buckets at any r; gloo or a recorded timeline keep the
    executors and the plan's partitions."""
    from fsmoe.schedule.run.training import buckets_dense_gradients, runs_default_path
    from fsmoe.schedule.types import Schedule

    r1, r2 = Schedule("fsmoe", 1, 1, True), Schedule("fsmoe", 2, 1, True)
    assert runs_default_path(r1, "nccl")
    assert not runs_default_path(r1, "gloo") and not runs_default_path(r2, "nccl")
    assert not runs_default_path(r1, "nccl", timeline_steps=3)
    assert buckets_dense_gradients("nccl") and not buckets_dense_gradients("gloo")
    assert not buckets_dense_gradients("nccl", timeline_steps=3)


@pytest.mark.dist
def test_missing_profile_stops_every_rank_before_writing(tmp_path):
    done = fsmoe_train(tmp_path / "np", *LAYOUT, "--steps", "2", "--set", 'parallel.schedule="fsmoe"',
                       f'parallel.profile="{tmp_path / "missing.json"}"', "train.data_limit_mb=0.2", timeout=90)
    assert done.returncode == 2  # a worker's bad input: printed once by the launcher, one line
    assert done.stderr.strip().startswith("error: parallel.profile=") and "no such file" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "np").exists()
