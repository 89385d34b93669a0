"""``fsmoe simulate``: what we cannot run. ``fabric``: how long a collective's traffic takes on a
datacenter fabric, by flow-level simulation (max-min fair sharing, ``fsmoe.sim``), for one or
several fabrics side by side; ``trace``: a routing trace's AlltoAlls replayed on them; ``cluster``,
``calibrate`` and ``grid``: training steps at scale, ``compare``: their perf per dollar by fabric
(``fsmoe.cli.simulate_cluster``).

    fsmoe simulate fabric --gpus 1024 --ep 64 --ep-across-servers --mb 4 --fabrics leaf-spine,rail --oversub 1,3
    fsmoe simulate fabric --gpus 64 --gpus-per-leaf 16 --pattern incast --senders 15 --mb 64 --ecmp spray

Patterns: ``alltoall`` (``--gpus`` / ``--ep`` concurrent AlltoAlls of ``--ep`` GPUs, each GPU
sending ``--mb`` MB to every other member of its group; ``--ep-across-servers`` takes one GPU
per server into a group, as EP beside TP or ESP inside servers) or ``incast`` (``--senders``
GPUs each sending ``--mb`` MB to GPU 0). Fabrics (``--fabrics``, a comma list): leaf-spine with
one NIC per GPU and NVSwitch inside a server, rail-optimised (GPU i of every server on rail i's
leaves; traffic to another rail crosses NVSwitch first), mfabric (per server ``--ocs-ports``
NICs into its region's optical circuit switch, circuits planned for the traffic by mFabric's
greedy controller and set up in ``--reconfig-ms``, of which ``--hide-ms`` of compute before the
AlltoAll hides what it can; ``--eps-ports`` NICs into an electrical fat-tree for the rest) and
static-optical (the same circuits, fixed: a patch panel instead of an OCS); ``--oversub`` takes a
comma list too (1 = fat-tree, 3 = 3:1), and the electrical fabrics are simulated at every ratio.

Every fabric is priced by its used ports (``fsmoe.sim.cost``: the mFabric authors' component
prices at ``--nic-gbps``). With ``--compute-ms`` the table adds an iteration of that much compute
plus ``--a2a-per-iter`` of the AlltoAlls (and on mfabric their exposed reconfigurations), and
performance per dollar against the first fabric listed.

    fsmoe simulate fabric --gpus 1024 --ep 64 --mb 8 --fabrics leaf-spine,rail,mfabric,static-optical \
        --compute-ms 200 --a2a-per-iter 128 --hide-ms 25
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from fsmoe.cli.arg_types import non_negative_float, output_file, positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("simulate", help="simulate what we cannot run: traffic on datacenter fabrics",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="simulate_command", metavar="WHAT", required=True)
    f = sub.add_parser("fabric", help="a collective's traffic on leaf-spine fabrics (flow-level, max-min fair)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("--gpus", type=positive_int, default=64)
    f.add_argument("--gpus-per-server", type=positive_int, default=8)
    f.add_argument("--gpus-per-leaf", type=int, default=32, help="NIC ports of a leaf switch facing GPUs")
    f.add_argument("--nic-gbps", type=float, default=400.0, help="one NIC per GPU, Gb/s")
    f.add_argument("--nvlink-gbps", type=float, default=3600.0, help="NVSwitch bandwidth per GPU and direction, Gb/s")
    f.add_argument("--fabrics", default="leaf-spine",
                   help="comma list of leaf-spine (GPUs of a server on one leaf), rail (rail-optimised: GPU i of "
                        "every server on rail i's leaves), mfabric (regional optical circuits + electrical fat-tree) "
                        "and static-optical (fixed circuits + electrical fat-tree)")
    f.add_argument("--region-servers", type=int, default=8, help="mfabric: servers per OCS region")
    f.add_argument("--ocs-ports", type=positive_int, default=6, help="mfabric: NICs per server into the OCS")
    f.add_argument("--eps-ports", type=int, default=2, help="mfabric: NICs per server into the electrical fat-tree")
    f.add_argument("--reconfig-ms", type=float, default=25.0, help="mfabric: OCS reconfiguration time")
    f.add_argument("--hide-ms", type=float, default=0.0,
                   help="mfabric: compute before each AlltoAll that hides a predicted reconfiguration")
    f.add_argument("--compute-ms", type=float, default=None,
                   help="add an iteration: this much compute + --a2a-per-iter AlltoAlls, and perf per dollar")
    f.add_argument("--a2a-per-iter", type=int, default=1, help="AlltoAlls of this pattern per iteration")
    f.add_argument("--oversub", default="1", help="comma list of leaf oversubscription ratios (1 = fat-tree)")
    f.add_argument("--ecmp", choices=["hash", "spray"], default="hash",
                   help="hash: each flow on one spine by a hash of its ends; spray: split evenly over all spines")
    f.add_argument("--pattern", choices=["alltoall", "incast"], default="alltoall")
    f.add_argument("--ep", type=int, default=None, help="alltoall group size (default: all GPUs)")
    f.add_argument("--ep-across-servers", action="store_true", help="one GPU per server in each group")
    f.add_argument("--senders", type=int, default=None, help="incast: senders (default: all other GPUs)")
    f.add_argument("--mb", type=float, default=4.0, help="MB per (sender, receiver) pair")
    f.add_argument("--batch", type=non_negative_float, default=0.01,
                   help="finish flows within this fraction of the elapsed time together (0: exact)")
    f.add_argument("--share-tol", type=non_negative_float, default=0.01,
                   help="links within this fraction of the smallest fair share freeze together (1e-9: exact)")
    f.add_argument("--json", type=output_file, default=None, help="write the results here")
    f.set_defaults(func=run_fabric)
    add_trace_parser(sub)
    from fsmoe.cli.simulate_cluster import add_parsers as add_cluster_parsers

    add_cluster_parsers(sub)


def add_trace_parser(sub) -> None:
    t = sub.add_parser("trace", help="replay a routing trace's AlltoAlls on a fat-tree, mFabric and a static "
                                     "optical topology", description=REPLAY_DOC,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("path", help="routing_trace.jsonl.gz (fsmoe train --trace)")
    t.add_argument("--ep", type=int, default=None, help="EP ranks to read it for (default: the run's EP)")
    t.add_argument("--groups", type=int, default=1, help="EP groups side by side (GPUs = ep x groups)")
    t.add_argument("--every", type=int, default=1, help="replay every n-th recorded step")
    t.add_argument("--mb-per-rank", type=float, default=64.0, help="MB each rank dispatches per MoE layer")
    t.add_argument("--gpus-per-server", type=positive_int, default=8)
    t.add_argument("--gpus-per-leaf", type=int, default=32)
    t.add_argument("--nic-gbps", type=float, default=400.0)
    t.add_argument("--region-servers", type=int, default=8)
    t.add_argument("--ocs-ports", type=positive_int, default=6)
    t.add_argument("--eps-ports", type=int, default=2)
    t.add_argument("--reconfig-ms", type=float, default=25.0)
    t.add_argument("--hide-ms", type=float, default=25.0, help="compute before each AlltoAll that hides a predicted "
                                                               "reconfiguration")
    t.add_argument("--json", type=output_file, default=None, help="write the per-step series and their means here")
    t.set_defaults(func=run_trace)


REPLAY_DOC = """``fsmoe simulate trace``: a routing trace's AlltoAlls (dispatch and combine of every MoE layer,
each rank dispatching ``--mb-per-rank`` MB) replayed on an electrical leaf-spine fabric, on
mFabric with circuits predicted from the previous replayed step (and with the AlltoAll's own
traffic: a perfect predictor), and on a static optical topology planned from the whole trace.

    fsmoe simulate trace runs/r/routing_trace.jsonl.gz --ep 32 --groups 8 --every 50 --region-servers 4
"""


def run_trace(args) -> int:
    from rich.console import Console

    from fsmoe.cli.trace import load_for_ep
    from fsmoe.config import ConfigError
    from fsmoe.sim.fabrics import LeafSpine
    from fsmoe.sim.optical import RegionalOCS
    from fsmoe.sim.replay import replay
    from fsmoe.sim.traces import rank_matrices

    trace, ranks = load_for_ep(args.path, args.ep)
    if args.every < 1 or args.groups < 1 or args.mb_per_rank <= 0:
        raise ConfigError("--every", (args.every, args.groups, args.mb_per_rank),
                          "--every and --groups must be >= 1 and --mb-per-rank > 0")
    sel = np.arange(0, len(trace.steps), args.every)
    mats = rank_matrices(trace.counts_NMRE[sel], trace.header.get("source_ep_rank"), ranks)
    gpus = ranks * args.groups
    for flag, per in (("--gpus-per-server", args.gpus_per_server), ("--gpus-per-leaf", args.gpus_per_leaf)):
        if gpus % per:  # named here: the fabrics would call the product --gpus, which this command has not
            raise ConfigError(flag, per, f"must divide the {gpus} GPUs replayed (EP {ranks} x --groups {args.groups})")
    ocs = RegionalOCS(gpus, args.gpus_per_server, args.region_servers, args.ocs_ports, args.eps_ports,
                      args.nic_gbps, reconfig_ms=args.reconfig_ms)
    tree = LeafSpine(gpus, args.gpus_per_server, args.gpus_per_leaf, args.nic_gbps)
    res = replay(mats, trace.steps[sel], ocs, tree, groups=args.groups, mb_per_rank=args.mb_per_rank,
                 hide_ms=args.hide_ms)
    con = Console()
    con.print(f"{args.path}: {len(sel)} steps replayed, {mats.shape[1]} MoE layers, EP {ranks} x {args.groups} groups "
              f"= {gpus} GPUs, {args.mb_per_rank:g} MB per rank per AlltoAll, {args.nic_gbps:g}G")
    labels = {"electrical": "leaf-spine 1:1", "predicted": "mFabric, circuits from the previous step",
              "oracle": "mFabric, circuits from the step itself", "static": "static optical (whole trace)"}
    means = res.means()
    for pol, label in labels.items():
        a2a, wait = np.mean(res.a2a_ms[pol]), np.mean(res.reconfig_ms[pol])
        con.print(f"  {label:<42} {means[pol]:9.2f} ms per step (AlltoAlls {a2a:.2f} + waiting for circuits "
                  f"{wait:.2f})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res.to_json()))
    return 0


def flows_for(args):
    from fsmoe.config import ConfigError
    from fsmoe.sim.patterns import alltoall, incast

    size = args.mb * 1e6
    if args.mb <= 0:
        raise ConfigError("--mb", args.mb, "must be > 0")
    if args.pattern == "incast":
        senders = args.senders if args.senders is not None else args.gpus - 1
        if not 1 <= senders <= args.gpus - 1:
            raise ConfigError("--senders", senders, f"must be in [1, {args.gpus - 1}] (GPU 0 receives)")
        return incast(senders, size)
    ep = args.ep or args.gpus
    if ep < 2 or args.gpus % ep:
        raise ConfigError("--ep", ep, f"must be >= 2 and divide --gpus={args.gpus}")
    stride = args.gpus_per_server if args.ep_across_servers else 1
    if args.ep_across_servers and (args.gpus // ep) % stride:
        raise ConfigError("--ep-across-servers", True, f"needs --gpus / --ep = {args.gpus // ep} groups to be a "
                                                       f"multiple of --gpus-per-server={stride}")
    return alltoall(ep, size, groups=args.gpus // ep, stride=stride)


def simulate_fabric(args) -> dict:
    """Simulate ``args``' pattern on each fabric; a JSON-ready report."""
    from fsmoe.config import ConfigError

    try:
        ratios = [float(x) for x in str(args.oversub).split(",") if x.strip()]
    except ValueError:
        raise ConfigError("--oversub", args.oversub, "must be a comma list of numbers >= 1, e.g. 1,3") from None
    kinds = [k.strip() for k in str(args.fabrics).split(",") if k.strip()]
    if not kinds or set(kinds) - set(FABRICS):
        raise ConfigError("--fabrics", args.fabrics, f"must be a comma list of {', '.join(FABRICS)}")
    if args.compute_ms is not None and (args.compute_ms < 0 or args.a2a_per_iter < 1):
        raise ConfigError("--compute-ms", args.compute_ms, "must be >= 0 (with --a2a-per-iter >= 1)")
    flows = flows_for(args)
    rows = []
    for kind in kinds:
        for ratio in (ratios if kind in ("leaf-spine", "rail") else [1.0]):
            rows.append(_simulate_one(args, kind, ratio, flows))
    if args.compute_ms is not None:
        base = rows[0]
        for r in rows:
            r["iteration_ms"] = args.compute_ms + args.a2a_per_iter * (r["makespan_ms"] + r["reconfig_ms"])
            r["perf_per_usd_vs_first"] = (base["iteration_ms"] * base["usd"]) / (r["iteration_ms"] * r["usd"]) \
                if "iteration_ms" in base else 1.0
    return {"pattern": args.pattern, "gpus": args.gpus, "ep": args.ep or args.gpus, "mb_per_pair": args.mb,
            "ecmp": args.ecmp, "nic_gbps": args.nic_gbps, "batch": args.batch, "share_tol": args.share_tol,
            "compute_ms": args.compute_ms, "a2a_per_iter": args.a2a_per_iter, "results": rows}


FABRICS = ("leaf-spine", "rail", "mfabric", "static-optical")


def _simulate_one(args, kind: str, ratio: float, flows) -> dict:
    """One fabric: the pattern's makespan, its exposed reconfiguration and its price."""
    from fsmoe.sim.cost import Prices, fabric_bill
    from fsmoe.sim.fabrics import LeafSpine
    from fsmoe.sim.flows import simulate
    from fsmoe.sim.optical import RegionalOCS

    prices = Prices.at(args.nic_gbps)
    t0 = time.perf_counter()
    if kind in ("leaf-spine", "rail"):
        fab = LeafSpine(args.gpus, args.gpus_per_server, args.gpus_per_leaf, args.nic_gbps, args.nvlink_gbps,
                        ratio, ecmp=args.ecmp, rails=kind == "rail")
        A, size = fab.incidence(flows)
        cap, reconfig, shape = fab.capacity(), 0.0, f"{fab.leaves} x {fab.num_spines}"
    else:
        fab = RegionalOCS(args.gpus, args.gpus_per_server, args.region_servers, args.ocs_ports, args.eps_ports,
                          args.nic_gbps, args.nvlink_gbps, args.reconfig_ms, static=kind == "static-optical")
        circuits = fab.plan(fab.server_demand(flows))
        A, cap, size = fab.incidence(flows, circuits)
        reconfig = fab.reconfigure(None, circuits, args.hide_ms)
        shape = f"{fab.servers // fab.region_servers} regions x {fab.region_servers}"
    bill = fabric_bill(fab, prices)
    res = simulate(A, cap, size, batch=args.batch, share_tol=args.share_tol)
    sent = float(flows.size_bytes.sum())
    senders = len(set(flows.src.tolist()))
    return {"fabric": fab.name, "kind": kind, "oversub": ratio, "shape": shape,
            "makespan_ms": res.makespan_s * 1e3, "reconfig_ms": reconfig,
            "per_sender_GBps": sent / senders / res.makespan_s / 1e9 if res.makespan_s else None,
            "usd": bill.usd, "usd_per_gpu": bill.per_gpu(args.gpus),
            "flows": int(A.shape[0]), "recomputations": res.events, "simulated_in_s": time.perf_counter() - t0}


def run_fabric(args) -> int:
    from rich.console import Console
    from rich.table import Table

    report = simulate_fabric(args)
    t = Table(title=f"{report['pattern']} of {args.mb:g} MB per pair, {args.gpus} GPUs"
                    + (f" in groups of {report['ep']}" if args.pattern == "alltoall" else "")
                    + f", {args.nic_gbps:g}G NICs, ECMP {args.ecmp}")
    t.add_column("fabric", no_wrap=True)
    cols = ["shape", "ms", "reconfig ms", "GB/s per GPU", "$ per GPU"]
    if args.compute_ms is not None:
        cols += ["iteration ms", "perf/$"]
    for col in cols + ["flows", "took s"]:
        t.add_column(col, justify="right")
    for r in report["results"]:
        cells = [r["fabric"], r["shape"], f"{r['makespan_ms']:.3f}", f"{r['reconfig_ms']:.1f}",
                 f"{r['per_sender_GBps']:.1f}", f"{r['usd_per_gpu']:,.0f}"]
        if args.compute_ms is not None:
            cells += [f"{r['iteration_ms']:.1f}", f"{r['perf_per_usd_vs_first']:.2f}x"]
        t.add_row(*cells, f"{r['flows']:,}", f"{r['simulated_in_s']:.2f}")
    con = Console()
    con.print(t)
    con.print("ms: until the last flow ends; reconfig ms: optical circuit set-up the AlltoAll waits for; GB/s per "
              "GPU: the bytes each sender sends over the ms; $ per GPU: the fabric's used ports at the mFabric "
              "authors' prices" + ("; perf/$: (1 / iteration) / $ against the first row" if args.compute_ms is not None
                                   else ""))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0
