"""The schedule program of one MoE layer: its ops, sized for the Profile, and ``run_pipeline``.

Pure: the program runs on any ``Engine`` (``model.engine.SimEngine`` for predictions, the
runtime's thread and stream engines for real), with ``StageFns`` None in simulation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from fsmoe.schedule.model.engine import Engine
from fsmoe.schedule.model.perf_model import ChunkWork, ExpertDims, op_sizes
from fsmoe.schedule.model.profile import qualified
from fsmoe.schedule.types import Lanes, Layout, Op

# window(eng, layer, slot, r): slot "mid" after the dispatch side is queued, then i after combine i.
WindowHook = Callable[[Engine, int, Any, int], None]


@dataclass(frozen=True)
class ChunkOps:
    """The five ops of one chunk, sized for the Profile's fits."""

    dispatch: Op
    allgather: Op
    expert: Op
    reducescatter: Op
    combine: Op


def counts_op(layout: Layout, num_experts: int, layer: int) -> Op:
    """The per-layer exchange of every moe-group rank's per-expert counts (int64), before the forward."""
    return Op("counts", "fwd", layer, 0, "counts", float(layout.moe * num_experts * 8))


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

    dispatch: Callable | None = None  # (src_ND, chunk) -> the chunk in flight to its experts
    allgather: Callable | None = None  # (in flight, chunk) -> the experts' input (esp > 1)
    expert: Callable | None = None  # (input, chunk, i) -> the experts' output
    reducescatter: Callable | None = None  # (output, chunk) -> partial sums reduced (esp > 1)
    combine: Callable | None = None  # (reduced, chunk) -> the chunk's rows back at their source


def _no_window(eng, slot, r):
    pass


def run_pipeline(eng: Engine, lanes: Lanes, ops: list[ChunkOps], esp: int, fns: StageFns, src: Any,
                 chunks: list, window: Callable = _no_window) -> list:
    """One direction of one MoE layer at degree r = len(ops). Returns the combine handles.
    ``chunks[i]`` is passed to chunk i's stage functions (its ``DispatchLayout``; None in simulation).

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
    D = [eng.launch(lanes.inter, ops[i].dispatch, fns.dispatch, src, chunks[i]) for i in range(r)]
    G = [eng.launch(lanes.intra, ops[i].allgather, fns.allgather, D[i], chunks[i]) if esp > 1 else D[i]
         for i in range(r)]
    window(eng, "mid", r)
    C = []
    for i in range(r):
        X = eng.compute(ops[i].expert, fns.expert, G[i], chunks[i], i)
        S = eng.launch(lanes.intra, ops[i].reducescatter, fns.reducescatter, X, chunks[i]) if esp > 1 else X
        C.append(eng.launch(lanes.inter, ops[i].combine, fns.combine, S, chunks[i]))
        window(eng, i, r)
    return C
