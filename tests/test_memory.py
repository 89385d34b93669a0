"""The memory plan (fsmoe.memory, ``fsmoe plan --memory``) against what GPU runs kept and peaked at.

``benchmarks/results/memory/census_h200.json``: every tensor autograd saved, block by block, in
the trainer's bf16 forward on an H200 (scripts/memory_census.py); ``peaks_h200.json``: the peak
``fsmoe train`` measured on one and two H200s. The plan must match the first per block (bf16
weight copies aside, which the plan counts per model) and the second within 5%.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fsmoe.config import load_config
from fsmoe.memory import GiB, ParamCounts, block_bytes, largest_batch, plan_memory, rope_table_bytes

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "memory"


def _activations(t: dict, weight_shapes: set, tokens: int) -> bool:
    """A saved tensor that is no bf16 copy of a weight: those have a parameter's shape (or its
    transpose) and no dimension of the token count (1000, which no parameter has)."""
    copy = t["dtype"] == "bfloat16" and tuple(t["shape"]) in weight_shapes and tokens not in t["shape"]
    return not copy


@pytest.mark.parametrize("case", json.loads((RESULTS / "census_h200.json").read_text()), ids=lambda c: " ".join(c["case"]))
def test_saved_activations_per_block_match_the_gpu_census(case):
    import torch

    from fsmoe.models import build_model

    cfg = load_config(case["case"][0], [f"train.seq_len={case['seq_len']}", *case["case"][1:]])
    m = cfg.model
    with torch.device("meta"):
        model = build_model(m, seed=0)
    shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(reversed(p.shape)) for p in model.parameters()}
    tokens = case["batch"] * case["seq_len"]
    mode = cfg.train.activation_checkpointing
    for label, tensors in case["blocks"].items():
        if not label.startswith("block"):
            continue
        i = int(label[5:].split(":")[0])
        got = sum(t["bytes"] for t in tensors if _activations(t, shapes, tokens))
        want = block_bytes(m, i, tokens, cfg.parallel, 2, 1.0, mode)
        if i == 0 and mode != "full":  # the first block saves the rotary tables
            want += rope_table_bytes(m)
        assert abs(want - got) <= 0.01 * got, f"{label}: plan {want / 2**20:.1f} MiB, census {got / 2**20:.1f} MiB"


@pytest.mark.parametrize("run", json.loads((RESULTS / "peaks_h200.json").read_text())["runs"], ids=lambda r: r["name"])
def test_planned_peak_within_5_percent_of_the_measured_one(run):
    cfg = load_config(run["preset"], run["set"])
    planned = plan_memory(cfg).total / GiB
    assert abs(planned - run["peak_gib"]) <= 0.05 * run["peak_gib"], (planned, run["peak_gib"])


def test_sharding_and_recompute_shrink_the_plan_and_the_largest_batch_grows():
    base = ["model.n_layers=8", "train.batch_size=16", "parallel.dp=8", "parallel.ep=8"]
    counts = ParamCounts.of(load_config("mixtral-8x7b", base).model)
    plain = plan_memory(load_config("mixtral-8x7b", base), counts=counts)
    sharded = plan_memory(load_config("mixtral-8x7b", [*base, "parallel.shard=optimizer"]), counts=counts)
    assert sharded.step["optimizer"] < plain.step["optimizer"]
    # gradients reduce-scattered: the dense part's over dp (edp = 1 here: the experts' stay whole),
    # plus the collective's input of one bucket
    dense = counts.split_by_mp + counts.replicated
    assert sharded.step["gradients"] == pytest.approx(4 * (dense / 8 + counts.experts / 8))
    assert 0 < sharded.step["communication buffers"] <= 2 * 4 * (1 << 25)
    full = load_config("mixtral-8x7b", [*base, "train.activation_checkpointing=full"])
    assert plan_memory(full, counts=counts).forward["activations"] < plain.forward["activations"]
    budget = 80 * GiB
    assert largest_batch(full, budget, counts=counts) >= largest_batch(load_config("mixtral-8x7b", base), budget,
                                                                       counts=counts)


def test_sharded_weights_hold_slices_of_the_blocks_and_the_blocks_in_flight_whole():
    """shard = "full" at DP4 x EP2 (edp 2): the weights held are the parts outside blocks whole plus
    every slice (dense over dp, experts over edp); two blocks whole in flight; the moments as
    with shard = "optimizer" but no second copy of strided slices."""
    base = ["model.n_layers=8", "train.batch_size=16", "parallel.dp=4", "parallel.ep=2"]
    counts = ParamCounts.of(load_config("mixtral-8x7b", base).model)
    opt = plan_memory(load_config("mixtral-8x7b", [*base, "parallel.shard=optimizer"]), counts=counts)
    full = plan_memory(load_config("mixtral-8x7b", [*base, "parallel.shard=full"]), counts=counts)
    dense, experts = counts.split_by_mp + counts.replicated, counts.experts / 2
    assert full.step["weights"] == pytest.approx(4 * (counts.outside_blocks + dense / 4 + experts / 2))
    block = (dense - counts.outside_blocks) / 8 + experts / 8
    assert full.step["gathered blocks"] == pytest.approx(4 * 2 * block)
    assert full.step["optimizer"] == pytest.approx(8 * (dense / 4 + experts / 2))
    assert full.step["optimizer"] < opt.step["optimizer"]
    assert full.step["gradients"] == opt.step["gradients"] and full.total < opt.total


def _plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fsmoe.cli", "plan", *args], capture_output=True, text=True,
                          timeout=120)


def _plan_here(capsys, *args: str) -> tuple[int, str]:
    """``fsmoe plan ARGS`` in this process (exit code, stdout + stderr)."""
    from fsmoe.cli import main

    code = main(["plan", *args])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_plan_memory_cli_says_what_fits_and_writes_json(tmp_path, capsys):
    out = tmp_path / "mem.json"
    done = _plan("--memory", "--config", "mixtral-8x7b", "--gpus", "8", "--ep", "8", "--gpu-gb", "139", "--set",
                 "train.batch_size=8", "train.activation_checkpointing=full", "--json", str(out))
    assert done.returncode == 0, done.stderr
    assert "fits" in done.stdout and "largest batch that fits" in done.stdout and "optimizer" in done.stdout
    plan = json.loads(out.read_text())
    assert plan["fits"] and plan["largest_batch_per_gpu"] >= 1 and plan["layout"]["ep"] == 8
    code, text = _plan_here(capsys, "--memory", "--config", "mixtral-8x7b", "--gpus", "8", "--ep", "8", "--gpu-gb", "40")
    assert code == 0 and "does NOT fit" in text and "try" in text


@pytest.mark.parametrize("args, field", [
    (["--memory", "--gpus", "3", "--mp", "2"], "--gpus"),
    (["--memory", "--gpu-gb", "0"], "--gpu-gb"),
    (["--memory", "--imbalance", "0.5"], "--imbalance"),
    (["--memory", "--shard", "optimizer", "--set", "parallel.placement=flexmoe"], "parallel"),
    ([], "--profile"),
])
def test_plan_bad_input_names_the_field(args, field, capsys):
    code, text = _plan_here(capsys, *args)
    assert code != 0 and field in text, text


def test_zero_slices_follow_dtensor_chunks_and_skip_taken_or_unsplittable_dims():
    """Uneven first dims split as torch.chunk / DTensor Shard do; a dim split by a group of one
    is free; a later dim only splits evenly; nothing to split keeps the whole state."""
    from types import SimpleNamespace

    import torch
    from torch import nn

    from fsmoe.parallel.sharding import ParamSharding, set_sharding
    from fsmoe.parallel.zero import slice_for

    def groups(n, index, ep=1):
        sizes = {"dp": n, "edp": n, "ep": ep, "esp": 1, "mp": 1}
        return SimpleNamespace(size=sizes.__getitem__, coords=SimpleNamespace(dp=index, edp=index))

    p = nn.Parameter(torch.zeros(10, 3))
    pieces = [slice_for(p, groups(4, i)) for i in range(4)]
    assert [(z.dim, z.offset, z.length) for z in pieces] == [(0, 0, 3), (0, 3, 3), (0, 6, 3), (0, 9, 1)]
    assert [len(c) for c in torch.chunk(torch.arange(10), 4)] == [z.length for z in pieces]
    assert slice_for(nn.Parameter(torch.zeros(5, 3)), groups(4, 0)) is None  # chunk 2: the last rank gets none
    expert = nn.Parameter(torch.zeros(4, 8, 6))
    set_sharding(expert, ParamSharding(reduce="edp", dims=((0, "ep"), (2, "esp"))))
    assert slice_for(expert, groups(2, 1)).dim == 0  # ep and esp of size 1 take nothing
    assert slice_for(expert, groups(2, 1, ep=2)).dim == 1  # dim 0 is EP's: the next dim, evenly
    bias = nn.Parameter(torch.zeros(6))
    set_sharding(bias, ParamSharding(reduce="dp", dims=((0, "mp"),)))
    assert slice_for(bias, SimpleNamespace(size={"dp": 2, "mp": 2}.__getitem__, coords=None)) is None


def test_when_no_batch_fits_the_plan_says_whether_the_states_or_the_smallest_batch_is_too_big(capsys):
    base = ["--memory", "--config", "mixtral-8x7b", "--gpus", "8", "--gpu-gb", "139", "--batch", "8",
            "--set", "train.activation_checkpointing=full"]
    code, out = _plan_here(capsys, *base, "--ep", "4", "--shard", "optimizer")
    assert code == 0 and "none (the weights, gradients and optimizer state alone do not fit)" in out
    code, out = _plan_here(capsys, *base, "--ep", "8", "--shard", "full", "--seq-len", "131072",
                           "--set", "model.max_seq_len=131072")
    assert code == 0 and "none (not even 1 sequence(s) per GPU" in out and "try a shorter --seq-len" in out
