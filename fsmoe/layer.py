"""MoELayer: the only place that knows the order of FSMoE's six modules.

    x [.., D] --Gate--> RoutingPlan --Order--> x_ND --Dispatch--> x_RD --Expert--> y_RD
      --Combine--> y_ND --I-Order--> y [.., D]  (+ shared experts)

Each part is chosen at build time (router from the registry, Order from the router's kind,
dispatcher from the parallel layout, experts from the config) and can be swapped by passing
another instance. Hooks (FSMoE's six) let users observe or replace the tensor at each boundary,
e.g. to compress what is dispatched.

The middle (Dispatch -> Expert -> Combine) is run by an *executor*, chosen at build time:
``executor(layer, x_ND, plan) -> y_ND``. The default, :func:`sequential`, dispatches the whole
layer at once; the pipelined one (``fsmoe.schedule.run.executor.PipelinedExecutor``) cuts it into
chunks that overlap. Both call the same dispatcher and :meth:`MoELayer.expert_step` (the
experts between the ``after_dispatch`` and ``before_combine`` hooks), so every hook fires under
every executor and there is one expert math.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from fsmoe.comm.dispatcher import Dispatcher, LocalDispatcher
from fsmoe.config import MoEConfig
from fsmoe.experts import DenseFFN
from fsmoe.order import Order
from fsmoe.precision import to_compute
from fsmoe.recompute import checkpointed
from fsmoe.routing import build_router
from fsmoe.routing.plan import RoutingPlan
from fsmoe.select import build_order, experts_class, resolve_kernels

Executor = Callable[["MoELayer", Tensor, RoutingPlan], Tensor]
HOOK_POINTS = ("layer_start", "before_dispatch", "after_dispatch", "before_combine", "after_combine", "layer_end")
Hook = Callable[["MoELayer", Tensor], "Tensor | None"]


@dataclass(frozen=True)
class MoEStats:
    """Per-forward statistics of one MoE layer (all tensors detached except aux_loss)."""

    aux_loss: Tensor  # scalar: weighted sum of the router's auxiliary losses (has grad)
    aux_losses: dict[str, Tensor]
    tokens_per_expert: Tensor  # [E] int64, global expert ids, this rank's tokens
    dropped: Tensor  # scalar int64
    num_assignments: int


class MoELayer(nn.Module):
    def __init__(self, cfg: MoEConfig, d_model: int, *, dispatcher: Dispatcher | None = None,
                 experts: nn.Module | None = None, order: Order | None = None, router: nn.Module | None = None,
                 esp: int = 1, esp_rank: int = 0, executor: "Executor | None" = None):
        super().__init__()
        self.cfg, self.d_model = cfg, d_model
        E = cfg.num_experts
        # Kernels (plain PyTorch or fused Triton) are chosen here, once: see fsmoe.select.
        self.kernels = resolve_kernels(cfg.kernels)
        if router is None:
            router = build_router(cfg.router, d_model, E)
            router.use_kernels(self.kernels)
        self.router = router
        self.order = order or build_order(self.router.order, self.kernels)
        self.dispatcher = dispatcher or LocalDispatcher(E)
        self.experts = experts or experts_class(self.kernels)(
            self.dispatcher.num_local_experts, d_model, cfg.experts.d_ff, cfg.experts.activation,
            esp=esp, esp_rank=esp_rank)
        if hasattr(self.experts, "use_gemm"):
            self.experts.use_gemm(cfg.experts.gemm)
        ex = cfg.experts
        self.shared = (DenseFFN(d_model, ex.num_shared * (ex.shared_d_ff or ex.d_ff), ex.activation)
                       if ex.num_shared else None)
        self.executor: Executor = executor or sequential
        # train.activation_checkpointing="moe": the experts' hidden activations are recomputed in backward.
        self.recompute_experts = False
        # OrderedDict: RemovableHandle keeps a weak reference to the container.
        self._hooks: dict[str, OrderedDict[int, Hook]] = {p: OrderedDict() for p in HOOK_POINTS}
        self._plan_observers: OrderedDict[int, Callable[["MoELayer", RoutingPlan], None]] = OrderedDict()

    # ------------------------------------------------------------------ hooks
    def register_hook(self, point: str, fn: Hook) -> RemovableHandle:
        """``fn(layer, tensor)`` runs at ``point``; a returned tensor replaces the input."""
        if point not in HOOK_POINTS:
            raise ValueError(f"hook point {point!r} is unknown; allowed: {list(HOOK_POINTS)}")
        handle = RemovableHandle(self._hooks[point])
        self._hooks[point][handle.id] = fn
        return handle

    def observe_plan(self, fn: Callable[["MoELayer", RoutingPlan], None]) -> RemovableHandle:
        """``fn(layer, plan)`` sees every forward's RoutingPlan, right after routing (e.g. the
        routing trace's sample of which experts tokens chose together); it must not change it."""
        handle = RemovableHandle(self._plan_observers)
        self._plan_observers[handle.id] = fn
        return handle

    def _hook(self, point: str, t: Tensor) -> Tensor:
        for fn in self._hooks[point].values():
            out = fn(self, t)
            t = t if out is None else out
        return t

    # ------------------------------------------------------------------ forward
    def expert_step(self, x_RD: Tensor, counts_El: Tensor) -> Tensor:
        """x_RD [R, D] dispatched rows grouped by local expert -> expert outputs [R, D], between
        the ``after_dispatch`` and ``before_combine`` hooks (every executor calls this)."""
        x_RD = self._hook("after_dispatch", x_RD)
        y_RD = checkpointed(self.experts, x_RD, counts_El) if self.recompute_experts else self.experts(x_RD, counts_El)
        return self._hook("before_combine", y_RD)

    def forward(self, x: Tensor) -> tuple[Tensor, MoEStats]:
        """x: [B, L, D] (or [T, D], one sequence). Returns (y like x, MoEStats)."""
        shape = x.shape
        seq_len = shape[-2] if x.dim() == 3 else shape[0]
        # Under autocast the tokens go bf16 here: permute and AlltoAll move half the bytes.
        x_TD = self._hook("layer_start", to_compute(x.reshape(-1, self.d_model)))
        plan = self.router(x_TD, seq_len)
        for fn in self._plan_observers.values():
            fn(self, plan)
        x_ND = self._hook("before_dispatch", self.order.permute(x_TD, plan))
        y_ND = self._hook("after_combine", self.executor(self, x_ND, plan))
        y_TD = self.order.unpermute(y_ND, plan)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        y_TD = self._hook("layer_end", y_TD)
        stats = MoEStats(plan.aux_loss(), {k: v.detach() for k, v in plan.aux_losses.items()},
                         plan.tokens_per_expert_E.detach(), plan.dropped.detach(), plan.num_assignments)
        return y_TD.view(shape), stats


def sequential(layer: MoELayer, x_ND: Tensor, plan: RoutingPlan) -> Tensor:
    """The sequential executor: x_ND [N, D] grouped by global expert -> y_ND [N, D], the whole
    layer in one dispatch, one expert step and one combine."""
    x_RD, counts_El, handle = layer.dispatcher.dispatch(x_ND, plan)
    return layer.dispatcher.combine(layer.expert_step(x_RD, counts_El), handle)
