"""Hybrid CPU/GPU inference: every policy and every forced class generates the plain model's
tokens, the partition against brute force, residency, the memory plan's errors.

Runs on the CPU (the "GPU" lane is the CPU there); scripts/gpu_check.sh runs the CUDA cases."""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fsmoe.config import ConfigError, ExpertsConfig, ModelConfig, MoEConfig, RouterConfig
from fsmoe.infer.generate import Sampling, generate
from fsmoe.infer.hybrid.memory import GiB, plan_gpu_memory
from fsmoe.infer.hybrid.model import HybridModel, detach_experts
from fsmoe.infer.hybrid.partition import CC, CG, GG, LaneCosts, best_split, forced_split, lanes
from fsmoe.infer.hybrid.policies import parse_policy
from fsmoe.infer.hybrid.residency import resident_experts
from fsmoe.models import build_model

CPU = torch.device("cpu")
COSTS = LaneCosts(cpu_fixed=2e-3, cpu_per_token=2e-4, gpu_fixed=5e-5, gpu_per_token=1e-6, stream=6e-3,
                  act_fixed=2e-5, act_per_token=1e-7)


def tiny(arch="llama", **kw) -> ModelConfig:
    moe = MoEConfig(num_experts=6, router=RouterConfig(top_k=2),
                    experts=ExpertsConfig(d_ff=24, activation="gelu" if arch == "gpt" else "swiglu"))
    base = dict(arch=arch, vocab_size=50, d_model=16, n_layers=3, n_heads=2, d_ff=32, max_seq_len=32, moe=moe)
    base.update(kw)
    return ModelConfig(**base)


def plain_and_hybrid(cfg: ModelConfig, slots: int, cpu_lane: str = "worker", costs: LaneCosts = COSTS):
    torch.manual_seed(0)
    plain = build_model(cfg, seed=3).eval()
    other = copy.deepcopy(plain)
    host = detach_experts(other, pin=False)
    memory = plan_gpu_memory(cfg, budget_gb=1.0, dense_params=1, kv_bytes=0, prefill_tokens=8)
    memory = type(memory)(**{**memory.__dict__, "budget": memory.fixed + slots * memory.per_expert})
    return plain, HybridModel(other, host, costs, memory, CPU, cpu_lane=cpu_lane)


def cuda_plain_and_hybrid(cfg: ModelConfig, slots: int, chunk: int, cpu_lane: str = "worker"):
    """:func:`plain_and_hybrid` moved to the GPU: the copy stream, two stream buffers of ``chunk``
    experts each, pinned host experts, float32."""
    from fsmoe.infer.hybrid.engine import StreamBuffers

    plain, hybrid = plain_and_hybrid(cfg, slots)
    dev = torch.device("cuda")
    plain.to(dev)
    hybrid.model.to(dev)
    hybrid.device = dev
    hybrid.buffers.__dict__.update(StreamBuffers(dev, cfg.d_model, cfg.moe.experts.d_ff, True, torch.float32,
                                                 chunk=chunk, cpu_lane=cpu_lane).__dict__)
    for ex in hybrid.executors:
        ex.experts.host = tuple(w.pin_memory() for w in ex.experts.host)
    return plain, hybrid


PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9]]


@pytest.mark.parametrize("arch", ["llama", "gpt"])
@pytest.mark.parametrize("policy", ["scheinfer", "model", "llamacpp", "fiddler", "stream", "static:0.5", "gpu"])
def test_every_policy_generates_the_plain_models_tokens(arch, policy):
    cfg = tiny(arch, moe_every=1 if arch == "llama" else 2)
    plain, hybrid = plain_and_hybrid(cfg, slots=5)
    want = generate(plain, PROMPTS, Sampling(max_new_tokens=6)).new_tokens
    hybrid.place(parse_policy(policy), hot_LE=np.arange(18 if arch == "llama" else 6).reshape(-1, 6))
    assert generate(hybrid.model, PROMPTS, Sampling(max_new_tokens=6)).new_tokens == want
    classes = set().union(*(s.active_classes() for s in hybrid.splits))
    if policy == "gpu":
        assert classes == {GG}
    elif policy == "fiddler":
        assert CG not in classes and {GG, CC} <= classes


@pytest.mark.parametrize("cpu_lane", ["worker", "inline"])
@pytest.mark.parametrize("forced", [GG, CG, CC])
def test_each_class_forced_everywhere_gives_the_plain_models_tokens(forced, cpu_lane):
    cfg = tiny()
    plain, hybrid = plain_and_hybrid(cfg, slots=0 if forced != GG else 18, cpu_lane=cpu_lane)
    want = generate(plain, PROMPTS, Sampling(max_new_tokens=5)).new_tokens
    hybrid.place(parse_policy({GG: "gpu", CG: "stream", CC: "fiddler"}[forced]))
    out = generate(hybrid.model, PROMPTS, Sampling(max_new_tokens=5))
    assert out.new_tokens == want
    assert set().union(*(s.active_classes() for s in hybrid.splits)) == {forced}


@pytest.mark.parametrize("early_rows", [0, 64])
def test_layer_outputs_and_dropped_rows_match_the_layers_own_experts(early_rows, monkeypatch):
    """One layer with capacity dropping: the hybrid executor's rows equal the layer's grouped experts,
    dropped rows stay 0, whatever the split; the CPU experts' rows gathered on the device, or taken
    from all rows sent to the host with the counts (a decode step's way)."""
    from fsmoe.layer import MoELayer
    from fsmoe.infer.hybrid import engine
    from fsmoe.infer.hybrid.engine import HybridExecutor, LayerExperts, StreamBuffers, linear_layout

    monkeypatch.setattr(engine, "EARLY_ROWS", early_rows)

    cfg = MoEConfig(num_experts=5, router=RouterConfig(top_k=2, capacity_factor=0.6),
                    experts=ExpertsConfig(d_ff=12, activation="swiglu"))
    torch.manual_seed(1)
    layer = MoELayer(cfg, 8).eval()
    x = torch.randn(2, 7, 8)
    with torch.no_grad():
        want, _ = layer(x)
        ex = layer.experts
        host = linear_layout(ex.w1_EDF.detach(), ex.w3_EDF.detach(), ex.w2_EFD.detach())
        resident = np.array([True, False, True, False, False])
        gpu = tuple(w[torch.tensor([0, 2])] for w in host)
        bufs = StreamBuffers(CPU, 8, 12, True, torch.float32, chunk=2)
        for classes in itertools.product([CG, CC], repeat=3):
            cls = list(classes)
            split = forced_split([1] * 5, resident, COSTS, np.array([False, cls[0] == CG, False, cls[1] == CG,
                                                                     cls[2] == CG]))
            layer.executor = HybridExecutor(0, LayerExperts(host, resident, gpu), bufs,
                                            lambda i, counts, res, n, s=split: s)
            got, stats = layer(x)
            assert stats.dropped > 0
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def brute_force(counts, resident, costs):
    free = [e for e in range(len(counts)) if not resident[e] and counts[e] > 0]
    best = np.inf
    for mask in itertools.product([False, True], repeat=len(free)):
        classes = np.where(resident, GG, CC)
        for e, m in zip(free, mask):
            if m:
                classes[e] = CG
        cpu, _, gpu = lanes(counts, classes, costs)
        best = min(best, max(cpu, gpu))
    return best


def test_partition_against_brute_force():
    rng, rng_call = np.random.default_rng(0), np.random.default_rng(1)
    exact = 0
    for case in range(300):
        E = int(rng.integers(2, 9))
        counts = rng.integers(0, [1, 4, 40, 400][case % 4] + 1, E)
        resident = rng.random(E) < 0.3
        timed = [k for k in COSTS.__dict__ if k not in ("cpu_call", "cpu_kernel_tokens")]
        costs = LaneCosts(*(COSTS.__dict__[k] * rng.uniform(0.3, 3) for k in timed),
                          cpu_call=rng_call.uniform(0, 3e-3))  # the batched CPU call's start
        ours = best_split(counts, resident, costs)
        ref = brute_force(counts, resident, costs)
        cpu, _, gpu = lanes(counts, ours.classes, costs, ours.cg_order)
        assert max(cpu, gpu) == pytest.approx(ours.predicted_s)
        # The busiest-first prefix is exact unless the GPU lane binds; then a quieter expert's
        # shorter GEMM can end the layer a little sooner.
        assert ours.predicted_s <= ref * 1.01 + 1e-12, (counts, resident)
        exact += ours.predicted_s <= ref * (1 + 1e-9) + 1e-15
    assert exact >= 240


def test_decode_goes_to_the_cpu_and_prefill_streams():
    resident = np.zeros(8, dtype=bool)
    decode = best_split([1, 0, 1, 0, 0, 0, 0, 0], resident, COSTS)
    prefill = best_split([500] * 8, resident, COSTS)
    assert decode.count(CG) == 0 and prefill.count(CC) == 0
    mid = best_split([60, 50, 3, 2, 1, 1, 0, 0], resident, COSTS)  # the busy ones streamed, the rest on CPU
    assert mid.classes[:2] == (CG, CG) and mid.classes[2:6] == (CC,) * 4


def test_residency_by_expert_and_by_layer():
    hot = np.array([[5, 1, 0], [2, 9, 3]])
    assert resident_experts(hot, 3, "expert").tolist() == [[True, False, False], [False, True, True]]
    assert resident_experts(hot, 4, "layer").tolist() == [[False] * 3, [True] * 3]
    assert not resident_experts(hot, 2, "layer").any()
    assert resident_experts(hot, 0, "all").all()
    with pytest.raises(ValueError, match="granularity"):
        resident_experts(hot, 1, "rows")


def test_memory_budget_too_small_for_attention_and_kv_cache_is_a_clear_error():
    cfg = tiny()
    with pytest.raises(ConfigError, match="--gpu-mem-gb.*KV cache"):
        plan_gpu_memory(cfg, budget_gb=0.5, dense_params=10**8, kv_bytes=GiB // 2, prefill_tokens=16)
    plan = plan_gpu_memory(cfg, budget_gb=1, dense_params=10**6, kv_bytes=2**20, prefill_tokens=16)
    assert plan.slots == 18  # everything fits


def test_policy_names():
    assert parse_policy("static:0.25").share == 0.25
    for bad in ("static:2", "static:x", "ktransformers"):
        with pytest.raises(ConfigError, match="--policy"):
            parse_policy(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh)")
@pytest.mark.parametrize("cpu_lane", ["worker", "inline"])
@pytest.mark.parametrize("policy", ["scheinfer", "fiddler", "stream", "llamacpp", "static:0.5"])
def test_cuda_lanes_give_the_plain_models_logits(policy, cpu_lane):
    """On CUDA (copy stream, two buffers, CPU worker): prefill and decode logits equal the plain model's
    on the GPU, float32, for every policy; many experts so buffers are reused across layers."""
    from fsmoe.models.kv_cache import KVCache

    cfg = tiny(n_layers=4, moe=MoEConfig(num_experts=12, router=RouterConfig(top_k=3),
                                         experts=ExpertsConfig(d_ff=40, activation="swiglu", gemm="torch")))
    plain, hybrid = cuda_plain_and_hybrid(cfg, slots=10, chunk=3, cpu_lane=cpu_lane)
    dev = torch.device("cuda")
    hybrid.place(parse_policy(policy), hot_LE=np.arange(48).reshape(4, 12) % 7)
    idx = torch.randint(0, 50, (2, 20), device=dev)
    with torch.no_grad():
        caches = [KVCache.for_model(m, 2, 21) for m in (plain, hybrid.model)]
        outs = [m(idx, cache=c, start=0).logits for m, c in zip((plain, hybrid.model), caches)]
        torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
        nxt = outs[0][:, -1].argmax(-1, keepdim=True)
        steps = [m(nxt, cache=c, start=20).logits for m, c in zip((plain, hybrid.model), caches)]
        torch.testing.assert_close(steps[1], steps[0], atol=1e-4, rtol=1e-4)
    used = set().union(*(s.active_classes() for s in hybrid.splits))
    assert used >= {GG, CC} if policy == "fiddler" else used >= ({CC, CG} if policy == "llamacpp" else {GG})


def test_lanes_that_share_host_memory_run_at_their_contended_costs():
    costs = LaneCosts(**{**COSTS.__dict__, "cpu_contended": 2.0, "stream_contended": 1.5})
    counts, resident = [3, 3], [False, False]
    alone_cpu, _, _ = lanes(counts, [CC, CC], costs)
    mixed_cpu, mixed_pcie, _ = lanes(counts, [CC, CG], costs)
    assert mixed_pcie == pytest.approx(1.5 * costs.stream)
    assert mixed_cpu - costs.act_fixed - 3 * costs.act_per_token == pytest.approx(2 * costs.cpu(3))
    assert alone_cpu - costs.act_fixed - 6 * costs.act_per_token == pytest.approx(2 * costs.cpu(3))
    split = best_split(counts, resident, costs)
    assert split.predicted_s == pytest.approx(max(lanes(counts, split.classes, costs, split.cg_order)[::2]))


def test_the_cpu_lane_is_refitted_from_what_the_forwards_measure():
    _, hybrid = plain_and_hybrid(tiny(), slots=0)
    split = best_split([0, 5, 0, 0, 0, 0], [False] * 6, COSTS)
    assert split.classes[1] == CC
    for _ in range(30):
        hybrid._observe_cpu(split, 3 * COSTS.cpu(5))  # the CPU runs three times slower than modelled
    assert hybrid.cpu_scale == pytest.approx(3, rel=0.01)
    assert hybrid.costs.cpu(5) == pytest.approx(3 * COSTS.cpu(5), rel=0.01)
    assert hybrid.costs.stream == COSTS.stream


def test_one_outlying_forward_does_not_price_the_cpu_lane_out():
    """The first CC forward once built the native kernel (seconds against a modelled 0.3 ms): the
    refit priced the CPU lane at 120x and no split chose it again, so nothing measured it back."""
    from fsmoe.infer.hybrid.model import CPU_REFIT_STEP, CPU_REFIT_WEIGHT

    _, hybrid = plain_and_hybrid(tiny(), slots=0)
    split = best_split([0, 5, 0, 0, 0, 0], [False] * 6, COSTS)
    hybrid._observe_cpu(split, 1e4 * COSTS.cpu(5))
    assert hybrid.cpu_scale == pytest.approx(CPU_REFIT_STEP ** CPU_REFIT_WEIGHT)
    assert best_split([0, 5, 0, 0, 0, 0], [False] * 6, hybrid.costs).classes[1] == CC
    for _ in range(40):
        hybrid._observe_cpu(split, 2 * COSTS.cpu(5))
    assert hybrid.cpu_scale == pytest.approx(2, rel=0.02)


def test_the_race_times_each_candidate_then_keeps_the_fastest_and_retries_the_runner_up():
    from fsmoe.infer.hybrid.race import MIN_SAMPLES, RETRY, SplitRace

    race, now = SplitRace(), 0.0
    took = {"model": 3.0, "stream": 1.0, "cpu": 2.0}  # the model's own split is the slowest here
    predicted = {"model": 1.0, "stream": 1.5, "cpu": 5.0}  # cpu priced past RACE_WITHIN: never raced
    picks = []
    for forward in range(40):
        for layer in range(4):
            pick = race.pick(layer, 1, now, predicted.__getitem__)
            picks.append(pick)
            now += took[pick]
        now += 100.0  # between forwards: not charged to the last layer
    assert set(picks[:2 * MIN_SAMPLES]) == {"model", "stream"} and "cpu" not in picks
    bucket = race.buckets[1]
    assert bucket.tallies["model"].mean == pytest.approx(3.0) and bucket.tallies["stream"].mean == pytest.approx(1.0)
    assert race.summary() == {"1": {"model": 3000.0, "stream": 1000.0}}
    later = picks[4 * MIN_SAMPLES:]
    assert later.count("model") == sum(1 for t in range(4 * MIN_SAMPLES + 1, len(picks) + 1) if t % RETRY == 0)
    assert race.pick(0, 512, now, predicted.__getitem__) == "model"  # another size is raced afresh


def test_one_slow_first_layer_does_not_price_a_candidate_out_of_the_race():
    """On an H200 host streaming's first forward compiled its kernels (seconds in one layer), the
    race timed it at 367 ms per layer and never ran it again. The first times' median, then times
    bounded at OUTLIER x the mean."""
    from fsmoe.infer.hybrid.race import MIN_SAMPLES, OUTLIER, Tally

    t = Tally()
    for seconds in [5.0] + [1e-3] * (MIN_SAMPLES - 1):
        t.add(seconds)
    assert t.mean == pytest.approx(1e-3)
    t.add(1.0)
    assert t.mean == pytest.approx(1e-3 + (OUTLIER - 1) * 1e-3 / (MIN_SAMPLES + 1))


def test_scheinfer_races_its_split_and_the_model_policy_does_not():
    _, hybrid = plain_and_hybrid(tiny(), slots=4)
    hybrid.place(parse_policy("scheinfer"), hot_LE=np.arange(18).reshape(3, 6))
    generate(hybrid.model, PROMPTS, Sampling(max_new_tokens=6))
    timed = hybrid.race.summary()
    assert timed and all(timed.values())  # consecutive MoE layers were timed in every size seen
    hybrid.place(parse_policy("model"))
    assert hybrid.race is None


# ---------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A two-step fsmoe run of the tiny preset (byte tokens)."""
    from fsmoe import cli

    run = tmp_path_factory.mktemp("hybrid") / "run"
    assert cli.main(["train", "--run-dir", str(run), "--steps", "2", "--set", "train.batch_size=2",
                     "train.seq_len=16", "train.eval_batches=1", "train.data_limit_mb=0.05"]) == 0
    return run


def test_generate_names_an_empty_prompt_an_infinite_temperature_and_a_missing_model(tiny_run, tmp_path, capsys):
    from fsmoe import cli

    for args, option in (([str(tiny_run), "--prompt", ""], "--prompt"),
                         ([str(tiny_run), "--prompt", "hi", "--temperature", "inf"], "--temperature"),
                         ([str(tmp_path / "nowhere"), "--prompt", "hi"], "model")):
        assert cli.main(["generate", *args, "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert f"{option}=" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_fsmoe_infer_generates_what_fsmoe_generate_does(tiny_run, tmp_path, capsys):
    from fsmoe import cli

    # on the CPU (a GPU machine too): a budget of 10 MB, if applied to the GPU, stays applied in this process
    args = [str(tiny_run), "--prompt-ids", "1 2 3", "--prompt-ids", "9 8", "--max-new-tokens", "6", "--device", "cpu"]
    assert cli.main(["generate", *args]) == 0
    want = [line for line in capsys.readouterr().out.splitlines() if "->" in line]
    hot = tmp_path / "hot.json"
    assert cli.main(["infer", *args, "--gpu-mem-gb", "0.01", "--save-hot", str(hot),
                     "--timeline", str(tmp_path / "tl")]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if "->" in line] == want and "hybrid scheinfer" in out
    assert "CPU experts on " in out and "thread" in out  # what computes them, said once
    assert (tmp_path / "tl" / "timeline.json").is_file() and (tmp_path / "tl" / "timeline.png").is_file()
    events = json.loads((tmp_path / "tl" / "timeline.json").read_text())["traceEvents"]
    host = {e["name"].split(" ", 1)[1] for e in events if e.get("cat") == "host"}
    assert {"wait for counts", "split", "issue"} <= host, host  # the GPU issuer's own lane
    for policy, lane in (("llamacpp", "worker"), ("fiddler", "inline"), ("stream", "worker"), ("static:0.5", "inline")):
        assert cli.main(["infer", *args, "--gpu-mem-gb", "0.01", "--hot", str(hot), "--policy", policy,
                         "--cpu-lane", lane]) == 0
        assert [line for line in capsys.readouterr().out.splitlines() if "->" in line] == want


@pytest.mark.parametrize("extra, field", [
    (["--gpu-mem-gb", "0.0001"], "--gpu-mem-gb"),
    (["--gpu-mem-gb", "0"], "--gpu-mem-gb"),
    # on the CPU: a budget applied to a GPU would stay applied in this process
    (["--gpu-mem-gb", "1", "--policy", "ktransformers", "--device", "cpu"], "--policy"),
    (["--gpu-mem-gb", "1", "--hot", "HOT_BAD_SHAPE", "--device", "cpu"], "--hot"),
    (["--gpu-mem-gb", "1", "--hot", "MISSING", "--device", "cpu"], "--hot"),
    (["--gpu-mem-gb", "1", "--costs", "MISSING", "--device", "cpu"], "--costs"),
    (["--gpu-mem-gb", "1", "--zero-copy", "on", "--device", "cpu"], "--zero-copy"),
    (["--gpu-mem-gb", "1", "--cpu-on-device", "on", "--device", "cpu"], "--cpu-on-device"),
])
def test_fsmoe_infer_bad_input_is_one_line_naming_the_option(tiny_run, tmp_path, capsys, extra, field):
    from fsmoe import cli

    bad = tmp_path / "hot.json"
    bad.write_text("[[1, 2], [3, 4]]")
    extra = [str(bad) if a == "HOT_BAD_SHAPE" else str(tmp_path / "missing.json") if a == "MISSING" else a
             for a in extra]
    assert cli.main(["infer", str(tiny_run), "--prompt-ids", "1 2", "--max-new-tokens", "2", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {field}") and "Traceback" not in err


@pytest.mark.parametrize("option", ["--zero-copy", "--cpu-on-device"])
def test_bench_infer_refuses_in_place_reads_where_they_cannot_run(tmp_path, capsys, option):
    from fsmoe import cli

    assert cli.main(["bench", "infer", "--config", "tiny", "--device", "cpu", "--gpu-mem-gb", "0.01",
                     option, "on", "--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {option}") and not (tmp_path / "b").exists()


def test_the_cpu_lane_on_the_device_path_says_what_it_needs():
    from fsmoe.config import ConfigError
    from fsmoe.infer.hybrid import mailbox

    from fsmoe.infer.hybrid.cpu_kernel import CpuExpertKernel

    assert not mailbox.resolve("off", True, torch.bfloat16)
    # auto (the default): on wherever it can run, quietly off elsewhere
    for choice in (None, "auto"):
        assert mailbox.resolve(choice, True, torch.bfloat16) == (CpuExpertKernel.load() is not None)
        assert not mailbox.resolve(choice, False, torch.bfloat16) and not mailbox.resolve(choice, True, torch.float32)
    with pytest.raises(ConfigError, match="--cpu-on-device='on'.*in-place expert kernels"):
        mailbox.resolve("on", False, torch.bfloat16)
    with pytest.raises(ConfigError, match="--cpu-on-device='on'.*bfloat16"):
        mailbox.resolve("on", True, torch.float32)
    with pytest.raises(ConfigError, match="--cpu-on-device='maybe'.*allowed: auto, on, off"):
        mailbox.resolve("maybe", True, torch.bfloat16)


def test_bench_infer_runs_every_policy_and_writes_its_report(tmp_path, capsys):
    from fsmoe import cli

    out = tmp_path / "bench"
    assert cli.main(["bench", "infer", "--config", "tiny", "--tokens", "1,8", "--new-tokens", "3", "--prefill", "8",
                     "--calib-tokens", "16", "--gpu-mem-gb", "0.01", "--device", "cpu", "--out", str(out),
                     "--timelines", "scheinfer,static:0.5"]) == 0

    report = json.loads((out / "results.json").read_text())
    assert [r["policy"] for r in report["results"]][:3] == ["scheinfer", "model", "llamacpp"]
    assert report["results"][0]["race_ms_per_layer"]
    assert all(len(r["decode_runs"]) == 3 and len(r["prefill_runs"]) == 3 for r in report["results"])
    assert set(report["adaptive_vs_fixed"]) == {"1", "8"}
    assert report["cpu_experts"].startswith("CPU experts on ")
    for name in ("sweep.png", "costs.json", "timeline_prefill.json", "timeline_decode.png",
                 "timeline_static0.5_decode.json"):
        assert (out / name).is_file(), name
    assert report["step_ms"]["static:0.5"]["decode"]["wall"] > 0
    assert cli.main(["bench", "infer", "--config", "tiny", "--timelines", "llama.cpp", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("error: --timelines")
    assert cli.main(["bench", "infer", "--config", "tiny", "--tokens", "0,x", "--device", "cpu"]) == 2
    assert "--tokens" in capsys.readouterr().err
    assert cli.main(["bench", "infer", "--config", "tiny", "--repeats", "0", "--device", "cpu"]) == 2
    assert "--repeats" in capsys.readouterr().err
    # tiny's context is 128 tokens: the default calibration forward (2048) and a long prefill are refused by name
    assert cli.main(["bench", "infer", "--config", "tiny", "--device", "cpu"]) == 2
    assert "--calib-tokens" in capsys.readouterr().err
    assert cli.main(["bench", "infer", "--config", "tiny", "--device", "cpu", "--calib-tokens", "16",
                     "--prefill", "126"]) == 2
    assert "--prefill" in capsys.readouterr().err


@pytest.mark.parametrize("preset, arch", [("qwen3-30b-a3b", "qwen3moe"), ("mixtral-8x7b", "llama")])
def test_write_gguf_gives_llama_cpp_its_tensor_names_and_shapes(tmp_path, preset, arch):
    """scripts/write_gguf.py: the names, ggml shapes and metadata llama.cpp's loader reads (the files
    were also run by llama-bench on a CPU build)."""
    import subprocess
    import sys

    gguf = pytest.importorskip("gguf")
    out = tmp_path / "m.gguf"
    subprocess.run([sys.executable, "scripts/write_gguf.py", str(out), "--config", preset, "--set",
                    "model.n_layers=2", "model.vocab_size=100", "model.d_model=64", "model.n_heads=4",
                    "model.n_kv_heads=2", "model.head_dim=16", "model.moe.num_experts=4",
                    "model.moe.experts.d_ff=32", "model.moe.router.top_k=2"], check=True, timeout=120,
                   cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    r = gguf.GGUFReader(str(out))
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}  # ggml order: fastest dim first
    assert shapes["blk.1.ffn_gate_exps.weight"] == (64, 32, 4)
    assert shapes["blk.1.ffn_down_exps.weight"] == (32, 64, 4)
    assert shapes["blk.0.attn_q.weight"] == (64, 64) and shapes["token_embd.weight"] == (64, 100)
    assert ("blk.0.attn_q_norm.weight" in shapes) == (arch == "qwen3moe")
    field = r.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == arch
    assert int(r.fields[f"{arch}.expert_count"].parts[-1][0]) == 4


def test_a_materialised_model_starts_with_the_buffers_its_constructor_gives():
    """fsmoe.infer.model.materialise with fresh weights (fsmoe bench infer's random model) puts the
    DeepSeek router's expert bias back to zero, whatever memory to_empty handed out."""
    from fsmoe.infer.model import materialise

    cfg = tiny(moe=MoEConfig(num_experts=6, router=RouterConfig(name="deepseek", top_k=2, aux_loss_coef=0.0),
                             experts=ExpertsConfig(d_ff=24, activation="swiglu")))
    model = build_model(cfg, seed=0)
    for layer in model.moe_layers():
        layer.router.expert_bias.fill_(7.0)  # as if moved by training, or left in reused memory
    materialise(model, torch.device("cpu"), torch.float32, init=True)
    biases = [layer.router.expert_bias for layer in model.moe_layers()]
    assert biases and all(torch.equal(b, torch.zeros_like(b)) for b in biases)


def _native_kernels(tmp_path) -> list:
    """The kernel as loaded, and the paths other CPUs build, where this one has what the loaded
    kernel uses: without AMX (``-mno-amx-tile -mno-amx-bf16``: bf16 dot products only) and
    without AVX512-BF16 (``-mno-avx512bf16``: float32 FMAs)."""
    from fsmoe.infer.hybrid import cpu_kernel

    kernel = cpu_kernel.CpuExpertKernel.load()
    if kernel is None:
        pytest.skip("no C compiler here: the CPU experts run on torch")
    kernels = [kernel]
    flags = Path("/proc/cpuinfo").read_text()
    for feature, off in (("amx_bf16", ("-mno-amx-tile", "-mno-amx-bf16")), ("avx512_bf16", ("-mno-avx512bf16",))):
        if feature in flags:
            path = tmp_path / f"without_{feature}.so"
            cpu_kernel._compile(path, off)
            kernels.append(cpu_kernel.CpuExpertKernel(cpu_kernel._load_quiet(path)))
    return kernels


@pytest.mark.parametrize("swiglu", [True, False])
def test_native_cpu_expert_kernel_is_as_close_to_float64_as_torchs_bf16(swiglu, tmp_path):
    """The compiled kernel (where this machine has a C compiler), each path it has here (AMX tiles
    from four tokens where D and F are multiples of 32, any number of tokens, 32 a pass; bf16 dot
    products, the hidden rounded to bf16 as torch rounds it; float32 FMAs; these two up to 16
    tokens), at odd and tile-sized shapes: about as near the float64 result as torch's bf16 path,
    written into ``out``."""
    from fsmoe.infer.hybrid.engine import expert_mlp

    for kernel in _native_kernels(tmp_path):
        g = torch.Generator().manual_seed(0)
        for D, F_ in ((37, 13), (64, 48), (200, 72), (64, 96)):
            w1, w3 = ((torch.randn(F_, D, generator=g) / D ** 0.5).bfloat16() for _ in range(2))
            w2 = (torch.randn(D, F_, generator=g) / F_ ** 0.5).bfloat16()
            w3 = w3 if swiglu else None
            for n in (1, 3, 4, 8, 13, 16, 17, 32, 45, 70):
                if n > kernel.row_limit(D, F_):
                    continue
                x = torch.randn(n, D, generator=g).bfloat16()
                ref = expert_mlp(*(None if t is None else t.double() for t in (x, w1, w3, w2)))
                out = torch.full((n, D), float("nan"), dtype=torch.bfloat16)
                got = kernel(x, w1, w3, w2, out, threads=2)
                assert got.data_ptr() == out.data_ptr()
                err = ((got.double() - ref).norm() / ref.norm()).item()
                torch_err = ((expert_mlp(x, w1, w3, w2).double() - ref).norm() / ref.norm()).item()
                assert err < 4e-3 and err <= 1.25 * torch_err, (D, F_, n, err, torch_err)


def test_the_native_kernel_takes_as_many_tokens_as_its_path_beats_torch_at(tmp_path, monkeypatch):
    """By default AMX tiles (where present, dims multiples of 32) up to 128 tokens per expert (they
    accept any number), bf16 dot products up to 8, float32 FMAs up to 4; the host path's CPU experts
    go to torch beyond. ``FSMOE_CPU_KERNEL_TOKENS`` moves the bound, up to what the path accepts."""
    from fsmoe.infer.hybrid.cpu_kernel import (KERNEL_MAX_TOKENS, MAX_TOKENS_BY_PATH, TOKENS_ENV, UNBOUNDED,
                                               native_applies, native_max_tokens)

    monkeypatch.delenv(TOKENS_ENV, raising=False)
    flags = Path("/proc/cpuinfo").read_text()
    loaded, *others = _native_kernels(tmp_path)
    want = "amx" if "amx_bf16" in flags else "bf16" if "avx512_bf16" in flags else "fp32"
    assert loaded.path(64, 96) == want and loaded.path(37, 13) == ("fp32" if want == "fp32" else "bf16")
    assert [k.path(64, 96) for k in others] == {"amx": ["bf16", "fp32"], "bf16": ["fp32"], "fp32": []}[want]
    assert loaded.row_limit(64, 96) == (UNBOUNDED if want == "amx" else KERNEL_MAX_TOKENS)
    assert loaded.row_limit(37, 13) == KERNEL_MAX_TOKENS
    assert all(k.row_limit(64, 96) == KERNEL_MAX_TOKENS for k in others)
    x, w1 = torch.zeros(200, 64).bfloat16(), torch.zeros(3, 96, 64).bfloat16()
    assert native_max_tokens(x, w1) == MAX_TOKENS_BY_PATH[want] and native_max_tokens(x, w1, 2) == 2
    assert native_applies(x[:MAX_TOKENS_BY_PATH[want]], w1[0]) and not native_applies(x.float(), w1[0].float())
    assert native_applies(x[:16], w1[0]) == (want == "amx")
    assert native_applies(x, w1[0], UNBOUNDED) == (want == "amx")  # 200 rows: only the tiles take them
    monkeypatch.setenv(TOKENS_ENV, "3")
    assert native_max_tokens(x, w1) == 3 and not native_applies(x[:4], w1[0])
    monkeypatch.setenv(TOKENS_ENV, "100000")
    assert native_max_tokens(x, w1) == min(100000, loaded.row_limit(64, 96))
    for bad in ("-1", "lots", "2.5"):
        monkeypatch.setenv(TOKENS_ENV, bad)
        with pytest.raises(ConfigError, match=TOKENS_ENV):
            native_max_tokens(x, w1)


def test_lane_costs_time_the_kernel_against_torch_and_the_engine_takes_the_crossover(monkeypatch):
    """The CPU lane's cost is the faster of the native kernel and torch's GEMM at each size timed;
    the sizes where the kernel won become the engine's bound for it (its user's
    ``FSMOE_CPU_KERNEL_TOKENS`` wins over the measured one)."""
    from fsmoe.infer.hybrid import hardware
    from fsmoe.infer.hybrid.cpu_kernel import TOKENS_ENV, CpuExpertKernel

    if CpuExpertKernel.load() is None:
        pytest.skip("no C compiler here: the CPU experts run on torch")
    monkeypatch.delenv(TOKENS_ENV, raising=False)
    pace = {0: 1.0}  # torch's seconds at every size; the kernel's: n * 0.01 (wins up to 64 of 1..256)

    def fake_median(fn, sync, reps):
        return fn()

    def fake_host_many(n, max_tokens):
        return lambda: pace[0] if max_tokens == 0 else n * 0.01

    monkeypatch.setattr(hardware, "median_seconds", fake_median)

    class Now:  # the pool's submit, run at once
        def submit(self, fn, *a):
            class Done:
                def result(self_inner):
                    return fn(*a)
            return Done()

    times, tokens = hardware._cpu_times(Now(), fake_host_many, reps=1, native=True)
    assert tokens == 64 and times == [min(n * 0.01, 1.0) for n in hardware.CPU_TOKENS]
    pace[0] = 0.001  # torch always faster: the kernel takes no expert
    assert hardware._cpu_times(Now(), fake_host_many, reps=1, native=True)[1] == 0
    pace[0] = 100.0
    assert hardware._cpu_times(Now(), fake_host_many, reps=1, native=True)[1] == hardware.CPU_TOKENS[-1]
    torch_only = hardware._cpu_times(Now(), fake_host_many, reps=1, native=False)
    assert torch_only == ([100.0] * len(hardware.CPU_TOKENS), None)

    timings = {}
    hardware._cpu_times(Now(), fake_host_many, reps=1, native=True, timings=timings)
    line = hardware.describe_cpu_timings(timings)
    assert line.startswith("CPU lane timed 4 experts a call, ms on kernel / torch")
    assert "256: 2560.00 / 100000.00" in line
    assert hardware.describe_cpu_timings({}) == ""

    _, hybrid = plain_and_hybrid(tiny(), slots=2, costs=dataclasses.replace(COSTS, cpu_kernel_tokens=24))
    assert hybrid.buffers.cpu_kernel_tokens == 24
    assert "up to 24 tokens" in hybrid.describe_cpu() or "torch's GEMM" in hybrid.describe_cpu()
    monkeypatch.setenv(TOKENS_ENV, "5")
    _, hybrid = plain_and_hybrid(tiny(), slots=2, costs=dataclasses.replace(COSTS, cpu_kernel_tokens=24))
    assert hybrid.buffers.cpu_kernel_tokens is None


def test_without_a_compiler_the_cpu_experts_run_on_torch(monkeypatch, tmp_path):
    from fsmoe.infer.hybrid import cpu_kernel
    from fsmoe.infer.hybrid.engine import expert_mlp

    monkeypatch.setenv("FSMOE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernel.shutil, "which", lambda name: None)
    monkeypatch.setattr(cpu_kernel.CpuExpertKernel, "_loaded", False)
    x, w1, w2 = torch.randn(2, 8).bfloat16(), torch.randn(6, 8).bfloat16(), torch.randn(8, 6).bfloat16()
    with pytest.warns(UserWarning, match="no C compiler"):
        got = cpu_kernel.cpu_expert_mlp(x, w1, None, w2)
    assert torch.equal(got, expert_mlp(x, w1, None, w2))
    assert cpu_kernel.CpuExpertKernel.load() is None and not list(tmp_path.iterdir())


@pytest.mark.parametrize("swiglu", [True, False])
@pytest.mark.parametrize("D, F_", [(40, 24), (64, 96)])  # (64, 96): AMX tiles for the experts of 4+ rows, where present
def test_cpu_experts_in_one_call_equal_one_by_one(swiglu, D, F_):
    """A layer's CPU experts together (one native call for those with at most max_tokens rows, the
    rest one by one) give what each expert computed alone gives, in their rows of ``out``."""
    from fsmoe.infer.hybrid.cpu_kernel import CpuExpertKernel, cpu_expert_mlp, cpu_experts_mlp

    if CpuExpertKernel.load() is None:
        pytest.skip("no C compiler here: the CPU experts run on torch")
    g = torch.Generator().manual_seed(0)
    E = 7
    w = ((torch.randn(E, F_, D, generator=g) / D ** 0.5).bfloat16(),
         (torch.randn(E, F_, D, generator=g) / D ** 0.5).bfloat16() if swiglu else None,
         (torch.randn(E, D, F_, generator=g) / F_ ** 0.5).bfloat16())
    # 9 rows: past max_tokens=4, so torch's path; with max_tokens=64 the tiles take 40 rows in the call
    for max_tokens, experts, counts in ((4, [5, 0, 3, 6, 2], [1, 3, 9, 2, 4]), (64, [1, 4, 0], [40, 5, 70])):
        x = torch.randn(sum(counts), D, generator=g).bfloat16()
        out = torch.full_like(x, float("nan"))
        got = cpu_experts_mlp(x, w, experts, counts, out, threads=2, max_tokens=max_tokens)
        assert got.data_ptr() == out.data_ptr()
        r = 0
        for e, n in zip(experts, counts):
            alone = cpu_expert_mlp(x[r:r + n], *(None if t is None else t[e] for t in w), threads=2,
                                   max_tokens=max_tokens)
            assert torch.equal(out[r:r + n], alone), (e, n)
            r += n


def test_cpu_expert_threads_take_the_environment_and_refuse_a_bad_count(monkeypatch):
    from fsmoe.infer.hybrid.engine import CPU_THREADS_ENV, cpu_expert_threads

    monkeypatch.delenv(CPU_THREADS_ENV, raising=False)
    assert cpu_expert_threads() >= 1
    monkeypatch.setenv(CPU_THREADS_ENV, "3")
    assert cpu_expert_threads() == 3
    for bad in ("0", "many", "-2"):
        monkeypatch.setenv(CPU_THREADS_ENV, bad)
        with pytest.raises(ConfigError, match=CPU_THREADS_ENV):
            cpu_expert_threads()


def test_native_kernel_refuses_rows_outside_x_and_bad_spin(monkeypatch):
    from fsmoe.config import ConfigError
    from fsmoe.infer.hybrid import cpu_kernel

    kernel = cpu_kernel.CpuExpertKernel.load()
    if kernel is None:
        pytest.skip("no C compiler here: the CPU experts run on torch")
    w = (torch.zeros(2, 4, 8).bfloat16(), None, torch.zeros(2, 8, 4).bfloat16())
    x = torch.zeros(3, 8).bfloat16()
    with pytest.raises(RuntimeError, match="counts"):
        kernel.many(x, w, np.array([0]), np.array([2]), np.array([2]), torch.empty_like(x), 1)  # rows 2..3 of 3
    with pytest.raises(ValueError, match="out of range"):
        kernel.many(x, w, np.array([2]), np.array([0]), np.array([1]), torch.empty_like(x), 1)
    monkeypatch.setenv(cpu_kernel.SPIN_ENV, "lots")
    monkeypatch.setattr(cpu_kernel.CpuExpertKernel, "_loaded", False)
    with pytest.raises(ConfigError, match="FSMOE_CPU_SPIN"):
        cpu_kernel.CpuExpertKernel.load()


def test_overlap_share_counts_only_the_work_lanes():
    from fsmoe.infer.hybrid.timeline import overlap_share

    spans = [("host", "L0 issue", 0.0, 4.0), ("cpu", "L0 CC", 0.0, 2.0), ("gpu", "L0 GG", 1.0, 3.0)]
    assert overlap_share(spans) == pytest.approx(1 / 3)  # cpu+gpu overlap 1 of 3 busy; the host is not work


@pytest.mark.parametrize("swiglu", [True, False])
def test_grouped_expert_mlp_equals_each_expert_alone(swiglu):
    """The engine's grouped MLP (torch's grouped GEMM unmasked: every row belongs to an expert) gives
    each expert's own MLP on its rows, empty experts included."""
    from fsmoe.infer.hybrid.engine import expert_mlp, grouped_expert_mlp

    g = torch.Generator().manual_seed(0)
    G, D, F_ = 4, 16, 24
    w = (torch.randn(G, F_, D, generator=g), torch.randn(G, F_, D, generator=g) if swiglu else None,
         torch.randn(G, D, F_, generator=g))
    counts = [3, 0, 5, 2]
    x = torch.randn(sum(counts), D, generator=g)
    got = grouped_expert_mlp(x, w, torch.tensor(np.cumsum(counts), dtype=torch.int32))
    r = 0
    for e, n in enumerate(counts):
        want = expert_mlp(x[r:r + n], *(None if t is None else t[e] for t in w))
        torch.testing.assert_close(got[r:r + n], want, atol=1e-4, rtol=1e-4)
        r += n
