"""Refit samples from a traced run: rank 0's op timings (``fsmoe train --trace``, fsmoe.op_clock)
paired with the sizes its routing gave each op that step, in the units of the profile's fits
(``perf_model.op_sizes``), for ``fsmoe.schedule.model.profile.refit``:

    dispatch, forward     AlltoAll, n = bytes rank 0 sends (less the counts' exchange, priced)
    combine, forward      AlltoAll, n = bytes rank 0 received in dispatch (it sends them back)
    combine, backward     AlltoAll of the combine's gradient, n = bytes rank 0 sent in dispatch
    dispatch, backward    AlltoAll of the dispatch's gradient, n = bytes rank 0 received
    experts               expert_fwd / expert_bwd at the run's expert shape, n = forward MACs of
                          the rows rank 0's experts received

What the run's dispatcher takes beyond its collectives' lines, which ``fsmoe profile --config``
measures per layer and puts in the glue (``meta["dispatcher_extra_ms"]``, forward and backward),
is taken off the spans, half from dispatch and half from combine, so it is not counted twice.
Route and unroute are not refitted: the profile's glue is more than they are (norms, residuals,
the embedding).

Only layouts without ESP give AlltoAll samples (with ESP a span also holds the AllGather or
ReduceScatter); the first traced step (warm-up) and steps a pipelined schedule timed only as a
whole layer (NaN spans) are left out. The time of an op in training includes what it waits for
its peers: a refit from it prices that wait into the line, which is what a step prediction of
this run's layout wants (and what an isolated microbenchmark cannot see).
"""
from __future__ import annotations

import numpy as np

from fsmoe.parallel.layout import Layout
from fsmoe.schedule.model.profile import Profile, qualified
from fsmoe.schedule.types import LayerSpec


def trace_samples(trace, spec: LayerSpec, layout: Layout, profile: Profile) -> list[tuple[str, float, float]]:
    """``(key, n, seconds)`` of every traced op with a size (see the module docstring)."""
    from fsmoe.op_clock import OPS
    from fsmoe.schedule.model.perf_model import ExpertDims, counts_seconds

    if trace.ops_NMO is None:
        raise ValueError("the trace holds no op timings (traced by an older fsmoe)")
    fwd, bwd = trace.ops_NMO["forward"], trace.ops_NMO["backward"]
    col = {op: OPS.index(op) for op in OPS}
    dims = ExpertDims.of(spec, layout)
    El, rb = spec.num_experts // layout.ep, spec.d_model * spec.dtype_bytes
    macs_per_row = spec.d_model * dims.f_shard * spec.gemms
    counts = counts_seconds(profile, layout, spec.num_experts)
    a2a = layout.ep > 1 and layout.esp == 1
    extra_f, extra_b = (t / 1e3 for t in profile.meta.get("dispatcher_extra_ms", (0.0, 0.0)))
    out = []
    for n in range(1, len(trace.counts_NMRE)):
        for m in range(trace.counts_NMRE.shape[1]):
            f, b = fwd[n, m], bwd[n, m]
            if not (np.isfinite(f[:len(OPS)]).all() and np.isfinite(b[:len(OPS)]).all()):
                continue
            # [S, E] tokens from each source of rank 0's moe group (world ranks 0 .. moe - 1) to each
            # expert: under data parallelism the other groups' tokens never reach rank 0's experts
            C = trace.counts_NMRE[n, m, :layout.moe]
            send, recv = float(C[0].sum()), float(C[:, :El].sum())
            if a2a:
                out += [(layout.a2a_key, send * rb, f[col["dispatch"]] - counts - extra_f / 2),
                        (layout.a2a_key, recv * rb, f[col["combine"]] - extra_f / 2),
                        (layout.a2a_key, send * rb, b[col["combine"]] - extra_b / 2),
                        (layout.a2a_key, recv * rb, b[col["dispatch"]] - extra_b / 2)]
            out += [(qualified("expert_fwd", dims.tag), recv * macs_per_row, f[col["experts"]]),
                    (qualified("expert_bwd", dims.tag), recv * macs_per_row, b[col["experts"]])]
    return [(k, float(n), float(t)) for k, n, t in out if n > 0 and t > 0]
