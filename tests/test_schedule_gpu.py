"""The pipelined executor on CUDA streams (StreamEngine) equals the unpipelined layer.

Runs on a GPU machine only (``pytest -m gpu tests/test_schedule_gpu.py``); skipped elsewhere.
"""
from __future__ import annotations

import copy

import pytest
import torch

from fsmoe.config import ExpertsConfig, MoEConfig, RouterConfig
from fsmoe.layer import MoELayer
from fsmoe.schedule.run.engine import Recorder, StreamEngine
from fsmoe.schedule.run.executor import PipelinedExecutor
from fsmoe.schedule.types import LayerSchedule

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_stream_pipeline_equals_unpipelined(dtype, tol, act):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, router=RouterConfig(top_k=2), experts=ExpertsConfig(d_ff=256, activation=act))
    ref = MoELayer(cfg, 128).cuda().to(dtype)
    x = torch.randn(4, 64, 128, device="cuda", dtype=dtype, requires_grad=True)
    y, _ = ref(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    grads = {n: p.grad.float() for n, p in ref.named_parameters()}
    rec = Recorder()
    eng = StreamEngine(rec)
    for rf, rb in [(1, 1), (2, 4), (4, 2), (8, 8), (3, 1)]:
        lay = copy.deepcopy(ref)
        lay.zero_grad()
        lay.executor = PipelinedExecutor(eng, LayerSchedule(rf, rb, rf % 2 == 0))
        x2 = x.detach().clone().requires_grad_()
        y2, _ = lay(x2)
        (y2 * g).sum().backward()
        torch.cuda.synchronize()
        scale = lambda t: t.float().abs().max().clamp_min(1e-6)
        assert ((y2.float() - y.float()).abs().max() / scale(y)).item() < tol
        assert ((x2.grad.float() - x.grad.float()).abs().max() / scale(x.grad)).item() < tol
        for n, p in lay.named_parameters():
            assert ((p.grad.float() - grads[n]).abs().max() / scale(grads[n])).item() < tol, (n, rf, rb)
    recs = rec.take()
    assert {r.lane for r in recs} >= {"compute", "inter"} and all(r.t1 >= r.t0 for r in recs)


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_triton_experts_under_the_pipelined_executor(act):
    """kernels=triton: the pipelined executor runs the layer's fused experts module (the one
    expert math), and equals the sequential layer with the same kernels, forward and backward."""
    from fsmoe.experts import FusedGroupedExperts

    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, kernels="triton", router=RouterConfig(top_k=2),
                    experts=ExpertsConfig(d_ff=256, activation=act))
    ref = MoELayer(cfg, 128).cuda()
    assert isinstance(ref.experts, FusedGroupedExperts)
    x = torch.randn(4, 64, 128, device="cuda", requires_grad=True)
    y, _ = ref(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    eng = StreamEngine(Recorder())
    for rf, rb in [(1, 1), (4, 4), (2, 4)]:
        lay = copy.deepcopy(ref)
        lay.zero_grad()
        lay.executor = PipelinedExecutor(eng, LayerSchedule(rf, rb))
        x2 = x.detach().clone().requires_grad_()
        y2, _ = lay(x2)
        (y2 * g).sum().backward()
        torch.cuda.synchronize()
        torch.testing.assert_close(y2, y, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-4)
        for (n, p), (_, q) in zip(lay.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=lambda m: f"{n} r={rf}/{rb}: {m}")
