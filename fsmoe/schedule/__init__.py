"""The FSMoE scheduler: profiling, performance models, r and gradient partitions, the pipelined
executor and its timelines (docs/scheduler.md).

    profile = Profile.load("runs/profiles/x.json")            # fsmoe profile
    schedule = plan(LayerSpec(...), parallel_cfg, profile)     # pure: -> Schedule
    layer.executor = PipelinedExecutor(layer.experts, MoEStages.from_groups(groups),
                                       make_engine(device), schedule.layer_schedule())
"""
from fsmoe.schedule.baselines import POLICY_NAMES, Schedule
from fsmoe.schedule.engine import Recorder, make_engine
from fsmoe.schedule.executor import LayerSchedule, PipelinedExecutor
from fsmoe.schedule.grad_sync import GarPlan, GradSync
from fsmoe.schedule.perf_model import LayerSpec, Layout
from fsmoe.schedule.plan import explain, plan, plan_all
from fsmoe.schedule.profile import LinearFit, Profile, refit
from fsmoe.schedule.stages import MoEStages

__all__ = ["POLICY_NAMES", "GarPlan", "GradSync", "LayerSchedule", "LayerSpec", "Layout", "LinearFit", "MoEStages",
           "PipelinedExecutor", "Profile", "Recorder", "Schedule", "explain", "make_engine", "plan", "plan_all",
           "refit"]
