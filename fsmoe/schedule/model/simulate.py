"""Predicted timelines: the executor's own program run on a ``SimEngine``.

``simulate_iteration`` predicts one training iteration of ``spec.n_layers`` identical blocks
(attention + MoE) on one rank: forward (dense, MoE pipeline at r_fwd) for every block, then the
backward in reverse (MoE pipeline at r_bwd with the gradient-partition windows, dense backward,
block ready for the Gradient-AllReduce), then ``GarSchedule.finish``. Op times come from the
Profile; row counts from ``counts_SE`` (balanced routing by default) cut exactly as the executor
cuts them. ``simulate_layer`` is the same for one MoE layer in one direction. With a measured
overlap efficiency eta < 1 (``Profile.overlap_at`` the chunk's AlltoAll size) the times are
eta * timeline + (1 - eta) * the sum of the op times (the records stay the fully overlapped
timeline).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fsmoe.schedule.model.engine import SimEngine
from fsmoe.schedule.model.gar import GarSchedule
from fsmoe.schedule.model.perf_model import ExpertDims, balanced_counts, route_work
from fsmoe.schedule.model.profile import Profile, qualified
from fsmoe.schedule.model.program import StageFns, chunk_ops, counts_op, run_pipeline
from fsmoe.schedule.types import GarPlan, HOST, Lanes, LayerSpec, Layout, Op, OpRecord


@dataclass(frozen=True)
class SimResult:
    records: tuple[OpRecord, ...]
    fwd_s: float  # end of the forward
    iter_s: float  # end of the iteration (after the last gradient AllReduce)

    @property
    def bwd_s(self) -> float:
        return self.iter_s - self.fwd_s

    def phase_span(self, phase: str, kind_prefix: str = "") -> float:
        recs = [r for r in self.records if r.op.phase == phase and r.op.kind.startswith(kind_prefix)]
        return max(r.t1 for r in recs) - min(r.t0 for r in recs) if recs else 0.0


def dense_op(spec: LayerSpec, phase: str, layer: int) -> Op:
    """A block's attention, forward or backward, keyed by its shape, sized in forward MACs. The
    first block's forward has a fit of its own (``...@first``, falling back to the shape's): it
    starts the iteration with an empty launch queue, so on a GPU its span holds the host issuing
    its kernels (measured on H200: 19% above the shape's fit, the second block 21% below)."""
    key = qualified(f"dense_{phase}", spec.dense_tag)
    if phase == "fwd" and layer == 0:
        key = qualified(key, "first")
    return Op("dense", phase, layer, 0, key, spec.dense_macs)


def glue_op(spec: LayerSpec, phase: str, layer: int, kind: str = "glue") -> Op:
    """A block's unscheduled host work (``timeline.with_glue``); ``kind="block"`` is the measured
    span it is derived from."""
    return Op(kind, phase, layer, 0, qualified(f"glue_{phase}", spec.glue_tag), spec.tokens)


def record_block_ops(block, attn, spec: LayerSpec, layer: int, recorder, device) -> list:
    """Hooks timing a block (host lane, for its glue) and its attention (compute lane)."""
    return (recorder.time_module(attn, dense_op(spec, "fwd", layer), dense_op(spec, "bwd", layer), "compute", device)
            + recorder.time_module(block, glue_op(spec, "fwd", layer, "block"), glue_op(spec, "bwd", layer, "block"),
                                   HOST, device))


def simulate_layer(spec: LayerSpec, layout: Layout, profile: Profile, r: int, *, backward: bool = False,
                   iio: bool = True, counts_SE: np.ndarray | None = None, rank: int = 0,
                   gar_bytes: float = 0.0) -> float:
    """Seconds of one MoE layer's pipeline in one direction (with an AllReduce of ``gar_bytes``
    queued in its window when backward)."""
    eng = SimEngine.from_profile(profile, rank)
    C = balanced_counts(spec, layout) if counts_SE is None else counts_SE
    phase = "bwd" if backward else "fwd"
    ops = chunk_ops(route_work(C, r, layout, rank), ExpertDims.of(spec, layout), layout, phase, 0)
    lanes = Lanes.of(iio)

    def window(e, slot, rr):
        if slot == "mid" and gar_bytes > 0 and layout.dp > 1:
            e.launch(lanes.inter, Op("allreduce", "bwd", 0, 0, "allreduce", gar_bytes), None)

    for h in run_pipeline(eng, lanes, ops, layout.esp, StageFns(), None, [None] * r, window):
        eng.wait(h)
    return _blend(profile.overlap_at(ops[0].dispatch.n), eng.drain(), eng.recorder.records)


def simulate_iteration(spec: LayerSpec, layout: Layout, profile: Profile, r_fwd: int, r_bwd: int, iio: bool,
                       gar: GarPlan, *, counts_SE: np.ndarray | None = None, rank: int = 0) -> SimResult:
    eng = SimEngine.from_profile(profile, rank)
    C = balanced_counts(spec, layout) if counts_SE is None else counts_SE
    dims = ExpertDims.of(spec, layout)
    lanes = Lanes.of(iio)
    gs = GarSchedule([spec.dense_params] * spec.n_layers, gar, eng, lanes, elem_bytes=spec.grad_bytes, dp=layout.dp)
    works_f, works_b = route_work(C, r_fwd, layout, rank), route_work(C, r_bwd, layout, rank)
    for layer in range(spec.n_layers):  # ops without a fit (no glue before an online refit) take 0
        eng.compute(dense_op(spec, "fwd", layer), None)
        eng.compute(glue_op(spec, "fwd", layer), None)
        eng.wait(eng.launch(lanes.inter, counts_op(layout, spec.num_experts, layer), None))
        ops = chunk_ops(works_f, dims, layout, "fwd", layer)
        for h in run_pipeline(eng, lanes, ops, layout.esp, StageFns(), None, [None] * r_fwd):
            eng.wait(h)
    fwd_end = eng.host
    for layer in reversed(range(spec.n_layers)):
        ops = chunk_ops(works_b, dims, layout, "bwd", layer)
        window = lambda e, slot, r, layer=layer: gs.window(e, layer, slot, r)
        for h in run_pipeline(eng, lanes, ops, layout.esp, StageFns(), None, [None] * r_bwd, window):
            eng.wait(h)
        eng.compute(glue_op(spec, "bwd", layer), None)
        eng.compute(dense_op(spec, "bwd", layer), None)
        gs.on_block_ready(layer)
    gs.finish()
    recs = eng.recorder.records
    # eta at each direction's chunk size; the iteration's blend takes their mean
    eta_f, eta_b = (profile.overlap_at(chunk_ops(w, dims, layout, "fwd", 0)[0].dispatch.n)
                    for w in (works_f, works_b))
    return SimResult(tuple(recs), _blend(eta_f, fwd_end, [r for r in recs if r.op.phase == "fwd"]),
                     _blend((eta_f + eta_b) / 2, eng.drain(), recs))


def _blend(eta: float, overlapped: float, records) -> float:
    """eta * (the timeline's end) + (1 - eta) * (every op back to back): see perf_model."""
    if eta >= 1.0:
        return overlapped
    return eta * overlapped + (1.0 - eta) * sum(r.t1 - r.t0 for r in records)
