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
and writes the averaged gradients back. The same object drives a ``SimEngine`` (no tensors:
``on_block_ready`` is then called by the simulated program), so predictions follow the same rules.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fsmoe.schedule.engine import Engine
from fsmoe.schedule.executor import Lanes
from fsmoe.schedule.timeline import Op

GAR_MODES = ("end", "ready", "chunks", "windows")


@dataclass(frozen=True)
class GarPlan:
    mode: str = "end"
    window_bytes: tuple[int, ...] = ()  # windows: bytes placed in MoE layer l's backward (index = layer id)
    chunk_bytes: int = 0  # chunks: fixed chunk size

    def __post_init__(self):
        if self.mode not in GAR_MODES:
            raise ValueError(f"GarPlan.mode={self.mode!r} is invalid: allowed {list(GAR_MODES)}")
        if self.mode == "chunks" and self.chunk_bytes <= 0:
            raise ValueError(f"GarPlan.chunk_bytes={self.chunk_bytes} must be > 0 for mode 'chunks'")
        if any(b < 0 for b in self.window_bytes):
            raise ValueError(f"GarPlan.window_bytes={self.window_bytes} must be >= 0")


@dataclass
class _Step:
    ready: int = 0  # elements of the buffer ready (a prefix)
    sent: int = 0  # elements already queued
    handles: list = field(default_factory=list)
    done_params: set = field(default_factory=set)
    ready_blocks: set = field(default_factory=set)


class GradSync:
    """block_sizes: elements of each block's dense gradients, *forward* order. ``params`` (same
    blocks, real mode) are hooked; ``group`` is the DP group (None or size 1: nothing to reduce)."""

    def __init__(self, block_sizes: list[int], plan: GarPlan, engine: Engine, lanes: Lanes = Lanes(),
                 elem_bytes: int = 4, params: list[list[nn.Parameter]] | None = None, group=None,
                 dp: int = 1):
        self.plan, self.engine, self.lanes, self.elem_bytes = plan, engine, lanes, elem_bytes
        self.group, self.dp = group, dp
        self.sizes = list(block_sizes)
        order = list(reversed(range(len(self.sizes))))  # backward order
        self.offset = {}
        off = 0
        for b in order:
            self.offset[b] = off
            off += self.sizes[b]
        self.total = off
        self.params = params
        self.buffer: Tensor | None = None
        self._hooks = []
        if params is not None:
            if [sum(p.numel() for p in ps) for ps in params] != self.sizes:
                raise ValueError("GradSync: params do not match block_sizes")
            p0 = params[0][0]
            self.buffer = torch.zeros(self.total, dtype=p0.dtype, device=p0.device)
            for b, ps in enumerate(params):
                for p in ps:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._param_hook(b, p)))
        self.step = _Step()

    @staticmethod
    def for_blocks(blocks: list[list[nn.Parameter]], plan: GarPlan, engine: Engine, lanes: Lanes = Lanes(),
                   group=None) -> "GradSync":
        dp = dist.get_world_size(group) if dist.is_initialized() else 1
        elem = blocks[0][0].element_size()
        return GradSync([sum(p.numel() for p in ps) for ps in blocks], plan, engine, lanes, elem, blocks,
                        group, dp)

    def attach(self, executors) -> None:
        """Let the MoE executors' backward windows queue partitions."""
        for ex in executors:
            ex.window_hooks.append(self.window)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()

    # ------------------------------------------------------------------ readiness
    def _param_hook(self, b: int, p: nn.Parameter):
        def hook(param):
            st = self.step
            if id(param) in st.done_params:
                return
            st.done_params.add(id(param))
            if all(id(q) in st.done_params for q in self.params[b]):
                self.on_block_ready(b)
        return hook

    def _pack(self, b: int) -> None:
        if self.buffer is None:
            return
        off = self.offset[b]
        for p in self.params[b]:
            n = p.numel()
            if p.grad is None:
                self.buffer[off:off + n].zero_()
            else:
                self.buffer[off:off + n].copy_(p.grad.reshape(-1))
            off += n

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
        fn = None
        if self.buffer is not None:
            view = self.buffer[a:b]
            group = self.group

            def fn():
                if self.dp > 1:
                    dist.all_reduce(view, group=group)
                return None
        st.handles.append(self.engine.launch(self.lanes.inter, op, fn))

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
        """Queue whatever is left, wait for every partition, write the mean back into .grad."""
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
        if self.buffer is not None and self.dp > 1:
            self.buffer.div_(self.dp)
            for b, ps in enumerate(self.params):
                off = self.offset[b]
                for p in ps:
                    n = p.numel()
                    if p.grad is not None:
                        p.grad.copy_(self.buffer[off:off + n].view_as(p.grad))
                    off += n
        self.step = _Step()
