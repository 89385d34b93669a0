"""The `fsmoe` command: help, the subcommand registry, and clean exit-2 errors for bad input."""
import argparse
import importlib
import subprocess
import sys

import pytest

from fsmoe import cli
from fsmoe.metrics import read_metrics

TINY_RUN = ["--set", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64",
            "model.max_seq_len=16", "model.moe.num_experts=4", "model.moe.experts.d_ff=16", "train.batch_size=2",
            "train.seq_len=16", "train.eval_batches=1", "train.log_every=1", "train.data_limit_mb=0.05"]


def fsmoe(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fsmoe.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_help_lists_train_and_its_options():
    top = fsmoe("--help")
    assert top.returncode == 0 and "train" in top.stdout
    train = fsmoe("train", "--help")
    for flag in ("--config", "--set", "--steps", "--seed", "--run-dir", "--data", "--resume", "--device"):
        assert flag in train.stdout


def test_python_m_fsmoe_train_has_the_same_arguments():
    proc = subprocess.run([sys.executable, "-m", "fsmoe.train", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--resume" in proc.stdout and "--run-dir" in proc.stdout


def test_bad_set_exits_2_with_one_line_naming_the_field(tmp_path):
    proc = fsmoe("train", "--set", "model.moe.num_experts=0", "--run-dir", "D", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.moe.num_experts" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "D").exists()


def _leaf_parsers(parser, path=()):
    """(path, parser) of every runnable (sub)command below ``parser``."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from _leaf_parsers(sub, (*path, name))


def test_every_registered_command_sets_func():
    parser = cli.build_parser()
    leaves = dict(_leaf_parsers(parser))
    assert ("train",) in leaves
    for path, sub in leaves.items():
        assert callable(sub.get_default("func")), " ".join(path)
    for module in cli.COMMANDS:
        assert callable(importlib.import_module(module).add_parser)


@pytest.mark.parametrize("args, field", [
    (["--set", "model.moe.nm_experts=4"], "model.moe.nm_experts"),
    (["--set", "train.lr"], "--set"),
    (["--config", "no-such-preset"], "preset"),
    (["--config", "missing.toml"], "config"),
    (["--set", "model.moe.router.top_k=9"], "model.moe.router.top_k"),
    (["--data", "no/such/dir"], "train.data"),
])
def test_bad_input_exits_2_naming_the_field(tmp_path, capsys, args, field):
    code = cli.main(["train", "--run-dir", str(tmp_path / "D"), *args])
    err = capsys.readouterr().err
    assert code == 2 and field in err and "invalid" in err
    assert not (tmp_path / "D").exists()


def test_train_on_user_data_directory(tmp_path, capsys):
    text = tmp_path / "texts"
    (text / "sub").mkdir(parents=True)
    (text / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    (text / "sub" / "b.txt").write_text("pack my box with five dozen liquor jugs\n" * 40)
    code = cli.main(["train", "--data", str(text), "--steps", "3", "--run-dir", str(tmp_path / "D"), *TINY_RUN])
    out = capsys.readouterr().out
    assert code == 0 and "2 files" in out and str(text) in out
    assert [r["step"] for r in read_metrics(tmp_path / "D")] == [1, 2, 3]


def test_resume_uses_the_saved_config_and_refuses_a_new_model(tmp_path, capsys):
    run = ["train", "--run-dir", str(tmp_path / "D")]
    assert cli.main([*run, "--steps", "2", *TINY_RUN]) == 0
    assert cli.main([*run, "--resume", "--steps", "4"]) == 0  # no --config: the run's config.json
    assert [r["step"] for r in read_metrics(tmp_path / "D")] == [1, 2, 3, 4]
    capsys.readouterr()
    assert cli.main([*run, "--resume", "--set", "model.moe.num_experts=8"]) == 2
    assert "model.moe.num_experts" in capsys.readouterr().err
