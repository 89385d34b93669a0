"""Megatron-style tensor parallelism (MP) by module replacement, and ``parallelize``.

Shape legend: O output features, I input features, mp the MP group size; ``_local`` = this
rank's slice.

    ColumnParallelLinear: W [O/mp, I] (rows of this rank), input copied (identity forward,
        AllReduce of the input gradient backward), output stays split: [.., O/mp].
    RowParallelLinear:    W [O, I/mp] (columns), input split [.., I/mp], output AllReduced
        (identity backward), bias added after the reduction (replicated).

Attention: q/k/v column-parallel by whole heads (H/mp query heads, G/mp key/value heads: the
GQA mapping stays local because heads are contiguous), o row-parallel. Dense MLP: w1/w3 column,
w2 row. The replacement modules keep the ``weight``/``bias`` names, so state-dict keys are those
of the one-process model. ``parallelize`` slices an already initialised full model, so every
layout starts from the same global weights; or a model built on the meta device, whose slices
fsmoe.parallel.build then initialises (``init_shard``: the full Linear's draw, this rank's part).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from fsmoe.comm.functional import copy_to_group, reduce_from_group
from fsmoe.config import ConfigError
from fsmoe.experts import DenseFFN
from fsmoe.layer import MoELayer
from fsmoe.models.attention import Attention
from fsmoe.parallel.groups import ParallelGroups
from fsmoe.parallel.moe import PARTIAL, ParallelMoELayer
from fsmoe.parallel.sharding import REPLICATED, ParamSharding, set_sharding, tag_module


class ColumnParallelLinear(nn.Module):
    """y_local = x W_local^T + b_local; W_local: rows ``[rank*O/mp, (rank+1)*O/mp)`` of W."""

    def __init__(self, linear: nn.Linear, group: ProcessGroup | None, size: int, rank: int):
        super().__init__()
        rows = linear.out_features // size
        self.group, self.in_features, self.out_features = group, linear.in_features, rows
        self._size, self._rank = size, rank
        self.weight = nn.Parameter(linear.weight.detach()[rank * rows:(rank + 1) * rows].clone())
        self.bias = (nn.Parameter(linear.bias.detach()[rank * rows:(rank + 1) * rows].clone())
                     if linear.bias is not None else None)
        for p in self.parameters():
            set_sharding(p, ParamSharding("dp", ((0, "mp"),)))

    def forward(self, x: Tensor) -> Tensor:
        """x [.., I] (replicated over MP) -> [.., O/mp]."""
        return F.linear(copy_to_group(x, self.group), self.weight, self.bias)

    def init_shard(self, generator: torch.Generator, std: float) -> None:
        """The one-process Linear's init (``N(0, std)`` over the full ``[O, I]``, bias 0), then
        keep this rank's rows (fsmoe.models.init: a meta-built model materialised per rank)."""
        rows = self.out_features
        rank = self._rank
        full = torch.empty(rows * self._size, self.in_features, device=self.weight.device).normal_(
            0.0, std, generator=generator)
        with torch.no_grad():
            self.weight.copy_(full[rank * rows:(rank + 1) * rows])
            if self.bias is not None:
                self.bias.zero_()


class RowParallelLinear(nn.Module):
    """y = AllReduce(x_local W_local^T) + b; W_local: columns ``[rank*I/mp, (rank+1)*I/mp)``."""

    def __init__(self, linear: nn.Linear, group: ProcessGroup | None, size: int, rank: int):
        super().__init__()
        cols = linear.in_features // size
        self.group, self.in_features, self.out_features = group, cols, linear.out_features
        self._size, self._rank = size, rank
        self.weight = nn.Parameter(linear.weight.detach()[:, rank * cols:(rank + 1) * cols].clone())
        set_sharding(self.weight, ParamSharding("dp", ((1, "mp"),)))
        self.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None
        if self.bias is not None:
            set_sharding(self.bias, REPLICATED)  # added after the AllReduce: full gradient everywhere

    def forward(self, x_local: Tensor) -> Tensor:
        """x_local [.., I/mp] -> [.., O] (replicated over MP)."""
        y = reduce_from_group(F.linear(x_local, self.weight), self.group)
        return y + self.bias if self.bias is not None else y

    def init_shard(self, generator: torch.Generator, std: float) -> None:
        """As ``ColumnParallelLinear.init_shard``, keeping this rank's columns."""
        cols = self.in_features
        full = torch.empty(self.out_features, cols * self._size, device=self.weight.device).normal_(
            0.0, std, generator=generator)
        with torch.no_grad():
            self.weight.copy_(full[:, self._rank * cols:(self._rank + 1) * cols])
            if self.bias is not None:
                self.bias.zero_()


def shard_attention(attn: Attention, groups: ParallelGroups) -> None:
    """q/k/v column-parallel by head, o row-parallel; in place."""
    mp, r, g = groups.mp, groups.mp_rank, groups.mp_group
    H, G = attn.wq.out_features // attn.head_dim, attn.wk.out_features // attn.head_dim
    if H % mp or G % mp:
        raise ConfigError("parallel.mp", mp, f"must divide n_heads={H} and n_kv_heads={G}")
    attn.wq, attn.wk, attn.wv = (ColumnParallelLinear(lin, g, mp, r) for lin in (attn.wq, attn.wk, attn.wv))
    attn.wo = RowParallelLinear(attn.wo, g, mp, r)
    tag_module(attn, PARTIAL)  # qk-norms: applied to this rank's heads only


def shard_ffn(ffn: DenseFFN, groups: ParallelGroups) -> None:
    """w1/w3 column-parallel, w2 row-parallel; in place."""
    mp, r, g = groups.mp, groups.mp_rank, groups.mp_group
    if ffn.w1.out_features % mp:
        raise ConfigError("parallel.mp", mp, f"must divide model.d_ff={ffn.w1.out_features}")
    ffn.w1 = ColumnParallelLinear(ffn.w1, g, mp, r)
    ffn.w3 = ColumnParallelLinear(ffn.w3, g, mp, r) if ffn.w3 is not None else None
    ffn.w2 = RowParallelLinear(ffn.w2, g, mp, r)


def parallelize(model: nn.Module, groups: ParallelGroups, reduce_scatter_impl: str | None = None) -> nn.Module:
    """Lay out an initialised one-process model over ``groups``, in place; returns it.

    1. Every one-process ``MoELayer`` becomes a ``ParallelMoELayer`` (experts sliced to this
       rank's EP/ESP shard, sharded dispatcher, batch split over MP). Layers already built by
       ``moe_layer_factory(groups)`` are kept.
    2. With mp > 1: attention (``Attention``; MLA stays replicated) and the dense MLPs outside MoE
       layers become column/row parallel.
    3. Every parameter is tagged with its ParamSharding (fsmoe.parallel.sharding).
    """
    if not groups.distributed:
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is MoELayer:
                setattr(parent, name, ParallelMoELayer.from_layer(child, groups, reduce_scatter_impl))
    if groups.mp > 1:
        in_moe = {id(m) for layer in model.modules() if isinstance(layer, MoELayer) for m in layer.modules()}
        for mod in list(model.modules()):
            if isinstance(mod, Attention):
                shard_attention(mod, groups)
            elif isinstance(mod, DenseFFN) and id(mod) not in in_moe:
                shard_ffn(mod, groups)
    return model
