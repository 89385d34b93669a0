"""``fsmoe infer``: generate with a model larger than the GPU: attention, KV cache and shared experts
on the GPU, routed experts split between GPU, PCIe streaming and CPU (fsmoe.infer.hybrid)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from fsmoe.cli.arg_types import output_file
from fsmoe.config import ConfigError
from fsmoe.infer.hybrid.options import add_device_path_options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from fsmoe.cli.generate import add_generation_args
    from fsmoe.infer.hybrid.policies import POLICY_NAMES

    p = subparsers.add_parser("infer", help="generate with routed experts split between CPU and GPU under a GPU "
                                            "memory budget",
                              description="Hybrid CPU/GPU inference. Every routed expert is resident on the GPU "
                                          "(GG), kept in host memory and streamed over PCIe when used (CG), or "
                                          "kept and computed on the CPU (CC); with --policy scheinfer the hottest "
                                          "experts that fit the budget are resident and each layer's others are "
                                          "split per forward by measured CPU, PCIe and GPU costs, checked against the "
                                          "clock (--policy model: the cost model alone).")
    add_generation_args(p)
    p.add_argument("--gpu-mem-gb", type=float, required=True, help="GPU memory budget in GiB (the process is capped)")
    p.add_argument("--policy", default="scheinfer", help=f"one of {list(POLICY_NAMES)}")
    p.add_argument("--hot", type=Path, help="routing frequencies (JSON [layers][experts], e.g. from --save-hot "
                                            "of an earlier run); default: counted on the prompts first")
    p.add_argument("--save-hot", type=output_file, help="write the frequencies counted in this run")
    p.add_argument("--cpu-lane", choices=["worker", "inline"], default="worker",
                   help="how the CPU experts run beside the GPU work (see fsmoe bench infer --help)")
    add_device_path_options(p)
    p.add_argument("--costs", type=Path, help="lane costs from fsmoe bench infer (costs.json); default: measured")
    p.add_argument("--timeline", type=Path, help="write the lanes of this run (Chrome trace JSON and a PNG) here")
    p.set_defaults(func=run)


def _hot(path: Path, shape: tuple[int, int]) -> np.ndarray:
    try:
        hot = np.asarray(json.loads(Path(path).read_text()), dtype=np.float64)
    except (OSError, ValueError) as e:
        raise ConfigError("--hot", str(path), f"must be a JSON list of per-layer expert counts ({e})") from None
    if hot.shape != shape:
        raise ConfigError("--hot", str(path), f"has shape {list(hot.shape)}; this model needs {list(shape)} "
                                               "(MoE layers x experts)")
    return hot


def run(args: argparse.Namespace) -> int:
    from fsmoe.cli.generate import check_args, encode_prompts, pick_device
    from fsmoe.infer.hybrid import mailbox, zero_copy
    from fsmoe.infer.hybrid.hardware import describe_cpu_timings, load_costs, measure_costs
    from fsmoe.infer.hybrid.memory import cap_gpu_memory, kv_cache_bytes, plan_gpu_memory
    from fsmoe.infer.hybrid.model import HybridModel, loaded_model
    from fsmoe.infer.hybrid.policies import parse_policy

    check_args(args)
    policy = parse_policy(args.policy)
    if not 0 < args.gpu_mem_gb < float("inf"):
        raise ConfigError("--gpu-mem-gb", args.gpu_mem_gb, "must be a finite number > 0")
    device = pick_device(args)
    dtype = getattr(torch, args.dtype)
    in_place = zero_copy.resolve(args.zero_copy, device, dtype)  # refused before anything is loaded
    cpu_on_device = mailbox.resolve(args.cpu_on_device, in_place, dtype)
    console = Console(soft_wrap=True, highlight=False)
    t0 = time.perf_counter()
    model, host, cfg, converted = loaded_model(args.model, device, dtype)  # still on the host
    tok, prompts = encode_prompts(args, cfg, converted)
    slots = max(len(p) for p in prompts) + args.max_new_tokens
    # the plan refuses a budget too small before the GPU holds anything (else: an out-of-memory error)
    memory = plan_gpu_memory(cfg, budget_gb=args.gpu_mem_gb, dense_params=sum(p.numel() for p in model.parameters()),
                             kv_bytes=kv_cache_bytes(cfg, len(prompts), slots, dtype.itemsize),
                             prefill_tokens=sum(len(p) for p in prompts), dtype_bytes=dtype.itemsize)
    cap_gpu_memory(args.gpu_mem_gb, device)
    model.to(device)
    cpu_timings: dict = {}
    costs = load_costs(args.costs) if args.costs else measure_costs(host[0], device, timings=cpu_timings)
    hybrid = HybridModel(model, host, costs, memory, device, keep_splits=False, cpu_lane=args.cpu_lane,
                         zero_copy=in_place, cpu_on_device=cpu_on_device)
    try:
        return _generate(args, hybrid, policy, tok, prompts, device, console, t0, describe_cpu_timings(cpu_timings))
    finally:
        hybrid.close()


def _generate(args, hybrid, policy, tok, prompts, device, console, t0, cpu_timings_line: str = "") -> int:
    from fsmoe.cli.generate import decode_graphs, print_generation
    from fsmoe.infer.generate import Sampling, generate
    from fsmoe.infer.hybrid.policies import Policy

    L, E = hybrid.hot_LE.shape
    if args.hot:
        hot = _hot(args.hot, (L, E))
    else:  # count the prompts' routing once, every expert streamed, then place by it
        hybrid.place(Policy("count", "none", "stream"))
        generate(hybrid.model, prompts, Sampling(max_new_tokens=1))
        hot = hybrid.hot_LE.copy()
    resident = hybrid.place(policy, hot)
    console.print(f"{args.model}: {L} MoE layers x {E} experts; GPU budget {args.gpu_mem_gb:g} GiB holds "
                  f"{int(resident.sum())} resident ({policy.name}); ready in {time.perf_counter() - t0:.1f} s"
                  + (f"; CPU share on the device path {hybrid.cpu_share:g} (ms per layer: {hybrid.cpu_share_ms}), "
                     f"taken by forwards of up to {hybrid.cpu_lane_tokens} tokens (ms per layer, against the host "
                     f"path: {hybrid.cpu_lane_ms})"
                     if hybrid.mailbox is not None and policy.race else ""), style="dim")
    for line in (hybrid.describe_cpu(), cpu_timings_line):
        if line:
            console.print(line, style="dim")
    rec = hybrid.record(True) if args.timeline else None
    out = generate(hybrid.model, prompts, Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed,
                                                   not args.no_cache, tok.eos_ids),
                   decode_graphs(args, hybrid.model, device))
    hybrid.check()
    print_generation(console, args, tok, prompts, out, device, "hybrid " + policy.name)
    if rec is not None:
        from fsmoe.infer.hybrid.timeline import chrome_trace, gantt_png

        args.timeline.mkdir(parents=True, exist_ok=True)
        spans = rec.finish()
        chrome_trace(spans, args.timeline / "timeline.json")
        gantt_png(spans, args.timeline / "timeline.png", f"{policy.name}: {args.model}")
    if args.save_hot:
        Path(args.save_hot).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save_hot).write_text(json.dumps(hybrid.hot_LE.tolist()))
    return 0
