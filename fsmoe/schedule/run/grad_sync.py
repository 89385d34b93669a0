"""Gradient AllReduce of the dense (data-parallel) parameters, in partitions placed by a schedule.

Where the partitions go is ``fsmoe.schedule.model.gar.GarSchedule`` (pure, shared with the
simulator). This subclass adds the data: the dense gradients of all blocks live in one flat buffer
in *backward* order (last block first), so "what is ready" is always a prefix of it. Block b
becomes ready when the autograd engine has accumulated every one of its parameters' gradients
(post-accumulate-grad hooks), and the hook copies them into the buffer. A partition is a
contiguous slice, reduced in place on the inter lane (it shares the inter-node link with the EP
AlltoAll, as in FSMoE's case 1). :meth:`finish` writes the averaged gradients back.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from fsmoe.schedule.model.engine import Engine
from fsmoe.schedule.model.gar import GarSchedule
from fsmoe.schedule.types import GarPlan, Lanes


class GradSync(GarSchedule):
    """``params``: each block's dense parameters (forward order), hooked; ``group``: the DP group
    (None or size 1: nothing to reduce)."""

    def __init__(self, params: list[list[nn.Parameter]], plan: GarPlan, engine: Engine, lanes: Lanes = Lanes(),
                 group: ProcessGroup | None = None):
        dp = dist.get_world_size(group) if dist.is_initialized() else 1
        super().__init__([sum(p.numel() for p in ps) for ps in params], plan, engine, lanes,
                         params[0][0].element_size(), dp)
        self.params, self.group = params, group
        p0 = params[0][0]
        self.buffer: Tensor = torch.zeros(self.total, dtype=p0.dtype, device=p0.device)
        self._hooks = [p.register_post_accumulate_grad_hook(self._param_hook(b))
                       for b, ps in enumerate(params) for p in ps]

    @staticmethod
    def for_blocks(blocks: list[list[nn.Parameter]], plan: GarPlan, engine: Engine, lanes: Lanes = Lanes(),
                   group: ProcessGroup | None = None) -> "GradSync":
        return GradSync(blocks, plan, engine, lanes, group)

    def attach(self, executors) -> None:
        """Let the MoE executors' backward windows queue partitions."""
        for ex in executors:
            ex.window_hooks.append(self.window)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()

    def _param_hook(self, b: int):
        def hook(param):
            st = self.step
            if id(param) in st.done_params:
                return
            st.done_params.add(id(param))
            if all(id(q) in st.done_params for q in self.params[b]):
                self.on_block_ready(b)
        return hook

    def _pack(self, b: int) -> None:
        off = self.offset[b]
        for p in self.params[b]:
            n = p.numel()
            if p.grad is None:
                self.buffer[off:off + n].zero_()
            else:
                self.buffer[off:off + n].copy_(p.grad.reshape(-1))
            off += n

    def _reduce_fn(self, a: int, b: int) -> Callable[[], None]:
        view, group, dp = self.buffer[a:b], self.group, self.dp

        def fn() -> None:
            if dp > 1:
                dist.all_reduce(view, group=group)
        return fn

    def finish(self) -> None:
        """Queue whatever is left, wait for every partition, write the mean back into .grad."""
        super().finish()
        if self.dp > 1:
            self.buffer.div_(self.dp)
            for b, ps in enumerate(self.params):
                off = self.offset[b]
                for p in ps:
                    n = p.numel()
                    if p.grad is not None:
                        p.grad.copy_(self.buffer[off:off + n].view_as(p.grad))
                    off += n
