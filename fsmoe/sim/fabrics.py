"""Datacenter fabrics for the flow simulator: links with capacities and a route for every
(source GPU, destination GPU) pair, built as one sparse incidence matrix.

``LeafSpine``: servers of ``gpus_per_server`` GPUs joined by NVSwitch (each GPU one link out and
one in), every GPU with its own NIC into a leaf switch of ``gpus_per_leaf`` ports, leaves joined
through ``spines`` spine switches. ``oversub`` = a leaf's down-capacity over its up-capacity (1 =
full bisection, a fat-tree; 3 = the common 3:1). Traffic between GPUs of one server takes
NVSwitch, of one leaf the leaf, otherwise leaf -> spine -> leaf, the spine picked by ECMP (a hash
of the pair, as switches do per flow; ``ecmp="spray"`` splits every flow evenly over the spines
instead, as packet spraying would). Links are directed: a full-duplex cable is two links.

``rails=True`` makes it rail-optimised, as large GPU clusters are built: GPU i of every server
connects to the leaves of rail i (``gpus_per_leaf`` servers per leaf), so traffic between GPUs of
one rank in their servers never leaves the rail's leaf, and traffic to another rail first crosses
NVSwitch to the source server's GPU on the destination's rail (PXN), then that rail.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from fsmoe.config import ConfigError

GBIT = 1e9 / 8  # bytes/s in one Gb/s


@dataclass(frozen=True)
class Flows:
    """A traffic pattern: flow f sends ``size_bytes[f]`` from GPU ``src[f]`` to GPU ``dst[f]``."""

    src: np.ndarray
    dst: np.ndarray
    size_bytes: np.ndarray

    def __post_init__(self):
        if not (self.src.shape == self.dst.shape == self.size_bytes.shape) or self.src.ndim != 1:
            raise ValueError("Flows: src, dst and size_bytes must be 1-D arrays of one length")


@dataclass(frozen=True)
class LeafSpine:
    gpus: int
    gpus_per_server: int = 8
    gpus_per_leaf: int = 32
    nic_gbps: float = 400.0
    nvlink_gbps: float = 3600.0  # per GPU and direction (H100/H200 NVLink 4: 450 GB/s)
    oversub: float = 1.0
    spines: int | None = None  # default: one port-speed uplink per spine, gpus_per_leaf / oversub
    ecmp: str = "hash"
    rails: bool = False  # rail-optimised: GPU i of every server on rail i's leaves (see module docstring)

    def __post_init__(self):
        for name in ("gpus", "gpus_per_server", "gpus_per_leaf"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}", getattr(self, name), "must be >= 1")
        if not self.rails and (self.gpus_per_leaf % self.gpus_per_server or self.gpus % self.gpus_per_leaf):
            raise ConfigError("--gpus-per-leaf", self.gpus_per_leaf,
                              f"must be a multiple of --gpus-per-server={self.gpus_per_server} and divide "
                              f"--gpus={self.gpus}")
        if self.oversub < 1 or self.nic_gbps <= 0 or self.nvlink_gbps <= 0:
            raise ConfigError("--oversub", self.oversub, "must be >= 1 (with positive link speeds)")
        if self.ecmp not in ("hash", "spray"):
            raise ConfigError("--ecmp", self.ecmp, "must be 'hash' or 'spray'")
        servers = self.gpus // self.gpus_per_server
        if self.rails and (self.gpus % self.gpus_per_server or servers % self.gpus_per_leaf):
            raise ConfigError("--gpus-per-leaf", self.gpus_per_leaf,
                              f"must divide the {self.gpus // self.gpus_per_server} servers on a rail-optimised fabric "
                              f"(a rail leaf takes that many servers' GPU of its rail)")

    @property
    def leaves(self) -> int:
        return self.gpus // self.gpus_per_leaf

    @property
    def num_spines(self) -> int:
        return self.spines or max(1, round(self.gpus_per_leaf / self.oversub))

    @property
    def name(self) -> str:
        return f"{'rail' if self.rails else 'leaf-spine'} {self.oversub:g}:1"

    def leaf_of(self, gpu: np.ndarray) -> np.ndarray:
        """The leaf switch of each GPU's NIC."""
        if not self.rails:
            return gpu // self.gpus_per_leaf
        per_rail = self.gpus // self.gpus_per_server // self.gpus_per_leaf
        return (gpu % self.gpus_per_server) * per_rail + (gpu // self.gpus_per_server) // self.gpus_per_leaf

    # link ids: NVSwitch out [G], in [G], NIC up [G], NIC down [G], leaf->spine [leaves, S],
    # spine->leaf [S, leaves]
    def _base(self) -> dict[str, int]:
        G, S, Lf = self.gpus, self.num_spines, self.leaves
        return {"nvl_out": 0, "nvl_in": G, "nic_up": 2 * G, "nic_down": 3 * G, "leaf_up": 4 * G,
                "spine_down": 4 * G + Lf * S, "end": 4 * G + 2 * Lf * S}

    def capacity(self) -> np.ndarray:
        """[L] bytes/s of every link."""
        b, G = self._base(), self.gpus
        cap = np.empty(b["end"])
        cap[:2 * G] = self.nvlink_gbps * GBIT
        cap[2 * G:4 * G] = self.nic_gbps * GBIT
        cap[b["leaf_up"]:] = self.gpus_per_leaf * self.nic_gbps * GBIT / (self.oversub * self.num_spines)
        return cap

    def link_kind(self) -> np.ndarray:
        """[L] the kind of every link: 0 NVSwitch, 1 NIC, 2 leaf-spine."""
        b, G = self._base(), self.gpus
        kind = np.full(b["end"], 2, dtype=np.int8)
        kind[:2 * G], kind[2 * G:4 * G] = 0, 1
        return kind

    def incidence(self, flows: Flows) -> tuple[sp.csr_matrix, np.ndarray]:
        """The flow x link matrix of ``flows`` on this fabric and the sizes of its rows (with
        ``ecmp="spray"`` a flow between leaves becomes one row per spine, its bytes split evenly)."""
        src, dst, size = flows.src.astype(np.int64), flows.dst.astype(np.int64), flows.size_bytes.astype(np.float64)
        if len(src) and (min(src.min(), dst.min()) < 0 or max(src.max(), dst.max()) >= self.gpus):
            raise ValueError(f"flows name GPUs outside 0..{self.gpus - 1}")
        b, S, Lf, per = self._base(), self.num_spines, self.leaves, self.gpus_per_server
        # a flow between servers enters the network at `entry`: its source, or on a rail-optimised
        # fabric the GPU of the source's server on the destination's rail (NVSwitch first, as PXN)
        entry = (src // per) * per + dst % per if self.rails else src
        if self.ecmp == "spray":
            cross = self.leaf_of(entry) != self.leaf_of(dst)
            reps = np.where(cross, S, 1)
            src, dst, entry = np.repeat(src, reps), np.repeat(dst, reps), np.repeat(entry, reps)
            size = np.repeat(size / reps, reps)
            spine = np.concatenate([np.arange(r) for r in reps]) if len(reps) else np.zeros(0, np.int64)
        else:
            pair = src.astype(np.uint64) << np.uint64(32) | dst.astype(np.uint64)
            spine = (_mix(pair) % np.uint64(S)).astype(np.int64)
        same_server = (src // per) == (dst // per)
        leaf_s, leaf_d = self.leaf_of(entry), self.leaf_of(dst)
        cols = np.full((len(src), 6), -1, dtype=np.int64)
        nv = same_server & (src != dst)
        cols[nv, 0], cols[nv, 1] = b["nvl_out"] + src[nv], b["nvl_in"] + dst[nv]
        net = ~same_server
        relay = net & (entry != src)
        cols[relay, 0], cols[relay, 1] = b["nvl_out"] + src[relay], b["nvl_in"] + entry[relay]
        cols[net, 2], cols[net, 3] = b["nic_up"] + entry[net], b["nic_down"] + dst[net]
        far = net & (leaf_s != leaf_d)
        cols[far, 4] = b["leaf_up"] + leaf_s[far] * S + spine[far]
        cols[far, 5] = b["spine_down"] + spine[far] * Lf + leaf_d[far]
        n = (cols >= 0).sum(1)
        keep = cols >= 0
        indptr = np.concatenate([[0], np.cumsum(n)])
        A = sp.csr_matrix((np.ones(int(n.sum())), cols[keep], indptr), shape=(len(src), b["end"]))
        return A, size


def _mix(x: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each element (MurmurHash3's finaliser): ECMP's per-flow choice, which a
    linear hash of (src, dst) would make collide on regular patterns."""
    x = x.copy()
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(33)
        x *= np.uint64(0xFF51AFD7ED558CCD)
        x ^= x >> np.uint64(33)
        x *= np.uint64(0xC4CEB9FE1A85EC53)
        x ^= x >> np.uint64(33)
    return x
