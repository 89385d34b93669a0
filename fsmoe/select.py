"""Build-time choice of a layer's implementations from ``MoEConfig.kernels``.

``MoELayer.__init__`` calls these once; ``forward`` never branches on the choice. ``impl`` is
what :func:`resolve_kernels` returned: ``'torch'`` or ``'triton'``.
"""
from __future__ import annotations

from fsmoe.config import ConfigError
from fsmoe.kernels import KERNEL_CHOICES, triton_available


def resolve_kernels(choice: str) -> str:
    """``'auto' | 'torch' | 'triton'`` -> ``'torch' | 'triton'``.

    ``auto`` takes Triton where it can run; asking for ``triton`` where it cannot is a
    ConfigError naming the field, so a run fails at build time, not in its first forward.
    """
    if choice not in KERNEL_CHOICES:
        raise ConfigError("moe.kernels", choice, f"allowed values are {list(KERNEL_CHOICES)}")
    if choice == "auto":
        return "triton" if triton_available() else "torch"
    if choice == "triton" and not triton_available():
        raise ConfigError("moe.kernels", choice, "needs Triton and a CUDA device; use 'auto' or 'torch'")
    return choice



def build_order(kind: str, impl: str):
    """The Order for a router of ``kind`` ('index' | 'soft')."""
    from fsmoe.order import ORDERS

    if impl == "triton" and kind == "index":
        from fsmoe.order import FusedIndexOrder

        return FusedIndexOrder()
    return ORDERS[kind]()


def experts_class(impl: str):
    """GroupedExperts or its fast subclass (same parameters and contract)."""
    if impl == "triton":
        from fsmoe.experts import FusedGroupedExperts

        return FusedGroupedExperts
    from fsmoe.experts import GroupedExperts

    return GroupedExperts
