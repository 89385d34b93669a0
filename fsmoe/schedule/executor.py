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
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from fsmoe.schedule.engine import Engine
from fsmoe.schedule.expert_ops import ExpertWeights, expert_backward, expert_forward
from fsmoe.schedule.perf_model import ChunkWork, ExpertDims, Layout, op_sizes
from fsmoe.schedule.profile import qualified
from fsmoe.schedule.stages import ChunkRoute, MoEStages, build_routes
from fsmoe.schedule.timeline import Op

# window(eng, layer, slot, r): slot "mid" after the dispatch side is queued, then i after combine i.
WindowHook = Callable[[Engine, int, Any, int], None]


@dataclass(frozen=True)
class Lanes:
    """Lane names. Without intra/inter overlap (IIO) AG/RS share the inter lane with the A2As."""

    inter: str = "inter"
    intra: str = "intra"

    @staticmethod
    def of(iio: bool) -> "Lanes":
        return Lanes("inter", "intra" if iio else "inter")


@dataclass(frozen=True)
class ChunkOps:
    """The five ops of one chunk, sized for the Profile's fits."""

    dispatch: Op
    allgather: Op
    expert: Op
    reducescatter: Op
    combine: Op


def counts_op(layout: Layout, num_experts: int, layer: int) -> Op:
    """The per-layer exchange of every rank's per-expert counts (int64), before the forward."""
    return Op("counts", "fwd", layer, 0, "counts", float(layout.world * num_experts * 8))


def chunk_ops(works: list[ChunkWork], dims: ExpertDims, layout: Layout, phase: str, layer: int) -> list[ChunkOps]:
    a2a_key = layout.a2a_key if layout.ep > 1 else ""
    exp_key = qualified("expert_fwd" if phase == "fwd" else "expert_bwd", dims.tag)
    out = []
    for i, cw in enumerate(works):
        n = op_sizes(cw, dims, layout)
        mk = lambda kind, key: Op(kind, phase, layer, i, key if n[kind] > 0 else "", n[kind])
        # dispatch and combine run different code around the same collective: each refits its
        # own line (the planner's t_a2a is the base fit over both)
        out.append(ChunkOps(mk("a2a_dispatch", qualified(a2a_key, "dispatch")), mk("allgather", "allgather"),
                            mk("expert", exp_key), mk("reducescatter", "reducescatter"),
                            mk("a2a_combine", qualified(a2a_key, "combine"))))
    return out


@dataclass(frozen=True)
class StageFns:
    """What each op does on data (all None in simulation)."""

    dispatch: Callable | None = None  # (src_ND, route) -> rows R
    allgather: Callable | None = None  # (rows R, route) -> gathered
    expert: Callable | None = None  # (gathered, route, i) -> gathered-layout output
    reducescatter: Callable | None = None  # (gathered, route) -> rows R
    combine: Callable | None = None  # (rows R, route) -> source rows of the chunk


def _no_window(eng, slot, r):
    pass


def run_pipeline(eng: Engine, lanes: Lanes, ops: list[ChunkOps], esp: int, fns: StageFns, src: Any,
                 routes: list, window: Callable = _no_window) -> list:
    """One direction of one MoE layer at degree r = len(ops). Returns the combine handles.

    Drawn for r = 4 with intra/inter overlap, expert-bound (FSMoE case 2). D dispatch A2A,
    G AllGather, X expert, S ReduceScatter, C combine A2A, R gradient AllReduce partition
    (backward only, queued by ``window``)::

        inter   |D0|D1|D2|D3|R.........|C0|    |C1|    |C2|    |C3|
        intra      |G0|G1|G2|G3|    |S0|    |S1|    |S2|    |S3|
        compute       |X0     |X1     |X2     |X3     |

    Without IIO (``lanes.intra == lanes.inter``) the same code queues one comm lane::

        comm    |D0|D1|D2|D3|G0|G1|G2|G3|R....|S0|C0|S1|C1|S2|C2|S3|C3|
        compute             |X0 ...

    1. Queue every chunk's dispatch A2A (inter), then every chunk's AllGather (intra; each waits
       for its own A2A). Lanes are in-order queues, so nothing here blocks the caller.
    2. ``window(slot="mid")``: the gradient partition planned for this layer joins the inter
       lane behind the dispatch side, where the lane would otherwise idle while experts run.
    3. Per chunk, in order: run the expert as soon as its AllGather is done (compute lane),
       then queue its ReduceScatter (intra) and combine A2A (inter); ``window(slot=i)`` after
       each combine (fixed-size Lina chunks use these).
    """
    r = len(ops)
    D = [eng.launch(lanes.inter, ops[i].dispatch, fns.dispatch, src, routes[i]) for i in range(r)]
    G = [eng.launch(lanes.intra, ops[i].allgather, fns.allgather, D[i], routes[i]) if esp > 1 else D[i]
         for i in range(r)]
    window(eng, "mid", r)
    C = []
    for i in range(r):
        X = eng.compute(ops[i].expert, fns.expert, G[i], routes[i], i)
        S = eng.launch(lanes.intra, ops[i].reducescatter, fns.reducescatter, X, routes[i]) if esp > 1 else X
        C.append(eng.launch(lanes.inter, ops[i].combine, fns.combine, S, routes[i]))
        window(eng, i, r)
    return C


@dataclass(frozen=True)
class LayerSchedule:
    """What the executor needs from a Schedule: degrees and whether AG/RS get their own lane."""

    r_fwd: int = 1
    r_bwd: int = 1
    iio: bool = True

    def __post_init__(self):
        for name in ("r_fwd", "r_bwd"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"LayerSchedule.{name}={v!r} is invalid: must be an integer >= 1")


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
