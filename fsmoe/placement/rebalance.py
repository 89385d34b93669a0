"""Rebalancing in training: traffic window -> policy -> migrate, every ``interval`` steps.

Shape legend: M MoE layers, R source ranks (the world), E logical experts.

``Rebalancer.after_step(step, counts_ME, optimizer)`` runs on every rank after the optimizer step:

    1. record this rank's ``[M, E]`` counts of the step in the traffic window (device, no sync);
    2. every ``interval`` steps: all-gather the window over the world (``[M, R, E]``; every rank
       then holds the same numbers), predict the next window's load from it (``LoadPredictor``:
       an EMA over windows, ``placement_ema``), and per layer run the policy (a pure function, so
       every rank, EDP replicas included, computes the same placement);
    3. move each layer whose placement changed (weights and optimizer state). Overlapped (the
       default): ``launch_migration`` packs the rows and launches the AlltoAll asynchronously; a
       forward pre-hook on the layer commits it (waits, writes the rows, switches the
       placement) just before the layer's next forward, so the transfer runs behind the next
       step's earlier compute. Otherwise ``migrate`` does it all here and the step waits;
    4. report the balance ratio before and after (on the window's loads), the bytes moved and
       the pause (this rank's wall time of 2-3); the commits add the time they waited and the
       time the transfers ran hidden (:meth:`Rebalancer.pop_commit_metrics`).

Checkpoints are written under the logical layout: :meth:`Rebalancer.logical_layout` moves every
layer to ``Placement.initial`` (the leading slots hold the logical experts) for the save and back
afterwards; both moves are exact copies, so the run goes on unchanged.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fsmoe.placement.migrate import launch_migration, logical_layout, migrate
from fsmoe.placement.placement import Placement
from fsmoe.placement.policy import PlacementCost, balance_ratio, eplb_policy, flexmoe_policy
from fsmoe.placement.traffic import LoadPredictor, TrafficWindow, gather_traffic

POLICIES = ("static", "flexmoe", "eplb")


@dataclass(frozen=True)
class RebalanceSettings:
    """policy: flexmoe | eplb; interval: steps between rebalances (= the traffic window);
    threshold: flexmoe's trigger (max/mean rank load); max_moved: flexmoe's move budget (fraction
    of the experts per layer); nodes: eplb's node count (hierarchical when > 1); ema: the
    predictor's weight of the newest window; overlap: move behind the next step's compute."""

    policy: str
    interval: int
    threshold: float = 1.05
    max_moved: float = 0.1
    nodes: int = 1
    ema: float = 1.0
    overlap: bool = False

    def __post_init__(self) -> None:
        if self.policy not in POLICIES[1:]:
            raise ValueError(f"RebalanceSettings.policy={self.policy!r}; allowed: {list(POLICIES[1:])}")


@dataclass(frozen=True)
class RebalanceReport:
    """One rebalance (all layers): balance ratios averaged over layers, on the window's loads."""

    step: int
    balance_before: float
    balance_after: float
    layers_changed: int
    moved_fraction: float  # copies that crossed ranks / experts, averaged over layers
    moved_bytes: int  # weights + gradients + optimizer state, whole EP group, all layers
    pause_s: float  # the step waited: policy, packing and launching (overlapped) or the whole move
    replicas: int  # copies beyond one per expert, all layers, after

    def metrics(self) -> dict:
        return {"placement_step": self.step, "placement_balance_before": round(self.balance_before, 4),
                "placement_balance_after": round(self.balance_after, 4),
                "placement_layers_changed": self.layers_changed,
                "placement_moved_fraction": round(self.moved_fraction, 4), "placement_moved_bytes": self.moved_bytes,
                "placement_pause_s": round(self.pause_s, 4), "placement_replicas": self.replicas}


def propose(settings: RebalanceSettings, load_E, placement: Placement, cost: PlacementCost) -> Placement:
    """The policy's placement for one layer (pure)."""
    if settings.policy == "flexmoe":
        return flexmoe_policy(load_E, placement, cost, settings.threshold, settings.max_moved)
    return eplb_policy(load_E, placement, cost, settings.nodes)


class Rebalancer:
    """layers: the model's ``ParallelMoELayer`` s (with spare slots); ep_group / world_group:
    process groups; cost: the cost model's constants."""

    def __init__(self, settings: RebalanceSettings, layers: list, ep_group, world_group, cost: PlacementCost,
                 device: torch.device, edp: int = 1):
        self.settings, self.layers, self.cost, self.edp = settings, layers, cost, edp
        self.ep_group, self.world_group = ep_group, world_group
        E = layers[0].experts.placement.num_experts
        self.window = TrafficWindow(len(layers), E, settings.interval, device)
        self.predictor = LoadPredictor(settings.ema)
        self.pending: dict[int, object] = {}  # id(layer) -> PendingMigration
        self.commit_wait_s = self.commit_hidden_s = 0.0
        self.commits = 0
        if settings.overlap:
            for layer in layers:
                layer.register_forward_pre_hook(self._commit_hook)

    def _commit_hook(self, layer, args) -> None:
        pending = self.pending.pop(id(layer), None)
        if pending is not None:
            wait, hidden = pending.commit()
            self.commit_wait_s += wait
            self.commit_hidden_s += hidden
            self.commits += 1

    def commit_all(self) -> None:
        """Finish every migration in flight now (before a checkpoint, or at the end)."""
        for layer in self.layers:
            self._commit_hook(layer, ())

    def pop_commit_metrics(self) -> dict:
        """``placement_wait_s`` (the commits waited for transfers and wrote rows) and
        ``placement_hidden_s`` (transfer time that ran behind compute), summed over the layers
        committed since the last call; {} when none was."""
        if not self.commits:
            return {}
        out = {"placement_wait_s": round(self.commit_wait_s, 4), "placement_hidden_s": round(self.commit_hidden_s, 4)}
        self.commit_wait_s = self.commit_hidden_s = 0.0
        self.commits = 0
        return out

    def after_step(self, step: int, counts_ME: Tensor, optimizer) -> RebalanceReport | None:
        """``step``: optimizer steps done (1-based); ``counts_ME``: this rank's counts of the step."""
        self.window.record(counts_ME)
        if step % self.settings.interval:
            return None
        t0 = time.perf_counter()
        # rows per step that one EP group computes (the cost model's unit; EDP groups split the batch)
        steps = min(self.window.steps, self.settings.interval)
        loads_ME = gather_traffic(self.window.sum_ME(), self.world_group).sum(axis=1) / (steps * self.edp)
        predicted_ME = self.predictor.update(loads_ME)
        self.commit_all()  # a move still in flight (a layer that has not run since) lands first
        before, after, moved, nbytes, changed = [], [], [], 0, 0
        for load_E, pred_E, layer in zip(loads_ME, predicted_ME, self.layers):
            old = layer.experts.placement
            new = propose(self.settings, pred_E.tolist(), old, self.cost)
            before.append(balance_ratio(load_E, old))
            after.append(balance_ratio(load_E, new))
            if new is old:
                moved.append(0.0)
                continue
            changed += 1
            if self.settings.overlap and new.slots_E != old.slots_E:
                pending = launch_migration(layer, new, self.ep_group, optimizer)
                self.pending[id(layer)] = pending
                moved.append(pending.plan.remote_rows / new.num_experts)
                nbytes += pending.plan.remote_rows * pending.row_bytes
                continue
            stats = migrate(layer, new, self.ep_group, optimizer)  # or only new shares: no bytes
            moved.append(stats.remote_rows / new.num_experts)
            nbytes += stats.moved_bytes
        replicas = sum(ly.experts.placement.num_copies - ly.experts.placement.num_experts for ly in self.layers)
        return RebalanceReport(step, float(np.mean(before)), float(np.mean(after)), changed, float(np.mean(moved)),
                               nbytes, time.perf_counter() - t0, replicas)

    def logical_layout(self, optimizer):
        """Every layer in ``Placement.initial`` inside the block (migrations in flight finished
        first), back to its placement after (``migrate.logical_layout``)."""
        self.commit_all()
        return logical_layout(self.layers, self.ep_group, optimizer)


def build_rebalancer(p, layers: list, groups, device: torch.device) -> Rebalancer | None:
    """The rebalancer of ``parallel.placement`` (``p``: a ParallelConfig) over ``layers`` (the
    model's ``ParallelMoELayer`` s, spare slots added); None for static. The cost model is
    estimated from the expert shape and rough per-rank rates of the backend (GPU: 400 TFLOP/s,
    100 GB/s; CPU: 20 GFLOP/s, 1 GB/s): only their ratios steer the policy (docs/placement.md)."""
    if p.placement == "static":
        return None
    ex = layers[0].experts
    _, D, F = ex.w1_EDF.shape
    gemms = 3 if ex.w3_EDF is not None else 2
    flops, bandwidth = (4e14, 1e11) if groups.backend == "nccl" else (2e10, 1e9)
    cost = PlacementCost.estimate(gemms * D * F, D, F, gemms, ex.w1_EDF.element_size(), flops, bandwidth,
                                  p.placement_interval)
    nodes = groups.topology.num_nodes
    E = ex.placement.num_experts
    nodes = nodes if nodes > 1 and p.ep % nodes == 0 and E % nodes == 0 else 1
    settings = RebalanceSettings(p.placement, p.placement_interval, p.placement_threshold, p.placement_max_moved,
                                 nodes, p.placement_ema, p.placement_overlap)
    return Rebalancer(settings, layers, groups.ep_group, groups.world_group, cost, device, edp=groups.edp)
