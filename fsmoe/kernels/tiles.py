"""Launch shapes of the Triton grouped GEMMs (``fsmoe.kernels.triton_gmm``), kept apart from the
kernels so the tile cache (``fsmoe.kernels.gmm_tune``) reads and writes them without Triton."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TileConfig:
    """One launch shape. ``bm`` is the rows per tile (the row step of the weight-gradient kernel),
    ``bn`` the output columns, ``bk`` the reduction step (the I tile of the weight gradient)."""

    bm: int = 128
    bn: int = 128
    bk: int = 64
    group_m: int = 8
    warps: int = 8
    stages: int = 3
    tma: bool = False  # read tiles with Hopper's TMA (sm90+, 16-byte aligned rows)


@dataclass(frozen=True)
class MLPTiles:
    """One tile shape per kernel of the MLP's forward and backward."""

    up: TileConfig = TileConfig(bm=128, bn=64, bk=64, warps=8, stages=3)  # x -> swiglu(h1, h3)
    down: TileConfig = TileConfig()  # h -> y, and dy -> dh
    dgrad: TileConfig = TileConfig()  # dh1, dh3 -> dx
    wgrad: TileConfig = TileConfig(bm=64, bn=128, bk=128, warps=8, stages=3)
