"""Activation checkpointing (``train.activation_checkpointing``): keep fewer activations for the
backward pass and recompute them there.

    none  keep everything (fastest)
    moe   recompute the routed experts' MLP: its [N, F] hidden activations (three per layer for
          SwiGLU, N = tokens x top-k) are the largest tensors of an MoE block
    full  keep only each block's input and recompute the whole block (attention, router, dispatch,
          experts) in backward; an EP layer repeats its AlltoAlls there

Non-reentrant ``torch.utils.checkpoint``: RNG state (dropout, router noise) is replayed, so the
recomputation equals the forward. Code with side effects in forward (e.g. the DeepSeek router's
load accumulator) asks ``recomputing()`` to run them once.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator

from torch.utils.checkpoint import checkpoint

_RECOMPUTING: contextvars.ContextVar[bool] = contextvars.ContextVar("fsmoe_recomputing", default=False)


def recomputing() -> bool:
    """True while a checkpointed region is being recomputed in backward."""
    return _RECOMPUTING.get()


@contextlib.contextmanager
def _mark_recompute() -> Iterator[None]:
    token = _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


def checkpointed(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` whose saved activations are dropped and recomputed in backward."""
    return checkpoint(fn, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _mark_recompute()))


def configure_recompute(model: Any, mode: str) -> None:
    """Set ``train.activation_checkpointing`` on a built decoder: ``full`` marks every block,
    ``moe`` every MoE layer's routed experts (layers of other kinds have nothing to mark).
    ``mode`` was checked with the config."""
    for block in model.layers:
        block.recompute = mode == "full"
    for layer in model.moe_layers():
        if hasattr(layer, "recompute_experts"):
            layer.recompute_experts = mode == "moe"
