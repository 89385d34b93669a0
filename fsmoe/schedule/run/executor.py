"""The pipelined executor: one MoE layer's dispatch -> AllGather -> expert -> ReduceScatter ->
combine, cut into r chunks whose ops overlap across the inter, intra and compute lanes.

Shape legend: N source rows (``Order``'s output, grouped by global expert), D model dim,
E global experts, S world ranks; see ``stages.py`` for the per-chunk layouts.

``run_pipeline`` is the whole schedule, as straight-line code over an engine (``engine.py``):
the same function runs forward and backward, really (threads on CPU, streams on GPU) or in
simulation (``SimEngine``), so the predicted timeline is the executed one.

:class:`PipelinedExecutor` plugs into ``MoELayer(executor=...)``: an autograd Function whose
forward runs the program at ``r_fwd`` and whose backward runs it again at ``r_bwd`` on the
output gradient (the backward of every stage is the same stage in the same direction: dispatch
the gradient rows, gather them, expert backward, reduce-scatter the partial input gradients,
combine). The forward saves each chunk's expert input and pre-activations; ``full_idx`` lets
the backward find them at any degree. Gradient partitions join the inter lane through
``window_hooks`` (``grad_sync.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fsmoe.schedule.model.engine import Engine
from fsmoe.schedule.model.perf_model import ExpertDims
from fsmoe.schedule.model.program import StageFns, WindowHook, chunk_ops, counts_op, run_pipeline
from fsmoe.schedule.run.expert_ops import ExpertWeights, expert_backward, expert_forward
from fsmoe.schedule.run.stages import ChunkRoute, MoEStages, build_routes
from fsmoe.schedule.types import Lanes, LayerSchedule


@dataclass
class _State:
    """Forward -> backward: the count matrix, forward routes and saved expert tensors."""

    counts_SE: np.ndarray
    routes: list[ChunkRoute]
    saved: list[tuple]


class PipelinedExecutor:
    """Runs one MoE layer's expert section as the chunked pipeline (see ``run_pipeline``).

    experts: a ``GroupedExperts`` (this rank's El experts, its ESP f-shard); stages: the
    collectives (``MoEStages``); engine: lanes (``make_engine``); schedule: degrees and IIO.
    Call it as ``y_ND = executor(x_ND, tokens_per_expert_E)``; rows past the kept ones get 0.
    """

    def __init__(self, experts, stages: MoEStages, engine: Engine, schedule: LayerSchedule = LayerSchedule(),
                 layer: int = 0):
        if not hasattr(experts, "w1_EDF"):
            raise TypeError(f"PipelinedExecutor needs GroupedExperts-style weights (w1_EDF, w2_EFD), "
                            f"got {type(experts).__name__}")
        self.experts, self.stages, self.engine, self.layer = experts, stages, engine, layer
        self.schedule = schedule
        self.window_hooks: list[WindowHook] = []

    @property
    def lanes(self) -> Lanes:
        return Lanes.of(self.schedule.iio)

    def dims(self, dtype: torch.dtype) -> ExpertDims:
        w = ExpertWeights.of(self.experts)
        return ExpertDims(w.w1_EDF.shape[1], w.w1_EDF.shape[2], 3 if w.w3_EDF is not None else 2,
                          torch.empty(0, dtype=dtype).element_size(), w.w1_EDF.shape[0])

    def __call__(self, x_ND: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
        w = ExpertWeights.of(self.experts)
        return _PipelinedExperts.apply(x_ND, tokens_per_expert_E, self, *w.tensors())

    def _window(self, eng, slot, r):
        for hook in self.window_hooks:
            hook(eng, self.layer, slot, r)

    def _fns(self, expert_fn) -> StageFns:
        st = self.stages
        return StageFns(st.dispatch, st.allgather, expert_fn, st.reducescatter, st.combine)

    def _scatter_rows(self, like: Tensor, routes, outs) -> Tensor:
        out = like.new_zeros(like.shape)
        for route, rows in zip(routes, outs):
            out.index_copy_(0, route.src_idx, rows)
        return out

    # ------------------------------------------------------------------ forward
    def run_forward(self, x_ND: Tensor, counts_E: Tensor, w: ExpertWeights) -> tuple[Tensor, _State]:
        eng, st, layout = self.engine, self.stages, self.stages.layout
        counts_SE = eng.wait(eng.launch(self.lanes.inter, counts_op(layout, counts_E.numel(), self.layer),
                                        st.exchange_counts, counts_E))
        r = self.schedule.r_fwd
        routes = build_routes(counts_SE, r, layout, st.rank, x_ND.device)
        ops = chunk_ops([rt.work for rt in routes], self.dims(x_ND.dtype), layout, "fwd", self.layer)
        saved: list[tuple] = [()] * r

        def expert(g_GD, route: ChunkRoute, i: int) -> Tensor:
            y_KD, saved[i] = expert_forward(g_GD.index_select(0, route.gath_idx), route.counts_El, w)
            return torch.empty_like(g_GD).index_copy_(0, route.gath_idx, y_KD)

        handles = run_pipeline(eng, self.lanes, ops, st.esp, self._fns(expert), x_ND, routes)
        y_ND = self._scatter_rows(x_ND, routes, [eng.wait(h) for h in handles])
        return y_ND, _State(counts_SE, routes, saved)

    # ------------------------------------------------------------------ backward
    def run_backward(self, state: _State, dy_ND: Tensor, w: ExpertWeights) -> tuple[Tensor, list[Tensor]]:
        eng, st, layout = self.engine, self.stages, self.stages.layout
        r = self.schedule.r_bwd
        same = r == len(state.routes)
        routes = state.routes if same else build_routes(state.counts_SE, r, layout, st.rank, dy_ND.device)
        if same:
            saved_of = lambda route, i: state.saved[i]
        else:  # reassemble the forward's chunks in the layer's canonical order, then cut again
            full = []
            for k in range(3):
                parts = [s[k] for s in state.saved]
                if parts[0] is None:
                    full.append(None)
                    continue
                buf = parts[0].new_empty(sum(p.shape[0] for p in parts), parts[0].shape[1])
                for rt, p in zip(state.routes, parts):
                    buf.index_copy_(0, rt.full_idx, p)
                full.append(buf)
            saved_of = lambda route, i: tuple(None if t is None else t.index_select(0, route.full_idx) for t in full)
        ops = chunk_ops([rt.work for rt in routes], self.dims(dy_ND.dtype), layout, "bwd", self.layer)
        grads = [torch.zeros_like(t) for t in w.tensors()]
        wT = tuple(None if t is None else t.transpose(1, 2).contiguous() for t in (w.w1_EDF, w.w3_EDF, w.w2_EFD))

        def expert(g_GD, route: ChunkRoute, i: int) -> Tensor:
            dy_KD = g_GD.index_select(0, route.gath_idx)
            dx_KD = expert_backward(saved_of(route, i), dy_KD, route.counts_El, route.counts_list, w, wT, grads)
            return torch.empty_like(g_GD).index_copy_(0, route.gath_idx, dx_KD)

        dy_ND = dy_ND.contiguous()
        handles = run_pipeline(eng, self.lanes, ops, st.esp, self._fns(expert), dy_ND, routes, self._window)
        dx_ND = self._scatter_rows(dy_ND, routes, [eng.wait(h) for h in handles])
        return dx_ND, grads


class _PipelinedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, counts_E, executor: PipelinedExecutor, *weights):
        w = ExpertWeights.of(executor.experts)
        y_ND, state = executor.run_forward(x_ND, counts_E, w)
        ctx.executor, ctx.state = executor, state
        return y_ND

    @staticmethod
    def backward(ctx, dy_ND):
        ex: PipelinedExecutor = ctx.executor
        dx_ND, grads = ex.run_backward(ctx.state, dy_ND, ExpertWeights.of(ex.experts))
        ctx.state = None
        return (dx_ND, None, None, *grads)
