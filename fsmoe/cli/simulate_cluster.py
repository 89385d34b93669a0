"""``fsmoe simulate cluster`` / ``calibrate`` / ``grid`` / ``compare``: training steps on clusters we cannot run,
from a measured profile, the fabric simulator and the scheduler's models (``fsmoe.sim.cluster``,
``fsmoe.sim.grid``)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fsmoe.cli.arg_types import output_file, plot_file, positive_float, positive_int


def add_parsers(sub) -> None:
    from fsmoe.cli.simulate_step import add_parser as add_step_parser

    add_cluster_parser(sub)
    add_step_parser(sub)
    from fsmoe.sim import grid as grid_mod

    g = sub.add_parser("grid", help="FSMoE's 1458-layer grid on its testbeds under every schedule, simulated",
                       description=grid_mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--testbed", choices=sorted(grid_mod.TESTBEDS), default="a")
    g.add_argument("--profile", required=True, help="a measured Profile (compute fits, eta)")
    g.add_argument("--profile-tflops", type=float, default=grid_mod.H200_TFLOPS,
                   help="published dense throughput of the profiled GPU (default: H200 bf16)")
    g.add_argument("--every", type=int, default=1, help="every n-th config of the grid")
    g.add_argument("--workers", type=int, default=1, help="processes")
    g.add_argument("--json", type=output_file, default=None)
    g.add_argument("--plot", type=plot_file, default=None, help="histograms of FSMoE's speedups to this PNG")
    g.set_defaults(func=run_grid)
    k = sub.add_parser("calibrate", help="the cluster simulator against measured `fsmoe bench schedule` iterations",
                       description=CALIBRATE_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    k.add_argument("results", help="results.json of a fsmoe bench schedule run")
    k.add_argument("--nic-gbps", type=float, required=True, help="the link the run had, per GPU and direction")
    k.add_argument("--nvlink-gbps", type=float, default=3600.0)
    k.add_argument("--layers", type=int, default=2, help="blocks per config (the bench's --layers)")
    k.add_argument("--dtype-bytes", type=int, default=2, help="2 for a bf16 bench (GPU), 4 for fp32 (CPU)")
    k.add_argument("--json", type=output_file, default=None)
    k.set_defaults(func=run_calibrate)
    from fsmoe.sim import compare as compare_mod

    p = sub.add_parser("compare", help="perf per dollar of fabrics from `fsmoe simulate cluster --json` results",
                       description=compare_mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="cluster JSON files or directories of them")
    p.add_argument("--policy", default="default", help="the schedule whose step time counts (default: default)")
    p.add_argument("--reference", default="leaf-spine", help="the fabric the others are divided by")
    p.add_argument("--plot", type=plot_file, default=None,
                   help="grouped bars beside mFabric's reported range, to this PNG")
    p.add_argument("--json", type=output_file, default=None)
    p.set_defaults(func=run_compare)


CALIBRATE_DOC = """``fsmoe simulate calibrate``: predict every config of a ``fsmoe bench schedule`` run with the
cluster simulator (communication from a fabric of the run's shape at ``--nic-gbps``, compute from
the run's own refitted profile) and report predicted / measured iteration time per schedule.

    fsmoe simulate calibrate benchmarks/results/schedule/gpu2/run4/bench_two_after_results.json --nic-gbps 183
"""


def run_calibrate(args) -> int:
    from rich.console import Console

    from fsmoe.config import ConfigError
    from fsmoe.sim.cluster import calibrate, layout_of
    from fsmoe.sim.fabrics import LeafSpine

    try:
        res = json.loads(Path(args.results).read_text())
        layout = layout_of(res["layout"], int(res["world"]))
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError("results", args.results, f"must be a fsmoe bench schedule results.json ({e})") from None
    gpn = layout.gpus_per_node or layout.world
    fab = LeafSpine(layout.world, gpn, layout.world, args.nic_gbps, args.nvlink_gbps)
    rep = calibrate(res, fab, n_layers=args.layers, dtype_bytes=args.dtype_bytes)
    con = Console()
    con.print(f"{args.results}: {res['layout']}, {len(res['rows'])} configs, {args.nic_gbps:g} Gb/s links")
    con.print("  " + rep["links"])
    for p, r in rep["policies"].items():
        con.print(f"  {p:<15} predicted / measured: median {r['median_ratio']:.3f}, |error| median "
                  f"{100 * r['median_abs_error']:.1f}%, max {100 * r['max_abs_error']:.1f}%, within 10% on "
                  f"{r['within_10pct']}/{r['configs']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=1))
    return 0


def add_cluster_parser(sub) -> None:
    from fsmoe.cli.simulate import FABRICS
    from fsmoe.sim import cluster

    c = sub.add_parser("cluster", help="step time of a model and layout on a simulated cluster and fabric",
                       description=cluster.__doc__ + CLUSTER_USAGE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--config", default="tiny", help="preset or TOML of the model (its MoE layers are the blocks)")
    c.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    c.add_argument("--profile", required=True, help="a measured Profile (fsmoe profile): the compute fits and eta")
    c.add_argument("--gemm-scale", type=positive_float, default=1.0,
                   help="target GPU's dense throughput over the profiled GPU's (compute slopes are divided by it)")
    c.add_argument("--gpus", type=positive_int, default=64)
    c.add_argument("--ep", type=positive_int, default=8)
    c.add_argument("--esp", type=positive_int, default=1)
    c.add_argument("--mp", type=positive_int, default=1,
                   help="tensor parallelism of attention and dense MLPs (in a server)")
    c.add_argument("--pp", type=positive_int, default=1,
                   help="pipeline stages (1F1B; each stage's ranks hold its share of the layers, EP inside a stage)")
    c.add_argument("--microbatches", type=positive_int, default=None,
                   help="microbatches per step with --pp (default 4 x --pp; they divide each rank's sequences)")
    c.add_argument("--dedup-depth", default="0", choices=["0", "1", "2", "auto"],
                   help="HierMoE's hierarchical dispatch with token dedup at this depth (0: the flat AlltoAll; "
                        "auto: the dispatcher's own choice), priced by its traffic model (fsmoe.sim.dedup)")
    c.add_argument("--placement", default="static", choices=["static", "flexmoe", "eplb"],
                   help="expert placement: static, or after FlexMoE's / the EPLB-style policy replicated hot "
                        "experts into the config's parallel.placement_extra_slots (fsmoe.sim.balance)")
    c.add_argument("--routing", default="uniform",
                   help="the routing the dedup traffic and the experts' loads are counted from: uniform, skewed, "
                        "grouped (synthetic), or a routing trace (routing_trace.jsonl.gz of `fsmoe train --trace` "
                        "with the config's number of experts) whose expert frequencies the tokens are drawn with")
    c.add_argument("--batch", type=positive_int, default=None,
                   help="sequences per GPU (default: the config's train.batch_size / --gpus, at least 1)")
    c.add_argument("--no-grad-overlap", dest="grad_overlap", action="store_false",
                   help="price the data-parallel gradients after backward; by default, as fsmoe train runs them "
                        "on NCCL, in buckets while backward runs (with --pp: the last microbatch's backward; only "
                        "what outlasts it counts)")
    c.add_argument("--gpus-per-server", type=positive_int, default=8)
    c.add_argument("--gpus-per-leaf", type=int, default=32)
    c.add_argument("--fabric", choices=FABRICS, default="leaf-spine")
    c.add_argument("--oversub", type=float, default=1.0)
    c.add_argument("--nic-gbps", type=float, default=400.0)
    c.add_argument("--nvlink-gbps", type=float, default=3600.0)
    c.add_argument("--region-servers", type=int, default=8)
    c.add_argument("--ocs-ports", type=positive_int, default=6)
    c.add_argument("--eps-ports", type=int, default=2)
    c.add_argument("--policies", default="default,tutel_improved,pipemoe_lina,fsmoe_no_iio,fsmoe",
                   help="comma list of schedules to plan and time")
    c.add_argument("--json", type=output_file, default=None, help="write the schedules' predicted times here")
    c.set_defaults(func=run_cluster)


CLUSTER_USAGE = """
    fsmoe simulate cluster --config mixtral-8x7b --profile h200.json --gpus 256 --ep 8 --fabric rail
    fsmoe simulate cluster --config gpt2-xl-moe --profile h200.json --gpus 1024 --ep 64 --fabric mfabric --nic-gbps 100
"""


def cluster_fabric(args):
    """The --fabric of a cluster command (circuits, if optical, planned per collective)."""
    from fsmoe.sim.fabrics import LeafSpine
    from fsmoe.sim.optical import RegionalOCS

    if args.fabric in ("leaf-spine", "rail"):
        return LeafSpine(args.gpus, args.gpus_per_server, args.gpus_per_leaf, args.nic_gbps, args.nvlink_gbps,
                         args.oversub, rails=args.fabric == "rail")
    return RegionalOCS(args.gpus, args.gpus_per_server, args.region_servers, args.ocs_ports, args.eps_ports,
                       args.nic_gbps, args.nvlink_gbps, static=args.fabric == "static-optical")


def simulate_cluster(args) -> dict:
    import dataclasses

    from fsmoe.config import ConfigError, load_config
    from fsmoe.schedule.model.baselines import POLICY_NAMES
    from fsmoe.schedule.model.plan import links, plan
    from fsmoe.schedule.model.profile import Profile
    from fsmoe.schedule.types import LayerSpec, Layout
    from fsmoe.sim.cluster import cluster_profile
    from fsmoe.sim.cost import Prices, fabric_bill
    from fsmoe.bench.dispatch import ROUTINGS
    from fsmoe.sim.balance import load_balance, replica_sync_s
    from fsmoe.sim.cluster import p2p_seconds, scale_lines
    from fsmoe.sim.dedup import dedup_scale
    from fsmoe.sim.step import predict_pipelined, predict_step

    cfg = load_config(args.config, args.set)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not policies or set(policies) - set(POLICY_NAMES):
        raise ConfigError("--policies", args.policies, f"must be a comma list of {', '.join(POLICY_NAMES)}")
    if args.gpus % (args.ep * args.esp):
        raise ConfigError("--ep", args.ep, f"times --esp={args.esp} must divide --gpus={args.gpus}")
    if args.gpus % args.gpus_per_server:
        raise ConfigError("--gpus-per-server", args.gpus_per_server, f"must divide --gpus={args.gpus}")
    if args.mp < 1 or args.gpus_per_server % args.mp:
        raise ConfigError("--mp", args.mp, f"must be >= 1 and divide --gpus-per-server={args.gpus_per_server} "
                          "(tensor parallelism stays inside a server)")
    pp, micro = args.pp, args.microbatches or 4 * args.pp
    if pp < 1 or args.gpus % (pp * args.gpus_per_server) or micro < 1:
        raise ConfigError("--pp", pp, f"must be >= 1 with whole servers per stage (--gpus={args.gpus}, "
                          f"--gpus-per-server={args.gpus_per_server}) and --microbatches >= 1")
    stage = args.gpus // pp
    if stage % (args.ep * args.esp):
        raise ConfigError("--ep", args.ep, f"times --esp={args.esp} must divide a pipeline stage's {stage} GPUs")
    layout = Layout(dp=stage // args.mp, mp=args.mp, ep=args.ep, esp=args.esp,
                    gpus_per_node=args.gpus_per_server if args.gpus_per_server < stage else None)
    per_gpu = args.batch or max(1, cfg.train.batch_size // args.gpus)
    batch = per_gpu * pp  # sequences per rank of a stage: each stage sees all of its dp shard's
    if pp > 1 and batch % micro:
        raise ConfigError("--microbatches", micro, f"must divide the {batch} sequences per rank of a stage "
                          f"(--batch {per_gpu} x --pp {pp})")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch * stage))
    spec = LayerSpec.from_run_config(cfg, batch=batch)
    measured = Profile.load(args.profile)
    fabric = cluster_fabric(args)
    prof = cluster_profile(measured, layout, fabric, gemm_scale=args.gemm_scale, stages=pp)
    _check_routing(args.routing, spec.num_experts, spec.top_k)
    label = args.routing if args.routing in ROUTINGS else f"trace {Path(args.routing).name}"
    dedup = None
    if layout.ep > 1 and args.dedup_depth != "0":
        try:
            dedup = dedup_scale(spec, layout, args.gpus_per_server, args.nic_gbps, args.nvlink_gbps,
                                args.dedup_depth if args.dedup_depth == "auto" else int(args.dedup_depth), args.routing)
        except ValueError as e:
            raise ConfigError("--dedup-depth", args.dedup_depth, str(e)) from None
        prof = scale_lines(prof, (layout.a2a_key,), dedup.ratio)  # the counts' exchange keeps the flat line
    balance = None
    if layout.ep > 1 and (args.placement != "static" or args.routing != "uniform"):
        balance = load_balance(spec, layout, args.placement, args.routing, cfg.parallel.placement_extra_slots)
        prof = scale_lines(prof, ("expert_fwd", "expert_bwd", layout.a2a_key), balance.ratio)
    sync = replica_sync_s(layout, spec, prof, balance)
    tokens = spec.batch * spec.seq_len * stage
    p2p = p2p_seconds(fabric, layout, pp, batch // micro * spec.seq_len * spec.d_model * spec.dtype_bytes / args.mp)
    rows = []
    for name in policies:
        s = plan(spec, layout, prof, name)
        if pp > 1:
            step = predict_pipelined(cfg, layout, prof, name, pp, micro, p2p, overlap_grads=args.grad_overlap)
            step = dataclasses.replace(step, once_s=step.once_s + sync)
            parts = {**{k: v * 1e3 for k, v in step.micro.as_dict().items() if isinstance(v, float)},
                     "p2p": step.p2p_s * 1e3, "once": step.once_s * 1e3, "bubble": step.bubble}
            missing = step.micro.missing
        else:
            step = predict_step(cfg, layout, prof, name, overlap_grads=args.grad_overlap)
            step = dataclasses.replace(step, gradients=step.gradients + sync)
            parts, missing = {k: v * 1e3 for k, v in step.as_dict().items() if isinstance(v, float)}, step.missing
        moe_ms = (step.micro.moe_blocks if pp > 1 else s.predicted_iter_s) * 1e3
        rows.append({"policy": name, "r_fwd": s.r_fwd, "r_bwd": s.r_bwd, "moe_blocks_ms": moe_ms,
                     "iteration_ms": step.total_s * 1e3, "tokens_per_s": tokens / step.total_s,
                     "parts_ms": parts, "not_priced": list(missing)})
    base = next((r for r in rows if r["policy"] == "default"), rows[0])
    for r in rows:
        r["vs_first"] = base["iteration_ms"] / r["iteration_ms"]
    return {"config": args.config, "gpus": args.gpus, "layout": layout.name, "mp": args.mp, "pp": pp,
            "placement": None if balance is None else {"policy": balance.policy, "ratio": balance.ratio,
                                                        "static_ratio": balance.static_ratio,
                                                        "replicated": balance.replicated, "routing": label,
                                                        "replica_sync_ms": sync * 1e3},
            "dedup": None if dedup is None else {"depth": dedup.depth, "ratio": dedup.ratio, "flat_ms": dedup.flat_ms,
                                                 "per_depth_ms": list(dedup.per_depth_ms), "routing": label},
            "microbatches": micro if pp > 1 else 1, "fabric": fabric.name,
            "grad_overlap": bool(args.grad_overlap),
            "nic_gbps": args.nic_gbps,
            "network_usd_per_gpu": fabric_bill(fabric, Prices.at(args.nic_gbps)).per_gpu(args.gpus),
            "batch_per_gpu": per_gpu, "seq_len": spec.seq_len, "moe_blocks": spec.n_layers,
            "links": links(prof), "results": rows}


def run_cluster(args) -> int:
    from rich.console import Console
    from rich.table import Table

    rep = simulate_cluster(args)
    con = Console()
    con.print(f"{rep['config']} on {rep['gpus']} GPUs ({rep['layout']}), {rep['fabric']} at {rep['nic_gbps']:g}G: "
              f"{rep['moe_blocks']} attention + MoE blocks, {rep['batch_per_gpu']} x {rep['seq_len']} tokens per GPU"
              + (f", TP {rep['mp']}" if rep["mp"] > 1 else "")
              + (f", {rep['pp']} pipeline stages x {rep['microbatches']} microbatches (MoE blocks ms: one microbatch "
                 "on one stage)" if rep["pp"] > 1 else "") + "; "
              f"network ${rep['network_usd_per_gpu']:,.0f} per GPU")
    con.print("  " + rep["links"])
    if rep["placement"]:
        b = rep["placement"]
        con.print(f"  placement {b['policy']} ({b['routing']} routing): busiest EP rank {b['ratio']:.2f}x the mean "
                  f"(static {b['static_ratio']:.2f}x), {b['replicated']} experts replicated "
                  f"(their gradients' AllReduce {b['replica_sync_ms']:.2f} ms per step)")
    if rep["dedup"] and not rep["dedup"]["flat_ms"]:
        con.print("  dedup: the EP group sits inside one server, nothing to deduplicate: the flat AlltoAll is kept")
    elif rep["dedup"]:
        d = rep["dedup"]
        con.print(f"  dedup: depth {d['depth']}, its AlltoAll {d['ratio']:.3f}x the flat one's "
                  f"({d['routing']} routing; "
                  f"model: flat {d['flat_ms']:.2f} ms, d=1..: {', '.join(f'{x:.2f}' for x in d['per_depth_ms'])} ms)")
    missing = sorted({k for r in rep["results"] for k in r["not_priced"]})
    if missing:
        con.print(f"  not priced (the profile has no fit for {', '.join(missing)}; `fsmoe profile --config` "
                  "measures them)", style="yellow")
    t = Table()
    for col in ("schedule", "r fwd/bwd", "MoE blocks ms", "step ms", "tokens/s", "vs " + rep["results"][0]["policy"]):
        t.add_column(col, justify="left" if col == "schedule" else "right")
    for r in rep["results"]:
        t.add_row(r["policy"], f"{r['r_fwd']}/{r['r_bwd']}", f"{r['moe_blocks_ms']:.2f}", f"{r['iteration_ms']:.2f}",
                  f"{r['tokens_per_s']:,.0f}", f"{r['vs_first']:.3f}x")
    con.print(t)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rep, indent=1))
    return 0


def run_grid(args) -> int:
    from rich.console import Console

    from fsmoe.config import ConfigError
    from fsmoe.schedule.model.profile import Profile
    from fsmoe.sim.grid import TESTBEDS, plot_grid, run_grid as simulate_grid

    if args.every < 1 or args.workers < 1:
        raise ConfigError("--every", (args.every, args.workers), "--every and --workers must be >= 1")
    rep = simulate_grid(Profile.load(args.profile), TESTBEDS[args.testbed], ref_tflops=args.profile_tflops,
                        every=args.every, workers=args.workers)
    con = Console()
    tb = rep["testbed"]
    con.print(f"testbed {args.testbed}: {tb['nodes']} nodes x {tb['gpus_per_node']} GPUs, {rep['configs']} configs")
    con.print("  " + rep["links"])
    sm = rep["summary"]
    for k, v in sm.items():
        con.print(f"  {k:<28} {v:.3f}x" if isinstance(v, float) else f"  {k:<28} {v} of {rep['configs']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rep))
    if args.plot:
        plot_grid(rep, args.plot, args.testbed)
        con.print(f"  plot: {args.plot}")
    return 0


def run_compare(args) -> int:
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    from fsmoe.config import ConfigError
    from fsmoe.sim.compare import load_results, perf_per_dollar, plot_perf_per_dollar

    missing = [p for p in args.results if not Path(p).exists()]
    if missing:
        raise ConfigError("results", missing[0], "no such file or directory (give `fsmoe simulate cluster --json` outputs)")
    rows = perf_per_dollar(load_results([Path(p) for p in args.results]), args.policy, args.reference)
    if not rows:
        raise ConfigError("results", " ".join(args.results), f"no cluster result with a {args.reference!r} "
                          "reference of the same config and NIC speed (run `fsmoe simulate cluster --fabric "
                          f"{args.reference} ... --json` too)")
    t = Table("config", "NIC", "fabric", "step ms", "network $/GPU", f"perf/$ vs {args.reference}")
    for r in rows:
        t.add_row(r.config, f"{r.nic_gbps:g}G", r.fabric, f"{r.step_ms:.1f}", f"{r.usd_per_gpu:,.0f}",
                  f"{r.vs_reference:.2f}x")
    Console().print(t)
    if args.plot:
        plot_perf_per_dollar(rows, args.plot, args.reference)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


def _check_routing(routing: str, num_experts: int, top_k: int | None = None) -> None:
    """--routing: a synthetic kind, or a readable trace of the config's experts (and, where the
    trace sampled which experts tokens chose together, of its top-k) (ConfigError)."""
    from fsmoe.bench.dispatch import ROUTINGS
    from fsmoe.config import ConfigError
    from fsmoe.sim.balance import trace_routing

    if routing in ROUTINGS:
        return
    if not Path(routing).is_file():
        raise ConfigError("--routing", routing, "must be uniform, skewed, grouped or a routing trace file")
    try:
        freq, pool = trace_routing(routing)
    except ValueError as e:
        raise ConfigError("--routing", routing, str(e)) from None
    if len(freq) != num_experts:
        raise ConfigError("--routing", routing, f"holds {len(freq)} experts; the config has {num_experts}")
    if top_k is not None and pool is not None and pool.shape[1] != top_k:
        raise ConfigError("--routing", routing, f"sampled top-{pool.shape[1]} choices; the config routes top-{top_k}")
