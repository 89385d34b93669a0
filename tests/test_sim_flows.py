"""The flow-level fabric simulator against cases computed by hand."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fsmoe.config import ConfigError
from fsmoe.sim.fabrics import GBIT, Flows, LeafSpine
from fsmoe.sim.flows import incidence, max_min_rates, simulate
from fsmoe.sim.patterns import alltoall, from_matrix, incast


def test_single_bottleneck_shares_evenly():
    A = incidence([np.array([0]), np.array([0]), np.array([0])], 1)
    assert max_min_rates(A, np.array([9.0])) == pytest.approx([3.0, 3.0, 3.0])
    assert simulate(A, np.array([9.0]), np.full(3, 6.0)).makespan_s == pytest.approx(2.0)


def test_max_min_gives_the_unconstrained_flow_the_rest():
    # f0 on L0; f1 on L0 and L1; f2 on L1. L1 (4) is the bottleneck: f1 = f2 = 2, then f0 = 10 - 2
    A = incidence([np.array([0]), np.array([0, 1]), np.array([1])], 2)
    assert max_min_rates(A, np.array([10.0, 4.0])) == pytest.approx([8.0, 2.0, 2.0])


def test_a_finished_flow_frees_its_share():
    # two flows on one link of 1 B/s, 1 and 2 bytes: both at 0.5 until t = 2, then the second alone
    A = incidence([np.array([0]), np.array([0])], 1)
    res = simulate(A, np.array([1.0]), np.array([1.0, 2.0]))
    assert res.finish_s == pytest.approx([2.0, 3.0]) and res.events == 2


def test_a_flow_on_no_link_finishes_at_once():
    A = incidence([np.array([], dtype=np.int64), np.array([0])], 1)
    res = simulate(A, np.array([2.0]), np.array([5.0, 4.0]))
    assert res.finish_s == pytest.approx([0.0, 2.0])


def test_ring_of_independent_links():
    # each GPU sends to its neighbour over its own link: no sharing, all done at S / C
    n = 6
    A = incidence([np.array([i]) for i in range(n)], n)
    assert simulate(A, np.full(n, 5.0), np.full(n, 10.0)).makespan_s == pytest.approx(2.0)


def fabric(**kw) -> LeafSpine:
    args = dict(gpus=16, gpus_per_server=1, gpus_per_leaf=4, nic_gbps=8.0, nvlink_gbps=80.0)
    return LeafSpine(**{**args, **kw})


def run(fab: LeafSpine, flows: Flows):
    A, size = fab.incidence(flows)
    return simulate(A, fab.capacity(), size)


def test_incast_is_limited_by_the_receivers_nic():
    fab = fabric()
    nic = 8.0 * GBIT
    res = run(fab, incast(senders=7, bytes_each=1e6))  # senders on this and other leaves
    assert res.makespan_s == pytest.approx(7 * 1e6 / nic, rel=1e-6)


def test_alltoall_inside_one_leaf_is_limited_by_each_nic():
    fab = fabric()
    S, nic = 1e6, 8.0 * GBIT
    res = run(fab, alltoall(group_size=4, bytes_per_pair=S))  # GPUs 0-3: one leaf
    assert res.makespan_s == pytest.approx(3 * S / nic, rel=1e-6)


@pytest.mark.parametrize("oversub", [1.0, 3.0])
def test_alltoall_across_leaves_with_one_spine(oversub):
    # 2 leaves of 4 GPUs, one spine: each leaf's uplink carries 4 x 4 cross flows of S bytes at
    # 4 * nic / oversub; each NIC carries 7 S. The busier of the two bounds the AlltoAll.
    fab = LeafSpine(gpus=8, gpus_per_server=1, gpus_per_leaf=4, nic_gbps=8.0, oversub=oversub, spines=1)
    S, nic = 1e6, 8.0 * GBIT
    res = run(fab, alltoall(group_size=8, bytes_per_pair=S))
    assert res.makespan_s == pytest.approx(max(16 * S / (4 * nic / oversub), 7 * S / nic), rel=1e-6)


def test_spraying_balances_spines_that_hashing_may_collide_on():
    fab_hash = LeafSpine(gpus=16, gpus_per_server=1, gpus_per_leaf=4, nic_gbps=8.0, ecmp="hash")
    fab_spray = LeafSpine(gpus=16, gpus_per_server=1, gpus_per_leaf=4, nic_gbps=8.0, ecmp="spray")
    flows = alltoall(group_size=16, bytes_per_pair=1e6)
    spray, hashed = run(fab_spray, flows).makespan_s, run(fab_hash, flows).makespan_s
    assert spray == pytest.approx(15 * 1e6 / (8.0 * GBIT), rel=1e-6)  # full bisection: the NICs bound it
    assert hashed >= spray * (1 - 1e-9)


def test_gpus_of_one_server_talk_over_nvswitch():
    fab = LeafSpine(gpus=16, gpus_per_server=8, gpus_per_leaf=8, nic_gbps=400.0, nvlink_gbps=3600.0, ecmp="spray")
    res = run(fab, alltoall(group_size=8, bytes_per_pair=1e6))  # one server
    assert res.makespan_s == pytest.approx(7 * 1e6 / (3600.0 * GBIT), rel=1e-6)
    # EP across servers: GPU i of server 0 with GPU i of server 1 (stride 8), 8 such groups;
    # each NIC carries one flow each way, and the sprayed spines have room for all
    across = alltoall(group_size=2, bytes_per_pair=1e6, groups=8, stride=8)
    assert sorted(zip(across.src[:2], across.dst[:2])) == [(0, 8), (8, 0)]
    assert run(fab, across).makespan_s == pytest.approx(1e6 / (400.0 * GBIT), rel=1e-6)


def test_flows_from_a_traffic_matrix_drop_the_diagonal():
    m = np.array([[5.0, 1.0], [2.0, 7.0]])
    f = from_matrix(m, gpu_of_rank=np.array([3, 9]))
    assert list(zip(f.src, f.dst, f.size_bytes)) == [(3, 9, 1.0), (9, 3, 2.0)]


def test_bad_fabrics_name_the_option():
    with pytest.raises(ConfigError) as e:
        LeafSpine(gpus=10, gpus_per_server=1, gpus_per_leaf=4)
    assert e.value.field_name == "--gpus-per-leaf"
    with pytest.raises(ConfigError) as e:
        LeafSpine(gpus=8, gpus_per_leaf=8, ecmp="random")
    assert e.value.field_name == "--ecmp"


def test_cli_compares_fabrics_and_names_bad_options(tmp_path, capsys):
    from fsmoe.cli import main

    out = tmp_path / "fabric.json"
    assert main(["simulate", "fabric", "--gpus", "32", "--gpus-per-server", "1", "--gpus-per-leaf", "8", "--ep", "16",
                 "--mb", "1", "--oversub", "1,3", "--ecmp", "spray", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    full, over = rep["results"]
    # 16 GPUs per group over 2 leaves: each NIC sends 15 MB (50 GB/s at 1:1 -> 0.3 ms); at 3:1 a
    # leaf's uplinks (8 x 50 / 3 GB/s) carry 8 x 8 MB of cross traffic -> 0.48 ms
    assert full["makespan_ms"] == pytest.approx(15e6 / (400 * GBIT) * 1e3, rel=0.02)
    assert over["makespan_ms"] == pytest.approx(64e6 / (8 * 400 * GBIT / 3) * 1e3, rel=0.02)
    assert main(["simulate", "fabric", "--gpus", "32", "--ep", "5"]) == 2
    assert "--ep" in capsys.readouterr().err


def test_rail_optimised_fabric_keeps_a_rail_on_its_leaf_and_relays_across_rails():
    # 2 servers x 4 GPUs; a rail leaf takes both servers' GPU of its rail: 4 leaves
    fab = LeafSpine(gpus=8, gpus_per_server=4, gpus_per_leaf=2, nic_gbps=8.0, nvlink_gbps=80.0, rails=True)
    assert fab.leaf_of(np.arange(8)).tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    A, _ = fab.incidence(Flows(np.array([0, 0]), np.array([4, 5]), np.array([1.0, 1.0])))
    b = fab._base()
    assert sorted(A[0].indices) == [b["nic_up"] + 0, b["nic_down"] + 4]  # same rail: one leaf, no spine
    # rail 0 -> rail 1: NVSwitch to GPU 1 (server 0, rail 1), then rail 1's leaf
    assert sorted(A[1].indices) == [b["nvl_out"] + 0, b["nvl_in"] + 1, b["nic_up"] + 1, b["nic_down"] + 5]
    # the same on a leaf-spine fabric takes a spine
    plain = LeafSpine(gpus=8, gpus_per_server=4, gpus_per_leaf=4, nic_gbps=8.0, nvlink_gbps=80.0)
    A2, _ = plain.incidence(Flows(np.array([0]), np.array([5]), np.array([1.0])))
    assert len(A2[0].indices) == 4 and b["nvl_out"] not in A2[0].indices
    with pytest.raises(ConfigError) as e:
        LeafSpine(gpus=8, gpus_per_server=4, gpus_per_leaf=4, rails=True)  # 2 servers, 4 per rail leaf
    assert e.value.field_name == "--gpus-per-leaf"
