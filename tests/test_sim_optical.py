"""Optical circuit fabrics (mFabric's regional OCS, a static optical topology) and the port-count
cost model, against cases computed by hand."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fsmoe.config import ConfigError
from fsmoe.sim.cost import FIBER_M, Prices, fat_tree_bill, optical_bill
from fsmoe.sim.fabrics import GBIT, Flows
from fsmoe.sim.flows import simulate
from fsmoe.sim.optical import RegionalOCS, plan_circuits


def test_controller_spreads_uniform_demand_and_never_overbooks_a_port():
    D = np.ones((8, 8))
    np.fill_diagonal(D, 0)
    C = plan_circuits(D, ports=6)
    assert (C == C.T).all() and (np.diag(C) == 0).all()
    assert C.sum(1).tolist() == [6] * 8 and C.max() == 1  # every server's 6 ports, one circuit per pair
    assert plan_circuits(np.zeros((4, 4)), 3).sum() == 0


def test_controller_gives_the_heavy_pair_the_spare_ports():
    D = np.zeros((3, 3))
    D[0, 1], D[1, 0], D[0, 2] = 900.0, 10.0, 100.0
    C = plan_circuits(D, ports=4)
    # first one circuit per demanded pair (heaviest first), then the longest completion: 0-1
    assert C[0, 2] == 1 and C[0, 1] == 3 and C[1, 2] == 0
    assert C.sum(1).max() <= 4


def _two_servers(**kw) -> RegionalOCS:
    return RegionalOCS(gpus=4, gpus_per_server=2, region_servers=2, nic_gbps=400.0, **kw)


def test_traffic_rides_its_circuits_or_the_eps_ports():
    fab = _two_servers(ocs_ports=2, eps_ports=1)
    flows = Flows(np.array([0]), np.array([2]), np.array([100e6]))
    C = fab.plan(fab.server_demand(flows))
    assert C[0, 1] == 2
    A, cap, size = fab.incidence(flows, C)
    t = simulate(A, cap, size).makespan_s
    assert t == pytest.approx(100e6 / (2 * 400 * GBIT))  # two circuits at 400G
    # without circuits both GPUs of server 0 share its one EPS port
    flows2 = Flows(np.array([0, 1]), np.array([2, 3]), np.array([50e6, 50e6]))
    A, cap, size = fab.incidence(flows2, np.zeros((2, 2), dtype=np.int64))
    assert simulate(A, cap, size).makespan_s == pytest.approx(100e6 / (400 * GBIT))
    # inside a server: NVSwitch
    A, cap, size = fab.incidence(Flows(np.array([0]), np.array([1]), np.array([450e6])), C)
    assert simulate(A, cap, size).makespan_s == pytest.approx(450e6 / (3600 * GBIT))


def test_regions_keep_circuits_inside_and_send_the_rest_over_the_eps():
    fab = RegionalOCS(gpus=4, gpus_per_server=1, region_servers=2, ocs_ports=1, eps_ports=1)
    flows = Flows(np.array([0, 0]), np.array([1, 2]), np.array([1e6, 1e6]))  # 0-1 same region, 0-2 not
    C = fab.plan(fab.server_demand(flows))
    assert C[0, 1] == 1 and C[0, 2] == 0
    A, _, _ = fab.incidence(flows, C)
    assert A[0].nnz == 1 and A[1].nnz == 2  # the circuit; EPS up and down


def test_reconfiguration_accounting():
    fab = _two_servers(reconfig_ms=25.0)
    a, b = np.array([[0, 1], [1, 0]]), np.array([[0, 2], [2, 0]])
    assert fab.reconfigure(None, a) == 25.0  # the first set, not predicted
    assert fab.reconfigure(a, a, hide_ms=0.0) == 0.0  # unchanged
    assert fab.reconfigure(a, b, hide_ms=10.0) == 15.0  # predicted: compute hides 10 ms
    assert fab.reconfigure(a, b, hide_ms=40.0) == 0.0
    assert _two_servers(static=True).reconfigure(None, a) == 0.0  # fixed circuits: set up once, before the job


def test_cost_counts_used_ports():
    p = Prices.at(400)
    ft = fat_tree_bill(64, p, oversub=1.0, radix=64)  # two tiers: 64 host links + 64 leaf-spine links
    assert (ft.nics, ft.fibers, ft.transceivers, ft.switch_ports) == (64, 128, 256, 192)
    assert ft.usd == pytest.approx(64 * 1499 + 256 * 659 + 192 * 1090 + 128 * FIBER_M * 0.3)
    over = fat_tree_bill(60, p, oversub=3.0)
    assert over.switch_ports == pytest.approx(60 + 2 * 20) and over.fibers == pytest.approx(80)
    assert fat_tree_bill(4096, p, radix=64).switch_ports == 4096 * 5  # three tiers
    mf = optical_bill(48, 16, p)
    eps = fat_tree_bill(16, p)
    assert mf.ocs_ports == 48 and mf.usd == pytest.approx(eps.usd + 48 * (1499 + 659 + 520 + FIBER_M * 0.3))
    st = optical_bill(48, 16, p, static=True)
    assert st.patch_ports == 48 and st.ocs_ports == 0 and st.usd < mf.usd
    with pytest.raises(ConfigError) as e:
        Prices.at(300)
    assert e.value.field_name == "--nic-gbps"


def test_bad_optical_fabrics_name_the_option():
    with pytest.raises(ConfigError) as e:
        RegionalOCS(gpus=24, gpus_per_server=8, region_servers=2)
    assert e.value.field_name == "--region-servers"
    with pytest.raises(ConfigError) as e:
        RegionalOCS(gpus=16, region_servers=2, eps_ports=0)
    assert e.value.field_name == "--eps-ports"


def test_cli_prices_fabrics_and_compares_perf_per_dollar(tmp_path, capsys):
    from fsmoe.cli import main

    out = tmp_path / "f.json"
    assert main(["simulate", "fabric", "--gpus", "64", "--ep", "64", "--mb", "1", "--fabrics",
                 "leaf-spine,mfabric,static-optical", "--compute-ms", "10", "--a2a-per-iter", "4",
                 "--reconfig-ms", "25", "--hide-ms", "5", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    ls, mf, st = rep["results"]
    assert mf["reconfig_ms"] == 20.0 and st["reconfig_ms"] == 0.0
    assert mf["iteration_ms"] == pytest.approx(10 + 4 * (mf["makespan_ms"] + 20.0))
    assert ls["perf_per_usd_vs_first"] == 1.0
    assert st["perf_per_usd_vs_first"] == pytest.approx(
        ls["iteration_ms"] * ls["usd"] / (st["iteration_ms"] * st["usd"]))
    # a uniform AlltoAll of 8 servers: each pair 8 x 8 MB, 6 pairs on one circuit (50 GB/s), one on
    # the 2 EPS ports (100 GB/s): the circuits finish last
    assert st["makespan_ms"] == pytest.approx(64e6 / (400 * GBIT) * 1e3, rel=0.02)
    assert "perf/$" in capsys.readouterr().out
    assert main(["simulate", "fabric", "--gpus", "64", "--fabrics", "fat"]) == 2
    assert "--fabrics" in capsys.readouterr().err


def test_replay_predicts_circuits_from_the_previous_step():
    from fsmoe.sim.fabrics import LeafSpine
    from fsmoe.sim.replay import replay

    # 4 ranks, one per server, one region; step 0 pairs 0->1 and 2->3, step 1 pairs 0->2 and 1->3
    T = np.zeros((2, 1, 4, 4))
    T[0, 0, 0, 1] = T[0, 0, 2, 3] = 1.0
    T[1, 0, 0, 2] = T[1, 0, 1, 3] = 1.0
    ocs = RegionalOCS(gpus=4, gpus_per_server=1, region_servers=4, ocs_ports=2, eps_ports=1, reconfig_ms=5.0)
    tree = LeafSpine(gpus=4, gpus_per_server=1, gpus_per_leaf=4)
    r = replay(T, [10, 20], ocs, tree, mb_per_rank=1.0, hide_ms=2.0, batch=0.0, share_tol=1e-9)
    one = 1e6 / (400 * GBIT) * 1e3  # 1 MB over one 400G port, ms
    approx = lambda x: pytest.approx(x, rel=1e-6)
    assert r.a2a_ms["electrical"] == [approx(2 * one)] * 2  # dispatch + combine, one NIC each
    # predicted: step 0's own set, not known ahead (the full 5 ms); step 1 keeps step 0's circuits,
    # which miss the new pairs: their traffic takes the one EPS port
    assert r.a2a_ms["predicted"] == [approx(one), approx(2 * one)] and r.reconfig_ms["predicted"] == [5.0, 0.0]
    # oracle: two circuits for each step's pairs, each new set waiting 5 - 2 ms
    assert r.a2a_ms["oracle"] == [approx(one)] * 2 and r.reconfig_ms["oracle"] == [3.0, 3.0]
    # static: one circuit for each of the four pairs, never reconfigured
    assert r.a2a_ms["static"] == [approx(2 * one)] * 2 and r.reconfig_ms["static"] == [0.0, 0.0]
    assert r.means()["oracle"] == pytest.approx(one + 3.0)


def test_trace_command_replays_a_recorded_trace(tmp_path, capsys):
    import gzip

    from fsmoe.cli import main

    path = tmp_path / "routing_trace.jsonl.gz"
    rng = np.random.default_rng(0)
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"format": "fsmoe-routing-trace", "version": 1, "num_layers": 2, "num_experts": 8,
                            "sources": 1, "source_ep_rank": [0], "ep": 1, "top_k": 2}) + "\n")
        for step in range(3):
            f.write(json.dumps({"step": step, "counts": rng.integers(1, 50, (2, 1, 8)).tolist()}) + "\n")
    out = tmp_path / "r.json"
    assert main(["simulate", "trace", str(path), "--ep", "8", "--gpus-per-server", "2", "--gpus-per-leaf", "4",
                 "--region-servers", "4", "--ocs-ports", "2", "--eps-ports", "1", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["steps"] == [0, 1, 2] and set(rep["means_ms"]) == {"electrical", "predicted", "oracle", "static"}
    assert "mFabric" in capsys.readouterr().out
    assert main(["simulate", "trace", str(path)]) == 2  # the run had no EP: --ep must be given
    assert "--ep" in capsys.readouterr().err
    # 8 GPUs replayed (EP 8 x 1 group) on servers of 3: named as this command's option
    assert main(["simulate", "trace", str(path), "--ep", "8", "--gpus-per-server", "3"]) == 2
    assert capsys.readouterr().err.startswith("error: --gpus-per-server=3")
