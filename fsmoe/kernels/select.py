"""Build-time choice of a layer's implementations from ``MoEConfig.kernels``.

``MoELayer.__init__`` calls these once; ``forward`` never branches on the choice. ``impl`` is
what :func:`fsmoe.kernels.resolve_kernels` returned: ``'torch'`` or ``'triton'``.
"""
from __future__ import annotations


def build_order(kind: str, impl: str):
    """The Order for a router of ``kind`` ('index' | 'soft')."""
    from fsmoe.order import ORDERS

    if impl == "triton" and kind == "index":
        from fsmoe.kernels.order import FusedIndexOrder

        return FusedIndexOrder()
    return ORDERS[kind]()


def experts_class(impl: str):
    """GroupedExperts or its fast subclass (same parameters and contract)."""
    if impl == "triton":
        from fsmoe.kernels.experts import FusedGroupedExperts

        return FusedGroupedExperts
    from fsmoe.experts import GroupedExperts

    return GroupedExperts


def softmax_topk_fn(impl: str):
    """``(logits_TE, k, normalize) -> (probs_TE, weights_TK, ids_TK)`` for softmax top-k routers."""
    from fsmoe.kernels import router

    return router.softmax_topk if impl == "triton" else router.softmax_topk_ref


# The fused plan (fsmoe.kernels.plan) equals RoutingPlan.from_topk bit for bit (gpu_check on an
# H100 passes test_fused_plan_equals_reference_plan[...-cuda]) but measured no faster end to end
# (benchmarks/results/layer_fusedplan_{off,on}.json), so the reference plan stays the default.
FUSED_PLAN = False


def plan_from_topk_fn(impl: str):
    """``(ids_TK, weights_TK, E, capacity, **extra) -> RoutingPlan`` for token-choice routers."""
    if impl == "triton" and FUSED_PLAN:
        from fsmoe.kernels.plan import plan_from_topk

        return plan_from_topk
    from fsmoe.routing.plan import RoutingPlan

    return RoutingPlan.from_topk
