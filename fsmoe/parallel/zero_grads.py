"""Gradients reduce-scattered into the optimizer's slices (``parallel.shard = "optimizer"``, ZeRO stage 2).

With the optimizer state split (fsmoe.parallel.zero), each rank of a replica group updates only
its slice of a parameter, so it needs only that slice of the summed gradient. An AllReduce gives
every rank the whole sum; a ReduceScatter gives each its slice, with half the bytes on the link
(the other half is the all_gather of the updated weights, which runs behind the next forward).
So a step's dense traffic moves half out of the backward, where it shares the link with the
AlltoAlls, into the forward, and each rank keeps ``1/n`` of the gradients instead of all.

The buckets are the optimizer's: a bucket's reduce-scatter input is ``[n, total]`` (rank r's row
holds every entry's rank-r slice, in the same layout as the all_gather's output), its output
``[total]`` this rank's slices, which become the optimizer's gradients (``_Bucket.grad_slices``).
Only buckets whose parameters are summed over their replica group take part (``dp`` parameters
over dp, routed experts over edp, the router and shared experts where the world is the dp group);
under tensor parallelism the router and shared experts, summed over the world, keep their whole
gradients (``sync_grads``) and are sliced for the step as before.

With ``overlap`` (NCCL), a bucket is launched as soon as backward has produced its last
gradient (post-accumulate-grad hooks). The ranks of a replica group run the same graph (the dense
part is the same on every dp rank; the replicas of an expert run its grouped GEMMs also on zero
rows, so its weights always get a gradient), so the order is the same on all of them; whatever
did not arrive goes out in :meth:`finish`, in bucket order.
At most ``IN_FLIGHT`` buckets are in flight: launching another first waits for the oldest, whose
input (a bucket of whole gradients) is then released, so backward never holds the whole
gradients and their copy at once.
The sums are those of the AllReduce: the same addends per element.

Shapes: n ranks in the replica group, ``total`` elements of one rank's slices in a bucket.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor

from fsmoe.parallel.grads import grad_or_zeros
from fsmoe.parallel.sharding import get_sharding
from fsmoe.parallel.zero import ZeroAdamW, _Entry

IN_FLIGHT = 2  # buckets whose reduce-scatter may run at once (each holds a bucket of whole gradients)
# reduce_scatter_tensor's newer name (the old one warns on torch 2.13; 2.11 has only the old one)
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class GradReduceScatter:
    """Reduce-scatter of the gradients of the optimizer's buckets whose replica ``kinds`` are given
    (("dp", "edp"), or ("edp",) where a pipelined schedule reduces the dense gradients itself).
    Collective: every rank of each replica group builds one."""

    def __init__(self, optimizer: ZeroAdamW, kinds: tuple[str, ...], overlap: bool):
        self.opt, self.groups = optimizer, optimizer.groups
        self.buckets = [i for i, b in enumerate(optimizer.buckets) if b.reduced and b.kind in kinds]
        self.params = {id(e.param) for i in self.buckets for e in optimizer.buckets[i].entries}
        self._arrived = dict.fromkeys(self.buckets, 0)
        self._pending: dict[int, tuple] = {}  # bucket index -> (work, output, input), oldest first
        self._done: set[int] = set()  # buckets reduced this step
        # (bucket, entry) of the slices this rank counts in the global norm: fixed by the layout
        self._owned = [(i, e) for i in self.buckets for e in optimizer.buckets[i].entries
                       if get_sharding(e.param).is_owner(self.groups, also=(optimizer.buckets[i].kind,))]
        self._hooks = []
        for i in self.buckets if overlap else ():
            self._hooks += [e.param.register_post_accumulate_grad_hook(lambda p, i=i: self._arrive(i))
                            for e in optimizer.buckets[i].entries]

    def _arrive(self, i: int) -> None:
        self._arrived[i] += 1
        if self._arrived[i] == len(self.opt.buckets[i].entries):
            self._launch(i)

    @torch.no_grad()
    def _launch(self, i: int) -> None:
        """Lay the bucket's gradients out rank by rank, free them, start the reduce-scatter."""
        b = self.opt.buckets[i]
        p0 = b.entries[0].param
        inp = torch.empty(b.entries[0].zs.n, b.total, dtype=p0.dtype, device=p0.device)
        for e in b.entries:
            _rank_rows(e, grad_or_zeros(e.param), inp)
            e.param.grad = None  # the whole gradient is not kept: only this rank's slice comes back
        out = torch.empty(b.total, dtype=inp.dtype, device=inp.device)
        work = _reduce_scatter(out, inp.view(-1), group=self.groups.group(b.kind), async_op=True)
        self._pending[i] = (work, out, inp)  # inp: alive until the collective has read it
        while len(self._pending) > IN_FLIGHT:  # older inputs released: they are whole gradients
            self._complete(next(iter(self._pending)))

    def _complete(self, i: int) -> None:
        """Wait for bucket ``i`` (on NCCL: the compute stream waits, not the host) and give it its
        slices / dp (the optimizer's gradients from now until ``zero_grad``)."""
        work, out, _ = self._pending.pop(i)
        work.wait()
        out /= self.groups.dp  # each rank's loss is a mean over its dp shard (fsmoe.parallel.grads)
        self.opt.buckets[i].grad_slices = out
        self._done.add(i)

    @torch.no_grad()
    def finish(self) -> None:
        """After backward: launch what is left and wait for every bucket."""
        for i in self.buckets:
            if i not in self._pending and i not in self._done:
                self._launch(i)
        for i in list(self._pending):
            self._complete(i)
        self._done.clear()
        self._arrived = dict.fromkeys(self.buckets, 0)

    def owned_slices(self) -> list[Tensor]:
        """This rank's gradient slices that the global norm counts here (each piece once)."""
        return [e.view(self.opt.buckets[i].grad_slices) for i, e in self._owned]

    def slices(self) -> list[Tensor]:
        """Every gradient slice this rank holds (what clipping scales)."""
        return [e.view(self.opt.buckets[i].grad_slices) for i in self.buckets for e in self.opt.buckets[i].entries]

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def _rank_rows(e: _Entry, grad: Tensor, inp: Tensor) -> None:
    """Write rank r's slice of ``grad`` into row r of ``inp`` ([n, total]) at the entry's
    segment, zero-padded to ``chunk`` along the slice's dim (torch.chunk's uneven last piece)."""
    zs, z = e.zs, e.zs.dim
    rows = inp[:, e.start:e.start + e.seg].view(zs.n, *e.piece)
    if zs.size % zs.n == 0:  # every piece whole: one copy, [.., n, chunk, ..] -> [n, .., chunk, ..]
        shape = (*grad.shape[:z], zs.n, zs.chunk, *grad.shape[z + 1:])
        rows.copy_(grad.reshape(shape).movedim(z, 0))
        return
    for r in range(zs.n):
        piece = dataclasses.replace(zs, index=r)
        rows[r].narrow(z, 0, piece.length).copy_(grad.narrow(z, piece.offset, piece.length))
        rows[r].narrow(z, piece.length, zs.chunk - piece.length).zero_()
