"""train.cpu_threads: how many torch threads a training process on the CPU computes with."""
from __future__ import annotations

import pytest
import torch

from fsmoe import cpu_threads
from fsmoe.config import ConfigError, load_config


@pytest.mark.parametrize("cpus, want", [(1, 1), (2, 2), (4, 4), (6, 4), (8, 4), (16, 8), (64, 32)])
def test_automatic_threads_are_half_the_logical_cpus_from_eight_on(cpus, want):
    n, why = cpu_threads.resolve(0, cpus=cpus, environ={})
    assert n == want and ("half" in why) == (n != cpus)


def test_the_setting_then_omp_num_threads_decide():
    assert cpu_threads.resolve(3, cpus=16, environ={"OMP_NUM_THREADS": "5"}) == (3, "train.cpu_threads")
    assert cpu_threads.resolve(0, cpus=16, environ={"OMP_NUM_THREADS": "5"}) == (5, "OMP_NUM_THREADS")
    assert cpu_threads.resolve(0, cpus=16, environ={"OMP_NUM_THREADS": "lots"})[0] == 8  # not a count: ignored


@pytest.mark.parametrize("bad, why", [("-1", "whole number >= 0"), ("1.5", "int"), ("true", "int"),
                                      ('"4"', "int")])
def test_a_bad_thread_count_names_the_field(bad, why):
    with pytest.raises(ConfigError, match=f"train.cpu_threads=.* is invalid: .*{why}"):
        load_config("tiny", [f"train.cpu_threads={bad}"])


def test_workers_keep_the_launchers_threads_unless_set():
    before = torch.get_num_threads()
    try:
        assert cpu_threads.apply(0, distributed=True) is None and torch.get_num_threads() == before
        assert cpu_threads.apply(1, distributed=True) == "1 (train.cpu_threads)" and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_fsmoe_train_computes_with_the_threads_it_prints(tmp_path, capsys):
    from fsmoe import cli

    before = torch.get_num_threads()
    try:
        assert cli.main(["train", "--run-dir", str(tmp_path / "run"), "--steps", "1", "--set", "train.cpu_threads=1",
                         "train.batch_size=2", "train.seq_len=16", "train.eval_batches=1",
                         "train.data_limit_mb=0.05"]) == 0
        assert torch.get_num_threads() == 1
        assert "CPU threads: 1 (train.cpu_threads)" in capsys.readouterr().out
    finally:
        torch.set_num_threads(before)
