"""Placement: the map logical expert -> (EP rank, slot), the dispatch that reads it, and moving
experts between ranks mid-run with their weights and AdamW state (same losses as no move)."""
from __future__ import annotations

import pytest
import torch

from dist_utils import run_workers
from fsmoe.comm.layout import DispatchLayout, to_expert_major
from fsmoe.placement.placement import Placement


def test_contiguous_is_the_default_and_swap_makes_a_new_version():
    pl = Placement.contiguous(4, 2)
    assert pl.experts_on(0) == (0, 1) and pl.experts_on(1) == (2, 3) and pl.is_contiguous and pl.version == 0
    sw = pl.swap(1, 2)
    assert sw.experts_on(0) == (0, 2) and sw.experts_on(1) == (1, 3) and sw.rank_of(1) == 1
    assert sw.physical_order == (0, 2, 1, 3) and not sw.is_contiguous and sw.version == 1
    assert pl.experts_on(0) == (0, 1)  # immutable
    with pytest.raises(ValueError, match="share a slot"):
        Placement(((( 0, 0),), ((0, 0),)), 1, 2)
    with pytest.raises(ValueError, match="does not divide"):
        Placement.contiguous(3, 2)


def test_dispatch_layout_follows_the_placement():
    """Rank 0 of EP2 holds experts (0, 2) after the swap: it sends expert 1's rows to rank 1 and
    receives expert 2's; rows go out in physical order and come back to their places."""
    counts = [[[1, 2, 3, 4]], [[5, 6, 7, 8]]]  # [P][S][E], one ESP rank
    order = Placement.contiguous(4, 2).swap(1, 2).physical_order
    lay = DispatchLayout.from_counts(counts, ep_rank=0, esp_rank=0, order_E=order)
    assert lay.send_splits_P == (1 + 3, 2 + 4) and lay.recv_splits_P == (1 + 3, 5 + 7)
    assert lay.tokens_per_local_expert_El == (1 + 5, 3 + 7)
    x = torch.arange(10.0).unsqueeze(1)  # rows of experts 0 | 1 1 | 2 2 2 | 3 3 3 3
    sent = lay.take_rows(x)
    assert sent[:, 0].tolist() == [0, 3, 4, 5, 1, 2, 6, 7, 8, 9]
    assert torch.equal(lay.place_rows(sent, 12)[:10], x) and not lay.place_rows(sent, 12)[10:].any()
    for r in (2, 3):  # chunks in the same physical order, covering every row once
        chunks = lay.chunks(r)
        assert sorted(k for c in chunks for a, b in c.src_ranges for k in range(a, b)) == list(range(10))
    recv = torch.arange(sum(lay.recv_splits_P)).unsqueeze(1)
    assert to_expert_major(recv, lay).shape == recv.shape


def test_performance_model_reads_the_placement():
    import numpy as np

    from fsmoe.schedule.model.perf_model import route_work
    from fsmoe.schedule.types import Layout

    counts_SE = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    swapped = Placement.contiguous(4, 2).swap(1, 2)
    lay = DispatchLayout.from_counts(counts_SE.reshape(2, 1, 4).tolist(), 0, 0, swapped.physical_order)
    for rank in (0, 1):
        work = route_work(counts_SE, 1, Layout(dp=2, ep=2), rank, swapped)[0]
        if rank == 0:
            assert (work.send_rows, work.recv_rows) == (lay.num_sent, sum(lay.recv_splits_P))
        assert work.recv_rows == sum(counts_SE[:, list(swapped.experts_on(rank))].ravel())


# ---------------------------------------------------------------------------- moving experts mid-run


def _swap_worker(rank, world, swap_at: int | None, move_state: bool = True):
    from fsmoe.config import ParallelConfig
    from fsmoe.models import build_model
    from fsmoe.parallel.groups import build_groups
    from fsmoe.parallel.grads import global_mean
    from fsmoe.parallel.tensor_parallel import parallelize
    from fsmoe.placement.migrate import migrate
    from test_dist_layouts import B, batches, model_cfg, optimizer, train_step

    groups = build_groups(ParallelConfig(dp=world, ep=world))
    model = parallelize(build_model(model_cfg("gpt"), seed=3), groups)
    opt = optimizer(model)
    rows = slice(rank * B // world, (rank + 1) * B // world)
    losses = []
    for step, (x, y) in enumerate(batches(6)):
        if step == swap_at:  # expert 1 (rank 0) and expert 6 (rank 1) trade places in every layer
            for layer in model.moe_layers():
                new = layer.experts.placement.swap(1, 6)
                if move_state:
                    migrate(layer, new, groups.ep_group, opt)
                else:  # control: route by the new placement, but leave weights and state where they were
                    layer.experts.placement, layer.dispatcher = new, layer.dispatcher.with_placement(new)
            assert model.moe_layers()[0].experts.expert_ids == ([0, 6, 2, 3] if rank == 0 else [4, 5, 1, 7])
        _, loss, _, _ = train_step(model, opt, x[rows], y[rows], groups, 0.05)
        losses.append(global_mean(loss, groups).item())
    return losses


@pytest.mark.dist
def test_swapping_experts_between_ranks_keeps_the_losses():
    """EP2: experts 1 and 6 trade ranks after step 3 (weights and AdamW state moved): the losses
    are those of the run without the swap, bit for bit on CPU; routing by the new placement
    without moving the state (the control) changes them."""
    moved = run_workers(_swap_worker, 2, 3, timeout_s=120)
    still = run_workers(_swap_worker, 2, None, timeout_s=120)
    control = run_workers(_swap_worker, 2, 3, False, timeout_s=120)
    assert moved[0] == moved[1] and moved[0] == still[0]
    assert control[0][:3] == still[0][:3] and control[0][3] != still[0][3]
