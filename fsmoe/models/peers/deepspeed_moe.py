"""DeepSpeed-MoE in our decoder: ``model.moe.impl = "deepspeed"`` (a peer, for comparisons).

Shape legend: T tokens of this rank, D model dim, F expert hidden dim, E global experts, El = E/ep
local experts, K experts per token, C capacity (rows per expert).

Every MoE layer of the one-process model becomes a :class:`DeepSpeedMoELayer`: DeepSpeed's own
``deepspeed.moe.layer.MoE`` (its ``TopKGate``, its capacity-padded ``[E, C, D]`` dispatch, its
``_AllToAll`` pair over the EP group and its loop over the local experts) around *our* expert
MLP: one expert of ``GroupedExperts`` (the Triton/CUTLASS one on GPUs), so the expert math, its
kernels and its bf16 casts are those of our layer and what differs is DeepSpeed's gating and
dispatch. The layer starts from the weights our layer would have: the gate from our router's
``proj``, local expert j of EP rank r from our expert ``r*El + j``.

What is set to match our config:

* ``k = router.top_k``; ``capacity_factor`` as ours (DeepSpeed's C = ceil(T/E * cf * K), ours
  ceil(cf * T*K/E)), ``min_capacity = 1`` as ours; ``router.capacity_factor`` unset (our dropless
  default) is DeepSpeed's ``drop_tokens=False``: every expert padded to the largest load over the
  EP group (an AllReduce-max and a host read of C per layer: DeepSpeed's cost, not ours);
* ``top2_2nd_expert_sampling=False``: our GShard router takes the top-2 of the softmax, DeepSpeed by
  default samples the second expert with Gumbel noise (a different model, the same work);
* the aux loss is DeepSpeed's ``l_aux`` times ``router.aux_loss_coef``, over this rank's tokens;
* tokens enter in the autocast dtype (bf16), as ours and as DeepSpeed's own bf16 training, so
  the AlltoAll moves bf16 rows; the gate computes in what autocast gives ``F.linear`` (bf16, as
  our router's projection).

Process groups are ours: DeepSpeed's communication layer is initialised over the
already-initialised ``torch.distributed`` (never a second init), and our EP and EDP groups are
registered under DeepSpeed's name for this EP size before ``set_deepspeed_parallelism`` runs, so
DeepSpeed creates no group of its own. Gradients stay with our trainer
(fsmoe.parallel.grads): the gate is tagged like our router (summed over the world, / dp), each
local expert like our expert shards (summed over its EDP replicas only: experts are not
replicated across EP ranks), with its leading dim of 1 split over ``ep`` so grad norms count each
expert once and checkpoints hold ``[ep, D, F]`` per local slot (they load in the same layout only).

Not supported (refused by the config, naming the field): MP or ESP, a pipelined schedule,
placement or expert swaps, other routers, z-loss, router noise, shared experts, expert-only
recompute, and the one-process trainer (launch with ``--nproc N``).
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fsmoe.config import ConfigError, MoEConfig
from fsmoe.experts import FusedGroupedExperts, GroupedExperts
from fsmoe.layer import MoELayer, MoEStats
from fsmoe.parallel.groups import ParallelGroups
from fsmoe.parallel.moe import PARTIAL
from fsmoe.parallel.sharding import ParamSharding, set_sharding, tag_module
from fsmoe.placement.placement import Placement
from fsmoe.precision import to_compute
from fsmoe.select import resolve_kernels

FIELD = "model.moe.impl"
EXPERT_SHARDING = ParamSharding("edp", ((0, "ep"),))  # one expert [1, D, F] per slot, slots over ep


def import_deepspeed():
    """``(MoE class, deepspeed.comm, deepspeed.utils.groups)``; a ConfigError naming the field when
    deepspeed cannot be imported."""
    try:
        import deepspeed.comm as ds_comm
        from deepspeed.moe.layer import MoE
        from deepspeed.utils import groups as ds_groups
    except Exception as e:  # noqa: BLE001 - not installed, or an install that fails on import
        raise ConfigError(FIELD, "deepspeed", f"needs the deepspeed package, which does not import here "
                          f"({type(e).__name__}: {e}); install it (`DS_BUILD_OPS=0 pip install deepspeed`, "
                          "pure Python) or use 'fsmoe'") from None
    return MoE, ds_comm, ds_groups


def init_deepspeed(groups: ParallelGroups) -> None:
    """DeepSpeed's communication layer over our initialised ``torch.distributed``, and our EP/EDP
    groups under the names DeepSpeed looks up for EP size ``groups.ep``. Collective-free."""
    _, ds_comm, ds_groups = import_deepspeed()
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(FIELD, "deepspeed", "runs under the distributed trainer; launch with "
                          "`fsmoe train --nproc N` (N >= 2)")
    # torch.distributed is up, so DeepSpeed wraps it (TorchBackend skips init_process_group)
    ds_comm.init_distributed(dist_backend=groups.backend, auto_mpi_discovery=False, verbose=False,
                             dist_init_required=False)
    name = f"ep_size_{groups.ep}"  # deepspeed.moe.layer.MoE's expert_group_name
    ds_groups._get_expert_parallel_group_dict()[name] = groups.ep_group
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = groups.edp_group


class _OneExpert:
    """Our expert MLP with DeepSpeed's expert interface: ``forward(x [..., D]) -> [..., D]``, all
    rows one expert (DeepSpeed hands each local expert its ``[ep, 1, C, D]`` slice)."""

    def forward(self, x: Tensor) -> Tensor:
        x_ND = x.reshape(-1, x.shape[-1])
        rows_1 = torch.full((1,), x_ND.shape[0], dtype=torch.int64, device=x.device)
        return super().forward(x_ND, rows_1).view(x.shape)


class DeepSpeedExpert(_OneExpert, GroupedExperts):
    """One plain-PyTorch expert (CPU, ``kernels = "torch"``)."""


class FusedDeepSpeedExpert(_OneExpert, FusedGroupedExperts):
    """One expert on our GPU fast path (``kernels = "triton"``)."""


class _Router:
    """What the trainer reads of a layer's router: ``top_k`` and ``after_step()`` (nothing to do)."""

    def __init__(self, top_k: int):
        self.top_k = top_k

    def after_step(self) -> None:
        pass


class _Experts:
    """What the trainer reads of a layer's experts: ``num_experts`` (local), ``placement``
    (contiguous) and ``parameters()`` (DeepSpeed's local expert modules)."""

    def __init__(self, modules: nn.ModuleList, num_experts: int, ep: int):
        self._modules_list, self.num_experts = modules, len(modules)
        self.placement = Placement.contiguous(num_experts, ep)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self._modules_list.parameters()


class DeepSpeedMoELayer(nn.Module):
    """``deepspeed.moe.layer.MoE`` with ``MoELayer``'s interface: ``forward(x) -> (y, MoEStats)``."""

    def __init__(self, cfg: MoEConfig, d_model: int, groups: ParallelGroups):
        MoE, _, _ = import_deepspeed()
        super().__init__()
        self.cfg, self.d_model = cfg, d_model
        r, E = cfg.router, cfg.num_experts
        self.kernels = resolve_kernels(cfg.kernels)
        expert_cls = FusedDeepSpeedExpert if self.kernels == "triton" else DeepSpeedExpert
        expert = expert_cls(1, d_model, cfg.experts.d_ff, cfg.experts.activation)
        self.dropless = r.capacity_factor is None
        cf = 1.0 if self.dropless else float(r.capacity_factor)
        self.ds = MoE(d_model, expert, num_experts=E, ep_size=groups.ep, k=r.top_k, capacity_factor=cf,
                      eval_capacity_factor=cf, min_capacity=1, drop_tokens=not self.dropless,
                      top2_2nd_expert_sampling=False)
        if groups.ep > 1:
            self.ds.set_deepspeed_parallelism()  # finds our EP group (init_deepspeed registered it)
        local = self.ds.deepspeed_moe.experts.deepspeed_experts
        self.ep_rank = groups.ep_rank
        self.router = _Router(r.top_k)
        self.experts = _Experts(local, E, groups.ep)
        self.dispatcher = None  # no fsmoe dispatcher (nothing hierarchical to report)
        self.shared = None
        for p in local.parameters():
            set_sharding(p, EXPERT_SHARDING)
        tag_module(self, PARTIAL)  # the gate: this rank's tokens, summed over the world

    @staticmethod
    def from_layer(layer: MoELayer, groups: ParallelGroups) -> DeepSpeedMoELayer:
        """The DeepSpeed layer with ``layer``'s weights: gate = our router's projection, local
        expert j = our expert ``ep_rank*El + j``. Built on ``layer``'s device; the global RNG is
        left as it was."""
        proj = getattr(layer.router, "proj", None)
        if not isinstance(proj, nn.Linear):
            raise ConfigError("model.moe.router.name", layer.cfg.router.name,
                              f"{FIELD}='deepspeed' takes the gate from a GShard router's projection")
        device = proj.weight.device
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []), torch.device(device):
            new = DeepSpeedMoELayer(layer.cfg, layer.d_model, groups)
        local = new.ds.deepspeed_moe.experts.deepspeed_experts
        with torch.no_grad():
            new.ds.deepspeed_moe.gate.wg.weight.copy_(proj.weight)
            for j, expert in enumerate(local):
                e = groups.ep_rank * len(local) + j
                for name, p in expert.named_parameters():
                    p.copy_(getattr(layer.experts, name)[e:e + 1])
        return new

    def forward(self, x: Tensor) -> tuple[Tensor, MoEStats]:
        """x: [B, L, D] (or [T, D]). Returns (y like x, this layer's MoEStats)."""
        shape = x.shape
        x_TD = to_compute(x.reshape(-1, self.d_model))  # bf16 under autocast: the AlltoAll moves bf16
        y_TD, l_aux, counts_E = self.ds(x_TD)
        r, T = self.cfg.router, x_TD.shape[0]
        aux = r.aux_loss_coef * l_aux.float()
        counts_E = counts_E.long()
        if self.dropless:
            dropped = torch.zeros((), dtype=torch.long, device=x.device)
        else:  # DeepSpeed keeps at most C of each expert's assignments
            C = max(math.ceil(T / self.cfg.num_experts * r.capacity_factor * r.top_k), 1)
            dropped = (counts_E - C).clamp(min=0).sum()
        stats = MoEStats(aux, {"load_balance": aux.detach()}, counts_E, dropped, T * r.top_k)
        return y_TD.view(shape), stats


def replace_moe_layers(model: nn.Module, groups: ParallelGroups) -> nn.Module:
    """Swap every one-process ``MoELayer`` of ``model`` for a :class:`DeepSpeedMoELayer` holding its
    weights (this rank's experts); in place, returns ``model``. Collective-free."""
    init_deepspeed(groups)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is MoELayer:
                setattr(parent, name, DeepSpeedMoELayer.from_layer(child, groups))
    return model
