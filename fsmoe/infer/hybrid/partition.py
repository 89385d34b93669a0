"""Where each routed expert's tokens are computed: the three classes and the split of one layer.

Classes (ScheInfer's): **GG** resident on the GPU and computed there; **CG** kept in host memory,
its weights streamed over PCIe for this forward and computed on the GPU; **CC** kept in host
memory and computed by the CPU (the expert's rows go to the host and its outputs come back).

Which experts are GG is fixed when the model is placed (:mod:`.residency`). Which of the others are
CG or CC is chosen per layer for every forward from that forward's token counts, by the lane model
below, so prefill (many tokens per expert: streaming pays) and decode (a few: the CPU does) need no
threshold, and a new batch size is re-planned by construction.

The lane model (seconds; ``LaneCosts`` are measured on the machine, :mod:`.hardware`), for one layer:

* CPU lane: the CC rows go to the host and back (``act``), then the CC experts, each with all
  cores: ``cpu_call + sum cpu(n_e)`` (the engine runs a decode step's CPU experts in one call of
  the native kernel, whose start is paid once);
* PCIe lane: the CG experts' weights one after another into two GPU buffers; the copy of the
  i-th waits for the (i-2)-th's compute to free its buffer (the engine streams chunks of up to
  ``chunk`` experts with one grouped GEMM each; the model charges each expert 1/chunk of the
  GEMM's fixed cost);
* GPU lane: the GG experts first (one grouped GEMM, while the first copy is in flight), then each
  CG expert once its weights have arrived.

The layer takes the longest lane. When both the CPU and the PCIe lanes have work they share the
host's memory bandwidth, so both run at their measured contended costs (``LaneCosts.busy``).
For a given number k of CG experts the PCIe lane costs the same whichever k are streamed, and the
CPU lane is shortest when they are the k busiest, so the search tries every k with the
busiest-first prefix (one pass, O(E log E)). It is exact whenever
the GPU lane does not bind; tests compare it with brute force.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

GG, CG, CC = 0, 1, 2
CLASS_NAMES = ("GG", "CG", "CC")


@dataclass(frozen=True)
class LaneCosts:
    """Measured seconds for one expert of one shape (:mod:`.hardware` fits them)."""

    cpu_fixed: float  # CC: one expert's MLP on the host, fixed part
    cpu_per_token: float
    gpu_fixed: float  # GG (one grouped call) or CG (one expert): the MLP on the GPU
    gpu_per_token: float
    stream: float  # CG: one expert's weights host -> device (pinned)
    act_fixed: float  # CC: the rows to the host and the outputs back, fixed part
    act_per_token: float
    chunk: int = 1  # CG experts per grouped GEMM in the engine (each pays 1/chunk of its fixed cost)
    # Both lanes read host memory: while CC and CG run together, each is this much slower.
    cpu_contended: float = 1.0
    stream_contended: float = 1.0
    # CC: once per layer and forward with CPU experts (they run in one call: its start and barrier)
    cpu_call: float = 0.0
    # CC: up to how many tokens per expert the native CPU kernel beat torch's GEMM when these costs
    # were measured (it computes those experts, torch's GEMM the busier ones); None: by its path
    cpu_kernel_tokens: int | None = None

    def busy(self) -> "LaneCosts":
        """The costs while the CPU and PCIe lanes run together."""
        c = self.cpu_contended
        return replace(self, cpu_fixed=self.cpu_fixed * c, cpu_per_token=self.cpu_per_token * c,
                       stream=self.stream * self.stream_contended)

    def cg(self, n: float) -> float:
        return self.gpu_fixed / self.chunk + self.gpu_per_token * n

    def cpu(self, n: float) -> float:
        return self.cpu_fixed + self.cpu_per_token * n

    def gpu(self, n: float) -> float:
        return self.gpu_fixed + self.gpu_per_token * n


@dataclass(frozen=True)
class Split:
    """One layer's choice for one forward: the class of every expert, and the lanes it predicts."""

    classes: tuple[int, ...]  # [E] GG / CG / CC (an expert without tokens: its placement's class)
    counts: tuple[int, ...]  # [E] tokens per expert this forward
    cg_order: tuple[int, ...]  # CG experts in streaming order (busiest first)
    cpu_s: float
    pcie_s: float
    gpu_s: float

    @property
    def predicted_s(self) -> float:
        return max(self.cpu_s, self.gpu_s)

    def count(self, cls: int) -> int:
        """Experts of class ``cls`` that have tokens this forward."""
        return sum(c == cls and n > 0 for c, n in zip(self.classes, self.counts))

    def active_classes(self) -> set[int]:
        return {c for c, n in zip(self.classes, self.counts) if n > 0}


class _GpuPipe:
    """The PCIe and GPU lanes as CG experts are appended (two weight buffers)."""

    def __init__(self, gg_s: float):
        self.copy_end, self.gpu_end, self.ends = 0.0, gg_s, []

    def push(self, costs: LaneCosts, n: int) -> None:
        free = self.ends[-2] if len(self.ends) >= 2 else 0.0
        self.copy_end = max(self.copy_end, free) + costs.stream
        self.gpu_end = max(self.copy_end, self.gpu_end) + (costs.cg(n) if n else 0.0)
        self.ends.append(self.gpu_end)


def _gg_seconds(counts_E: np.ndarray, resident_E: np.ndarray, costs: LaneCosts) -> float:
    n = int(counts_E[resident_E].sum())
    return costs.gpu(n) if n else 0.0


def _cpu_seconds(counts: list[int], costs: LaneCosts) -> float:
    if not counts:
        return 0.0
    return costs.act_fixed + costs.cpu_call + costs.act_per_token * sum(counts) + sum(costs.cpu(n) for n in counts)


def lanes(counts_E, classes, costs: LaneCosts, cg_order=None) -> tuple[float, float, float]:
    """(cpu_s, pcie_s, gpu_s) of running one layer with ``classes`` [E]. ``cg_order``: the experts
    streamed, in order (default: the CG experts with tokens, busiest first); an expert without
    tokens costs nothing unless ``cg_order`` lists it (then its copy is paid)."""
    counts_E = np.asarray(counts_E)
    classes = np.asarray(classes)
    if ((classes == CC) & (counts_E > 0)).any() and ((classes == CG) & (counts_E > 0)).any():
        costs = costs.busy()
    if cg_order is None:
        perm = np.argsort(-counts_E, kind="stable")
        cg = perm[((classes == CG) & (counts_E > 0))[perm]].tolist()
    else:
        cg = list(cg_order)
    pipe = _GpuPipe(_gg_seconds(counts_E, classes == GG, costs))
    for n in counts_E[cg].tolist():
        pipe.push(costs, n)
    cc = counts_E[(classes == CC) & (counts_E > 0)].tolist()
    return _cpu_seconds(cc, costs), pipe.copy_end, pipe.gpu_end


def _split(counts_E: np.ndarray, resident_E: np.ndarray, cg: list[int], costs: LaneCosts) -> Split:
    classes = np.where(resident_E, GG, CC)
    classes[cg] = CG
    cpu_s, pcie_s, gpu_s = lanes(counts_E, classes, costs, cg)
    return Split(tuple(classes.tolist()), tuple(counts_E.tolist()), tuple(cg), cpu_s, pcie_s, gpu_s)


def best_split(counts_E, resident_E, costs: LaneCosts) -> Split:
    """The adaptive choice: counts_E [E] tokens per expert this forward, resident_E [E] bool (GG).
    Tries k = 0..M CG experts (the k busiest non-resident ones) and keeps the fastest: plain Python
    over the experts that have tokens (it runs once per layer and forward, decode included)."""
    counts_E = np.asarray(counts_E, dtype=np.int64)
    resident_E = np.asarray(resident_E, dtype=bool)
    free = np.flatnonzero((counts_E > 0) & ~resident_E)
    order = free[np.argsort(-counts_E[free], kind="stable")].tolist()
    rest = counts_E[order].tolist()
    gg_n = int(counts_E[resident_E].sum())
    gg = costs.gpu(gg_n) if gg_n else 0.0
    busy = costs.busy()
    pipe, busy_pipe = _GpuPipe(gg), _GpuPipe(gg)  # the PCIe lane alone, and beside the CPU lane
    tail = sum(rest)  # tokens of the experts left on the CPU
    best = None
    for k in range(len(order) + 1):
        if k:
            pipe.push(costs, rest[k - 1])
            busy_pipe.push(busy, rest[k - 1])
            tail -= rest[k - 1]
        m = len(order) - k
        c, p = (busy, busy_pipe) if k and m else (costs, pipe)
        cpu = c.act_fixed + c.cpu_call + (c.act_per_token + c.cpu_per_token) * tail + c.cpu_fixed * m if m else 0.0
        t = max(cpu, p.gpu_end)
        if best is None or t < best[0] - 1e-12:
            best = (t, k, cpu, p.copy_end, p.gpu_end)
    _, k, cpu_s, pcie_s, gpu_s = best
    classes = np.where(resident_E, GG, CC)
    classes[order[:k]] = CG
    return Split(tuple(classes.tolist()), tuple(counts_E.tolist()), tuple(order[:k]), cpu_s, pcie_s, gpu_s)


def forced_split(counts_E, resident_E, costs: LaneCosts, cg_E, stream_idle: bool = False) -> Split:
    """The split where the non-resident experts marked in ``cg_E`` [E] bool are CG and the others CC
    (the fixed policies: all CC, all CG, a static set). ``stream_idle``: experts without tokens
    are streamed too (llama.cpp copies a layer's whole expert tensor)."""
    counts_E = np.asarray(counts_E, dtype=np.int64)
    resident_E = np.asarray(resident_E, dtype=bool)
    perm = np.argsort(-counts_E, kind="stable")
    streamed = np.asarray(cg_E, dtype=bool) & ~resident_E & (stream_idle | (counts_E > 0))
    return _split(counts_E, resident_E, perm[streamed[perm]].tolist(), costs)
