"""``fsmoe bench train``: tokens/s and MFU of full training steps of a GPT-MoE model on one GPU.

Shape legend: B sequences, L sequence length, V vocabulary, D model dim.

One step = forward of the whole decoder (``fsmoe.models.build_model``), cross-entropy + aux loss,
backward, fused AdamW step. Weights, gradients and optimizer state are bf16 on CUDA (no fp32
master copy), the same for every variant:

  fsmoe        MoE layers with the fused kernels (``moe.kernels=auto``)
  fsmoe-torch  MoE layers on the plain-PyTorch reference path (``moe.kernels=torch``)
  torchtitan   the same decoder with torchtitan's MoE layer in every MoE slot (when its wheel
               imports): attention, norms, embeddings and optimizer are identical, so the
               difference is the MoE implementation alone

MFU = model FLOPs per token * tokens/s / the card's dense bf16 peak, with the PaLM count:
6 * (active parameters except the embedding lookup) + 12 * layers * (heads * head_dim) * L
(attention scores counted in full, as is customary, though the causal kernel skips half).
"""
from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fsmoe.bench.common import bench_ms, device_info, peak_tflops, profile_kernels, step_peak_memory_gb

# A Mixtral-8x7B layer stack cut to a few layers so that weights + grads + AdamW state + activations
# fit one 80 GB card in bf16.
TRAIN_MODELS = {
    "mixtral-2l": dict(arch="llama", vocab_size=32000, d_model=4096, n_layers=2, n_heads=32, n_kv_heads=8,
                       d_ff=14336, max_seq_len=4096, rope_theta=1e6,
                       moe=dict(num_experts=8, router=dict(name="gshard", top_k=2, aux_loss_coef=0.02),
                                experts=dict(d_ff=14336, activation="swiglu"))),
    "tiny": dict(arch="llama", vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=64,
                 moe=dict(num_experts=4, router=dict(top_k=2), experts=dict(d_ff=96))),
}
VARIANTS = ["fsmoe", "fsmoe-torch", "torchtitan"]


def model_config(name: str, n_layers: int | None, kernels: str):
    from fsmoe.config import config_from_dict

    data = json.loads(json.dumps(TRAIN_MODELS[name]))
    if n_layers:
        data["n_layers"] = n_layers
    data["moe"]["kernels"] = kernels
    return config_from_dict({"name": f"bench-{name}", "model": data,
                             "train": {"seq_len": min(128, data["max_seq_len"])}}).model


def flops_per_token(model, cfg, seq_len: int) -> float:
    active = model.num_parameters(active_only=True) - model.tok_emb.weight.numel()
    if model.pos_emb is not None:
        active -= model.pos_emb.weight.numel()
    if cfg.tie_embeddings:  # the tied matrix is used as lm_head: count it once, as a matmul
        active += model.tok_emb.weight.numel()
    return 6.0 * active + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_size * seq_len


class TorchtitanMoE(nn.Module):
    """torchtitan's MoE behind MoELayer's interface (``forward(x) -> (y, MoEStats)``)."""

    def __init__(self, moe_cfg, d_model: int, init_std: float = 0.02):
        super().__init__()
        from torchtitan.models.common.linear import Linear
        from torchtitan.models.common.moe import GroupedExperts, MoE, RoutedExperts, TokenChoiceTopKRouter
        from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

        E, K, Fh = moe_cfg.num_experts, moe_cfg.router.top_k, moe_cfg.experts.d_ff
        cfg = MoE.Config(
            num_experts=E, load_balance_coeff=None,
            routed_experts=RoutedExperts.Config(
                inner_experts=GroupedExperts.Config(dim=d_model, hidden_dim=Fh, num_experts=E),
                token_dispatcher=LocalTokenDispatcher.Config(num_experts=E, top_k=K)),
            router=TokenChoiceTopKRouter.Config(num_experts=E, gate=Linear.Config(in_features=d_model, out_features=E),
                                                top_k=K, score_func="softmax", route_norm=True))
        self.cfg = moe_cfg
        self.moe = cfg.build()
        self.router = self.moe.router
        self.experts = self.moe.routed_experts.inner_experts
        with torch.no_grad():
            for p in self.moe.parameters():
                p.normal_(0.0, init_std)

    def forward(self, x):
        from fsmoe.layer import MoEStats

        y = self.moe(x if x.dim() == 3 else x.unsqueeze(0)).view_as(x)
        z = x.new_zeros((), dtype=torch.float32)
        E = self.cfg.num_experts
        return y, MoEStats(z, {}, torch.zeros(E, dtype=torch.long, device=x.device),
                           torch.zeros((), dtype=torch.long, device=x.device), x.numel() // x.shape[-1])


def build(variant: str, name: str, n_layers: int | None, device, dtype):
    from fsmoe.models import build_model

    cfg = model_config(name, n_layers, "torch" if variant == "fsmoe-torch" else "auto")
    factory = None
    if variant == "torchtitan":
        def factory(i, moe_cfg, d_model):
            return TorchtitanMoE(moe_cfg, d_model)
    with torch.device(device):
        model = build_model(cfg, moe_layer_factory=factory, seed=0)
    return cfg, model.to(dtype)


def run_variant(variant: str, args, device) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg, model = build(variant, args.model, args.layers, device, dtype)
    B, L, V = args.batch, args.seq_len, cfg.vocab_size
    g = torch.Generator(device=device).manual_seed(0)
    idx = torch.randint(0, V, (B, L + 1), device=device, generator=g)
    x_BL, y_BL = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=device.type == "cuda")
    losses = []

    def step():
        out = model(x_BL)
        loss = F.cross_entropy(out.logits.float().view(-1, V), y_BL.reshape(-1)) + out.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    ms = bench_ms(step, device, iters=args.iters, warmup=args.warmup)
    tokens = B * L
    fpt = flops_per_token(model, cfg, L)
    row = {"ms": round(ms, 2), "tokens_per_s": round(tokens / ms * 1e3), "flops_per_token": fpt,
           "model_tflops": round(fpt * tokens / ms / 1e9, 1),
           "params": model.num_parameters(), "active_params": model.num_parameters(active_only=True),
           "loss_first": round(float(losses[0]), 4), "loss_last": round(float(losses[-1]), 4)}
    peak = peak_tflops(device)
    if peak:
        row["mfu"] = round(row["model_tflops"] / peak, 4)
    row["peak_mem_gb"] = step_peak_memory_gb(step, device)
    if device.type == "cuda":
        row["max_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if args.profile:
        row["profile"] = profile_kernels(step, device, iters=2, top=15)
    del model, opt, step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    variants = args.variants.split(",") if args.variants else VARIANTS
    from fsmoe.config import ConfigError

    if args.model not in TRAIN_MODELS:
        raise ConfigError("--model", args.model, f"known models are {list(TRAIN_MODELS)}")
    for v in variants:
        if v not in VARIANTS:
            raise ConfigError("--variants", v, f"known variants are {VARIANTS}")
    out = {"kind": "train", "meta": device_info(device), "command": "fsmoe " + " ".join(sys.argv[1:]),
           "model": args.model, "layers": args.layers or TRAIN_MODELS[args.model]["n_layers"],
           "batch": args.batch, "seq_len": args.seq_len, "peak_tflops": peak_tflops(device), "variants": {}}
    print(f"# {out['meta'].get('name')}  torch {out['meta']['torch']}  model {args.model} "
          f"layers={out['layers']} batch={args.batch}x{args.seq_len}")
    for v in variants:
        try:
            row = run_variant(v, args, device)
        except Exception as e:  # a peer that does not install or run is reported, not fatal
            row = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        out["variants"][v] = row
        if "error" in row:
            print(f"{v:12s} error: {row['error'][:200]}")
        else:
            mfu = f"{100 * row['mfu']:5.1f}% MFU" if "mfu" in row else ""
            print(f"{v:12s} {row['ms']:9.2f} ms/step {row['tokens_per_s']:9d} tok/s "
                  f"{row['model_tflops']:7.1f} TFLOP/s {mfu}  peak {row.get('max_mem_gb')} GB")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(out, indent=1))
    base = out["variants"].get("torchtitan", {}).get("tokens_per_s")
    if base and "tokens_per_s" in out["variants"].get("fsmoe", {}):
        out["speedup_vs_torchtitan"] = round(out["variants"]["fsmoe"]["tokens_per_s"] / base, 3)
        print(f"fsmoe / torchtitan tokens/s: {out['speedup_vs_torchtitan']}")
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


def add_arguments(p) -> None:
    p.add_argument("--model", default="mixtral-2l", help=f"one of {list(TRAIN_MODELS)}")
    p.add_argument("--layers", type=int, help="override the number of layers")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--variants", help=f"comma-separated, from {VARIANTS} (default: all)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="add a torch.profiler kernel breakdown")
    p.add_argument("--device", help="cuda | cpu (default: cuda if available)")
    p.add_argument("--json", help="write the results here (JSON, read by scripts/perf_page.py)")
