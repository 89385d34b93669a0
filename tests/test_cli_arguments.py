"""Bad command-line values are one-line errors naming the option (exit 2), refused before any
work: output files that are folders or unwritable image types, counts below 1, non-finite or
negative numbers, layer flags the layer refuses, unreadable result and trace files."""
from __future__ import annotations

import argparse
import json

import pytest

from fsmoe import cli
from fsmoe.cli.arg_types import non_negative_float, output_file, plot_file, positive_float, positive_int


def _exit_code(args: list[str]) -> int:
    try:
        return cli.main(args)
    except SystemExit as e:  # argparse's own refusals
        return e.code


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    return err.splitlines()[-1]


def test_argument_types(tmp_path):
    assert output_file(str(tmp_path / "new" / "r.json")) == str(tmp_path / "new" / "r.json")
    assert plot_file(str(tmp_path / "p.svg")) and plot_file(str(tmp_path / "p"))
    assert positive_int("3") == 3 and positive_float("0.5") == 0.5 and non_negative_float("0") == 0.0
    for fn, bad in ((output_file, str(tmp_path)), (plot_file, str(tmp_path / "p.xyz")), (positive_int, "0"),
                    (positive_int, "2.5"), (positive_float, "0"), (positive_float, "inf"),
                    (non_negative_float, "-1"), (non_negative_float, "nan"), (non_negative_float, "x")):
        with pytest.raises(argparse.ArgumentTypeError):
            fn(bad)


@pytest.mark.parametrize("args, option", [
    (["simulate", "fabric", "--gpus", "64", "--ep", "8", "--mb", "1", "--json", "{tmp}"], "--json"),
    (["simulate", "fabric", "--gpus", "0", "--ep", "8", "--mb", "1"], "--gpus"),
    (["simulate", "fabric", "--gpus", "64", "--ep", "8", "--mb", "1", "--share-tol", "-1"], "--share-tol"),
    (["simulate", "cluster", "--gemm-scale", "0"], "--gemm-scale"),
    (["simulate", "cluster", "--gpus-per-server", "0"], "--gpus-per-server"),
    (["simulate", "cluster", "--ep", "0"], "--ep"),
    (["simulate", "cluster", "--microbatches", "0"], "--microbatches"),
    (["simulate", "cluster", "--batch", "0"], "--batch"),
    (["profile", "--nproc", "0", "--quick", "--device", "cpu"], "--nproc"),
    (["simulate", "compare", "{tmp}/garbage.json"], "garbage.json"),
    (["plan", "--memory", "--config", "tiny", "--gpus", "2", "--json", "{tmp}"], "--json"),
    (["trace", "summary", "{tmp}/t.jsonl.gz", "--plot", "{tmp}/p.xyz"], "--plot"),
    (["bench", "placement", "--trace", "{tmp}/garbage.json"], "--trace"),
    (["bench", "layer", "--device", "bogus"], "--device"),
    (["profile", "--timeout", "-1", "--quick", "--device", "cpu"], "--timeout"),
    (["bench", "schedule", "--configs", "0"], "--configs"),
    (["bench", "schedule", "--iters", "0"], "--iters"),
    (["bench", "schedule", "--layers", "0"], "--layers"),
    (["bench", "schedule", "--first-config", "-1"], "--first-config"),
    (["bench", "schedule", "--json", "{tmp}"], "--json"),
    (["bench", "dispatch", "--tokens", "-1"], "--tokens"),
    (["bench", "dispatch", "--groups", "0"], "--groups"),
    (["bench", "dispatch", "--warmup", "-1"], "--warmup"),
    (["bench", "dispatch", "--experts", "8", "--top-k", "9"], "--top-k"),
    (["bench", "dispatch", "--experts", "3", "--ep", "2", "--nproc", "2"], "--experts"),
    (["bench", "dispatch", "--png", "{tmp}/p.xyz"], "--png"),
    (["bench", "train", "--json", "{tmp}"], "--json"),
    (["bench", "train", "--iters", "0"], "--iters"),
    (["bench", "placement", "--interval", "0"], "--interval"),
])
def test_bad_values_are_named(args, option, tmp_path, capsys):
    (tmp_path / "garbage.json").write_text("garbage\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert _exit_code(args) == 2
    assert option in _one_line_error(capsys)


def test_plan_layer_flags_are_named(tmp_path, capsys):
    """The layer flags the schedule planner takes, refused by name (not LayerSpec's ValueError)."""
    from tests.test_sim_step import PROFILE

    profile = tmp_path / "profile.json"
    PROFILE.save(profile)
    for flags, option in ((["--experts", "0"], "--experts"), (["--capacity", "-1"], "--capacity"),
                          (["--heads", "7"], "--heads"), (["--top-k", "99"], "--top-k"), (["--ep", "0"], "--ep")):
        assert _exit_code(["plan", "--profile", str(profile), *flags]) == 2
        assert _one_line_error(capsys).startswith(f"error: {option}=")
    assert json.loads(profile.read_text())  # the profile itself is fine: the flags were the problem


def test_cuda_and_nccl_asked_for_where_they_are_not(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert _exit_code(["bench", "train", "--device", "cuda"]) == 2
    assert "--device" in _one_line_error(capsys)
    assert _exit_code(["train", "--config", "tiny", "--device", "cpu", "--nproc", "2", "--steps", "1",
                       "--run-dir", str(tmp_path / "run"), "--set", 'parallel.backend="nccl"']) == 2
    assert "parallel.backend" in _one_line_error(capsys)
