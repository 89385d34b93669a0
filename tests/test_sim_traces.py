"""Trace summaries (change, sparsity, locality) against hand-computed cases, and the command."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from fsmoe.config import ConfigError
from fsmoe.sim.traces import summarize


def two_rank_trace() -> np.ndarray:
    """[N=2, M=1, R=2, E=2]: step 0 every row stays on its rank, step 1 every row crosses."""
    c = np.zeros((2, 1, 2, 2), dtype=np.int64)
    c[0, 0, 0, 0] = c[0, 0, 1, 1] = 10
    c[1, 0, 0, 1] = c[1, 0, 1, 0] = 10
    return c


def test_change_sparsity_and_locality_by_hand():
    s = summarize(two_rank_trace(), [0, 1], ranks=2, source_ep_rank=[0, 1])
    assert s.change == pytest.approx([1.0])  # disjoint patterns
    assert s.on_rank == pytest.approx([1.0, 0.0])
    assert s.sparsity == pytest.approx([0.0, 1.0])  # step 1: both off-rank pairs are needed for 80%


def test_one_hot_pair_is_sparse_and_nodes_count_their_ranks():
    c = np.zeros((1, 1, 4, 4), dtype=np.int64)
    c[0, 0, 0, 3] = 90  # rank 0 -> rank 3 carries almost everything
    c[0, 0, 1, 0] = 10
    s = summarize(c, [0], ranks=4, gpus_per_node=2, source_ep_rank=[0, 1, 2, 3])
    assert s.sparsity == pytest.approx([1 / 12])  # one pair of twelve carries 90%
    assert s.in_node == pytest.approx([0.1])  # rank 1 -> rank 0 stays in node 0
    with pytest.raises(ConfigError) as e:
        summarize(c, [0], ranks=4, gpus_per_node=3)
    assert e.value.field_name == "--gpus-per-node"


def test_a_one_process_trace_spreads_its_tokens_over_the_ranks():
    c = np.full((1, 1, 1, 8), 5, dtype=np.int64)
    s = summarize(c, [0], ranks=4)
    assert s.on_rank == pytest.approx([0.25])


def test_trace_summary_command(tmp_path, capsys):
    from fsmoe.cli import main

    path = tmp_path / "routing_trace.jsonl.gz"
    c = two_rank_trace()
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"format": "fsmoe-routing-trace", "version": 1, "num_layers": 1, "num_experts": 2,
                            "sources": 2, "source_ep_rank": [0, 1], "ep": 2, "top_k": 1}) + "\n")
        ops = {"forward": [[0.001, 0.002, 0.004, 0.002, 0.001, 0.010]],  # route .. unroute, the layer
               "backward": [[0.002, 0.002, 0.008, 0.002, 0.002, 0.016]]}
        for step in range(2):
            f.write(json.dumps({"step": step, "counts": c[step].tolist(),
                                **({"step_s": 0.25, "ops": ops} if step else {})}) + "\n")
    out = tmp_path / "summary.json"
    assert main(["trace", "summary", str(path), "--json", str(out), "--plot", str(tmp_path / "s.png")]) == 0
    rep = json.loads(out.read_text())
    assert rep["means"]["change"] == pytest.approx(1.0) and (tmp_path / "s.png").exists()
    assert rep["step_ms"]["median"] == pytest.approx(250.0) and rep["step_ms"]["steps"] == 1
    assert rep["op_ms"]["forward"]["experts"] == pytest.approx(4.0) and rep["op_ms"]["backward"]["layer"] == 16.0
    printed = capsys.readouterr().out
    assert "step time: median 250.0 ms" in printed and "experts 4 / 8" in printed
    bad = tmp_path / "not_a_trace.jsonl.gz"
    with gzip.open(bad, "wt") as f:
        f.write('{"format": "something-else"}\n')
    assert main(["trace", "summary", str(bad)]) == 2
    assert "path" in capsys.readouterr().err


def test_trace_check_puts_each_traced_op_beside_the_profiles_prediction(tmp_path, capsys):
    """fsmoe trace check: the run's shapes and layout from its config.json, each op priced with
    the profile's lines (hand-computed here: tiny preset, DP2 x EP2, 8 x 128 tokens per rank, top-2:
    2048 rows of 128 fp32 values = 1 MiB per AlltoAll; 2048 x 128 x 256 x 2 GEMMs = 134.2M MACs)."""
    from fsmoe.cli import main
    from fsmoe.config import load_config
    from fsmoe.schedule.model.profile import profile_from_points

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(load_config("tiny", ["parallel.dp=2", "parallel.ep=2"]).to_dict()))
    lines = {"a2a_intra": (50e-6, 1e-9), "expert_fwd": (20e-6, 1e-10), "expert_bwd": (40e-6, 2e-10)}
    prof = profile_from_points("synthetic", "ep2-esp1-nodes1x2",
                               {k: [[n, a + b * n] for n in (1e3, 1e6, 1e8)] for k, (a, b) in lines.items()})
    prof.save(tmp_path / "profile.json")
    ops = {"forward": [[0.001, 0.002, 0.010, 0.002, 0.001, 0.016]] * 4,
           "backward": [[0.001, 0.002, 0.020, 0.002, 0.001, 0.026]] * 4}
    with gzip.open(run / "routing_trace.jsonl.gz", "wt") as f:
        f.write(json.dumps({"format": "fsmoe-routing-trace", "version": 1, "num_layers": 4, "num_experts": 8,
                            "sources": 2, "source_ep_rank": [0, 1], "ep": 2, "top_k": 2}) + "\n")
        f.write(json.dumps({"step": 1, "counts": [[[0] * 8] * 2] * 4, "ops": ops}) + "\n")
    out = tmp_path / "check.json"
    assert main(["trace", "check", str(run / "routing_trace.jsonl.gz"), "--profile", str(tmp_path / "profile.json"),
                 "--json", str(out)]) == 0
    got = {(r["phase"], r["op"]): r for r in json.loads(out.read_text())["ops"]}
    a2a, counts = 50e-6 + 1e-9 * 2 ** 20, 50e-6 + 1e-9 * 2 * 8 * 8
    assert got["forward", "dispatch"]["predicted_ms"] == pytest.approx(1e3 * (counts + a2a), rel=1e-6)
    assert got["backward", "combine"]["predicted_ms"] == pytest.approx(1e3 * a2a, rel=1e-6)
    assert got["forward", "experts"]["predicted_ms"] == pytest.approx(1e3 * (20e-6 + 1e-10 * 2048 * 128 * 256 * 2))
    assert got["backward", "experts"]["predicted_ms"] == pytest.approx(1e3 * (40e-6 + 2e-10 * 2048 * 128 * 256 * 2))
    assert got["forward", "experts"]["measured_ms"] == pytest.approx(10.0)
    assert got["forward", "route"]["predicted_ms"] is None
    assert "median |error|" in capsys.readouterr().out
    assert main(["trace", "check", str(run / "routing_trace.jsonl.gz"), "--profile", str(tmp_path / "none.json")]) == 2
    assert "--profile" in capsys.readouterr().err
    with gzip.open(run / "routing_trace.jsonl.gz", "wt") as f:  # traced before the op clock existed
        f.write(json.dumps({"format": "fsmoe-routing-trace", "version": 1, "num_layers": 4, "num_experts": 8,
                            "sources": 2, "ep": 2, "top_k": 2}) + "\n")
        f.write(json.dumps({"step": 1, "counts": [[[0] * 8] * 2] * 4}) + "\n")
    assert main(["trace", "check", str(run / "routing_trace.jsonl.gz"), "--profile",
                 str(tmp_path / "profile.json")]) == 2
    assert "no op timings" in capsys.readouterr().err


def test_summary_says_how_many_ranks_a_tokens_experts_span(tmp_path, capsys):
    """From the sampled choices: 8 experts on 4 EP ranks (2 each) on 2 nodes; a dropped choice
    (id 8) leaves its token out."""
    from fsmoe.cli import main
    from fsmoe.sim.traces import spread_per_token

    choices = np.array([[[[0, 1], [0, 2], [1, 7], [3, 8]]]])  # [N=1, M=1, S=4, k=2]
    spread = spread_per_token(choices, 8, 4, gpus_per_node=2)
    assert spread == {"k": 2, "ranks_per_token": pytest.approx(5 / 3), "nodes_per_token": pytest.approx(4 / 3),
                      "tokens": 3}
    path = tmp_path / "routing_trace.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"format": "fsmoe-routing-trace", "version": 1, "num_layers": 1, "num_experts": 8,
                            "sources": 1, "source_ep_rank": [0], "ep": 4, "top_k": 2}) + "\n")
        f.write(json.dumps({"step": 1, "counts": [[[1, 1, 1, 1, 0, 0, 0, 1]]], "choices": choices[0].tolist()}) + "\n")
    out = tmp_path / "s.json"
    assert main(["trace", "summary", str(path), "--gpus-per-node", "2", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["spread"]["ranks_per_token"] == pytest.approx(5 / 3)
    assert "sit on 1.67 EP ranks, 1.33 nodes" in capsys.readouterr().out
