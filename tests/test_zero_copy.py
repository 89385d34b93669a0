"""Streamed experts read in place from pinned host memory (fsmoe/infer/hybrid/zero_copy.py).

Runs where its Triton kernels run: on a GPU (scripts/gpu_check.sh), or on the CPU under Triton's
interpreter (``TRITON_INTERPRET=1`` with Triton installed; float32 and float16 there). The switch
and its errors, which placements run on the device alone and what a decode capture is keyed by are
checked everywhere; with Triton installed (no GPU needed), that the kernels compile for Hopper."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fsmoe.config import ConfigError
from fsmoe.infer.hybrid import zero_copy
from fsmoe.infer.hybrid.engine import expert_mlp

CUDA = torch.cuda.is_available()
INTERPRET = zero_copy.triton is not None and os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = ["cuda"] if CUDA else (["cpu"] if INTERPRET else [])
needs_kernels = pytest.mark.skipif(not DEVICES, reason="needs Triton with CUDA, or TRITON_INTERPRET=1")


def test_the_switch_and_its_bad_values(monkeypatch):
    monkeypatch.setenv(zero_copy.ENV, "yes")
    with pytest.raises(ConfigError, match="FSMOE_ZERO_COPY.*allowed: 0"):
        zero_copy.enabled(torch.device("cuda"), torch.bfloat16)
    monkeypatch.setenv(zero_copy.ENV, "0")
    assert not zero_copy.enabled(torch.device("cuda"), torch.bfloat16)
    monkeypatch.delenv(zero_copy.ENV)  # on wherever the kernels run
    assert zero_copy.enabled(torch.device("cuda"), torch.bfloat16) == (zero_copy.triton is not None)
    monkeypatch.setenv(zero_copy.ENV, "1")
    assert zero_copy.enabled(torch.device("cuda"), torch.bfloat16) == (zero_copy.triton is not None)
    assert not zero_copy.enabled(torch.device("cpu"), torch.bfloat16)  # no GPU to read host memory
    assert not zero_copy.enabled(torch.device("cuda"), torch.float64)


def _experts(E, D, F, dtype, swiglu, device):
    g = torch.Generator().manual_seed(E * D + F)
    w = [torch.randn(E, F, D, generator=g) / D ** 0.5, torch.randn(E, F, D, generator=g) / D ** 0.5 if swiglu else None,
         torch.randn(E, D, F, generator=g) / F ** 0.5]
    w = [None if t is None else t.to(dtype) for t in w]
    if device == "cuda":
        w = [None if t is None else t.pin_memory() for t in w]
    return tuple(w)


@needs_kernels
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("swiglu", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("resident", [False, True])
def test_in_place_experts_equal_each_expert_alone(device, swiglu, dtype, resident):
    """Odd sizes (D, F not multiples of the tiles), an expert with no rows, one with MAX_ROWS rows,
    one with more (read once per MAX_ROWS rows), rows of experts not asked for left alone; with
    ``resident``, some experts read from their GPU copies (their host copies are NaN: never read)."""
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter has no bfloat16 arithmetic")
    E, D, F = 7, 40, 72
    w = _experts(E, D, F, dtype, swiglu, device)
    counts = [2, 0, zero_copy.MAX_ROWS, 1, zero_copy.MAX_ROWS + 3, 3, 1]
    offs = np.concatenate([[0], np.cumsum(counts)])
    x = torch.randn(int(offs[-1]) + 2, D, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    sel = [0, 1, 2, 4, 6]
    plan = torch.tensor(np.stack([sel, offs[sel], offs[np.array(sel) + 1]]), dtype=torch.int32, device=device)
    good, args = w, {}
    if resident:
        on_gpu = [4, 6]
        slot = torch.full((E,), -1, dtype=torch.int32)
        slot[on_gpu] = torch.arange(len(on_gpu), dtype=torch.int32)
        copies = tuple(None if t is None else t[on_gpu].to(device) for t in w)
        good = tuple(None if t is None else t.clone() for t in w)
        for t in w:
            if t is not None:
                t[on_gpu] = float("nan")
        args = {"resident": (copies, slot.to(device))}
    y = torch.full_like(x, 7.0)
    zero_copy.host_experts_mlp(x, w, plan, y, **args)
    for e in range(E):
        rows = slice(int(offs[e]), int(offs[e + 1]))
        if e in sel:
            want = expert_mlp(x[rows].double().cpu(), *(None if t is None else t[e].double() for t in good))
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(y[rows].double().cpu(), want, atol=tol, rtol=tol)
        else:
            assert (y[rows] == 7.0).all()
    assert (y[int(offs[-1]):] == 7.0).all()


@needs_kernels
def test_warm_up_compiles_both_kernels_and_writes_nothing(monkeypatch):
    """The hybrid model compiles the kernels when it is made (a first launch takes seconds): with and
    without resident experts, on one layer's weights, which it leaves as they were."""
    launched = []
    for name in ("_up_kernel", "_down_kernel"):
        kernel = getattr(zero_copy, name)
        monkeypatch.setattr(zero_copy, name, type("Spy", (), {"__getitem__": lambda self, grid, k=kernel, n=name: (
            lambda *a, **kw: (launched.append((n, kw["HAS_GPU"])), k[grid](*a, **kw)))})())
    w1, w3, w2 = _experts(3, 8, 16, torch.float32, True, DEVICES[0])
    before = [t.clone() for t in (w1, w3, w2)]
    zero_copy.warm_up((w1, w3, w2), torch.device(DEVICES[0]))
    assert sorted(launched) == sorted((n, g) for n in ("_up_kernel", "_down_kernel") for g in (False, True))
    assert all(torch.equal(a, b) for a, b in zip(before, (w1, w3, w2)))


def _hybrid(read_in_place: bool, monkeypatch):
    """The tiny model and its hybrid twin (on the GPU when there is one, float32), in-place reads
    switched on or off."""
    from test_hybrid_infer import cuda_plain_and_hybrid, plain_and_hybrid, tiny

    monkeypatch.setenv(zero_copy.ENV, "1" if read_in_place else "0")
    cfg = tiny(n_layers=3)
    if CUDA:
        plain, hybrid = cuda_plain_and_hybrid(cfg, slots=5, chunk=2)
        assert hybrid.buffers.zero_copy == read_in_place
    else:
        plain, hybrid = plain_and_hybrid(cfg, slots=5)
        hybrid.buffers.zero_copy = read_in_place
    return plain, hybrid


@needs_kernels
@pytest.mark.parametrize("policy", ["stream", "static:0.5"])
@pytest.mark.parametrize("read_in_place", [True, False])
def test_the_engine_reading_experts_in_place_gives_the_plain_models_tokens(policy, read_in_place, monkeypatch):
    """Streaming (every non-resident expert read in place; with the switch on, small forwards on
    the device alone) and a static split (CG experts read in place beside CPU ones): the plain
    model's greedy tokens; switched off, the copy stream's."""
    from test_hybrid_infer import PROMPTS

    from fsmoe.infer.generate import Sampling, generate
    from fsmoe.infer.hybrid import engine, in_place
    from fsmoe.infer.hybrid.policies import parse_policy

    plain, hybrid = _hybrid(read_in_place, monkeypatch)
    calls = []
    for module in (engine, in_place):
        monkeypatch.setattr(module, "host_experts_mlp",
                            lambda *a, **k: (calls.append(a[2].shape[1]), zero_copy.host_experts_mlp(*a, **k)))
    want = generate(plain, PROMPTS, Sampling(max_new_tokens=6)).new_tokens
    hybrid.place(parse_policy(policy), hot_LE=np.arange(18).reshape(-1, 6))
    on_device = [isinstance(m.executor, in_place.InPlaceStreamExecutor) for m in hybrid.model.moe_layers()]
    assert on_device == [read_in_place and policy == "stream"] * 3
    assert generate(hybrid.model, PROMPTS, Sampling(max_new_tokens=6)).new_tokens == want
    assert bool(calls) == read_in_place and all(n > 0 for n in calls)


def test_resident_slots_and_which_steps_need_the_host():
    from fsmoe.infer.decode_graph import _needs_host
    from fsmoe.infer.hybrid.in_place import InPlaceStreamExecutor, slots_of

    assert slots_of(np.array([False, True, False, True]), torch.device("cpu")).tolist() == [-1, 0, -1, 1]
    assert slots_of(np.zeros(3, dtype=bool), torch.device("cpu")) is None
    ex = InPlaceStreamExecutor(None, None)
    assert not _needs_host(ex, zero_copy.MAX_ROWS) and _needs_host(ex, zero_copy.MAX_ROWS + 1)
    assert _needs_host(type("Host", (), {"needs_host": True})(), 1) and not _needs_host(object(), 1)


@pytest.mark.skipif(not CUDA or zero_copy.triton is None, reason="needs a CUDA device and Triton")
def test_graphed_streaming_decode_with_in_place_reads_is_one_graph(monkeypatch):
    """With every expert resident or read in place, a decode step never asks the host: it is
    captured whole (no cut at the MoE layers) and gives the eager plain model's tokens."""
    from test_hybrid_infer import PROMPTS

    from fsmoe.infer.decode_graph import DecodeGraphs
    from fsmoe.infer.generate import Sampling, generate
    from fsmoe.infer.hybrid.policies import parse_policy

    plain, hybrid = _hybrid(True, monkeypatch)
    hybrid.place(parse_policy("stream"), hot_LE=np.arange(18).reshape(3, 6))
    want = generate(plain, PROMPTS, Sampling(max_new_tokens=10)).new_tokens
    graphs = DecodeGraphs(hybrid.model)
    for _ in range(2):
        assert generate(hybrid.model, PROMPTS, Sampling(max_new_tokens=10), graphs).new_tokens == want
    runner = graphs.runners[2]
    assert runner.failed is None and len(runner.graphs) == 1 and not runner.cuts


def test_the_counting_passes_do_not_run_on_the_device_alone():
    """``fsmoe infer`` counts the prompts' routing under an all-streaming placement before it places
    the real policy: that pass must keep the host executors, or no token count reaches the host.
    Streaming runs on the device alone, scheinfer may (once streaming wins its race), others not."""
    from test_hybrid_infer import plain_and_hybrid, tiny

    from fsmoe.infer.hybrid.in_place import InPlaceStreamExecutor
    from fsmoe.infer.hybrid.policies import Policy, parse_policy

    _, hybrid = plain_and_hybrid(tiny(n_layers=2), slots=2)
    hybrid.buffers.zero_copy = True
    executors = lambda: {type(m.executor) for m in hybrid.model.moe_layers()}  # noqa: E731
    hybrid.place(Policy("count", "none", "stream"))
    assert InPlaceStreamExecutor not in executors()
    hybrid.place(parse_policy("stream"), hot_LE=np.ones((2, 6)))
    assert executors() == {InPlaceStreamExecutor}
    hybrid.place(parse_policy("scheinfer"), hot_LE=np.ones((2, 6)))
    assert executors() == {InPlaceStreamExecutor}
    hybrid.place(parse_policy("fiddler"), hot_LE=np.ones((2, 6)))
    assert InPlaceStreamExecutor not in executors()


def test_placing_another_policy_changes_the_executors_a_decode_capture_is_keyed_by():
    """A decode graph captured with the streaming policy's in-place executors holds their resident
    copies: placing again must not replay it (fsmoe bench infer keeps one DecodeGraphs across
    policies). Host-path executors are the same objects from one placement to the next, so their
    cut captures are kept."""
    from test_hybrid_infer import plain_and_hybrid, tiny

    from fsmoe.infer.decode_graph import executors_of
    from fsmoe.infer.hybrid.policies import parse_policy

    _, hybrid = plain_and_hybrid(tiny(n_layers=2), slots=2)
    hybrid.buffers.zero_copy = True
    hot = np.ones((2, 6))
    hybrid.place(parse_policy("fiddler"), hot)
    first = executors_of(hybrid.model)
    hybrid.place(parse_policy("static:0.5"), hot)
    assert all(a is b for a, b in zip(first, executors_of(hybrid.model)))
    for policy in ("stream", "stream", "scheinfer"):  # scheinfer: in place once streaming wins its race
        before = executors_of(hybrid.model)
        hybrid.place(parse_policy(policy), hot)
        assert not any(a is b for a, b in zip(before, executors_of(hybrid.model))), policy


def _settle(race, tokens: int, fastest: str) -> None:
    """The race of ``tokens``-token forwards run: every candidate timed, ``fastest`` the fastest."""
    from fsmoe.infer.hybrid.race import CANDIDATES, MIN_SAMPLES, Bucket, Tally

    race.buckets[tokens.bit_length()] = Bucket(CANDIDATES, {c: Tally(MIN_SAMPLES, 1.0 if c == fastest else 2.0)
                                                            for c in CANDIDATES})


def test_scheinfer_runs_a_forward_size_on_the_device_once_streaming_wins_its_race():
    """The adaptive policy's executors read the host until a forward size's race is won, and after
    it unless streaming won; a decode capture made before is then stale (a step with no cut)."""
    from test_hybrid_infer import plain_and_hybrid, tiny

    from fsmoe.infer.decode_graph import cut_plan, same_cuts
    from fsmoe.infer.hybrid.in_place import InPlaceStreamExecutor
    from fsmoe.infer.hybrid.policies import parse_policy

    _, hybrid = plain_and_hybrid(tiny(n_layers=2), slots=2)
    hybrid.buffers.zero_copy = True
    hybrid.place(parse_policy("scheinfer"), np.ones((2, 6)))
    executors = [m.executor for m in hybrid.model.moe_layers()]
    assert all(isinstance(ex, InPlaceStreamExecutor) for ex in executors)
    before = cut_plan(hybrid.model, 1)
    assert all(ex.needs_host_for(1) for ex in executors)  # the race has not run
    _settle(hybrid.race, 1, "model")
    assert all(ex.needs_host_for(1) for ex in executors)
    assert same_cuts(before, cut_plan(hybrid.model, 1))
    _settle(hybrid.race, 1, "stream")
    assert not any(ex.needs_host_for(1) for ex in executors)
    assert not same_cuts(before, cut_plan(hybrid.model, 1))
    assert all(ex.needs_host_for(2) for ex in executors)  # another size: its own race
    _settle(hybrid.race, 32, "stream")
    assert all(ex.needs_host_for(32) for ex in executors)  # too many rows for the in-place kernels
    hybrid.buffers.zero_copy = False  # without them, the hybrid executors themselves
    hybrid.place(parse_policy("scheinfer"), np.ones((2, 6)))
    assert [m.executor for m in hybrid.model.moe_layers()] == hybrid.executors


@needs_kernels
def test_scheinfer_decoding_on_the_device_gives_the_plain_models_tokens(monkeypatch):
    """Once streaming has won the decode size's race, scheinfer's decode steps take the in-place
    path (no split is chosen for them) and still give the plain model's greedy tokens."""
    from test_hybrid_infer import PROMPTS

    from fsmoe.infer.generate import Sampling, generate
    from fsmoe.infer.hybrid import in_place
    from fsmoe.infer.hybrid.policies import parse_policy

    plain, hybrid = _hybrid(True, monkeypatch)
    want = generate(plain, PROMPTS, Sampling(max_new_tokens=6)).new_tokens
    hybrid.place(parse_policy("scheinfer"), hot_LE=np.arange(18).reshape(-1, 6))
    _settle(hybrid.race, len(PROMPTS), "stream")
    calls = []
    monkeypatch.setattr(in_place, "host_experts_mlp",
                        lambda *a, **k: (calls.append(a[2].shape[1]), zero_copy.host_experts_mlp(*a, **k)))
    hybrid.splits.clear()
    assert generate(hybrid.model, PROMPTS, Sampling(max_new_tokens=6)).new_tokens == want
    assert calls == [6] * 3 * 5  # 3 layers x 5 decode steps, every expert of the layer in the launches
    assert len(hybrid.splits) == 3  # the prompts' forward alone chose splits


@pytest.mark.skipif(not CUDA or zero_copy.triton is None, reason="needs a CUDA device and Triton")
def test_one_decode_graphs_across_policies_recaptures_for_in_place_streaming(monkeypatch):
    from test_hybrid_infer import PROMPTS

    from fsmoe.infer.decode_graph import DecodeGraphs, cut_plan
    from fsmoe.infer.generate import Sampling, generate
    from fsmoe.infer.hybrid.policies import parse_policy

    plain, hybrid = _hybrid(True, monkeypatch)
    want = generate(plain, PROMPTS, Sampling(max_new_tokens=8)).new_tokens
    graphs = DecodeGraphs(hybrid.model)
    for policy in ("scheinfer", "stream", "static:0.5", "stream", "scheinfer"):
        hybrid.place(parse_policy(policy), hot_LE=np.arange(18).reshape(3, 6))
        for _ in range(3):
            assert generate(hybrid.model, PROMPTS, Sampling(max_new_tokens=8), graphs).new_tokens == want, policy
        # one graph when no layer asks the host (streaming; scheinfer once streaming won its race), else
        # one more per layer that does
        cuts = sum(needs for _, needs in cut_plan(hybrid.model, 2))
        assert cuts == (policy == "static:0.5") * 3 or policy == "scheinfer", policy
        assert len(graphs.runners[2].graphs) == 1 + cuts, policy


@pytest.mark.skipif(zero_copy.triton is None or INTERPRET,
                    reason="needs Triton (no GPU needed), not its interpreter (interpreted kernels do not compile)")
@pytest.mark.parametrize("dtype, precision", [("bf16", "tf32"), ("fp32", "ieee")])
@pytest.mark.parametrize("has_gpu", [False, True])
def test_the_kernels_compile_for_hopper_without_a_gpu(dtype, precision, has_gpu):
    """Triton's compiler alone (sm_90 target): a kernel that the interpreter runs can still fail to
    compile (control flow, types), which only a GPU run would otherwise show."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    p, i = f"*{dtype}", "*i32"
    up = dict(zip(["x_ptr", "w1_ptr", "w3_ptr", "g1_ptr", "g3_ptr", "slot_ptr", "h_ptr", "plan_ptr"],
                  [p] * 5 + [i, p, i]))
    down = dict(zip(["h_ptr", "w2_ptr", "g2_ptr", "slot_ptr", "y_ptr", "plan_ptr"], [p, p, p, i, p, i]))
    ints = {k: "i32" for k in ("S", "D", "F")}
    const = {"HAS_GPU": has_gpu, "BM": zero_copy.MAX_ROWS, "BK": 128, "PRECISION": precision}
    for fn, ptrs, strides, extra in ((zero_copy._up_kernel, up, ("s_x", "s_h", "s_we"), {"SWIGLU": True, "BF": 32}),
                                     (zero_copy._down_kernel, down, ("s_h", "s_y", "s_we"), {"BD": 64})):
        consts = {**const, **extra}
        signature = {**ptrs, **ints, **{s: "i32" for s in strides}, **{k: "constexpr" for k in consts}}
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=GPUTarget("cuda", 90, 32))
