"""The plan checked against the default path on alternate steps (fsmoe.schedule.run.check)."""
import torch

from fsmoe.config import load_config
from fsmoe.schedule.run.check import ScheduleCheck
from fsmoe.schedule.run.training import plan_check
from fsmoe.schedule.types import Schedule

CPU = torch.device("cpu")


def test_paths_alternate_after_one_warm_up_step_each():
    c = ScheduleCheck(first=3, steps=2)
    assert c.end == 9
    assert [c.path(s) for s in range(2, 10)] == [None, "plan", "default", "plan", "default", "plan", "default", None]
    assert [s for s in range(12) if c.timed(s)] == [5, 6, 7, 8]


def test_decision_by_median():
    c = ScheduleCheck(first=0, steps=3)
    c.times = {"plan": [0.30, 0.10, 0.12], "default": [0.11, 0.13, 0.50]}
    assert c.decide(CPU) == "plan"
    assert c.metrics()["schedule_check_plan_ms"] == 120.0
    c.times = {"plan": [0.2, 0.2, 0.2], "default": [0.2, 0.2, 0.2]}
    assert c.decide(CPU) == "default"  # a tie keeps the default path
    assert "keeping the default data path" in c.describe("r_fwd=2 r_bwd=2")


def test_timing_records_each_timed_step():
    c = ScheduleCheck(first=0, steps=1)
    for step in range(c.end):
        c.begin(step, CPU)
        c.finish(step, CPU)
    assert len(c.times["plan"]) == 1 and len(c.times["default"]) == 1


def test_check_runs_only_where_it_can():
    cfg = load_config("tiny", ["parallel.schedule=\"fsmoe\"", "train.steps=100"])
    planned = Schedule(policy="fsmoe", r_fwd=2, r_bwd=2, iio=True)
    cuda, executors = torch.device("cuda"), [object()]
    assert plan_check(cfg, planned, executors, None, cuda, 0).first == 1
    assert plan_check(cfg, planned, executors, None, CPU, 0) is None  # CPU: gloo keeps the partitions
    assert plan_check(cfg, planned, [], None, cuda, 0) is None  # r = 1: already the default path
    assert plan_check(cfg, planned, executors, object(), cuda, 0) is None  # a GradSync rides the executors
    forced = Schedule(policy="fsmoe", r_fwd=2, r_bwd=2, iio=True, meta={"forced_r": 2})
    assert plan_check(cfg, forced, executors, None, cuda, 0) is None
    assert plan_check(cfg, planned, executors, None, cuda, 95) is None  # too few steps left
    baseline = Schedule(policy="tutel_improved", r_fwd=2, r_bwd=2, iio=False)
    assert plan_check(cfg, baseline, executors, None, cuda, 0) is None  # baselines run as described
    off = load_config("tiny", ["parallel.schedule=\"fsmoe\"", "parallel.schedule_check_steps=0"])
    assert plan_check(off, planned, executors, None, cuda, 0) is None


def test_replan_moves_the_executors_to_the_new_degree(tmp_path):
    """The timeline's refit changes the plan's r: the executors run the new r from then on."""
    import dataclasses

    from fsmoe.schedule.run.training import TrainingSchedule
    from fsmoe.schedule.types import LayerSchedule

    class Executor:
        schedule = LayerSchedule(2, 2, True)

    start = Schedule(policy="fsmoe", r_fwd=2, r_bwd=2, iio=True)
    ex = Executor()
    ts = TrainingSchedule(start, None, None, None, None, None, None, [ex], None, tmp_path, True)
    ts.planner = lambda prof: dataclasses.replace(start, r_fwd=4, r_bwd=1)
    ts._replan(profile=None)
    assert (ex.schedule.r_fwd, ex.schedule.r_bwd, ex.schedule.iio) == (4, 1, True)
    assert (ts.schedule.r_fwd, ts.schedule.r_bwd) == (4, 1)
    assert ts.pop_metrics() == {"replanned_r_fwd": 4, "replanned_r_bwd": 1}
    assert "r_fwd 2 -> 4" in ts.notices[0]
    forced = dataclasses.replace(start, meta={"forced_r": 2})
    ts2 = TrainingSchedule(forced, None, None, None, None, None, None, [Executor()], None, tmp_path, True)
    ts2.planner = ts.planner
    ts2._replan(profile=None)
    assert ts2.schedule.r_fwd == 2 and not ts2.notices
