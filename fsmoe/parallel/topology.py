"""Topology: which node each rank lives on.

A node is a set of ranks with a fast interconnect between them (NVLink, shared memory). Real
runs take the node size from torchrun (``LOCAL_WORLD_SIZE``); ``parallel.gpus_per_node`` overrides
it so that one machine can pretend to be several nodes and the topology-aware code paths
(ESP inside a node, EP across nodes, hierarchical AlltoAll) run in CI.

Ranks are numbered node by node: node ``n`` holds ranks ``[n*G, (n+1)*G)`` for G ranks per node.

Inside a node there may be more levels (sockets/NUMA domains, PCIe or NVLink switches):
``levels`` lists every level's size, outermost first (``parallel.topology``, e.g. ``[2, 2, 2]``
for 2 nodes of 2 sockets of 2 GPUs), numbered in mixed radix like the nodes. Without a declared
topology it is ``[nodes, ranks_per_node]``, refined by :func:`sockets_per_node` where the machine
tells (NVML's NUMA affinity through ``nvidia-smi topo -m``). The hierarchical dispatcher reads
the EP group's share of it (``fsmoe.comm.topology.ep_levels``).
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
from dataclasses import dataclass

from fsmoe.config import ConfigError


@dataclass(frozen=True)
class Topology:
    world: int
    ranks_per_node: int
    levels: tuple[int, ...] = ()  # every level's size, outermost first (product = world); () = nodes x ranks

    def __post_init__(self) -> None:
        if self.ranks_per_node < 1 or self.world % self.ranks_per_node:
            raise ConfigError("parallel.gpus_per_node", self.ranks_per_node,
                              f"must be >= 1 and divide the world size {self.world}")
        if self.levels and math.prod(self.levels) != self.world:
            raise ConfigError("parallel.topology", list(self.levels),
                              f"the product of the level sizes must equal the world size {self.world}")

    @property
    def level_sizes(self) -> tuple[int, ...]:
        """The levels, outermost first (``(nodes, ranks_per_node)`` when none were declared)."""
        return self.levels or (self.num_nodes, self.ranks_per_node)

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
    def detect(world: int, gpus_per_node: int | None, topology: list[int] | None = None) -> "Topology":
        """``topology`` if declared (its inner levels make a node), else nodes of ``gpus_per_node``
        ranks, else of torchrun's ``LOCAL_WORLD_SIZE``, else one node; a node of GPUs is split into
        sockets where ``nvidia-smi`` reports their NUMA affinity."""
        if topology:
            if math.prod(topology) != world:
                raise ConfigError("parallel.topology", list(topology),
                                  f"the product of the level sizes must equal the world size {world}")
            return Topology(world, math.prod(topology[1:]), tuple(topology))
        size = gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))
        sockets = sockets_per_node(size) if gpus_per_node is None else 1
        levels = (world // size, sockets, size // sockets) if sockets > 1 else ()
        return Topology(world, size, levels)


def sockets_per_node(ranks_per_node: int, topo_text: str | None = None) -> int:
    """How many NUMA domains the node's first ``ranks_per_node`` GPUs spread over, evenly (1 when
    the machine does not say, or they are uneven). ``topo_text``: ``nvidia-smi topo -m``'s output
    (read from the machine when None)."""
    if topo_text is None:
        if not shutil.which("nvidia-smi"):
            return 1
        try:
            topo_text = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True,
                                       timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return 1
    numa = _gpu_numa_column(topo_text)[:ranks_per_node]
    if len(numa) != ranks_per_node or not numa:
        return 1
    domains = sorted(set(numa))
    # ranks are numbered socket by socket only if the GPUs are: the domains must come in blocks
    block = ranks_per_node // len(domains)
    if ranks_per_node % len(domains) or numa != [d for d in domains for _ in range(block)]:
        return 1
    return len(domains)


def _gpu_numa_column(text: str) -> list[str]:
    """The 'NUMA Affinity' entry of each GPU row of ``nvidia-smi topo -m``."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    header = next((ln for ln in lines if "NUMA Affinity" in ln), None)
    if header is None:
        return []
    cols = header.replace("CPU Affinity", "CPU_Affinity").replace("NUMA Affinity", "NUMA_Affinity") \
        .replace("GPU NUMA ID", "GPU_NUMA_ID").split()
    at = cols.index("NUMA_Affinity")
    out = []
    for ln in lines:
        cells = ln.split()
        if ln is header:
            continue
        if cells and cells[0].startswith("GPU") and cells[0][3:].isdigit() and len(cells) > at + 1:
            out.append(cells[at + 1])  # +1: the row label has no header cell
    return out
