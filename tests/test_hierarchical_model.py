"""The hierarchical dispatch's pure parts: levels, the traffic count (against a simulation that
moves every copy of every token), the choice of d (against trying every d), HierD-ES swap
scores (against recounting every swapped placement), topology detection and config errors."""
from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from fsmoe.comm.topology import LevelCosts, Levels, Stage, ep_levels, stages_for_depth
from fsmoe.comm.traffic import Wire, candidate_stages, choose_depth, count_traffic, predict, select
from fsmoe.config import ConfigError, load_config
from fsmoe.parallel.topology import Topology, sockets_per_node
from fsmoe.placement.placement import Placement
from fsmoe.placement.swap import brute_force_scores, hierd_scores, rank_of, token_scores


def simulate(dest_TK, src_T, levels: Levels, stages, dedup=True):
    """Oracle: move every copy literally. Returns send/recv [S, P, L] as nested lists."""
    P, L = levels.ranks, levels.depth
    send = [[[0] * L for _ in range(P)] for _ in stages]
    recv = [[[0] * L for _ in range(P)] for _ in stages]
    for dests, src in zip(dest_TK.tolist(), src_T.tolist()):
        dests = [d for d in dests if d >= 0]
        copies = [(src, tuple(dests))] if dedup else [(src, (d,)) for d in dests]
        for s, stage in enumerate(stages):
            nxt = []
            for at, serves in copies:
                by_peer = {}
                for d in serves:
                    by_peer.setdefault(levels.stage_peer(stage, at, d), []).append(d)
                for peer, part in by_peer.items():
                    lvl = levels.crossed(at, peer)
                    if lvl >= 0:
                        send[s][at][lvl] += 1
                        recv[s][peer][lvl] += 1
                    nxt.append((peer, tuple(part)))
            copies = nxt
        assert all(at in serves and len(set(serves)) == 1 for at, serves in copies) or not dests
    return send, recv


def routing(T, K, P, seed, skew=0.0):
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(P, generator=g) ** (1 + 4 * skew)
    dest = torch.multinomial(weights.repeat(T, 1), K, replacement=True, generator=g)
    dest[torch.rand(T, K, generator=g) < 0.1] = -1  # dropped / absent assignments
    return dest, torch.randint(0, P, (T,), generator=g)


@pytest.mark.parametrize("sizes", [(2, 2, 2), (3, 2), (2, 2, 2, 2), (4,)])
def test_traffic_matches_simulation(sizes):
    lv = Levels(sizes)
    for seed, dedup, d in itertools.product(range(2), (True, False), range(1, lv.depth + 1)):
        dest, src = routing(40, 4, lv.ranks, seed)
        stages = stages_for_depth(lv, d)
        tr = count_traffic(dest, src, lv, stages, dedup)
        send, recv = simulate(dest, src, lv, stages, dedup)
        assert tr.send.tolist() == send and tr.recv.tolist() == recv
        # counted for every candidate stage at once, each depth's part is the same
        assert torch.equal(select(count_traffic(dest, src, lv, candidate_stages(lv), dedup), stages).send, tr.send)


def test_depth_choice_is_the_brute_force_minimum():
    """Every d and the flat AlltoAll priced from the simulated copies: dispatch stages carry one
    row per copy (its features, K weights and K local ids, padded to 16 bytes), combine the
    features back; the layout's collective rounds and the fixed cost per d on top."""
    lv = Levels((2, 2, 2))
    rng = random.Random(0)
    below = (4, 2, 1)  # ranks under a rank of each level: a node 4, a socket 2, a gpu 1
    for trial in range(12):
        costs = LevelCosts(tuple(rng.uniform(0, 1e-4) for _ in range(3)), tuple(rng.uniform(1e-11, 1e-9) for _ in range(3)),
                           tuple(rng.uniform(0, 3e-4) for _ in range(3)))
        dest, src = routing(60, rng.choice((1, 2, 4, 8)), 8, trial, skew=rng.random())
        wire = Wire(rng.choice((64, 4096, 65536)), rng.choice((2, 4)), rng.choice((1, 8, 100)), rng.choice((1, 2, 8)))
        stages = candidate_stages(lv)
        choice = choose_depth(count_traffic(dest, src, lv, stages), count_traffic(dest, src, lv, stages, dedup=False),
                              lv, costs, wire)

        def link(rows, l, first):  # a level-l link carries the rows of every rank below it
            return sum(rows[r][l] for r in range(first, first + below[l]))

        def stage_s(send, recv, first):
            return costs.alpha[first] + max(costs.beta[l] * max(link(send, l, f), link(recv, l, f))
                                            for l in range(3) for f in range(0, 8, below[l]))

        def scaled(a, b, x, y):  # per rank and level: a * x + b * y
            return [[a[r][l] * x + (b[r][l] * y if b else 0) for l in range(3)] for r in range(8)]

        times = []
        for d in (1, 2, 3):
            st = stages_for_depth(lv, d)
            rs, rr = simulate(dest, src, lv, st)
            ps, pr = simulate(dest, src, lv, st, dedup=False)
            t = costs.alpha[0] + sum(costs.alpha[x.first] for x in st[1:]) + costs.overhead[d - 1]
            for i, x in enumerate(st):
                ids = 1 if below[x.last] * wire.experts_per_rank < 256 else 2
                row = wire.feature + wire.slots * wire.weight + math.ceil(wire.slots * ids / wire.weight) * wire.weight
                row = row + (-row) % 16  # padded to 16 bytes (features and weights are whole elements)
                t += stage_s(scaled(rs[i], None, row, 0), scaled(rr[i], None, row, 0), x.first)
                t += stage_s(scaled(rs[i], None, wire.feature, 0), scaled(rr[i], None, wire.feature, 0), x.first)
            times.append(t)
        fs, fr = simulate(dest, src, lv, (Stage(0, 2),), dedup=False)
        flat = costs.alpha[0] + 2 * stage_s(scaled(fs[0], None, wire.feature, 0), scaled(fr[0], None, wire.feature, 0), 0)
        best = min((1, 2, 3), key=lambda d: (times[d - 1], d))
        assert choice.depth == (0 if flat <= times[best - 1] else best)
        assert choice.predicted_s == pytest.approx(times, rel=1e-12)
        assert choice.flat_s == pytest.approx(flat, rel=1e-12)


def test_fixed_cost_keeps_top2_flat_and_grouped_top8_hierarchical():
    """With a profile whose fixed cost per d is large (10 ms per stage), 2 nodes x 4 GPUs, 64
    experts, bf16 rows of 4096, 4096 tokens per GPU: top-2 uniform routing has too little to
    dedup to pay for it (flat), top-8 limited to 4 of 8 groups moves hundreds of MB less
    across the nodes (hierarchical); without the fixed cost both go hierarchical."""
    from fsmoe.bench.dispatch import make_ids
    from fsmoe.schedule.model.profile import LinearFit, Profile

    lv = Levels((2, 4), ("node", "gpu"))
    fits = {"a2a_level0": LinearFit(30e-6, 1 / 25e9), "a2a_level1": LinearFit(10e-6, 1 / 200e9),
            "hier_overhead_d1": LinearFit(10e-3, 0.0), "hier_overhead_d2": LinearFit(20e-3, 0.0)}
    costs = LevelCosts.from_profile(Profile("test", "2x4", fits), lv)
    assert costs.overhead == (10e-3, 20e-3)
    wire = Wire(4096 * 2, 2, 8)
    stages = candidate_stages(lv)
    for kind, K, expect in (("uniform", 2, 0), ("grouped", 8, None)):
        ids = torch.cat([make_ids(kind, 4096, 64, K, r) for r in range(8)])
        dest, src = ids // 8, torch.arange(8).repeat_interleave(4096)
        rows, pairs = count_traffic(dest, src, lv, stages), count_traffic(dest, src, lv, stages, dedup=False)
        choice = choose_depth(rows, pairs, lv, costs, wire)
        if expect == 0:
            assert choice.depth == 0, choice
        else:
            assert choice.depth >= 1 and min(choice.predicted_s) + 10e-3 < choice.flat_s, choice
        free = LevelCosts(costs.alpha, costs.beta, (0.0, 0.0))
        assert choose_depth(rows, pairs, lv, free, wire).depth >= 1
        assert choose_depth(rows, pairs, lv, costs, wire, allow_flat=False).depth >= 1


def test_dedup_halves_inter_node_rows_for_group_limited_top8():
    """DeepSeek-V3-like: 256 experts in 8 groups (one per node), each token in 4 groups, top-8."""
    lv = Levels((8, 4), ("node", "gpu"))
    T, g = 2048, torch.Generator().manual_seed(0)
    scores = torch.rand(T, 8, 32, generator=g)
    top_groups = scores.topk(2, -1).values.sum(-1).topk(4, -1).indices
    masked = torch.full_like(scores, -1.0).scatter(1, top_groups.unsqueeze(-1).expand(T, 4, 32),
                                                    scores.gather(1, top_groups.unsqueeze(-1).expand(T, 4, 32)))
    experts = masked.view(T, 256).topk(8, -1).indices
    dest, src = experts // 8, torch.randint(0, 32, (T,), generator=g)
    flat = count_traffic(dest, src, lv, (Stage(0, 1),), dedup=False)
    hier = count_traffic(dest, src, lv, stages_for_depth(lv, 2))
    assert flat.rows_per_level()[0] >= 2 * hier.rows_per_level()[0]


def test_swap_scores_match_brute_force():
    lv = Levels((2, 2))
    costs = LevelCosts((1e-5, 2e-6), (1e-9, 1e-10))
    for seed, dedup, d in ((0, True, 2), (1, True, 1), (2, False, 2)):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 8, (30, 3), generator=g)
        ids[torch.rand(30, 3, generator=g) < 0.1] = -1
        ids[:, 1] = torch.where(ids[:, 1] == ids[:, 0], -1, ids[:, 1])
        ids[:, 2] = torch.where((ids[:, 2] == ids[:, 0]) | (ids[:, 2] == ids[:, 1]), -1, ids[:, 2])
        src = torch.randint(0, 4, (30,), generator=g)
        placement = Placement.contiguous(8, 4).swap(0, 5)
        stages = stages_for_depth(lv, d)
        fast = hierd_scores(ids, src, placement, lv, stages, costs, 4096, gamma=10.0, dedup=dedup, chunk_entries=500)
        slow = brute_force_scores(ids, src, placement, lv, stages, costs, 4096, gamma=10.0, dedup=dedup)
        finite = torch.isfinite(slow.scores_EE)
        assert torch.equal(finite, torch.isfinite(fast.scores_EE))
        assert torch.allclose(fast.scores_EE[finite], slow.scores_EE[finite], rtol=1e-12)
        assert fast.pair == slow.pair and fast.before_s == pytest.approx(slow.before_s)


def test_token_swap_balances_raw_counts():
    ids = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 0]])  # experts 0, 1 on rank 0 carry everything
    choice = token_scores(ids, Placement.contiguous(4, 2), gamma=None)
    assert choice.pair in ((0, 2), (0, 3), (1, 2), (1, 3)) and choice.after_s < choice.before_s
    assert rank_of(Placement.contiguous(4, 2)).tolist() == [0, 0, 1, 1]


def test_predict_and_select():
    lv = Levels((2, 2))
    dest, src = routing(10, 2, 4, 0)
    tr = count_traffic(dest, src, lv, candidate_stages(lv))
    costs = LevelCosts.defaults(lv)
    d1 = predict(select(tr, stages_for_depth(lv, 1)), costs, 1024)
    busy = torch.maximum(tr.send[0], tr.recv[0])  # [P, L] of the flat stage; a node link serves 2 ranks
    assert d1 == pytest.approx(2 * (costs.alpha[0] + 1024 * max(costs.beta[0] * busy[:, 0].view(2, 2).sum(1).max(),
                                                                   costs.beta[1] * busy[:, 1].max()).item()))


def test_ep_levels_and_stage_groups():
    assert ep_levels((2, 2, 2), 8, 1).sizes == (2, 2, 2)
    assert ep_levels((2, 2, 2), 4, 2).sizes == (2, 2)
    assert ep_levels((2, 2, 2), 4, 2).names == ("node", "socket")
    assert ep_levels((2, 2, 2), 2, 1).sizes == (2,)  # EDP 4 replicas of an EP group inside a socket
    assert ep_levels((2, 4), 4, 2).sizes == (2, 2)
    with pytest.raises(ValueError, match="parallel.topology"):
        ep_levels((3, 2), 4, 1)
    lv = Levels((2, 2, 2))
    assert lv.stage_groups(Stage(0, 0)) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert lv.stage_groups(Stage(1, 2)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert lv.stage_groups(Stage(1, 1)) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    with pytest.raises(ValueError, match="dedup depth d=4"):
        stages_for_depth(lv, 4)


NVIDIA_TOPO = """\tGPU0\tGPU1\tGPU2\tGPU3\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID
GPU0\t X \tNV18\tSYS\tSYS\t0-47\t0\t\tN/A
GPU1\tNV18\t X \tSYS\tSYS\t0-47\t0\t\tN/A
GPU2\tSYS\tSYS\t X \tNV18\t48-95\t1\t\tN/A
GPU3\tSYS\tSYS\tNV18\t X \t48-95\t1\t\tN/A
"""


def test_topology_detection_and_errors():
    assert sockets_per_node(4, NVIDIA_TOPO) == 2
    assert sockets_per_node(2, NVIDIA_TOPO) == 1
    assert sockets_per_node(4, "no table") == 1
    assert Topology.detect(8, None, [2, 2, 2]).ranks_per_node == 4
    with pytest.raises(ConfigError, match="parallel.topology"):
        Topology.detect(8, None, [2, 2])
    for bad, field in ((["parallel.topology=[0, 2]"], "parallel.topology"),
                       (["parallel.topology=[1,1,1,1,1]"], "parallel.topology"),
                       (["parallel.topology=[2, 4]", "parallel.gpus_per_node=2"], "parallel.gpus_per_node"),
                       (["model.moe.dedup_depth=5"], "model.moe.dedup_depth"),
                       (["model.moe.dedup_every=0"], "model.moe.dedup_every"),
                       (["parallel.swap_policy='random'"], "parallel.swap_policy"),
                       (["parallel.expert_swap_every=-1"], "parallel.expert_swap_every"),
                       (["model.moe.dispatcher='hierarchical'", "parallel.schedule='fsmoe'"], "model.moe.dispatcher"),
                       (["model.moe.dispatcher='2dh'", "model.moe.router.name='softmoe'",
                         "model.moe.router.allow_noncausal=true"], "model.moe.dispatcher"),
                       (["model.moe.dispatcher='2dh'", "parallel.expert_swap_every=2"], "parallel.expert_swap_every"),
                       (["model.moe.dispatcher='mesh'"], "model.moe.dispatcher")):
        with pytest.raises(ConfigError) as e:
            load_config("tiny", bad)
        assert e.value.field_name == field, (bad, e.value)
    assert load_config("tiny", ["parallel.topology=[2, 2, 2]", "model.moe.dispatcher='hierarchical'"])


def test_layout_errors_name_the_field():
    """EP cutting a level, and a depth deeper than the EP group's levels, fail at build time."""
    from fsmoe.config import MoEConfig
    from fsmoe.parallel.groups import ParallelGroups
    from fsmoe.parallel.layout import Layout
    from fsmoe.parallel.levels import levels_of
    from fsmoe.parallel.moe import build_dispatcher

    cut = ParallelGroups(Layout(dp=12, ep=6), 0, Topology(12, 4, (3, 4)), "gloo")
    with pytest.raises(ConfigError) as e:
        levels_of(cut)
    assert e.value.field_name == "parallel.topology"
    two = ParallelGroups(Layout(dp=8, ep=8), 0, Topology(8, 4, (2, 4)), "gloo")
    assert levels_of(two).sizes == (2, 4)
    with pytest.raises(ConfigError) as e:
        build_dispatcher(MoEConfig(num_experts=16, dispatcher="hierarchical", dedup_depth=3), two)
    assert e.value.field_name == "model.moe.dedup_depth"


def test_calibrated_choice_adds_what_each_path_measured_beyond_the_model():
    from fsmoe.comm.calibration import Trial
    from fsmoe.comm.hierarchical import DepthPolicy
    from fsmoe.comm.traffic import DepthChoice

    policy = DepthPolicy(calibrate=2)
    # the model says flat (5.9 ms) beats d = 1 (8.3 ms); d = 2 is worse still
    choice = DepthChoice(0, (8.3e-3, 9.0e-3), 5.9e-3)
    for flat_ms, hier_ms in ((40.0, 30.0), (15.3, 12.6)):  # the first of each path is cold
        assert policy.depth(choice) == 0 and policy.calibrating()
        policy.calibration.done.append(Trial("flat", 5.9e-3, 0.0, flat_ms * 1e-3))
        assert policy.depth(choice) == 1  # the model's best d, timed next
        policy.calibration.done.append(Trial("hier", 8.3e-3, 0.0, hier_ms * 1e-3))
    assert policy.calibration.complete()
    policy.calibrated(torch.device("cpu"))
    assert policy.calibration.offset_s == pytest.approx({"flat": 9.4e-3, "hier": 4.3e-3})
    assert not policy.calibrating() and policy.depth(choice) == 1  # 15.3 ms flat vs 12.6 ms
    small = DepthChoice(0, (8.0e-3, 9.0e-3), 1.0e-3)  # top-2 uniform: flat stays (10.4 ms vs 12.3 ms)
    assert policy.depth(small) == 0
    # a small layer: the model prices flat at microseconds, d = 1 at its fixed cost; the trials
    # also time the experts between dispatch and combine (1 ms on both paths). A ratio would
    # scale flat's 20 us by ~75 and pick d = 1; the offsets keep flat.
    tiny = DepthPolicy(every=10, calibrate=1)
    tiny_choice = DepthChoice(0, (4.7e-3,), 2e-5)
    tiny.depth(tiny_choice)
    tiny.calibration.done.append(Trial("flat", 2e-5, 0.0, 1.5e-3))
    assert tiny.depth(tiny_choice) == 1  # the last trial's path ...
    tiny.calibration.done.append(Trial("hier", 4.7e-3, 0.0, 6.0e-3))
    tiny.calibrated(torch.device("cpu"))
    assert tiny.depth(tiny_choice) == 0  # ... is not kept for `every` dispatches: chosen at once
    assert DepthPolicy(fixed=1, calibrate=2).calibration is None  # a fixed d is never calibrated
