"""This rank's shard of a model, built without the full model.

``parallelize`` lays out a model that every rank first builds whole, which a large preset does not
allow (Mixtral 8x7B holds 187 GB of fp32 weights, one H200 141 GB). Here the structure is built on
the meta device instead, the MoE layers sharded as they are built (``moe_layer_factory``) and the
tensor-parallel modules sliced from meta tensors, and then only this rank's parameters are
allocated on ``device`` and initialised. fsmoe.models.init seeds every module by its name, and a
sharded module draws its full weight and keeps its part (routed experts, tensor-parallel Linears),
so every shard holds exactly what one process would: the layout tests check it parameter by
parameter and buffer by buffer. Peak memory: this rank's shard and the largest single full weight
of a sharded module while it is drawn.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from fsmoe.config import ModelConfig
from fsmoe.models import build_model
from fsmoe.models.init import reset_buffers
from fsmoe.parallel.groups import ParallelGroups
from fsmoe.parallel.moe import moe_layer_factory
from fsmoe.parallel.sharding import get_sharding, set_sharding, tags_of
from fsmoe.parallel.tensor_parallel import parallelize


def build_sharded_model(cfg: ModelConfig, groups: ParallelGroups, device: torch.device, seed: int,
                        reduce_scatter_impl: str | None = None) -> nn.Module:
    """The model of ``parallelize(build_model(cfg, seed=seed), groups)``, built shard by shard."""
    with torch.device("meta"):
        model = build_model(cfg, moe_layer_factory(groups, reduce_scatter_impl), seed=seed)
    model = parallelize(model, groups, reduce_scatter_impl)
    # to_empty makes new Parameter objects: the layout's tags (fsmoe.parallel.sharding) go with them
    tags = tags_of(model)
    model.to_empty(device=device)
    for name, p in model.named_parameters():
        if name in tags:
            set_sharding(p, tags[name])
    model.reset_parameters()
    reset_buffers(model)
    return model


def load_into_shards(model: nn.Module, path: Path, groups: ParallelGroups, meshes) -> str:
    """``fsmoe train --init-from`` for a model built shard by shard: an fsmoe run's newest intact
    checkpoint through DCP (each rank reads its slices of the global tensors), or a Hugging Face
    directory one stored tensor at a time (converted whole, this rank's slice kept). The shapes
    checked are the global ones. Returns what was loaded."""
    from fsmoe.models.hf.convert import hf_tensors, is_hf_dir, run_checkpoint
    from fsmoe.parallel.checkpoint import to_global_state

    path = Path(path)
    own = model.state_dict()
    params = dict(model.named_parameters())
    shapes = {name: get_sharding(params[name]).global_shape(t.shape, groups) if name in params else tuple(t.shape)
              for name, t in own.items()}
    if is_hf_dir(path):
        label, tensors = hf_tensors(path, shapes)
        with torch.no_grad():
            for name, full in tensors:
                mine = get_sharding(params[name]).shard_of(full, groups) if name in params else full
                own[name].copy_(mine)
        return label
    ckpt_dir = run_checkpoint(path, shapes)
    dcp.load(to_global_state({"model": own}, model, groups, meshes), checkpoint_id=ckpt_dir)
    return str(ckpt_dir)
