"""ParallelTrainer: ``fsmoe train`` on DP x MP x EP x ESP, equal to one process on the global batch.

It is the one-process :class:`fsmoe.train.Trainer` with its distributed seams filled in:

    build_model   build the full model from the seed, then ``parallelize`` (slices shards)
    build_schedule  ``parallel.schedule`` != "default": plan it, install the pipelined executor
                  and GradSync (fsmoe.schedule.run.training; docs/scheduler.md "In training")
    sync_grads    fsmoe.parallel.grads.sync_grads (each parameter over its own group, / dp); the
                  dense (dp) part is AllReduced in buckets during backward (grad_buckets), or under
                  a pipelined schedule by GradSync's partitions, finished first
    grad_norm     group-aware global norm (each shard counted once)
    train_step    metrics made global (loss averaged over dp, expert loads summed over ranks)
    state_dict    sharded tensors wrapped as global DTensors, so checkpoints reshard on load
    optimizer     ``parallel.shard = "optimizer"``: AdamW state split over each parameter's replica
                  group (fsmoe.parallel.zero), gradients reduce-scattered into the same slices
                  (ZeRO-2, fsmoe.parallel.zero_grads); checkpoints load across either setting
    placement     ``parallel.placement`` != static: spare expert slots, and a Rebalancer that
                  moves experts by the measured traffic (fsmoe.placement; docs/placement.md)

Launch: ``torchrun --nproc-per-node N -m fsmoe.cli train ...`` or ``fsmoe train --nproc N ...``.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from rich.console import Console
from torch import Tensor, nn

from fsmoe.config import RunConfig
from fsmoe.parallel.checkpoint import Meshes, to_global_state, to_local_state
from fsmoe.parallel.grad_buckets import BucketedGradSync
from fsmoe.parallel.grads import grad_norm, sync_grads
from fsmoe.parallel.groups import ParallelGroups
from fsmoe.parallel.sharding import REDUCE_KINDS, get_sharding
from fsmoe.parallel.launch import init_distributed, run_guarded, shutdown_distributed
from fsmoe.parallel.tensor_parallel import parallelize
from fsmoe.placement.policy import balance_ratio
from fsmoe.placement.rebalance import build_rebalancer
from fsmoe.placement.slots import add_spare_slots, pad_spare_rows, spare_slots_for
from fsmoe.parallel.zero import ZeroAdamW
from fsmoe.parallel.zero_grads import GradReduceScatter
from fsmoe.train import StepResult, Trainer, lr_multiplier, param_groups, resolve_device


if TYPE_CHECKING:
    from fsmoe.schedule.run.training import TrainingSchedule

class ParallelTrainer(Trainer):
    def __init__(self, cfg: RunConfig, run_dir: Path | str, *, groups: ParallelGroups, resume: bool = False,
                 console=None, init_from: Path | None = None):
        self.meshes = Meshes.build(groups)  # before the base class may load a checkpoint
        if console is None and groups.rank != 0:
            console = Console(quiet=True)  # rank 0 speaks for the job
        super().__init__(cfg, run_dir, resume=resume, groups=groups, console=console, init_from=init_from)
        # The default data path's dense gradients: AllReduce in buckets while backward runs, on GPUs
        # (NCCL); also under a pipelined schedule, which leaves them to the buckets on NCCL (no GradSync).
        # gloo keeps the one flat AllReduce after backward: a CPU has no separate engine to overlap
        # it with.
        default_path = self.moe_schedule is None or self.moe_schedule.grad_sync is None
        # A sharded optimizer takes its slices of the gradients by reduce-scatter (ZeRO-2), except the
        # dense ones a pipelined schedule's partitions reduce (gloo: GradSync), which stay whole
        self.grad_rs = (GradReduceScatter(self.optimizer, ("dp", "edp") if default_path else ("edp",),
                                          overlap=groups.backend == "nccl")
                        if isinstance(self.optimizer, ZeroAdamW) else None)
        self._reduced_elsewhere = self.grad_rs.params if self.grad_rs is not None else set()
        self.dp_sync = (BucketedGradSync(self.model, groups, skip=self._reduced_elsewhere)
                        if groups.dp > 1 and default_path and groups.backend == "nccl" else None)
        self.rebalancer = build_rebalancer(cfg.parallel, self.model.moe_layers(), groups, self.device)

    def build_model(self) -> nn.Module:
        """This rank's shard of the model, built shard by shard (fsmoe.parallel.build: no rank ever
        holds the whole model; ``init_from`` weights are read into the shards), except when a peer's
        MoE layers are swapped in: then built whole and sliced (``parallelize``). The same numbers
        either way."""
        if self.cfg.model.moe.impl == "fsmoe":
            from fsmoe.parallel.build import build_sharded_model, load_into_shards

            model = build_sharded_model(self.cfg.model, self.groups, self.device, self.tcfg.seed)
            if self.init_from is not None:
                self._say_loaded(load_into_shards(model, self.init_from, self.groups, self.meshes))
        else:
            model = super().build_model()
            if self.cfg.model.moe.impl == "deepspeed":  # the peer (fsmoe.models.peers.deepspeed_moe)
                from fsmoe.models.peers.deepspeed_moe import replace_moe_layers

                replace_moe_layers(model, self.groups)
            model = parallelize(model, self.groups)
        p = self.cfg.parallel
        from fsmoe.comm.hierarchical import HierarchicalDispatcher

        hierarchical = [layer for layer in model.moe_layers() if isinstance(layer.dispatcher, HierarchicalDispatcher)]
        if p.profile and hierarchical:  # the hierarchical dispatcher's per-level alpha-beta fits
            from fsmoe.comm.topology import LevelCosts
            from fsmoe.schedule.model.profile import Profile

            profile = Profile.load(p.profile, field="parallel.profile")
            for layer in hierarchical:
                layer.dispatcher.costs = LevelCosts.from_profile(profile, layer.dispatcher.levels)
        if p.placement != "static":  # room for copies, before the optimizer exists
            spare = spare_slots_for(self.cfg.model.moe.num_experts, p.ep, p.placement_extra_slots)
            for layer in model.moe_layers():
                add_spare_slots(layer, spare)
        return model

    def observe_routing(self, counts_ME: Tensor) -> None:
        """The trace, then the placement policy (``parallel.placement``): every
        ``placement_interval`` steps it may move experts; its report joins the next record."""
        super().observe_routing(counts_ME)
        if self.rebalancer is not None:
            self._schedule_metrics.update(self.rebalancer.pop_commit_metrics())  # moves landed this step
            report = self.rebalancer.after_step(self.step, counts_ME, self.optimizer)
            if report is not None:
                self._schedule_metrics.update(report.metrics())

    def _record(self, r, tokens_per_s: float) -> dict[str, Any]:
        """Plus ``rank_balance``: max/mean expert rows per EP rank under the current placement
        (averaged over layers; what expert parallelism waits for)."""
        record = super()._record(r, tokens_per_s)
        if self.groups.ep > 1:
            layers = self.model.moe_layers()
            record["rank_balance"] = round(sum(balance_ratio(load.tolist(), ly.experts.placement)
                                               for load, ly in zip(r.tokens_per_expert, layers)) / len(layers), 4)
        return record

    def _dp_shard(self) -> tuple[int, int]:
        return self.groups.dp_rank, self.groups.dp

    def _build_optimizer(self):
        """``parallel.shard = "optimizer"``: the AdamW of fsmoe.parallel.zero over this rank's slices;
        ``"full"``: the blocks' weights kept as those slices too (fsmoe.parallel.zero3)."""
        shard = self.cfg.parallel.shard
        if shard == "none" or not self.groups.distributed:
            return super()._build_optimizer()
        t = self.tcfg
        optimizer = ZeroAdamW(param_groups(self.model, t.weight_decay), self.groups, lr=t.lr,
                              betas=(t.beta1, t.beta2), eps=t.eps, fused=self.device.type == "cuda",
                              weights_of=self.model if shard == "full" else None)
        optimizer.overlap_with(self.model)  # the weights' all_gather runs behind the next forward
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(t))

    def _param_names(self) -> dict[int, str]:
        return {id(p): name for name, p in self.model.named_parameters()}

    def model_optim_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        if not isinstance(self.optimizer, ZeroAdamW):
            return super().model_optim_state()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        self.optimizer.finish_gathers()  # every weight whole to be read (shard = "full" frees them)
        return get_model_state_dict(self.model), self.optimizer.fqn_state_dict(self._param_names())

    def load_model_optim_state(self, model_sd: dict[str, Any], optim_sd: dict[str, Any]) -> None:
        if not isinstance(self.optimizer, ZeroAdamW):
            return super().load_model_optim_state(model_sd, optim_sd)
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        self.optimizer.finish_gathers()  # every weight whole to be written (shard = "full" frees them)
        set_model_state_dict(self.model, model_sd)
        self.optimizer.load_fqn_state_dict(optim_sd, self._param_names())

    def parameter_counts(self) -> tuple[int, int]:
        """Of the global model (shards counted at their global shape), as one process would report."""
        def numel(p) -> int:
            return math.prod(get_sharding(p).global_shape(p.shape, self.groups))

        total = sum(numel(p) for p in self.model.parameters())
        for layer in self.model.moe_layers():  # spare expert slots are no parameters of the model
            pl = layer.experts.placement
            spare = pl.num_slots - pl.num_experts
            total -= sum(numel(p) for p in layer.experts.parameters()) * spare // pl.num_slots
        active = total
        for layer in self.model.moe_layers():
            pl = layer.experts.placement
            routed = sum(numel(p) for p in layer.experts.parameters()) * pl.num_experts // pl.num_slots
            active -= routed - layer.cfg.router.top_k * routed // layer.cfg.num_experts
        return total, active

    def _print_header(self) -> None:
        super()._print_header()
        g = self.groups
        if self.is_writer:
            self.console.print(f"layout: {g.world} processes ({g.backend}, {g.topology.num_nodes} node(s)); dense "
                               f"dp={g.dp} x mp={g.mp}; MoE edp={g.edp} x ep={g.ep} x esp={g.esp}"
                               + (f"; MoE layers: {self.cfg.model.moe.impl} (model.moe.impl)"
                                  if self.cfg.model.moe.impl != "fsmoe" else ""))
            if isinstance(self.optimizer, ZeroAdamW):
                held, full = self.optimizer.state_bytes()
                self.console.print(f"optimizer state split over replicas (parallel.shard={self.cfg.parallel.shard}): "
                                   f"{held / 2**30:.3g} GiB on rank 0 (moments, and the weights of slices "
                                   f"not along the first dim) instead of {full / 2**30:.3g} GiB of moments")

    def build_schedule(self) -> TrainingSchedule | None:
        """Plan ``parallel.schedule`` and install it (executors on every MoE layer, GradSync)."""
        from fsmoe.schedule.run.training import TrainingSchedule

        return TrainingSchedule.build(self.cfg, self.model, self.groups, self.device, self.run_dir, self.is_writer,
                                      start_step=self.step)

    def sync_grads(self) -> None:
        """Each gradient summed over its group, / dp. The dense (dp) part is finished first where
        it was reduced during backward (the buckets, or a pipelined schedule's GradSync
        partitions), so clipping sees full sums; otherwise one flat AllReduce per reduce kind."""
        ts, kinds = self.moe_schedule, tuple(k for k in REDUCE_KINDS if k != "dp")
        if self.dp_sync is not None:
            self.dp_sync.finish()
        elif ts is not None and ts.grad_sync is not None:
            ts.sync_dense(self.model)
        else:
            kinds = REDUCE_KINDS
        sync_grads(self.model, self.groups, kinds=kinds, skip=self._reduced_elsewhere)
        if self.grad_rs is not None:
            self.grad_rs.finish()

    def close(self) -> None:
        """Stop the schedule's lane threads and hooks; write the weights of a gather still running."""
        if isinstance(self.optimizer, ZeroAdamW):
            self.optimizer.finish_gathers()
        if self.moe_schedule is not None:
            self.moe_schedule.close()

    def grad_norm(self) -> Tensor:
        return grad_norm(self.model, self.groups, self.grad_rs)

    def all_finite(self, finite: Tensor) -> Tensor:
        """Every rank skips or applies the same steps: the flags' minimum over the world (on the
        device under NCCL, so no host wait)."""
        flag = finite.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.groups.world_group)
        return flag.bool()

    def train_step(self) -> StepResult:
        """One step; the returned metrics are those of the global batch (one AllReduce, left on
        the device like the one-process result)."""
        r = super().train_step()
        self._hierarchical_step()
        g = self.groups
        loads = r.tokens_per_expert_ME.to(torch.float64)
        packed = torch.cat([torch.stack([r.loss.double() / g.world, r.aux_loss.double() / g.dp,
                                         r.dropped.double()]), loads.flatten()])
        dist.all_reduce(packed, group=g.world_group)
        return dataclasses.replace(r, loss=packed[0], aux_loss=packed[1], dropped=packed[2].long(),
                                   tokens_per_expert_ME=packed[3:].view_as(loads).long())

    def _hierarchical_step(self) -> None:
        """The hierarchical dispatch's numbers into the next metrics record, and every
        ``parallel.expert_swap_every`` steps one expert swap per MoE layer (its cost measured)."""
        from fsmoe.parallel.expert_swap import dispatch_metrics, swap_experts

        self._schedule_metrics.update(dispatch_metrics(self.model))
        p = self.cfg.parallel
        if p.expert_swap_every and self.step % p.expert_swap_every == 0:
            swaps = [swap_experts(layer, self.groups, self.optimizer, p.swap_policy, p.swap_gamma)
                     for layer in self.model.moe_layers()]
            self._schedule_metrics.update(swap_pairs=[s["pair"] for s in swaps],
                                          swap_predicted_ms=[[round(s["before"] * 1e3, 4), round(s["after"] * 1e3, 4)]
                                                             for s in swaps],
                                          swap_s=sum(s["seconds"] for s in swaps))

    def save_checkpoint(self) -> Path:
        """Checkpoints hold experts in logical order: moved or replicated experts (``parallel.placement``,
        fsmoe.placement.rebalance) and swapped ones (``parallel.expert_swap_every``) are moved back
        to their initial slots for the save (``migrate.logical_layout``), then to where they were."""
        if isinstance(self.optimizer, ZeroAdamW):  # the weights the last step gathered, written
            self.optimizer.finish_gathers()
        if self.rebalancer is not None:
            layout = self.rebalancer.logical_layout(self.optimizer)
        else:
            from fsmoe.placement.migrate import logical_layout
            from fsmoe.placement.placement import Placement

            placed = [layer for layer in self.model.moe_layers()
                      if isinstance(getattr(layer.experts, "placement", None), Placement)]
            layout = logical_layout(placed, self.groups.ep_group, self.optimizer)
        with layout:
            return super().save_checkpoint()

    def state_dict(self) -> dict[str, Any]:
        zero = (self.optimizer.zero_slices(self._param_names()) if isinstance(self.optimizer, ZeroAdamW) else None)
        return to_global_state(super().state_dict(), self.model, self.groups, self.meshes, zero)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(pad_spare_rows(to_local_state(state), self.model))


def run_parallel(cfg: RunConfig, run_dir: Path, resume: bool, init_from: Path | None = None) -> int:
    """Entry point of one torchrun worker: groups, train, clean shutdown; any error on any rank
    stops every rank (fsmoe.parallel.launch)."""

    def main() -> int:
        groups = init_distributed(cfg.parallel, resolve_device(cfg.train).type)
        trainer = ParallelTrainer(cfg, run_dir, groups=groups, resume=resume, init_from=init_from)
        trainer.fit()
        trainer.close()
        shutdown_distributed()
        return 0

    return run_guarded(main)
