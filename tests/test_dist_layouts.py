"""Every parallel layout against one process: outputs, loss, every gradient, clipped norm.

Shape legend: B global batch (sequences), L sequence length, V vocabulary.

Each launch (one per world size, gloo, real processes) runs several layouts in turn. For every
layout, every rank also trains the one-process reference on the global batch, then compares, for
3 AdamW steps with clipping: this dp shard's logits, the global loss and aux loss, the gradient of
every parameter (its shard of the reference gradient, after sync and clipping), the global grad
norm and the parameters after the step. Replicated shards must hash the same on every rank that
holds them (router and shared weights included). The world-4 launch also saves an EP=4
checkpoint that the other launches load at EP=1, 2 and 8. Every layout trains three ways:
AdamW state whole, split over the replicas (``parallel.shard = "optimizer"``), and with the
blocks' weights split too (``"full"``).
"""
from __future__ import annotations

import hashlib

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn

from dist_utils import run_workers
from fsmoe.config import ParallelConfig, load_config
from fsmoe.models import build_model
from fsmoe.parallel.checkpoint import Meshes, to_global_state, to_local_state
from fsmoe.parallel.grads import clip_grad_norm, global_aux, global_mean, sync_grads
from fsmoe.parallel.groups import ParallelGroups, build_groups
from fsmoe.parallel.moe import moe_layer_factory
from fsmoe.parallel.sharding import get_sharding
from fsmoe.parallel.tensor_parallel import parallelize
from fsmoe.parallel.zero import ZeroAdamW
from fsmoe.parallel.zero_grads import GradReduceScatter
from fsmoe.routing import ROUTERS, register_router
from fsmoe.routing.base import Router
from fsmoe.routing.plan import RoutingPlan

pytestmark = pytest.mark.dist
ATOL = 1e-5
B, L = 8, 8


if "test_all_to_expert_0" not in ROUTERS:

    @register_router("test_all_to_expert_0")
    class AllToExpertZero(Router):
        """Adversarial: every token goes to expert 0 (weight = its softmax probability), so with
        EP the other ranks' experts get no tokens at all."""

        def __init__(self, cfg, d_model, num_experts):
            super().__init__(cfg, d_model, num_experts)
            self.proj = nn.Linear(d_model, num_experts, bias=False)

        def forward(self, x_TD, seq_len):
            probs_TE = self.proj(x_TD).float().softmax(-1)
            ids_TK = torch.zeros(x_TD.shape[0], 1, dtype=torch.int64, device=x_TD.device)
            return RoutingPlan.from_topk(ids_TK, probs_TE[:, :1].to(x_TD.dtype), self.num_experts, None,
                                         probs_TE=probs_TE)


MODELS = {
    # GPT: LayerNorm, biases, GeLU experts, softmax top-2 with aux and z losses.
    "gpt": ["model.moe.router.aux_loss_coef=0.05", "model.moe.router.z_loss_coef=0.01"],
    # llama family: RMSNorm, GQA + qk-norm, SwiGLU, a shared expert, DeepSeek router (bias balancing).
    "deepseek": ["model.arch='llama'", "model.n_kv_heads=2", "model.qk_norm=true", "model.first_dense=1",
                 "model.moe.router.name='deepseek'", "model.moe.router.aux_loss_coef=0.0",
                 "model.moe.router.seq_aux_coef=0.01", "model.moe.router.bias_update_rate=0.01",
                 "model.moe.experts.activation='swiglu'", "model.moe.experts.num_shared=1"],
    "forced": ["model.moe.router.name='test_all_to_expert_0'", "model.moe.router.top_k=1"],
}


def model_cfg(kind: str):
    base = ["model.vocab_size=64", "model.d_model=16", "model.n_layers=2", "model.n_heads=4", "model.d_ff=32",
            "model.max_seq_len=8", "train.seq_len=8", "model.moe.num_experts=8", "model.moe.experts.d_ff=8"]
    return load_config("tiny", base + MODELS[kind]).model


def batches(steps: int):
    g = torch.Generator().manual_seed(11)
    return [(torch.randint(0, 64, (B, L), generator=g), torch.randint(0, 64, (B, L), generator=g))
            for _ in range(steps)]


def optimizer(model: nn.Module, groups: ParallelGroups | None = None, shard: str = "none"):
    """AdamW; ``shard="optimizer"``: its state split over the replica groups (fsmoe.parallel.zero);
    ``"full"``: the blocks' weights too, gathered around each use (fsmoe.parallel.zero3), with the
    trainer's hooks (gathers one block ahead)."""
    if shard in ("optimizer", "full"):
        opt = ZeroAdamW([{"params": list(model.parameters())}], groups, lr=1e-2, weight_decay=0.1,
                        weights_of=model if shard == "full" else None)
        if shard == "full":
            opt.overlap_with(model)
        return opt
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def grad_slicer(opt) -> GradReduceScatter | None:
    """As the trainer: a sharded optimizer takes its gradient slices by reduce-scatter, the dp
    buckets launched from backward's hooks (the NCCL path's order, here on gloo)."""
    return GradReduceScatter(opt, ("dp", "edp"), overlap=True) if isinstance(opt, ZeroAdamW) else None


def ce(logits, y):
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def train_step(model, opt, x, y, groups, max_norm: float, rs: GradReduceScatter | None = None):
    """The trainer's step: local loss -> backward -> sync -> clip -> AdamW -> router after_step.
    ``rs``: gradients reduce-scattered into the optimizer's slices; those come back as slices."""
    out = model(x)
    loss = ce(out.logits, y)
    opt.zero_grad(set_to_none=True)
    (loss + out.aux_loss).backward()
    sync_grads(model, groups, skip=rs.params if rs else ())
    if rs is not None:
        rs.finish()
    norm = clip_grad_norm(model, max_norm, groups, rs)
    if rs is not None:
        opt.prepare_step()
    grads = {n: (opt.slices_of[id(p)].grad if rs and id(p) in rs.params else p.grad).clone()
             for n, p in model.named_parameters()}
    opt.step()
    for layer in model.moe_layers():
        layer.router.after_step()
    return out, loss, norm, grads


def shard_hashes(model, groups) -> dict[str, str]:
    """name -> hash of this rank's shard (params and buffers such as the DeepSeek bias)."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    return {n: hashlib.sha1(t.detach().contiguous().numpy().tobytes()).hexdigest() for n, t in tensors.items()}


def check_layout(par: dict, kind: str, steps: int = 3, factory: bool = False, rs_impl: str | None = None,
                 max_norm: float = 0.05, shard: str = "none", recompute: str = "none") -> dict:
    """Train reference and layout side by side; returns the largest error of each quantity.
    ``recompute``: train.activation_checkpointing of the layout's model."""
    from fsmoe.recompute import configure_recompute

    cfg = model_cfg(kind)
    groups = build_groups(ParallelConfig(**par))
    ref = build_model(cfg, seed=3)
    built = build_model(cfg, moe_layer_factory(groups, rs_impl), seed=3) if factory else build_model(cfg, seed=3)
    model = parallelize(built, groups, rs_impl)
    configure_recompute(model, recompute)
    ref_opt, opt = optimizer(ref), optimizer(model, groups, shard)
    rs = grad_slicer(opt)
    rows = slice(groups.dp_rank * B // groups.dp, (groups.dp_rank + 1) * B // groups.dp)
    err = dict.fromkeys(("logits", "loss", "aux", "grad", "norm", "param"), 0.0)
    for x, y in batches(steps):
        r_out, r_loss, r_norm, r_grads = train_step(ref, ref_opt, x, y, ParallelGroups.single(), max_norm)
        out, loss, norm, grads = train_step(model, opt, x[rows], y[rows], groups, max_norm, rs)
        err["logits"] = max(err["logits"], (out.logits - r_out.logits[rows]).abs().max().item())
        err["loss"] = max(err["loss"], abs(global_mean(loss, groups).item() - r_loss.item()))
        err["aux"] = max(err["aux"], abs(global_aux(out.aux_loss, groups).item() - r_out.aux_loss.item()))
        err["norm"] = max(err["norm"], abs(norm.item() - r_norm.item()))
        for name, p in model.named_parameters():
            expect = get_sharding(p).shard_of(r_grads[name], groups)
            if rs is not None and id(p) in rs.params:  # this rank's slice of it
                expect = opt.entries[id(p)].of(expect)
            err["grad"] = max(err["grad"], (grads[name] - expect).abs().max().item())
    if isinstance(opt, ZeroAdamW):
        opt.finish_gathers()  # freed weights (shard = "full") gathered to be read
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        expect = get_sharding(p).shard_of(ref_params[name].detach(), groups)
        err["param"] = max(err["param"], (p.detach() - expect).abs().max().item())
    ref_buffers = dict(ref.named_buffers())
    for name, buf in model.named_buffers():  # e.g. the DeepSeek expert bias (moved by after_step)
        err["param"] = max(err["param"], (buf.float() - ref_buffers[name].float()).abs().max().item())
    err["norm_value"] = norm.item()
    err["clipped"] = norm.item() > max_norm
    err["hash_mismatch"] = hash_mismatches(model, groups)
    return err


def hash_mismatches(model, groups) -> list[str]:
    """Names of shards that differ between ranks holding the same shard (should be none)."""
    mine = shard_hashes(model, groups)
    everyone = [None] * groups.world
    dist.all_gather_object(everyone, mine)
    coords = [groups.layout.coords(r) for r in range(groups.world)]
    params = dict(model.named_parameters())
    bad = []
    for name, h in mine.items():
        kinds = [k for _, k in get_sharding(params[name]).dims] if name in params else []
        twins = [r for r in range(groups.world)
                 if all(getattr(coords[r], k) == getattr(groups.coords, k) for k in kinds)]
        if any(everyone[r][name] != h for r in twins):
            bad.append(name)
    return bad


def check_known_norm(par: dict) -> dict:
    """Every gradient element 1, except the experts of EP rank 1 (as if they got no tokens): the
    global norm is sqrt(one-process parameter count - those experts' elements), whatever the layout,
    and clipping scales every shard by the same factor."""
    cfg = model_cfg("gpt")
    groups = build_groups(ParallelConfig(**par))
    model = parallelize(build_model(cfg, seed=3), groups)
    ref = build_model(cfg, seed=3)
    El = cfg.moe.num_experts // groups.ep
    zeroed = sum(p[El:2 * El].numel() for n, p in ref.named_parameters() if ".experts." in n)
    for name, p in model.named_parameters():
        p.grad = torch.ones_like(p)
        if ".experts." in name and groups.ep_rank == 1:
            p.grad.zero_()
    expected = (sum(p.numel() for p in ref.parameters()) - zeroed) ** 0.5
    norm = clip_grad_norm(model, 1.0, groups).item()
    coef = 1.0 / (expected + 1e-6)
    scaled = max((p.grad - coef * (p.grad != 0)).abs().max().item() for p in model.parameters())
    return {"norm": norm, "expected": expected, "scaled_err": scaled}


# ---------------------------------------------------------------- checkpoints


def probe_logits(model) -> torch.Tensor:
    """Logits of a fixed full batch (every rank feeds the same batch; eval mode)."""
    x = torch.randint(0, 64, (B, L), generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        return model(x).logits


def global_state(model, opt, groups) -> dict:
    """Model + AdamW state as global tensors (sharded optimizer state as slices of them)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    meshes = Meshes.build(groups)
    if isinstance(opt, ZeroAdamW):
        opt.finish_gathers()  # the weights whole (shard = "full" frees them between uses)
        names = {id(p): n for n, p in model.named_parameters()}
        state = {"model": get_model_state_dict(model), "optim": opt.fqn_state_dict(names)}
        return to_global_state(state, model, groups, meshes, opt.zero_slices(names))
    msd, osd = get_state_dict(model, opt)
    return to_global_state({"model": msd, "optim": osd}, model, groups, meshes)


def apply_state(model, opt, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    state = to_local_state(state)
    if isinstance(opt, ZeroAdamW):
        set_model_state_dict(model, state["model"])
        opt.load_fqn_state_dict(state["optim"], {id(p): n for n, p in model.named_parameters()})
    else:
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def probe_after_step(model, opt, groups) -> dict:
    """Probe logits now, and after one more training step on a fixed batch: the second differs
    unless the AdamW moments (not only the weights) came through the checkpoint."""
    now = probe_logits(model)
    model.train()
    rows = slice(groups.dp_rank * B // groups.dp, (groups.dp_rank + 1) * B // groups.dp)
    x, y = batches(3)[2]
    train_step(model, opt, x[rows], y[rows], groups, 0.05)
    return {"probe": now, "after": probe_logits(model)}


def save_checkpoint(par: dict, path: str, shard: str = "none") -> dict:
    """Train 2 steps at ``par``, save model + AdamW state as global tensors; probes (see above)."""
    groups = build_groups(ParallelConfig(**par))
    model = parallelize(build_model(model_cfg("gpt"), seed=3), groups)
    opt = optimizer(model, groups, shard)
    rows = slice(groups.dp_rank * B // groups.dp, (groups.dp_rank + 1) * B // groups.dp)
    for x, y in batches(2):
        train_step(model, opt, x[rows], y[rows], groups, 0.05)
    dcp.save(global_state(model, opt, groups), checkpoint_id=path)
    return probe_after_step(model, opt, groups)


def load_checkpoint(par: dict, path: str, shard: str = "none") -> dict:
    """A differently seeded model at layout ``par`` loads the checkpoint; probes (see above)."""
    groups = build_groups(ParallelConfig(**par))
    model = parallelize(build_model(model_cfg("gpt"), seed=99), groups)
    opt = optimizer(model, groups, shard)
    state = global_state(model, opt, groups)
    dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    apply_state(model, opt, state)
    return probe_after_step(model, opt, groups)


# ---------------------------------------------------------------- launches


SHARD_SUFFIX = {"none": "", "optimizer": ", sharded optimizer state", "full": ", sharded weights"}


def every_shard(layouts) -> dict:
    """Each (name, layout, model kind, options) trained three ways: AdamW state and weights whole,
    the state and gradients split over the replicas (optimizer), and the weights too (full)."""
    return {name + suffix: check_layout(par, kind, shard=shard, **kw)
            for name, par, kind, kw in layouts for shard, suffix in SHARD_SUFFIX.items()}


def _world2(rank, world, ckpt):
    saved, sharded, full = ckpt
    return {
        **every_shard([("DP2", {"dp": 2}, "gpt", {}),
                       ("EP2", {"dp": 2, "ep": 2}, "gpt", {}),
                       ("EP2 (deepseek)", {"dp": 2, "ep": 2}, "deepseek", {}),
                       ("ESP2 (alltoall RS)", {"dp": 2, "esp": 2}, "gpt", {"rs_impl": "alltoall"}),
                       ("ESP2 (native RS)", {"dp": 2, "esp": 2}, "deepseek", {"rs_impl": "native"}),
                       ("MP2", {"mp": 2}, "deepseek", {})]),
        "DP2, sharded weights, blocks recomputed": check_layout({"dp": 2}, "gpt", shard="full", recompute="full"),
        "load EP2 sharded weights <- EP4": load_checkpoint({"dp": 2, "ep": 2}, saved, shard="full"),
        "load EP2 sharded <- EP4 sharded weights": load_checkpoint({"dp": 2, "ep": 2}, full, shard="optimizer"),
        "load EP2 sharded <- EP4": load_checkpoint({"dp": 2, "ep": 2}, saved, shard="optimizer"),
        "load EP2 <- EP4 sharded": load_checkpoint({"dp": 2, "ep": 2}, sharded),
        "norm MP2": check_known_norm({"mp": 2}),
        "load EP2": load_checkpoint({"dp": 2, "ep": 2}, saved),
    }


def _world4(rank, world, ckpt):
    saved, sharded, full = ckpt
    return {
        **every_shard([("DP2xMP2, EP2xESP2", {"dp": 2, "mp": 2, "ep": 2, "esp": 2, "gpus_per_node": 2}, "deepseek", {}),
                       ("EP2 (edp 2)", {"dp": 4, "ep": 2}, "gpt", {}),
                       ("EP4", {"dp": 4, "ep": 4}, "gpt", {}),
                       ("EP2xESP2", {"dp": 4, "ep": 2, "esp": 2}, "gpt", {"factory": True}),
                       ("DP2xMP2, EP4 (gpt)", {"dp": 2, "mp": 2, "ep": 4}, "gpt", {}),
                       ("all to expert 0, EP4", {"dp": 4, "ep": 4}, "forced", {}),
                       ("all to expert 0, EP2xESP2", {"dp": 4, "ep": 2, "esp": 2}, "forced", {})]),
        "norm EP4": check_known_norm({"dp": 4, "ep": 4}),
        "norm EP2xESP2": check_known_norm({"dp": 4, "ep": 2, "esp": 2}),
        "norm DP2xMP2, EP2xESP2": check_known_norm({"dp": 2, "mp": 2, "ep": 2, "esp": 2}),
        "save EP4": save_checkpoint({"dp": 4, "ep": 4}, saved),
        "save EP4 sharded": save_checkpoint({"dp": 4, "ep": 4}, sharded, shard="optimizer"),
        "save EP4 sharded weights": save_checkpoint({"dp": 4, "ep": 4}, full, shard="full"),
    }


def _world8(rank, world, ckpt):
    saved, sharded, full = ckpt
    return {**every_shard([("EP8", {"dp": 8, "ep": 8}, "gpt", {}),
                           ("DP8 (experts replicated 8 times)", {"dp": 8}, "deepseek", {})]),
            "load EP8": load_checkpoint({"dp": 8, "ep": 8}, saved),
            "load DP8xEP2 sharded <- EP4 sharded": load_checkpoint({"dp": 8, "ep": 2}, sharded, shard="optimizer"),
            "load DP8xEP2 sharded weights <- EP4 sharded weights": load_checkpoint({"dp": 8, "ep": 2}, full,
                                                                                   shard="full")}


def _assert_layouts(results: list[dict]) -> None:
    for rank, res in enumerate(results):
        for name, err in res.items():
            if not isinstance(err, dict) or "probe" in err:
                continue
            if name.startswith("norm"):
                assert abs(err["norm"] - err["expected"]) < 1e-3 and err["scaled_err"] < 1e-7, f"{name} rank {rank}: {err}"
                continue
            where = f"{name} rank {rank}: {err}"
            for key in ("logits", "loss", "aux", "grad", "norm", "param"):
                assert err[key] < ATOL, f"{key} differs from one process: {where}"
            assert err["clipped"], f"the test should exercise clipping: {where}"
            assert not err["hash_mismatch"], f"replicas differ: {where}"


def _same_probes(got: dict, saved: dict) -> None:
    for key in ("probe", "after"):
        assert (got[key] - saved[key]).abs().max() < 1e-5, f"{key}: {(got[key] - saved[key]).abs().max()}"


@pytest.fixture(scope="module")
def ep4(tmp_path_factory):
    """World 4: the EP4/ESP/MP layouts and adversarial routing; saves the EP=4 checkpoints, with
    whole and with sharded optimizer state."""
    ckpt = (str(tmp_path_factory.mktemp("ckpt_ep4")), str(tmp_path_factory.mktemp("ckpt_ep4_sharded")),
            str(tmp_path_factory.mktemp("ckpt_ep4_full")))
    results = run_workers(_world4, 4, ckpt, timeout_s=240)
    return ckpt, results


def test_world4_layouts_and_adversarial_routing(ep4):
    _, results = ep4
    _assert_layouts(results)
    for key in ("save EP4", "save EP4 sharded", "save EP4 sharded weights"):
        assert all(torch.equal(r[key]["probe"], results[0][key]["probe"]) for r in results)
    _same_probes(results[0]["save EP4 sharded"], results[0]["save EP4"])  # the same training either way
    _same_probes(results[0]["save EP4 sharded weights"], results[0]["save EP4"])


def test_world2_layouts_and_checkpoint_at_ep2(ep4):
    ckpt, saved = ep4
    results = run_workers(_world2, 2, ckpt, timeout_s=180)
    _assert_layouts(results)
    for r in results:
        _same_probes(r["load EP2"], saved[0]["save EP4"])
        _same_probes(r["load EP2 sharded <- EP4"], saved[0]["save EP4"])
        _same_probes(r["load EP2 <- EP4 sharded"], saved[0]["save EP4"])
        _same_probes(r["load EP2 sharded weights <- EP4"], saved[0]["save EP4"])
        _same_probes(r["load EP2 sharded <- EP4 sharded weights"], saved[0]["save EP4"])


def test_world8_ep8_and_checkpoint_at_ep8(ep4):
    ckpt, saved = ep4
    results = run_workers(_world8, 8, ckpt, timeout_s=240)
    _assert_layouts(results)
    for r in results:
        _same_probes(r["load EP8"], saved[0]["save EP4"])
        _same_probes(r["load DP8xEP2 sharded <- EP4 sharded"], saved[0]["save EP4"])
        _same_probes(r["load DP8xEP2 sharded weights <- EP4 sharded weights"], saved[0]["save EP4"])


def test_checkpoint_ep4_loads_in_one_process(ep4):
    (plain, sharded, full), saved = ep4
    _same_probes(load_checkpoint({}, plain), saved[0]["save EP4"])
    _same_probes(load_checkpoint({}, sharded), saved[0]["save EP4"])
    _same_probes(load_checkpoint({}, full), saved[0]["save EP4"])
