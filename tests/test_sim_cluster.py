"""The cluster step simulator: collectives on a fabric as fits, computed by hand, and the command."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fsmoe.parallel.layout import Layout
from fsmoe.schedule.model.profile import LinearFit, Profile
from fsmoe.sim.cluster import alltoall_flows, cluster_profile, comm_fits, ring_flows
from fsmoe.sim.fabrics import GBIT, LeafSpine

MEASURED = Profile("gpu", "ep2-esp1-nodes2x1", {
    "a2a_inter": LinearFit(100e-6, 1 / 40e9), "allreduce": LinearFit(60e-6, 1 / 20e9),
    "expert_fwd": LinearFit(10e-6, 1 / 400e12), "expert_bwd": LinearFit(20e-6, 2 / 400e12),
    "dense_fwd": LinearFit(10e-6, 1 / 300e12), "dense_bwd": LinearFit(20e-6, 2 / 300e12)}, overlap=0.4)


def test_patterns():
    a = alltoall_flows([[0, 1, 2], [3, 4, 5]], 300.0)
    assert len(a.src) == 12 and set(a.size_bytes) == {100.0}
    r = ring_flows([[0, 2, 4], [1, 3, 5]], 7.0)
    assert sorted(zip(r.src.tolist(), r.dst.tolist())) == [(0, 2), (1, 3), (2, 4), (3, 5), (4, 0), (5, 1)]


def test_two_servers_one_nic_each_by_hand():
    layout = Layout(dp=2, ep=2, gpus_per_node=1)
    fab = LeafSpine(2, gpus_per_server=1, gpus_per_leaf=2, nic_gbps=400.0)
    fits = comm_fits(layout, fab, MEASURED)
    link = 400 * GBIT
    # AlltoAll: half of a rank's buffer crosses its NIC; ring AllReduce of 2: the whole buffer
    assert fits["a2a_inter"].beta == pytest.approx(0.5 / link, rel=1e-6)
    assert fits["allreduce"].beta == pytest.approx(1.0 / link, rel=1e-6)
    assert fits["a2a_inter"].alpha == 100e-6 and fits["allreduce"].alpha == 60e-6  # the measured latencies
    assert fits["counts"] == fits["a2a_inter"]  # the counts' AllGather: an AlltoAll's bytes


def test_an_ep_group_inside_a_server_uses_nvswitch_and_esp_rings_are_priced():
    layout = Layout(dp=16, ep=4, esp=2, gpus_per_node=8)
    fab = LeafSpine(16, gpus_per_server=8, gpus_per_leaf=16, nic_gbps=400.0, nvlink_gbps=3600.0)
    fits = comm_fits(layout, fab, MEASURED, default_alpha_s=5e-6)
    assert not layout.ep_inter and "a2a_intra" in fits and fits["a2a_intra"].alpha == 5e-6
    # 3/4 of a buffer leaves each GPU over its NVSwitch link
    assert fits["a2a_intra"].beta == pytest.approx(0.75 / (3600 * GBIT), rel=1e-6)
    assert fits["allgather"].beta == pytest.approx(0.5 / (3600 * GBIT), rel=1e-6)  # ESP ring of 2
    # the DP AllReduce over 16 GPUs in two servers: a ring of 8 inside each (2 * 7/8 of a buffer
    # over NVSwitch), then 8 rings of 2 servers on an eighth each (2 * 1/2 * 1/8 at 400G)
    assert fits["allreduce"].beta == pytest.approx(1.75 / (3600 * GBIT) + 0.125 / (400 * GBIT), rel=1e-6)


def test_allreduce_on_an_optical_fabric_takes_the_electrical_ports():
    from fsmoe.sim.optical import RegionalOCS

    layout = Layout(dp=4, ep=2, gpus_per_node=1)
    ocs = RegionalOCS(4, gpus_per_server=1, region_servers=4, ocs_ports=3, eps_ports=1, nic_gbps=400.0)
    fits = comm_fits(layout, ocs, MEASURED)
    # ring of 4 servers, one GPU each: 2 * 3/4 of a buffer over one EPS port
    assert fits["allreduce"].beta == pytest.approx(1.5 / (400 * GBIT), rel=1e-6)
    # EP pairs (0,1) and (2,3) get all three circuits each: half a buffer at 3 x 400G
    assert fits["a2a_inter"].beta == pytest.approx(0.5 / (3 * 400 * GBIT), rel=1e-6)


def test_cluster_profile_scales_compute_and_replaces_communication():
    layout = Layout(dp=2, ep=2, gpus_per_node=1)
    fab = LeafSpine(2, gpus_per_server=1, gpus_per_leaf=2, nic_gbps=100.0)
    prof = cluster_profile(MEASURED, layout, fab, gemm_scale=2.0)
    assert prof.fits["expert_fwd"].beta == pytest.approx(MEASURED.fits["expert_fwd"].beta / 2)
    assert prof.fits["expert_fwd"].alpha == MEASURED.fits["expert_fwd"].alpha
    assert prof.fits["a2a_inter"].beta == pytest.approx(0.5 / (100 * GBIT), rel=1e-6)
    assert prof.overlap == 0.4 and prof.layout == layout.name
    with pytest.raises(ValueError):
        cluster_profile(MEASURED, layout, fab, gemm_scale=0)


def test_cluster_command(tmp_path, capsys):
    from fsmoe.cli import main

    path = tmp_path / "p.json"
    MEASURED.save(path)
    out = tmp_path / "c.json"
    args = ["simulate", "cluster", "--config", "tiny", "--profile", str(path), "--gpus", "16", "--ep", "4",
            "--gpus-per-server", "4", "--gpus-per-leaf", "8", "--policies", "default,fsmoe"]
    assert main(args + ["--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    d, f = rep["results"]
    assert (d["policy"], f["policy"]) == ("default", "fsmoe") and d["vs_first"] == 1.0
    assert f["iteration_ms"] > 0 and f["r_fwd"] in (1, 2, 4, 8)
    assert np.isfinite(d["tokens_per_s"]) and "allreduce" in rep["links"] and rep["network_usd_per_gpu"] > 0
    assert "tokens/s" in capsys.readouterr().out
    assert main(args[:-2] + ["--policies", "nope"]) == 2
    assert "--policies" in capsys.readouterr().err
    assert main(args[:-2] + ["--ep", "3"]) == 2
    assert "--ep" in capsys.readouterr().err


def test_calibration_against_bench_results(tmp_path, capsys):
    from fsmoe.cli import main
    from fsmoe.schedule.model.plan import plan
    from fsmoe.schedule.types import LayerSpec
    from fsmoe.sim.cluster import calibrate, layout_of

    layout = layout_of("ep2-esp1-nodes2x1", 2)
    assert layout == Layout(dp=2, ep=2, gpus_per_node=1)
    with pytest.raises(ValueError):
        layout_of("two nodes", 2)
    fab = LeafSpine(2, gpus_per_server=1, gpus_per_leaf=2, nic_gbps=200.0)
    prof = cluster_profile(MEASURED, layout, fab)
    cfg = {"B": 2, "heads": 4, "L": 256, "M": 512, "H": 1024, "E": 4, "f": 1.2, "ffn": "gelu"}
    spec = LayerSpec(batch=2, seq_len=256, d_model=512, d_ff=1024, num_experts=4, top_k=2, n_heads=4,
                     capacity_factor=1.2, activation="gelu", n_layers=2, dtype_bytes=2, grad_bytes=2)
    seconds = {p: plan(spec, layout, prof, p).predicted_iter_s for p in ("default", "fsmoe", "tutel_improved")}
    results = {"layout": layout.name, "world": 2, "refitted": MEASURED.to_dict(),
               "rows": [{"config": cfg, "seconds": seconds}]}
    rep = calibrate(results, fab)
    assert rep["policies"]["default"]["median_ratio"] == pytest.approx(1.0)
    assert rep["policies"]["fsmoe"]["within_10pct"] == 1
    faster = calibrate(results, LeafSpine(2, gpus_per_server=1, gpus_per_leaf=2, nic_gbps=800.0))
    assert faster["policies"]["default"]["median_ratio"] < 1.0
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert main(["simulate", "calibrate", str(path), "--nic-gbps", "200"]) == 0
    assert "within 10% on 1/1" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("{}")
    assert main(["simulate", "calibrate", str(tmp_path / "bad.json"), "--nic-gbps", "200"]) == 2
    assert "results" in capsys.readouterr().err


def test_fsmoe_layer_grid_on_its_testbeds(tmp_path, capsys):
    from fsmoe.cli import main
    from fsmoe.sim.grid import TESTBEDS, grid, run_grid

    a = TESTBEDS["a"]
    specs = grid(a)
    assert len(specs) == 1458 == len({(s.batch, s.n_heads, s.seq_len, s.d_model, s.d_ff, s.capacity_factor,
                                       s.activation) for s in specs})
    assert {s.seq_len for s in specs} == {512, 1024, 2048} and {s.num_experts for s in specs} == {6}
    assert (a.gpus, a.layout.ep, a.layout.esp, a.layout.ep_inter) == (48, 6, 8, True)
    rep = run_grid(MEASURED, TESTBEDS["b"], every=1000)
    assert rep["configs"] == 2 and rep["summary"]["fsmoe_over_default"] > 0
    assert set(rep["rows"][0]) == {"spec", "default", "tutel_improved", "pipemoe_lina", "fsmoe_no_iio", "fsmoe"}
    path = tmp_path / "p.json"
    MEASURED.save(path)
    assert main(["simulate", "grid", "--profile", str(path), "--every", "0"]) == 2
    assert "--every" in capsys.readouterr().err



def _cluster_json(path, fabric: str, step_ms: float, usd: float, nic: float = 400.0, config: str = "m") -> None:
    import json

    path.write_text(json.dumps({"config": config, "fabric": fabric, "nic_gbps": nic, "network_usd_per_gpu": usd,
                                "results": [{"policy": "default", "iteration_ms": step_ms},
                                            {"policy": "fsmoe", "iteration_ms": step_ms / 2}]}))


def test_compare_divides_perf_per_dollar_by_the_fat_tree_and_plots(tmp_path, capsys):
    """perf/$ = 1 / (step x $): a fabric 1.2x slower at half the price is 1.667x the fat-tree's."""
    import json

    from fsmoe.cli import main

    _cluster_json(tmp_path / "a.json", "leaf-spine 1:1", 100.0, 2000.0)
    _cluster_json(tmp_path / "b.json", "mFabric 6+2", 120.0, 1000.0)
    _cluster_json(tmp_path / "c.json", "mFabric 6+2", 50.0, 1000.0, nic=100.0)  # no 100G reference: left out
    out, png = tmp_path / "ppd.json", tmp_path / "ppd.png"
    assert main(["simulate", "compare", str(tmp_path), "--json", str(out), "--plot", str(png)]) == 0
    rows = {r["fabric"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"leaf-spine 1:1", "mFabric 6+2"} and rows["leaf-spine 1:1"]["vs_reference"] == 1.0
    assert abs(rows["mFabric 6+2"]["vs_reference"] - 2000 * 100 / (1000 * 120)) < 1e-9
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["simulate", "compare", str(tmp_path / "b.json")]) != 0  # no reference at all
    assert "no cluster result with a 'leaf-spine' reference" in capsys.readouterr().err
    assert main(["simulate", "compare", str(tmp_path / "missing.json")]) != 0
    assert "no such file" in capsys.readouterr().err


def test_pipeline_stages_and_tensor_parallel_rings_by_hand():
    from fsmoe.sim.cluster import p2p_seconds, staged_groups

    layout = Layout(dp=1, mp=2, ep=2, gpus_per_node=2)  # one stage: one server of 2 GPUs
    assert staged_groups(layout, "ep", 2) == [[0, 1], [2, 3]]
    fab = LeafSpine(4, gpus_per_server=2, gpus_per_leaf=4, nic_gbps=100.0, nvlink_gbps=800.0)
    # each GPU of stage 0 sends to its peer on the other server over its own NIC
    assert p2p_seconds(fab, layout, 2, 1e6) == pytest.approx(1e6 / (100 * GBIT), rel=1e-6)
    assert p2p_seconds(fab, layout, 1, 1e6) == 0.0
    fits = comm_fits(layout, fab, MEASURED, stages=2)  # both stages' TP rings at once, inside their servers
    assert fits["tp_allgather"].beta == pytest.approx(0.5 / (800 * GBIT), rel=1e-6)
    assert fits["tp_allreduce"].beta == pytest.approx(2 * fits["tp_allgather"].beta)


def test_a_pipelined_step_is_fill_drain_and_steady_microbatches_plus_the_once_per_step_parts():
    from fsmoe.config import load_config
    from fsmoe.sim.step import predict_pipelined, predict_step, stage_config

    cfg = load_config("tiny", ["train.batch_size=16", "model.n_layers=4"])
    stage = stage_config(cfg, 2, 4)
    assert stage.model.n_layers == 2 and stage.train.batch_size == 4
    with pytest.raises(ValueError, match="microbatches"):
        stage_config(cfg, 2, 3)
    prof = Profile("gpu", "x", {**MEASURED.fits, "a2a_intra": LinearFit(1e-5, 1e-10),
                                "glue_fwd": LinearFit(0, 1e-7), "glue_bwd": LinearFit(0, 1e-7)})
    layout = Layout(dp=2, ep=2)
    step = predict_pipelined(cfg, layout, prof, "default", 2, 4, 1e-4)
    m = step.micro
    assert step.micro_s == pytest.approx(m.moe_blocks + m.dense_blocks + m.head + m.tensor_par + 2e-4)
    assert step.total_s == pytest.approx(5 * step.micro_s + step.once_s)  # (4 + 2 - 1) slots
    assert step.bubble == pytest.approx(step.micro_s / step.total_s)
    assert m.gradients == 0 and m.optimizer == 0 and step.once_s > 0  # reduced and stepped once
    assert "allreduce" not in m.missing
    whole = predict_step(stage_config(cfg, 2), layout, prof)
    assert step.once_s >= whole.gradients + whole.optimizer
    # buckets during the last microbatch's backward: only what outlasts it is once per step
    over = predict_pipelined(cfg, layout, prof, "default", 2, 4, 1e-4, overlap_grads=True)
    last = predict_step(stage, layout, prof, "default", overlap_grads=True)
    assert over.once_s == pytest.approx(step.once_s - whole.gradients + last.gradients)
    # without a per-call latency (which each bucket pays again) the buckets can only hide time
    flat = Profile("gpu", "x", {k: (LinearFit(0, f.beta) if k in ("allreduce", "grad_sync") else f)
                                for k, f in prof.fits.items()})
    plain = predict_pipelined(cfg, layout, flat, "default", 2, 4, 1e-4)
    assert predict_pipelined(cfg, layout, flat, "default", 2, 4, 1e-4, overlap_grads=True).once_s < plain.once_s


def test_cluster_command_with_pipeline_and_tensor_parallelism(tmp_path, capsys):
    from fsmoe.cli import main

    path = tmp_path / "p.json"
    MEASURED.save(path)
    out = tmp_path / "c.json"
    args = ["simulate", "cluster", "--config", "tiny", "--profile", str(path), "--gpus", "16", "--ep", "4",
            "--gpus-per-server", "4", "--gpus-per-leaf", "8", "--policies", "default", "--batch", "2"]
    assert main(args + ["--pp", "2", "--mp", "2", "--microbatches", "4", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    r = rep["results"][0]
    assert (rep["pp"], rep["mp"], rep["microbatches"]) == (2, 2, 4) and r["parts_ms"]["tensor_par"] > 0
    assert r["parts_ms"]["p2p"] > 0 and 0 < r["parts_ms"]["bubble"] < 1
    assert "pipeline stages" in capsys.readouterr().out
    assert main(args + ["--pp", "3"]) == 2  # 16 GPUs are not 3 stages of whole servers
    assert "--pp" in capsys.readouterr().err
    assert main(args + ["--pp", "2", "--microbatches", "3"]) == 2
    assert "--microbatches" in capsys.readouterr().err
    assert main(args + ["--mp", "3"]) == 2
    assert "--mp" in capsys.readouterr().err


def test_dedup_prices_the_hierarchical_dispatch_against_the_flat_alltoall():
    from fsmoe.schedule.types import LayerSpec
    from fsmoe.sim.dedup import dedup_scale

    spec = LayerSpec(batch=2, seq_len=256, d_model=1024, d_ff=1024, num_experts=32, top_k=8, dtype_bytes=2)
    layout = Layout(dp=32, ep=32, gpus_per_node=8)  # 4 servers of 8
    two = dedup_scale(spec, layout, 8, 100.0, 3600.0, 2)
    assert two.depth == 2 and two.ratio < 0.8  # top-8 over 4 servers: most tokens' copies share a server
    assert len(two.per_depth_ms) == 2 and two.per_depth_ms[1] == pytest.approx(two.ratio * two.flat_ms)
    assert dedup_scale(spec, layout, 8, 100.0, 3600.0, "auto").depth == 2
    assert dedup_scale(spec, layout, 8, 100.0, 3600.0, 0).ratio == 1.0
    inside = dedup_scale(spec, Layout(dp=32, ep=8, gpus_per_node=8), 8, 100.0, 3600.0, 2)
    assert inside.depth == 0 and inside.ratio == 1.0  # EP inside one server
    with pytest.raises(ValueError, match="dedup depth 3"):
        dedup_scale(spec, layout, 8, 100.0, 3600.0, 3)


def test_cluster_command_with_dedup(tmp_path, capsys):
    from fsmoe.cli import main

    path = tmp_path / "p.json"
    MEASURED.save(path)
    args = ["simulate", "cluster", "--config", "tiny", "--profile", str(path), "--gpus", "16", "--ep", "8",
            "--gpus-per-server", "4", "--gpus-per-leaf", "8", "--policies", "default"]
    assert main(args + ["--json", str(tmp_path / "flat.json")]) == 0
    assert main(args + ["--dedup-depth", "2", "--json", str(tmp_path / "d2.json")]) == 0
    assert main(args + ["--dedup-depth", "auto", "--json", str(tmp_path / "auto.json")]) == 0
    flat, d2, auto = (json.loads((tmp_path / f).read_text()) for f in ("flat.json", "d2.json", "auto.json"))
    # top-2 of 8 experts over 2 servers: few copies share a server, and the hierarchical rows carry
    # their weights and ids, so depth 2 moves more than the flat AlltoAll; auto keeps flat
    assert flat["dedup"] is None and d2["dedup"]["depth"] == 2 and d2["dedup"]["ratio"] > 1
    assert d2["results"][0]["moe_blocks_ms"] > flat["results"][0]["moe_blocks_ms"]
    assert auto["dedup"]["depth"] == 0 and auto["results"][0]["moe_blocks_ms"] == flat["results"][0]["moe_blocks_ms"]
    assert "dedup: depth 2" in capsys.readouterr().out


def test_placement_policies_balance_a_skewed_routing_and_price_the_busiest_rank(tmp_path):
    from fsmoe.cli import main
    from fsmoe.schedule.types import LayerSpec
    from fsmoe.sim.balance import load_balance

    spec = LayerSpec(batch=2, seq_len=256, d_model=256, d_ff=512, num_experts=16, top_k=2)
    layout = Layout(dp=8, ep=8, gpus_per_node=4)
    static = load_balance(spec, layout, "static", "skewed")
    assert static.ratio > 1.5 and static.replicated == 0  # the hot experts' ranks
    for policy in ("flexmoe", "eplb"):
        b = load_balance(spec, layout, policy, "skewed")
        assert b.ratio < static.ratio and b.replicated > 0 and b.static_ratio == static.ratio
    with pytest.raises(ValueError, match="placement 'nope'"):
        load_balance(spec, layout, "nope")
    path = tmp_path / "p.json"
    MEASURED.save(path)
    args = ["simulate", "cluster", "--config", "tiny", "--profile", str(path), "--gpus", "16", "--ep", "8",
            "--gpus-per-server", "4", "--gpus-per-leaf", "8", "--policies", "default", "--routing", "skewed"]
    out = {}
    for policy in ("static", "eplb"):
        assert main(args + ["--placement", policy, "--json", str(tmp_path / f"{policy}.json")]) == 0
        out[policy] = json.loads((tmp_path / f"{policy}.json").read_text())
    s, e = out["static"], out["eplb"]
    assert s["placement"]["ratio"] > e["placement"]["ratio"] and e["placement"]["replica_sync_ms"] > 0
    assert e["results"][0]["moe_blocks_ms"] < s["results"][0]["moe_blocks_ms"]


def test_a_routing_trace_drives_placement_and_dedup(tmp_path, capsys):
    import gzip

    from fsmoe.cli import main
    from fsmoe.sim.balance import routing_ids

    trace = tmp_path / "routing_trace.jsonl.gz"
    counts = [[[[400, 300, 100, 50, 50, 50, 25, 25]]]]  # one step, layer and source: two hot experts
    with gzip.open(trace, "wt") as f:
        f.write(json.dumps({"format": "fsmoe-routing-trace", "version": 1, "num_layers": 1, "num_experts": 8,
                            "sources": 1, "source_ep_rank": [0], "ep": 1, "top_k": 2}) + "\n")
        f.write(json.dumps({"step": 1, "counts": counts[0]}) + "\n")
    ids = routing_ids(str(trace), 4000, 8, 2, 0)
    assert ids.shape == (4000, 2) and bool((ids[:, 0] != ids[:, 1]).all())  # k distinct experts a token
    share = np.bincount(ids.flatten().numpy(), minlength=8) / ids.numel()
    assert share[0] > share[1] > share[2] > share[7]
    with pytest.raises(ValueError, match="has 8 experts, the config 16"):
        routing_ids(str(trace), 10, 16, 2, 0)
    path = tmp_path / "p.json"
    MEASURED.save(path)
    args = ["simulate", "cluster", "--config", "tiny", "--profile", str(path), "--gpus", "16", "--ep", "8",
            "--gpus-per-server", "4", "--gpus-per-leaf", "8", "--policies", "default"]
    assert main(args + ["--routing", str(trace), "--placement", "eplb", "--json", str(tmp_path / "t.json")]) == 0
    rep = json.loads((tmp_path / "t.json").read_text())
    assert rep["placement"]["routing"] == "trace routing_trace.jsonl.gz" and rep["placement"]["static_ratio"] > 1.5
    capsys.readouterr()
    assert main(args + ["--routing", str(tmp_path / "none.jsonl.gz")]) == 2
    assert "--routing" in capsys.readouterr().err
    assert main(args + ["--routing", str(trace), "--set", "model.moe.num_experts=16"]) == 2
    assert "holds 8 experts" in capsys.readouterr().err


def test_a_trace_with_sampled_choices_keeps_which_experts_tokens_chose_together(tmp_path, capsys):
    """Tokens drawn from the recorded choices: pairs the trace never saw together never appear
    (drawn by frequency, a token's two experts are independent), dropped choices are skipped."""
    import gzip

    from fsmoe.cli import main
    from fsmoe.sim.balance import routing_ids

    trace = tmp_path / "routing_trace.jsonl.gz"
    choices = [[[0, 1], [2, 3], [0, 1], [4, 5], [6, 8]]]  # one layer; [6, 8]: a dropped choice (id E)
    with gzip.open(trace, "wt") as f:
        f.write(json.dumps({"format": "fsmoe-routing-trace", "version": 1, "num_layers": 1, "num_experts": 8,
                            "sources": 1, "source_ep_rank": [0], "ep": 1, "top_k": 2}) + "\n")
        f.write(json.dumps({"step": 1, "counts": [[[2, 2, 1, 1, 1, 1, 1, 0]]], "choices": choices}) + "\n")
    ids = routing_ids(str(trace), 3000, 8, 2, 0)
    pairs = {tuple(r) for r in ids.tolist()}
    assert pairs == {(0, 1), (2, 3), (4, 5)}
    share = np.bincount(ids[:, 0].numpy(), minlength=8) / len(ids)
    assert share[0] == pytest.approx(0.5, abs=0.05)  # [0, 1] was half the sampled tokens
    with pytest.raises(ValueError, match="top-2 choices, the config top-3"):
        routing_ids(str(trace), 10, 8, 3, 0)
    path = tmp_path / "p.json"
    MEASURED.save(path)
    args = ["simulate", "cluster", "--config", "tiny", "--profile", str(path), "--gpus", "16", "--ep", "8",
            "--gpus-per-server", "4", "--gpus-per-leaf", "8", "--policies", "default", "--routing", str(trace)]
    assert main(args + ["--set", "model.moe.router.top_k=1"]) == 2
    assert "sampled top-2 choices; the config routes top-1" in capsys.readouterr().err
