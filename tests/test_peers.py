"""``model.moe.impl = "deepspeed"``: DeepSpeed-MoE's layer as a peer in our decoder
(fsmoe/models/peers/deepspeed_moe.py).

Without deepspeed (CI): the option is refused cleanly, naming the field (exit 2 from the command,
ConfigError in the API), and the combinations the adapter cannot run are refused before anything
starts. With deepspeed importable: 2 gloo ranks (EP2) train a few steps with DeepSpeed's layer,
starting from our layer's weights, so step 1 equals our layer's loss.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from fsmoe.config import ConfigError, load_config

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64", "model.max_seq_len=16",
         "model.moe.num_experts=4", "model.moe.experts.d_ff=16", "train.batch_size=4", "train.seq_len=16"]


@pytest.fixture
def deepspeed_missing(monkeypatch):
    """deepspeed neither findable nor importable, whether or not it is installed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    for mod in [m for m in sys.modules if m == "deepspeed" or m.startswith("deepspeed.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` raises ImportError


@pytest.fixture
def deepspeed_present(monkeypatch):
    """The config's check for the package passes (the layout checks are what is tested)."""
    real = importlib.util.find_spec
    spec = importlib.machinery.ModuleSpec("deepspeed", None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "deepspeed" else real(name, *a))


def test_impl_is_one_of_the_known_values():
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [*SMALL, "model.moe.impl=megablocks"])
    assert e.value.field_name == "model.moe.impl"
    assert load_config("tiny", SMALL).model.moe.impl == "fsmoe"


def test_deepspeed_missing_is_a_config_error_naming_the_field(deepspeed_missing):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [*SMALL, "model.moe.impl=deepspeed", "parallel.dp=2", "parallel.ep=2"])
    assert e.value.field_name == "model.moe.impl" and "deepspeed" in str(e.value)


def test_the_adapter_names_the_field_when_deepspeed_does_not_import(deepspeed_missing):
    from fsmoe.models.peers.deepspeed_moe import import_deepspeed

    with pytest.raises(ConfigError) as e:
        import_deepspeed()
    assert e.value.field_name == "model.moe.impl" and "DS_BUILD_OPS=0" in str(e.value)


@pytest.mark.skipif(HAS_DEEPSPEED, reason="deepspeed is installed here: the command would accept the option")
def test_fsmoe_train_exits_2_naming_the_field_without_deepspeed(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fsmoe.cli", "train", "--nproc", "2", "--ep", "2", "--set",
                           *SMALL, "model.moe.impl=deepspeed", "--run-dir", "D"],
                          check=False, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    out = proc.stdout + proc.stderr
    assert "model.moe.impl" in out and "Traceback" not in out
    assert not (tmp_path / "D").exists()


@pytest.mark.parametrize("override, field", [
    ("parallel.schedule=fsmoe", "parallel.schedule"),
    ("parallel.placement=flexmoe", "parallel.placement"),
    ("model.moe.router.name=sigmoid", "model.moe.router.name"),
    ("model.moe.router.z_loss_coef=0.001", "model.moe.router.z_loss_coef"),
    ("model.moe.experts.num_shared=1", "model.moe.experts.num_shared"),
    ("train.activation_checkpointing=moe", "train.activation_checkpointing"),
])
def test_what_the_deepspeed_layer_cannot_run_is_refused_naming_the_field(deepspeed_present, override, field):
    base = [*SMALL, "model.moe.impl=deepspeed", "parallel.dp=2", "parallel.ep=2"]
    load_config("tiny", base)  # the plain EP layout is accepted
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [*base, override])
    assert e.value.field_name == field and "model.moe.impl" in str(e.value)


def test_mp_and_esp_are_refused(deepspeed_present):
    for layout, field in ((["parallel.dp=1", "parallel.mp=2", "parallel.ep=2"], "parallel.mp"),
                          (["parallel.dp=2", "parallel.esp=2"], "parallel.esp")):
        with pytest.raises(ConfigError) as e:
            load_config("tiny", [*SMALL, "model.moe.impl=deepspeed", *layout])
        assert e.value.field_name == field


def test_the_one_process_trainer_refuses_the_peer(deepspeed_present, tmp_path):
    from fsmoe.train import Trainer

    data = tmp_path / "data.txt"
    data.write_text("def f(x):\n    return x + 1\n" * 200)
    cfg = load_config("tiny", [*SMALL, "model.moe.impl=deepspeed", "train.eval_batches=1"])
    cfg.train.data = [str(data)]
    with pytest.raises(ConfigError) as e:
        Trainer(cfg, tmp_path / "run")
    assert e.value.field_name == "model.moe.impl" and "--nproc" in str(e.value)
    assert not (tmp_path / "run").exists()


def _train(tmp_path, impl: str) -> list[dict]:
    run_dir = tmp_path / impl
    proc = subprocess.run([sys.executable, "-m", "fsmoe.cli", "train", "--nproc", "2", "--ep", "2", "--steps", "3",
                           "--seed", "0", "--run-dir", str(run_dir), "--set", *SMALL, "train.log_every=1",
                           "train.eval_every=1000", "train.ckpt_every=1000", "train.eval_batches=1",
                           "train.data_limit_mb=0.2", f"model.moe.impl={impl}"],
                          check=False, capture_output=True, text=True, cwd=tmp_path, timeout=570)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (CI): the peer itself is checked on GPUs")
def test_deepspeed_layer_trains_on_two_gloo_ranks_from_our_weights(tmp_path):
    """EP2 on gloo: DeepSpeed's gate, dispatch and AlltoAll around our experts, our gradient sync.
    Step 1 runs the same weights and the same top-2 routing (dropless), so its loss and its
    per-expert loads equal our layer's; the aux losses differ by definition (DeepSpeed's l_aux
    counts first choices over this rank's tokens), so later steps drift apart slightly."""
    ds, ours = _train(tmp_path, "deepspeed"), _train(tmp_path, "fsmoe")
    assert [r["step"] for r in ds] == [1, 2, 3]
    assert ds[0]["loss"] == pytest.approx(ours[0]["loss"], abs=1e-5)
    assert ds[0]["expert_load"] == ours[0]["expert_load"] and ds[0]["dropped"] == 0
    assert ds[0]["grad_norm"] == pytest.approx(ours[0]["grad_norm"], rel=1e-2)
    assert all(r["tokens_per_s"] > 0 for r in ds)
    assert ds[-1]["loss"] == pytest.approx(ours[-1]["loss"], abs=1e-2)
