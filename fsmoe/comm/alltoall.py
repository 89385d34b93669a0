"""EP stage: the uneven AlltoAll that moves expert-ordered rows to the ranks holding the experts.

Shape legend: N rows this rank sends (grouped by destination rank, i.e. by global expert, since
EP rank p holds experts ``[p*El, (p+1)*El)``), R rows it receives, D model dim.

Split sizes come from :class:`fsmoe.comm.layout.DispatchLayout` (counts are exchanged first);
the same stage runs both directions (combine swaps the splits). Autograd: the backward of an
AlltoAll is the AlltoAll with the splits swapped.

    stage = AllToAllStage(ep_group)
    launched = stage.launch(x_ND, layout.send_splits_P, layout.recv_splits_P)   # dispatch
    x_RD = stage.finish(launched)
    launched = stage.launch(y_RD, layout.recv_splits_P, layout.send_splits_P)   # combine
    y_ND = stage.finish(launched)
"""
from __future__ import annotations

from torch import Tensor
from torch.distributed import ProcessGroup

from fsmoe.comm.functional import Launched, finish, launch_all_to_all


class AllToAllStage:
    """Stateless; one instance may serve every layer. ``group``: the EP process group."""

    def __init__(self, group: ProcessGroup | None):
        self.group = group

    def launch(self, x_ND: Tensor, send_splits: tuple[int, ...], recv_splits: tuple[int, ...]) -> Launched:
        """Start sending ``send_splits[p]`` rows of x_ND [N, D] to EP rank p (in order);
        ``recv_splits[p]`` rows will arrive from rank p."""
        return launch_all_to_all(x_ND, list(recv_splits), list(send_splits), self.group)

    def finish(self, launched: Launched) -> Tensor:
        """Wait; returns the received rows [R, D], grouped by source rank."""
        return finish(launched)
