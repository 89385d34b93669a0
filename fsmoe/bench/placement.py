"""``fsmoe bench placement``: step time of static, FlexMoE and EPLB-style expert placement under
skewed routing, side by side in one run; and (``--trace``) the policies replayed on a recorded
routing trace.

Live (multi-process: gloo on CPU, NCCL on GPUs). Every rank builds the same stack of ``--layers``
MoE layers (``ParallelMoELayer``, dp = ep = processes unless ``--ep``) whose router is
:class:`SkewedRouter`: the usual softmax top-k of a learned projection, plus a fixed bias
``skew * log(zipf_E)`` on the logits, so a few experts get most tokens, as early in training
(``--hot clustered``, the default: the hottest experts are the lowest ids, so the static
placement puts them together on EP rank 0, as when one GPU does several times the expert work of
another; ``--hot spread``: a seeded random choice; ``--shift-every S`` moves the bias to other
experts every S steps). The skew is synthetic and says so in the
results: the real routers of fsmoe are untouched. For each policy in turn (same weights, same
tokens):

    1. ``--interval`` warm-up steps (forward, backward, gradient sync incl. the replica sync,
       AdamW), after which flexmoe / eplb rebalance (``fsmoe.placement.rebalance``) — repeated
       ``--rebalances`` times, so flexmoe's move budget can reach a steady placement;
    2. ``--iters`` timed steps per policy, round-robin over the policies (a change in machine
       load hits all alike); a step's time is the slowest rank's; the median is reported, with
       the rank balance (max/mean expert rows per EP rank) and the expert imbalance.

Reported: median step time (wall clock of the slowest rank), speedup over static, the slowest
rank's CPU time per step (``time.process_time``: what the step costs that rank's core, which on a
machine whose cores are shared with other processes is steadier than the wall clock; host time
only on GPUs), balance ratios, the rebalances' pause and bytes moved. Replay (``--trace FILE``,
one process, no GPU): for every window of ``--interval`` steps, the policy's placement from
that window is scored on the *next* window (the traffic it would really meet; also on the window
it saw), with the extra slots and the share of expert bytes it moved.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fsmoe.cli.arg_types import output_file, plot_file, positive_int
from fsmoe.config import ConfigError, ExpertsConfig, MoEConfig, ParallelConfig, RouterConfig
from fsmoe.parallel.groups import ParallelGroups, device_for
from fsmoe.parallel.launch import add_command_arguments, run_command, world_size_from_env
from fsmoe.placement.migrate import MigrationPlan
from fsmoe.placement.placement import Placement
from fsmoe.placement.policy import PlacementCost, balance_ratio
from fsmoe.placement.rebalance import RebalanceSettings, build_rebalancer, propose
from fsmoe.placement.slots import add_spare_slots, spare_slots_for
from fsmoe.placement.traffic import LoadPredictor
from fsmoe.routing.gshard import GShardRouter
from fsmoe.routing.plan import RoutingPlan

POLICIES = ("static", "flexmoe", "eplb")


class SkewedRouter(GShardRouter):
    """GShard top-k with a fixed logit bias ``skew * log(zipf)`` over a seeded permutation of the
    experts (a synthetic skew for this benchmark; ``shift(k)`` rolls which experts are hot)."""

    def __init__(self, cfg, d_model: int, num_experts: int, skew: float, seed: int, clustered: bool):
        super().__init__(cfg, d_model, num_experts)
        g = torch.Generator().manual_seed(seed)
        self.perm = torch.arange(num_experts) if clustered else torch.randperm(num_experts, generator=g)
        self.skew = skew
        self.register_buffer("bias_E", torch.zeros(num_experts), persistent=False)
        self.shift(0)

    def shift(self, k: int) -> None:
        zipf = 1.0 / torch.arange(1, self.num_experts + 1, dtype=torch.float32)
        with torch.no_grad():
            self.bias_E.copy_(self.skew * torch.log(zipf)[torch.argsort(self.perm.roll(k))])

    def forward(self, x_TD, seq_len):
        """x_TD [T, D] -> RoutingPlan: softmax(x W + bias) -> top-k (no noise, no aux loss)."""
        K = self.cfg.top_k
        probs_TE, w_TK, ids_TK = self.softmax_topk(self.proj(x_TD).float() + self.bias_E, K, K > 1)
        return RoutingPlan.from_topk(ids_TK, w_TK.to(x_TD.dtype), self.num_experts, None, probs_TE=probs_TE)


def build_stack(args, groups: ParallelGroups, device, policy: str) -> tuple[nn.ModuleList, list]:
    from fsmoe.parallel.moe import ParallelMoELayer

    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=args.experts, router=RouterConfig(top_k=args.top_k, aux_loss_coef=0.0),
                    experts=ExpertsConfig(d_ff=args.d_ff, activation="swiglu"), kernels="auto")
    layers = nn.ModuleList()
    for i in range(args.layers):
        router = SkewedRouter(cfg.router, args.d_model, args.experts, args.skew, 100 + i, args.hot == "clustered")
        layer = ParallelMoELayer(cfg, args.d_model, groups, router=router)
        layer.router.balance_group = None
        layers.append(layer)
    layers.to(device)
    if policy != "static":
        spare = spare_slots_for(args.experts, groups.ep, args.extra_slots)
        for layer in layers:
            add_spare_slots(layer, spare)
    return layers, list(layers)


class PolicyRun:
    """One policy's stack, optimizer and rebalancer, stepped by :func:`step` (same tokens for all)."""

    def __init__(self, args, groups: ParallelGroups, device, policy: str):
        self.args, self.groups, self.device, self.policy = args, groups, device, policy
        self.layers, self.moe = build_stack(args, groups, device, policy)
        # as fsmoe train builds it: fused on CUDA (one kernel over all parameters), foreach on CPUs
        self.opt = torch.optim.AdamW(self.layers.parameters(), lr=1e-4, fused=device.type == "cuda")
        pcfg = ParallelConfig(dp=groups.world, ep=groups.ep, placement=policy, placement_interval=args.interval,
                              placement_threshold=args.threshold, placement_extra_slots=args.extra_slots,
                              placement_max_moved=args.max_moved, placement_ema=args.ema,
                              placement_overlap=not args.no_overlap) if policy != "static" else None
        self.rebalancer = build_rebalancer(pcfg, self.moe, groups, device) if pcfg else None
        gen = torch.Generator().manual_seed(1000 + groups.rank)
        self.x = torch.randn(args.batch, args.seq_len, args.d_model, generator=gen).to(device)
        self.steps, self.reports, self.commits = 0, [], {}
        self.times, self.cpu_times, self.rank_balance, self.expert_imbalance = [], [], [], []

    def step(self, timed: bool) -> None:
        """Forward, backward, gradient sync (replicas included), AdamW; then, while warming up,
        the rebalancer. ``timed``: record the slowest rank's time and the balance."""
        from fsmoe.parallel.grads import sync_grads

        args, groups = self.args, self.groups
        if args.shift_every and self.steps % args.shift_every == 0:
            for ly in self.moe:
                ly.router.shift(self.steps // args.shift_every)
        if groups.distributed:
            dist.barrier(group=groups.world_group)
        t0, c0 = time.perf_counter(), time.process_time()
        h, counts = self.x, []
        for ly in self.moe:
            y, stats = ly(h)
            h = h + y
            counts.append(stats.tokens_per_expert)
        self.opt.zero_grad(set_to_none=True)
        h.float().pow(2).mean().backward()
        sync_grads(self.layers, groups)
        self.opt.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t, cpu = _max_over_ranks([time.perf_counter() - t0, time.process_time() - c0], groups)
        self.steps += 1
        counts_ME = torch.stack(counts)
        if timed:
            self.times.append(t)
            self.cpu_times.append(cpu)
            total = _sum_over_ranks(counts_ME, groups).cpu()
            self.rank_balance.append(float(np.mean([balance_ratio(c.tolist(), ly.experts.placement)
                                                    for c, ly in zip(total, self.moe)])))
            self.expert_imbalance.append(float(np.mean([float(c.max() / c.mean()) for c in total])))
        elif self.rebalancer is not None:
            self.commits.update({k: self.commits.get(k, 0.0) + v for k, v in self.rebalancer.pop_commit_metrics().items()})
            report = self.rebalancer.after_step(self.steps, counts_ME, self.opt)
            if report is not None:
                self.reports.append(report.metrics())

    def result(self) -> dict:
        placements = [ly.experts.placement for ly in self.moe]
        r = self.reports
        return {"policy": self.policy, "step_ms": 1e3 * statistics.median(self.times),
                "cpu_ms": 1e3 * statistics.median(self.cpu_times),
                "rank_balance": statistics.median(self.rank_balance),
                "expert_imbalance": statistics.median(self.expert_imbalance),
                "slots_per_rank": placements[0].slots_per_rank, "experts_per_rank": self.args.experts // self.groups.ep,
                "replicas": sum(p.num_copies - p.num_experts for p in placements),
                "pause_s": sum(x["placement_pause_s"] for x in r) + self.commits.get("placement_wait_s", 0.0),
                "hidden_s": self.commits.get("placement_hidden_s", 0.0),
                "moved_bytes": sum(x["placement_moved_bytes"] for x in r),
                "moved_fraction_per_rebalance": [x["placement_moved_fraction"] for x in r],
                "balance_before_after": [(x["placement_balance_before"], x["placement_balance_after"]) for x in r]}


def _max_over_ranks(ts: list[float], groups: ParallelGroups) -> list[float]:
    if not groups.distributed:
        return ts
    v = torch.tensor(ts, dtype=torch.float64, device=device_for(groups.backend))
    dist.all_reduce(v, op=dist.ReduceOp.MAX, group=groups.world_group)
    return v.tolist()


def _sum_over_ranks(counts_ME: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    c = counts_ME.to(torch.float64).clone()
    if groups.distributed:
        dist.all_reduce(c, group=groups.world_group)
    return c


def live_main(args, groups: ParallelGroups, device) -> int:
    runs = [PolicyRun(args, groups, device, policy) for policy in args.policies.split(",")]
    for run in runs:  # warm-up: interval steps, then a rebalance; repeated
        for _ in range(args.interval * args.rebalances):
            run.step(timed=False)
    for _ in range(args.iters):  # timed round-robin, so a change in machine load hits every policy alike
        for run in runs:
            run.step(timed=True)
    results = [run.result() for run in runs]
    base = next((r["step_ms"] for r in results if r["policy"] == "static"), None)
    base_cpu = next((r["cpu_ms"] for r in results if r["policy"] == "static"), None)
    for r in results:
        r["speedup_vs_static"] = round(base / r["step_ms"], 3) if base else None
        r["cpu_speedup_vs_static"] = round(base_cpu / r["cpu_ms"], 3) if base_cpu else None
    if groups.rank == 0:
        setup = {k: getattr(args, k) for k in ("experts", "top_k", "layers", "d_model", "d_ff", "batch", "seq_len",
                                               "skew", "shift_every", "hot", "interval", "rebalances", "iters",
                                               "extra_slots", "threshold", "max_moved", "ema", "no_overlap")}
        setup.update(world=groups.world, ep=groups.ep, backend=groups.backend, device=str(device),
                     routing="synthetic skew: SkewedRouter (GShard + fixed Zipf logit bias)")
        print(live_table(results))
        if args.json:
            Path(args.json).write_text(json.dumps({"setup": setup, "results": results}, indent=2) + "\n")
    return 0


def live_table(results: list[dict]) -> str:
    rows = ["| policy | step ms | speedup vs static | slowest rank CPU ms | CPU speedup | rank balance (max/mean) "
            "| expert imbalance | slots/rank | extra copies | pause s | hidden s | moved MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['policy']} | {r['step_ms']:.1f} | {r['speedup_vs_static']} | {r['cpu_ms']:.1f} | "
                    f"{r['cpu_speedup_vs_static']} | {r['rank_balance']:.3f} | "
                    f"{r['expert_imbalance']:.2f} | {r['slots_per_rank']} ({r['experts_per_rank']} experts) | "
                    f"{r['replicas']} | {r['pause_s']:.3f} | {r.get('hidden_s', 0.0):.3f} | "
                    f"{r['moved_bytes'] / 2**20:.1f} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------- replay


def replay(trace_path: str, interval: int, extra_slots: float, threshold: float, max_moved: float,
           ep: int | None = None, ema: float = 1.0) -> dict:
    """The policies on a recorded trace (module docstring). Pure: no process group. ``ema``: the
    policies plan from the EMA of the windows so far (``LoadPredictor``), scored also on it."""
    from fsmoe.cli.trace import load_trace

    try:
        tr = load_trace(trace_path)
    except ConfigError as e:  # named by this command's option
        raise ConfigError("--trace", trace_path, e.allowed) from None
    E, M = tr.header["num_experts"], tr.header["num_layers"]
    P = ep or tr.header["ep"]
    spare = spare_slots_for(E, P, extra_slots)
    cost = PlacementCost(1.0, 0.0, 0.0, interval)
    out = {"trace": str(trace_path), "steps": int(len(tr.steps)), "layers": M, "experts": E, "ep": P,
           "slots_per_rank": E // P + spare, "extra_slot_fraction": spare / (E // P), "interval": interval,
           "ema": ema}
    for policy in POLICIES:
        settings = RebalanceSettings(policy, interval, threshold, max_moved) if policy != "static" else None
        placements = [Placement.initial(E, P, spare if settings else 0) for _ in range(M)]
        predictor = LoadPredictor(ema)
        next_bal, same_bal, plan_bal, moved = [], [], [], []
        for w in range(len(tr.steps) // interval - 1):
            seen = tr.load_ME(w * interval, (w + 1) * interval)
            nxt = tr.load_ME((w + 1) * interval, (w + 2) * interval)
            planned = predictor.update(seen)
            for m in range(M):
                if settings:
                    new = propose(settings, planned[m].tolist(), placements[m], cost)
                    moved.append(MigrationPlan.between(placements[m], new).moved_fraction())
                    placements[m] = new
                next_bal.append(balance_ratio(nxt[m].tolist(), placements[m]))
                same_bal.append(balance_ratio(seen[m].tolist(), placements[m]))
                plan_bal.append(balance_ratio(planned[m].tolist(), placements[m]))
        per_window = [float(np.mean(next_bal[i:i + M])) for i in range(0, len(next_bal), M)]
        out.setdefault("per_window", {})[policy] = per_window
        out[policy] = {"next_window_balance_mean": float(np.mean(next_bal)) if next_bal else None,
                       "next_window_balance_max": float(np.max(next_bal)) if next_bal else None,
                       "same_window_balance_mean": float(np.mean(same_bal)) if same_bal else None,
                       "same_window_balance_max": float(np.max(same_bal)) if same_bal else None,
                       "planned_balance_mean": float(np.mean(plan_bal)) if plan_bal else None,
                       "planned_balance_max": float(np.max(plan_bal)) if plan_bal else None,
                       "moved_fraction_mean": float(np.mean(moved)) if moved else 0.0,
                       "moved_fraction_max": float(np.max(moved)) if moved else 0.0}
    return out


def replay_table(r: dict) -> str:
    rows = [f"trace {r['trace']}: {r['steps']} steps, {r['layers']} MoE layers x {r['experts']} experts on EP="
            f"{r['ep']}, {r['slots_per_rank']} slots per rank ({100 * r['extra_slot_fraction']:.1f}% extra), "
            f"rebalance every {r['interval']} steps, planned from the EMA of the windows (newest weighs "
            f"{r['ema']}), scored on the next window",
            "| policy | next window mean | (max) | on the window it saw (mean / max) | on the load it planned from "
            "(mean / max) | moved per rebalance (mean / max) |",
            "|---|---|---|---|---|---|"]
    for policy in POLICIES:
        p = r[policy]
        rows.append(f"| {policy} | {p['next_window_balance_mean']:.3f} | {p['next_window_balance_max']:.3f} | "
                    f"{p['same_window_balance_mean']:.3f} / {p['same_window_balance_max']:.3f} | "
                    f"{p['planned_balance_mean']:.3f} / {p['planned_balance_max']:.3f} | "
                    f"{100 * p['moved_fraction_mean']:.1f}% / {100 * p['moved_fraction_max']:.1f}% |")
    return "\n".join(rows)


def replay_png(r: dict, path: str) -> None:
    """Balance ratio (next window, mean over layers) of each policy against the rebalance."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    for policy, ratios in r["per_window"].items():
        steps = [(w + 2) * r["interval"] for w in range(len(ratios))]
        ax.plot(steps, ratios, "o-", label=policy, markersize=3)
    ax.axhline(1.05, color="gray", linestyle="--", label="1.05")
    ax.set_xlabel("step (end of the window scored)")
    ax.set_ylabel("max / mean expert rows per EP rank")
    ax.set_title(f"{r['experts']} experts on EP={r['ep']}, {100 * r['extra_slot_fraction']:.1f}% extra slots, "
                 f"rebalance every {r['interval']} steps")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_command_arguments(p, nproc=4, ep=0)
    p.add_argument("--policies", default="static,flexmoe,eplb", help="comma-separated, static first")
    p.add_argument("--experts", type=positive_int, default=32)
    p.add_argument("--top-k", type=positive_int, default=2)
    p.add_argument("--layers", type=positive_int, default=2)
    p.add_argument("--d-model", type=positive_int, default=128)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--batch", type=positive_int, default=8, help="sequences per rank")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--skew", type=float, default=1.2, help="Zipf exponent of the synthetic logit bias")
    p.add_argument("--hot", choices=["clustered", "spread"], default="clustered",
                   help="clustered: the hottest experts are the lowest ids, so the static placement puts them on "
                        "EP rank 0 (one GPU doing several times the expert work of another); spread: a seeded "
                        "random choice")
    p.add_argument("--shift-every", type=int, default=0, help="move the hot experts every S steps (0: never)")
    p.add_argument("--interval", type=positive_int, default=4, help="steps per traffic window / between rebalances")
    p.add_argument("--rebalances", type=int, default=3, help="rebalances before timing")
    p.add_argument("--iters", type=positive_int, default=8, help="timed steps")
    p.add_argument("--extra-slots", type=float, default=0.125, help="spare slots per rank / experts per rank")
    p.add_argument("--threshold", type=float, default=1.05)
    p.add_argument("--max-moved", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=1.0,
                   help="plan from an EMA over windows, the newest weighing this (1: the last window alone)")
    p.add_argument("--no-overlap", action="store_true",
                   help="move experts with the step waiting (default: behind the next step's compute)")
    p.add_argument("--json", type=output_file, help="write the results here")
    p.add_argument("--trace", help="replay the policies on this routing trace (routing_trace.jsonl.gz) instead")
    p.add_argument("--plot", type=plot_file, help="with --trace: draw the balance per window to this PNG")


def run(args) -> int:
    if args.trace:
        r = replay(args.trace, args.interval, args.extra_slots, args.threshold, args.max_moved, args.ep or None,
                   args.ema)
        print(replay_table(r))
        if args.plot:
            replay_png(r, args.plot)
        if args.json:
            Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
        return 0
    if args.ep == 0:  # every process an EP rank (in a torchrun worker --nproc is gone: the world size)
        args.ep = world_size_from_env() if world_size_from_env() > 1 else args.nproc
    return run_command(args, lambda groups, device: live_main(args, groups, device))
