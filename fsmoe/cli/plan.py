"""``fsmoe plan``: the schedule for a layer config on a layout, from a Profile; or, with
``--memory``, the peak memory per GPU of training a model on a layout and what fits a card.

    fsmoe plan --profile runs/profiles/X.json --d-model 2048 --d-ff 8192 --experts 8 --ep 2 --esp 4 \\
        --gpus-per-node 4 --batch 2 --seq-len 1024 --explain
    fsmoe plan --profile P.json --config tiny --set model.moe.num_experts=16 --ep 2 --json sched.json

Layer fields default to the run config (``--config``, default ``tiny``); explicit flags win.
``--explain`` prints the FSMoE case, r, the gradient partitions and the predicted timelines
beside the four baselines (see docs/scheduler.md).

    fsmoe plan --memory --config mixtral-8x7b --gpus 8 --ep 8 --shard optimizer --gpu-gb 141 \
        --set train.batch_size=8 train.activation_checkpointing=full

prints weights, optimizer state, activations, logits and gradients per GPU at the step's two
high points (docs/memory.md) and the largest batch per GPU that fits the card.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from fsmoe.cli.arg_types import output_file
from fsmoe.config import ConfigError

# the layer's fields the flags override (fsmoe.schedule.types.LayerSpec)
LAYER_FLAGS = {"batch": "--batch", "seq_len": "--seq-len", "d_model": "--d-model", "d_ff": "--d-ff",
               "num_experts": "--experts", "top_k": "--top-k", "n_heads": "--heads", "n_layers": "--layers",
               "capacity_factor": "--capacity", "activation": "--ffn"}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plan", help="choose pipeline degrees and gradient partitions (FSMoE)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", help="Profile JSON from `fsmoe profile` (needed unless --memory)")
    p.add_argument("--config", default="tiny", help="preset name or TOML path for the layer defaults")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    for flag, typ in (("--batch", int), ("--seq-len", int), ("--d-model", int), ("--d-ff", int), ("--experts", int),
                      ("--top-k", int), ("--heads", int), ("--layers", int), ("--capacity", float)):
        p.add_argument(flag, type=typ, default=None)
    p.add_argument("--ffn", choices=["gelu", "swiglu"], default=None)
    p.add_argument("--ep", type=int, default=None)
    p.add_argument("--esp", type=int, default=None)
    p.add_argument("--gpus-per-node", type=int, default=None)
    p.add_argument("--policy", default="fsmoe",
                   choices=["default", "tutel_improved", "pipemoe_lina", "fsmoe_no_iio", "fsmoe"])
    p.add_argument("--explain", action="store_true", help="case, r, partitions, predicted timelines vs baselines")
    p.add_argument("--json", type=output_file, default=None,
                   help="write the Schedule (with --memory: the memory plan) here")
    m = p.add_argument_group("memory (--memory)")
    m.add_argument("--memory", action="store_true", help="peak memory per GPU of training, and the largest batch")
    m.add_argument("--gpus", type=int, default=None, help="GPUs in the job (parallel.dp = gpus / mp)")
    m.add_argument("--mp", type=int, default=None, help="tensor parallel degree (parallel.mp)")
    m.add_argument("--shard", choices=["none", "optimizer", "full"], default=None, help="parallel.shard")
    m.add_argument("--gpu-gb", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    m.add_argument("--headroom", type=float, default=0.1,
                   help="fraction of the card kept free for the CUDA context, allocator and NCCL (default 0.1)")
    m.add_argument("--imbalance", type=float, default=1.0,
                   help="rows of the busiest expert rank over the mean (default 1: balanced routing)")
    p.set_defaults(func=run)


def _layer_overrides(spec, args):
    """``spec`` with the layer flags given; a value the layer refuses is a ConfigError naming the flag."""
    over = {field: getattr(args, flag[2:].replace("-", "_")) for field, flag in LAYER_FLAGS.items()}
    over = {k: v for k, v in over.items() if v is not None}
    try:
        spec = dataclasses.replace(spec, **over)
    except ValueError as e:
        field = next((f for f in LAYER_FLAGS if f"LayerSpec.{f}" in str(e)), None)
        flag = LAYER_FLAGS.get(field, "--config")
        raise ConfigError(flag, over.get(field), str(e).split(" is invalid: ")[-1]) from None
    if spec.top_k > spec.num_experts:
        raise ConfigError("--top-k", spec.top_k, f"must be <= the number of experts ({spec.num_experts})")
    return spec


def run(args) -> int:
    if args.memory:
        from fsmoe.cli.plan_memory import run_memory

        return run_memory(args)
    if not args.profile:
        raise ConfigError("--profile", None, "a Profile JSON from `fsmoe profile` is needed to plan a schedule "
                          "(or pass --memory for the memory plan)")
    from fsmoe.config import load_config
    from fsmoe.schedule.types import LayerSpec, Layout
    from fsmoe.schedule.model.plan import explain, plan
    from fsmoe.schedule.model.profile import Profile

    cfg = load_config(args.config, args.set)
    spec = LayerSpec.from_run_config(cfg)
    spec = _layer_overrides(spec, args)
    pc = cfg.parallel
    for flag, value in (("--ep", args.ep), ("--esp", args.esp), ("--gpus-per-node", args.gpus_per_node)):
        if value is not None and value < 1:
            raise ConfigError(flag, value, "must be an integer >= 1 (leave it out for the config's)")
    ep, esp = args.ep or pc.ep, args.esp or pc.esp  # one moe group; dense data parallel over its ranks
    layout = Layout(dp=ep * esp, ep=ep, esp=esp,
                    gpus_per_node=args.gpus_per_node if args.gpus_per_node is not None else pc.gpus_per_node)
    profile = Profile.load(args.profile)
    note = profile.layout_note(layout)
    if note:
        print(note, file=sys.stderr)
    sched = plan(spec, layout, profile, args.policy)
    if args.explain:
        print(explain(spec, layout, profile))
    else:
        print(f"{sched.policy}: r_fwd={sched.r_fwd} r_bwd={sched.r_bwd} iio={sched.iio} "
              f"gar={sched.gar.mode}{list(sched.gar.window_bytes) if sched.gar.window_bytes else ''} "
              f"predicted iteration {sched.predicted_iter_s * 1e3:.3f} ms")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(sched.to_dict(), indent=1))
    return 0
