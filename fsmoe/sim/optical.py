"""Optical circuit fabrics for expert-parallel traffic: mFabric's regional OCS and a static one.

Every server has ``ocs_ports`` NIC ports into an optical circuit switch (OCS) of its region
(``region_servers`` consecutive servers) and ``eps_ports`` NIC ports into an electrical
packet-switched fat-tree (EPS, full bisection). A circuit joins one port of server a to one port
of server b inside a region: a direct link of ``nic_gbps`` each way. Traffic between two servers
that share circuits goes over them (through a delegate GPU of the source server that owns the
port, over NVSwitch, as mFabric's runtime does); all other traffic between servers takes the
EPS ports (the server's ``eps_ports`` NICs, shared by its GPUs). GPUs of one server use NVSwitch.
The NVSwitch hop to and from a delegate is not a link of its own here: at 3.6 Tb/s per GPU it is
nine times a 400G port, never the bottleneck of these paths.

``plan_circuits`` is mFabric's per-region controller: greedily give a circuit to the server
pair whose traffic would take longest (bytes / (circuits x port rate); pairs without a circuit
first, the heaviest first) while both servers have a free port. ``reconfigure`` accounts the OCS
delay: a new circuit set costs ``reconfig_ms`` before the traffic can use it, of which the
compute before the AlltoAll hides what it can when the set was planned ahead (from the previous
iteration's traffic: mFabric's prediction).

``RegionalOCS(static=True)`` is a fixed optical topology (TopoOpt-like): circuits planned once
from the whole job's traffic and never reconfigured, with the same EPS ports.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from fsmoe.config import ConfigError
from fsmoe.sim.fabrics import GBIT, Flows


def plan_circuits(demand_SS: np.ndarray, ports: int) -> np.ndarray:
    """[S, S] symmetric circuit counts for servers with ``ports`` OCS ports each, from the bytes
    server a sends server b (``demand_SS`` [S, S]; a circuit carries each direction at the port
    rate, so a pair's need is the larger of its two directions, and its completion time is
    proportional to need / circuits)."""
    S = demand_SS.shape[0]
    if demand_SS.shape != (S, S):
        raise ValueError(f"demand must be square, got {demand_SS.shape}")
    need = np.maximum(demand_SS, demand_SS.T).astype(np.float64)
    np.fill_diagonal(need, 0.0)
    iu = np.triu_indices(S, 1)
    pair_need = need[iu]
    total = pair_need.sum()
    c = np.zeros(len(pair_need), dtype=np.int64)
    free = np.full(S, ports, dtype=np.int64)
    a, b = iu
    while True:
        ok = (pair_need > 0) & (free[a] > 0) & (free[b] > 0)
        if not ok.any():
            break
        # longest completion first; pairs without a circuit before any other (the heaviest first);
        # among equals the pair whose busier server has the most ports left, so that no server
        # spends its ports before its peers are served
        key = np.where(ok, np.where(c > 0, pair_need / np.maximum(c, 1), pair_need + total), -1.0)
        k = int(np.lexsort((np.minimum(free[a], free[b]), key))[-1])
        c[k] += 1
        free[a[k]] -= 1
        free[b[k]] -= 1
    out = np.zeros((S, S), dtype=np.int64)
    out[iu] = c
    return out + out.T


@dataclass(frozen=True)
class RegionalOCS:
    gpus: int
    gpus_per_server: int = 8
    region_servers: int = 8
    ocs_ports: int = 6  # per server (mFabric's simulation: 6 of 8 NICs into the OCS, 2 into the EPS)
    eps_ports: int = 2
    nic_gbps: float = 400.0
    nvlink_gbps: float = 3600.0
    reconfig_ms: float = 25.0  # a millisecond-scale OCS (10-25 ms)
    static: bool = False

    def __post_init__(self):
        if self.gpus % self.gpus_per_server:
            raise ConfigError("--gpus", self.gpus, f"must be a multiple of --gpus-per-server={self.gpus_per_server}")
        if self.region_servers < 1 or self.servers % self.region_servers:
            raise ConfigError("--region-servers", self.region_servers,
                              f"must be >= 1 and divide the {self.servers} servers")
        if self.ocs_ports < 0:
            raise ConfigError("--ocs-ports", self.ocs_ports, "must be >= 0")
        if self.eps_ports < 1:
            raise ConfigError("--eps-ports", self.eps_ports, "must be >= 1 (the EPS carries what has no circuit)")
        if self.reconfig_ms < 0:
            raise ConfigError("--reconfig-ms", self.reconfig_ms, "must be >= 0")

    @property
    def servers(self) -> int:
        return self.gpus // self.gpus_per_server

    @property
    def name(self) -> str:
        return f"{'static optical' if self.static else 'mFabric'} {self.ocs_ports}+{self.eps_ports}"

    def server_demand(self, flows: Flows) -> np.ndarray:
        """[S, S] bytes between servers (the controller's input)."""
        S, per = self.servers, self.gpus_per_server
        D = np.zeros((S, S))
        np.add.at(D, (flows.src // per, flows.dst // per), flows.size_bytes)
        np.fill_diagonal(D, 0.0)
        return D

    def plan(self, demand_SS: np.ndarray) -> np.ndarray:
        """[S, S] circuits: ``plan_circuits`` in each region on its block of the demand."""
        S, R = self.servers, self.region_servers
        C = np.zeros((S, S), dtype=np.int64)
        for r0 in range(0, S, R):
            blk = slice(r0, r0 + R)
            C[blk, blk] = plan_circuits(demand_SS[blk, blk], self.ocs_ports)
        return C

    def reconfigure(self, old_SS: np.ndarray | None, new_SS: np.ndarray, hide_ms: float = 0.0) -> float:
        """Milliseconds the traffic waits for the OCS: ``reconfig_ms`` if any circuit changes, less
        the ``hide_ms`` of compute before the AlltoAll when the new set was known in advance."""
        if self.static or (old_SS is not None and np.array_equal(old_SS, new_SS)):
            return 0.0
        return max(0.0, self.reconfig_ms - hide_ms)

    def incidence(self, flows: Flows, circuits_SS: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
        """(flow x link matrix, capacities [L] bytes/s, bytes per row) of ``flows`` with these
        circuits. Links: NVSwitch out [G], in [G], EPS up [S], EPS down [S], then one per
        ordered server pair with circuits (capacity circuits x port rate)."""
        G, S, per = self.gpus, self.servers, self.gpus_per_server
        src, dst = flows.src.astype(np.int64), flows.dst.astype(np.int64)
        if len(src) and (min(src.min(), dst.min()) < 0 or max(src.max(), dst.max()) >= G):
            raise ValueError(f"flows name GPUs outside 0..{G - 1}")
        sa, sb = np.nonzero(circuits_SS)
        circuit_id = np.full((S, S), -1, dtype=np.int64)
        circuit_id[sa, sb] = 2 * G + 2 * S + np.arange(len(sa))
        cap = np.concatenate([np.full(2 * G, self.nvlink_gbps * GBIT),
                              np.full(2 * S, self.eps_ports * self.nic_gbps * GBIT),
                              circuits_SS[sa, sb] * self.nic_gbps * GBIT])
        s_srv, d_srv = src // per, dst // per
        cols = np.full((len(src), 3), -1, dtype=np.int64)
        local = (s_srv == d_srv) & (src != dst)
        cols[local, 0], cols[local, 1] = src[local], G + dst[local]
        net = s_srv != d_srv
        circ = np.where(net, circuit_id[s_srv, d_srv], -1)
        on_circuit = circ >= 0
        cols[on_circuit, 0] = circ[on_circuit]
        eps = net & ~on_circuit
        cols[eps, 0], cols[eps, 1] = 2 * G + s_srv[eps], 2 * G + S + d_srv[eps]
        keep = cols >= 0
        n = keep.sum(1)
        indptr = np.concatenate([[0], np.cumsum(n)])
        A = sp.csr_matrix((np.ones(int(n.sum())), cols[keep], indptr), shape=(len(src), len(cap)))
        return A, cap, flows.size_bytes.astype(np.float64)
