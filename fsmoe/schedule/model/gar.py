"""Gradient AllReduce of the dense (data-parallel) parameters, in partitions placed by a schedule.

The dense gradients of all blocks live in one flat buffer in *backward* order (last block first),
so "what is ready" is always a prefix of it: block b becomes ready when the autograd engine has
accumulated every one of its parameters' gradients (post-accumulate-grad hooks), and the hook
copies them into the buffer. A partition is a contiguous slice, reduced in place on the inter
lane (it shares the inter-node link with the EP AlltoAll, as in FSMoE's case 1).

Where partitions go (``GarPlan.mode``):

    end       one AllReduce after backward (Default schedule)
    ready     each block's slice as soon as the block is ready (DDP-style; Tutel-Improved)
    chunks    fixed-size chunks, one queued at each window slot of each MoE layer's backward,
              so an A2A waits for at most one chunk (Lina; PipeMoE+Lina)
    windows   ``window_bytes[layer]`` queued in the middle of that MoE layer's backward, behind
              its dispatch side, where the inter lane idles while experts run (FSMoE)

Whatever is left goes in one AllReduce at :meth:`GradSync.finish`, which waits for everything
and writes the averaged gradients back. This class is the placement logic alone (no tensors): ``simulate`` drives it on a ``SimEngine``,
and the runtime's ``GradSync`` (``schedule.run.grad_sync``) adds the buffer, the parameter hooks
and the AllReduce, so predictions follow the same rules as the run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from fsmoe.schedule.model.engine import Engine
from fsmoe.schedule.types import GarPlan, Lanes, Op


@dataclass
class _Step:
    ready: int = 0  # elements of the buffer ready (a prefix)
    sent: int = 0  # elements already queued
    handles: list = field(default_factory=list)
    done_params: set = field(default_factory=set)
    ready_blocks: set = field(default_factory=set)


class GarSchedule:
    """Where the partitions of one iteration go. block_sizes: elements of each block's dense
    gradients, *forward* order; ``dp``: the data-parallel degree (1: nothing to reduce)."""

    def __init__(self, block_sizes: list[int], plan: GarPlan, engine: Engine, lanes: Lanes = Lanes(),
                 elem_bytes: int = 4, dp: int = 1):
        self.plan, self.engine, self.lanes, self.elem_bytes, self.dp = plan, engine, lanes, elem_bytes, dp
        self.sizes = list(block_sizes)
        self.offset = {}
        off = 0
        for b in reversed(range(len(self.sizes))):  # backward order
            self.offset[b] = off
            off += self.sizes[b]
        self.total = off
        self.step = _Step()

    def _pack(self, b: int) -> None:
        """Copy block b's gradients into the buffer (the runtime's; nothing in simulation)."""

    def _reduce_fn(self, a: int, b: int) -> Callable[[], None] | None:
        """The AllReduce of elements [a, b) (the runtime's; None in simulation)."""
        return None

    def on_block_ready(self, b: int) -> None:
        st = self.step
        if b in st.ready_blocks:
            return
        st.ready_blocks.add(b)
        self._pack(b)
        # ready is the longest prefix (in backward order) of ready blocks
        ready = 0
        for bb in reversed(range(len(self.sizes))):
            if bb not in st.ready_blocks:
                break
            ready += self.sizes[bb]
        st.ready = ready
        if self.plan.mode == "ready":
            self._launch(st.ready - st.sent, layer=b)

    # ------------------------------------------------------------------ launching
    def _launch(self, elems: int, layer: int) -> None:
        st = self.step
        elems = min(elems, st.ready - st.sent)
        if elems <= 0:
            return
        a, b = st.sent, st.sent + elems
        st.sent = b
        n_bytes = elems * self.elem_bytes
        key = "allreduce" if self.dp > 1 else ""
        op = Op("allreduce", "bwd", layer, len(st.handles), key, n_bytes if self.dp > 1 else 0.0)
        st.handles.append(self.engine.launch(self.lanes.inter, op, self._reduce_fn(a, b)))

    def window(self, eng: Engine, layer: int, slot, r: int) -> None:
        """Window hook of ``PipelinedExecutor`` (backward only)."""
        mode, st = self.plan.mode, self.step
        if mode == "windows" and slot == "mid" and layer < len(self.plan.window_bytes):
            self._launch(self.plan.window_bytes[layer] // self.elem_bytes, layer)
        elif mode == "chunks" and (slot == "mid" or slot < r - 1):
            chunk = max(1, self.plan.chunk_bytes // self.elem_bytes)
            if st.ready - st.sent >= chunk or (st.ready == self.total and st.ready > st.sent):
                self._launch(chunk, layer)

    def finish(self) -> None:
        """Queue whatever is left and wait for every partition."""
        st = self.step
        for b in range(len(self.sizes)):  # blocks whose hooks never fired (unused parameters)
            if b not in st.ready_blocks:
                self.on_block_ready(b)
        if self.plan.mode == "chunks":
            chunk = max(1, self.plan.chunk_bytes // self.elem_bytes)
            while st.sent < st.ready:
                self._launch(chunk, -1)
        else:
            self._launch(st.ready - st.sent, -1)
        for h in st.handles:
            self.engine.wait(h)
        self.step = _Step()
