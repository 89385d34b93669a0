"""Collective traffic as flows between GPUs (``fsmoe.sim.fabrics.Flows``)."""
from __future__ import annotations

import numpy as np

from fsmoe.sim.fabrics import Flows


def alltoall(group_size: int, bytes_per_pair: float, groups: int = 1, stride: int = 1) -> Flows:
    """``groups`` concurrent AlltoAlls (one per EP group), each among ``group_size`` GPUs; every
    member sends ``bytes_per_pair`` to every other member. Member i of group j is GPU
    ``(j // stride) * group_size * stride + (j % stride) + i * stride``: with stride 1 a group is
    consecutive GPUs; with stride = GPUs per server, ``stride`` groups interleave so that each
    takes one GPU per server (EP across servers beside TP or ESP inside them)."""
    i, k = np.meshgrid(np.arange(group_size), np.arange(group_size), indexing="ij")
    off = i != k
    src_i, dst_i = i[off], k[off]
    srcs, dsts = [], []
    for j in range(groups):
        base = (j // stride) * group_size * stride + j % stride
        srcs.append(base + src_i * stride)
        dsts.append(base + dst_i * stride)
    src, dst = np.concatenate(srcs), np.concatenate(dsts)
    return Flows(src, dst, np.full(len(src), float(bytes_per_pair)))


def from_matrix(bytes_PP: np.ndarray, gpu_of_rank: np.ndarray | None = None) -> Flows:
    """Flows from a [P, P] matrix of bytes rank p sends rank q (a routing trace's AlltoAll),
    rank p on GPU ``gpu_of_rank[p]`` (default p). The diagonal stays local and is dropped."""
    P = bytes_PP.shape[0]
    if bytes_PP.shape != (P, P):
        raise ValueError(f"bytes_PP must be square, got {bytes_PP.shape}")
    gpu = np.arange(P) if gpu_of_rank is None else np.asarray(gpu_of_rank)
    p, q = np.nonzero(bytes_PP)
    off = p != q
    p, q = p[off], q[off]
    return Flows(gpu[p], gpu[q], bytes_PP[p, q].astype(np.float64))


def incast(senders: int, bytes_each: float, receiver: int = 0, first_sender: int = 1) -> Flows:
    """``senders`` GPUs (``first_sender`` on, consecutive) each send ``bytes_each`` to ``receiver``."""
    src = np.arange(first_sender, first_sender + senders)
    return Flows(src, np.full(senders, receiver), np.full(senders, float(bytes_each)))
