"""The training step's machinery on CPU: results read only when logged, tokens/s windows, the
non-finite guard, activation checkpointing (same numbers as none), MFU's FLOP count, options."""
import io

import pytest
import torch
from rich.console import Console

from fsmoe import checkpoint
from fsmoe.cli import main
from fsmoe.config import ConfigError, load_config
from fsmoe.guard import NonFiniteError, NonFiniteGuard
from fsmoe.metrics import read_metrics
from fsmoe.models import build_model
from fsmoe.models.flops import flops_per_token
from fsmoe.train import StepResult, Trainer

SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64", "model.max_seq_len=32",
         "model.moe.num_experts=4", "model.moe.experts.d_ff=32", "train.batch_size=4", "train.seq_len=32",
         "train.data_limit_mb=0.2", "train.eval_batches=1", "train.log_every=5", "train.eval_every=10",
         "train.ckpt_every=0", "train.warmup_steps=2"]


def make(tmp_path, *extra, name="r") -> Trainer:
    return Trainer(load_config("tiny", SMALL + list(extra)), tmp_path / name, console=Console(file=io.StringIO()))


def test_step_results_are_read_only_at_logged_and_checkpoint_steps(tmp_path, monkeypatch):
    reads = []
    real = StepResult.read
    monkeypatch.setattr(StepResult, "read", lambda self: reads.append(1) or real(self))
    t = make(tmp_path, "train.steps=12", "train.ckpt_every=3")
    t.fit()
    # logged: 5, 10, 12 (last); checkpoints: 3, 6, 9, 12 -> steps 3, 5, 6, 9, 10, 12
    assert len(reads) == 6
    assert [r["step"] for r in read_metrics(tmp_path / "r")] == [5, 10, 12]


def test_tokens_per_s_leaves_out_checkpoint_time(tmp_path, monkeypatch):
    """A checkpoint at step 3 (not a logged step) takes 100 s of a fake clock that moves 1 s per
    step: the rate logged at step 5 covers steps 4-5 only."""
    import fsmoe.train as train_mod

    clock = [0.0]
    monkeypatch.setattr(train_mod.time, "perf_counter", lambda: clock[0])
    t = make(tmp_path, "train.steps=5", "train.ckpt_every=3")
    real_step, real_save = t.train_step, t.save_checkpoint

    def step():
        clock[0] += 1.0
        return real_step()

    def save():
        clock[0] += 100.0
        return real_save()

    t.train_step, t.save_checkpoint = step, save
    t.fit()
    rec = read_metrics(tmp_path / "r")[-1]
    assert rec["step"] == 5 and rec["tokens_per_s"] == pytest.approx(2 * 4 * 32 / 2.0)


def nan_at(trainer: Trainer, steps: set[int]) -> None:
    """Make the loss NaN on the given (1-based) steps."""
    real = trainer.loss
    trainer.loss = lambda out, y: real(out, y) * (float("nan") if trainer.step + 1 in steps else 1.0)


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    t = make(tmp_path, "train.steps=20", "train.ckpt_every=4", "train.log_every=4")
    nan_at(t, {7})
    with pytest.raises(NonFiniteError, match="at step 7"):
        t.fit()
    t.metrics.close()
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path / "r")] == [4]
    assert all(torch.isfinite(p).all() for p in t.model.parameters())  # the NaN step was never applied


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    t = make(tmp_path, "train.steps=10", "train.on_nonfinite=\"skip\"", "train.ckpt_every=5")
    nan_at(t, {3, 4})
    t.fit()
    recs = read_metrics(tmp_path / "r")
    assert [r["skipped_steps"] for r in recs] == [2, 2]
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path / "r")] == [5, 10]
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_checkpoint_with_nonfinite_weights_is_refused(tmp_path):
    t = make(tmp_path, "train.steps=4")
    t.train_step()
    with torch.no_grad():
        next(t.model.parameters())[0] = float("inf")
    with pytest.raises(NonFiniteError, match="parameter"):
        t.save_checkpoint()
    assert checkpoint.list_checkpoints(tmp_path / "r") == []
    t.metrics.close()


def test_fused_adamw_skips_a_nonfinite_step_in_place():
    """The CUDA mechanism (fused AdamW's found_inf), exercised on CPU's fused kernel."""
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    guard = NonFiniteGuard("skip", torch.device("cpu"))
    p.grad = torch.ones(4)
    guard.apply(opt, torch.tensor(True), 1)
    after_one = p.detach().clone()
    p.grad = torch.full((4,), float("nan"))
    guard.apply(opt, torch.tensor(False), 2)
    assert torch.equal(p.detach(), after_one) and int(opt.state[p]["step"]) == 1
    assert int(guard.count) == 1 and int(guard.first) == 2


def test_huge_lr_ends_with_one_clear_error(tmp_path, capsys):
    code = main(["train", "--run-dir", str(tmp_path / "r"), "--steps", "30", "--set", *SMALL, "train.lr=50",
                 "train.warmup_steps=1", "train.log_every=2", "train.ckpt_every=10"])
    err = capsys.readouterr().err
    assert code == 2 and "NaN/Inf" in err and "train.on_nonfinite=skip" in err and "Traceback" not in err
    for _, path in checkpoint.list_checkpoints(tmp_path / "r"):  # whatever was saved is finite
        assert path.exists()


@pytest.mark.parametrize("router", ["gshard", "deepseek"])
def test_activation_checkpointing_gives_the_same_numbers(tmp_path, router):
    """none / moe / full: same losses, gradients and (DeepSeek) bias updates over 3 steps (fp32 CPU)."""
    extra = [f"model.moe.router.name=\"{router}\"", "model.arch=\"llama\"", "model.dropout=0.1"]
    if router == "gshard":
        extra.append("model.moe.router.noise_std=0.5")  # replayed RNG: same noise in the recomputation
    runs = {}
    for mode in ("none", "moe", "full"):
        t = make(tmp_path, "train.steps=3", f"train.activation_checkpointing=\"{mode}\"", *extra, name=mode)
        losses = [t.train_step().read().loss for _ in range(3)]
        state = {k: v.clone() for k, v in t.model.state_dict().items()}
        runs[mode] = (losses, state)
        t.metrics.close()
    for mode in ("moe", "full"):
        assert runs[mode][0] == pytest.approx(runs["none"][0], rel=1e-6, abs=1e-6)
        for k, v in runs["none"][1].items():
            torch.testing.assert_close(runs[mode][1][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_flops_per_token_is_palms_count():
    """mixtral-8x7b cut to 2 layers at L=4096: the figure the training benchmark has always used."""
    cfg = load_config("mixtral-8x7b", ["model.n_layers=2"]).model
    with torch.device("meta"):
        model = build_model(cfg, seed=0)
    assert flops_per_token(cfg, model.num_parameters(active_only=True), 4096) == 5920776192.0


@pytest.mark.parametrize("override, field", [
    ("train.compile=true", "train.compile"),
    ("train.activation_checkpointing=\"some\"", "train.activation_checkpointing"),
    ("train.on_nonfinite=\"ignore\"", "train.on_nonfinite"),
])
def test_bad_training_options_name_the_field(tmp_path, override, field):
    with pytest.raises(ConfigError, match=field):
        make(tmp_path, override)
    assert not (tmp_path / "r").exists()


def test_activation_checkpointing_none_is_a_word_and_pipelines_refuse_recompute():
    assert load_config("tiny", ["train.activation_checkpointing=none"]).train.activation_checkpointing == "none"
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        load_config("tiny", ["train.activation_checkpointing=moe", "parallel.schedule=fsmoe"])


def test_clipping_inside_the_fused_optimizer_equals_clipping_in_place():
    """CUDA passes the clip factor to fused AdamW (grad_scale); CPU scales the gradients first."""
    torch.manual_seed(0)
    w0, g = torch.randn(6), torch.randn(6) * 10
    coef = torch.clamp(1.0 / (g.norm() + 1e-6), max=1.0)
    out = []
    for fused in (True, False):
        p = torch.nn.Parameter(w0.clone())
        opt = torch.optim.AdamW([p], lr=0.1, eps=1.0, fused=fused)  # eps ~ |grad|: the update sees the scale
        p.grad = g.clone()
        NonFiniteGuard("stop", torch.device("cpu")).apply(opt, torch.tensor(True), 1, grad_coef=coef)
        out.append(p.detach().clone())
    torch.testing.assert_close(out[0], out[1], rtol=1e-6, atol=1e-7)
    assert not torch.equal(out[0], w0)
