"""Decode steps at static shapes (a tensor slot) and replayed from CUDA graphs.

CPU (CI): a forward with the slot as a 0-dim tensor (every slot of the cache read, the mask hiding
the unwritten ones) gives the logits and cache of the usual one, for every attention kind.
CUDA (scripts/gpu_check.sh): graphed generation gives the eager tokens, for the plain model (one
graph per step) and the hybrid engine (cut at every MoE layer), and a failed capture stays eager."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fsmoe.config import ExpertsConfig, MoEConfig, RouterConfig
from fsmoe.infer.generate import Sampling, generate
from fsmoe.models import build_model
from fsmoe.models.kv_cache import KVCache
from test_hybrid_infer import PROMPTS, cuda_plain_and_hybrid, tiny
from test_models import TINY
from test_models import tiny as tiny_cfg

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh)")


@pytest.mark.parametrize("kind", list(TINY))
def test_a_tensor_slot_gives_the_int_slots_logits_and_cache(kind):
    model = build_model(tiny_cfg(**TINY[kind]), seed=1).eval()
    idx = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    pad = torch.tensor([0, 2])
    caches = [KVCache.for_model(model, 2, 14) for _ in range(2)]
    with torch.no_grad():
        for c in caches:
            model(idx[:, :6], cache=c, start=0, pad_B=pad)
        for t in range(6, 9):
            a = model(idx[:, t:t + 1], cache=caches[0], start=t, pad_B=pad).logits
            b = model(idx[:, t:t + 1], cache=caches[1], start=torch.tensor(t), pad_B=pad).logits
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    for la, lb in zip(caches[0].layers, caches[1].layers):  # later layers: attention summed over more slots
        torch.testing.assert_close(lb.first, la.first, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lb.second, la.second, atol=1e-5, rtol=1e-5)


def test_a_tensor_slot_needs_a_cache():
    model = build_model(tiny_cfg(), seed=1).eval()
    with pytest.raises(ValueError, match="needs a KV cache"):
        model(torch.zeros(1, 1, dtype=torch.long), start=torch.tensor(0))


def _cuda(model):
    return model.to(torch.device("cuda"))


def torch_gemm_moe(d_ff: int = 32) -> MoEConfig:
    """Tiny experts on torch's grouped GEMM: ``auto`` would time our kernels' tiles at every new
    shape first (minutes of compiling in a fresh process), which these tests do not need."""
    return MoEConfig(num_experts=4, router=RouterConfig(top_k=2),
                     experts=ExpertsConfig(d_ff=d_ff, activation="swiglu", gemm="torch"))


@needs_cuda
def test_graphed_decode_of_the_plain_model_is_one_graph_and_the_eager_tokens():
    """bf16: torch's grouped GEMM runs its CUTLASS kernel, which a graph holds."""
    from fsmoe.infer.decode_graph import DecodeGraphs

    model = _cuda(build_model(tiny_cfg(**TINY["llama_gqa_qknorm"], max_seq_len=64, moe=torch_gemm_moe()),
                              seed=1).eval()).to(torch.bfloat16)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    want = generate(model, prompts, Sampling(max_new_tokens=12)).new_tokens
    graphs = DecodeGraphs(model)
    for _ in range(2):  # the second call replays the first call's capture
        out = generate(model, prompts, Sampling(max_new_tokens=12), graphs)
        assert out.new_tokens == want and out.graphed
    runner = graphs.runners[2]
    assert runner.failed is None and len(runner.graphs) == 1 and not runner.cuts


@needs_cuda
def test_float32_experts_on_torchs_grouped_gemm_stay_eager_and_say_where():
    """Off bf16, torch's grouped GEMM loops over the experts with their offsets read on the host:
    the warm step's check finds that sync, so no capture is tried (one failing midway would leave
    the CUDA generator in capture mode), the warning names the call, and the tokens are eager's."""
    from fsmoe.infer.decode_graph import DecodeGraphs

    model = _cuda(build_model(tiny_cfg(**TINY["llama_gqa_qknorm"], max_seq_len=64, moe=torch_gemm_moe()),
                              seed=1).eval())
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    want = generate(model, prompts, Sampling(max_new_tokens=8)).new_tokens
    with pytest.warns(UserWarning, match=r"decode steps run eagerly.*synchronizing.* at fsmoe/kernels/grouped_mm.py:\d+"):
        out = generate(model, prompts, Sampling(max_new_tokens=8), DecodeGraphs(model))
    assert out.new_tokens == want and not out.graphed
    torch.randint(0, 5, (3,), device="cuda")  # no capture was left open


@needs_cuda
@pytest.mark.parametrize("policy", ["scheinfer", "fiddler", "stream", "static:0.5", "gpu"])
def test_graphed_hybrid_decode_is_cut_at_every_moe_layer_and_gives_the_eager_tokens(policy):
    from fsmoe.infer.decode_graph import DecodeGraphs, cut_plan
    from fsmoe.infer.hybrid.policies import parse_policy

    cfg = tiny(moe=MoEConfig(num_experts=6, router=RouterConfig(top_k=2),
                             experts=ExpertsConfig(d_ff=24, activation="swiglu", gemm="torch")))
    plain, hybrid = cuda_plain_and_hybrid(cfg, slots=5, chunk=2)
    hybrid.place(parse_policy(policy), hot_LE=np.arange(18).reshape(3, 6))
    want = generate(plain, PROMPTS, Sampling(max_new_tokens=10)).new_tokens
    graphs = DecodeGraphs(hybrid.model)
    for _ in range(2):
        assert generate(hybrid.model, PROMPTS, Sampling(max_new_tokens=10), graphs).new_tokens == want
    runner = graphs.runners[2]
    # cut at every MoE layer, but where the in-place kernels run a layer on the device alone
    # (streaming; scheinfer once streaming won its race)
    cuts = sum(needs for _, needs in cut_plan(hybrid.model, 2))
    in_place = hybrid.buffers.zero_copy and policy in ("stream", "scheinfer")
    assert cuts == 3 or in_place
    assert cuts == 0 or not (in_place and policy == "stream")
    assert runner.failed is None and len(runner.graphs) == 1 + cuts and len(runner.cuts) == cuts


@needs_cuda
def test_a_step_that_syncs_is_said_once_and_decoding_stays_eager():
    from fsmoe.infer.decode_graph import DecodeGraphs
    from fsmoe.layer import sequential

    model = _cuda(build_model(tiny_cfg(arch="llama", max_seq_len=64, moe=torch_gemm_moe()), seed=1).eval())
    prompts = [[1, 2, 3]]
    want = generate(model, prompts, Sampling(max_new_tokens=8)).new_tokens

    def syncing(layer, x_ND, plan):  # reads the device from the host: not capturable
        assert int(plan.tokens_per_expert_E.sum()) >= 0
        return sequential(layer, x_ND, plan)

    for layer in model.moe_layers():
        layer.executor = syncing
    graphs = DecodeGraphs(model)
    with pytest.warns(UserWarning, match=r"decode steps run eagerly.*synchroniz.* at .*test_decode_graph.py:\d+"):
        out = generate(model, prompts, Sampling(max_new_tokens=8), graphs)
    assert out.new_tokens == want and not out.graphed
    assert graphs.runners[1].failed and not graphs.runners[1].captured
    assert generate(model, prompts, Sampling(max_new_tokens=8), graphs).new_tokens == want
    torch.randint(0, 5, (3,), device="cuda")  # no capture was left open (the CUDA generator works)


def test_a_flagged_sync_is_placed_at_its_caller_outside_torch():
    import traceback

    from fsmoe.infer import decode_graph

    pkg = Path(decode_graph.__file__).resolve().parents[1]

    def frame(path, line):
        return traceback.FrameSummary(str(path), line, "f")

    torch_fn = frame("/venv/site-packages/torch/nn/functional.py", 6741)
    via_gmm = [frame(pkg / "models" / "block.py", 10), frame(pkg / "kernels" / "grouped_mm.py", 59), torch_fn]
    assert decode_graph._sync_site(via_gmm) == "fsmoe/kernels/grouped_mm.py:59"
    assert decode_graph._sync_site([frame("/tmp/user.py", 3), torch_fn]) == "/tmp/user.py:3"
    assert decode_graph._sync_site([torch_fn]) == "/venv/site-packages/torch/nn/functional.py:6741"
    # the warnings hook is called from the warnings module itself (seen on Python 3.12 on a GPU host)
    hook = [frame("/usr/lib/python3.12/warnings.py", 110)]
    assert decode_graph._sync_site(via_gmm + hook) == "fsmoe/kernels/grouped_mm.py:59"
