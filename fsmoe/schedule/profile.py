"""Profile: the fitted cost models the scheduler plans with, and the least-squares fits behind them.

Every op the scheduler places is modelled as ``t = alpha + n * beta`` (FSMoE §4, PipeMoE):

    key              n (the size the op is fitted over)          measured on
    a2a_inter        bytes sent by one rank (EP AlltoAll)         EP group spanning nodes
    a2a_intra        bytes sent by one rank                       a group inside one node
    allgather        bytes of the gathered output                 ESP group (intra-node)
    reducescatter    bytes of the (summed) input                  ESP group (intra-node)
    allreduce        bytes reduced                                DP group (gradients)
    expert_fwd       multiply-adds of the expert FFN (all GEMMs)  grouped GEMM + activation
    expert_bwd       multiply-adds of the *forward* FFN           grouped GEMM backward
    dense_fwd/bwd    multiply-adds of the attention block         attention block

A :class:`Profile` is keyed by ``hardware`` (what it ran on) and ``layout`` (the process-group
shape), saved as JSON, and carries the raw ``points`` it was fitted on so that :func:`refit` can
fold in the timings the executor records during training (online profiling). ``overlap`` is the
measured fraction of communication that hides under concurrent compute: about 1 on GPUs (copy
engines and NICs are not the SMs), near 0 on an oversubscribed CPU where gloo's memcpy competes
with the GEMMs for the same cores. FSMoE's models assume 1; ours blend (``perf_model``).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

FIT_KEYS = ("a2a_inter", "a2a_intra", "allgather", "reducescatter", "allreduce",
            "expert_fwd", "expert_bwd", "dense_fwd", "dense_bwd")


@dataclass(frozen=True)
class LinearFit:
    """``t(n) = alpha + n * beta`` seconds; ``r2`` of the least-squares fit over ``num_points``."""

    alpha: float
    beta: float
    r2: float = 1.0
    num_points: int = 0

    def __call__(self, n: float) -> float:
        return self.alpha + n * self.beta

    def scaled(self, factor: float) -> "LinearFit":
        return dataclasses.replace(self, alpha=self.alpha * factor, beta=self.beta * factor)


def fit_linear(sizes: Iterable[float], times: Iterable[float]) -> LinearFit:
    """Least squares with an intercept. ``alpha`` is clamped at 0 (a negative latency is a fit
    artefact: the line is then refitted through the origin); R² is of the returned line."""
    n = np.asarray(list(sizes), dtype=float)
    t = np.asarray(list(times), dtype=float)
    if n.size == 0 or n.size != t.size:
        raise ValueError(f"fit_linear needs matching, non-empty sizes and times (got {n.size} and {t.size})")
    if np.unique(n).size < 2:  # one size: no slope information, put everything into beta
        beta = float(t.mean() / n[0]) if n[0] > 0 else 0.0
        alpha = 0.0 if n[0] > 0 else float(t.mean())
    else:
        A = np.stack([np.ones_like(n), n], axis=1)
        (alpha, beta), *_ = np.linalg.lstsq(A, t, rcond=None)
        if alpha < 0:
            alpha, beta = 0.0, float(n @ t / (n @ n))
    pred = alpha + n * beta
    ss_res = float(((t - pred) ** 2).sum())
    ss_tot = float(((t - t.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return LinearFit(float(alpha), float(beta), r2, int(n.size))


@dataclass(frozen=True)
class Profile:
    """Fitted cost models for one (hardware, layout).

    fits:   key (see the table in the module docstring) -> LinearFit.
    points: key -> [[n, seconds], ...] the fit was made from (medians of repeats).
    meta:   free-form facts about the run (world size, dtype, repeats, wall time of profiling).
    """

    hardware: str
    layout: str
    fits: dict[str, LinearFit]
    points: dict[str, list[list[float]]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    overlap: float = 1.0  # measured fraction of comm that hides under compute when both run (1: free)

    def t(self, key: str, n: float) -> float:
        """Predicted seconds of op ``key`` at size ``n`` (0 for a zero-size op)."""
        if n <= 0:
            return 0.0
        if key not in self.fits:
            raise KeyError(f"profile {self.hardware}/{self.layout} has no fit for {key!r}; "
                           f"it has {sorted(self.fits)} (run `fsmoe profile`)")
        return self.fits[key](n)

    def has(self, key: str) -> bool:
        return key in self.fits

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return {"hardware": self.hardware, "layout": self.layout, "overlap": self.overlap,
                "fits": {k: dataclasses.asdict(v) for k, v in sorted(self.fits.items())},
                "points": self.points, "meta": self.meta}

    @staticmethod
    def from_dict(d: dict) -> "Profile":
        return Profile(d["hardware"], d["layout"], {k: LinearFit(**v) for k, v in d["fits"].items()},
                       d.get("points", {}), d.get("meta", {}), d.get("overlap", 1.0))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @staticmethod
    def load(path: str | Path) -> "Profile":
        return Profile.from_dict(json.loads(Path(path).read_text()))

    def summary(self) -> str:
        lines = [f"profile {self.hardware} / {self.layout}; comm/compute overlap efficiency {self.overlap:.2f}",
                 f"  {'op':<14} {'alpha (us)':>11} {'1/beta':>14} {'R^2':>8} {'points':>6}"]
        for k, f in sorted(self.fits.items()):
            unit = "MAC/s" if k.startswith(("expert", "dense")) else "B/s"
            rate = f"{1 / f.beta:.3g} {unit}" if f.beta > 0 else "inf"
            lines.append(f"  {k:<14} {f.alpha * 1e6:>11.1f} {rate:>14} {f.r2:>8.4f} {f.num_points:>6}")
        return "\n".join(lines)


def profile_from_points(hardware: str, layout: str, points: dict[str, list[list[float]]],
                        meta: dict | None = None, overlap: float = 1.0) -> Profile:
    fits = {k: fit_linear([p[0] for p in v], [p[1] for p in v]) for k, v in points.items() if v}
    return Profile(hardware, layout, fits, {k: [list(map(float, p)) for p in v] for k, v in points.items()},
                   dict(meta or {}), overlap)


def refit(profile: Profile, samples: Iterable[tuple[str, float, float]], *, min_points: int = 4,
          keep_prior: bool = False) -> Profile:
    """Online profiling: refit from ``(key, n, seconds)`` samples the executor recorded.

    Samples of one size are reduced to their median, then the line is fitted through those, or,
    when it explains them better (sizes too close together to pin a slope, noise), the old line
    is kept and scaled by the median measured/predicted ratio (the contention of the real
    overlapped schedule, which an isolated microbenchmark cannot see). A key is refitted when it
    has at least ``min_points`` samples over two or more sizes (else its old fit is kept). With ``keep_prior`` the profile's own points join the new samples;
    by default the recorded ones replace them, since they include the contention of the real
    overlapped schedule that an isolated microbenchmark cannot see.
    """
    by_size: dict[str, dict[float, list[float]]] = {}
    for key, n, t in samples:
        if n > 0 and math.isfinite(t) and t > 0:
            by_size.setdefault(key, {}).setdefault(float(n), []).append(float(t))
    fits, points = dict(profile.fits), {k: list(v) for k, v in profile.points.items()}
    for key, sizes in by_size.items():
        # the median per size: one preempted run (a busy CPU, a late peer) must not tilt the line
        pts = [[n, float(np.median(ts))] for n, ts in sorted(sizes.items())]
        if sum(len(ts) for ts in sizes.values()) < min_points or len(pts) < 2:
            continue
        pts = (points.get(key, []) + pts) if keep_prior else pts
        line = fit_linear([p[0] for p in pts], [p[1] for p in pts])
        if key in fits:  # or keep the offline shape, scaled by the median measured/predicted ratio
            old = fits[key]
            ratio = float(np.median([p[1] / old(p[0]) for p in pts if old(p[0]) > 0] or [1.0]))
            scaled = dataclasses.replace(old.scaled(ratio), r2=line.r2, num_points=len(pts))
            err = lambda f: float(np.median([abs(f(p[0]) - p[1]) / p[1] for p in pts]))
            line = min((line, scaled), key=err)  # whichever explains the recorded times better
        fits[key] = line
        points[key] = pts
    meta = dict(profile.meta, refits=profile.meta.get("refits", 0) + 1)
    return Profile(profile.hardware, profile.layout, fits, points, meta, profile.overlap)
