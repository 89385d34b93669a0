"""Performance models of one MoE layer: workloads, per-chunk op times, FSMoE's four cases.

Notation (FSMoE §4):
    r        pipeline degree: the routed rows are cut into r chunks
    t_x(r)   time of op x on one chunk = alpha_x + (n_x / r) * beta_x
    a2a      EP AlltoAll (dispatch and combine: two per chunk), inter-node when EP spans nodes
    ag, rs   ESP AllGather / ReduceScatter (intra-node), one each per chunk
    exp      the expert FFN of one chunk (backward: the expert_bwd fit)
    gar      gradient AllReduce placed inside this layer (backward only; 0 in forward)

With intra/inter overlap (IIO) the A2As run on the inter lane, AG/RS on the intra lane and
experts on the compute lane. Each case is the bound set by one resource (plus pipeline fill and
drain), and its predicate says that resource is the bottleneck:

    case 1  inter-node (A2A + gar):  2 r t_a2a + t_gar
    case 2  expert compute:          2 t_a2a + t_ag + t_rs + r t_exp
    case 3  A2A:                     2 r t_a2a + t_ag + t_rs
    case 4  intra-node AG + RS:      2 t_a2a + r (t_ag + t_rs)

    Q1: t_a2a > t_ag               (A2A dominates the intra lane; case 3 over case 4)
    Q2: r t_exp > 2 (r-1) t_a2a     (expert over A2A; case 2 over case 3)
    Q3: r t_exp > (r-1)(t_ag+t_rs)  (expert over AG+RS; case 2 over case 4)
    Q4-Q7: t_gar exceeds the gap each other case leaves on the inter lane (case 1 over 2, 3, 4)

Without IIO (FSMoE-No-IIO, Tutel, PipeMoE) one comm lane carries a2a+ag+rs+a2a per chunk,
c = 2 t_a2a + t_ag + t_rs, and the layer is a two-stage pipeline: max(r c + t_gar, c + r t_exp).

Overlap efficiency eta (``Profile.overlap``, measured by the profiler): each objective is
eta * objective + (1 - eta) * serial, serial = r (2 t_a2a + t_ag + t_rs + t_exp) + t_gar, the
time if nothing overlapped. eta = 1 is FSMoE's model; the cases and predicates do not change
(serial is common to all cases), only how much pipelining can win.

Sizes: see ``LayerSpec`` and ``Layout``; ``chunk_counts`` cuts an integer count matrix the way the
executor does, so predictions for a real iteration use the same rows the executor moves.

Shape legend: S source ranks (the ep*esp ranks of one moe group), E experts, r chunks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fsmoe.placement.placement import Placement
from fsmoe.schedule.model.profile import Profile, qualified
from fsmoe.schedule.types import LayerSpec, Layout


# ---------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class LayerWork:
    """Per-rank sizes of one MoE layer (whole layer, i.e. r = 1; a chunk is 1/r of each)."""

    a2a_bytes: float  # one direction, bytes this rank sends
    ag_bytes: float  # gathered output
    rs_bytes: float  # reduce-scatter input
    expert_macs: float  # forward multiply-adds of this rank's expert shard
    gar_bytes: float  # one block's dense gradients
    dense_macs: float  # one block's attention forward
    expert_tag: str = ""  # ExpertDims.tag: the expert fits' shape qualifier


def layer_work(spec: LayerSpec, layout: Layout) -> LayerWork:
    rows, M, b = spec.routed_rows, spec.d_model, spec.dtype_bytes
    return LayerWork(
        a2a_bytes=rows * M * b if layout.ep > 1 else 0.0,
        ag_bytes=layout.esp * rows * M * b if layout.esp > 1 else 0.0,
        rs_bytes=layout.esp * rows * M * b if layout.esp > 1 else 0.0,
        expert_macs=layout.esp * rows * M * (spec.d_ff / layout.esp) * spec.gemms,
        gar_bytes=spec.dense_params * b if layout.dp > 1 else 0.0,
        dense_macs=spec.dense_macs, expert_tag=ExpertDims.of(spec, layout).tag)


@dataclass(frozen=True)
class ChunkTimes:
    """Per-chunk op times (seconds) at pipeline degree r; ``exp`` is forward or backward."""

    r: float
    a2a: float
    ag: float
    rs: float
    exp: float
    overlap: float = 1.0  # eta, from the Profile


def chunk_times(work: LayerWork, profile: Profile, layout: Layout, r: float, backward: bool = False) -> ChunkTimes:
    """t_x(r) = alpha_x + (n_x / r) beta_x for each op of one chunk (continuous r for SLSQP)."""
    ek = qualified("expert_bwd" if backward else "expert_fwd", work.expert_tag)
    return ChunkTimes(r=r, a2a=profile.t(layout.a2a_key, work.a2a_bytes / r),
                      ag=profile.t("allgather", work.ag_bytes / r), rs=profile.t("reducescatter", work.rs_bytes / r),
                      exp=profile.t(ek, work.expert_macs / r), overlap=profile.overlap_at(work.a2a_bytes / r))


def counts_seconds(profile: Profile, layout: Layout, num_experts: int) -> float:
    """The per-layer exchange of every moe-group rank's per-expert counts (int64): its own fit,
    else priced as an AlltoAll of its bytes (as the cluster simulator does); 0 without a moe group."""
    if layout.moe == 1:
        return 0.0
    return profile.t("counts" if profile.has("counts") else layout.a2a_key, layout.moe * num_experts * 8)


def layer_op_seconds(spec: LayerSpec, layout: Layout, profile: Profile) -> dict[str, dict[str, float]]:
    """phase -> op -> seconds of one MoE layer at r = 1, as the traced ops span them
    (fsmoe.op_clock): dispatch = the counts' exchange + the AlltoAll + the ESP AllGather,
    experts, combine = the ReduceScatter + the AlltoAll back; in backward the same transposed."""
    work = layer_work(spec, layout)
    fwd = chunk_times(work, profile, layout, 1)
    bwd = chunk_times(work, profile, layout, 1, backward=True)
    return {"forward": {"dispatch": counts_seconds(profile, layout, spec.num_experts) + fwd.a2a + fwd.ag,
                        "experts": fwd.exp, "combine": fwd.a2a + fwd.rs},
            "backward": {"dispatch": bwd.a2a + bwd.rs, "experts": bwd.exp, "combine": bwd.ag + bwd.a2a}}


CASES = (1, 2, 3, 4)


def case_objectives(ct: ChunkTimes, t_gar: float = 0.0, iio: bool = True) -> dict[int, float]:
    """Each case's layer time (see the module docstring). Without IIO: 1 = comm lane, 2 = expert."""
    r, a, g, s, x, eta = ct.r, ct.a2a, ct.ag, ct.rs, ct.exp, ct.overlap
    if not iio:
        c = 2 * a + g + s
        obj = {1: r * c + t_gar, 2: c + r * x}
    else:
        obj = {1: 2 * r * a + t_gar, 2: 2 * a + g + s + r * x, 3: 2 * r * a + g + s, 4: 2 * a + r * (g + s)}
    if eta >= 1.0:
        return obj
    serial = r * (2 * a + g + s + x) + t_gar
    return {c: eta * v + (1.0 - eta) * serial for c, v in obj.items()}


def predicates(ct: ChunkTimes, t_gar: float = 0.0) -> dict[str, bool]:
    """FSMoE's predicates Q1-Q7, evaluated at ct.r (Q4-Q7 written as case-1 dominance)."""
    r, a, g, s, x = ct.r, ct.a2a, ct.ag, ct.rs, ct.exp
    obj = case_objectives(ct, t_gar)
    return {"Q1": a > g, "Q2": r * x > 2 * (r - 1) * a, "Q3": r * x > (r - 1) * (g + s),
            "Q4": obj[1] > obj[2], "Q5": obj[1] > obj[3], "Q6": obj[1] > obj[4], "Q7": t_gar > 0}


def layer_time(ct: ChunkTimes, t_gar: float = 0.0, iio: bool = True) -> tuple[float, int]:
    """(time, case): the bottleneck case's objective."""
    obj = case_objectives(ct, t_gar, iio)
    case = max(obj, key=obj.get)
    return obj[case], case


# ---------------------------------------------------------------------------- integer routes


def chunk_bounds(counts: np.ndarray, r: int) -> np.ndarray:
    """[r + 1, *counts.shape]: chunk i of a group of c rows is rows [(i c) // r, ((i+1) c) // r).

    Powers of two nest: every chunk boundary at r is one at 2r, so a backward degree may differ
    from the forward one and still address the forward's saved rows exactly.
    """
    i = np.arange(r + 1).reshape((-1,) + (1,) * counts.ndim)
    return (i * counts[None].astype(np.int64)) // r


def chunk_counts(counts: np.ndarray, r: int) -> np.ndarray:
    """[r, *counts.shape] rows per chunk (sum over chunks = counts)."""
    return np.diff(chunk_bounds(counts, r), axis=0)


def balanced_counts(spec: LayerSpec, layout: Layout) -> np.ndarray:
    """[S, E] counts of the S = ep*esp ranks of a moe group with perfectly balanced routing: what
    ``plan`` assumes before training."""
    rows = spec.routed_rows
    base, extra = divmod(rows, spec.num_experts)
    row = np.full(spec.num_experts, base, dtype=np.int64)
    row[:extra] += 1
    return np.tile(row, (layout.moe, 1))


@dataclass(frozen=True)
class ChunkWork:
    """Sizes of one chunk's ops on one rank (integers; what the executor really moves)."""

    send_rows: int  # dispatch A2A: rows this rank sends (combine receives as many back)
    recv_rows: int  # dispatch A2A: rows this rank receives (combine sends as many)
    gather_rows: int  # rows after the ESP AllGather, padded: esp * max over ESP peers
    expert_rows: int  # rows the expert computes (unpadded)


def route_work(counts_SE: np.ndarray, r: int, layout: Layout, rank: int,
               placement: Placement | None = None) -> list[ChunkWork]:
    """Per-chunk sizes for ``rank`` given every rank's per-expert counts ``counts_SE`` (by logical
    expert); ``placement`` says which EP rank holds which expert (default: contiguous ranges)."""
    if placement is not None:
        counts_SE = counts_SE[:, list(placement.physical_order)]  # columns in physical (rank-major) order
    El = counts_SE.shape[1] // layout.ep
    cc_rSE = chunk_counts(counts_SE, r)
    p, q = divmod(rank, layout.esp)
    to_p_rS = cc_rSE[:, :, p * El:(p + 1) * El].sum(-1)  # rows each source sends to EP rank p's experts
    recv_rQ = to_p_rS.reshape(r, layout.ep, layout.esp).sum(1)  # rows ESP peer (p, qq) receives
    send_r = cc_rSE[:, rank].sum(-1)
    return [ChunkWork(send_rows=int(send_r[i]), recv_rows=int(recv_rQ[i, q]),
                      gather_rows=layout.esp * int(recv_rQ[i].max()), expert_rows=int(recv_rQ[i].sum()))
            for i in range(r)]


@dataclass(frozen=True)
class ExpertDims:
    """What op sizes depend on: model dim, this shard's hidden dim, GEMMs per FFN, bytes/element,
    experts on this rank."""

    d_model: int
    f_shard: int
    gemms: int
    dtype_bytes: int
    local_experts: int = 0  # 0: unknown (no shape-specific fit)

    @property
    def tag(self) -> str:
        """The expert shape, for its shape-specific fits (``expert_fwd@<tag>``)."""
        if not self.local_experts:
            return ""
        return f"E{self.local_experts}m{self.d_model}f{self.f_shard}g{self.gemms}B{self.dtype_bytes}"

    @staticmethod
    def of(spec: LayerSpec, layout: Layout) -> "ExpertDims":
        return ExpertDims(spec.d_model, spec.d_ff // layout.esp, spec.gemms, spec.dtype_bytes,
                          spec.num_experts // layout.ep)


def op_sizes(cw: ChunkWork, dims: ExpertDims, layout: Layout) -> dict[str, float]:
    """Fit-model sizes of one chunk's ops (bytes, or forward MACs for the expert), keyed by op kind."""
    rb = dims.d_model * dims.dtype_bytes
    return {"a2a_dispatch": cw.send_rows * rb if layout.ep > 1 else 0.0,
            "a2a_combine": cw.recv_rows * rb if layout.ep > 1 else 0.0,
            "allgather": cw.gather_rows * rb if layout.esp > 1 else 0.0,
            "reducescatter": cw.gather_rows * rb if layout.esp > 1 else 0.0,
            "expert": float(cw.expert_rows * dims.d_model * dims.f_shard * dims.gemms)}
