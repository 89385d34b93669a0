"""Routers. Each lives in one file and registers itself by name with ``@register_router``.

To add a router: write ``fsmoe/routing/myrouter.py`` with a ``Router`` subclass decorated by
``@register_router("myrouter")``, then add one import line to the registry list below.
"""
from __future__ import annotations

import importlib

from fsmoe.routing.plan import RoutingPlan, SoftPlan

ROUTERS: dict = {}


def register_router(name: str):
    def wrap(cls):
        if name in ROUTERS:
            raise ValueError(f"router {name!r} registered twice ({ROUTERS[name]} and {cls})")
        cls.registry_name = name
        ROUTERS[name] = cls
        return cls

    return wrap


# The registry: one entry per router module.
_ROUTER_MODULES = [
    "gshard",
    "sigmoid",
    "xmoe",
    "softmoe",
    "expert_choice",
    "deepseek",
]

for _m in _ROUTER_MODULES:
    importlib.import_module(f"fsmoe.routing.{_m}")


def build_router(cfg, d_model: int, num_experts: int):
    """Instantiate the router named by ``cfg.name`` (validated by RouterConfig)."""
    return ROUTERS[cfg.name](cfg, d_model, num_experts)


__all__ = ["ROUTERS", "RoutingPlan", "SoftPlan", "build_router", "register_router"]
