"""Routing traffic: the source-rank x expert token matrix per step and MoE layer, windowed, and
the routing trace file that stores it.

Shape legend: M MoE layers, R source ranks (the world: every rank routes its own tokens), E
logical experts, W steps in the window, N steps in a trace.

:class:`TrafficWindow` keeps this rank's last W steps of ``[M, E]`` counts on its device (no
host sync, no communication per step). When a policy needs them, :func:`gather_traffic`
all-gathers the window's sum over the world: ``[M, R, E]`` (one collective per rebalance).

Routing trace (``fsmoe train --trace``; ``routing_trace.jsonl.gz`` in the run directory): gzip
of JSON lines. Line 1 is the header::

    {"format": "fsmoe-routing-trace", "version": 1, "num_layers": M, "num_experts": E,
     "sources": R, "source_ep_rank": [EP rank of each source], "ep": P, "top_k": k,
     "tokens_per_step": global tokens per step, "run": name}

then one line per step: ``{"step": s, "counts": [M][R][E], "step_s": seconds, "ops": {...},
"choices": [M][S][k], "phases": {...}}`` — rows that source rank r routed to expert e in MoE
layer m at step s (assignments, k per token; dropped ones excluded), and the wall time since the previous line was
written (one training step: the trace's per-step gather keeps the ranks in step; absent on a
file's first line and in older traces), rank 0's op timings of the step (fsmoe.op_clock:
``{"forward": [M][O + 1], "backward": [M][O + 1]}`` seconds of route, dispatch, experts,
combine, unroute and the whole layer), the experts each of rank 0's first S tokens chose
together in every MoE layer (:class:`ChoiceSampler`; E marks a dropped choice; absent for routers
without per-token choices and in older traces), and rank 0's step phases (``"phases":
{"forward": s, "backward": s, "grad_sync": s, "optimizer": s}``, fsmoe.op_clock.StepClock).
:func:`read_trace` returns it as a :class:`RoutingTrace` with ``counts_NMRE``, ``step_s``,
``ops_NMO`` (NaN where absent), ``choices_NMSK`` and ``phases_N``.
"""
from __future__ import annotations

import gzip
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from fsmoe.comm.functional import all_gather_base

TRACE_FILE = "routing_trace.jsonl.gz"
TRACE_FORMAT = "fsmoe-routing-trace"


class TrafficWindow:
    """This rank's per-step ``[M, E]`` counts over the last ``window`` steps (a ring on the device)."""

    def __init__(self, num_layers: int, num_experts: int, window: int, device: torch.device):
        if window < 1:
            raise ValueError(f"traffic window must be >= 1 step, got {window}")
        self.ring_WME = torch.zeros(window, num_layers, num_experts, dtype=torch.int64, device=device)
        self.steps = 0

    def record(self, counts_ME: Tensor) -> None:
        """Add one step's counts of this rank (``[M, E]`` int, on any device)."""
        self.ring_WME[self.steps % self.ring_WME.shape[0]] = counts_ME.to(self.ring_WME)
        self.steps += 1

    def sum_ME(self) -> Tensor:
        """[M, E]: this rank's counts summed over the window."""
        return self.ring_WME.sum(0)


class LoadPredictor:
    """The load a rebalance plans from: an exponential moving average over windows,
    ``pred = alpha * window + (1 - alpha) * pred`` (``alpha`` = 1: the last window alone)."""

    def __init__(self, alpha: float = 1.0):
        if not 0 < alpha <= 1:
            raise ValueError(f"LoadPredictor: alpha must be in (0, 1], got {alpha}")
        self.alpha, self.pred = alpha, None

    def update(self, load: np.ndarray) -> np.ndarray:
        load = np.asarray(load, dtype=np.float64)
        self.pred = load if self.pred is None else self.alpha * load + (1 - self.alpha) * self.pred
        return self.pred


def gather_traffic(counts_ME: Tensor, group=None) -> np.ndarray:
    """All-gather every rank's ``[M, E]`` counts over ``group`` (the world) -> ``[M, R, E]`` int64
    on the host. Collective; one process returns its own counts as R = 1."""
    c = counts_ME.to(torch.int64).contiguous()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        R = dist.get_world_size(group)
        out = c.new_empty((R * c.shape[0], *c.shape[1:]))  # concatenated along dim 0 (gloo wants that)
        all_gather_base(out, c, group=group)
        c = out.view(R, *c.shape)
    else:
        c = c.unsqueeze(0)
    return c.cpu().numpy().transpose(1, 0, 2).copy()


# ---------------------------------------------------------------------------- trace file


@dataclass(frozen=True)
class RoutingTrace:
    """header: the trace's first line (see module docstring); steps [N]; counts_NMRE [N, M, R, E]."""

    header: dict
    steps: np.ndarray
    counts_NMRE: np.ndarray
    step_s: np.ndarray | None = None  # [N] seconds of each step (NaN where not recorded)
    ops_NMO: dict[str, np.ndarray] | None = None  # phase -> [N, M, O + 1] op seconds (fsmoe.op_clock)
    choices_NMSK: np.ndarray | None = None  # [N', M, S, k] the steps that sampled tokens' choices
    phases_N: dict[str, np.ndarray] | None = None  # phase -> [N] seconds of rank 0's step phases (NaN where absent)

    def load_ME(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """[M, E] rows per expert summed over sources and the steps ``[start, stop)`` (indices)."""
        return self.counts_NMRE[start:stop].sum(axis=(0, 2))


CHOICE_SAMPLE = 32  # tokens per layer and step whose expert choices the trace keeps


class ChoiceSampler:
    """Which experts the first ``tokens`` tokens of each forward chose together, per MoE layer of
    ``layers`` (token-choice routers: the plan's per-token rows). ``collect()`` returns the last
    training forward's ``[M][S][k]`` ids (one device-to-host copy; None when a layer's router has
    no per-token choices or none was seen) and starts the next step. Counts alone lose this:
    HierMoE's dedup sends a token once per server however many of its k experts are there."""

    def __init__(self, layers, tokens: int = CHOICE_SAMPLE):
        self.tokens = tokens
        self.latest: list[Tensor | None] = [None] * len(layers)
        self._handles = [layer.observe_plan(self._observer(i)) for i, layer in enumerate(layers)]

    def _observer(self, i: int):
        def see(layer, plan) -> None:
            if layer.training and plan.token_slots_TK is not None:
                rows_SK = plan.token_slots_TK[:self.tokens]
                self.latest[i] = plan.expert_ids_N.detach()[rows_SK]
        return see

    def collect(self) -> list | None:
        got, self.latest = self.latest, [None] * len(self.latest)
        if any(t is None for t in got) or not got:
            return None
        return torch.stack(got).cpu().tolist()

    def close(self) -> None:
        for h in self._handles:
            h.remove()


class TraceWriter:
    """Appends one line per step to ``path`` (gzip); writes the header when it creates the file."""

    def __init__(self, path: Path, header: dict):
        self.path = Path(path)
        new = not self.path.exists()
        self.file = gzip.open(self.path, "at", encoding="utf-8")
        self._last: float | None = None
        if new:
            self.file.write(json.dumps({"format": TRACE_FORMAT, "version": 1, **header}) + "\n")

    def write(self, step: int, counts_MRE: np.ndarray, ops: dict | None = None, choices: list | None = None,
              phases: dict | None = None) -> None:
        now = time.perf_counter()
        rec = {"step": int(step), "counts": np.asarray(counts_MRE).tolist()}
        if self._last is not None:
            rec["step_s"] = now - self._last
        if ops is not None:
            rec["ops"] = ops
        if choices is not None:
            rec["choices"] = choices
        if phases is not None:
            rec["phases"] = phases
        self._last = now
        self.file.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        self.file.close()


def read_trace(path: Path | str) -> RoutingTrace:
    """A routing trace (see module docstring); a torn last line (a crash mid-write) is skipped."""
    lines = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                lines.append(line)
    except EOFError:  # the last gzip member was cut short
        pass
    if not lines:
        raise ValueError(f"{path}: empty routing trace")
    header = json.loads(lines[0])
    if header.get("format") != TRACE_FORMAT:
        raise ValueError(f"{path}: not a routing trace (format={header.get('format')!r}, expected {TRACE_FORMAT!r})")
    steps, counts, secs, ops, choices, phases = [], [], [], [], [], []
    for line in lines[1:]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        steps.append(rec["step"])
        counts.append(rec["counts"])
        secs.append(rec.get("step_s", float("nan")))
        ops.append(rec.get("ops"))
        if rec.get("choices"):
            choices.append(rec["choices"])
        phases.append(rec.get("phases") or {})
    shape = (0, header["num_layers"], header["sources"], header["num_experts"])
    arr = np.asarray(counts, dtype=np.int64) if counts else np.zeros(shape, dtype=np.int64)
    return RoutingTrace(header, np.asarray(steps, dtype=np.int64), arr, np.asarray(secs, dtype=np.float64),
                        _op_arrays(ops, header["num_layers"]), _choices(choices), _phase_arrays(phases))


def _phase_arrays(per_step: list[dict]) -> dict[str, np.ndarray] | None:
    """phase -> [N] seconds (NaN on the lines without it), or None when no line has phases."""
    names = list(dict.fromkeys(k for rec in per_step for k in rec))
    if not names:
        return None
    return {k: np.asarray([rec.get(k, float("nan")) for rec in per_step], dtype=np.float64) for k in names}


def _choices(per_step: list) -> np.ndarray | None:
    """[N', M, S, k] from the lines that sampled choices (the sample size may differ per step: the
    smallest is kept)."""
    if not per_step:
        return None
    S = min(len(layer) for step in per_step for layer in step)
    return np.asarray([[layer[:S] for layer in step] for step in per_step], dtype=np.int64)


def _op_arrays(ops: list[dict | None], layers: int) -> dict[str, np.ndarray] | None:
    """phase -> [N, M, O + 1] seconds from the lines' ``ops`` (NaN rows where a line has none)."""
    known = [o for o in ops if o]
    if not known:
        return None
    width = len(known[0]["forward"][0])
    blank = [[float("nan")] * width for _ in range(layers)]
    return {phase: np.asarray([o[phase] if o else blank for o in ops], dtype=np.float64)
            for phase in known[0]}
