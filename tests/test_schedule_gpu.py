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
from fsmoe.schedule.run.stages import MoEStages
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
        lay.executor = PipelinedExecutor(lay.experts, MoEStages.local(), eng, LayerSchedule(rf, rb, rf % 2 == 0))
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
