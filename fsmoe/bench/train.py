"""``fsmoe bench train``: tokens/s, MFU and peak memory of ``fsmoe train``'s own step on one device.

What is timed is ``Trainer.train_step``, the code ``fsmoe train`` runs, on the batches it draws
(the stdlib corpus): fp32 master weights and AdamW state (fused on CUDA), bf16 compute under
autocast, gradient clipping, the non-finite guard, the LR schedule and the routers' step hooks.
Variants, each a fresh Trainer in the same process on the same card:

  fsmoe        MoE layers with the fused kernels (``moe.kernels=auto``; the experts' GEMMs ours or
               torch's grouped_mm, whichever measured faster at the shape: experts.gemm=auto)
  fsmoe-cutlass  the same with the experts on torch's grouped_mm (CUTLASS; ``experts.gemm=torch``)
  fsmoe-cublas the same with one cuBLAS GEMM per expert (``experts.gemm=cublas``; one host sync a layer)
  fsmoe-graph  fsmoe with the whole step replayed as one CUDA graph (``train.cuda_graph=true``)
  fsmoe-torch  MoE layers on the plain-PyTorch reference path (``moe.kernels=torch``)
  torchtitan   the same Trainer and decoder with torchtitan's MoE in every MoE slot (when its wheel
               imports): attention, norms, embeddings, optimizer and data are identical, so the
               difference is the MoE implementation alone

Models are the shipped presets cut to fit one card (``TRAIN_MODELS``); ``--set`` adds any config
override (e.g. ``train.activation_checkpointing=moe``, ``train.compile=true``).

Timing: after warm-up, ``--iters`` steps run back to back in ``--windows`` windows between CUDA
events (the host queues steps ahead, as in ``fsmoe train``); the median window's time per step.
MFU = model FLOPs per token (fsmoe.models.flops, PaLM's count) * tokens/s / the card's dense bf16 peak.
"""
from __future__ import annotations

import gc
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from fsmoe.bench.common import bench_ms, device_info, peak_tflops, profile_kernels
from fsmoe.cli.arg_types import non_negative_int, output_file, positive_int
from fsmoe.config import ConfigError, RunConfig, load_config
from fsmoe.graph_step import WARMUP_STEPS as GRAPH_WARMUP_STEPS


@dataclass(frozen=True)
class BenchModel:
    preset: str
    overrides: tuple[str, ...]
    batch: int  # sequences per step
    seq_len: int


TRAIN_MODELS = {
    # Mixtral 8x7B's layers (d 4096, 8 experts of 14336, top-2, GQA 32/8) cut to 2.
    "mixtral-2l": BenchModel("mixtral-8x7b", ("model.n_layers=2",), 8, 4096),
    # GPT2-XL-MoE (d 1600, 8 GeLU experts of 6400, top-2, every 2nd layer MoE) cut to 8 layers.
    "gpt2-xl-moe-8l": BenchModel("gpt2-xl-moe", ("model.n_layers=8",), 8, 1024),
    # Qwen3-30B-A3B's layers (d 2048, 128 experts of 768, top-8): fine-grained experts, cut to 4.
    "qwen3-moe-4l": BenchModel("qwen3-30b-a3b", ("model.n_layers=4",), 4, 4096),
    # CPU smoke test.
    "tiny": BenchModel("tiny", ("model.n_layers=2",), 4, 64),
}
VARIANTS = ["fsmoe", "fsmoe-cutlass", "fsmoe-cublas", "fsmoe-graph", "fsmoe-torch", "torchtitan"]


class TorchtitanMoE(nn.Module):
    """torchtitan's MoE behind MoELayer's interface (``forward(x) -> (y, MoEStats)``, ``cfg``,
    ``experts.num_experts``, ``router.after_step()``)."""

    def __init__(self, moe_cfg, d_model: int, init_std: float = 0.02):
        super().__init__()
        from torchtitan.models.common.linear import Linear
        from torchtitan.models.common.moe import GroupedExperts, MoE, RoutedExperts, TokenChoiceTopKRouter
        from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

        if moe_cfg.experts.activation != "swiglu" or moe_cfg.experts.num_shared:
            raise NotImplementedError("not comparable: torchtitan's MoE has SwiGLU routed experts only; this model "
                                      f"has {moe_cfg.experts.activation} experts, {moe_cfg.experts.num_shared} shared")
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
        with torch.no_grad():
            for p in self.moe.parameters():
                p.normal_(0.0, init_std)

    @property
    def experts(self) -> nn.Module:
        return self.moe.routed_experts.inner_experts

    @property
    def router(self) -> "TorchtitanMoE":
        return self  # the trainer's after_step() hook lands here: torchtitan's router has none

    def after_step(self) -> None:
        pass

    def forward(self, x):
        from fsmoe.layer import MoEStats

        y = self.moe(x if x.dim() == 3 else x.unsqueeze(0)).view_as(x)
        E = self.cfg.num_experts
        return y, MoEStats(x.new_zeros((), dtype=torch.float32), {}, torch.zeros(E, dtype=torch.long, device=x.device),
                           torch.zeros((), dtype=torch.long, device=x.device), x.numel() // x.shape[-1])


def bench_config(name: str, variant: str, args, device: torch.device) -> RunConfig:
    """The preset of ``name`` with the bench's batch, an endless schedule (no logging, evaluation
    or checkpoint inside the timed steps) and the device's precision."""
    m = TRAIN_MODELS[name]
    overrides = [*m.overrides, f"train.batch_size={args.batch or m.batch}", f"train.seq_len={args.seq_len or m.seq_len}",
                 "train.steps=1000000", "train.warmup_steps=10", "train.log_every=1000000",
                 "train.eval_every=1000000", "train.ckpt_every=0", f"train.device=\"{device.type}\"",
                 f"train.dtype=\"{'bfloat16' if device.type == 'cuda' else 'float32'}\""]
    if args.layers:
        overrides.append(f"model.n_layers={args.layers}")
    if variant == "fsmoe-torch":
        overrides.append("model.moe.kernels=\"torch\"")
    if variant == "fsmoe-cutlass":
        overrides.append("model.moe.experts.gemm=\"torch\"")
    if variant == "fsmoe-cublas":
        overrides.append("model.moe.experts.gemm=\"cublas\"")
    if variant == "fsmoe-graph":
        overrides.append("train.cuda_graph=true")
    return load_config(m.preset, overrides + list(args.overrides))


def build_trainer(variant: str, cfg: RunConfig, run_dir: Path):
    """A Trainer for ``cfg`` (torchtitan: its MoE in every MoE slot), printing nothing."""
    from fsmoe.models import build_model
    from fsmoe.train import Trainer

    class TorchtitanTrainer(Trainer):
        def build_model(self) -> nn.Module:
            return build_model(self.cfg.model, seed=self.tcfg.seed,
                               moe_layer_factory=lambda i, moe_cfg, d: TorchtitanMoE(moe_cfg, d))

    cls = TorchtitanTrainer if variant == "torchtitan" else Trainer
    return cls(cfg, run_dir, console=Console(quiet=True))


def run_variant(name: str, variant: str, args, device) -> dict:
    cfg = bench_config(name, variant, args, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory(prefix="fsmoe-bench-train-") as tmp:
        trainer = build_trainer(variant, cfg, Path(tmp) / "run")
        results = []

        def step():
            results.append(trainer.train_step())

        # a graphed trainer captures after its eager steps: capture and first replay stay out of the timing
        warmup = max(args.warmup, GRAPH_WARMUP_STEPS + 2) if cfg.train.cuda_graph else args.warmup
        ms = bench_ms(step, device, iters=args.iters, warmup=warmup, windows=args.windows)
        first, last = results[0].read(), results[-1].read()
        tokens = cfg.train.batch_size * cfg.train.seq_len
        total, active = trainer.parameter_counts()
        row = {"ms": round(ms, 2), "tokens_per_s": round(tokens / ms * 1e3), "flops_per_token": trainer.flops_per_token,
               "model_tflops": round(trainer.flops_per_token * tokens / ms / 1e9, 1), "params": total,
               "active_params": active, "loss_first": round(first.loss, 4), "loss_last": round(last.loss, 4),
               "config": {k: getattr(cfg.train, k) for k in ("batch_size", "seq_len", "dtype", "activation_checkpointing",
                                                              "compile", "cuda_graph")}}
        mfu = trainer.mfu(row["tokens_per_s"])
        if mfu is not None:
            row["mfu"] = round(mfu, 4)
        if device.type == "cuda":
            row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if args.profile:
            row["profile"] = profile_kernels(step, device, iters=2, top=15)
        trainer.metrics.close()
    return row  # the trainer is freed when this returns; run() then empties the allocator's cache


def _print_row(variant: str, row: dict) -> None:
    if "error" in row:
        print(f"{variant:12s} error: {row['error'][:200]}")
        return
    mfu = f"{100 * row['mfu']:5.1f}% MFU" if "mfu" in row else ""
    print(f"{variant:12s} {row['ms']:9.2f} ms/step {row['tokens_per_s']:9d} tok/s "
          f"{row['model_tflops']:7.1f} TFLOP/s {mfu}  peak {row.get('peak_mem_gb', '-')} GiB")


def run(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", args.device, "no CUDA device is visible here; use cpu or leave it out")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    variants = args.variants.split(",") if args.variants else VARIANTS
    if args.model not in TRAIN_MODELS:
        raise ConfigError("--model", args.model, f"known models are {list(TRAIN_MODELS)}")
    for v in variants:
        if v not in VARIANTS:
            raise ConfigError("--variants", v, f"known variants are {VARIANTS}")
    bench_config(args.model, variants[0], args, device)  # a bad --set fails here, before any model is built
    args.windows = args.windows or None
    m = TRAIN_MODELS[args.model]
    out = {"kind": "train", "meta": device_info(device), "command": "fsmoe " + " ".join(sys.argv[1:]),
           "model": args.model, "preset": m.preset, "layers": args.layers or int(m.overrides[0].split("=")[1]),
           "batch": args.batch or m.batch, "seq_len": args.seq_len or m.seq_len, "overrides": list(args.overrides),
           "peak_tflops": peak_tflops(device), "variants": {}}
    print(f"# {out['meta'].get('name')}  torch {out['meta']['torch']}  model {args.model} ({m.preset}) "
          f"layers={out['layers']} batch={out['batch']}x{out['seq_len']}  timing Trainer.train_step")
    for v in variants:
        try:
            row = run_variant(args.model, v, args, device)
        except ConfigError:
            raise
        except Exception as e:  # a peer that does not install or run is reported, not fatal
            row = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        out["variants"][v] = row
        _print_row(v, row)
    base = out["variants"].get("torchtitan", {}).get("tokens_per_s")
    if base and "tokens_per_s" in out["variants"].get("fsmoe", {}):
        out["speedup_vs_torchtitan"] = round(out["variants"]["fsmoe"]["tokens_per_s"] / base, 3)
        print(f"fsmoe / torchtitan tokens/s: {out['speedup_vs_torchtitan']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


def add_arguments(p) -> None:
    p.add_argument("--model", default="mixtral-2l", help=f"one of {list(TRAIN_MODELS)}")
    p.add_argument("--layers", type=positive_int, help="override the number of layers")
    p.add_argument("--batch", type=positive_int, help="sequences per step (default: the model's, see TRAIN_MODELS)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the model's)")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                   help="config overrides, e.g. train.activation_checkpointing=moe train.compile=true")
    p.add_argument("--variants", help=f"comma-separated, from {VARIANTS} (default: all)")
    p.add_argument("--iters", type=positive_int, default=12, help="timed steps")
    p.add_argument("--windows", type=positive_int, default=3,
                   help="the timed steps run back to back in this many windows, as in `fsmoe train` (median "
                        "window reported); 0 = time each step alone, the device idling between steps")
    p.add_argument("--warmup", type=non_negative_int, default=3)
    p.add_argument("--profile", action="store_true", help="add a torch.profiler kernel breakdown")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available")
    p.add_argument("--json", type=output_file, help="write the results here (JSON, read by scripts/perf_page.py)")
