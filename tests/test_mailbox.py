"""The CPU lane beside the device path (fsmoe/infer/hybrid/mailbox.py): the native server thread,
the CPU's expert sets, and with Triton (a GPU, or ``TRITON_INTERPRET=1`` on the CPU) the device
side's kernels around it."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from fsmoe.infer.hybrid import mailbox as mb
from fsmoe.infer.hybrid.cpu_kernel import CpuExpertKernel, cpu_experts_mlp

KERNEL = CpuExpertKernel.load()
needs_native = pytest.mark.skipif(KERNEL is None, reason="needs a C compiler for the native CPU kernel")
INTERPRET = mb.triton is not None and os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not INTERPRET, reason="the device side runs under TRITON_INTERPRET=1 on the CPU "
                                                        "(on a GPU: the engine's GPU tests)")
L, E, D, F, K = 2, 6, 32, 48, 2


def _weights(seed: int = 0, layers: int = L, experts: int = E, d: int = D, f: int = F):
    g = torch.Generator().manual_seed(seed)
    return [tuple((torch.randn(experts, *s, generator=g) / s[-1] ** 0.5).to(torch.bfloat16)
                  for s in ((f, d), (f, d), (d, f))) for _ in range(layers)]


def _wait_until(done, why=lambda: "the server did not answer") -> None:
    """Poll ``done()`` for up to 10 s; failing, the assertion says ``why()``."""
    deadline = time.monotonic() + 10
    while not done():
        assert time.monotonic() < deadline, why()
        time.sleep(1e-4)


def _expected(w, x_ND, counts, cpu_E):
    """The CPU experts' rows through the engine's own CPU path, zeros elsewhere."""
    want = torch.zeros_like(x_ND)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for e in np.flatnonzero(cpu_E & (np.asarray(counts) > 0)):
        r0, r1 = int(starts[e]), int(starts[e] + counts[e])
        cpu_experts_mlp(x_ND[r0:r1].contiguous(), w, [int(e)], [r1 - r0], want[r0:r1], threads=1)
    return want


def test_a_forward_gives_the_cpu_its_share_of_the_routed_non_resident_experts():
    counts = np.array([1, 0, 2, 1, 0, 1])
    eligible = np.array([False, True, True, True, True, True])  # expert 0 resident
    # routed and eligible: 2, 3, 5; the CPU takes round(3 * share) of them, spread over the three
    assert mb.cpu_of_forward(counts, eligible, 0.5).tolist() == [False, False, True, False, False, True]
    assert np.flatnonzero(mb.cpu_of_forward(counts, eligible, 0.25)).tolist() == [3]
    assert np.flatnonzero(mb.cpu_of_forward(counts, eligible, 1.0)).tolist() == [2, 3, 5]
    assert not mb.cpu_of_forward(counts, eligible, 0.0).any()
    # Mixtral's decode step: two routed experts, neither resident: one each way at any share from
    # 1/4 to 5/8 (a fixed half of the experts sent both, one or none to the CPU)
    for q in (0.25, 0.5, 0.625):
        assert mb.cpu_of_forward([0, 1, 0, 0, 1, 0, 0, 0], np.ones(8, dtype=bool), q).sum() == 1
    # one routed non-resident expert: the CPU's from a share of one half
    assert mb.cpu_of_forward([1, 0], [True, True], 0.5).tolist() == [True, False]
    assert not mb.cpu_of_forward([1, 0], [True, True], 0.375).any()


@needs_native
def test_the_server_answers_each_layer_with_its_cpu_experts_rows():
    """The GPU's side played by the test: rows and counts in, the number raised; the server's rows
    equal the engine's CPU path, zeros where the expert is not the CPU's, and its number comes back."""
    w = _weights()
    box = mb.Mailbox(w, rows=8, device=torch.device("cpu"), threads=2)
    try:
        cpu = np.zeros((L, E), dtype=bool)  # the GPU's post marks them per forward: here the test does
        cpu[0, [1, 4]] = True
        cpu[1, [0, 2, 5]] = True
        box.cpu_mail.copy_(torch.from_numpy(cpu))
        g = torch.Generator().manual_seed(1)
        for step in range(1, 4):
            for layer in range(L):
                counts = np.array([2, 1, 0, 1, 3, 1])[np.roll(np.arange(E), step + layer)]
                x = torch.randn(int(counts.sum()), D, generator=g).to(torch.bfloat16)
                box.x[layer, :len(x)] = x
                box.counts[layer] = torch.from_numpy(counts.astype(np.int32))
                box.seq_in[layer * mb.SEQ_STRIDE] = step
                _wait_until(lambda: int(box.seq_out[layer * mb.SEQ_STRIDE]) == step, lambda: (
                    f"the server did not answer: step {step} layer {layer}, alive {box._thread.is_alive()}, "
                    f"rc {box.rc}, in {box.seq_in[::mb.SEQ_STRIDE].tolist()}, "
                    f"out {box.seq_out[::mb.SEQ_STRIDE].tolist()}"))
                torch.testing.assert_close(box.y[layer, :len(x)], _expected(w[layer], x, counts, cpu[layer]),
                                           rtol=0, atol=0)
        box.check()
    finally:
        box.close()
    assert box.rc == 0 and not box._thread.is_alive()


@needs_native
def test_a_layer_posted_before_the_server_thread_runs_is_still_answered(monkeypatch):
    """The first forward can post before the thread has started (it once took that number for the
    starting point and never answered)."""
    serve = mb.Mailbox._serve
    monkeypatch.setattr(mb.Mailbox, "_serve", lambda self, *a: (time.sleep(0.3), serve(self, *a)))
    box = mb.Mailbox(_weights(), rows=4, device=torch.device("cpu"), threads=1)
    try:
        box.cpu_mail.fill_(1)
        box.counts[1] = torch.tensor([1, 0, 0, 0, 0, 0], dtype=torch.int32)
        box.seq_in[mb.SEQ_STRIDE] = 1
        _wait_until(lambda: int(box.seq_out[mb.SEQ_STRIDE]) == 1)
    finally:
        box.close()


@needs_native
def test_more_rows_than_the_mailbox_holds_are_answered_as_failed():
    box = mb.Mailbox(_weights(), rows=2, device=torch.device("cpu"), threads=1)
    try:
        box.cpu_mail.fill_(1)
        box.counts[0] = torch.tensor([3, 0, 0, 0, 0, 0], dtype=torch.int32)  # 3 rows > 2
        box.seq_in[0] = 1
        _wait_until(lambda: int(box.seq_out[0]) != 0)
        assert int(box.seq_out[0]) == -1  # the GPU's wait then sets the status
    finally:
        box.close()


@needs_native
@needs_triton
@pytest.mark.parametrize("share", [1.0, 0.5, 0.0])
def test_the_device_path_with_the_cpu_lane_equals_the_engines_cpu_path(share):
    """The executor's device path (raise, the in-place launches, wait): the post kernel marks the
    forward's CPU experts as :func:`cpu_of_forward` does, on the device and for the server, and the
    server's rows are the engine's CPU path's for them, as are those rows of the layer's output;
    with no share the mailbox is not used. (bf16, which Triton's interpreter cannot multiply: the in-place experts' values are checked
    elsewhere, tests/test_zero_copy.py.)"""
    from fsmoe.infer.hybrid.engine import HybridExecutor, LayerExperts
    from fsmoe.infer.hybrid.in_place import InPlaceStreamExecutor

    w = _weights(2)
    box = mb.Mailbox(w, rows=8, device=torch.device("cpu"), threads=2)
    try:
        resident = np.zeros((L, E), dtype=bool)
        resident[1, 3] = True  # resident: never the CPU's
        box.set_cpu(~resident, share)
        host = HybridExecutor(1, LayerExperts(w[1], resident[1], None), None, None)
        ex = InPlaceStreamExecutor(host, None, mailbox=box)
        counts = np.array([1, 0, 2, 1, 0, 1])
        x = torch.randn(int(counts.sum()), D, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
        if share == 0.0:
            before = int(box.seq_dev[1])
            ex.device_forward(x, torch.from_numpy(counts))  # every expert in place (its bf16 values aside)
            assert int(box.seq_dev[1]) == before and not box.active[1]
            return
        cpu = mb.cpu_of_forward(counts, ~resident[1], share)
        for step in range(1, 3):
            y = ex.device_forward(x, torch.from_numpy(counts))
            assert int(box.seq_dev[1]) == step and int(box.seq_out[mb.SEQ_STRIDE]) == step
            assert box.cpu_now[1].tolist() == cpu.tolist() and box.cpu_mail[1].bool().tolist() == cpu.tolist()
            want = _expected(w[1], x, counts, cpu)
            torch.testing.assert_close(box.y[1, :len(x)], want, rtol=0, atol=0)
            rows = torch.from_numpy(np.repeat(cpu, counts))  # the CPU's rows of the layer's output
            torch.testing.assert_close(y[rows], want[rows], rtol=0, atol=0)
        box.check()
    finally:
        box.close()


@needs_native
@needs_triton
def test_the_post_kernel_counts_ranks_across_its_expert_blocks():
    """More experts than one block of the post kernel (1024): the rank of a routed expert carries
    over from the blocks before it, so the choice equals cpu_of_forward across the boundary."""
    E2, D2 = 1100, 8
    w = _weights(0, layers=1, experts=E2, d=D2, f=4)
    box = mb.Mailbox(w, rows=8, device=torch.device("cpu"), threads=1)
    try:
        eligible = np.ones((1, E2), dtype=bool)
        eligible[0, 500] = False  # resident
        box.set_cpu(eligible, 0.5)
        counts = np.zeros(E2, dtype=np.int64)
        counts[[3, 500, 1000, 1030, 1090]] = 1
        x = torch.randn(5, D2, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
        box.post(0, x, torch.from_numpy(counts).to(torch.int32))
        want = mb.cpu_of_forward(counts, eligible[0], 0.5)
        assert np.flatnonzero(want).tolist() == [3, 1030]  # of 3, 1000, 1030, 1090: the 1st and 3rd
        assert box.cpu_now[0].tolist() == want.tolist() and box.cpu_mail[0].bool().tolist() == want.tolist()
        _wait_until(lambda: int(box.seq_out[0]) == 1)
        torch.testing.assert_close(box.y[0, :5], _expected(w[0], x, counts, want), rtol=0, atol=0)
    finally:
        box.close()


@needs_native
@needs_triton
def test_a_server_that_does_not_answer_is_an_error_not_a_hang(monkeypatch):
    from fsmoe.infer.hybrid.engine import HybridExecutor, LayerExperts
    from fsmoe.infer.hybrid.in_place import InPlaceStreamExecutor

    w = _weights()
    box = mb.Mailbox(w, rows=8, device=torch.device("cpu"), threads=1)
    box.set_cpu(np.ones((L, E), dtype=bool), 1.0)
    box.close()  # nobody answers now
    monkeypatch.setattr(mb, "MAX_SPIN", 50)
    ex = InPlaceStreamExecutor(HybridExecutor(0, LayerExperts(w[0], np.zeros(E, dtype=bool), None), None, None),
                               None, mailbox=box)
    ex.device_forward(torch.zeros(2, D, dtype=torch.bfloat16), torch.tensor([1, 1, 0, 0, 0, 0]))
    with pytest.raises(RuntimeError, match="CPU lane did not answer"):
        box.check()


@pytest.mark.skipif(mb.triton is None or INTERPRET,
                    reason="needs Triton (no GPU needed), not its interpreter (interpreted kernels do not compile)")
def test_the_device_kernels_compile_for_hopper_without_a_gpu():
    """The post (its fence is inline assembly) and the collect (a loop on a volatile read of host
    memory) through Triton's compiler alone (sm_90), which the interpreter does not check."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    post = triton.compile(ASTSource(
        fn=mb._post_kernel, constexprs={"BD": 1024, "BE": 128, "FENCE": True},
        signature={"x_ptr": "*bf16", "counts_ptr": "*i32", "eligible_ptr": "*i8", "share": "fp32", "N": "i32",
                   "D": "i32", "E": "i32", "s_x": "i32", "mail_x_ptr": "*bf16", "mail_counts_ptr": "*i32",
                   "mail_cpu_ptr": "*u8", "cpu_ptr": "*i1", "seq_ptr": "*i64", "flag_ptr": "*i64",
                   "BD": "constexpr", "BE": "constexpr", "FENCE": "constexpr"}), target=target).asm["ptx"]
    assert "fence.sc.sys" in post and "bar.sync" in post  # the rows are out before the number
    collect = triton.compile(ASTSource(
        fn=mb._collect_kernel, constexprs={"RB": mb.COLLECT_ROWS, "BD": 1024, "FENCE": True},
        signature={"y_ptr": "*bf16", "s_y": "i32", "N": "i32", "D": "i32", "mail_y_ptr": "*bf16", "seq_ptr": "*i64",
                   "flag_ptr": "*i64", "status_ptr": "*i32", "max_spin": "i32", "RB": "constexpr",
                   "BD": "constexpr", "FENCE": "constexpr"}), target=target).asm["ptx"]
    # the answer and the rows are read from memory every time (not a register or a cache), after a fence
    assert "ld.volatile" in collect and "fence.sc.sys" in collect


def _same_cpu_kernel_on_both_paths(monkeypatch) -> None:
    """The host path's CPU experts on the native kernel up to 16 rows too (by default from 9 rows
    on torch's GEMM), as the server runs them: the two paths then compute the same numbers."""
    import functools

    from fsmoe.infer.hybrid import engine
    from fsmoe.infer.hybrid.cpu_kernel import KERNEL_MAX_TOKENS

    monkeypatch.setattr(engine, "cpu_experts_mlp", functools.partial(cpu_experts_mlp, max_tokens=KERNEL_MAX_TOKENS))


@needs_native
@needs_triton
def test_scheinfer_decoding_on_the_device_with_the_cpu_lane_gives_the_cpu_paths_tokens(monkeypatch):
    """A bf16 model (on the CPU, so the 'GPU' is Triton's interpreter): scheinfer with the CPU taking
    every non-resident expert on the device path decodes the tokens of the host path's all-CPU
    split (the same native kernel), its decode steps through the mailbox; with a CPU share its
    small forwards go there at once (without one they wait for streaming to win their race)."""
    from test_hybrid_infer import COSTS, PROMPTS, tiny

    from fsmoe.infer.generate import Sampling, generate
    from fsmoe.infer.hybrid import model as hybrid_model
    from fsmoe.infer.hybrid.memory import plan_gpu_memory
    from fsmoe.infer.hybrid.model import HybridModel, detach_experts
    from fsmoe.infer.hybrid.policies import parse_policy
    from fsmoe.models import build_model

    monkeypatch.setattr(hybrid_model, "warm_up", lambda *a: None)  # bf16 arithmetic: not in the interpreter
    _same_cpu_kernel_on_both_paths(monkeypatch)
    cfg = tiny(n_layers=2)
    model = build_model(cfg, seed=3).to(torch.bfloat16).eval()
    host = detach_experts(model, pin=False)
    memory = plan_gpu_memory(cfg, budget_gb=1.0, dense_params=1, kv_bytes=0, prefill_tokens=8)
    memory = type(memory)(**{**memory.__dict__, "budget": memory.fixed})  # nothing resident
    hybrid = HybridModel(model, host, COSTS, memory, torch.device("cpu"), zero_copy=True, cpu_on_device=True,
                         cpu_share=1.0)
    try:
        hybrid.place(parse_policy("fiddler"), hot_LE=np.ones((2, cfg.moe.num_experts)))
        want = generate(hybrid.model, PROMPTS, Sampling(max_new_tokens=5)).new_tokens
        hybrid.place(parse_policy("scheinfer"), hot_LE=np.ones((2, cfg.moe.num_experts)))
        assert hybrid.cpu_share == 1.0 and all(hybrid.mailbox.active)
        # with a CPU share, small forwards take the device path without waiting for the race
        assert not any(m.executor.needs_host_for(len(PROMPTS)) for m in hybrid.model.moe_layers())
        assert generate(hybrid.model, PROMPTS, Sampling(max_new_tokens=5)).new_tokens == want
        assert hybrid.mailbox.seq_dev.tolist() == [5, 5]  # the 10-token prefill and four decode steps, per layer
        hybrid.check()
    finally:
        hybrid.close()


@needs_native
@needs_triton
def test_the_cpu_share_is_measured_at_placement(monkeypatch):
    from test_hybrid_infer import COSTS, tiny

    from fsmoe.infer.hybrid import model as hybrid_model
    from fsmoe.infer.hybrid.memory import plan_gpu_memory
    from fsmoe.infer.hybrid.model import HybridModel, detach_experts
    from fsmoe.infer.hybrid.policies import parse_policy
    from fsmoe.models import build_model

    monkeypatch.setattr(hybrid_model, "warm_up", lambda *a: None)
    monkeypatch.setattr(hybrid_model, "CPU_SHARE_TRIALS", 2)
    monkeypatch.setattr(hybrid_model, "CPU_SHARE_ROUNDS", 2)
    cfg = tiny(n_layers=2)
    model = build_model(cfg, seed=3).to(torch.bfloat16).eval()
    host = detach_experts(model, pin=False)
    memory = plan_gpu_memory(cfg, budget_gb=1.0, dense_params=1, kv_bytes=0, prefill_tokens=8)
    memory = type(memory)(**{**memory.__dict__, "budget": memory.fixed + 2 * memory.per_expert})
    hybrid = HybridModel(model, host, COSTS, memory, torch.device("cpu"), zero_copy=True, cpu_on_device=True)
    try:
        resident = hybrid.place(parse_policy("scheinfer"), hot_LE=np.arange(12.0).reshape(2, 6))
        assert hybrid.cpu_share in hybrid_model.CPU_SHARES
        assert list(hybrid.cpu_share_ms) == [str(q) for q in hybrid_model.CPU_SHARES]
        assert (hybrid.mailbox.eligible == ~resident).all() and hybrid.mailbox.share == hybrid.cpu_share
        # with a share the lane is timed against the host path, size by size until it loses
        lane = hybrid.cpu_lane_tokens
        assert lane in (0, *hybrid_model.CPU_LANE_SIZES)
        assert set(hybrid.cpu_lane_ms) <= {str(t) for t in hybrid_model.CPU_LANE_SIZES}
        if hybrid.cpu_share == 0:  # chosen by its own timing, or its lane lost to the host path at one token
            ms = hybrid.cpu_lane_ms
            assert lane == 0 and (not ms or list(ms) == ["1"] and ms["1"]["device"] > ms["1"]["host"])
        assert all(m.executor.cpu_max_tokens == lane for m in hybrid.model.moe_layers())
        # the sizes where the lane won: small forwards on the device path at once; else only once streaming wins
        assert all(m.executor.needs_host_for(1) == (lane < 1) for m in hybrid.model.moe_layers())
        hybrid.place(parse_policy("stream"), hot_LE=np.arange(12.0).reshape(2, 6))  # streaming: no CPU lane
        assert all(m.executor.mailbox is None for m in hybrid.model.moe_layers())
    finally:
        hybrid.close()


def _scheinfer_with_layer_times(monkeypatch, times: list[float], **model_attrs):
    """A tiny bf16 hybrid model (nothing resident) placed under scheinfer with the CPU lane, its
    one-layer timings (the share's, then the lane's against the host path's) taken from ``times``
    in order; ``model_attrs`` patch fsmoe.infer.hybrid.model (CPU_SHARES, ...)."""
    from test_hybrid_infer import COSTS, tiny

    from fsmoe.infer.hybrid import model as hybrid_model
    from fsmoe.infer.hybrid.memory import plan_gpu_memory
    from fsmoe.infer.hybrid.model import HybridModel, detach_experts
    from fsmoe.infer.hybrid.policies import parse_policy
    from fsmoe.models import build_model

    monkeypatch.setattr(hybrid_model, "warm_up", lambda *a: None)
    for name, value in model_attrs.items():
        monkeypatch.setattr(hybrid_model, name, value)
    timings = iter(times)
    monkeypatch.setattr(HybridModel, "_layer_s", lambda self, forward, routes: next(timings))
    cfg = tiny(n_layers=2)
    model = build_model(cfg, seed=3).to(torch.bfloat16).eval()
    memory = plan_gpu_memory(cfg, budget_gb=1.0, dense_params=1, kv_bytes=0, prefill_tokens=8)
    memory = type(memory)(**{**memory.__dict__, "budget": memory.fixed})
    hybrid = HybridModel(model, detach_experts(model, pin=False), COSTS, memory, torch.device("cpu"),
                         zero_copy=True, cpu_on_device=True)
    try:
        hybrid.place(parse_policy("scheinfer"), hot_LE=np.ones((2, cfg.moe.num_experts)))
    except BaseException:
        hybrid.close()
        raise
    return hybrid


@needs_native
@needs_triton
def test_a_cpu_lane_that_loses_at_one_token_is_not_used(monkeypatch):
    """Its share is then 0 (the mailbox idle), whatever the share's own timing chose."""
    # the share's timing, then the lane 3 s against the host path's 2 at one token
    hybrid = _scheinfer_with_layer_times(monkeypatch, [1.0, 3.0, 2.0], CPU_SHARES=(0.5,), CPU_SHARE_ROUNDS=1)
    try:
        assert hybrid.cpu_lane_tokens == 0 and hybrid.cpu_share == 0.0 and hybrid.cpu_share_ms == {"0.5": 1000.0}
        assert hybrid.cpu_lane_ms == {"1": {"device": 3000.0, "host": 2000.0}}
        assert not any(hybrid.mailbox.active) and hybrid.mailbox.share == 0.0
        assert all(m.executor.needs_host_for(1) for m in hybrid.model.moe_layers())  # until streaming wins its race
    finally:
        hybrid.close()


@needs_native
@needs_triton
def test_the_cpu_lane_takes_the_forward_sizes_where_it_beat_the_host_path(monkeypatch):
    """Timed at placement against the host path's split, size by size (1, 4, 16 tokens) until it
    loses: here it wins at 1 and 4 and loses at 16, so forwards of up to 4 tokens take it at once,
    larger ones the host path (or the device path without the CPU once streaming wins their race)."""
    # the share's one timing, then the lane against the host path at 1, 4 and 16 tokens
    hybrid = _scheinfer_with_layer_times(monkeypatch, [1.0, 1.0, 2.0, 3.0, 4.0, 9.0, 5.0], CPU_SHARES=(0.5,),
                                         CPU_SHARE_ROUNDS=1, CPU_SHARE_TRIALS=2)
    try:
        assert hybrid.cpu_share == 0.5 and hybrid.cpu_lane_tokens == 4
        assert hybrid.cpu_lane_ms == {"1": {"device": 1000.0, "host": 2000.0}, "4": {"device": 3000.0, "host": 4000.0},
                                      "16": {"device": 9000.0, "host": 5000.0}}
        layers = hybrid.model.moe_layers()
        assert all(m.executor.cpu_max_tokens == 4 for m in layers)
        assert all(m.executor.host.observe is not None for m in layers)  # the online refit is back
        assert not any(m.executor.needs_host_for(4) for m in layers) and all(m.executor.needs_host_for(5) for m in layers)
        # a larger forward on the device path (streaming won its race) leaves the mailbox alone
        before = hybrid.mailbox.seq_dev.tolist()
        ex, cfg = layers[0].executor, hybrid.model.cfg
        ex.device_forward(torch.zeros(4, cfg.d_model, dtype=torch.bfloat16),
                          torch.tensor([2, 2] + [0] * (cfg.moe.num_experts - 2)), cpu_lane=False)
        assert hybrid.mailbox.seq_dev.tolist() == before
    finally:
        hybrid.close()


@needs_native
@pytest.mark.skipif(not torch.cuda.is_available() or mb.triton is None, reason="needs a CUDA device and Triton")
@pytest.mark.parametrize("graphs", [False, True])
def test_on_a_gpu_the_cpu_lane_on_the_device_path_gives_the_cpu_paths_tokens(graphs, monkeypatch):
    """The real thing: GPU kernels posting to and waiting on the server thread through pinned
    memory, eagerly and replayed from a CUDA graph (one graph per decode step: no cut at the MoE
    layers), decoding the tokens of the host path's all-CPU split (the same native kernel)."""
    from test_hybrid_infer import COSTS, PROMPTS, tiny

    from fsmoe.infer.decode_graph import DecodeGraphs
    from fsmoe.infer.generate import Sampling, generate
    from fsmoe.infer.hybrid.memory import plan_gpu_memory
    from fsmoe.infer.hybrid.model import HybridModel, detach_experts
    from fsmoe.infer.hybrid.policies import parse_policy
    from fsmoe.models import build_model

    _same_cpu_kernel_on_both_paths(monkeypatch)
    cfg = tiny(n_layers=2)
    model = build_model(cfg, seed=3).to(torch.bfloat16).eval()
    host = detach_experts(model, pin=True)
    model.cuda()
    memory = plan_gpu_memory(cfg, budget_gb=1.0, dense_params=1, kv_bytes=0, prefill_tokens=8)
    memory = type(memory)(**{**memory.__dict__, "budget": memory.fixed})  # nothing resident
    hybrid = HybridModel(model, host, COSTS, memory, torch.device("cuda"), zero_copy=True, cpu_on_device=True,
                         cpu_share=1.0)
    try:
        hot = np.ones((2, cfg.moe.num_experts))
        hybrid.place(parse_policy("fiddler"), hot_LE=hot)
        want = generate(hybrid.model, PROMPTS, Sampling(max_new_tokens=6)).new_tokens
        hybrid.place(parse_policy("scheinfer"), hot_LE=hot)
        runner = DecodeGraphs(hybrid.model) if graphs else None
        for _ in range(2):
            assert generate(hybrid.model, PROMPTS, Sampling(max_new_tokens=6), runner).new_tokens == want
        hybrid.check()
        assert int(hybrid.mailbox.seq_dev[0]) == 12  # (a 10-token prefill, 5 decode steps) x 2, all through it
        if graphs:
            r = runner.runners[len(PROMPTS)]
            assert r.failed is None and len(r.graphs) == 1
    finally:
        hybrid.close()
