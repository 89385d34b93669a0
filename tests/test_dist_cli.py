"""The acceptance command at test size: ``fsmoe train --nproc N`` in any layout logs the losses of
``--nproc 1``; a run checkpointed at EP=2 resumes at DP2xMP2 / EP2xESP2 on 2 simulated nodes
and still follows the one-process curve, also when its newest checkpoint has a damaged shard."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist
SMALL = ["--set", "model.d_model=32", "model.n_layers=2", "model.d_ff=64", "model.moe.experts.d_ff=32",
         "model.max_seq_len=32", "train.seq_len=32", "train.batch_size=8", "train.log_every=1", "train.eval_every=3",
         "train.eval_batches=1", "train.ckpt_every=3", "train.data_limit_mb=0.5", "train.warmup_steps=2",
         "train.min_lr_ratio=1.0"]  # constant LR after warmup: a run resumed with a larger --steps keeps its schedule


def fsmoe_train(run_dir: Path, *flags: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fsmoe.cli", "train", "--seed", "0", "--device", "cpu", "--run-dir", str(run_dir),
           *flags, *SMALL]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def losses(run_dir: Path) -> dict[int, tuple[float, float | None]]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r.get("val_loss")) for r in recs}


def assert_same_curve(got: dict, ref: dict) -> None:
    assert sorted(got) == sorted(ref)
    for step, (loss, val) in ref.items():
        assert abs(got[step][0] - loss) < 1e-4, (step, got[step], (loss, val))
        if val is not None:
            assert abs(got[step][1] - val) < 1e-4, (step, got[step], (loss, val))


def test_nproc4_ep4_and_cross_layout_resume_match_one_process(tmp_path):
    fsmoe_train(tmp_path / "one", "--nproc", "1", "--steps", "6")
    ref = losses(tmp_path / "one")

    fsmoe_train(tmp_path / "ep4", "--nproc", "4", "--ep", "4", "--steps", "6")
    assert_same_curve(losses(tmp_path / "ep4"), ref)

    fsmoe_train(tmp_path / "resumed", "--nproc", "2", "--ep", "2", "--steps", "3")
    layout = ["--nproc", "4", "--mp", "2", "--ep", "2", "--esp", "2", "--gpus-per-node", "2"]
    fsmoe_train(tmp_path / "resumed", "--resume", *layout, "--steps", "6")
    assert_same_curve(losses(tmp_path / "resumed"), ref)

    # 4 KiB overwritten in rank 1's shard of the newest checkpoint: rank 0 verifies the checksums,
    # every rank resumes from the older intact checkpoint and retrains the same steps
    shard = tmp_path / "resumed" / "ckpt" / "step_6" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4096] = bytes(len(data[mid:mid + 4096]))
    shard.write_bytes(bytes(data))
    done = fsmoe_train(tmp_path / "resumed", "--resume", *layout, "--steps", "6")
    assert "warning:" in done.stdout and str(shard) in done.stdout and "resumed from step 3" in done.stdout
    assert_same_curve(losses(tmp_path / "resumed"), ref)



def test_ctrl_c_under_nproc_stops_every_worker_with_one_line(tmp_path):
    """SIGINT to ``fsmoe train --nproc 2``: one line (no agent traceback), exit 130, no worker left."""
    import signal
    import time

    cmd = [sys.executable, "-m", "fsmoe.cli", "train", "--seed", "0", "--device", "cpu", "--run-dir",
           str(tmp_path / "run"), "--nproc", "2", "--ep", "2", "--steps", "100000", *SMALL]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 180
    while not (tmp_path / "run" / "metrics.jsonl").exists():  # the workers are training
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate(timeout=30)
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out[-2000:], err[-2000:])
    assert "interrupted (SIGINT)" in err and "Traceback" not in err, err[-3000:]


def test_sharded_optimizer_state_follows_one_process_and_resumes_across_layouts(tmp_path):
    """``parallel.shard=optimizer`` (AdamW state split over the replicas): the same curve as one
    process, checkpointed at EP2 (experts' state whole: edp 1), resumed at DP4 x EP2 (edp 2) with
    the blocks' weights split too (``shard=full``), then continued with the state whole again."""
    fsmoe_train(tmp_path / "one", "--nproc", "1", "--steps", "9")
    ref = losses(tmp_path / "one")
    run = tmp_path / "sharded"
    first = fsmoe_train(run, "--nproc", "2", "--ep", "2", "--steps", "3", "--shard", "optimizer")
    assert "optimizer state split over replicas" in first.stdout
    middle = fsmoe_train(run, "--resume", "--nproc", "4", "--ep", "2", "--steps", "6", "--shard", "full")
    assert "parallel.shard=full" in middle.stdout
    last = fsmoe_train(run, "--resume", "--nproc", "2", "--ep", "2", "--steps", "9")  # the layout's flags only
    assert "optimizer state split" not in last.stdout
    assert_same_curve(losses(run), ref)
