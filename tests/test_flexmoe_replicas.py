"""Replicas and moving experts (FlexMoE): the dispatch split among copies, training with copies
equal to training without, Expand/Shrink/Migrate moving weights and AdamW state bit for bit,
and no hang when a rank holds only copies or gets no tokens."""
from __future__ import annotations

import hashlib
import random

import pytest
import torch

from dist_utils import run_workers
from fsmoe.comm.layout import DispatchLayout, replica_shares
from fsmoe.placement.migrate import MigrationPlan
from fsmoe.placement.placement import FREE, Placement


def test_placement_primitives_and_checks():
    pl = Placement.initial(4, 2, 1)  # slots: rank 0 (0, 1, free), rank 1 (2, 3, free)
    assert pl.experts_on(0) == (0, 1, FREE) and pl.free_slots(1) == (2,) and pl.holds_logical_prefix
    ex = pl.expand(0, (1, 2))
    assert ex.copies(0) == 2 and ex.ranks_of(0) == (0, 1) and ex.version == 1 and ex.has_replicas
    assert ex.shrink(0, (1, 2)).slots_E == pl.slots_E
    mv = pl.move(3, (1, 1), (0, 2))
    assert mv.experts_on(0) == (0, 1, 3) and mv.experts_on(1) == (2, FREE, FREE) and not mv.holds_logical_prefix
    assert ex.primary_slots(1) == (0, 1)
    with pytest.raises(ValueError, match="same rank"):
        pl.expand(0, (0, 2))
    with pytest.raises(ValueError, match="not free"):
        pl.expand(0, (1, 0))
    with pytest.raises(ValueError, match="no spare copy"):
        pl.shrink(1, (0, 1))
    with pytest.raises(ValueError, match="spare slots"):
        Placement.initial(4, 2, -1)


def test_rows_of_an_expert_are_split_evenly_among_its_copies():
    """Expert 0 has copies on ranks 0 and 1: each source's rows for it are cut in two pieces
    (rotated per source), every row of x_ND is sent once and comes back to its place."""
    pl = Placement.initial(4, 2, 1).expand(0, (1, 2))  # physical: 0 1 F | 2 3 0
    order = pl.physical_order
    counts = [[[5, 1, 2, 0]], [[3, 0, 4, 2]]]  # [P][S][E]
    shares = replica_shares(counts, order)
    assert [n for _, n in shares[0][0]] == [2, 1, 0, 2, 0, 3] and [n for _, n in shares[1][0]] == [2, 0, 0, 4, 2, 1]
    for rank in (0, 1):
        lay = DispatchLayout.from_counts(counts, rank, 0, order)
        assert sum(lay.tokens_per_local_expert_El) == sum(lay.recv_splits_P)
        n = sum(counts[rank][0])
        x = torch.arange(float(n)).unsqueeze(1)
        sent = lay.take_rows(x)
        assert sorted(sent[:, 0].tolist()) == list(range(n))
        assert torch.equal(lay.place_rows(sent, n), x)
        for r in (2, 3):
            chunks = lay.chunks(r)
            assert sorted(k for c in chunks for a, b in c.src_ranges for k in range(a, b)) == list(range(n))
            assert [sum(c.tokens_per_local_expert_El[j] for c in chunks) for j in range(3)] == \
                list(lay.tokens_per_local_expert_El)
    rank0 = DispatchLayout.from_counts(counts, 0, 0, order)
    rank1 = DispatchLayout.from_counts(counts, 1, 0, order)
    assert rank0.tokens_per_local_expert_El[0] + rank1.tokens_per_local_expert_El[2] == 8  # expert 0: 4 + 4
    assert rank0.tokens_per_local_expert_El[2] == 0  # the free slot


def test_rows_are_split_by_planned_shares():
    """Expert 0's copies on ranks 0 and 1 with shares 3:1: every source's rows for it are cut
    3:1 (up to one row), each row sent once; all-equal shares are the even split; swap keeps them."""
    pl = Placement.initial(4, 2, 1).expand(0, (1, 2)).with_shares([(3, 1), (1,), (1,), (1,)])
    assert pl.shares_E == ((3, 1), (1,), (1,), (1,)) and pl.fractions(0) == {0: 0.75, 1: 0.25}
    assert pl.physical_weights == (3, 1, 0, 1, 1, 1)
    assert pl.with_shares([(2, 2), (1,), (1,), (1,)]).shares_E == ()  # all equal: the even split
    assert pl.swap(0, 1).shares_E[1] == (3, 1) and pl.shrink(0, (1, 2)).shares_E == ()
    with pytest.raises(ValueError, match="shares_E"):
        pl.with_shares([(3, 0), (1,), (1,), (1,)])
    order, weights = pl.physical_order, pl.physical_weights
    counts = [[[8, 1, 2, 0]], [[7, 0, 4, 2]]]  # [P][S][E]
    shares = replica_shares(counts, order, weights)
    assert [n for _, n in shares[0][0]] == [6, 1, 0, 2, 0, 2] and [n for _, n in shares[1][0]] == [6, 0, 0, 4, 2, 1]
    assert replica_shares(counts, order, (1,) * 6) == replica_shares(counts, order)
    for rank in (0, 1):
        lay = DispatchLayout.from_counts(counts, rank, 0, order, weights_K=weights)
        n = sum(counts[rank][0])
        x = torch.arange(float(n)).unsqueeze(1)
        sent = lay.take_rows(x)
        assert sorted(sent[:, 0].tolist()) == list(range(n)) and torch.equal(lay.place_rows(sent, n), x)
        for r in (2, 3):
            chunks = lay.chunks(r)
            assert sorted(k for c in chunks for a, b in c.src_ranges for k in range(a, b)) == list(range(n))
            assert [sum(c.tokens_per_local_expert_El[j] for c in chunks) for j in range(3)] == \
                list(lay.tokens_per_local_expert_El)


def test_migration_plan_copies_locally_and_balances_senders():
    old = Placement.initial(4, 2, 1).expand(0, (1, 2))
    new = old.shrink(0, (1, 2)).expand(1, (1, 2)).move(2, (1, 0), (0, 2))
    plan = MigrationPlan.between(old, new)
    assert [(t.src, t.dst, t.expert) for t in plan.transfers] == [((0, 1), (1, 2), 1), ((1, 0), (0, 2), 2)]
    assert plan.remote_rows == 2 and plan.moved_fraction() == 0.5
    assert MigrationPlan.between(old, old).transfers == ()


def random_placement(rng: random.Random, E: int, P: int, spare: int, version: int) -> Placement:
    """A random valid placement with every slot used where possible (copies on distinct ranks)."""
    El = E // P + spare
    slots = [(p, j) for p in range(P) for j in range(El)]
    rng.shuffle(slots)
    owner: dict[tuple[int, int], int] = {}
    for e in range(E):
        owner[slots.pop()] = e
    for s in slots:
        candidates = [e for e in range(E) if all(o != e for (p, _), o in owner.items() if p == s[0])]
        if candidates and rng.random() < 0.8:
            owner[s] = rng.choice(candidates)
    by_e = [tuple(sorted(s for s, o in owner.items() if o == e)) for e in range(E)]
    return Placement(tuple(by_e), P, El, version)


# ---------------------------------------------------------------------------- distributed


def _static_and_flex(rank, world, spare: int, every: int, steps: int, kind: str, hand: list | None,
                     overlap: bool = False):
    """Both runs in one launch: (static, with copies and moves)."""
    return (_train_worker(rank, world, 0, every, steps, kind, None),
            _train_worker(rank, world, spare, every, steps, kind, hand, overlap))


def _train_worker(rank, world, spare: int, every: int, steps: int, kind: str, hand: list | None,
                  overlap: bool = False):
    """Train ``steps`` steps at dp=world, EP2 x ESP(world/2); with ``spare`` > 0 the experts move
    to a new random placement (copies, moves, free slots) every ``every`` steps. Returns global losses, the rows
    moved, and whether every migration was checksum-exact (each slot then holds its expert's
    weights, gradients and AdamW moments bit for bit) with the copies bitwise equal at the end.
    ``overlap``: launched asynchronously (weights and moments; gradients stay) and committed after
    other work, random shares on the copies."""
    from fsmoe.config import ParallelConfig
    from fsmoe.models import build_model
    from fsmoe.parallel.grads import global_mean
    from fsmoe.parallel.groups import build_groups
    from fsmoe.parallel.tensor_parallel import parallelize
    from fsmoe.placement.migrate import launch_migration, migrate
    from fsmoe.placement.slots import add_spare_slots
    from test_dist_layouts import B, batches, model_cfg, optimizer, train_step

    groups = build_groups(ParallelConfig(dp=world, ep=2, esp=world // 2))
    model = parallelize(build_model(model_cfg(kind), seed=3), groups)
    for layer in model.moe_layers():
        add_spare_slots(layer, spare)
    opt = optimizer(model)
    rows = slice(groups.dp_rank * B // world, (groups.dp_rank + 1) * B // world)
    rng = random.Random(7)
    losses, moved, exact = [], 0, True
    for step, (x, y) in enumerate(batches(steps)):
        if spare and step and step % every == 0:
            before = _checksums(model, opt, grads=not overlap)
            pending = []
            for layer in model.moe_layers():
                old = layer.experts.placement
                new = (Placement(hand[(step // every) % len(hand)], old.ranks, old.slots_per_rank, old.version + 1)
                       if hand else random_placement(rng, old.num_experts, old.ranks, spare, old.version + 1))
                if overlap:
                    new = new.with_shares([tuple(rng.randint(1, 9) for _ in s) for s in new.slots_E])
                    pending.append(launch_migration(layer, new, groups.ep_group, opt))
                    moved += pending[-1].plan.remote_rows
                else:
                    moved += migrate(layer, new, groups.ep_group, opt).remote_rows
            torch.randn(64, 64) @ torch.randn(64, 64)  # other work while the rows are in flight
            for p in pending:
                p.commit()
            exact &= _checksums(model, opt, grads=not overlap) == before  # every slot holds its expert's bytes
        _, loss, _, _ = train_step(model, opt, x[rows], y[rows], groups, 0.05)
        losses.append(global_mean(loss, groups).item())
    return losses, moved, exact and all(len(v) == 1 for v in _checksums(model, opt).values())


def _checksums(model, opt, grads: bool = True) -> dict:
    """(layer, expert, ESP shard) -> the set of checksums of its copies' weights, gradients and
    AdamW moments, over all ranks (one element when the copies are bitwise equal)."""
    import torch.distributed as dist

    from fsmoe.placement.migrate import slot_tensors

    mine = {}
    for m, layer in enumerate(model.moe_layers()):
        ex = layer.experts
        tensors = slot_tensors(ex, opt, grads)
        for j, e in enumerate(ex.placement.experts_on(ex.ep_rank)):
            if e != FREE:
                mine.setdefault((m, e, ex.esp_rank), []).append(
                    hashlib.sha1(b"".join(t[j].contiguous().numpy().tobytes() for t in tensors)).hexdigest())
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    merged: dict = {}
    for d in everyone:
        for k, v in d.items():
            merged.setdefault(k, set()).update(v)
    return merged


ONLY_COPIES = tuple(((0, e), (1, e)) if e < 4 else ((0, e),) for e in range(8))  # rank 1: copies of 0-3 only
IDLE = tuple(((0, e), (1, 5)) if e == 1 else ((0, e),) for e in range(8))  # rank 1: one copy that gets no rows


def _both_cases(rank, world):
    return (_static_and_flex(rank, world, 2, 5, 50, "gpt", None),
            _static_and_flex(rank, world, 4, 2, 6, "forced", [ONLY_COPIES, IDLE]),
            _static_and_flex(rank, world, 2, 5, 50, "gpt", None, overlap=True))


@pytest.mark.dist
def test_training_with_copies_and_moves_equals_static_and_never_hangs():
    """EP2 x ESP2 (each ESP rank moves and syncs its d_ff shard of every copy), one launch:

    - every 5 steps each layer's experts go to a new random placement with copies, moves and
      free slots (weights, gradients and AdamW state migrated, checksum-exact); 50 steps of losses
      equal the static run's to 1e-5, and every copy of an expert stays bitwise equal to the others;
    - every token to expert 0 (8 experts, 4 spare slots per rank): rank 1 holds only copies
      (of experts 0-3) while rank 0 holds all eight, then nothing but free slots and one copy
      that gets no rows; no hang, and the losses still equal the static run's;
    - the first case again with every move overlapped (launched asynchronously, committed after
      other work) and random planned shares on the copies: losses equal to 1e-5, exact moves."""
    results = run_workers(_both_cases, 4, timeout_s=420)
    for case in (0, 1, 2):
        (s_loss, _, _), (f_loss, moved, _) = results[0][case]
        assert len(f_loss) == (50, 6, 50)[case] and max(abs(a - b) for a, b in zip(s_loss, f_loss)) < 1e-5, (s_loss, f_loss)
        assert moved > 0 and all(r[case][1][2] for r in results)

