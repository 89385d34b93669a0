"""fsmoe.profiling: the trace summary's arithmetic, the config check, and a CPU run's files."""
import gzip
import json

import pytest

from fsmoe.config import ConfigError, RunConfig, TrainConfig
from fsmoe.profiling import summarize


def kernel(name, ts, dur, stream=7):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}


def test_summary_splits_compute_comm_overlap_and_idle():
    # compute [0, 100) and [150, 200); NCCL [80, 170) on another stream; nothing in [100, 150) but NCCL
    events = [kernel("gemm", 0, 60), kernel("gemm", 40, 60), kernel("softmax", 150, 50),
              kernel("ncclDevKernel_SendRecv", 80, 90, stream=20), {"ph": "X", "cat": "cpu_op", "name": "x",
                                                                    "ts": 0, "dur": 1000}]
    s = summarize(events, steps=1)
    assert s.step_ms == pytest.approx(0.2)
    assert s.compute_ms == pytest.approx(0.15)
    assert s.comm_ms == pytest.approx(0.09)
    assert s.overlap_ms == pytest.approx(0.04)  # [80, 100) and [150, 170)
    assert s.exposed_comm_ms == pytest.approx(0.05)
    assert s.idle_ms == pytest.approx(0.0)
    assert s.streams == 2
    assert s.top_kernels[0] == ("gemm", pytest.approx(0.12), 2)
    assert "under compute" in s.describe()


def test_summary_per_step_and_idle():
    s = summarize([kernel("a", 0, 10), kernel("b", 30, 10)], steps=2)
    assert s.step_ms == pytest.approx(0.02) and s.idle_ms == pytest.approx(0.01)
    assert summarize([], steps=3).streams == 0


def test_too_few_steps_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match="train.torch_profile_steps"):
        RunConfig(train=TrainConfig(steps=10, torch_profile_steps=3))
    with pytest.raises(ConfigError, match="train.torch_profile_steps"):
        RunConfig(train=TrainConfig(steps=100, torch_profile_steps=-1))


def test_cpu_run_writes_trace_and_summary(tmp_path, capsys):
    from fsmoe.cli import main

    run = tmp_path / "run"
    main(["train", "--config", "tiny", "--steps", "10", "--torch-profile", "1", "--run-dir", str(run),
          "--set", "train.eval_batches=1", "model.n_layers=2", "train.batch_size=4", "train.seq_len=32"])
    with gzip.open(run / "torch_trace_rank0.json.gz") as f:
        assert json.load(f)["traceEvents"]
    assert json.loads((run / "torch_profile_rank0.json").read_text())["steps"] == 1
    assert "ops by self time" in capsys.readouterr().out
