"""Choosing the pipeline degree r and the gradient partitions (FSMoE §4.3-4.4, PipeMoE's solver).

``choose_r``: for each of FSMoE's cases, SLSQP minimises the case's objective over continuous
r in [1, r_max] subject to the case's predicates (the case is the bottleneck: its objective is
at least every other case's); the best feasible case wins. The continuous r is then snapped to
powers of two and the neighbours are compared with ``evaluate`` (the simulated timeline), since
the relaxation ignores integrality and chunk rounding. Forward and backward are chosen
separately (backward: expert_bwd times and the gradient AllReduce placed in the layer).

``partition_gradients``: FSMoE's two steps. (1) Greedy: in backward order, give each MoE layer's
window (the inter-lane idle time of its backward) as many ready gradient bytes as fit, carrying
the rest on. (2) Differential evolution places what is left: minimise
sum_k f_k(t_ar(z_k)) + t_ar(tail) under prefix-sum bounds (a layer can only reduce gradients
that are ready before it runs), where f_k is the layer's backward time with that AllReduce inside.

``pipemoe_r``: PipeMoE's choice for the baselines: a two-stage (comm, expert) model with AG/RS
counted as comm, candidates r = 1 and the SLSQP optimum of both regimes rounded to integers.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.optimize import LinearConstraint, differential_evolution, minimize

from fsmoe.schedule.model.perf_model import CASES, LayerWork, case_objectives, chunk_times, layer_time
from fsmoe.schedule.model.profile import LinearFit, Profile
from fsmoe.schedule.types import Layout

R_CHOICES = (1, 2, 4, 8)


@dataclass(frozen=True)
class RChoice:
    r: int  # chosen integer degree
    r_cont: float  # SLSQP optimum
    case: int  # the winning case (bottleneck) at r_cont
    objective: float  # that case's objective at r_cont (seconds)
    candidates: tuple[tuple[int, float], ...]  # (r, evaluated seconds) of the neighbours checked


def _objective_fn(work: LayerWork, profile: Profile, layout: Layout, backward: bool, t_gar: float, iio: bool):
    def obj(r: float) -> dict[int, float]:
        return case_objectives(chunk_times(work, profile, layout, float(r), backward), t_gar, iio)
    return obj


def slsqp_r(work: LayerWork, profile: Profile, layout: Layout, *, backward: bool = False, t_gar: float = 0.0,
            iio: bool = True, r_max: float = 8.0) -> tuple[float, int, float]:
    """(r, case, objective): the best feasible case optimum over continuous r in [1, r_max]."""
    obj = _objective_fn(work, profile, layout, backward, t_gar, iio)
    cases = CASES if iio else (1, 2)
    best = None
    for c in cases:
        cons = [{"type": "ineq", "fun": (lambda x, c=c, o=o: (obj(x[0])[c] - obj(x[0])[o]) * 1e3)}
                for o in cases if o != c]  # predicates: case c is the bottleneck
        for x0 in (1.0, math.sqrt(r_max), r_max):
            res = minimize(lambda x, c=c: obj(x[0])[c] * 1e3, x0=[x0], method="SLSQP", bounds=[(1.0, r_max)],
                           constraints=cons, options={"ftol": 1e-10, "maxiter": 200})
            r = float(np.clip(res.x[0], 1.0, r_max))
            vals = obj(r)
            feasible = all(vals[c] >= vals[o] - 1e-12 for o in cases)
            if feasible and (best is None or vals[c] < best[2]):
                best = (r, c, vals[c])
    if best is None:  # numerically no case was feasible: fall back to the max over cases
        r = min((1.0, r_max), key=lambda x: max(obj(x).values()))
        vals = obj(r)
        c = max(vals, key=vals.get)
        best = (r, c, vals[c])
    return best


def pow2_candidates(r: float, choices=R_CHOICES) -> list[int]:
    """The powers of two at and around r (within ``choices``)."""
    lo = max([c for c in choices if c <= r], default=choices[0])
    i = choices.index(lo)
    return sorted(set(choices[max(0, i - 1):i + 2]))


def choose_r(work: LayerWork, profile: Profile, layout: Layout, *, backward: bool = False, t_gar: float = 0.0,
             iio: bool = True, evaluate: Callable[[int], float] | None = None, choices=R_CHOICES) -> RChoice:
    r_cont, case, value = slsqp_r(work, profile, layout, backward=backward, t_gar=t_gar, iio=iio,
                                  r_max=float(max(choices)))
    if evaluate is None:
        evaluate = lambda r: layer_time(chunk_times(work, profile, layout, r, backward), t_gar, iio)[0]
    cands = tuple((r, float(evaluate(r))) for r in pow2_candidates(r_cont, choices))
    r_best = min(cands, key=lambda rv: (rv[1], rv[0]))[0]
    return RChoice(r_best, r_cont, case, value, cands)


def pipemoe_r(work: LayerWork, profile: Profile, layout: Layout, r_max: int = 16) -> int:
    """PipeMoE: T(r) = max(r c, c + r x) with c = 2 a2a + ag + rs per chunk; best integer.
    PipeMoE's model assumes communication overlaps compute for free, so it ignores
    ``profile.overlap``."""
    profile = dataclasses.replace(profile, overlap=1.0, overlap_points=())

    def T(r: float) -> float:
        ct = chunk_times(work, profile, layout, r)
        return max(case_objectives(ct, iio=False).values())
    r_cont, _, _ = slsqp_r(work, profile, layout, iio=False, r_max=float(r_max))
    cands = {1, max(1, math.floor(r_cont)), min(r_max, math.ceil(r_cont))}
    return min(cands, key=lambda r: (T(r), r))


# ---------------------------------------------------------------------------- gradient partitions


@dataclass(frozen=True)
class Partition:
    window_bytes: tuple[int, ...]  # per window, in backward order
    greedy_bytes: tuple[int, ...]  # step 1 alone
    tail_bytes: int  # reduced after backward
    objective: float  # predicted sum of layer times + exposed tail (seconds)


def partition_gradients(windows_s: list[float], ready_bytes: list[float], total_bytes: float, t_ar: LinearFit,
                        layer_time_with: Callable[[int, float], float], *, seed: int = 0,
                        maxiter: int = 60) -> Partition:
    """windows_s[k]: idle inter-lane seconds of the k-th MoE layer's backward (backward order);
    ready_bytes[k]: gradient bytes ready before it; layer_time_with(k, t_gar): that layer's
    backward seconds with an AllReduce of t_gar inside it."""
    K = len(windows_s)
    ar = lambda n: t_ar(n) if n > 0 else 0.0

    def cost(z) -> float:
        z = np.maximum(np.asarray(z, float), 0.0)
        tail = max(0.0, total_bytes - z.sum())
        return sum(layer_time_with(k, ar(z[k])) for k in range(K)) + ar(tail)

    # (1) greedy fill
    greedy, placed = [], 0.0
    for k in range(K):
        fit = max(0.0, (windows_s[k] - t_ar.alpha) / t_ar.beta) if t_ar.beta > 0 else math.inf
        x = max(0.0, min(fit, ready_bytes[k] - placed))
        greedy.append(x)
        placed += x
    best_z, best = np.array(greedy), cost(greedy)
    rest = total_bytes - placed
    # (2) differential evolution over the extra bytes y_k, prefix sums bounded by readiness
    if K and rest > 0 and any(ready_bytes[k] - sum(greedy[:k + 1]) > 0 for k in range(K)):
        g = np.array(greedy)
        prefix_cap = np.array([ready_bytes[k] - g[:k + 1].sum() for k in range(K)])
        A = np.tril(np.ones((K, K)))
        cons = LinearConstraint(A, -np.inf, np.maximum(prefix_cap, 0.0))
        bounds = [(0.0, max(0.0, min(rest, prefix_cap[k]))) for k in range(K)]
        if any(hi > 0 for _, hi in bounds):
            res = differential_evolution(lambda y: cost(g + y), bounds, constraints=(cons,), seed=seed,
                                         maxiter=maxiter, tol=1e-8, polish=False, init="sobol")
            y = np.clip(res.x, [b[0] for b in bounds], [b[1] for b in bounds])
            if np.all(A @ y <= np.maximum(prefix_cap, 0) + 1e-6) and cost(g + y) < best:
                best_z, best = g + y, cost(g + y)
    zb = tuple(int(round(v)) for v in best_z)
    return Partition(zb, tuple(int(round(v)) for v in greedy), int(round(max(0.0, total_bytes - sum(zb)))), best)
