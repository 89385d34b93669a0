"""``ParallelTrainer`` (what ``fsmoe train --nproc 2 --ep 2`` runs) with ``parallel.placement =
flexmoe | eplb``: rebalances every two steps move experts (weights and AdamW state) and the
losses stay those of the static placement; the routing trace is written; a run checkpointed
while its experts sat in moved placements (saved under the logical expert layout) resumes, under
the EPLB-style policy, on the same curve. The FlexMoE run moves experts behind the next step's
compute (the default), the resumed one with the step waiting. One launch of two gloo
processes runs every trainer in turn."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dist_utils import run_workers
from fsmoe.placement.traffic import read_trace
from test_dist_cli import SMALL

pytestmark = pytest.mark.dist
FLEX = ["parallel.placement_interval=2", "parallel.placement_threshold=1.0", "parallel.placement_max_moved=0.25"]


def _trainers(rank, world, root: str):
    from rich.console import Console

    from fsmoe.config import load_config
    from fsmoe.parallel.groups import build_groups
    from fsmoe.parallel.trainer import ParallelTrainer

    import fsmoe.train

    fsmoe.train.plots = type("NoPlots", (), {"plot_loss": staticmethod(lambda *a: None),  # not under test here
                                            "plot_expert_load": staticmethod(lambda *a: None)})
    base = SMALL[1:] + ["parallel.dp=2", "parallel.ep=2", "train.seed=0", "train.device='cpu'", "train.ckpt_every=0",
                        "train.eval_every=100"]

    def train(name: str, steps: int, extra: list[str], resume: bool = False) -> None:
        cfg = load_config("tiny", base + [f"train.steps={steps}"] + extra)
        trainer = ParallelTrainer(cfg, Path(root) / name, groups=build_groups(cfg.parallel), resume=resume,
                                  console=Console(quiet=True))
        trainer.fit()

    train("static", 8, [])
    # checkpoints at steps 4 and 8 are written while experts sit in moved placements
    train("flex", 8, ["parallel.placement='flexmoe'", "train.trace=true", "train.ckpt_every=4"] + FLEX)
    if rank == 0:  # resume from step 4, and under the other policy
        shutil.copytree(Path(root) / "flex", Path(root) / "resumed")
        shutil.rmtree(Path(root) / "resumed" / "ckpt" / "step_8")
    torch.distributed.barrier()
    train("resumed", 8, ["parallel.placement='eplb'", "parallel.placement_overlap=false"] + FLEX, resume=True)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def same_curve(got: list[dict], ref: list[dict], tol: float = 1e-5) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for g, r in zip(got, ref):
        assert abs(g["loss"] - r["loss"]) < tol, (g, r)
        if "val_loss" in g and "val_loss" in r:
            assert abs(g["val_loss"] - r["val_loss"]) < tol, (g, r)


def test_flexmoe_and_eplb_train_like_static_and_resume(tmp_path):
    run_workers(_trainers, 2, str(tmp_path), timeout_s=300)
    ref = records(tmp_path / "static")
    flex = records(tmp_path / "flex")
    same_curve(flex, ref)
    moves = [r for r in flex if "placement_balance_before" in r]
    assert moves and any(r["placement_moved_bytes"] > 0 for r in moves)
    assert all(r["placement_balance_after"] <= r["placement_balance_before"] + 1e-9 for r in moves)
    assert all(r["placement_moved_fraction"] <= 0.25 and "rank_balance" in r for r in moves)
    landed = [r for r in flex if "placement_hidden_s" in r]  # overlapped moves, committed in a later forward
    assert landed and all(r["placement_wait_s"] >= 0 and r["placement_hidden_s"] >= 0 for r in landed)
    trace = read_trace(tmp_path / "flex" / "routing_trace.jsonl.gz")
    assert trace.steps.tolist() == list(range(1, 9)) and trace.counts_NMRE.shape == (8, 2, 2, 8)
    assert trace.counts_NMRE.sum() == 8 * 2 * 8 * 32 * 2  # steps x layers x tokens per step x top-2
    for phase in ("forward", "backward"):  # rank 0's op timings of every step (fsmoe.op_clock)
        assert trace.ops_NMO[phase].shape == (8, 2, 6) and (trace.ops_NMO[phase] >= 0).all(), phase
    # and which experts rank 0's first 32 tokens chose together: two distinct experts each
    c = trace.choices_NMSK
    assert c.shape == (8, 2, 32, 2) and ((c >= 0) & (c < 8)).all() and (c[..., 0] != c[..., 1]).all()
    resumed = records(tmp_path / "resumed")
    same_curve(resumed, ref)
    assert any("placement_balance_before" in r for r in resumed if r["step"] > 4)
