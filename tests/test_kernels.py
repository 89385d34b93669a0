"""Kernels against their plain-PyTorch references: outputs and every gradient.

Shape legend: T tokens, D model dim, E experts, K experts per token, N = T*K assignments,
F expert hidden dim.

Three tiers:
- CPU (always): the references against dumb loops, the plan's token slots, sync-free counts,
  config validation of ``moe.kernels``.
- Triton interpreter (``TRITON_INTERPRET=1`` with Triton installed, no GPU): the Triton kernels
  on CPU tensors, float32, tight tolerances.
- GPU (``-m gpu``, run by scripts/gpu_check.sh on the device): the kernels on CUDA in float32
  and bf16, odd shapes, experts with zero tokens, capacity drops, the whole layer fast vs torch,
  and no host synchronisation in forward/backward.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from fsmoe.config import ConfigError, ExpertsConfig, MoEConfig, RouterConfig
from fsmoe.kernels import permute, router, swiglu
from fsmoe.routing.plan import RoutingPlan, count_experts
from fsmoe.select import resolve_kernels

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
CUDA = HAS_TRITON and torch.cuda.is_available()

# Where the Triton kernels can run in this process: the GPU, or the interpreter on CPU tensors.
FAST_DEVICES = (["cuda"] if CUDA else []) + (["interp"] if INTERPRET and not CUDA else [])
fast = pytest.mark.parametrize("dev", FAST_DEVICES or [pytest.param("none", marks=pytest.mark.skip(
    reason="needs Triton with CUDA, or TRITON_INTERPRET=1"))])
gpu = pytest.mark.gpu


def _torch_dev(dev: str) -> str:
    return "cuda" if dev == "cuda" else "cpu"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values"
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _tol(dtype) -> float:
    return 2e-2 if dtype == torch.bfloat16 else 1e-5


def _plan(T, E, K, cap=None, dev="cpu", skew=False, seed=0):
    """A top-k plan; ``skew`` leaves half the experts without tokens."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, E, generator=g)
    if skew:
        scores[:, E // 2:] -= 2.0
    w, ids = scores.topk(K, dim=-1)
    w = (w / w.sum(-1, keepdim=True)).to(dev)
    return RoutingPlan.from_topk(ids.to(dev), w, E, cap)


# ----------------------------------------------------------------------------- CPU: references
@pytest.mark.parametrize("cap", [None, 3])
def test_plan_token_slots_point_at_each_tokens_rows(cap):
    T, E, K = 13, 5, 3
    p = _plan(T, E, K, cap)
    assert p.token_slots_TK.shape == (T, K)
    assert torch.equal(p.token_slots_TK.flatten().sort().values, torch.arange(T * K))
    assert torch.equal(p.token_ids_N[p.token_slots_TK], torch.arange(T).unsqueeze(1).expand(T, K))
    kept = p.expert_ids_N < E
    assert int(kept.sum()) == int(p.tokens_per_expert_E.sum()) == T * K - int(p.dropped)
    assert torch.equal(p.expert_ids_N[: int(kept.sum())].diff().clamp(max=0), torch.zeros(int(kept.sum()) - 1,
                                                                                          dtype=torch.long))


def test_count_experts_matches_bincount():
    ids = torch.randint(0, 7, (50, 3))
    assert torch.equal(count_experts(ids, 9), torch.bincount(ids.flatten(), minlength=9))


def test_kernels_config_is_validated():
    cfg = MoEConfig(kernels="cuda")
    with pytest.raises(ConfigError, match="moe.kernels"):
        cfg.validate()
    with pytest.raises(ConfigError, match="moe.kernels"):
        resolve_kernels("fast")
    assert resolve_kernels("torch") == "torch"
    if not CUDA:
        assert resolve_kernels("auto") == "torch"
        with pytest.raises(ConfigError, match="needs Triton"):
            resolve_kernels("triton")


def _loop_combine(y_ND, plan):
    out = torch.zeros(plan.num_tokens, y_ND.shape[1], dtype=torch.float64)
    for n in range(y_ND.shape[0]):
        if plan.expert_ids_N[n] < plan.num_experts:
            out[plan.token_ids_N[n]] += plan.weights_N[n].double() * y_ND[n].double()
    return out


@pytest.mark.parametrize("cap", [None, 2])
def test_reference_permute_and_combine_against_loops(cap):
    T, E, K, D = 9, 4, 2, 5
    p = _plan(T, E, K, cap)
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    x_ND = permute.permute_rows_ref(x, p.token_ids_N, p.token_slots_TK, p.expert_ids_N, E)
    assert torch.equal(x_ND, x.detach()[p.token_ids_N])
    g = torch.randn_like(x_ND)
    x_ND.backward(g)
    want = torch.zeros_like(x)
    for n in range(p.num_assignments):
        if p.expert_ids_N[n] < E:
            want[p.token_ids_N[n]] += g[n]
    torch.testing.assert_close(x.grad, want)
    y = torch.randn(p.num_assignments, D, dtype=torch.float64)
    out = permute.combine_rows_ref(y, p.weights_N.double(), p.token_ids_N, p.token_slots_TK, p.expert_ids_N, E, T)
    torch.testing.assert_close(out, _loop_combine(y, p))


# ----------------------------------------------------------------------------- fast vs reference
def _fast_permute(dev):
    """The Triton-backed op; under the interpreter call the autograd Function directly (the public
    function sends CPU tensors to the reference)."""
    return permute._PermuteRows.apply if dev == "interp" else permute.permute_rows


def _fast_combine(dev):
    return permute._CombineRows.apply if dev == "interp" else permute.combine_rows


def _dtypes(dev):
    return [torch.float32] + ([torch.bfloat16] if dev == "cuda" else [])


@fast
@pytest.mark.parametrize("T,E,K,D,cap,skew", [(37, 6, 2, 24, None, False), (50, 8, 3, 130, None, True),
                                                (33, 4, 1, 72, None, False), (40, 5, 2, 64, 9, False),
                                                (64, 16, 6, 40, None, True)])
def test_permute_and_combine_match_reference(dev, T, E, K, D, cap, skew):
    td = _torch_dev(dev)
    for dt in _dtypes(dev):
        p = _plan(T, E, K, cap, td, skew, seed=T + D)
        w = p.weights_N.to(dt).requires_grad_(True)
        x = torch.randn(T, D, device=td, dtype=dt, requires_grad=True)
        x_ND = _fast_permute(dev)(x, p.token_ids_N, p.token_slots_TK, p.expert_ids_N, E)
        assert torch.equal(x_ND, x.detach()[p.token_ids_N])
        y_ND = (x_ND * 1.5).sin()  # something differentiable in between
        # garbage in dropped rows must not leak (NaN where a product would spread it)
        y_ND = torch.where((p.expert_ids_N < E).unsqueeze(1), y_ND, float("nan"))
        out = _fast_combine(dev)(y_ND, w, p.token_ids_N, p.token_slots_TK, p.expert_ids_N, E, T)
        dy = torch.randn_like(out)
        gx, gw = torch.autograd.grad(out, (x, w), dy)

        x2 = x.detach().float().requires_grad_(True)
        w2 = p.weights_N.float().requires_grad_(True)
        y2 = (permute.permute_rows_ref(x2, p.token_ids_N, p.token_slots_TK, p.expert_ids_N, E) * 1.5).sin()
        y2 = torch.where((p.expert_ids_N < E).unsqueeze(1), y2, 0)
        out2 = permute.combine_rows_ref(y2, w2, p.token_ids_N, p.token_slots_TK, p.expert_ids_N, E, T)
        gx2, gw2 = torch.autograd.grad(out2, (x2, w2), dy.float())
        assert _rel(out, out2) < _tol(dt)
        assert _rel(gx, gx2) < _tol(dt)
        assert _rel(gw, gw2) < _tol(dt)
        assert out.dtype == dt and gw.dtype == dt


@fast
def test_combine_accepts_an_expanded_gradient(dev):
    td = _torch_dev(dev)
    p = _plan(12, 4, 2, dev=td)
    y = torch.randn(24, 16, device=td, requires_grad=True)
    out = _fast_combine(dev)(y, p.weights_N, p.token_ids_N, p.token_slots_TK, p.expert_ids_N, 4, 12)
    (gy,) = torch.autograd.grad(out.sum(), y)  # stride-0 incoming gradient
    torch.testing.assert_close(gy, p.weights_N.unsqueeze(1).expand(24, 16))


@fast
@pytest.mark.parametrize("shape", [(7, 33), (128, 256), (3, 1000)])
def test_swiglu_matches_reference(dev, shape):
    td = _torch_dev(dev)
    for dt in _dtypes(dev):
        a = torch.randn(shape, device=td, dtype=dt, requires_grad=True)
        b = torch.randn(shape, device=td, dtype=dt, requires_grad=True)
        fn = swiglu._SwiGLU.apply if dev == "interp" else swiglu.swiglu
        h = fn(a, b)
        dh = torch.randn_like(h)
        ga, gb = torch.autograd.grad(h, (a, b), dh)
        a2, b2 = a.detach().float().requires_grad_(True), b.detach().float().requires_grad_(True)
        h2 = swiglu.swiglu_ref(a2, b2)
        ga2, gb2 = torch.autograd.grad(h2, (a2, b2), dh.float())
        for got, want in ((h, h2), (ga, ga2), (gb, gb2)):
            assert _rel(got, want) < _tol(dt)


@fast
@pytest.mark.parametrize("T,E,K,normalize", [(37, 8, 2, True), (20, 64, 6, True), (16, 128, 8, True),
                                              (9, 5, 1, False), (30, 60, 4, False)])
def test_softmax_topk_matches_reference(dev, T, E, K, normalize):
    td = _torch_dev(dev)
    logits = torch.randn(T, E, device=td, requires_grad=True)
    fn = router._SoftmaxTopK.apply if dev == "interp" else router.softmax_topk
    probs, w, ids = fn(logits, K, normalize)
    probs2, w2, ids2 = router.softmax_topk_ref(logits, K, normalize)
    assert torch.equal(ids, ids2)
    torch.testing.assert_close(probs, probs2)
    torch.testing.assert_close(w, w2)
    dp, dw = torch.randn_like(probs), torch.randn_like(w)
    (g,) = torch.autograd.grad((probs * dp).sum() + (w * dw).sum(), logits, retain_graph=True)
    (g2,) = torch.autograd.grad((probs2 * dp).sum() + (w2 * dw).sum(), logits, retain_graph=True)
    torch.testing.assert_close(g, g2)
    (g3,) = torch.autograd.grad((w * dw).sum(), logits)  # probs unused: its gradient is None
    (g4,) = torch.autograd.grad((w2 * dw).sum(), logits)
    torch.testing.assert_close(g3, g4)


@fast
def test_softmax_topk_keeps_ids_valid_on_nan_logits(dev):
    """A NaN token (e.g. an overflowed activation) must not send rows to an expert that does not
    exist (a device-side assert downstream): its ids stay valid and distinct, its weights NaN."""
    td = _torch_dev(dev)
    logits = torch.randn(6, 8, device=td)
    logits[2] = float("nan")
    fn = router._SoftmaxTopK.apply if dev == "interp" else router.softmax_topk
    _, w, ids = fn(logits, 3, True)
    assert ((ids >= 0) & (ids < 8)).all() and len(set(ids[2].tolist())) == 3
    assert torch.isnan(w[2]).all() and torch.isfinite(w[[0, 1, 3, 4, 5]]).all()


@fast
@pytest.mark.parametrize("counts", [[5, 0, 7, 3], [0, 0, 9, 0], [4, 4, 4, 4]])
def test_zero_tail_rows(dev, counts):
    from fsmoe.kernels import triton_ops

    td = _torch_dev(dev)
    N = sum(counts) + 5
    x = torch.randn(N, 40, device=td)
    offs = torch.tensor(counts, device=td).cumsum(0).to(torch.int32)
    want = x.clone()
    want[sum(counts):] = 0
    torch.testing.assert_close(triton_ops.zero_tail_rows_(x, offs), want)


# ----------------------------------------------------------------------------- GPU: experts and layer
def _experts_pair(E, D, Fh, act, dt):
    from fsmoe.experts import GroupedExperts
    from fsmoe.experts import FusedGroupedExperts

    torch.manual_seed(0)
    ref = GroupedExperts(E, D, Fh, act).cuda().to(dt)
    fused = FusedGroupedExperts(E, D, Fh, act).cuda().to(dt)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


@gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA and Triton")
@pytest.mark.parametrize("counts,act", [([40, 0, 77, 3], "swiglu"), ([0, 128, 0, 0], "swiglu"),
                                        ([17, 9, 33, 1], "gelu")])
@pytest.mark.parametrize("tail", [0, 11])
def test_fused_experts_match_reference(counts, act, tail):
    E, D, Fh = 4, 64, 96
    for dt in (torch.float32, torch.bfloat16):
        ref, fused = _experts_pair(E, D, Fh, act, dt)
        cnt = torch.tensor(counts, device="cuda")
        x = torch.randn(sum(counts) + tail, D, device="cuda", dtype=dt, requires_grad=True)
        outs = []
        for m in (ref, fused):
            m.zero_grad()
            x.grad = None
            y = m(x, cnt)
            y.backward(torch.randn(y.shape, device="cuda", dtype=dt,
                                   generator=torch.Generator("cuda").manual_seed(1)))
            outs.append([y.detach(), x.grad] + [p.grad for p in m.parameters()])
        for got, want in zip(outs[1], outs[0]):
            assert _rel(got, want) < _tol(dt), (dt, got.shape)
        assert torch.all(outs[1][0][sum(counts):] == 0) and torch.all(outs[1][1][sum(counts):] == 0)


def _layers(E, K, D, Fh, cap, dt, shared=0):
    from fsmoe.layer import MoELayer

    cfgs = [MoEConfig(num_experts=E, kernels=k, router=RouterConfig(top_k=K, capacity_factor=cap, aux_loss_coef=0.01),
                      experts=ExpertsConfig(d_ff=Fh, num_shared=shared)) for k in ("torch", "triton")]
    torch.manual_seed(0)
    ref = MoELayer(cfgs[0], D).cuda().to(dt)
    fast_ = MoELayer(cfgs[1], D).cuda().to(dt)
    fast_.load_state_dict(ref.state_dict())
    return ref, fast_


@gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA and Triton")
@pytest.mark.parametrize("E,K,D,Fh,cap", [(8, 2, 128, 256, None), (16, 4, 72, 40, None), (6, 2, 64, 48, 1.0),
                                          (64, 6, 128, 64, None)])
def test_layer_fast_matches_torch(E, K, D, Fh, cap):
    for dt in (torch.float32, torch.bfloat16):
        ref, fast_ = _layers(E, K, D, Fh, cap, dt)
        assert fast_.kernels == "triton" and ref.kernels == "torch"
        x = torch.randn(3, 41, D, device="cuda", dtype=dt)
        dy = torch.randn_like(x)
        res = []
        for m in (ref, fast_):
            xi = x.clone().requires_grad_(True)
            y, st = m(xi)
            ((y * dy).sum() + st.aux_loss).backward()
            res.append([y.detach(), xi.grad] + [p.grad for p in m.parameters()])
            res[-1].append(st.tokens_per_expert)
        for got, want in zip(res[1], res[0]):
            if got.dtype == torch.int64:
                assert torch.equal(got, want)
            else:
                assert _rel(got, want) < 2 * _tol(dt), (dt, got.shape)


@gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA and Triton")
def test_layer_fast_has_no_host_sync():
    ref, fast_ = _layers(16, 2, 128, 256, None, torch.bfloat16)
    x = torch.randn(4, 64, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    fast_(x)[0].sum().backward()  # warm up (Triton compiles, cuBLAS handles)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, st = fast_(x)
        (y.float().square().mean() + st.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------- bench + page (CPU smoke)
def test_bench_layer_train_and_page_smoke(tmp_path, monkeypatch):
    import subprocess
    import sys

    from fsmoe.cli import main

    lj, tj = tmp_path / "layer.json", tmp_path / "train.json"
    assert main(["bench", "layer", "--configs", "tiny", "--variants", "dense,grouped,fsmoe,fsmoe-cutlass", "--iters", "2",
                 "--warmup", "1", "--device", "cpu", "--json", str(lj)]) == 0
    assert main(["bench", "train", "--model", "tiny", "--variants", "fsmoe", "--batch", "2", "--seq-len", "16",
                 "--iters", "2", "--warmup", "1", "--device", "cpu", "--json", str(tj)]) == 0
    import json

    layer = json.loads(lj.read_text())["configs"]["tiny"]
    assert layer["variants"]["fsmoe"]["ms"] > 0 and layer["rel_err_vs_grouped"]["fsmoe"] < 1e-5
    assert layer["variants"]["fsmoe-cutlass"]["ms"] > 0
    assert json.loads(tj.read_text())["variants"]["fsmoe"]["tokens_per_s"] > 0
    assert main(["bench", "layer", "--configs", "tiny", "--variants", "dense,fsmoe", "--iters", "4", "--warmup", "1",
                 "--device", "cpu", "--back-to-back", "--json", str(tmp_path / "b2b.json")]) == 0
    b2b = json.loads((tmp_path / "b2b.json").read_text())
    assert b2b["timing"] == "back-to-back" and b2b["configs"]["tiny"]["variants"]["fsmoe"]["ms"] > 0
    page = tmp_path / "perf.md"
    subprocess.run([sys.executable, "scripts/perf_page.py", str(lj), str(tj), "-o", str(page)], check=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    text = page.read_text()
    assert "| tiny (64, 32, 48, 4, 2)" in text and "tokens/s" in text


def test_bench_rejects_unknown_config():
    from fsmoe.cli import main

    assert main(["bench", "layer", "--configs", "huge", "--device", "cpu"]) == 2


@gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA and Triton")
def test_layer_fast_step_captures_as_cuda_graph():
    """Static shapes and no host sync: the whole forward+backward replays as one CUDA graph, with
    the eager step's output and gradients."""
    from graph_utils import eager_and_replayed

    _, layer = _layers(16, 4, 128, 192, None, torch.bfloat16)
    x = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    got, want = eager_and_replayed(layer, x, torch.randn_like(x))
    for g, w in zip(got, want):
        assert _rel(g, w) < 1e-2
