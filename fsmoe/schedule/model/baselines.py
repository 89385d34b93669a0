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

from fsmoe.schedule.model.optimizer import choose_r, partition_gradients, pipemoe_r, pow2_candidates, slsqp_r
from fsmoe.schedule.model.perf_model import chunk_times, layer_time, layer_work
from fsmoe.schedule.model.profile import Profile
from fsmoe.schedule.model.simulate import simulate_iteration, simulate_layer
from fsmoe.schedule.types import GarPlan, LayerSpec, Layout, Schedule

POLICY_NAMES = ("default", "tutel_improved", "pipemoe_lina", "fsmoe_no_iio", "fsmoe")


def with_prediction(schedule: Schedule, spec: LayerSpec, layout: Layout, profile: Profile) -> Schedule:
    """``schedule`` with its simulated forward and iteration times filled in."""
    sim = simulate_iteration(spec, layout, profile, schedule.r_fwd, schedule.r_bwd, schedule.iio, schedule.gar)
    return dataclasses.replace(schedule, predicted_fwd_s=sim.fwd_s, predicted_iter_s=sim.iter_s)


def _reduces(layout: Layout, profile: Profile) -> bool:
    return layout.dp > 1 and profile.has("allreduce")


# ---------------------------------------------------------------------------- baselines


def default(spec: LayerSpec, layout: Layout, profile: Profile) -> Schedule:
    return with_prediction(Schedule("default", 1, 1, iio=False, gar=GarPlan("end")), spec, layout, profile)


def tutel_improved(spec: LayerSpec, layout: Layout, profile: Profile) -> Schedule:
    r = pipemoe_r(layer_work(spec, layout), profile, layout)
    return with_prediction(Schedule("tutel_improved", r, r, iio=False, gar=GarPlan("ready")), spec, layout, profile)


def pipemoe_lina(spec: LayerSpec, layout: Layout, profile: Profile) -> Schedule:
    r = pipemoe_r(layer_work(spec, layout), profile, layout)
    chunk = max(spec.grad_bytes, spec.gar_bytes // 4)
    schedule = Schedule("pipemoe_lina", r, r, iio=False, gar=GarPlan("chunks", chunk_bytes=chunk))
    return with_prediction(schedule, spec, layout, profile)


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
    2. r_bwd: SLSQP with the AllReduce of one block's gradients inside the layer.
    3. The whole iteration is simulated for r_fwd with each power-of-two neighbour of r_bwd, with
       r_bwd = r_fwd, and for r = 1/1 (not pipelining is always a candidate: the forward's own
       optimum can still lose over the iteration); each with its partitions (greedy + DE) and
       the experts' forward recomputed in backward where r_bwd != r_fwd (the executor keeps each
       forward chunk's graph only when the backward cuts the same chunks). The fastest wins,
       the smaller degrees on a tie."""
    work = layer_work(spec, layout)
    cf = choose_r(work, profile, layout, iio=iio, evaluate=lambda r: simulate_layer(spec, layout, profile, r, iio=iio))
    t_gar = profile.t("allreduce", work.gar_bytes) if _reduces(layout, profile) else 0.0
    rb_cont, case_b, _ = slsqp_r(work, profile, layout, backward=True, t_gar=t_gar, iio=iio)
    recompute = spec.n_layers * chunk_times(work, profile, layout, 1.0).exp
    pairs = {(cf.r, rb) for rb in set(pow2_candidates(rb_cont)) | {cf.r}} | {(1, 1)}
    best, cands = None, []
    partitions = {rb: fsmoe_partitions(spec, layout, profile, rb, iio) for rb in {rb for _, rb in pairs}}
    for rf, rb in sorted(pairs, key=lambda p: (p[0] + p[1], p)):
        gar, part = partitions[rb]  # depend on r_bwd alone
        sim = simulate_iteration(spec, layout, profile, rf, rb, iio, gar)
        if rb != rf:
            sim = dataclasses.replace(sim, iter_s=sim.iter_s + recompute)
        cands.append((f"r={rf}/{rb}", sim.iter_s))
        if best is None or sim.iter_s < best[0].iter_s:  # strict: a tie keeps the smaller degrees
            best = (sim, rf, rb, gar, part)
    sim, rf, rb, gar, part = best
    meta = {"fwd_candidates": [list(c) for c in cf.candidates]}
    if part is not None:
        meta.update(greedy_bytes=list(reversed(part.greedy_bytes)), tail_bytes=part.tail_bytes)
    return Schedule("fsmoe" if iio else "fsmoe_no_iio", rf, rb, iio, gar, cf.case, case_b, cf.r_cont, rb_cont,
                    sim.fwd_s, sim.iter_s, tuple(cands), meta)


def fsmoe_no_iio(spec: LayerSpec, layout: Layout, profile: Profile) -> Schedule:
    return fsmoe(spec, layout, profile, iio=False)


POLICIES = {"default": default, "tutel_improved": tutel_improved, "pipemoe_lina": pipemoe_lina,
            "fsmoe_no_iio": fsmoe_no_iio, "fsmoe": fsmoe}
