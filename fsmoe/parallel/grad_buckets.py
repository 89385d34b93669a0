"""Data-parallel gradient AllReduce overlapped with the backward pass (the default schedule).

Shape legend: P parameters of one bucket, n their total number of elements.

The dense parameters (``ParamSharding.reduce == "dp"``: attention, norms, embeddings, dense FFNs)
are grouped into buckets of about ``bucket_mb`` in reverse ``model.parameters()`` order, which is
roughly the order backward finishes their gradients. Each parameter gets a post-accumulate-grad
hook; when the last gradient of a bucket has arrived, the bucket's gradients are flattened and its
AllReduce is launched asynchronously, so on NCCL it runs on the communication stream while
backward goes on computing earlier layers (DDP's bucketing, and the part of FSMoE's gradient
partitioning that needs no schedule). ``finish()``, called after backward, launches the buckets
whose hooks did not all fire (a parameter without a gradient gets zeros, as in ``sync_grads``),
waits and divides by dp. Once a bucket is launched its gradients are views of its flat buffer,
so the buckets cost no memory beyond the gradients themselves.

Every rank launches the same buckets in the same order: the dense part runs the same graph on
every data-parallel rank, and leftover buckets go in bucket order. The numbers are those of
``sync_grads``: the same sums of the same values, cut into other pieces (with more than two ranks
the collective may add the addends in another order, a last-bit difference).
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fsmoe.parallel.grads import grad_or_zeros
from fsmoe.parallel.groups import ParallelGroups
from fsmoe.parallel.sharding import get_sharding


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    arrived: int = 0
    flat_n: Tensor | None = None
    work: dist.Work | None = None
    hooks: list = field(default_factory=list)


class BucketedGradSync:
    """Overlapped AllReduce of the ``dp``-kind gradients; collective (every dp rank builds one)."""

    def __init__(self, model: nn.Module, groups: ParallelGroups, bucket_mb: float = 25.0, skip: Collection[int] = ()):
        """``skip``: ids of parameters reduced elsewhere (a sharded optimizer's reduce-scatter)."""
        self.groups, self.group = groups, groups.group("dp")
        params = [p for p in model.parameters()
                  if p.requires_grad and get_sharding(p).reduce == "dp" and id(p) not in skip]
        self.buckets = _cut(list(reversed(params)), int(bucket_mb * 2**20))
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        for b in self.buckets:
            for p in b.params:
                b.hooks.append(p.register_post_accumulate_grad_hook(self._arrived))

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for b in self.buckets for p in b.params]

    def _arrived(self, p: nn.Parameter) -> None:
        b = self._bucket_of[id(p)]
        b.arrived += 1
        if b.arrived == len(b.params):
            self._launch(b)

    def _launch(self, b: _Bucket) -> None:
        """Flatten the bucket's gradients and start their AllReduce. The gradients become views of
        the flat buffer (as DDP's ``gradient_as_bucket_view``), so the separate tensors are freed
        and the bucket costs no second copy of the gradients."""
        b.flat_n = torch.cat([grad_or_zeros(p).reshape(-1) for p in b.params])
        for p, part in zip(b.params, torch.split(b.flat_n, [p.numel() for p in b.params])):
            p.grad = part.view_as(p)
        b.work = dist.all_reduce(b.flat_n, group=self.group, async_op=True)

    def finish(self) -> None:
        """After backward: launch what is left, wait for every bucket, write grad = sum / dp."""
        for b in self.buckets:
            if b.work is None:
                self._launch(b)
        for b in self.buckets:
            b.work.wait()
            b.flat_n /= self.groups.dp  # the gradients are views of it
            b.arrived, b.flat_n, b.work = 0, None, None

    def remove(self) -> None:
        for b in self.buckets:
            for h in b.hooks:
                h.remove()


def _cut(params: list[nn.Parameter], bucket_bytes: int) -> list[_Bucket]:
    buckets, current, size = [], [], 0
    for p in params:
        current.append(p)
        size += p.numel() * p.element_size()
        if size >= bucket_bytes:
            buckets.append(_Bucket(current))
            current, size = [], 0
    if current:
        buckets.append(_Bucket(current))
    return buckets
