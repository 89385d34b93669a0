"""A checkpoint converted from Hugging Face (one process, EP=1, full tensors) loads at other layouts
with the same logits: 2 gloo processes at EP2 (Qwen3-MoE with a dense layer; DeepSeek-V3 with MLA,
shared experts and the routing bias), at MP2 x EP2 (Qwen3-MoE: heads split) and ESP2 (DeepSeek-V3:
the experts' hidden dim split), each against transformers' logits."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from dist_utils import run_workers
from fsmoe.config import ParallelConfig, model_config_from_dict
from fsmoe.models import build_model
from fsmoe.models.hf.convert import hf_to_run, source_model
from fsmoe.parallel.checkpoint import Meshes, to_global_state, to_local_state
from fsmoe.parallel.groups import build_groups
from fsmoe.parallel.tensor_parallel import parallelize

from hf_models import save

pytestmark = pytest.mark.dist
LAYOUTS = {"qwen3_moe": [{"dp": 2, "ep": 2}, {"mp": 2, "ep": 2}],
           "deepseek_v3": [{"dp": 2, "ep": 2}, {"dp": 2, "esp": 2}]}


def probe() -> torch.Tensor:
    return torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))


def load_at(par: dict, run: str) -> torch.Tensor:
    """Logits of the converted checkpoint loaded by a differently seeded model at layout ``par``."""
    groups = build_groups(ParallelConfig(**par))
    cfg = model_config_from_dict(source_model(run))
    model = parallelize(build_model(cfg, seed=123), groups)
    state = to_global_state({"model": model.state_dict()}, model, groups, Meshes.build(groups))
    dcp.load(state, checkpoint_id=f"{run}/ckpt/step_0", no_dist=not dist.is_initialized())
    model.load_state_dict(to_local_state(state)["model"])
    model.eval()
    with torch.no_grad():
        return model(probe()).logits  # every rank feeds the whole batch: full logits on each


def _world2(rank, world, runs):
    return {(fam, str(par)): load_at(par, run) for fam, run in runs.items() for par in LAYOUTS[fam]}


def test_converted_at_ep1_loads_at_ep2_mp2_esp2_with_transformers_logits(tmp_path):
    transformers = pytest.importorskip("transformers")

    runs, ref = {}, {}
    for fam in LAYOUTS:
        src = save(fam, tmp_path / "src")
        hf_to_run(src, tmp_path / fam)
        runs[fam] = str(tmp_path / fam)
        with torch.no_grad():
            hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
            ref[fam] = hf(probe()).logits
    results = run_workers(_world2, 2, runs, timeout_s=240)
    for rank, res in enumerate(results):
        for (fam, par), logits in res.items():
            diff = (logits - ref[fam]).abs().max().item()
            assert diff <= 1e-5, f"{fam} at {par}, rank {rank}: max abs diff {diff}"
