"""A MoE layer without a host round trip, for small forwards (decode steps).

Shape legend: N routed rows grouped by expert (``x_ND``), D model dim, E experts of the layer.

Under the ``stream`` policy every expert that is not resident is streamed, so the host has nothing
to decide per forward: it reads the token counts only to issue the copies. With the in-place
kernels of :mod:`.zero_copy` on (the default where they run) and at most ``zero_copy.MAX_ROWS`` tokens in
a forward (each expert then has at most that many rows), the layer instead runs as a few device
operations: the experts' row offsets from the token counts (a cumulative sum on the device), then
the two in-place launches over all E experts, each reading its resident GPU copy or its pinned
host weights over PCIe, and those without rows returning at once. Nothing is read on the host, so
a graphed decode step (:mod:`fsmoe.infer.decode_graph`) is captured whole instead of being cut at
every MoE layer. Larger forwards (prefill) go to the hybrid executor, whose copy stream moves each
expert once for all of its rows.

The adaptive policy (``scheinfer``) uses the same executor with a condition: a forward size runs
here once the policy's race (:mod:`.race`) has found streaming every expert the fastest split at
that size, and on the hybrid executor before then and when another split wins. With the CPU lane
of :mod:`.mailbox` taking a share of the experts, its small forwards all run here.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from fsmoe.infer.hybrid.engine import HybridExecutor
from fsmoe.infer.hybrid.mailbox import Mailbox
from fsmoe.infer.hybrid.zero_copy import MAX_ROWS, host_experts_mlp


class InPlaceStreamExecutor:
    """``executor(layer, x_ND, plan) -> y_ND`` for one MoE layer under the stream policy."""

    def __init__(self, host_executor: HybridExecutor, slot_E: Tensor | None,
                 on_device: Callable[[int], bool] | None = None, mailbox: Mailbox | None = None):
        self.host = host_executor  # larger forwards, and the layer's expert weights
        self.slot_E = slot_E  # [E] int32 on the device: index of the resident copy, -1 if none; None: none resident
        self.on_device = on_device  # tokens -> whether such a forward may run here (None: always)
        self.mailbox = mailbox  # this layer's CPU experts beside the device path (mailbox.py), if any
        self.cpu_max_tokens = MAX_ROWS  # forwards of at most this many tokens use the mailbox
        self._ids_E: Tensor | None = None

    def needs_host_for(self, tokens: int) -> bool:
        """Whether a forward of ``tokens`` tokens reads the host (a graphed decode step is cut here)."""
        return tokens > MAX_ROWS or (self.on_device is not None and not self.on_device(tokens))

    def __call__(self, layer, x_ND: Tensor, plan) -> Tensor:
        if self.needs_host_for(plan.num_tokens):
            return self.host(layer, x_ND, plan)
        return self.device_forward(x_ND, plan.tokens_per_expert_E, plan.num_tokens <= self.cpu_max_tokens)

    def device_forward(self, x_ND: Tensor, tokens_per_expert_E: Tensor, cpu_lane: bool = True) -> Tensor:
        """x_ND [N, D] grouped by expert (``tokens_per_expert_E`` [E] rows each) -> y_ND [N, D], all
        queued on the device: the in-place launches over every expert but the CPU's, whose rows go
        through the mailbox meanwhile (``cpu_lane``: if the layer has one)."""
        ex, layer = self.host.experts, self.host.index
        counts_E = tokens_per_expert_E.to(torch.int32)
        if self._ids_E is None or self._ids_E.device != counts_E.device:
            self._ids_E = torch.arange(counts_E.numel(), dtype=torch.int32, device=counts_E.device)
        ends_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        starts_E = ends_E - counts_E
        cpu = cpu_lane and self.mailbox is not None and self.mailbox.active[layer]
        if cpu:
            self.mailbox.post(layer, x_ND, counts_E)
            ends_E = torch.where(self.mailbox.cpu_now[layer], starts_E, ends_E)  # the CPU's: not read here
        plan_3E = torch.stack([self._ids_E, starts_E, ends_E])
        y_ND = torch.zeros_like(x_ND)  # dropped rows (past the last expert's) stay 0
        resident = None if self.slot_E is None else (ex.gpu, self.slot_E)
        host_experts_mlp(x_ND, ex.host, plan_3E, y_ND, resident=resident)
        if cpu:
            self.mailbox.collect(layer, y_ND)
        return y_ND


def slots_of(resident_E, device: torch.device) -> Tensor | None:
    """[E] int32: each resident expert's index among the resident copies (ascending expert id, as
    the engine stacks them), -1 for the others; None when no expert is resident."""
    resident_E = torch.as_tensor(resident_E, dtype=torch.bool)
    if not bool(resident_E.any()):
        return None
    slot = torch.full(resident_E.shape, -1, dtype=torch.int32)
    slot[resident_E] = torch.arange(int(resident_E.sum()), dtype=torch.int32)
    return slot.to(device)
