"""The `fsmoe` command: help, the subcommand registry, and clean exit-2 errors for bad input."""
import argparse
import json
import os
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


def test_python_m_fsmoe_cli_has_the_same_arguments():
    proc = subprocess.run([sys.executable, "-m", "fsmoe.cli", "train", "--help"], capture_output=True, text=True,
                          timeout=120)
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


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written


@pytest.mark.parametrize("args, field", [
    (["--set", "train.beta1=1.5"], "train.beta1"),
    (["--set", "train.beta2=1.0"], "train.beta2"),
    (["--set", "train.eps=0"], "train.eps"),
    (["--set", "train.weight_decay=-1"], "train.weight_decay"),
    (["--set", "train.warmup_steps=-5"], "train.warmup_steps"),
    (["--set", "train.lr=inf"], "train.lr"),
    (["--set", "train.lr=nan"], "train.lr"),
    (["--set", "train.seed=-1"], "train.seed"),
    (["--set", "parallel.timeout_s=1e300"], "parallel.timeout_s"),
    (["--set", "name=../elsewhere"], "name"),
    (["--set", "train.data=[]"], "train.data"),
    (["--set", "parallel.dp=2"], "parallel.dp*mp"),  # a layout for 2 processes in one
    (["--nproc", "0"], "--nproc"),
    (["--nproc", "-2"], "--nproc"),
    (["--nproc", "3", "--ep", "2"], "parallel.ep*esp"),
    (["--nproc", "3", "--set", "train.batch_size=8"], "train.batch_size"),
    (["--nproc", "2", "--mp", "3"], "parallel.mp"),
    (["--nproc", "2", "--data", "/nonexistent"], "train.data"),
    (["--nproc", "2", "--resume"], "--resume"),
    (["--nproc", "2", "--esp", "2", "--set", "model.moe.experts.d_ff=15"], "parallel.esp"),
])
def test_out_of_range_values_and_layouts_exit_2_before_anything_starts(tmp_path, capsys, args, field):
    """Checked in the launching process: with --nproc no worker is started."""
    code = cli.main(["train", "--run-dir", str(tmp_path / "D"), *args])
    err = capsys.readouterr().err
    assert code == 2 and f"{field}=" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "D").exists()


def test_nproc_bad_layout_is_one_line_without_traceback(tmp_path):
    proc = fsmoe("train", "--nproc", "3", "--ep", "2", "--run-dir", "D", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "parallel.ep*esp" in proc.stderr


def test_vocab_smaller_than_the_data_fails_first_and_leaves_no_run_dir(tmp_path, capsys):
    text = tmp_path / "utf8.txt"
    text.write_text("naïve café, Grüße — ünïcödé text\n" * 100, encoding="utf-8")
    run = ["train", "--data", str(text), "--steps", "1", "--run-dir", str(tmp_path / "D"), *TINY_RUN]
    assert cli.main([*run, "model.vocab_size=128"]) == 2
    assert "model.vocab_size=128" in capsys.readouterr().err and not (tmp_path / "D").exists()
    assert cli.main(run) == 0  # the same run dir is free for the corrected run


def test_data_takes_paths_with_any_character_and_refuses_a_named_binary(tmp_path, capsys):
    odd, plain, binary = tmp_path / "notes:v2.txt", tmp_path / "b=1,c.txt", tmp_path / "blob.dat"
    odd.write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    plain.write_text("pack my box with five dozen liquor jugs\n" * 40)
    binary.write_bytes(b"header" + b"\0" * 64 + b"text" * 100)
    run = ["train", "--steps", "1", *TINY_RUN]
    assert cli.main([*run, "--run-dir", str(tmp_path / "D"), "--data", str(odd), str(plain)]) == 0
    assert "2 files" in capsys.readouterr().out
    assert json.loads((tmp_path / "D" / "config.json").read_text())["train"]["data"] == [str(odd), str(plain)]
    assert cli.main([*run, "--run-dir", str(tmp_path / "E"), "--data", str(plain), str(binary)]) == 2
    err = capsys.readouterr().err
    assert "binary" in err and str(binary) in err and not (tmp_path / "E").exists()


def test_resume_takes_the_layout_of_this_launch_and_an_old_data_string(tmp_path, capsys):
    """A run saved under EP4 resumed in one process records dp = ep = 1; an older config.json
    with train.data as one os.pathsep-joined string still resumes."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    b.write_text("pack my box with five dozen liquor jugs\n" * 40)
    run = ["train", "--run-dir", str(tmp_path / "D")]
    assert cli.main([*run, "--steps", "2", "--data", str(a), str(b), *TINY_RUN]) == 0
    config = tmp_path / "D" / "config.json"
    saved = json.loads(config.read_text())
    saved["parallel"].update(dp=4, ep=4)  # as `--nproc 4 --ep 4` saves it
    saved["train"]["data"] = os.pathsep.join(saved["train"]["data"])  # as an older fsmoe saved it
    config.write_text(json.dumps(saved))
    assert cli.main([*run, "--resume", "--nproc", "1", "--steps", "3"]) == 0, capsys.readouterr().err
    resumed = json.loads(config.read_text())
    assert (resumed["parallel"]["dp"], resumed["parallel"]["ep"]) == (1, 1)
    assert resumed["train"]["data"] == [str(a), str(b)]
    assert [r["step"] for r in read_metrics(tmp_path / "D")] == [1, 2, 3]


def test_a_workers_error_is_left_for_the_launcher_which_prints_the_first_once(tmp_path, monkeypatch, capsys):
    """Under `--nproc` the failing rank writes its error to FSMOE_ERROR_DIR instead of stderr:
    bad input as the one-line message, anything else with its traceback."""
    from fsmoe.config import ConfigError
    from fsmoe.parallel import launch

    monkeypatch.setenv(launch.ERROR_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(launch.Watchdog, "current", None)
    monkeypatch.setenv("RANK", "1")
    launch.report_failure(ConfigError("train.data", "x", "path does not exist"))
    monkeypatch.setenv("RANK", "3")
    try:
        raise RuntimeError("boom")
    except RuntimeError as e:
        launch.report_failure(e)
    assert capsys.readouterr().err == ""
    first = launch.first_worker_error(str(tmp_path))  # same second: the lower rank
    assert first["bad_input"] and first["rank"] == 1 and first["text"] == "error: train.data='x' is invalid: " \
        "path does not exist"
    other = json.loads((tmp_path / "rank3.json").read_text())
    assert not other["bad_input"] and "Traceback" in other["text"] and "RuntimeError: boom" in other["text"]
    launch._print_worker_error(first)
    assert capsys.readouterr().err.strip() == first["text"]


def test_a_rank_that_only_lost_a_peer_after_the_store_went_away_stays_quiet(tmp_path, monkeypatch, capsys):
    """When the store's host has exited (it stops on a peer's failure), a rank whose collective
    then fails because that peer went away reports nothing of its own: the first failure was
    reported by its rank. An error of its own is still reported."""
    from fsmoe.parallel import launch

    class GoneStore:
        def add(self, *a):
            raise RuntimeError("store unreachable")

    monkeypatch.delenv(launch.ERROR_DIR_ENV, raising=False)
    monkeypatch.setattr(launch.Watchdog, "current", launch.Watchdog(GoneStore(), 3))
    monkeypatch.setenv("RANK", "3")
    launch.report_failure(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:51386."))
    assert capsys.readouterr().err == ""
    launch.report_failure(ValueError("a bad batch"))
    assert "[fsmoe rank 3] failed" in capsys.readouterr().err


def test_a_worker_killed_without_a_report_is_named_by_rank_and_signal():
    from fsmoe.parallel import launch

    assert launch._exit_status(-6) == "was killed by SIGABRT" and launch._exit_status(3) == "exited with code 3"


def test_torchrun_error_file_is_never_seen_half_written_and_a_failing_agent_still_prints_the_report(
        tmp_path, monkeypatch, capsys):
    """The error file for torchrun's summary is replaced whole (a rank's watchdog may end the
    process while its main thread writes it); if the agent itself fails while summarising, the
    worker's own report is still what the launcher prints, with its exit code."""
    import torch.distributed.run as torchrun
    from fsmoe.parallel import launch

    path = tmp_path / "error.json"
    path.write_text("")  # a truncated file from an earlier writer
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    launch.write_error_file("stopped", 7)
    assert json.loads(path.read_text())["message"]["message"] == "stopped"
    assert [p.name for p in tmp_path.iterdir()] == ["error.json"]

    def agent_fails(_args):
        folder = os.environ[launch.ERROR_DIR_ENV]
        with open(os.path.join(folder, "rank1.json"), "w") as f:
            json.dump({"rank": 1, "time": 0, "bad_input": True, "text": "error: parallel.profile='x' ..."}, f)
        json.loads("")  # what torchrun raised on a truncated error file

    monkeypatch.setattr(torchrun, "run", agent_fails)
    assert launch.spawn_torchrun(2, ["train"]) == 2
    assert capsys.readouterr().err.strip() == "error: parallel.profile='x' ..."
