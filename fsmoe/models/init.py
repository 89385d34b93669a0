"""Deterministic, layout-independent weight initialisation.

Each module draws from its own generator, seeded by (base seed, module path). A module's initial
weights therefore depend only on the seed and its name, not on how many other modules exist or in
which order they were built, so a rank that builds a different subset (another pipeline stage,
injected dispatchers) still starts from the same numbers as one process. The decoder also builds
each layer inside :func:`seeded`, so whatever a constructor draws is reproducible the same way.

Scheme (GPT-2): every Linear and Embedding weight ~ N(0, std), biases 0, norms 1 (a
tensor-parallel slice of a Linear draws the full weight and keeps its part: ``init_shard``); residual
projections (attention ``wo`` and FFN ``w2``, which add into the residual stream) use
std / sqrt(2 * n_layers) so the residual variance does not grow with depth. Routed experts use
``GroupedExperts.reset_parameters(generator)``, which inits the full tensor and keeps the shard.
Any other module with parameters of its own (e.g. a router's temperature) keeps its own scheme:
its ``reset_parameters()`` runs on a private seeded stream; without one, its constructor's values
are kept (then a meta-built model cannot re-create them: such modules should define it).
"""
from __future__ import annotations

import math
import zlib
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from fsmoe.experts import GroupedExperts
from fsmoe.models.rope import RotaryEmbedding

_RESIDUAL_PROJECTIONS = ("wo", "w2")
_NORMS = (nn.LayerNorm, nn.RMSNorm)


def module_seed(base_seed: int, name: str) -> int:
    """A 63-bit seed for module ``name`` (crc32 is stable across processes, unlike hash())."""
    return (base_seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the body on a private RNG stream seeded with ``seed``; the global streams (CPU and
    every CUDA device) are restored afterwards."""
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        torch.manual_seed(seed)
        yield


def _generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def init_weights(model: nn.Module, base_seed: int, std: float, n_layers: int) -> None:
    """Initialise every parameter of ``model`` in place (no-op for modules on the meta device)."""
    residual_std = std / math.sqrt(2 * n_layers)
    done: set[int] = set()  # tied weights (embedding = lm_head) are initialised once
    for name, mod in model.named_modules():
        if isinstance(mod, RotaryEmbedding):  # buffers derived from the config, no randomness
            mod.reset_parameters()
            continue
        own = [p for p in mod.parameters(recurse=False) if id(p) not in done]
        if not own or own[0].is_meta:
            continue
        done.update(id(p) for p in own)
        _init_module(mod, name, module_seed(base_seed, name), std, residual_std)


def reset_buffers(model: nn.Module) -> None:
    """Refill the buffers constructors fill (a module's ``reset_buffers``, e.g. the DeepSeek router's
    expert bias), for a model materialised from the meta device, whose ``to_empty`` left them blank."""
    with torch.no_grad():
        for mod in model.modules():
            if hasattr(mod, "reset_buffers"):
                mod.reset_buffers()


def _init_module(mod: nn.Module, name: str, seed: int, std: float, residual_std: float) -> None:
    device = next(mod.parameters(recurse=False)).device
    with torch.no_grad():
        if isinstance(mod, GroupedExperts):
            mod.reset_parameters(_generator(seed, device))
        elif isinstance(mod, (nn.Linear, nn.Embedding)) or hasattr(mod, "init_shard"):
            leaf = name.rsplit(".", 1)[-1]
            s = residual_std if leaf in _RESIDUAL_PROJECTIONS else std
            if hasattr(mod, "init_shard"):  # a tensor-parallel slice: the full Linear's draw, then its part
                mod.init_shard(_generator(seed, device), s)
                return
            nn.init.normal_(mod.weight, 0.0, s, generator=_generator(seed, device))
            if getattr(mod, "bias", None) is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, _NORMS):
            mod.reset_parameters()
        elif hasattr(mod, "reset_parameters"):  # a module with its own scheme
            with seeded(seed):
                mod.reset_parameters()
        # else: keep the constructor's values (built under ``seeded``, so reproducible)
