"""The five schedules we compare, each a pure function (spec, layout, profile) -> Schedule.

    policy          r (fwd / bwd)                    AG/RS lane     Gradient-AllReduce
    default         1 / 1                            shared (no IIO) one op after backward
    tutel_improved  PipeMoE's r (both directions)    shared          per block as soon as ready (DDP)
    pipemoe_lina    PipeMoE's r (both directions)    shared          fixed-size chunks between A2As (Lina)
    fsmoe_no_iio    FSMoE's optimiser, no-IIO model  shared          FSMoE partitions (greedy + DE)
    fsmoe           FSMoE's optimiser (4 cases)      own (IIO)       FSMoE partitions (greedy + DE)

"Shared" means AllGather/ReduceScatter queue on the same lane as the AlltoAll (no intra/inter
overlap). Lina's chunk size is fixed at a quarter of one block's dense gradients.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from fsmoe.schedule.executor import LayerSchedule
from fsmoe.schedule.grad_sync import GarPlan
from fsmoe.schedule.optimizer import choose_r, partition_gradients, pipemoe_r, pow2_candidates, slsqp_r
from fsmoe.schedule.perf_model import LayerSpec, Layout, chunk_times, layer_time, layer_work
from fsmoe.schedule.profile import Profile
from fsmoe.schedule.simulate import simulate_iteration, simulate_layer

POLICY_NAMES = ("default", "tutel_improved", "pipemoe_lina", "fsmoe_no_iio", "fsmoe")


@dataclass(frozen=True)
class Schedule:
    """What the executor runs, and what the models predicted for it."""

    policy: str
    r_fwd: int
    r_bwd: int
    iio: bool
    gar: GarPlan = GarPlan()
    case_fwd: int = 0  # FSMoE case (1-4) that bounds the forward / backward (0: not modelled)
    case_bwd: int = 0
    r_fwd_cont: float = 0.0  # SLSQP's continuous optimum before rounding
    r_bwd_cont: float = 0.0
    predicted_fwd_s: float = 0.0  # simulated forward of the block stack
    predicted_iter_s: float = 0.0  # simulated iteration (forward + backward + last AllReduce)
    candidates: tuple = ()  # (name, seconds) of what the optimiser compared
    meta: dict = field(default_factory=dict)

    def layer_schedule(self) -> LayerSchedule:
        return LayerSchedule(self.r_fwd, self.r_bwd, self.iio)

    def with_prediction(self, spec: LayerSpec, layout: Layout, profile: Profile) -> "Schedule":
        sim = simulate_iteration(spec, layout, profile, self.r_fwd, self.r_bwd, self.iio, self.gar)
        return dataclasses.replace(self, predicted_fwd_s=sim.fwd_s, predicted_iter_s=sim.iter_s)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Schedule":
        d = dict(d)
        d["gar"] = GarPlan(d["gar"]["mode"], tuple(d["gar"]["window_bytes"]), d["gar"]["chunk_bytes"])
        d["candidates"] = tuple(tuple(c) for c in d.get("candidates", ()))
        return Schedule(**d)


def _reduces(layout: Layout, profile: Profile) -> bool:
    return layout.dp > 1 and profile.has("allreduce")


# ---------------------------------------------------------------------------- baselines


def default(spec: LayerSpec, layout: Layout, profile: Profile) -> Schedule:
    return Schedule("default", 1, 1, iio=False, gar=GarPlan("end")).with_prediction(spec, layout, profile)


def tutel_improved(spec: LayerSpec, layout: Layout, profile: Profile) -> Schedule:
    r = pipemoe_r(layer_work(spec, layout), profile, layout)
    return Schedule("tutel_improved", r, r, iio=False, gar=GarPlan("ready")).with_prediction(spec, layout, profile)


def pipemoe_lina(spec: LayerSpec, layout: Layout, profile: Profile) -> Schedule:
    r = pipemoe_r(layer_work(spec, layout), profile, layout)
    chunk = max(spec.grad_bytes, spec.gar_bytes // 4)
    return Schedule("pipemoe_lina", r, r, iio=False,
                    gar=GarPlan("chunks", chunk_bytes=chunk)).with_prediction(spec, layout, profile)


# ---------------------------------------------------------------------------- FSMoE


def fsmoe_partitions(spec: LayerSpec, layout: Layout, profile: Profile, r_bwd: int, iio: bool):
    """FSMoE's gradient partitions at backward degree r_bwd -> (GarPlan, Partition | None)."""
    if not _reduces(layout, profile):
        return GarPlan("end"), None
    work = layer_work(spec, layout)
    ct = chunk_times(work, profile, layout, float(r_bwd), backward=True)
    t_layer, _ = layer_time(dataclasses.replace(ct, overlap=1.0), 0.0, iio)
    busy = 2 * r_bwd * ct.a2a if iio else r_bwd * (2 * ct.a2a + ct.ag + ct.rs)
    n, G = spec.n_layers, spec.gar_bytes
    window = ct.overlap * max(0.0, t_layer - busy)  # inter-lane idle time that really is free
    part = partition_gradients(
        windows_s=[window] * n, ready_bytes=[k * G for k in range(n)], total_bytes=n * G,
        t_ar=profile.fits["allreduce"], layer_time_with=lambda k, t: layer_time(ct, t, iio)[0])
    return GarPlan("windows", window_bytes=tuple(reversed(part.window_bytes))), part  # window k is layer n-1-k


def fsmoe(spec: LayerSpec, layout: Layout, profile: Profile, iio: bool = True) -> Schedule:
    """1. r_fwd: SLSQP over the cases, neighbours compared by simulating the layer forward.
    2. r_bwd: SLSQP with the AllReduce of one block's gradients inside the layer; for each
       power-of-two neighbour, partitions (greedy + DE), then the whole iteration simulated."""
    work = layer_work(spec, layout)
    cf = choose_r(work, profile, layout, iio=iio, evaluate=lambda r: simulate_layer(spec, layout, profile, r, iio=iio))
    t_gar = profile.t("allreduce", work.gar_bytes) if _reduces(layout, profile) else 0.0
    rb_cont, case_b, _ = slsqp_r(work, profile, layout, backward=True, t_gar=t_gar, iio=iio)
    best, cands = None, []
    for rb in pow2_candidates(rb_cont):
        gar, part = fsmoe_partitions(spec, layout, profile, rb, iio)
        sim = simulate_iteration(spec, layout, profile, cf.r, rb, iio, gar)
        cands.append((f"r_bwd={rb}", sim.iter_s))
        if best is None or sim.iter_s < best[0].iter_s:
            best = (sim, rb, gar, part)
    sim, rb, gar, part = best
    meta = {"fwd_candidates": [list(c) for c in cf.candidates]}
    if part is not None:
        meta.update(greedy_bytes=list(reversed(part.greedy_bytes)), tail_bytes=part.tail_bytes)
    return Schedule("fsmoe" if iio else "fsmoe_no_iio", cf.r, rb, iio, gar, cf.case, case_b, cf.r_cont, rb_cont,
                    sim.fwd_s, sim.iter_s, tuple(cands), meta)


def fsmoe_no_iio(spec: LayerSpec, layout: Layout, profile: Profile) -> Schedule:
    return fsmoe(spec, layout, profile, iio=False)


POLICIES = {"default": default, "tutel_improved": tutel_improved, "pipemoe_lina": pipemoe_lina,
            "fsmoe_no_iio": fsmoe_no_iio, "fsmoe": fsmoe}
