"""Step time of a model and layout on a cluster we cannot run: the scheduler's own models
(``fsmoe.schedule.model``: plan, simulated iteration) fed with compute fits from a measured
``Profile`` and communication fits from the fabric simulator.

    prof = cluster_profile(measured, layout, fabric)   # compute from `fsmoe profile`, comm from the fabric
    sched = plan(spec, layout, prof, "fsmoe")          # predicted_iter_s: the step's time

Communication fits (``t = alpha + n beta``, n in the scheduler's units: an AlltoAll's n is the
bytes one rank's buffer holds, an AllReduce's the bytes it reduces):

* the EP AlltoAll: every EP group of the layout at once (ranks placed as the runtime places them,
  ``gpus_per_node`` per server), each member sending 1/ep of its buffer to every other member;
* the dense gradients' AllReduce, hierarchical as NCCL runs it on multi-GPU servers: a ring
  inside each server over its g members of the group (2 (g - 1) / g of the buffer each, NVSwitch),
  then g rings across the S servers, one per local GPU index over that GPU's own NIC, each on
  1/g of the buffer (2 (S - 1) / S of it per member); the two phases one after the other, every
  data-parallel group at once. On an optical fabric this traffic takes the electrical ports only
  (mFabric keeps its circuits for EP);
* the ESP AllGather / ReduceScatter: a ring over each ESP group, (s - 1) / s of the buffer;
* the per-layer exchange of expert counts: priced as the EP AlltoAll of its bytes;
* with tensor parallelism (mp > 1), its AllGather (``tp_allgather``: a ring over each mp group,
  (m - 1) / m of the gathered bytes) and AllReduce (``tp_allreduce``: twice that), every mp group
  at once, on the electrical ports of an optical fabric.

beta is the simulated makespan per byte (flow-level: time is linear in bytes); alpha, which a
flow-level simulation has none of, is the measured profile's for that collective where it has
one, else ``default_alpha_s``. The step beyond the MoE blocks (dense blocks, head, tensor
parallelism, other gradients, optimizer) is ``fsmoe.sim.step``'s. Compute fits (experts,
attention, head, glue) are the measured ones with their GEMM slopes divided by ``gemm_scale``
(the target GPU's dense throughput over the profiled one's, e.g. from published bf16 TFLOP/s).
The overlap efficiency eta stays the measured one.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from fsmoe.parallel.layout import Layout
from fsmoe.schedule.model.plan import links
from fsmoe.schedule.model.profile import LinearFit, Profile, base_key
from fsmoe.sim.fabrics import Flows, LeafSpine
from fsmoe.sim.flows import simulate
from fsmoe.sim.optical import RegionalOCS

PROBE_BYTES = 64 * 2**20  # flow-level time is linear in bytes: one size gives the slope


def alltoall_flows(groups: list[list[int]], nbytes: float) -> Flows:
    """Each member of each group sends nbytes / len(group) to every other member."""
    src, dst = [], []
    for g in groups:
        a = np.asarray(g)
        s, d = np.meshgrid(a, a, indexing="ij")
        off = s != d
        src.append(s[off])
        dst.append(d[off])
    src, dst = np.concatenate(src), np.concatenate(dst)
    per = nbytes / max(len(groups[0]), 1)
    return Flows(src, dst, np.full(len(src), float(per)))


def ring_flows(groups: list[list[int]], bytes_each: float) -> Flows:
    """Each member of each group sends ``bytes_each`` to the next member (in group order)."""
    src = np.concatenate([np.asarray(g) for g in groups if len(g) > 1] or [np.zeros(0, np.int64)])
    dst = np.concatenate([np.roll(np.asarray(g), -1) for g in groups if len(g) > 1] or [np.zeros(0, np.int64)])
    return Flows(src, dst, np.full(len(src), float(bytes_each)))


def allreduce_phases(groups: list[list[int]], nbytes: float, gpus_per_server: int) -> list[Flows]:
    """The two phases of a hierarchical ring AllReduce of ``nbytes`` over each group (see the
    module docstring): [inside servers, across servers]."""
    intra, inter = [], []
    g, S = 1, 1
    for grp in groups:
        by_server: dict[int, list[int]] = {}
        for r in grp:
            by_server.setdefault(r // gpus_per_server, []).append(r)
        members = list(by_server.values())
        g, S = len(members[0]), len(members)
        if any(len(m) != g for m in members):
            raise ValueError("a data-parallel group must take as many GPUs from every server")
        intra += members
        inter += [[m[c] for m in members] for c in range(g)]
    return [ring_flows(intra, 2 * (g - 1) / g * nbytes), ring_flows(inter, 2 * (S - 1) / S * nbytes / g)]


def makespan_s(fabric, flows: Flows, batch: float = 0.01, share_tol: float = 0.01, circuits: bool = True) -> float:
    """Seconds until the last flow ends on ``fabric`` (a ``LeafSpine``, or a ``RegionalOCS``
    with circuits planned for this traffic, a collective that repeats every step being
    predicted, or with ``circuits=False`` on its electrical ports alone)."""
    if len(flows.src) == 0:
        return 0.0
    if isinstance(fabric, RegionalOCS):
        S = fabric.servers
        plan = fabric.plan(fabric.server_demand(flows)) if circuits else np.zeros((S, S), dtype=np.int64)
        A, cap, size = fabric.incidence(flows, plan)
    else:
        A, size = fabric.incidence(flows)
        cap = fabric.capacity()
    return simulate(A, cap, size, batch=batch, share_tol=share_tol).makespan_s


def _fit(measured: Profile, key: str, seconds_per_byte: float, default_alpha_s: float) -> LinearFit:
    alpha = measured.fits[key].alpha if key in measured.fits else default_alpha_s
    return LinearFit(alpha, seconds_per_byte, 1.0, 1)


def staged_groups(layout: Layout, kind: str, stages: int) -> list[list[int]]:
    """The groups of ``kind`` in every pipeline stage (stage s: ranks ``s * world ..``), which
    run their collectives at the same time."""
    return [[r + s * layout.world for r in g] for s in range(stages) for g in layout.all_groups(kind)]


def p2p_seconds(fabric, layout: Layout, stages: int, nbytes: float) -> float:
    """Every rank of every stage but the last sending ``nbytes`` to its peer in the next stage
    (pipeline activations; their gradients go back the same way)."""
    if stages < 2:
        return 0.0
    w = layout.world
    src = np.arange((stages - 1) * w)
    return makespan_s(fabric, Flows(src, src + w, np.full(len(src), float(nbytes))), circuits=False)


def comm_fits(layout: Layout, fabric: LeafSpine | RegionalOCS, measured: Profile,
              default_alpha_s: float = 20e-6, stages: int = 1) -> dict[str, LinearFit]:
    """The layout's collectives on ``fabric`` as fits (see the module docstring); with
    ``stages`` > 1 the layout is one pipeline stage and every stage's groups run at once."""
    n = float(PROBE_BYTES)
    fits = {}
    fits["counts"] = LinearFit(0.0, 0.0, 1.0, 1)
    groups = lambda kind: staged_groups(layout, kind, stages)
    if layout.ep > 1:
        t = makespan_s(fabric, alltoall_flows(groups("ep"), n))
        fits[layout.a2a_key] = _fit(measured, layout.a2a_key, t / n, default_alpha_s)
        # the per-layer exchange of expert counts: an AllGather over the moe group, which moves
        # as many bytes per rank as an AlltoAll of the gathered buffer (a measured fit at one
        # small size would extrapolate its latency as if it were bandwidth)
        fits["counts"] = fits[layout.a2a_key]
    if layout.dp > 1:
        gps = fabric.gpus_per_server
        t = sum(makespan_s(fabric, f, circuits=False) for f in allreduce_phases(groups("dp"), n, gps))
        fits["allreduce"] = _fit(measured, "allreduce", t / n, default_alpha_s)
    if layout.esp > 1:
        s = layout.esp
        t = makespan_s(fabric, ring_flows(groups("esp"), (s - 1) / s * n))
        for key in ("allgather", "reducescatter"):
            fits[key] = _fit(measured, key, t / n, default_alpha_s)
    if layout.mp > 1:  # tensor parallelism: rings over each mp group (inside a server as placed)
        m = layout.mp
        gather = makespan_s(fabric, ring_flows(groups("mp"), (m - 1) / m * n), circuits=False)
        fits["tp_allgather"] = _fit(measured, "allgather", gather / n, default_alpha_s)
        fits["tp_allreduce"] = _fit(measured, "allreduce", 2 * gather / n, default_alpha_s)
    return fits


def cluster_profile(measured: Profile, layout: Layout, fabric: LeafSpine | RegionalOCS, *,
                    gemm_scale: float = 1.0, default_alpha_s: float = 20e-6, stages: int = 1) -> Profile:
    """``measured``'s compute fits (slopes / ``gemm_scale``) with the fabric's communication."""
    if gemm_scale <= 0:
        raise ValueError("gemm_scale must be > 0")
    comm = {"a2a_inter", "a2a_intra", "allgather", "reducescatter", "allreduce", "grad_sync", "counts",
            "tp_allgather", "tp_allreduce"}
    fits = {k: (dataclasses.replace(f, beta=f.beta / gemm_scale) if base_key(k).startswith(("expert", "dense", "head"))
                else f)
            for k, f in measured.fits.items() if base_key(k) not in comm and not base_key(k).startswith("a2a_level")}
    fits.update(comm_fits(layout, fabric, measured, default_alpha_s, stages))
    return dataclasses.replace(measured, hardware=f"{measured.hardware}-on-{fabric.name.replace(' ', '_')}",
                               layout=layout.name, fits=fits, points={})


def scale_lines(profile: Profile, keys: tuple[str, ...], factor: float) -> Profile:
    """``profile`` with the slopes of the fits whose base key is in ``keys`` multiplied by
    ``factor`` (shape-qualified fits too): fewer bytes on the wire (dedup), or the busiest rank's
    load over the mean (placement)."""
    scaled = {k: dataclasses.replace(f, beta=f.beta * factor) for k, f in profile.fits.items() if base_key(k) in keys}
    return dataclasses.replace(profile, fits={**profile.fits, **scaled})


def layout_of(name: str, world: int) -> Layout:
    """The Layout a profile or bench result names (``ep2-esp1-nodes2x1``) on ``world`` ranks."""
    import re

    m = re.fullmatch(r"ep(\d+)-esp(\d+)-nodes(\d+)x(\d+)", name)
    if not m:
        raise ValueError(f"layout name {name!r} is not of the form ep<E>-esp<S>-nodes<N>x<G>")
    ep, esp, nodes, gpn = map(int, m.groups())
    return Layout(dp=world, ep=ep, esp=esp, gpus_per_node=gpn if nodes > 1 else None)


def calibrate(results: dict, fabric: LeafSpine | RegionalOCS, *, n_layers: int = 2, dtype_bytes: int = 2,
              policies=("default", "fsmoe", "tutel_improved")) -> dict:
    """Predict every config of a ``fsmoe bench schedule`` results.json with the fabric's
    communication (compute from the run's own refitted profile) and compare with the measured
    iterations: per policy the median predicted / measured and the median and largest |error|."""
    from fsmoe.schedule.model.plan import plan
    from fsmoe.schedule.types import LayerSpec

    layout = layout_of(results["layout"], int(results["world"]))
    prof = cluster_profile(Profile.from_dict(results["refitted"]), layout, fabric)
    ratios = {p: [] for p in policies}
    for row in results["rows"]:
        c = row["config"]
        spec = LayerSpec(batch=c["B"], seq_len=c["L"], d_model=c["M"], d_ff=c["H"], num_experts=c["E"], top_k=2,
                         n_heads=c["heads"], capacity_factor=c["f"], activation=c["ffn"], n_layers=n_layers,
                         dtype_bytes=dtype_bytes, grad_bytes=dtype_bytes)
        for p in policies:
            ratios[p].append(plan(spec, layout, prof, p).predicted_iter_s / row["seconds"][p])
    out = {}
    for p, r in ratios.items():
        err = np.abs(np.asarray(r) - 1.0)
        out[p] = {"median_ratio": float(np.median(r)), "median_abs_error": float(np.median(err)),
                  "max_abs_error": float(err.max()), "within_10pct": int((err <= 0.10).sum()), "configs": len(r),
                  "ratios": [float(x) for x in r]}
    return {"layout": layout.name, "fabric": fabric.name, "links": links(prof), "policies": out}

