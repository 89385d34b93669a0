"""fsmoe.op_clock: the MoE layer's ops timed at its hook points, forward and backward."""
from __future__ import annotations

import math

import pytest
import torch

from fsmoe.config import load_config
from fsmoe.models import build_model
from fsmoe.op_clock import OPS, OpClock
from fsmoe.recompute import configure_recompute


def _model(recompute: str = "none"):
    cfg = load_config("tiny", ["model.n_layers=2", "model.moe.num_experts=4"]).model
    model = build_model(cfg, seed=0)
    configure_recompute(model, recompute)
    return model, torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))


def _step(model, x):
    out = model(x)
    (out.logits.float().square().mean() + out.aux_loss).backward()


def test_every_op_is_timed_forward_and_backward_and_the_spans_add_up_to_the_layer():
    model, x = _model()
    clock = OpClock(model.moe_layers(), torch.device("cpu"))
    _step(model, x)
    ops = clock.collect()
    assert set(ops) == {"forward", "backward"}
    for phase, rows in ops.items():
        assert len(rows) == len(model.moe_layers())
        for row in rows:
            assert len(row) == len(OPS) + 1 and all(s >= 0 for s in row), (phase, row)
            # up to rounding and the few microseconds clamped at 0
            assert math.isclose(sum(row[:-1]), row[-1], rel_tol=1e-3, abs_tol=2e-5), (phase, row)
    with torch.no_grad():
        model(x)  # evaluation is not a training step: nothing recorded
    assert all(math.isnan(s) for rows in clock.collect().values() for row in rows for s in row)
    clock.close()
    _step(model, x)
    assert all(math.isnan(s) for rows in clock.collect().values() for row in rows for s in row)


def test_a_recomputed_block_is_timed_once():
    model, x = _model("full")
    clock = OpClock(model.moe_layers(), torch.device("cpu"))
    _step(model, x)
    ops = clock.collect()
    assert all(math.isfinite(s) for rows in ops.values() for row in rows for s in row)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh)")
def test_cuda_events_time_the_same_ops_as_the_cpu_clock():
    """On CUDA the marks are events read after the step: every span finite, non-negative, and the
    ops add up to the layer (each point's event follows the previous one on the stream)."""
    model, x = _model()
    model.cuda()
    clock = OpClock(model.moe_layers(), torch.device("cuda"))
    _step(model, x.cuda())
    for phase, rows in clock.collect().items():
        for row in rows:
            assert all(math.isfinite(s) and s >= 0 for s in row), (phase, row)
            assert math.isclose(sum(row[:-1]), row[-1], rel_tol=1e-2, abs_tol=1e-4), (phase, row)


def test_step_clock_gives_each_phase_of_a_step_once_all_are_marked():
    from fsmoe.op_clock import STEP_PHASES, StepClock

    clock = StepClock(torch.device("cpu"))
    for _ in range(len(STEP_PHASES) + 1):
        clock.mark()
    got = clock.collect()
    assert list(got) == list(STEP_PHASES) and all(v >= 0 for v in got.values())
    clock.mark()
    assert clock.collect() is None and clock.collect() is None  # a step marked part way: nothing
