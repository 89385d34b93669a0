"""The MoE layer on EDP x EP x ESP: sharded experts, the sharded dispatcher, and the token split.

Shape legend: B sequences, L sequence length, D model dim, E global experts, El = E/ep local
experts, F = d_ff/esp hidden columns per shard.

The dense part replicates activations over the MP group, but the MoE part must give each rank
distinct tokens (each token is routed once, ESP AllGathers rows from distinct ranks). So
``ParallelMoELayer`` splits the MP group's batch (rank j keeps sequences ``[j*B/mp, (j+1)*B/mp)``),
runs the ordinary ``MoELayer`` on its share, and AllGathers the outputs; the backward of the split
is an AllGather and of the gather a split (Megatron's sequence-parallel pair, along the batch).

Child module names stay those of ``MoELayer`` (``router``, ``experts``, ``shared``) so
parameter names, seeds and checkpoints do not depend on the layout.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from fsmoe.comm.alltoall import AllToAllStage
from fsmoe.comm.dispatcher import Dispatcher, LocalDispatcher
from fsmoe.comm.esp import EspStage
from fsmoe.comm.functional import gather_from_group, reduce_scatter_impl_for, split_to_group
from fsmoe.comm.sharded import ShardedDispatcher
from fsmoe.config import ConfigError, MoEConfig
from fsmoe.experts import GroupedExperts
from fsmoe.experts import FusedGroupedExperts
from fsmoe.layer import Executor, MoELayer, MoEStats
from fsmoe.order import SummedIndexOrder
from fsmoe.parallel.groups import ParallelGroups
from fsmoe.parallel.sharding import ParamSharding, set_sharding, tag_module
from fsmoe.placement.placement import Placement
from fsmoe.select import resolve_kernels

EXPERT_SHARDING = {  # weight name -> how it is split (dim 0 experts over ep, f over esp)
    "w1_EDF": ParamSharding("edp", ((0, "ep"), (2, "esp"))),
    "w3_EDF": ParamSharding("edp", ((0, "ep"), (2, "esp"))),
    "w2_EFD": ParamSharding("edp", ((0, "ep"), (1, "esp"))),
}
PARTIAL = ParamSharding("world")  # sees this rank's tokens only


class _ExpertShard:
    """Mixin for an experts class (``GroupedExperts`` or its fused subclass): this rank holds the
    experts its ``placement`` puts on ``ep_rank`` (slot order; default ``[ep_rank*El,
    (ep_rank+1)*El)``), hidden columns ``[esp_rank*F, (esp_rank+1)*F)``.

    ``reset_parameters`` draws the *full* ``[E, D, d_ff]`` tensors and keeps this shard, so every
    layout starts from the weights one process would have.
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str, *, ep: int, ep_rank: int,
                 esp: int, esp_rank: int):
        if num_experts % ep:
            raise ConfigError("parallel.ep", ep, f"EP={ep} does not divide num_experts={num_experts}")
        if d_ff % esp:
            raise ConfigError("parallel.esp", esp, f"ESP={esp} does not divide experts.d_ff={d_ff}")
        self.num_experts_total, self.ep_rank = num_experts, ep_rank
        self.placement = Placement.contiguous(num_experts, ep)
        super().__init__(num_experts // ep, d_model, d_ff, activation, esp=esp, esp_rank=esp_rank)
        for name, p in self.named_parameters():
            set_sharding(p, EXPERT_SHARDING[name])

    @property
    def expert_ids(self) -> list[int]:
        """The logical expert in each of this rank's slots."""
        return list(self.placement.experts_on(self.ep_rank))

    @property
    def expert_offset(self) -> int:
        """The first expert of this rank (its experts are contiguous under the default placement)."""
        return self.expert_ids[0]

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        E, ids = self.num_experts_total, self.expert_ids
        F_, f0 = self.w1_EDF.shape[2], self.f_offset
        with torch.no_grad():
            for name, p in self.named_parameters():
                f_dim = 1 if name == "w2_EFD" else 2
                shape = [E, self.d_model, self.d_model]
                shape[f_dim] = self.d_ff_full
                fan_in = self.d_ff_full if name == "w2_EFD" else self.d_model
                full = torch.randn(shape, generator=generator, device=p.device) / math.sqrt(fan_in)
                p.copy_(full[ids].narrow(f_dim, f0, F_))

    def load_full(self, full: GroupedExperts) -> None:
        """Copy this shard out of a one-process ``GroupedExperts`` holding every expert."""
        ids, F_, f0 = self.expert_ids, self.w1_EDF.shape[2], self.f_offset
        with torch.no_grad():
            for name, p in self.named_parameters():
                f_dim = 1 if name == "w2_EFD" else 2
                p.copy_(getattr(full, name)[ids].narrow(f_dim, f0, F_))


class ShardedGroupedExperts(_ExpertShard, GroupedExperts):
    """Plain-PyTorch grouped-GEMM experts, sharded."""


class ShardedFusedGroupedExperts(_ExpertShard, FusedGroupedExperts):
    """Triton-fused experts (GPU), sharded."""


def sharded_experts_class(kernels: str):
    """The sharded counterpart of ``fsmoe.select.experts_class(kernels)``."""
    return ShardedFusedGroupedExperts if kernels == "triton" else ShardedGroupedExperts


def build_dispatcher(cfg: MoEConfig, groups: ParallelGroups, reduce_scatter_impl: str | None = None,
                     d_model: int = 1024) -> Dispatcher:
    """The dispatcher for ``cfg.dispatcher`` on this layout (chosen here, never inside forward).

    ``auto``: local when ep*esp == 1, else AlltoAll (+ ESP stage). ``hierarchical`` / ``2dh``:
    the d-level dispatcher (with / without dedup) over the EP group's levels (AlltoAll when EP
    is 1). ``reduce_scatter_impl`` overrides the backend's default ReduceScatter (tests run both
    on gloo); ``d_model`` sizes a row for the hierarchical cost model.
    """
    kind = cfg.dispatcher
    if kind in ("hierarchical", "2dh") and groups.ep > 1:
        return _hierarchical(cfg, groups, reduce_scatter_impl, d_model)
    if groups.ep * groups.esp == 1:
        return LocalDispatcher(cfg.num_experts)
    if kind == "local":
        raise ConfigError("model.moe.dispatcher", kind, f"needs ep*esp == 1 (got ep={groups.ep}, "
                          f"esp={groups.esp}); use 'auto' or 'alltoall'")
    impl = reduce_scatter_impl or reduce_scatter_impl_for(groups.backend)
    return ShardedDispatcher(
        cfg.num_experts, ep=groups.ep, esp=groups.esp, ep_rank=groups.ep_rank, esp_rank=groups.esp_rank,
        counts_group=groups.moe_group,
        ep_stage=AllToAllStage(groups.ep_group) if groups.ep > 1 else None,
        esp_stage=EspStage(groups.esp_group, impl) if groups.esp > 1 else None)


def _hierarchical(cfg: MoEConfig, groups: ParallelGroups, reduce_scatter_impl: str | None, d_model: int):
    from fsmoe.comm.hierarchical import DepthPolicy, HierarchicalDispatcher
    from fsmoe.parallel.levels import levels_of, stage_groups

    levels = levels_of(groups)
    if cfg.dedup_depth > levels.depth:
        raise ConfigError("model.moe.dedup_depth", cfg.dedup_depth,
                          f"the EP group has {levels.depth} level(s) {list(levels.sizes)}: allowed 0..{levels.depth}")
    impl = reduce_scatter_impl or reduce_scatter_impl_for(groups.backend)
    dedup = cfg.dispatcher == "hierarchical"
    fixed = cfg.dedup_depth if dedup else min(2, levels.depth)
    stages = stage_groups(groups, levels)
    esp_stage = EspStage(groups.esp_group, impl) if groups.esp > 1 else None
    # the flat AlltoAll the cost model may choose instead (d = 0) when d is not fixed
    flat = ShardedDispatcher(cfg.num_experts, ep=groups.ep, esp=groups.esp, ep_rank=groups.ep_rank,
                             esp_rank=groups.esp_rank, counts_group=groups.moe_group,
                             ep_stage=AllToAllStage(groups.ep_group), esp_stage=esp_stage)
    return HierarchicalDispatcher(
        cfg.num_experts, levels=levels, ep_rank=groups.ep_rank, esp=groups.esp, stage_groups=stages,
        counts_group=groups.moe_group, esp_stage=esp_stage, esp_group=groups.esp_group, dedup=dedup,
        policy=DepthPolicy(fixed, cfg.dedup_every, cfg.dedup_calibrate if dedup else 0), row_bytes=d_model * 4,
        flat=flat if dedup and not fixed else None)


class ParallelMoELayer(MoELayer):
    """``MoELayer`` over the layout of ``groups``; same interface and parameter names.

    Forward, on every rank of an MP group holding the same x [B, L, D]:
      1. keep this rank's B/mp sequences (no-op when mp == 1);
      2. the MoE layer (router, Order, sharded dispatch, experts on this shard, combine, I-Order);
      3. AllGather the outputs back to [B, L, D]; the aux loss is divided by mp because the
         mp ranks each hold a share of the batch (see fsmoe.parallel.grads for the scaling).
    """

    def __init__(self, cfg: MoEConfig, d_model: int, groups: ParallelGroups, *, router=None, order=None,
                 reduce_scatter_impl: str | None = None, executor: Executor | None = None):
        experts = sharded_experts_class(resolve_kernels(cfg.kernels))(
            cfg.num_experts, d_model, cfg.experts.d_ff, cfg.experts.activation, ep=groups.ep, ep_rank=groups.ep_rank,
            esp=groups.esp, esp_rank=groups.esp_rank)
        dispatcher = build_dispatcher(cfg, groups, reduce_scatter_impl, d_model)
        super().__init__(cfg, d_model, dispatcher=dispatcher, experts=experts, order=order, router=router,
                         executor=executor)
        if dispatcher.applies_weights:  # combine returns weighted sums: the I-Order only adds rows
            self.order = SummedIndexOrder()
        self.mp, self.mp_group = groups.mp, groups.mp_group
        self.router.balance_group = groups.world_group  # loads / balance statistics over all tokens
        tag_module(self, PARTIAL)

    @staticmethod
    def from_layer(layer: MoELayer, groups: ParallelGroups, reduce_scatter_impl: str | None = None
                   ) -> "ParallelMoELayer":
        """Shard a one-process layer: same router, shared experts and hooks; experts sliced."""
        with torch.random.fork_rng(devices=[]):  # construction draws are discarded: leave the RNG as it was
            new = ParallelMoELayer(layer.cfg, layer.d_model, groups, router=layer.router, order=layer.order,
                                   reduce_scatter_impl=reduce_scatter_impl, executor=layer.executor)
        new.experts.load_full(layer.experts)
        new.shared = layer.shared
        new._hooks = layer._hooks
        tag_module(new, PARTIAL)
        return new

    def forward(self, x: Tensor) -> tuple[Tensor, MoEStats]:
        """x: [B, L, D] (or [T, D]), identical on the ranks of the MP group. Returns (y like x, stats)."""
        if self.mp == 1:
            return super().forward(x)
        if x.shape[0] % self.mp:
            raise ValueError(f"the MoE layer splits dim 0 of its input ({x.shape[0]}) over mp={self.mp}; "
                             f"make the per-rank batch (train.batch_size / dp) divisible by mp")
        y, stats = super().forward(split_to_group(x, self.mp_group))
        return gather_from_group(y, self.mp_group), dataclasses.replace(stats, aux_loss=stats.aux_loss / self.mp)


def moe_layer_factory(groups: ParallelGroups, reduce_scatter_impl: str | None = None):
    """For ``build_model(cfg, moe_layer_factory=...)``: builds sharded layers directly (experts
    are initialised as slices of the full tensors, no full copy per rank)."""

    def factory(layer_idx: int, moe_cfg: MoEConfig, d_model: int) -> ParallelMoELayer:
        return ParallelMoELayer(moe_cfg, d_model, groups, reduce_scatter_impl=reduce_scatter_impl)

    return factory
