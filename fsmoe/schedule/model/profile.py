"""Profile: the fitted cost models the scheduler plans with, and the least-squares fits behind them.

Every op the scheduler places is modelled as ``t = alpha + n * beta`` (FSMoE §4, PipeMoE):

    key              n (the size the op is fitted over)          measured on
    a2a_inter        bytes sent by one rank (EP AlltoAll)         EP group spanning nodes
    a2a_intra        bytes sent by one rank                       a group inside one node
    a2a_level{i}     bytes sent by one rank                       ranks differing only at level i
                                                                  of the topology (hierarchical dispatch)
    allgather        bytes of the gathered output                 ESP group (intra-node)
    reducescatter    bytes of the (summed) input                  ESP group (intra-node)
    allreduce        bytes reduced                                DP group (gradients)
    expert_fwd       multiply-adds of the expert FFN (all GEMMs)  grouped GEMM + activation
    expert_bwd       multiply-adds of the *forward* FFN           grouped GEMM backward
    dense_fwd/bwd    multiply-adds of the attention block         attention block

**Shape-qualified keys.** A compute op's time per multiply-add depends on its shape (GEMM
efficiency, kernel launches per op), so one line over every shape fits none of them well. An op
may carry a qualified key ``base@tag`` (``expert_fwd@E2m128f256g3b4``: see
``perf_model.ExpertDims.tag`` and ``LayerSpec.dense_tag``): :meth:`Profile.t` uses that key's own
fit when it has one and the ``base`` fit otherwise; the profiler fits every shape it measures
under both, and :func:`refit` learns a qualified fit from the executor's records (starting from
the base fit as its prior) while also refitting the base key from the same samples.

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

from fsmoe.config import ConfigError


def qualified(key: str, tag: str) -> str:
    """``key@tag`` (or ``key`` when the tag is empty): a fit specific to one op shape."""
    return f"{key}@{tag}" if key and tag else key


def base_key(key: str) -> str:
    """``expert_fwd@tag`` -> ``expert_fwd``."""
    return key.split("@", 1)[0]


def _fallbacks(key: str) -> list[str]:
    """``a@b@c`` -> [``a@b@c``, ``a@b``, ``a``]."""
    parts = key.split("@")
    return ["@".join(parts[:i]) for i in range(len(parts), 0, -1)]


FIT_KEYS = ("a2a_inter", "a2a_intra", "allgather", "reducescatter", "allreduce",
            "expert_fwd", "expert_bwd", "dense_fwd", "dense_bwd")


@dataclass(frozen=True)
class LinearFit:
    """``t(n) = alpha + n * beta`` seconds; ``r2`` of the least-squares fit over ``num_points``.

    Piecewise where one line does not fit (NCCL switches protocol and algorithm with the message
    size): ``below`` holds the segments for smaller sizes, ``(n_from, alpha, beta)`` in increasing
    ``n_from``, each used from its ``n_from`` up to the next one's; ``alpha`` / ``beta`` are the
    segment of the largest sizes, from ``n_from`` = the last ``below`` segment's end. The
    planner's continuous model reads ``alpha`` / ``beta`` (the bandwidth regime); every time
    prediction goes through ``__call__``."""

    alpha: float
    beta: float
    r2: float = 1.0
    num_points: int = 0
    below: tuple = ()  # ((n_from, alpha, beta), ...) of the sizes below ``split``, increasing n_from
    split: float = 0.0  # the size from which alpha / beta hold (0: everywhere)

    def __call__(self, n):
        """Seconds at size ``n`` (a number or an array of sizes)."""
        t = self.alpha + n * self.beta
        if not self.below:
            return t
        ends = [s[0] for s in self.below[1:]] + [self.split]
        for (n_from, a, b), n_to in zip(self.below, ends):
            inside = (n >= n_from) & (n < n_to) if n_from > 0 else (n < n_to)
            t = np.where(inside, a + n * b, t)
        return t if isinstance(n, np.ndarray) else float(t)

    def scaled(self, factor: float) -> "LinearFit":
        return dataclasses.replace(self, alpha=self.alpha * factor, beta=self.beta * factor,
                                   below=tuple((n0, a * factor, b * factor) for n0, a, b in self.below))


def fit_linear(sizes: Iterable[float], times: Iterable[float]) -> LinearFit:
    """Least squares with an intercept. ``alpha`` is clamped at 0 (a negative latency is a fit
    artefact: the line is then refitted through the origin) and so is ``beta`` (a falling line
    is noise: the mean time, flat); R² is of the returned line."""
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
        elif beta < 0:  # a falling line is noise (time cannot shrink with size): flat at the mean
            alpha, beta = float(t.mean()), 0.0
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
    # ((AlltoAll bytes, eta), ...) in increasing bytes where the profiler measured eta per size;
    # ``overlap_at`` interpolates them (empty: ``overlap`` at every size)
    overlap_points: tuple = ()

    def t(self, key: str, n: float) -> float:
        """Predicted seconds of op ``key`` at size ``n`` (0 for a zero-size op). A qualified key
        ``base@tag`` without a fit of its own uses the ``base`` fit (see ``fit_for``)."""
        if n <= 0:
            return 0.0
        return self.fit_for(key)(n)

    def fit_for(self, key: str) -> LinearFit:
        """The fit that predicts ``key``: its own, else that of the key less its last ``@tag``, and
        so on down to the base key (``dense_fwd@shape@first`` -> ``dense_fwd@shape`` ->
        ``dense_fwd``); KeyError naming the base."""
        fit = next((self.fits[k] for k in _fallbacks(key) if k in self.fits), None)
        if fit is None:
            raise KeyError(f"profile {self.hardware}/{self.layout} has no fit for {base_key(key)!r}; "
                           f"it has {sorted(k for k in self.fits if '@' not in k)} (run `fsmoe profile`)")
        return fit

    def has(self, key: str) -> bool:
        return any(k in self.fits for k in _fallbacks(key))

    def overlap_at(self, nbytes: float) -> float:
        """eta for an AlltoAll of ``nbytes`` beside compute: linear in log(bytes) between the
        measured sizes, the nearest measurement outside them; ``overlap`` where none was measured
        per size. (NCCL's overlap changes with the message: its kernels' SM share and protocol.)"""
        pts = self.overlap_points
        if not pts or nbytes <= 0:
            return self.overlap
        if nbytes <= pts[0][0]:
            return pts[0][1]
        for (n0, e0), (n1, e1) in zip(pts, pts[1:]):
            if nbytes <= n1:
                w = (math.log(nbytes) - math.log(n0)) / (math.log(n1) - math.log(n0))
                return e0 + w * (e1 - e0)
        return pts[-1][1]

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        out = {"hardware": self.hardware, "layout": self.layout, "overlap": self.overlap,
               "fits": {k: dataclasses.asdict(v) for k, v in sorted(self.fits.items())},
               "points": self.points, "meta": self.meta}
        if self.overlap_points:
            out["overlap_points"] = [list(p) for p in self.overlap_points]
        return out

    @staticmethod
    def from_dict(d: dict, source: str = "profile") -> "Profile":
        """Checked: a field that is missing or out of range raises a ConfigError naming it."""
        if not isinstance(d, dict):
            raise ConfigError(source, type(d).__name__, "a JSON object written by `fsmoe profile`")
        for name in ("hardware", "layout", "fits"):
            if name not in d:
                raise ConfigError(f"{source}.{name}", None, "missing: not a Profile written by `fsmoe profile`")
        if not isinstance(d["fits"], dict):
            raise ConfigError(f"{source}.fits", d["fits"], "an object {key: {alpha, beta, r2, num_points}}")
        fits = {}
        for key, v in d["fits"].items():
            for name in ("alpha", "beta"):
                x = v.get(name) if isinstance(v, dict) else None
                if not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
                    raise ConfigError(f"{source}.fits.{key}.{name}", x,
                                      "a finite number >= 0 (seconds, per unit of n); measure again with `fsmoe profile`")
            fits[key] = LinearFit(**{k: v[k] for k in ("alpha", "beta", "r2", "num_points", "split") if k in v},
                                  below=_segments(v.get("below", ()), f"{source}.fits.{key}.below"))
        overlap = d.get("overlap", 1.0)
        if not isinstance(overlap, (int, float)) or not 0.0 <= overlap <= 1.0:
            raise ConfigError(f"{source}.overlap", overlap, "a number in [0, 1] (the measured overlap efficiency)")
        return Profile(d["hardware"], d["layout"], fits, d.get("points", {}), d.get("meta", {}), float(overlap),
                       _overlap_points(d.get("overlap_points", []), f"{source}.overlap_points"))

    def require(self, layout) -> None:
        """The fits a plan on ``layout`` (a ``Layout``) cannot do without; a ConfigError
        naming the missing ones otherwise (the gradient AllReduce and attention are optional)."""
        need = ["expert_fwd", "expert_bwd"]
        need += [layout.a2a_key] if layout.ep > 1 else []
        need += ["allgather", "reducescatter"] if layout.esp > 1 else []
        missing = [k for k in need if not self.has(k)]
        if missing:
            raise ConfigError("profile", f"{self.hardware}/{self.layout}",
                              f"has no fit for {missing}, which layout {layout.name} needs; it has "
                              f"{sorted(k for k in self.fits if '@' not in k)}. Profile that layout: "
                              f"`fsmoe profile --nproc N --ep {layout.ep} --esp {layout.esp} --out PATH`")

    def layout_note(self, layout) -> str | None:
        """A warning when the profile was measured on another layout (None if it is the same)."""
        if self.layout == layout.name:
            return None
        return (f"warning: profile measured on layout {self.layout}, planning for {layout.name}: its "
                f"collective fits may not transfer (profile this layout with `fsmoe profile`)")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @staticmethod
    def load(path: str | Path, field: str = "profile") -> "Profile":
        """``field``: the name bad input is reported under (e.g. ``parallel.profile``)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(field, str(path), "no such file; write one with `fsmoe profile --out PATH`")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(field, str(path), f"not a JSON file ({e})") from None
        return Profile.from_dict(d, source=f"{path}: profile")

    def summary(self) -> str:
        n_shape = sum("@" in k for k in self.fits)
        per_size = ("; by AlltoAll size: " + ", ".join(f"{n / 2**20:.3g} MiB {e:.2f}" for n, e in self.overlap_points)
                    if self.overlap_points else "")
        lines = [f"profile {self.hardware} / {self.layout}; comm/compute overlap efficiency {self.overlap:.2f}{per_size}",
                 f"  {'op':<14} {'alpha (us)':>11} {'1/beta':>14} {'R^2':>8} {'points':>6}"]
        for k, f in sorted(self.fits.items()):
            if "@" in k:
                continue
            unit = ("MAC/s" if k.startswith(("expert", "dense", "head")) else "tok/s" if k.startswith("glue")
                    else "param/s" if k == "optimizer" else "B/s")
            rate = f"{1 / f.beta:.3g} {unit}" if f.beta > 0 else "inf"
            knot = f"  (piecewise: another line below n={f.split:.3g})" if f.below else ""
            lines.append(f"  {k:<14} {f.alpha * 1e6:>11.1f} {rate:>14} {f.r2:>8.4f} {f.num_points:>6}{knot}")
        if n_shape:
            lines.append(f"  + {n_shape} shape-specific fits (key@shape)")
        return "\n".join(lines)


COMM_KEYS = ("a2a", "allgather", "reducescatter", "allreduce", "hier")  # fits that may need a knot


def fit_piecewise(sizes: Iterable[float], times: Iterable[float], max_rel_error: float = 0.2,
                  min_per_segment: int = 2) -> LinearFit:
    """One line (``fit_linear``) if it predicts every point within ``max_rel_error``; else the
    best two lines split at one size (every split between distinct sizes with ``min_per_segment``
    sizes on each side; the least worst relative error), kept only if that error is smaller.
    For collectives whose protocol switches with size (NCCL: LL -> LL128 -> Simple; ring vs tree):
    there a single least-squares line follows the large messages (R² near 1) and misses the
    small ones by 50% or more."""
    n = np.asarray(list(sizes), dtype=float)
    t = np.asarray(list(times), dtype=float)
    one = fit_linear(n, t)
    worst = lambda pred: float(np.max(np.abs(pred - t) / np.maximum(t, 1e-30)))
    distinct = np.unique(n)
    one_err = worst(one(n))
    if one_err <= max_rel_error or distinct.size < 2 * min_per_segment:
        return one
    best = None
    for cut in distinct[min_per_segment:distinct.size - min_per_segment + 1]:
        lo = n < cut
        f_lo, f_hi = fit_linear(n[lo], t[lo]), fit_linear(n[~lo], t[~lo])
        pred = np.where(lo, f_lo(n), f_hi(n))
        err = worst(pred)
        if best is None or err < best[0]:
            best = (err, float(cut), f_lo, f_hi, pred)
    err, cut, f_lo, f_hi, pred = best
    if err >= one_err:
        return one
    ss_tot = float(((t - t.mean()) ** 2).sum())
    r2 = 1.0 - float(((t - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    return LinearFit(f_hi.alpha, f_hi.beta, r2, int(n.size), below=((0.0, f_lo.alpha, f_lo.beta),), split=cut)


def _overlap_points(raw, field_name: str) -> tuple:
    """Per-size overlap efficiencies from JSON, checked: [[bytes > 0, eta in [0, 1]], ...]."""
    try:
        pts = tuple(sorted((float(n), float(e)) for n, e in raw))
    except (TypeError, ValueError):
        raise ConfigError(field_name, raw, "a list of [bytes, eta] pairs") from None
    if any(not (math.isfinite(n) and n > 0 and 0.0 <= e <= 1.0) for n, e in pts):
        raise ConfigError(field_name, raw, "pairs of bytes > 0 and eta in [0, 1]")
    return pts


def _segments(raw, field_name: str) -> tuple:
    """A piecewise fit's ``below`` segments from JSON, checked."""
    try:
        segs = tuple((float(a), float(b), float(c)) for a, b, c in raw)
    except (TypeError, ValueError):
        raise ConfigError(field_name, raw, "a list of [n_from, alpha, beta] triples") from None
    if any(not all(map(math.isfinite, s)) or min(s) < 0 for s in segs):
        raise ConfigError(field_name, raw, "finite numbers >= 0 ([n_from, alpha, beta] per segment)")
    return segs


def profile_from_points(hardware: str, layout: str, points: dict[str, list[list[float]]],
                        meta: dict | None = None, overlap: float = 1.0, overlap_points: tuple = ()) -> Profile:
    """Fits of measured points: comm keys piecewise where one line does not fit (``fit_piecewise``)."""
    fit = lambda k: fit_piecewise if k.startswith(COMM_KEYS) else fit_linear
    fits = {k: fit(k)([p[0] for p in v], [p[1] for p in v]) for k, v in points.items() if v}
    return Profile(hardware, layout, fits, {k: [list(map(float, p)) for p in v] for k, v in points.items()},
                   dict(meta or {}), overlap, tuple(sorted(overlap_points)))


def binned_medians(sizes: dict[float, list[float]], max_bins: int = 8) -> list[list[float]]:
    """``[median n, median seconds]`` of at most ``max_bins`` bins of neighbouring sizes, each
    bin holding about the same number of samples (a size is never split between bins).

    In training most sizes occur once (the combine AlltoAll's received rows, the padded
    AllGather and the expert rows follow the routing of each step), so a "median per size" is
    one raw timing, and one preempted run on a shared core sets a point; pooling neighbouring
    sizes gives every point a real median."""
    order = sorted(sizes)
    total = sum(len(sizes[n]) for n in order)
    k = max(1, min(max_bins, len(order)))
    bins: dict[int, list[tuple[float, float]]] = {}
    seen = 0
    for n in order:
        bins.setdefault(min(k - 1, seen * k // total), []).extend((n, t) for t in sizes[n])
        seen += len(sizes[n])
    return [[float(np.median([n for n, _ in b])), float(np.median([t for _, t in b]))]
            for _, b in sorted(bins.items())]


def median_log_error(fit: "LinearFit", samples: list[tuple[float, float]]) -> float:
    """Median over samples ``(n, seconds)`` of |log(fit(n) / seconds)|: symmetric, unlike
    |fit - t| / t, which caps an under-prediction at 1 and so, minimised over noisy
    heavy-tailed timings, prefers fits that predict too little."""
    return float(np.median([abs(math.log(max(fit(n), 1e-12) / t)) for n, t in samples]))


def _by_key_and_size(samples: Iterable[tuple[str, float, float]]) -> dict[str, dict[float, list[float]]]:
    """key -> size -> seconds; a qualified key ``base@tag`` counts for ``base`` too."""
    by_size: dict[str, dict[float, list[float]]] = {}
    for key, n, t in samples:
        if n > 0 and math.isfinite(t) and t > 0:
            for k in {key, base_key(key)}:
                by_size.setdefault(k, {}).setdefault(float(n), []).append(float(t))
    return by_size


def refit(profile: Profile, samples: Iterable[tuple[str, float, float]], *, min_points: int = 4,
          keep_prior: bool = False, max_bins: int = 8,
          holdout: Iterable[tuple[str, float, float]] | None = None) -> Profile:
    """Online profiling: refit from ``(key, n, seconds)`` samples the executor recorded.

    Per key, three candidates: a line fitted through the medians of up to ``max_bins`` bins of
    neighbouring sizes (:func:`binned_medians`), the old line scaled by the median
    measured/predicted ratio (the contention of the real overlapped schedule, which an isolated
    microbenchmark cannot see), and the old line unchanged. The one with the smallest median
    error over the *samples* (every recorded op counts once, as in the error metric)
    is kept (error: :func:`median_log_error`), so a refit never fits the records it was given
    worse than the fit it replaces.
    A key needs ``min_points`` samples; a line needs two or more sizes (one size: only the
    scaled fit is tried; a line with a slope <= 0 is noise and is not). A key the profile lacks
    is fitted from scratch (one size: through the origin). With ``keep_prior``
    the profile's own points join the bin medians of the line fit. With ``holdout`` samples (of
    later steps than ``samples``) each key's candidates are scored on its held-out samples where it
    has any: the fit kept then never predicts the held-out steps worse than the one it replaces.
    A qualified sample ``base@tag`` counts for its own key and for ``base``; a qualified key the
    profile has no fit for starts from its nearest fallback's fit (``fit_for``) (so one size, e.g. an attention block of a
    fixed shape, still gets its scaled fit).
    """
    by_size = _by_key_and_size(samples)
    held = {k: [(n, t) for n, ts in sizes.items() for t in ts] for k, sizes in _by_key_and_size(holdout or ()).items()}
    fits, points = dict(profile.fits), {k: list(v) for k, v in profile.points.items()}
    for key in sorted(by_size, key=lambda k: k.count("@")):  # less qualified keys first: they are the priors
        sizes = by_size[key]
        flat = [(n, t) for n, ts in sizes.items() for t in ts]
        prior = next((fits[k] for k in _fallbacks(key) if k in fits), None)
        if len(flat) < min_points:
            continue
        pts = binned_medians(sizes, max_bins)
        line_pts = (points.get(key, []) + pts) if keep_prior else pts
        cands = []
        # one size: no slope to learn, unless nothing else is known (then a line through the origin)
        line = fit_linear([p[0] for p in line_pts], [p[1] for p in line_pts]) if len(sizes) >= 2 or prior is None \
            else None
        if line is not None and line.beta > 0:  # a falling line is noise; it would mislead the planner
            cands.append(line)
        if prior is not None:
            ratio = float(np.median([t / prior(n) for n, t in flat if prior(n) > 0] or [1.0]))
            cands += [dataclasses.replace(prior.scaled(ratio), num_points=len(pts)), prior]
        if not cands:
            continue
        best = min(cands, key=lambda f: median_log_error(f, held.get(key) or flat))
        if best is not fits.get(key):
            fits[key], points[key] = best, pts
    meta = dict(profile.meta, refits=profile.meta.get("refits", 0) + 1)
    return Profile(profile.hardware, profile.layout, fits, points, meta, profile.overlap, profile.overlap_points)
