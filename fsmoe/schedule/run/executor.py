"""The pipelined executor: one MoE layer's dispatch -> experts -> combine cut into r chunks whose
ops overlap across the inter, intra and compute lanes.

Shape legend: N source rows (``Order``'s output, grouped by global expert), R rows of one chunk
for this rank's experts (grouped by local expert), D model dim.

It is an executor of ``MoELayer(..., executor=...)`` and runs the layer's own parts: the
dispatcher's launch/finish verbs on the chunks of one ``DispatchLayout`` (``layout.chunks(r)``)
and the layer's ``expert_step`` (its experts module between the ``after_dispatch`` and
``before_combine`` hooks). Per chunk, on the lanes of ``run_pipeline`` (``model/program.py``)::

    a2a_dispatch   inter    launch_dispatch(x_ND, chunk), wait for the transfer
    allgather      intra    finish_dispatch            (esp > 1; else inside the expert op)
    expert         compute  expert_step
    reducescatter  intra    launch_combine             (esp > 1; else inside the expert op)
    a2a_combine    inter    finish_combine

r = 1 is the sequential executor's path. Autograd: a Function whose forward runs the program at
``r_fwd`` and whose backward runs it again at ``r_bwd`` on the output gradient (combine's adjoint
is a dispatch and dispatch's a combine): dispatch the gradient rows, the expert step's backward,
combine the input gradients. With ``r_bwd == r_fwd`` the forward keeps each chunk's expert graph;
otherwise it keeps each chunk's expert input, and the backward recomputes the expert step on its
own chunks (placed through ``full_ranges``). Gradient partitions join the inter lane through
``window_hooks`` (``grad_sync.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fsmoe.comm.dispatcher import Dispatcher
from fsmoe.comm.layout import DispatchLayout, assemble_rows, range_index
from fsmoe.routing.plan import RoutingPlan
from fsmoe.schedule.model.engine import Engine
from fsmoe.schedule.model.perf_model import ChunkWork, ExpertDims
from fsmoe.schedule.model.program import StageFns, WindowHook, chunk_ops, counts_op, run_pipeline
from fsmoe.schedule.types import Lanes, LayerSchedule, Layout

if TYPE_CHECKING:
    from fsmoe.layer import MoELayer


def chunk_work(chunk: DispatchLayout) -> ChunkWork:
    """The sizes of one chunk's ops (what the performance model predicts them from)."""
    esp = len(chunk.gather_sizes_S)
    return ChunkWork(send_rows=chunk.num_sent, recv_rows=sum(chunk.recv_splits_P),
                     gather_rows=esp * max(chunk.gather_sizes_S), expert_rows=sum(chunk.tokens_per_local_expert_El))


def expert_dims(experts, dtype: torch.dtype) -> ExpertDims:
    """The performance model's view of a ``GroupedExperts``-style module (w1_EDF, w3_EDF, w2_EFD)."""
    if not hasattr(experts, "w1_EDF"):
        raise TypeError(f"PipelinedExecutor needs GroupedExperts-style weights (w1_EDF, w2_EFD), "
                        f"got {type(experts).__name__}")
    El, D, F = experts.w1_EDF.shape
    return ExpertDims(D, F, 3 if experts.w3_EDF is not None else 2, torch.empty(0, dtype=dtype).element_size(), El)


# ---------------------------------------------------------------------------- one chunk's expert step


@dataclass
class ChunkGraph:
    """One chunk's expert step: its input (a leaf) and, when kept, its output with the graph."""

    x_RD: Tensor
    y_RD: Tensor | None


def expert_forward(step, x_RD: Tensor, counts_El: Tensor, keep_graph: bool) -> tuple[Tensor, ChunkGraph]:
    """y_RD = step(x_RD, counts_El) with nothing recorded outside; the graph is kept for
    :func:`expert_backward` when ``keep_graph``."""
    if not keep_graph:
        with torch.no_grad():
            return step(x_RD, counts_El), ChunkGraph(x_RD, None)
    with torch.enable_grad():
        x = x_RD.detach().requires_grad_()
        y = step(x, counts_El)
    return y.detach(), ChunkGraph(x, y)


def expert_backward(step, graph: ChunkGraph, counts_El: Tensor, dy_RD: Tensor,
                    params: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor | None, ...]]:
    """(dx_RD, d params) of one chunk's expert step (recomputed first when its graph was not kept).
    A graph runs backward once: the experts' kernels free their intermediates as they go."""
    x, y = graph.x_RD, graph.y_RD
    with torch.enable_grad():
        if y is None:
            x = x.detach().requires_grad_()
            y = step(x, counts_El)
        grads = torch.autograd.grad(y, (x, *params), dy_RD, allow_unused=True)
    dx = grads[0] if grads[0] is not None else torch.zeros_like(x)
    return dx, grads[1:]


# ---------------------------------------------------------------------------- the executor


def _stage_fns(disp: Dispatcher, expert) -> StageFns:
    """The program's five ops as dispatcher verbs; with esp == 1 the intra-lane halves run inside
    the expert op (they move no data between ranks)."""
    if disp.esp_size > 1:
        return StageFns(dispatch=lambda x, c: disp.wait(disp.launch_dispatch(x, c)),
                        allgather=lambda p, c: disp.finish_dispatch(p),
                        expert=lambda d, c, i: expert(*d, i),
                        reducescatter=lambda yh, c: disp.launch_combine(*yh),
                        combine=lambda p, c: disp.finish_combine(p))
    return StageFns(dispatch=lambda x, c: disp.wait(disp.launch_dispatch(x, c)),
                    expert=lambda p, c, i: disp.launch_combine(*expert(*disp.finish_dispatch(p), i)),
                    combine=lambda p, c: disp.finish_combine(p))


@dataclass
class _State:
    """Forward -> backward: the layer's layout, the forward's chunks and their expert steps."""

    layout: DispatchLayout
    chunks: list[DispatchLayout]
    graphs: list[ChunkGraph]
    num_rows: int


class PipelinedExecutor:
    """Runs one MoE layer's expert section as the chunked pipeline (see ``run_pipeline``).

    engine: lanes (``make_engine``); schedule: degrees and IIO; layout: the process grid, for the
    ops' sizes and fits; layer: the layer's index in the records. ``executor(moe, x_ND, plan)``
    is called by ``MoELayer.forward``.
    """

    def __init__(self, engine: Engine, schedule: LayerSchedule = LayerSchedule(), layout: Layout = Layout(),
                 layer: int = 0):
        self.engine, self.schedule, self.layout, self.layer = engine, schedule, layout, layer
        self.window_hooks: list[WindowHook] = []

    @property
    def lanes(self) -> Lanes:
        return Lanes.of(self.schedule.iio)

    def __call__(self, moe: "MoELayer", x_ND: Tensor, plan: RoutingPlan) -> Tensor:
        expert_dims(moe.experts, x_ND.dtype)  # fail early for experts the program cannot size
        params = tuple(p for p in moe.experts.parameters() if p.requires_grad)
        if not torch.is_grad_enabled() or not (x_ND.requires_grad or params):  # e.g. evaluation: no graphs
            return self.run_forward(moe, x_ND, plan, keep_graphs=False)[0]
        return _PipelinedExperts.apply(x_ND, self, moe, plan, *params)

    def _window(self, eng: Engine, slot, r: int) -> None:
        for hook in self.window_hooks:
            hook(eng, self.layer, slot, r)

    def _ops(self, moe: "MoELayer", chunks: list[DispatchLayout], dtype: torch.dtype, phase: str):
        return chunk_ops([chunk_work(c) for c in chunks], expert_dims(moe.experts, dtype), self.layout, phase,
                         self.layer)

    # ------------------------------------------------------------------ forward
    def run_forward(self, moe: "MoELayer", x_ND: Tensor, plan: RoutingPlan, keep_graphs: bool = True
                    ) -> tuple[Tensor, _State]:
        """y_ND [N, D]; the chunks' expert graphs are kept for the backward when ``keep_graphs``
        and the backward runs at the same degree (else their inputs, to recompute)."""
        eng, disp = self.engine, moe.dispatcher
        num_experts = plan.tokens_per_expert_E.numel()
        layout = eng.wait(eng.launch(self.lanes.inter, counts_op(self.layout, num_experts, self.layer),
                                     disp.layout, plan))
        chunks = layout.chunks(self.schedule.r_fwd)
        keep = keep_graphs and self.schedule.r_bwd == self.schedule.r_fwd
        graphs: list[ChunkGraph | None] = [None] * len(chunks)

        def expert(x_RD: Tensor, counts_El: Tensor, handle, i: int):
            y_RD, graphs[i] = expert_forward(moe.expert_step, x_RD, counts_El, keep)
            return y_RD, handle

        ops = self._ops(moe, chunks, x_ND.dtype, "fwd")
        handles = run_pipeline(eng, self.lanes, ops, disp.esp_size, _stage_fns(disp, expert), x_ND, chunks)
        y_ND = assemble_rows(chunks, [eng.wait(h) for h in handles], x_ND.shape[0])
        return y_ND, _State(layout, chunks, graphs, x_ND.shape[0])

    # ------------------------------------------------------------------ backward
    def run_backward(self, moe: "MoELayer", state: _State, dy_ND: Tensor, params: tuple[Tensor, ...]
                     ) -> tuple[Tensor, list[Tensor]]:
        eng, disp = self.engine, moe.dispatcher
        chunks = state.layout.chunks(self.schedule.r_bwd)
        graphs = state.graphs if len(chunks) == len(state.chunks) else _regroup(state, chunks)
        grads = [torch.zeros_like(p) for p in params]

        def expert(dy_RD: Tensor, counts_El: Tensor, handle, i: int):
            dx_RD, dparams = expert_backward(moe.expert_step, graphs[i], counts_El, dy_RD, params)
            for g, d in zip(grads, dparams):
                if d is not None:
                    g += d
            return dx_RD, handle

        dy_ND = dy_ND.contiguous()
        ops = self._ops(moe, chunks, dy_ND.dtype, "bwd")
        handles = run_pipeline(eng, self.lanes, ops, disp.esp_size, _stage_fns(disp, expert), dy_ND, chunks,
                               self._window)
        dx_ND = assemble_rows(chunks, [eng.wait(h) for h in handles], state.num_rows)
        state.graphs = []
        return dx_ND, grads


def _regroup(state: _State, chunks: list[DispatchLayout]) -> list[ChunkGraph]:
    """The forward chunks' expert inputs cut along the backward's chunks (to recompute there)."""
    x0 = state.graphs[0].x_RD
    full = x0.new_empty(sum(g.x_RD.shape[0] for g in state.graphs), x0.shape[1])
    for c, g in zip(state.chunks, state.graphs):
        full.index_copy_(0, range_index(c.full_ranges, full.device), g.x_RD.detach())
    return [ChunkGraph(full.index_select(0, range_index(c.full_ranges, full.device)), None) for c in chunks]


class _PipelinedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, executor: PipelinedExecutor, moe, plan, *params):
        y_ND, state = executor.run_forward(moe, x_ND, plan)
        ctx.executor, ctx.moe, ctx.state, ctx.params = executor, moe, state, params
        return y_ND

    @staticmethod
    def backward(ctx, dy_ND):
        dx_ND, grads = ctx.executor.run_backward(ctx.moe, ctx.state, dy_ND, ctx.params)
        ctx.state = None
        return (dx_ND, None, None, None, *grads)
