"""ESP stage: expert sharding along f inside a node (FSMoE Fig. 2).

Shape legend: R rows this rank received from the EP AlltoAll, G = sum over the ESP group of
every rank's R (the gathered rows), D model dim, S ranks in the ESP group.

All S ranks of an ESP group hold the same experts, each a different slice of the hidden dim f.
Before the experts, every rank AllGathers the group's rows (so each shard sees every token of
its experts); after them, each rank holds a partial ``[G, D]`` output over its f-slice, and a
ReduceScatter sums the partials and returns each rank its own R rows. Row counts differ per rank
(padded to the largest on the wire). The adjoints are each other: AllGather's backward is a
ReduceScatter and vice versa.

ReduceScatter implementation is chosen at build time from the backend
(:func:`fsmoe.comm.functional.reduce_scatter_impl_for`): native on NCCL, AlltoAll + local sum
elsewhere.

    stage = EspStage(esp_group, impl="alltoall")
    x_GD = stage.finish_gather(stage.launch_gather(x_RD, layout.gather_sizes_S))
    ... partial_GD = experts(x_GD) ...
    y_RD = stage.finish_scatter(stage.launch_scatter(partial_GD, layout.gather_sizes_S))
"""
from __future__ import annotations

from torch import Tensor
from torch.distributed import ProcessGroup

from fsmoe.comm.functional import (REDUCE_SCATTER_IMPLS, Launched, finish, launch_all_gather,
                                   launch_reduce_scatter)


class EspStage:
    """Stateless; ``group``: the ESP process group; ``impl``: ReduceScatter implementation."""

    def __init__(self, group: ProcessGroup | None, impl: str):
        if impl not in REDUCE_SCATTER_IMPLS:
            raise ValueError(f"reduce-scatter impl {impl!r} is unknown; allowed: {list(REDUCE_SCATTER_IMPLS)}")
        self.group, self.impl = group, impl

    def launch_gather(self, x_RD: Tensor, sizes_S: tuple[int, ...]) -> Launched:
        """Start gathering: rank s contributes ``sizes_S[s]`` rows (this rank: x_RD [R, D])."""
        return launch_all_gather(x_RD, list(sizes_S), self.group, self.impl)

    def finish_gather(self, launched: Launched) -> Tensor:
        """Wait; returns x_GD [G, D], rank-major (rank 0's rows first)."""
        return finish(launched)

    def launch_scatter(self, y_GD: Tensor, sizes_S: tuple[int, ...]) -> Launched:
        """Start the ReduceScatter of partial outputs y_GD [G, D] (rank-major blocks)."""
        return launch_reduce_scatter(y_GD, list(sizes_S), self.group, self.impl)

    def finish_scatter(self, launched: Launched) -> Tensor:
        """Wait; returns y_RD [R, D]: the sum over the group of this rank's rows."""
        return finish(launched)
