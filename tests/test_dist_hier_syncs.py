"""Host syncs and collectives of the hierarchical dispatcher when its cost model picks the
flat AlltoAll (d = 0), against the flat dispatcher itself: 2 gloo ranks as 2 nodes.

A host sync is counted as an op that makes the host wait for a GPU (``.item()``, ``nonzero``,
``unique``, ``bincount``, masked indexing, ``repeat_interleave`` without an output size, each
read of a tensor's values into Python with ``tolist`` / ``cpu``), a collective as a call into
``torch.distributed``. One forward + backward of a MoE layer, every dispatch choosing again
(``dedup_every`` 1) and then one keeping the choice: at most one sync and no collective more
than the flat dispatcher."""
from __future__ import annotations

import collections

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dist_utils import run_workers
from fsmoe.comm import functional, hierarchical, layout
from fsmoe.comm.topology import LevelCosts
from fsmoe.config import ExpertsConfig, MoEConfig, ParallelConfig, RouterConfig
from fsmoe.parallel.groups import build_groups
from fsmoe.parallel.moe import ParallelMoELayer

pytestmark = pytest.mark.dist
SYNC_OPS = {"nonzero", "_local_scalar_dense", "unique_consecutive", "_unique2", "unique_dim", "bincount",
            "masked_select", "repeat_interleave"}
# also counted on host tensors the CPU test cannot tell apart (the cost model's math after the
# one read); checked for the kept choice, which must equal flat exactly
HOST_MATH = ("sync:tolist", "sync:_local_scalar_dense", "sync:item")
COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "all_gather", "all_to_all_single", "all_to_all",
               "reduce_scatter_tensor", "broadcast")


class Counter(TorchDispatchMode):
    """Counts host syncs (see the module docstring) and collectives while active."""

    def __init__(self):
        super().__init__()
        self.n = collections.Counter()
        self._saved = []
        self._host = {}  # id -> tensor: values already on the host (read by ``cpu``, or made from such)

    def _on_host(self, t) -> bool:
        return id(t) in self._host

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        ins = [a for a in tree_flatten((args, kwargs or {}))[0] if isinstance(a, torch.Tensor)]
        # made from host values only (or from none: a factory, e.g. the cost model's tensors)
        host = all(self._on_host(t) for t in ins)
        if not host:
            if name in SYNC_OPS and not (name == "repeat_interleave" and (kwargs or {}).get("output_size")):
                self.n["sync:" + name] += 1
            if name == "index" and any(t is not None and t.dtype == torch.bool for t in args[1]):
                self.n["sync:bool_index"] += 1
        out = func(*args, **(kwargs or {}))
        if host:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._host[id(t)] = t
        return out

    def __enter__(self):
        for name in ("tolist", "cpu", "item"):
            orig = getattr(torch.Tensor, name)
            self._saved.append((torch.Tensor, name, orig))
            setattr(torch.Tensor, name, self._wrap("sync:" + name, orig))
        for name in COLLECTIVES:
            orig = getattr(dist, name)
            self._saved.append((dist, name, orig))
            setattr(dist, name, self._wrap("coll:" + name, orig))
        for mod in (functional, layout, hierarchical):  # imported by name there
            orig = mod.all_gather_base
            self._saved.append((mod, "all_gather_base", orig))
            mod.all_gather_base = self._wrap("coll:all_gather", orig)
        return super().__enter__()

    def __exit__(self, *exc):
        for owner, name, orig in self._saved:
            setattr(owner, name, orig)
        return super().__exit__(*exc)

    def _wrap(self, key, orig):
        def call(*a, **k):
            if not (a and isinstance(a[0], torch.Tensor) and self._on_host(a[0])):
                self.n[key] += 1
            out = orig(*a, **k)
            if key == "sync:cpu":
                self._host[id(out)] = out
            return out
        return call

    def totals(self) -> tuple[int, int, dict]:
        syncs = sum(v for k, v in self.n.items() if k.startswith("sync:"))
        return syncs, sum(v for k, v in self.n.items() if k.startswith("coll:")), dict(self.n)


def counts(layer, x) -> tuple[int, int, dict]:
    x = x.clone().requires_grad_(True)
    with Counter() as c:
        y, stats = layer(x)
        (y.sum() + stats.aux_loss).backward()
    return c.totals()


def worker(rank: int, world: int, every: int) -> dict:
    torch.set_num_threads(1)
    groups = build_groups(ParallelConfig(dp=2, ep=2, topology=[2]))
    base = MoEConfig(num_experts=8, router=RouterConfig(top_k=2), experts=ExpertsConfig(d_ff=8, activation="gelu"),
                     dispatcher="alltoall")
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(rank))
    torch.manual_seed(0)
    flat = ParallelMoELayer(base, 8, groups)
    torch.manual_seed(0)
    hier = ParallelMoELayer(MoEConfig(**{**base.__dict__, "dispatcher": "hierarchical", "dedup_every": every,
                                         "dedup_calibrate": 0}), 8, groups)  # the model's choice alone
    disp = hier.dispatcher
    disp.costs = LevelCosts(disp.costs.alpha, disp.costs.beta, (1.0,) * len(disp.costs.alpha))  # flat always wins
    out = {"flat": counts(flat, x), "auto": counts(hier, x), "kept": counts(hier, x)}
    out["depth"] = disp.last_stats.depth
    return out


@pytest.mark.parametrize("every", [1, 2])
def test_auto_choosing_flat_costs_at_most_one_sync_more_than_flat(every):
    res = run_workers(worker, 2, every, timeout_s=120)
    for r in res:
        assert r["depth"] == 0
        fs, fc, fd = r["flat"]
        for case in ("auto", "kept"):
            s, c, d = r[case]
            assert c <= fc, (case, d, fd)
            dev = lambda n: sum(v for k, v in n.items() if k.startswith("sync:") and k not in HOST_MATH)
            assert dev(d) <= dev(fd) + 1, (case, d, fd)
        if every > 1:  # the kept choice runs the flat dispatcher alone
            assert r["kept"][:2] == r["flat"][:2], (r["kept"], r["flat"])


def two_node_layer(calibrate: int) -> ParallelMoELayer:
    """A hierarchical MoE layer on 2 gloo ranks as 2 nodes (d_model 8, 8 experts, top-2)."""
    torch.set_num_threads(1)
    groups = build_groups(ParallelConfig(dp=2, ep=2, topology=[2]))
    cfg = MoEConfig(num_experts=8, router=RouterConfig(top_k=2), experts=ExpertsConfig(d_ff=8, activation="gelu"),
                    dispatcher="hierarchical", dedup_calibrate=calibrate)
    torch.manual_seed(0)
    return ParallelMoELayer(cfg, 8, groups)


def calibration_worker(rank: int, world: int) -> dict:
    layer = two_node_layer(calibrate=2)
    disp = layer.dispatcher
    depths = []
    for step in range(6):
        x = torch.randn(16, 8, generator=torch.Generator().manual_seed(10 * step + rank), requires_grad=True)
        y, stats = layer(x)
        (y.sum() + stats.aux_loss).backward()
        depths.append(disp.last_stats.depth)
    cal = disp.policy.calibration
    return {"depths": depths, "offset_s": cal.offset_s, "trials": [(t.path, t.seconds() > 0) for t in cal.done]}


def test_calibration_alternates_paths_then_every_rank_offsets_the_same():
    """Four timed dispatches (flat, d = 1, flat, d = 1), then one AllReduce of the offsets: both
    ranks hold the same offsets and keep choosing the same d."""
    res = run_workers(calibration_worker, 2, timeout_s=120)
    assert res[0]["depths"][:4] == [0, 1, 0, 1]
    assert res[0]["trials"] == [("flat", True), ("hier", True)] * 2
    assert res[0]["offset_s"] == res[1]["offset_s"] and set(res[0]["offset_s"]) == {"flat", "hier"}
    assert res[0]["depths"] == res[1]["depths"]


def row_size_worker(rank: int, world: int) -> dict:
    layer = two_node_layer(calibrate=0).to(torch.float64)  # built assuming 4-byte rows
    x = torch.randn(16, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        layer(x)
    names = sorted({e.name for e in prof.events() if e.name.startswith("hier_")})
    return {"row_bytes": layer.dispatcher.last_stats.row_bytes, "ranges": names,
            "depth": layer.dispatcher.last_stats.depth}


def test_the_first_dispatch_is_priced_for_the_rows_it_sends_and_shows_in_a_profile():
    """The cost model prices the paths with x's row size from the first dispatch on (a bf16 run's
    first choice and first calibration trial were priced for fp32 rows); a torch profile shows
    the dispatch and the combine with their d and MB per level."""
    res = run_workers(row_size_worker, 2, timeout_s=120)
    assert [r["row_bytes"] for r in res] == [8 * 8, 8 * 8]
    d = res[0]["depth"]
    assert [n.split(" MB ")[0] for n in res[0]["ranges"]] == [f"hier_combine d={d}", f"hier_dispatch d={d}"]
    assert all(" MB node=" in n for n in res[0]["ranges"])
