"""Compute kernels. Each op has a plain-PyTorch reference with the same signature; GPU versions
(Triton) are selected at build time (``MoEConfig.kernels``) and tested against the reference.

Layout:
    grouped_mm.py  grouped matmul over experts (torch grouped_mm, padded fallback)
    permute.py     gather rows into expert order / weighted gather-sum back (Order, I-Order)
    swiglu.py      fused SwiGLU activation
    router.py      fused softmax -> top-k -> renormalised weights
    experts.py     FusedGroupedExperts: grouped GEMMs + fused SwiGLU, masks only the tail rows
    order.py       FusedIndexOrder: the Order backed by permute.py
    select.py      build-time choice of the implementations for a layer
    triton_ops.py  the Triton kernels (imported only where Triton and CUDA exist)

Every fast op dispatches on the tensor's device only: CUDA tensors run the Triton kernel, CPU
tensors the reference, so a layer built on a GPU machine still runs in a CPU test.
"""
from __future__ import annotations

import functools
import importlib.util

KERNEL_CHOICES = ("auto", "torch", "triton")


@functools.cache
def triton_available() -> bool:
    """True when Triton imports and a CUDA device is visible (the fast paths can run)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - broken installs count as absent
        return False
    return True


def resolve_kernels(choice: str) -> str:
    """``'auto' | 'torch' | 'triton'`` -> ``'torch' | 'triton'``.

    ``auto`` takes Triton where it can run; asking for ``triton`` where it cannot is a
    ConfigError naming the field, so a run fails at build time, not in its first forward.
    """
    from fsmoe.config import ConfigError

    if choice not in KERNEL_CHOICES:
        raise ConfigError("moe.kernels", choice, f"allowed values are {list(KERNEL_CHOICES)}")
    if choice == "auto":
        return "triton" if triton_available() else "torch"
    if choice == "triton" and not triton_available():
        raise ConfigError("moe.kernels", choice, "needs Triton and a CUDA device; use 'auto' or 'torch'")
    return choice
