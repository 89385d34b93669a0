"""Pieces of fsmoe.parallel that need no processes (layout arithmetic, split sizes, regrouping,
CLI flags), and the differentiable collectives on 3 real processes with uneven, empty splits.

Shape legend: P EP ranks, S ESP ranks, E experts, El local experts, D feature dim.
"""
from __future__ import annotations

import argparse

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_workers
from fsmoe.comm import functional as C
from fsmoe.comm.layout import DispatchLayout, from_expert_major, to_expert_major
from fsmoe.config import ConfigError, ParallelConfig, load_config
from fsmoe.parallel.groups import Layout
from fsmoe.parallel.launch import add_parallel_arguments, parallel_overrides, strip_flag
from fsmoe.parallel.sharding import ParamSharding
from fsmoe.parallel.topology import Topology

# ---------------------------------------------------------------- layout arithmetic


def test_groups_of_dp2_mp2_ep2_esp2():
    lay = Layout(dp=2, mp=2, ep=2, esp=2)
    assert lay.all_groups("mp") == [[0, 1], [2, 3]] == lay.all_groups("esp")  # ESP = MP, inside a node
    assert lay.all_groups("dp") == [[0, 2], [1, 3]] == lay.all_groups("ep")
    assert lay.all_groups("edp") == [[0], [1], [2], [3]] and lay.all_groups("moe") == [[0, 1, 2, 3]]
    assert lay.coords(3) == lay.coords(3).__class__(dp=1, mp=1, edp=0, ep=1, esp=1)


def test_expert_data_parallel_when_ep_esp_smaller_than_world():
    lay = Layout(dp=4, mp=2, ep=2, esp=2)  # world 8: edp 2
    assert lay.edp == 2
    assert lay.all_groups("edp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert lay.all_groups("ep") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    for kind in ("dp", "mp", "ep", "esp", "edp", "moe"):  # each kind partitions the world
        assert sorted(r for g in lay.all_groups(kind) for r in g) == list(range(8))


@pytest.mark.parametrize("cfg,world,field", [
    (dict(dp=3, ep=3), 3, "parallel.ep"),  # EP=3 does not divide num_experts=8
    (dict(dp=2, mp=2), 2, "parallel.dp*mp"),
    (dict(ep=4), 2, "parallel.ep*esp"),
])
def test_bad_layouts_name_the_field(cfg, world, field):
    with pytest.raises(ConfigError) as e:
        pc = ParallelConfig(**cfg)
        pc.validate(num_experts=8)
        Layout.from_config(pc, world)
    assert e.value.field_name == field


def test_dp_is_filled_from_the_process_count():
    assert Layout.from_config(ParallelConfig(ep=4), 4) == Layout(dp=4, ep=4)
    assert Layout.from_config(ParallelConfig(mp=2, ep=2, esp=2), 4) == Layout(dp=2, mp=2, ep=2, esp=2)


def test_topology_simulated_nodes():
    topo = Topology(world=4, ranks_per_node=2)
    assert topo.num_nodes == 2 and topo.node_of(3) == 1 and topo.ranks_on_node(1) == [2, 3]
    with pytest.raises(ConfigError):
        Topology(world=4, ranks_per_node=3)


def test_sharding_owner_counts_each_shard_once():
    class G:  # a stand-in for ParallelGroups: layout + rank
        def __init__(self, layout, rank):
            self.layout, self.rank, self.world = layout, rank, layout.world
            self.coords = layout.coords(rank)

    lay = Layout(dp=2, mp=2, ep=2, esp=2)
    expert = ParamSharding("edp", ((0, "ep"), (2, "esp")))
    tp = ParamSharding("dp", ((0, "mp"),))
    assert [expert.is_owner(G(lay, r)) for r in range(4)] == [True] * 4  # edp = 1: every shard distinct
    assert [tp.is_owner(G(lay, r)) for r in range(4)] == [True, True, False, False]  # dp_rank 0 of each
    assert [ParamSharding().is_owner(G(lay, r)) for r in range(4)] == [True, False, False, False]


# ---------------------------------------------------------------- split sizes and regrouping


def test_dispatch_layout_hand_worked():
    # P=2 EP ranks x S=2 ESP ranks, E=4 experts (El=2). counts[p][s][e] = rows (p, s) sends to e.
    counts = [[[1, 0, 2, 3], [0, 4, 0, 1]],
              [[2, 2, 0, 0], [5, 0, 1, 1]]]
    lay = DispatchLayout.from_counts(counts, ep_rank=1, esp_rank=0)  # holds experts 2, 3, f-shard 0
    assert lay.num_sent == 4 and lay.send_splits_P == (4, 0)  # own counts [2, 2, 0, 0]: all to EP rank 0
    assert lay.recv_splits_P == (5, 0)  # from (0,0): 2+3 rows; from (1,0): 0
    assert lay.gather_sizes_S == (5, 3)  # ESP peer 1 = (1,1) received 0+1 from (0,1), 1+1 from (1,1)
    assert lay.blocks_SPEl == (((2, 3), (0, 0)), ((0, 1), (1, 1)))
    assert lay.tokens_per_local_expert_El == (3, 5)


def test_regroup_to_expert_major_and_back():
    counts = [[[1, 0, 2, 3], [0, 4, 0, 1]], [[2, 2, 0, 0], [5, 0, 1, 1]]]
    lay = DispatchLayout.from_counts(counts, ep_rank=1, esp_rank=0)
    # gathered rows labelled by (s, p, e) block: blocks (0,0,e2)x2 (0,0,e3)x3 (1,0,e3)x1 (1,1,e2)x1 (1,1,e3)x1
    labels = ["s0p0e2"] * 2 + ["s0p0e3"] * 3 + ["s1p0e3"] + ["s1p1e2"] + ["s1p1e3"]
    x = torch.arange(len(labels), dtype=torch.float32).unsqueeze(1)
    y = to_expert_major(x, lay)
    assert [labels[int(v)] for v in y[:, 0]] == ["s0p0e2"] * 2 + ["s1p1e2"] + ["s0p0e3"] * 3 + ["s1p0e3", "s1p1e3"]
    assert torch.equal(from_expert_major(y, lay), x)


# ---------------------------------------------------------------- CLI flags


def _args(argv):
    p = argparse.ArgumentParser()
    add_parallel_arguments(p)
    return p.parse_args(argv)


def test_parallel_flags_become_overrides(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert parallel_overrides(_args(["--nproc", "4", "--ep", "4"])) == ["parallel.dp=4", "parallel.ep=4"]
    assert parallel_overrides(_args(["--nproc", "4", "--mp", "2", "--gpus-per-node", "2"])) == [
        "parallel.dp=2", "parallel.mp=2", "parallel.gpus_per_node=2"]
    assert parallel_overrides(_args([])) == []
    cfg = load_config("tiny", parallel_overrides(_args(["--nproc", "4", "--ep", "4"])))
    assert (cfg.parallel.dp, cfg.parallel.ep) == (4, 4)


def test_strip_flag():
    assert strip_flag(["train", "--nproc", "4", "--ep", "4"], "--nproc") == ["train", "--ep", "4"]
    assert strip_flag(["train", "--nproc=4", "--steps", "2"], "--nproc") == ["train", "--steps", "2"]


# ---------------------------------------------------------------- collectives (3 processes)


def _collectives(rank, world):
    """Uneven AlltoAll / AllGather / ReduceScatter (both impls), forward and backward, against
    references built from all_gather_object."""
    g = torch.Generator().manual_seed(0)
    splits = torch.randint(0, 4, (world, world), generator=g)  # splits[src][dst] rows
    splits[1] = 0  # rank 1 sends nothing
    splits[:, 2] = 0  # rank 2 receives nothing
    D = 3
    x = torch.randn(int(splits[rank].sum()), D, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    everyone = [None] * world
    dist.all_gather_object(everyone, x.detach())
    errs = {}
    # AlltoAll: y = rows from each source, rank-major; d(sum(y * w))/dx = w routed back.
    y = C.finish(C.launch_all_to_all(x, splits[:, rank].tolist(), splits[rank].tolist(), None))
    want = torch.cat([everyone[s].split(splits[s].tolist())[rank] for s in range(world)])
    (y * (y.detach() + 1)).sum().backward()
    errs["a2a"] = (y - want).abs().max().item() if want.numel() else float(y.numel())
    errs["a2a_grad"] = (x.grad - (x.detach() + 1)).abs().max().item() if x.numel() else 0.0
    sizes = [2, 0, 3]
    for impl in ("native", "alltoall"):
        xr = torch.randn(sizes[rank], D, generator=torch.Generator().manual_seed(10 + rank), requires_grad=True)
        allx = [None] * world
        dist.all_gather_object(allx, xr.detach())
        gathered = C.finish(C.launch_all_gather(xr, sizes, None, impl))
        errs[f"ag_{impl}"] = (gathered - torch.cat(allx)).abs().max().item()
        gathered.sum().backward()  # each rank's rows are used by all 3 ranks
        errs[f"ag_grad_{impl}"] = (xr.grad - world).abs().max().item() if xr.numel() else 0.0
        yg = torch.full((sum(sizes), D), float(rank + 1), requires_grad=True)
        mine = C.finish(C.launch_reduce_scatter(yg, sizes, None, impl))
        errs[f"rs_{impl}"] = (mine - sum(range(1, world + 1))).abs().max().item() if mine.numel() else 0.0
        assert mine.shape == (sizes[rank], D)
        (mine * 2).sum().backward()
        errs[f"rs_grad_{impl}"] = (yg.grad - 2).abs().max().item()
    return errs


def test_collectives_uneven_and_empty_on_three_ranks():
    for rank, errs in enumerate(run_workers(_collectives, 3, timeout_s=120)):
        assert all(v < 1e-6 for v in errs.values()), (rank, errs)


# ---------------------------------------------------------------- sharded optimizer: gradient slices


@pytest.mark.parametrize("shape, dim, n", [((7, 4), 0, 3), ((6, 5), 0, 2), ((3, 8, 2), 1, 4)])
def test_reduce_scatter_rows_are_the_all_gathers_layout(shape, dim, n):
    """Row r of the reduce-scatter's input holds rank r's slice of the gradient (torch.chunk's
    pieces, the uneven last one zero-padded), in the layout the weights' all_gather unpacks: so
    summing rows over ranks and gathering them back gives the parameter's shape again."""
    from fsmoe.parallel.zero import ZeroAdamW, ZeroSlice, _Bucket, _Entry
    from fsmoe.parallel.zero_grads import _rank_rows

    zs = ZeroSlice("dp", dim, n, 0, shape[dim])
    piece = tuple(zs.chunk if d == dim else s for d, s in enumerate(shape))
    param = torch.nn.Parameter(torch.zeros(shape))
    e = _Entry(param, zs, 0, piece)
    grad = torch.arange(param.numel(), dtype=torch.float32).view(shape) + 1
    inp = torch.full((n, e.seg), float("nan"))
    _rank_rows(e, grad, inp)
    for r, expect in enumerate(torch.chunk(grad, n, dim)):
        mine = _Entry(param, ZeroSlice("dp", dim, n, r, shape[dim]), 0, piece)
        assert torch.equal(mine.view(inp[r]), expect)  # this rank's slice, where the optimizer reads it
    assert not inp.isnan().any()  # the padding is zeros, not garbage summed by the collective
    import types

    with torch.no_grad():
        opt = types.SimpleNamespace(buckets=[_Bucket("dp", [e], e.seg, None, None)], full=False)
        ZeroAdamW._unpack(opt, 0, inp.reshape(-1))
    assert torch.equal(param.detach(), grad)


def test_weight_gathers_start_one_block_ahead_of_the_forward(monkeypatch):
    """After the step only the first blocks' all_gathers start; each block's forward starts the
    next block's and waits for its own (rank 0 of DP2, collectives replaced by a log)."""
    from fsmoe.models import build_model
    from fsmoe.parallel.groups import ParallelGroups
    from fsmoe.parallel.topology import Topology
    from fsmoe.parallel.zero import ZeroAdamW

    cfg = load_config("tiny", ["model.n_layers=4", "model.moe.num_experts=4"]).model
    model = build_model(cfg, seed=0)
    groups = ParallelGroups(Layout(dp=2), 0, Topology(2, 2), "gloo")
    opt = ZeroAdamW([{"params": list(model.parameters())}], groups, bucket_elements=1, lr=1e-3)  # a bucket each
    opt.overlap_with(model)
    log: list[tuple[str, int]] = []
    monkeypatch.setattr(opt, "_launch", lambda i: (log.append(("start", i)), opt._pending.__setitem__(i, None)))
    monkeypatch.setattr(opt, "_finish", lambda which: [log.append(("wait", i)) for i in which
                                                        if opt._pending.pop(i, "done") != "done"])
    blocks = opt._gather_order  # each block's buckets, in the order the forward reaches the blocks
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    started = {i for w in blocks[:2] for i in w} | (set(range(len(opt.buckets))) - {i for w in blocks for i in w})
    assert sorted(i for _, i in log) == sorted(started) and all(kind == "start" for kind, _ in log)
    log.clear()
    expected, pending = [], set(started)
    for k, mine in enumerate(blocks):  # block k: start its own and block k+1's, then wait for its own
        for i in mine + (blocks[k + 1] if k + 1 < len(blocks) else []):
            if i not in started:
                expected.append(("start", i))
                started.add(i)
                pending.add(i)
        expected += [("wait", i) for i in mine if i in pending]
        pending -= set(mine)
    model(torch.zeros(1, 4, dtype=torch.long))
    assert log == expected and len(blocks) >= 4
    assert not opt._unstarted and not opt._pending


# ---------------------------------------------------------------- sharded weights (shard = "full")


def _zero3_holds(rank, world):
    from fsmoe.models import build_model
    from fsmoe.parallel.groups import build_groups
    from fsmoe.parallel.tensor_parallel import parallelize
    from fsmoe.parallel.zero import ZeroAdamW

    cfg = load_config("tiny", ["model.n_layers=3", "model.moe.num_experts=4"]).model
    groups = build_groups(ParallelConfig(dp=2))
    model = parallelize(build_model(cfg, seed=0), groups)
    opt = ZeroAdamW([{"params": list(model.parameters())}], groups, lr=1e-3, weights_of=model)
    opt.overlap_with(model)

    def held(m) -> int:
        return sum(p.untyped_storage().nbytes() for p in m.parameters())

    whole = [held(b) for b in model.layers]
    seen = []  # what each block holds as its forward starts, and as its backward starts
    for k, blk in enumerate(model.layers):
        blk.register_forward_pre_hook(lambda m, a, k=k: seen.append(("forward", k, held(m))))
        blk.register_forward_hook(lambda m, a, out, k=k: [out[0].register_hook(
            lambda g, m=m, k=k: seen.append(("backward", k, held(m))))] and None)
    out = model(torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(rank)))
    after_forward = [held(b) for b in model.layers]
    (out.logits.float().square().mean() + out.aux_loss).backward()
    after_backward = [held(b) for b in model.layers]
    opt.finish_gathers()
    return whole, seen, after_forward, after_backward, [held(b) for b in model.layers], held(model.lm_head)


def test_sharded_weights_are_whole_only_while_their_block_runs():
    """shard = "full", DP2: each block holds its whole weights as its forward starts, none after
    it, again whole when its backward starts (the hook runs after the freeing one), and after
    backward only the first block's remain until the next forward; the head is never freed."""
    for whole, seen, after_forward, after_backward, gathered, head in run_workers(_zero3_holds, 2, timeout_s=120):
        assert all(n > 0 for n in whole) and head > 0
        forward = [(k, n) for kind, k, n in seen if kind == "forward"]
        backward = [(k, n) for kind, k, n in seen if kind == "backward"]
        assert forward == list(enumerate(whole)) and backward == list(enumerate(whole))[::-1]
        assert after_forward == [0, 0, 0] and after_backward == [whole[0], 0, 0]
        assert gathered == whole


# ---------------------------------------------------------------- a model built shard by shard


def _built_by_shards(rank, world, par):
    from test_dist_layouts import model_cfg

    from fsmoe.models import build_model
    from fsmoe.parallel.build import build_sharded_model
    from fsmoe.parallel.groups import build_groups
    from fsmoe.parallel.sharding import tags_of
    from fsmoe.parallel.tensor_parallel import parallelize

    groups = build_groups(ParallelConfig(**par))
    out = {}
    for kind in ("gpt", "deepseek"):
        cfg = model_cfg(kind)
        whole = parallelize(build_model(cfg, seed=3), groups)
        sharded = build_sharded_model(cfg, groups, torch.device("cpu"), seed=3)
        a = dict(whole.named_parameters()) | dict(whole.named_buffers())
        b = dict(sharded.named_parameters()) | dict(sharded.named_buffers())
        x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(rank))
        out[kind] = {"names": sorted(a) == sorted(b), "tags": tags_of(whole) == tags_of(sharded),
                     "differ": [n for n in a if not torch.equal(a[n], b[n])],
                     "meta left": [n for n, t in b.items() if t.is_meta],
                     "logits": (whole(x).logits - sharded(x).logits).abs().max().item()}
    return out


@pytest.mark.parametrize("par", [{"dp": 4, "ep": 2, "esp": 2}, {"mp": 2, "ep": 2, "gpus_per_node": 2},
                                 {"dp": 2, "mp": 2, "ep": 2, "esp": 2, "gpus_per_node": 2}])
def test_a_model_built_shard_by_shard_holds_what_parallelize_gives(par):
    """fsmoe.parallel.build: built on the meta device and materialised per rank, every parameter
    and buffer equals the slice parallelize takes from the whole one-process model, carries the
    same sharding tag, and the logits are the same."""
    world = par.get("dp", 1) * par.get("mp", 1)
    for res in run_workers(_built_by_shards, world, par, timeout_s=120):
        for kind, r in res.items():
            assert r["names"] and not r["differ"] and not r["meta left"] and r["logits"] == 0.0, (kind, r)
            assert r["tags"], (kind, r)  # every parameter keeps its layout's sharding
