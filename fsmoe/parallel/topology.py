"""Topology: which node each rank lives on.

A node is a set of ranks with a fast interconnect between them (NVLink, shared memory). Real
runs take the node size from torchrun (``LOCAL_WORLD_SIZE``); ``parallel.gpus_per_node`` overrides
it so that one machine can pretend to be several nodes and the topology-aware code paths
(ESP inside a node, EP across nodes, hierarchical AlltoAll) run in CI.

Ranks are numbered node by node: node ``n`` holds ranks ``[n*G, (n+1)*G)`` for G ranks per node.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from fsmoe.config import ConfigError


@dataclass(frozen=True)
class Topology:
    world: int
    ranks_per_node: int

    def __post_init__(self) -> None:
        if self.ranks_per_node < 1 or self.world % self.ranks_per_node:
            raise ConfigError("parallel.gpus_per_node", self.ranks_per_node,
                              f"must be >= 1 and divide the world size {self.world}")

    @property
    def num_nodes(self) -> int:
        return self.world // self.ranks_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def local_rank(self, rank: int) -> int:
        return rank % self.ranks_per_node

    def ranks_on_node(self, node: int) -> list[int]:
        return list(range(node * self.ranks_per_node, (node + 1) * self.ranks_per_node))

    def same_node(self, ranks: list[int]) -> bool:
        return len({self.node_of(r) for r in ranks}) <= 1

    @staticmethod
    def detect(world: int, gpus_per_node: int | None) -> "Topology":
        """``gpus_per_node`` if set, else torchrun's ``LOCAL_WORLD_SIZE``, else one node."""
        size = gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))
        return Topology(world, size)
