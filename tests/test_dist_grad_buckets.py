"""The overlapped, bucketed dense-gradient AllReduce equals the flat one (fsmoe.parallel.grad_buckets):
3 gloo ranks, buckets small enough that a step launches several during backward, a parameter that
gets no gradient (its bucket is launched by finish), and two steps in a row (state is reset)."""
import torch
from torch import nn

from dist_utils import run_workers


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _grads_both_ways(rank: int, world: int) -> list[tuple[list, list]]:
    from fsmoe.config import ParallelConfig
    from fsmoe.parallel.grad_buckets import BucketedGradSync
    from fsmoe.parallel.grads import sync_grads
    from fsmoe.parallel.groups import build_groups

    groups = build_groups(ParallelConfig(dp=world))
    torch.manual_seed(0)
    ref, net = Net(), Net()
    net.load_state_dict(ref.state_dict())
    buckets = BucketedGradSync(net, groups, bucket_mb=100 * 4 / 2**20)  # ~100 floats: several buckets
    assert len(buckets.buckets) >= 3
    out = []
    for step in range(2):
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(10 * step + rank))
        for m in (ref, net):
            m.zero_grad(set_to_none=True)
            m(x).square().sum().backward()
        sync_grads(ref, groups)
        buckets.finish()
        out.append(([p.grad.clone() for p in ref.parameters()], [p.grad.clone() for p in net.parameters()]))
    return out


def test_bucketed_overlapped_sync_equals_flat_sync():
    for rank_out in run_workers(_grads_both_ways, 3, timeout_s=120):
        for flat, bucketed in rank_out:
            assert len(flat) == len(bucketed)
            for f, b in zip(flat, bucketed):
                # 3 ranks: the collective may associate the three addends differently per buffer size
                torch.testing.assert_close(b, f, rtol=1e-6, atol=1e-7)
