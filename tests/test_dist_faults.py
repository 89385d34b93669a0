"""No hangs: a rank that raises (or hangs) mid-step makes every rank exit non-zero, fast, with the
failing rank's error printed once (fsmoe.parallel.launch: run_guarded + watchdog)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from dist_utils import spawn_workers
from fsmoe.config import ParallelConfig
from fsmoe.models import build_model
from fsmoe.parallel.groups import build_groups
from fsmoe.parallel.launch import Watchdog, run_guarded, shutdown_distributed
from fsmoe.parallel.tensor_parallel import parallelize
from test_dist_layouts import B, batches, model_cfg, optimizer, train_step

pytestmark = pytest.mark.dist
FAIL_RANK, FAIL_STEP = 2, 2


def _train_and_fail(rank, world, mode: str, out_dir: str):
    """EP4 training; rank FAIL_RANK raises (mode 'raise') or sleeps forever ('hang') at FAIL_STEP."""
    Watchdog.start_from_env(rank)

    def main():
        groups = build_groups(ParallelConfig(dp=world, ep=world))
        model = parallelize(build_model(model_cfg("gpt"), seed=3), groups)
        opt = optimizer(model)
        rows = slice(rank * B // world, (rank + 1) * B // world)
        for step, (x, y) in enumerate(batches(4)):
            if step == FAIL_STEP and rank == FAIL_RANK:
                Path(out_dir, "failed_at").write_text(repr(time.time()))
                if mode == "raise":
                    raise RuntimeError("injected failure")
                time.sleep(3600)
            train_step(model, opt, x[rows], y[rows], groups, 1.0)
        shutdown_distributed()

    return run_guarded(main)


@pytest.mark.parametrize("mode,coll_timeout_s,within_s", [("raise", 60.0, 10.0), ("hang", 4.0, 14.0)])
def test_failing_rank_stops_every_rank(mode, coll_timeout_s, within_s, tmp_path, capfd):
    codes, killed, ended = spawn_workers(_train_and_fail, 4, mode, str(tmp_path), timeout_s=120,
                                         coll_timeout_s=coll_timeout_s, out_dir=str(tmp_path))
    err = capfd.readouterr().err
    assert not killed, f"ranks {killed} were still running at the deadline"
    assert all(code != 0 for code in codes), f"exit codes {codes}"
    failed_at = float((tmp_path / "failed_at").read_text())
    assert ended - failed_at < within_s, f"took {ended - failed_at:.1f}s to stop after the failure"
    assert err.count("[fsmoe rank") == 1, err  # the error, printed once
    if mode == "raise":
        assert f"[fsmoe rank {FAIL_RANK}] failed" in err and "RuntimeError: injected failure" in err
    else:  # a peer's collective times out; that rank reports it
        assert "[fsmoe rank" in err


# ---------------------------------------------------------------- fsmoe profile / fsmoe bench schedule


def _command_and_fail(rank, world, command: str, mode: str, out_dir: str):
    """Run ``fsmoe profile`` or ``fsmoe bench schedule`` through their real entry points, with
    the measuring function replaced: rank FAIL_RANK raises or hangs, the others enter a collective."""
    import argparse

    import torch
    import torch.distributed as dist

    from fsmoe.bench import schedule as bench
    from fsmoe.cli import profile as profile_cli

    def work(groups, *a, **k):
        if groups.rank == FAIL_RANK:
            Path(out_dir, "failed_at").write_text(repr(time.time()))
            if mode == "raise":
                raise RuntimeError("injected failure")
            time.sleep(3600)
        dist.all_reduce(torch.ones(1), group=groups.world_group)

    sub = argparse.ArgumentParser().add_subparsers()
    if command == "profile":
        profile_cli.run_profile = work
        profile_cli.add_parser(sub)
        args = sub.choices["profile"].parse_args(["--device", "cpu", "--ep", str(world), "--timeout", "4"])
        return args.func(args)
    bench.run_bench = work
    bench.add_arguments(p := sub.add_parser("schedule"))
    args = p.parse_args(["--nproc", "1", "--device", "cpu", "--ep", str(world), "--esp", "1", "--gpus-per-node",
                         str(world), "--timeout", "4", "--run-dir", out_dir])
    return bench.run(args)


@pytest.mark.parametrize("command,mode,coll_timeout_s", [("profile", "raise", 60.0), ("bench", "hang", 4.0)])
def test_profile_and_bench_stop_every_rank(command, mode, coll_timeout_s, tmp_path, capfd):
    """Both commands start through ``fsmoe.parallel.launch.run_command`` (one launcher)."""
    codes, killed, ended = spawn_workers(_command_and_fail, 4, command, mode, str(tmp_path), timeout_s=90,
                                         coll_timeout_s=coll_timeout_s, out_dir=str(tmp_path))
    err = capfd.readouterr().err
    assert not killed, f"ranks {killed} were still running at the deadline"
    assert all(code != 0 for code in codes), f"exit codes {codes}"
    failed_at = float((tmp_path / "failed_at").read_text())
    assert ended - failed_at < 14.0, f"took {ended - failed_at:.1f}s to stop after the failure"
    assert err.count("[fsmoe rank") == 1, err
    if mode == "raise":
        assert f"[fsmoe rank {FAIL_RANK}] failed" in err and "RuntimeError: injected failure" in err
