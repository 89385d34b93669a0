"""``fsmoe bench dispatch``: dispatch + combine time and bytes per level of every dispatcher, on
the same routing, on this machine's ranks (gloo on CPUs, NCCL on GPUs); ``--sweep``: the same
comparison predicted by the cost model for clusters of G GPUs and top-K routing.

Backends (one MoE layer's token movement, experts replaced by the identity):

    flat           the EP AlltoAll sending each token once per expert (Megatron-style)
    2dh            two levels without dedup (Tutel-2DH-style)
    hier-d1..dD    HierMoE's d-dim AlltoAll with dedup at every level (d1: flat with dedup per GPU)
    hier-auto      d chosen per dispatch by the cost model (``--profile`` fits, else LevelCosts.defaults)

Routing (per rank, seeded): ``uniform`` (random logits, top-K), ``skewed`` (a Zipf bias towards
a few experts), ``grouped`` (DeepSeek-V3: experts in ``--groups`` groups, each token limited to
``--topk-groups`` of them), or a recorded ``.pt`` file holding expert ids ``[world, T, K]``.

Measured (``--iters`` runs after ``--warmup``; each run's time is the slowest rank's): the
forward (Order, dispatch, combine, I-Order: tokens in, weighted sums out; the experts are the
identity) and forward + backward. Bytes per level are the rows the
dispatcher moved over each level of the topology (summed over ranks, dispatch; combine moves as
many back) times the bytes of a row; the dedup factor of a level is flat's bytes over the
backend's.

Sweep (pure; HierMoE's testbed shape: nodes of 2 sockets x 2 PCIe switches x 2 NVLink-paired
GPUs; 200 Gb/s between nodes): G in {8, 16, 32}, K in {2, 4, 6, 8, 10}; predicted dispatch +
combine of flat, 2DH, HierD (best d), HierD + ES (``--swaps`` greedy HierD-ES swaps) and
HD2 + SmartMoE (d = 2, swaps by token counts); speedups over flat and over HD2 + SmartMoE.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fsmoe.cli.arg_types import non_negative_int, output_file, plot_file, positive_int
from fsmoe.comm.topology import LevelCosts, Levels, Stage, stages_for_depth
from fsmoe.comm.traffic import count_traffic, predict
from fsmoe.config import ConfigError, ExpertsConfig, MoEConfig, RouterConfig
from fsmoe.order import IndexOrder, SummedIndexOrder
from fsmoe.parallel.groups import ParallelGroups
from fsmoe.parallel.launch import add_command_arguments, run_command
from fsmoe.routing.deepseek import limit_to_groups
from fsmoe.routing.plan import RoutingPlan

ROUTINGS = ("uniform", "skewed", "grouped")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_command_arguments(p, nproc=8, ep=8)
    p.add_argument("--tokens", type=positive_int, default=256, help="tokens per rank")
    p.add_argument("--d-model", type=positive_int, default=256)
    p.add_argument("--experts", type=positive_int, default=64)
    p.add_argument("--top-k", type=positive_int, default=8)
    p.add_argument("--routing", default="grouped", help=f"{'|'.join(ROUTINGS)} or a .pt file of ids [world, T, K]")
    p.add_argument("--groups", type=positive_int, default=8, help="expert groups (grouped routing)")
    p.add_argument("--topk-groups", type=int, default=4, help="groups per token (grouped routing)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--iters", type=positive_int, default=10)
    p.add_argument("--warmup", type=non_negative_int, default=5)
    p.add_argument("--profile", default=None, help="Profile JSON with per-level fits (fsmoe profile --topology)")
    p.add_argument("--json", type=output_file, default=None, help="write the results here")
    p.add_argument("--sweep", action="store_true", help="only the cost-model sweep over G and K (no processes)")
    p.add_argument("--swaps", type=int, default=2, help="greedy expert swaps per point of the sweep")
    p.add_argument("--png", type=plot_file, default=None,
                   help="plot here: bytes per level (measured) or speedups (--sweep)")


def run(args) -> int:
    if args.top_k > args.experts:
        raise ConfigError("--top-k", args.top_k, f"must be <= --experts={args.experts}")
    if not args.sweep and args.experts % args.ep:
        raise ConfigError("--experts", args.experts, f"must be a multiple of --ep={args.ep}")
    if args.sweep:
        return _print_sweep(args)
    return run_command(args, lambda groups, device: _bench_main(args, groups, device))


# ---------------------------------------------------------------------------- routing


def make_ids(kind: str, T: int, E: int, K: int, seed: int, groups: int = 8, topk_groups: int = 4) -> torch.Tensor:
    """[T, K] expert ids of one rank's tokens (see module docstring)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    if kind == "skewed":
        logits = logits - 1.2 * torch.log(torch.arange(1, E + 1, dtype=torch.float32))[torch.randperm(
            E, generator=torch.Generator().manual_seed(0))]
    elif kind == "grouped":
        if E % groups or not 1 <= topk_groups <= groups:
            raise ConfigError("--groups", groups, f"must divide --experts={E} and be >= --topk-groups={topk_groups}")
        logits = limit_to_groups(logits, groups, topk_groups)
    elif kind not in ROUTINGS:
        raise ConfigError("--routing", kind, f"allowed values are {list(ROUTINGS)} or a .pt file")
    return logits.topk(K, dim=-1).indices


def rank_ids(args, rank: int, world: int) -> torch.Tensor:
    if args.routing.endswith(".pt"):
        ids = torch.load(args.routing)
        if ids.dim() != 3 or ids.shape[0] != world:
            raise ConfigError("--routing", args.routing, f"must hold expert ids [world={world}, T, K]")
        return ids[rank].to(torch.int64)
    return make_ids(args.routing, args.tokens, args.experts, args.top_k, 1000 + rank, args.groups, args.topk_groups)


# ---------------------------------------------------------------------------- measured


def _backends(levels: Levels) -> list[tuple[str, str, int]]:
    """(name, dispatcher, fixed d) of every backend for these levels."""
    out = [("flat", "alltoall", 0)]
    if levels.depth >= 2:
        out.append(("2dh", "2dh", 0))
    out += [(f"hier-d{d}", "hierarchical", d) for d in range(1, levels.depth + 1)]
    return out + [("hier-auto", "hierarchical", 0)]


def _timed(fn, device, iters: int, warmup: int, group) -> float:
    """Median over runs of the slowest rank's seconds."""
    times = []
    for i in range(warmup + iters):
        dist.barrier(group=group)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        if i >= warmup:
            times.append(float(t))
    return statistics.median(times)


def _bench_main(args, groups: ParallelGroups, device: torch.device) -> int:
    from fsmoe.comm.hierarchical import HierarchicalDispatcher
    from fsmoe.parallel.levels import levels_of
    from fsmoe.parallel.moe import build_dispatcher
    from fsmoe.schedule.model.profile import Profile

    if groups.ep < 2:
        raise ConfigError("--ep", groups.ep, "the dispatch benchmark needs EP >= 2")
    dtype = getattr(torch, args.dtype)
    levels = levels_of(groups)
    E, K, D = args.experts, args.top_k, args.d_model
    ids = rank_ids(args, groups.rank, groups.world).to(device)
    w = torch.softmax(torch.randn(ids.shape, generator=torch.Generator().manual_seed(groups.rank)), -1).to(device)
    plan = RoutingPlan.from_topk(ids, w, E)
    x = torch.randn(ids.shape[0], D, generator=torch.Generator().manual_seed(7 + groups.rank)).to(device, dtype)
    profile = Profile.load(args.profile) if args.profile else None
    results = []
    for name, kind, depth in _backends(levels):
        cfg = MoEConfig(num_experts=E, router=RouterConfig(top_k=K), experts=ExpertsConfig(d_ff=8),
                        dispatcher=kind, dedup_depth=depth)
        disp = build_dispatcher(cfg, groups, d_model=D)
        if isinstance(disp, HierarchicalDispatcher):
            disp.costs = LevelCosts.from_profile(profile, levels)
        # the Order and I-Order are timed too: flat weights the rows in the I-Order, the
        # hierarchical dispatcher at the destination (then its I-Order only adds rows)
        order = SummedIndexOrder() if disp.applies_weights else IndexOrder()

        def forward(grad: bool):
            xx = x.detach().requires_grad_(grad)
            rows, _, handle = disp.dispatch(order.permute(xx, plan), plan)
            y = order.unpermute(disp.combine(rows, handle), plan)
            if grad:
                y.sum().backward()

        fwd = _timed(lambda: forward(False), device, args.iters, args.warmup, groups.world_group)
        both = _timed(lambda: forward(True), device, args.iters, args.warmup, groups.world_group)
        cal = disp.policy.calibration if isinstance(disp, HierarchicalDispatcher) else None
        calibrated = {} if cal is None or cal.offset_s is None else \
            {"calibration_ms": {p: s * 1e3 for p, s in cal.offset_s.items()}}
        results.append(dict(name=name, fwd_ms=fwd * 1e3, fwd_bwd_ms=both * 1e3, **calibrated,
                            **_bytes(disp, plan, levels, D, x)))
    if groups.rank == 0:
        report = {"world": groups.world, "levels": list(levels.sizes), "level_names": list(levels.names),
                  "tokens_per_rank": args.tokens, "d_model": D, "experts": E, "top_k": K, "routing": args.routing,
                  "device": str(device), "backend": groups.backend, "dtype": args.dtype, "results": results}
        print(format_table(report))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=1))
        if args.png:
            plot_bytes(report, args.png)
    return 0


def measure_overhead(groups: ParallelGroups, device: torch.device, costs: LevelCosts, tokens: int = 64,
                     d_model: int = 64, iters: int = 10, warmup: int = 3) -> dict:
    """The hierarchical dispatcher's fixed cost per d, measured (``fsmoe profile --topology``).

    On small messages (``tokens`` per rank of ``d_model`` floats, top-2 uniform routing over 2
    experts per rank), dispatch + combine of the flat dispatcher and of the hierarchical one at
    every d (median of ``iters`` runs, each the slowest rank's). A d's fixed cost is what it
    took beyond the flat one's time less the cost model's difference between the two
    (``costs``' alpha-beta lines; no fixed cost): the layout's index building, host syncs and
    launches that no alpha-beta line counts. Also the layout alone (its one AllReduce and the
    host-side work). Returns {"overhead_s": (d = 1..D), "flat_ms", "hier_ms", "layout_ms",
    "model_ms", "flat_model_ms"}."""
    from fsmoe.comm.hierarchical import HierarchicalDispatcher
    from fsmoe.parallel.levels import levels_of
    from fsmoe.parallel.moe import build_dispatcher

    levels = levels_of(groups)
    E, K = 2 * groups.ep, 2
    ids = make_ids("uniform", tokens, E, K, 2000 + groups.rank).to(device)
    w = torch.softmax(torch.randn(ids.shape, generator=torch.Generator().manual_seed(groups.rank)), -1).to(device)
    plan = RoutingPlan.from_topk(ids, w, E)
    x = torch.randn(tokens, d_model, generator=torch.Generator().manual_seed(groups.rank)).to(device)
    x_ND = IndexOrder().permute(x, plan)
    free = LevelCosts(costs.alpha, costs.beta)  # no fixed cost: the model's part alone

    def build(kind: str, depth: int):
        cfg = MoEConfig(num_experts=E, router=RouterConfig(top_k=K), experts=ExpertsConfig(d_ff=8), dispatcher=kind,
                        dedup_depth=depth)
        disp = build_dispatcher(cfg, groups, d_model=d_model)
        if isinstance(disp, HierarchicalDispatcher):
            disp.costs = free
        return disp

    def run(disp):
        rows, _, handle = disp.dispatch(x_ND, plan)
        disp.combine(rows, handle)

    def timed(fn):
        with torch.no_grad():
            return _timed(fn, device, iters, warmup, groups.world_group)

    flat_disp = build("alltoall", 0)
    flat = timed(lambda: run(flat_disp))
    auto = build("hierarchical", 0)  # one dispatch for the model's times of every d and of flat
    run(auto)
    st = auto.last_stats
    out = {"flat_ms": flat * 1e3, "flat_model_ms": st.flat_s * 1e3, "hier_ms": [], "layout_ms": [], "model_ms": [],
           "overhead_s": []}
    for d in range(1, levels.depth + 1):
        disp = build("hierarchical", d)
        t = timed(lambda: run(disp))
        out["layout_ms"].append(timed(lambda: disp.layout(plan)) * 1e3)
        out["hier_ms"].append(t * 1e3)
        out["model_ms"].append(st.predicted_s[d - 1] * 1e3)
        out["overhead_s"].append(max(0.0, (t - flat) - (st.predicted_s[d - 1] - st.flat_s)))
    return out


def plot_bytes(report: dict, png: str) -> None:
    """Bytes per level of each backend (dispatch, summed over ranks), grouped by level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, results = report["level_names"], report["results"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(names) * len(results) / 3, 3.4))
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        ax.bar([j + i * width for j in range(len(names))], [b / 2**20 for b in r["bytes_per_level"]], width,
               label=f"{r['name']} ({r['fwd_ms']:.1f} ms)")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], [f"{n} level" for n in names])
    ax.set_ylabel("MiB moved (dispatch)")
    ax.set_title(f"{report['world']} ranks {report['levels']}, top-{report['top_k']}, {report['routing']} routing",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _bytes(disp, plan, levels: Levels, D: int, x) -> dict:
    """Bytes per level of the backend's last dispatch (summed over ranks) and flat's. A
    hierarchical dispatch reports what its AlltoAlls put on the wire: each rank adds up the
    elements it sent to peers across each level (features, weights, metadata bytes and their
    padding); flat: one row of features per (token, expert). Rows per level too."""
    from fsmoe.comm.hierarchical import HierarchicalDispatcher

    elem = x.element_size()
    if isinstance(disp, HierarchicalDispatcher):
        st = disp.last_stats
        sent = torch.tensor(disp.last_sent_bytes if st.depth else [0] * levels.depth, dtype=torch.int64,
                            device=x.device)
        dist.all_reduce(sent, group=disp.counts_group)
        flat_bytes = [r * D * elem for r in st.flat_rows_per_level]
        out = dict(depth=st.depth, bytes_per_level=sent.tolist() if st.depth else flat_bytes,
                   flat_bytes_per_level=flat_bytes, rows_per_level=list(st.rows_per_level),
                   flat_rows_per_level=list(st.flat_rows_per_level), predicted_ms=[t * 1e3 for t in st.predicted_s],
                   flat_predicted_ms=None if st.flat_s is None else st.flat_s * 1e3)
    else:
        E = plan.num_experts
        ranks = torch.tensor([disp.placement.rank_of(e) for e in range(E)] + [-1], device=x.device)
        flat = _flat_rows(ranks[plan.expert_ids_N[plan.token_slots_TK]], levels, disp)
        out = dict(depth=1, bytes_per_level=[r * D * elem for r in flat], flat_bytes_per_level=[r * D * elem for r in flat],
                   rows_per_level=flat, flat_rows_per_level=flat)
    out["dedup_factor"] = [f / b if b else None for f, b in zip(out["flat_bytes_per_level"], out["bytes_per_level"])]
    out["row_dedup_factor"] = [f / b if b else None for f, b in zip(out["flat_rows_per_level"], out["rows_per_level"])]
    return out


def _flat_rows(dest, levels: Levels, disp) -> list[int]:
    """Rows per level of the flat AlltoAll, summed over the moe group."""
    src = torch.full((dest.shape[0],), disp.ep_rank, dtype=torch.int64, device=dest.device)
    tr = count_traffic(dest, src, levels, (Stage(0, levels.depth - 1),), dedup=False)
    rows = tr.send.sum(dim=(0, 1))
    dist.all_reduce(rows, group=disp.counts_group)
    return rows.tolist()


def format_table(report: dict) -> str:
    names = report["level_names"]
    head = (f"dispatch + combine on {report['world']} ranks ({report['backend']}, {report['device']}), levels "
            f"{report['levels']} {names}, {report['tokens_per_rank']} tokens/rank, d_model {report['d_model']}, "
            f"E={report['experts']}, top-{report['top_k']}, routing {report['routing']}")
    lines = [head, f"  {'backend':<10} {'d':>2} {'fwd ms':>9} {'fwd+bwd ms':>11} {'speedup':>8}  "
             + "  ".join(f"{n + ' MB':>10} {'dedup':>6}" for n in names)]
    flat = next(r for r in report["results"] if r["name"] == "flat")
    for r in report["results"]:
        per = "  ".join(f"{b / 2**20:>10.3f} {(f or 0):>6.2f}" for b, f in zip(r["bytes_per_level"], r["dedup_factor"]))
        lines.append(f"  {r['name']:<10} {r['depth']:>2} {r['fwd_ms']:>9.2f} {r['fwd_bwd_ms']:>11.2f} "
                     f"{flat['fwd_ms'] / r['fwd_ms']:>7.2f}x  {per}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- sweep (cost model)

SWEEP_G, SWEEP_K = (8, 16, 32), (2, 4, 6, 8, 10)


def testbed(G: int) -> tuple[Levels, LevelCosts]:
    """HierMoE's cluster shape: nodes of 8 GPUs (2 sockets x 2 PCIe switches x 2 NVLink pairs)."""
    levels = Levels.of((G // 8, 2, 2, 2), ("node", "socket", "switch", "gpu"))
    return levels, LevelCosts.defaults(levels)


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    G: int
    K: int
    ms: dict  # policy -> predicted ms of dispatch + combine
    depth: int  # HierD's best d


def sweep_point(G: int, K: int, E: int = 128, T: int = 256, d_model: int = 2048, swaps: int = 2,
                routing: str = "skewed", seed: int = 0) -> SweepPoint:
    """Predicted dispatch + combine of each policy on one (G, K) (bf16 rows of d_model)."""
    from fsmoe.placement.placement import Placement
    from fsmoe.placement.swap import hierd_scores, rank_of, token_scores

    levels, costs = testbed(G)
    row = 2 * d_model
    ids = torch.cat([make_ids(routing, T, E, K, seed * 1000 + r) for r in range(G)])
    src = torch.arange(G).repeat_interleave(T)
    placement = Placement.contiguous(E, G)

    def ms(pl, stages, dedup):
        return 1e3 * predict(count_traffic(rank_of(pl)[ids], src, levels, stages, dedup), costs, row)

    out = {"flat": ms(placement, (Stage(0, levels.depth - 1),), False),
           "2dh": ms(placement, stages_for_depth(levels, 2), False)}
    best_d = min(range(1, levels.depth + 1), key=lambda d: ms(placement, stages_for_depth(levels, d), True))
    stages = stages_for_depth(levels, best_d)
    out["hierd"] = ms(placement, stages, True)
    es, smart = placement, placement
    for _ in range(swaps):
        c = hierd_scores(ids, src, es, levels, stages, costs, row, gamma=10.0)
        es = es.swap(*c.pair) if c.pair else es
        t = token_scores(ids, smart, gamma=10.0)
        smart = smart.swap(*t.pair) if t.pair else smart
    out["hierd+es"] = ms(es, stages, True)
    out["hd2+smartmoe"] = ms(smart, stages_for_depth(levels, min(2, levels.depth)), True)
    return SweepPoint(G, K, out, best_d)


def _print_sweep(args) -> int:
    points = []
    for G in SWEEP_G:
        for K in SWEEP_K:
            points.append(sweep_point(G, K, swaps=args.swaps))
            print(f"  G={G} K={K}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in points[-1].ms.items()), flush=True)
    lines = [f"  {'G':>3} {'K':>3} {'d':>2} " + " ".join(f"{p:>13}" for p in points[0].ms)
             + f" {'hierd/flat':>11} {'es/flat':>8} {'es/hd2+sm':>10}"]
    for p in points:
        m = p.ms
        lines.append(f"  {p.G:>3} {p.K:>3} {p.depth:>2} " + " ".join(f"{v:>10.3f} ms" for v in m.values())
                     + f" {m['flat'] / m['hierd']:>10.2f}x {m['flat'] / m['hierd+es']:>7.2f}x "
                       f"{m['hd2+smartmoe'] / m['hierd+es']:>9.2f}x")
    print("predicted dispatch + combine (cost model, HierMoE-like testbed; speedups of HierD and HierD+ES)")
    print("\n".join(lines))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps([dataclasses.asdict(p) for p in points], indent=1))
    if args.png:
        plot_sweep([dataclasses.asdict(p) for p in points], args.png)
    return 0


def plot_sweep(points: list[dict], png: str) -> None:
    """Speedup of HierD and HierD + ES over flat against K, one line per G (HierMoE Fig. 8's axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, policy, title in ((axes[0], "hierd", "HierD-AlltoAll (best d) / flat"),
                              (axes[1], "hierd+es", "HierD + ES / flat")):
        for G in sorted({p["G"] for p in points}):
            row = [p for p in points if p["G"] == G]
            ax.plot([p["K"] for p in row], [p["ms"]["flat"] / p["ms"][policy] for p in row], marker="o",
                    label=f"G = {G}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("top-K")
    axes[0].set_ylabel("predicted speedup of dispatch + combine")
    axes[0].legend()
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
