"""Compute kernels. Each op has a plain-PyTorch reference with the same signature; GPU versions
(Triton) are selected at build time (``MoEConfig.kernels``) and tested against the reference.

Layout:
    grouped_mm.py  grouped matmul over experts (torch grouped_mm, padded fallback)
    permute.py     gather rows into expert order / weighted gather-sum back (Order, I-Order)
    swiglu.py      fused SwiGLU activation
    router.py      fused softmax -> top-k -> renormalised weights
    experts.py     expert_mlp: grouped GEMMs + fused SwiGLU, masks only the tail rows (FusedGroupedExperts in fsmoe.experts)
    triton_gmm.py  our grouped GEMMs (Triton; TMA on Hopper): gathered rows, SwiGLU epilogue, two operand
                   pairs, weight gradient; expert_gemm.py the MLP on them (autograd); tiles.py their
                   launch shapes; gmm_tune.py the per-shape choice between them and grouped_mm (cached)
    triton_ops.py  the Triton kernels (imported only where Triton and CUDA exist)

Every fast op dispatches on the tensor's device only: CUDA tensors run the Triton kernel, CPU
tensors the reference, so a layer built on a GPU machine still runs in a CPU test. The choice
between the two is made above this package, in ``fsmoe.select``; kernels import nothing of fsmoe
but each other (``experts.py``, the fast subclass of ``fsmoe.experts.GroupedExperts``, excepted).
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
