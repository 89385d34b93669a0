"""Per-layer op timings of training steps, read at the MoE layer's hook points.

The MoE layer marks six points (fsmoe.layer.HOOK_POINTS); the spans between consecutive points
are its ops, forward and backward:

    route     layer_start -> before_dispatch    the router and the order's permutation
    dispatch  before_dispatch -> after_dispatch  the AlltoAll / AllGather to the experts' ranks
    experts   after_dispatch -> before_combine  the expert GEMMs
    combine   before_combine -> after_combine    the way back
    unroute   after_combine -> layer_end         unpermutation, weighting and the shared experts

In backward the same spans are timed as the gradients reach the points in reverse (a hook on the
tensor at each point). On CUDA every mark is an event on the current stream, read after the
step; on the CPU a clock read. Marks made while a checkpointed block is recomputed are ignored.

A pipelined executor (fsmoe.schedule) runs dispatch, experts and combine chunk by chunk, so its
inner spans are not one op each: for such layers only the whole layer is timed
(``route`` .. ``unroute`` are then NaN and ``layer`` holds the span).

Shapes: M MoE layers, O ops (``OPS``), per phase ``[M, O + 1]`` seconds (the last column: the
whole layer, layer_start -> layer_end).
"""
from __future__ import annotations

import time
import torch
from torch import Tensor

from fsmoe.layer import HOOK_POINTS, MoELayer, sequential
from fsmoe.recompute import recomputing

OPS = ("route", "dispatch", "experts", "combine", "unroute")
PHASES = ("forward", "backward")


class OpClock:
    """Times every MoE layer of ``layers`` at its hook points (see the module docstring).
    ``collect()`` returns the step's ``{"forward": [M][O + 1], "backward": [M][O + 1]}`` seconds
    and starts the next step. ``close()`` removes the hooks."""

    def __init__(self, layers: list[MoELayer], device: torch.device):
        self.layers, self.cuda = layers, device.type == "cuda"
        self._stamps: dict[tuple[int, str, str], object] = {}  # (layer, phase, point) -> first stamp
        self._handles = [layer.register_hook(point, self._hook(i, point))
                         for i, layer in enumerate(layers) for point in HOOK_POINTS]

    def _hook(self, i: int, point: str):
        def mark(layer: MoELayer, t: Tensor) -> None:
            if recomputing() or not torch.is_grad_enabled():  # a recomputation, or evaluation
                return
            self._stamp(i, "forward", point)
            if t.requires_grad and torch.is_grad_enabled():
                t.register_hook(lambda g: self._stamp(i, "backward", point))
        return mark

    def _stamp(self, i: int, phase: str, point: str) -> None:
        key = (i, phase, point)
        if key in self._stamps:
            return  # a chunked executor passes inner points once per chunk: the first counts
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._stamps[key] = ev
        else:
            self._stamps[key] = time.perf_counter()

    def _seconds(self, a, b) -> float:
        if a is None or b is None:
            return float("nan")
        # two points can mark the same tensor (a local dispatch hands its input on): in backward
        # their hooks then run in the forward's order, a few microseconds "negative"
        return max(0.0, a.elapsed_time(b) / 1e3 if self.cuda else b - a)

    def collect(self) -> dict[str, list[list[float]]]:
        """The last step's spans (NaN where a point was not reached), then forget them. On CUDA
        this waits for the step's last mark."""
        stamps, self._stamps = self._stamps, {}
        if self.cuda and stamps:
            torch.cuda.synchronize()
        out = {}
        for phase in PHASES:
            order = HOOK_POINTS if phase == "forward" else HOOK_POINTS[::-1]
            rows = []
            for i, layer in enumerate(self.layers):
                at = [stamps.get((i, phase, p)) for p in order]
                spans = [self._seconds(a, b) for a, b in zip(at, at[1:])]
                if phase == "backward":  # reached in reverse: listed in OPS order all the same
                    spans = spans[::-1]
                if layer.executor is not sequential:  # chunked: the inner spans are not ops
                    spans = [float("nan")] * len(spans)
                rows.append([round(s, 7) for s in spans] + [round(self._seconds(at[0], at[-1]), 7)])
            out[phase] = rows
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()


STEP_PHASES = ("forward", "backward", "grad_sync", "optimizer")


class StepClock:
    """The phases of a training step's device part (``fsmoe.train.Trainer.device_step``), marked in
    order: forward (with the loss), backward, the gradients' synchronisation (``sync_grads``:
    the data-parallel reduction), and the optimizer (norm, clipping, guard, AdamW). CUDA events on
    a GPU, the host clock on the CPU. ``collect()`` returns ``{phase: seconds}`` of the last step
    (waiting for its last mark on CUDA), then starts the next; what a step takes beyond them is its
    loop (data, logging, the routers' hooks)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._marks: list = []

    def mark(self) -> None:
        """The start of the step, then the end of each phase in ``STEP_PHASES`` order."""
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._marks.append(ev)
        else:
            self._marks.append(time.perf_counter())

    def collect(self) -> dict[str, float] | None:
        marks, self._marks = self._marks, []
        if len(marks) != len(STEP_PHASES) + 1:
            return None
        if self.cuda:
            torch.cuda.synchronize()
            secs = [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
        else:
            secs = [b - a for a, b in zip(marks, marks[1:])]
        return {p: round(max(0.0, t), 7) for p, t in zip(STEP_PHASES, secs)}
