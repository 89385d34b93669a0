"""``fsmoe plan --memory``: peak memory per GPU of training a model on a layout (fsmoe.memory)."""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fsmoe.config import ConfigError, load_config
from fsmoe.memory import GiB, ParamCounts, largest_batch, plan_memory

ORDER = ("weights", "gathered blocks", "gradients", "optimizer", "activations", "bf16 weight copies", "logits",
         "communication buffers")


def memory_config(args):
    """The run config with the layout flags applied (``--gpus`` sets dp = gpus / mp)."""
    over = list(args.set)
    mp = args.mp or 1
    if args.gpus is not None:
        if args.gpus < 1 or args.gpus % mp:
            raise ConfigError("--gpus", args.gpus, f"must be a positive multiple of --mp={mp}")
        over.append(f"parallel.dp={args.gpus // mp}")
    for flag, key in (("mp", "mp"), ("ep", "ep"), ("esp", "esp"), ("shard", "shard"),
                      ("gpus_per_node", "gpus_per_node")):
        value = getattr(args, flag, None)
        if value is not None:
            over.append(f"parallel.{key}={json.dumps(value)}")
    if args.seq_len is not None:
        over.append(f"train.seq_len={args.seq_len}")
    if args.batch is not None:
        over.append(f"train.batch_size={args.batch}")
    if not args.gpu_gb > 0:
        raise ConfigError("--gpu-gb", args.gpu_gb, "must be > 0 (GiB of one GPU)")
    if not args.imbalance >= 1:
        raise ConfigError("--imbalance", args.imbalance, "must be >= 1 (busiest expert rank's rows over the mean)")
    if not 0 <= args.headroom < 1:
        raise ConfigError("--headroom", args.headroom, "must be in [0, 1)")
    return load_config(args.config, over)


def run_memory(args) -> int:
    cfg = memory_config(args)
    m, par, t = cfg.model, cfg.parallel, cfg.train
    counts = ParamCounts.of(m)
    plan = plan_memory(cfg, imbalance=args.imbalance, counts=counts)
    budget = args.gpu_gb * GiB * (1 - args.headroom)
    best = largest_batch(cfg, budget, imbalance=args.imbalance, counts=counts)
    console = Console(soft_wrap=True)
    edp = par.world // (par.ep * par.esp)
    console.print(f"memory per GPU: {cfg.name} ({(counts.split_by_mp + counts.replicated + counts.experts) / 1e9:.2f}B "
                  f"parameters) on {par.world} GPU(s): dense dp={par.dp} x mp={par.mp}; experts ep={par.ep} x "
                  f"esp={par.esp} (edp={edp}); shard={par.shard}; {t.batch_size // par.dp} x {t.seq_len} tokens per "
                  f"GPU; {t.dtype}; activation checkpointing {t.activation_checkpointing}", markup=False, highlight=False)
    table = Table("GiB per GPU", "end of forward", "end of backward + step")
    for part in ORDER:
        if part in plan.forward or part in plan.step:
            table.add_row(part, *(f"{phase[part] / GiB:.2f}" if part in phase else "-"
                                  for phase in (plan.forward, plan.step)))
    table.add_row("total", *(f"{sum(phase.values()) / GiB:.2f}" for phase in (plan.forward, plan.step)), style="bold")
    console.print(table)
    fits = plan.total <= budget
    console.print(f"peak {plan.total / GiB:.2f} GiB ({'end of forward' if plan.peak_phase == 'forward' else 'optimizer step'})"
                  f" against {budget / GiB:.1f} GiB usable of a {args.gpu_gb:g} GiB card ({args.headroom:.0%} kept "
                  f"for the CUDA context, allocator and NCCL): {'fits' if fits else 'does NOT fit'}",
                  markup=False, highlight=False)
    # the step's high point does not depend on the batch: weights, gradients, optimizer state, buffers
    why = ("the weights, gradients and optimizer state alone do not fit" if sum(plan.step.values()) > budget else
           f"not even {par.mp} sequence(s) per GPU, the fewest the MoE layers split over mp={par.mp}; "
           "try a shorter --seq-len")
    console.print(f"largest batch that fits: {best} x {t.seq_len} tokens per GPU" +
                  (f" (train.batch_size={best * par.dp})" if best else f": none ({why})"),
                  markup=False, highlight=False)
    if not fits:
        for hint in _hints(cfg):
            console.print(f"  try {hint}", markup=False, highlight=False)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "config": cfg.name, "layout": {"dp": par.dp, "mp": par.mp, "ep": par.ep, "esp": par.esp, "edp": edp,
                                           "shard": par.shard},
            "tokens_per_gpu": plan.tokens_per_gpu, "params_per_gpu": plan.params_per_gpu,
            "forward_bytes": plan.forward, "step_bytes": plan.step, "peak_bytes": plan.total,
            "peak_phase": plan.peak_phase, "gpu_gb": args.gpu_gb, "headroom": args.headroom, "fits": fits,
            "largest_batch_per_gpu": best}, indent=1))
    return 0


def _hints(cfg) -> list[str]:
    """What would shrink the peak, in the order a user would reach for it."""
    par, t = cfg.parallel, cfg.train
    out = []
    if t.activation_checkpointing != "full":
        out.append("--set train.activation_checkpointing=full (recompute each block in backward)")
    if par.shard == "none" and par.dp > 1:
        out.append("--shard optimizer (AdamW state and gradients split over the data-parallel replicas)")
    if par.shard != "full" and par.dp > 1:
        out.append("--shard full (the blocks' weights split too, gathered around each block's use)")
    if par.ep * par.esp < min(par.world, cfg.model.moe.num_experts):
        out.append("a larger --ep (fewer experts per GPU)")
    out.append("more GPUs, or a smaller train.batch_size / --seq-len")
    return out
