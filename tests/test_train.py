"""fsmoe.train: exact resume, run-dir safety, checkpoints, and `fsmoe train` end to end."""
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from fsmoe import checkpoint
from fsmoe.config import ConfigError, load_config
from fsmoe.metrics import read_metrics
from fsmoe.models import build_model
from fsmoe.train import Trainer, lr_multiplier, param_groups, unigram_comparison

# A model and data small enough for a few seconds per run on 2 shared cores.
SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64", "model.max_seq_len=32",
         "model.moe.num_experts=4", "model.moe.experts.d_ff=32", "train.batch_size=4", "train.seq_len=32",
         "train.data_limit_mb=0.2", "train.eval_batches=2", "train.log_every=1", "train.eval_every=4",
         "train.ckpt_every=5", "train.warmup_steps=3"]


def small_cfg(*extra: str):
    return load_config("tiny", SMALL + list(extra))


def quiet() -> Console:
    return Console(file=io.StringIO())


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file under run_dir -> its bytes (to check that a failed start changed nothing)."""
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A completed 10-step run with checkpoints step_5 and step_10 (copy it before changing it)."""
    run_dir = tmp_path_factory.mktemp("run") / "r"
    Trainer(small_cfg("train.steps=10"), run_dir, console=quiet()).fit()
    return run_dir


def copy_run(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- exact resume


class Crash(Exception):
    pass


def test_resume_reproduces_uninterrupted_run_bit_for_bit(tmp_path, monkeypatch):
    cfg = small_cfg("train.steps=12", "train.ckpt_every=5")
    Trainer(cfg, tmp_path / "full", console=quiet()).fit()
    full = read_metrics(tmp_path / "full")

    crashing = Trainer(cfg, tmp_path / "cut", console=quiet())
    real_step = crashing.train_step

    def step_then_crash():
        if crashing.step == 8:  # killed while training step 9; the last checkpoint is step 5
            raise Crash
        return real_step()

    monkeypatch.setattr(crashing, "train_step", step_then_crash)
    with pytest.raises(Crash):
        crashing.fit()
    crashing.metrics.close()
    assert [r["step"] for r in read_metrics(tmp_path / "cut")][-1] == 8
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path / "cut")] == [5]

    resumed = Trainer(cfg, tmp_path / "cut", resume=True, console=quiet())
    assert resumed.step == 5
    resumed.fit()
    cut = read_metrics(tmp_path / "cut")
    keys = ("step", "loss", "val_loss", "lr", "grad_norm", "aux_loss", "expert_load", "dropped")
    assert [[r.get(k) for k in keys] for r in cut] == [[r.get(k) for k in keys] for r in full]
    a, b = (checkpoint.list_checkpoints(tmp_path / d)[-1][1] for d in ("full", "cut"))
    assert (a / "__0_0.distcp").read_bytes() == (b / "__0_0.distcp").read_bytes()


def test_resume_with_more_steps_continues_from_the_last_checkpoint(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    cfg = small_cfg("train.steps=12")
    Trainer(cfg, run_dir, resume=True, console=quiet()).fit()
    metrics = read_metrics(run_dir)
    assert [r["step"] for r in metrics] == list(range(1, 13))
    # the resumed steps follow the 12-step schedule, not the saved 10-step one
    assert [r["lr"] for r in metrics[10:]] == [cfg.train.lr * lr_multiplier(cfg.train)(s) for s in (10, 11)]
    assert [s for s, _ in checkpoint.list_checkpoints(run_dir)] == [10, 12]


# ---------------------------------------------------------------- bad starts change nothing


def test_new_run_refuses_a_run_dir_that_holds_a_run(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    before = snapshot(run_dir)
    with pytest.raises(ConfigError, match="--resume"):
        Trainer(small_cfg("train.steps=10"), run_dir, console=quiet())
    assert snapshot(run_dir) == before


def test_resume_with_a_different_model_names_the_field(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    before = snapshot(run_dir)
    with pytest.raises(ConfigError) as e:
        Trainer(small_cfg("train.steps=10", "model.moe.experts.d_ff=48"), run_dir, resume=True, console=quiet())
    assert e.value.field_name == "model.moe.experts.d_ff" and "32" in str(e.value)
    assert snapshot(run_dir) == before


def test_resume_may_change_the_kernels_but_not_the_model(finished_run, tmp_path):
    """moe.kernels and moe.experts.gemm choose how the same math runs: a resumed run may change them."""
    run_dir = copy_run(finished_run, tmp_path)
    t = Trainer(small_cfg("train.steps=12", "model.moe.kernels=\"torch\"", "model.moe.experts.gemm=\"triton\""),
                run_dir, resume=True, console=quiet())
    assert t.step == 10


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "r").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="holds no checkpoint") as e:
        Trainer(small_cfg(), tmp_path / "r", resume=True, console=quiet())
    assert str(tmp_path / "r" / "ckpt") in str(e.value)
    assert list((tmp_path / "r").iterdir()) == []


def damage(ckpt_dir: Path, how: str) -> Path:
    """Damage one file of a checkpoint as a disk or a copy might; returns that file."""
    shard = ckpt_dir / "__0_0.distcp"
    if how == "overwrite_4k":  # 4 KiB of garbage in the middle of a shard: same size, DCP loads it
        data = bytearray(shard.read_bytes())
        n = min(4096, len(data))
        mid = (len(data) - n) // 2
        data[mid:mid + n] = (bytes(range(256)) * 16)[:n]
        shard.write_bytes(bytes(data))
        return shard
    if how == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
        return shard
    if how == "metadata":
        (ckpt_dir / ".metadata").write_bytes(b"not a pickle")
        return ckpt_dir / ".metadata"
    if how == "missing":
        shard.unlink()
        return shard
    assert how == "manifest"
    (ckpt_dir / checkpoint.MANIFEST).write_text("{not json")
    return ckpt_dir / checkpoint.MANIFEST


@pytest.mark.parametrize("how", ["overwrite_4k", "truncate", "metadata", "missing", "manifest"])
def test_resume_skips_a_damaged_checkpoint_with_a_warning_and_trains_on_exactly(finished_run, tmp_path, how):
    """A damaged newest checkpoint is named and skipped; the run resumes from the newest intact
    one, retrains the same steps bit for bit, and no good checkpoint is rotated out."""
    run_dir = copy_run(finished_run, tmp_path)
    bad = damage(run_dir / "ckpt" / "step_10", how)
    out = io.StringIO()
    resumed = Trainer(small_cfg("train.steps=10"), run_dir, resume=True, console=Console(file=out, width=400))
    assert resumed.step == 5
    warning = out.getvalue()
    assert "warning:" in warning and str(bad) in warning and "step_5" in warning
    resumed.fit()
    keys = ("step", "loss", "val_loss", "grad_norm")
    assert [[r.get(k) for k in keys] for r in read_metrics(run_dir)] == \
        [[r.get(k) for k in keys] for r in read_metrics(finished_run)]
    assert [s for s, _ in checkpoint.list_checkpoints(run_dir)] == [5, 10]
    for _, path in checkpoint.list_checkpoints(run_dir):
        assert checkpoint.verify(path) == []
    assert (run_dir / "ckpt" / "step_10.damaged").is_dir()  # set aside, not counted among the kept


def test_a_damaged_checkpoint_set_aside_does_not_rotate_out_a_good_one(finished_run, tmp_path):
    """Resumed from step 5 past a damaged step 10 and stopped at step 8: the kept two are 5 and 8."""
    run_dir = copy_run(finished_run, tmp_path)
    damage(run_dir / "ckpt" / "step_10", "overwrite_4k")
    Trainer(small_cfg("train.steps=8"), run_dir, resume=True, console=quiet()).fit()
    assert [s for s, _ in checkpoint.list_checkpoints(run_dir)] == [5, 8]


def test_resume_with_every_checkpoint_damaged_fails_cleanly_and_keeps_files(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    bad = [damage(run_dir / "ckpt" / "step_10", "overwrite_4k"), damage(run_dir / "ckpt" / "step_5", "truncate")]
    before = snapshot(run_dir)
    with pytest.raises(checkpoint.CheckpointError, match="no intact checkpoint") as e:
        Trainer(small_cfg("train.steps=10"), run_dir, resume=True, console=quiet())
    assert all(str(path) in str(e.value) for path in bad)
    assert snapshot(run_dir) == before


def test_load_refuses_a_damaged_checkpoint_naming_the_file(tmp_path):
    state = {"w": torch.arange(4096.0), "step": 3}
    path = checkpoint.save(tmp_path, 3, state)
    assert (path / checkpoint.MANIFEST).exists()
    shard = damage(path, "overwrite_4k")
    with pytest.raises(checkpoint.CheckpointError, match="does not match") as e:
        checkpoint.load(path, {"w": torch.zeros(4096), "step": -1})
    assert e.value.value == str(shard)


def test_checkpoint_without_manifest_loads_with_a_warning(tmp_path):
    """Written by an older fsmoe (no checksums.json): loaded, unverified, with a warning."""
    path = checkpoint.save(tmp_path, 1, {"w": torch.arange(4.0), "step": 1})
    (path / checkpoint.MANIFEST).unlink()
    loaded = {"w": torch.zeros(4), "step": -1}
    notes = checkpoint.load(path, loaded)
    assert loaded["step"] == 1 and len(notes) == 1 and "unverified" in notes[0]
    assert checkpoint.find_intact(tmp_path)[2] == notes


def test_resume_of_a_damaged_checkpoint_without_manifest_fails_cleanly(finished_run, tmp_path):
    """No checksums to catch it: DCP's own failure is still one clear error, files untouched."""
    run_dir = copy_run(finished_run, tmp_path)
    latest = run_dir / "ckpt" / "step_10"
    (latest / checkpoint.MANIFEST).unlink()
    damage(latest, "metadata")
    before = snapshot(run_dir)
    with pytest.raises(checkpoint.CheckpointError) as e:
        Trainer(small_cfg("train.steps=10"), run_dir, resume=True, console=quiet())
    assert str(latest) in str(e.value) and "step_5" in str(e.value)
    assert snapshot(run_dir) == before


def test_checkpoints_keep_last_two_and_ignore_unfinished(tmp_path):
    state = {"w": torch.arange(4.0), "step": 0}
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, {**state, "step": step})
    (tmp_path / "ckpt" / "step_9.tmp").mkdir()  # a crash mid-write leaves this behind
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [2, 3]
    step, path = checkpoint.latest_checkpoint(tmp_path)
    loaded = {"w": torch.zeros(4), "step": -1}
    checkpoint.load(path, loaded)
    assert step == 3 and loaded["step"] == 3 and torch.equal(loaded["w"], torch.arange(4.0))


# ---------------------------------------------------------------- optimizer pieces


def test_no_weight_decay_on_embeddings_norms_and_biases():
    model = build_model(small_cfg().model, seed=0)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"tok_emb.weight", "pos_emb.weight"} <= no_decay_names
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert not any(names[id(p)].endswith(("emb.weight", "bias")) for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_lr_warmup_then_cosine_to_min():
    cfg = small_cfg("train.steps=100", "train.warmup_steps=10", "train.min_lr_ratio=0.1").train
    f = lr_multiplier(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.55) and f(100) == pytest.approx(0.1)


# ---------------------------------------------------------------- the command, end to end


def _fsmoe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fsmoe.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_fsmoe_train_30_steps_loss_falls_and_writes_outputs(tmp_path):
    proc = _fsmoe("train", "--steps", "30", "--run-dir", "D", "--set", *SMALL, "train.lr=1e-2",
                  "train.eval_every=10", "train.ckpt_every=0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "D"
    records = read_metrics(run_dir)
    losses = [r["loss"] for r in records]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    for r in records:
        assert {"step", "loss", "lr", "tokens_per_s", "grad_norm", "aux_loss", "dropped", "expert_load",
                "imbalance"} <= r.keys()
        assert len(r["expert_load"]) == 2 and sum(r["expert_load"][0]) == pytest.approx(1.0)
    assert [r["step"] for r in records if "val_loss" in r] == [10, 20, 30]
    for name in ("loss.png", "expert_load.png", "config.json"):
        assert (run_dir / name).stat().st_size > 0
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert [s for s, _ in checkpoint.list_checkpoints(run_dir)] == [30]
    assert json.loads((run_dir / "config.json").read_text())["model"]["d_model"] == 32
    assert "final val loss" in proc.stdout and "for byte frequencies alone" in proc.stdout


def test_python_m_fsmoe_cli_train_runs_the_real_tiny_default(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fsmoe.cli", "train", "--steps", "2", "--run-dir", "D"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = read_metrics(tmp_path / "D")
    assert records[-1]["step"] == 2 and "val_loss" in records[-1]
    assert len(records[-1]["expert_load"]) == 4 and len(records[-1]["expert_load"][0]) == 8
    assert (tmp_path / "D" / "loss.png").exists() and (tmp_path / "D" / "expert_load.png").exists()
    assert "final val loss" in proc.stdout and "nats" in proc.stdout


def test_final_line_compares_with_byte_frequencies_on_the_val_split():
    """A val loss below the train split's own entropy but above what its byte frequencies score
    on the val split is reported as ABOVE (the model does not use context yet)."""
    assert "0.01 nats below, so the model uses context" in unigram_comparison(3.150, 3.160)
    line = unigram_comparison(3.200, 3.160)
    assert "0.04 nats ABOVE" in line and "does not yet use context" in line and "scored on the val split" in line


# ---------------------------------------------------------------- train.cuda_graph (GPU runs: test_train_gpu.py)
@pytest.mark.parametrize("extra,why", [
    (["train.cuda_graph=true", "parallel.dp=2", "model.moe.kernels=\"torch\""], "one process"),
    (["train.cuda_graph=true", "train.trace=true"], "train.trace"),
    (["train.cuda_graph=true", "train.compile=true"], "train.compile"),
    (["train.cuda_graph=true", "train.activation_checkpointing=\"moe\""], "activation_checkpointing"),
    (["train.cuda_graph=true", "train.device=\"cpu\""], "CUDA device"),
    (["train.cuda_graph=true", "model.moe.router.name=\"deepseek\""], "deepseek"),
    (["train.cuda_graph=true", "model.moe.experts.gemm=\"cublas\""], "cublas"),
    (["train.cuda_graph=\"yes\""], "bool"),
])
def test_cuda_graph_refuses_what_a_captured_step_cannot_hold(extra, why):
    with pytest.raises(ConfigError, match="train.cuda_graph") as e:
        small_cfg(*extra)
    assert why in str(e.value)


def test_cuda_graph_without_a_gpu_is_a_clear_error_before_anything_is_written(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="train.cuda_graph.*CUDA device"):
        Trainer(small_cfg("train.cuda_graph=true"), tmp_path / "r", console=quiet())
    assert not (tmp_path / "r").exists()


def test_guard_updates_its_tensors_in_place():
    """A captured step reads and writes the guard's tensors by address: they must never be replaced."""
    from fsmoe.guard import NonFiniteGuard

    g = NonFiniteGuard("skip", torch.device("cpu"))
    count, first = g.count, g.first
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    g.apply(opt, torch.tensor(False), torch.tensor(7))
    g.apply(opt, torch.tensor(False), 8)
    assert g.count is count and g.first is first and int(count) == 2 and int(first) == 7
