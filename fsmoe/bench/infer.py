"""``fsmoe bench infer``: hybrid CPU/GPU inference of a preset with random weights under every
placement policy, in one process on one GPU with its memory capped.

1. The model (``--config``, random bf16 weights) is built with its routed experts in pinned host
   memory; the lane costs of its expert shape are measured (or read with ``--costs``).
2. A calibration forward of ``--calib-tokens`` random tokens records how often each expert is
   routed to; the policies place their resident experts from those frequencies.
3. Per policy: a sweep of single-forward sizes (``--tokens``) over ``--sweep-layers`` MoE layers
   (ms per layer), decode tokens/s (``--decode-batch`` prompts of ``--prompt-len`` tokens,
   ``--new-tokens`` generated; on CUDA each step replayed from CUDA graphs, and with
   ``--decode-graph both`` also issued op by op) and prefill tokens/s (one prompt of ``--prefill`` tokens).
4. ``--out DIR``: results.json, sweep.png (tokens/s per layer against tokens per forward, one line
   per policy), and the lane timeline of one prefill and one decode step of each policy in
   ``--timelines`` (default scheinfer; timeline_*.json for chrome://tracing, timeline_*.png).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from fsmoe.bench.common import device_info
from fsmoe.config import ConfigError, load_config
from fsmoe.infer.decode_graph import DecodeGraphs
from fsmoe.infer.generate import Sampling, generate
from fsmoe.infer.hybrid import mailbox, zero_copy
from fsmoe.infer.hybrid.hardware import describe_cpu_timings, load_costs, measure_costs, median_seconds, save_costs
from fsmoe.infer.hybrid.in_place import InPlaceStreamExecutor
from fsmoe.infer.hybrid.memory import GiB, cap_gpu_memory, kv_cache_bytes, plan_gpu_memory
from fsmoe.infer.hybrid.model import HybridModel, random_model
from fsmoe.infer.hybrid.options import add_device_path_options
from fsmoe.infer.hybrid.partition import CLASS_NAMES
from fsmoe.infer.hybrid.policies import Policy, parse_policy
from fsmoe.infer.hybrid.timeline import chrome_trace, gantt_png, overlap_share, step_breakdown

DEFAULT_POLICIES = "scheinfer,model,llamacpp,fiddler,stream,static:0.25,static:0.5,static:0.75"
FIXED = ("fiddler", "stream", "static:")  # the "all CC, all CG, best static split" the adaptive split must match


def add_arguments(p) -> None:
    p.add_argument("--config", default="qwen3-30b-a3b", help="a preset or TOML file (random weights are used)")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                   help="config overrides, e.g. model.n_layers=16")
    p.add_argument("--gpu-mem-gb", type=float, default=24.0, help="GPU memory budget (the process is capped to it)")
    p.add_argument("--policies", default=DEFAULT_POLICIES, help="comma-separated (see fsmoe infer --help)")
    p.add_argument("--tokens", default="1,4,16,64,256,1024,4096", help="single-forward sizes of the sweep")
    p.add_argument("--sweep-layers", type=int, default=4, help="MoE layers timed in the sweep (evenly spaced)")
    p.add_argument("--decode-batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill measurement")
    p.add_argument("--calib-tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3, help="measured decode and prefill runs (the median is reported)")
    p.add_argument("--cpu-lane", choices=["worker", "inline"], default="worker",
                   help="worker: a thread computes the CPU experts while the GPU work is issued; inline: the "
                        "GPU work is issued first (indices through pinned memory), then this thread computes them")
    add_device_path_options(p)
    p.add_argument("--decode-graph", choices=["on", "off", "both"], default="both",
                   help="decode steps replayed from CUDA graphs (on), issued op by op (off), or both measured "
                        "(the headline figure is the graphed one; CUDA only)")
    p.add_argument("--costs", type=Path, help="lane costs measured earlier (JSON); default: measure now")
    p.add_argument("--timelines", default="scheinfer",
                   help="policies whose lane timeline of one prefill and one decode step is recorded with --out "
                        "(comma-separated; '' for none)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write results.json, sweep.png and timelines here")


def _ints(text: str, field: str) -> list[int]:
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise ConfigError(field, text, "must be comma-separated positive integers")
    return out


def layer_inputs(hybrid: HybridModel, tokens: int, n_layers: int, device) -> dict[int, torch.Tensor]:
    """The hidden states [1, tokens, D] entering ``n_layers`` evenly spaced MoE layers in a forward of
    random tokens (so the sweep routes as the model does, not as random vectors would)."""
    layers = hybrid.model.moe_layers()
    pick = sorted({int(i) for i in np.linspace(0, len(layers) - 1, min(n_layers, len(layers)))})
    seen: dict[int, torch.Tensor] = {}
    hooks = [layers[i].register_forward_pre_hook(lambda mod, a, i=i: seen.__setitem__(i, a[0].detach().clone()))
             for i in pick]
    ids = torch.randint(0, hybrid.model.cfg.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hybrid.model(ids.to(device))
    for h in hooks:
        h.remove()
    return seen


def sweep(hybrid: HybridModel, tokens: list[int], inputs: dict[int, torch.Tensor], device) -> dict[int, float]:
    """Seconds per MoE layer of one forward of T tokens (the first T of ``inputs``), averaged over its layers."""
    layers = hybrid.model.moe_layers()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = {}
    with torch.no_grad():
        for T in tokens:
            out[T] = median_seconds(lambda: [layers[i](x[:, :T]) for i, x in inputs.items()], sync, reps=5,
                                    budget_s=1.0) / len(inputs)
    return out


def _prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).tolist()


def _split_summary(splits) -> dict[str, float]:
    n = max(len(splits), 1)
    return {name: sum(s.count(c) for s in splits) / n for c, name in enumerate(CLASS_NAMES)}


def _runs(hybrid: HybridModel, n: int, run) -> list[float]:
    """``run()`` ``n`` times (decode varies run to run by up to a third: callers take the median);
    the splits kept are those of the last run."""
    out = []
    for _ in range(n):
        hybrid.splits.clear()
        out.append(run())
    return out


def measure_decode(hybrid: HybridModel, args, graphs: DecodeGraphs | None) -> tuple[float, list[float]]:
    """(median decode tokens/s, every run's), after one unmeasured run (which also captures the graphs)."""
    cfg, decode = hybrid.model.cfg, Sampling(max_new_tokens=args.new_tokens)
    generate(hybrid.model, _prompts(args.decode_batch, args.prompt_len, cfg.vocab_size, 5), decode, graphs)
    prompts = _prompts(args.decode_batch, args.prompt_len, cfg.vocab_size, 6)
    rates = _runs(hybrid, args.repeats, lambda: generate(hybrid.model, prompts, decode, graphs).decode_tokens_per_s)
    return float(np.median(rates)), rates


def measure_policy(hybrid: HybridModel, policy: Policy, hot_LE, inputs, args, tokens, device,
                   graphs: DecodeGraphs | None = None) -> dict:
    cfg = hybrid.model.cfg
    resident = hybrid.place(policy, hot_LE)  # every policy places from the same calibration counts
    res = {"policy": policy.name, "resident_experts": int(resident.sum())}
    # Each measurement runs once unmeasured first, at its own shapes: the first forwards of a shape
    # pay one-time costs (kernel choices, allocator growth) that made whichever policy ran first
    # look up to 3x slower; they also let the race time its candidates, as in a running server.
    prefill = Sampling(max_new_tokens=1)
    if graphs is not None and args.decode_graph == "both":  # the eager baseline first, in the same process
        res["decode_eager_tokens_per_s"], res["decode_eager_runs"] = measure_decode(hybrid, args, None)
    res["decode_tokens_per_s"], res["decode_runs"] = measure_decode(hybrid, args, graphs)
    res["decode_graph"] = graphs is not None
    res["decode_experts_per_layer"] = _split_summary(hybrid.splits[len(hybrid.model.moe_layers()):])
    # with the in-place kernels streaming (and scheinfer once streaming won the race) decodes on the
    # device alone: no split is made (in_place.py)
    res["decode_in_place"] = all(isinstance(m.executor, InPlaceStreamExecutor)
                                 and not m.executor.needs_host_for(args.decode_batch)
                                 for m in hybrid.model.moe_layers())
    generate(hybrid.model, _prompts(1, args.prefill, cfg.vocab_size, 8), prefill)
    prompt = _prompts(1, args.prefill, cfg.vocab_size, 7)
    rates = _runs(hybrid, args.repeats, lambda: args.prefill / generate(hybrid.model, prompt, prefill).prefill_s)
    res["prefill_tokens_per_s"], res["prefill_runs"] = float(np.median(rates)), rates
    res["prefill_experts_per_layer"] = _split_summary(hybrid.splits)
    # last, so that the adaptive policy sweeps the forward sizes it has raced (decode, prefill) as it
    # runs them; the sizes it has not met it splits by the lane model until their race settles
    res["sweep_s_per_layer"] = {str(t): s for t, s in sweep(hybrid, tokens, inputs, device).items()}
    if device.type == "cuda":
        res["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / GiB
    res["cpu_scale"] = hybrid.cpu_scale  # the online refit's measured/modelled CPU lane so far
    if hybrid.mailbox is not None and policy.race:  # the CPU's share on the device path, and each tried
        res["cpu_share"], res["cpu_share_ms"] = hybrid.cpu_share, hybrid.cpu_share_ms
        res["cpu_lane_tokens"], res["cpu_lane_ms"] = hybrid.cpu_lane_tokens, hybrid.cpu_lane_ms
    hybrid.check()  # the CPU lane on the device path answered every forward
    if hybrid.race is not None:  # per forward size, the ms per layer each raced candidate took
        res["race_ms_per_layer"] = hybrid.race.summary()
    return res


def record_timelines(hybrid: HybridModel, args, out: Path | None, graphs: DecodeGraphs | None = None,
                     name: str = "scheinfer") -> tuple[dict, dict]:
    """The lanes of the placed policy ``name`` in one prefill (``--prefill`` tokens) and in a
    decode step after it (the third, so that with ``graphs`` it is a replay of the captured step,
    as in ``fsmoe infer``): (share of the busy time with two lanes busy, ms by lane and by what the
    GPU issuer did), each by phase. Files: timeline_{phase}.* for scheinfer, else
    timeline_{name}_{phase}.*."""
    from fsmoe.models.kv_cache import KVCache

    cfg, model = hybrid.model.cfg, hybrid.model
    device = next(model.parameters()).device
    idx = torch.tensor(_prompts(1, args.prefill, cfg.vocab_size, 8), device=device)
    pad = torch.zeros(1, dtype=torch.long, device=device)
    runner = graphs.runner(1, args.prefill + 3) if graphs is not None else None
    cache = runner.cache if runner is not None else KVCache.for_model(model, 1, args.prefill + 3)

    def decode(tok, slot):
        if runner is not None:
            return runner.step(tok, slot, pad)
        return model(tok, cache=cache, start=slot, pad_B=pad).logits[:, -1]

    shares, breakdown = {}, {}
    with torch.no_grad():
        rec = hybrid.record(True)
        logits = model(idx, cache=cache, start=0, pad_B=pad).logits[:, -1]
        spans = {"prefill": rec.finish()}
        for t in range(3):
            rec = hybrid.record(t == 2)
            logits = decode(logits.argmax(-1, keepdim=True), args.prefill + t)
        spans["decode"] = rec.finish()
        hybrid.record(False)
    stem = "timeline" if name == "scheinfer" else f"timeline_{name.replace(':', '')}"
    for phase, sp in spans.items():
        shares[phase] = overlap_share(sp)
        breakdown[phase] = step_breakdown(sp)
        if out:
            out.mkdir(parents=True, exist_ok=True)
            chrome_trace(sp, out / f"{stem}_{phase}.json")
            how = " (CUDA graphs)" if phase == "decode" and runner is not None else ""
            gantt_png(sp, out / f"{stem}_{phase}.png", f"{name} {phase}{how}: {cfg.n_layers} layers, two or "
                      f"more lanes busy {100 * shares[phase]:.0f}% of the busy time")
    return shares, breakdown


def plot_sweep(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in results:
        xs = [int(t) for t in r["sweep_s_per_layer"]]
        ax.plot(xs, [t / s for t, s in zip(xs, r["sweep_s_per_layer"].values())], marker="o",
                lw=2.2 if r["policy"] == "scheinfer" else 1.0, label=r["policy"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens in the forward")
    ax.set_ylabel("tokens/s through one MoE layer")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _check_lengths(args, max_seq_len: int) -> None:
    """Each sequence the benchmark runs fits the model's context (else a ConfigError naming the
    option, before anything is built): the calibration forward, the prefill prompt with the
    timelines' three decode steps after it, a decode prompt with its new tokens."""
    for name, tokens in (("--calib-tokens", args.calib_tokens), ("--prefill", args.prefill + 3),
                         ("--prompt-len", args.prompt_len + args.new_tokens)):
        if tokens > max_seq_len:
            what = {"--prefill": " (with 3 decode steps after it)",
                    "--prompt-len": f" (with --new-tokens {args.new_tokens})"}.get(name, "")
            raise ConfigError(name, getattr(args, name[2:].replace("-", "_")),
                              f"makes a sequence of {tokens} tokens{what}, past model.max_seq_len={max_seq_len}; "
                              f"lower it or raise model.max_seq_len")


def run(args) -> int:
    console = Console(highlight=False)
    policies = [parse_policy(p, "--policies") for p in args.policies.split(",") if p]
    traced = [parse_policy(p, "--timelines") for p in args.timelines.split(",") if p]  # checked before the run
    tokens = _ints(args.tokens, "--tokens")
    if args.repeats < 1:
        raise ConfigError("--repeats", args.repeats, "must be a positive integer")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", args.device, "no CUDA device is visible; use cpu or auto")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = load_config(args.config, args.overrides).model
    in_place = zero_copy.resolve(args.zero_copy, device, dtype)  # refused before the model is built
    cpu_on_device = mailbox.resolve(args.cpu_on_device, in_place, dtype)
    _check_lengths(args, cfg.max_seq_len)
    cap_gpu_memory(args.gpu_mem_gb, device)
    t0 = time.perf_counter()
    model, host = random_model(cfg, device, dtype, args.seed)
    cpu_timings: dict = {}  # the CPU lane's calls as timed for the costs (kernel against torch's GEMM)
    costs = load_costs(args.costs) if args.costs else measure_costs(host[0], device, timings=cpu_timings)
    slots = max(args.prompt_len + args.new_tokens, args.prefill + 3)
    memory = plan_gpu_memory(cfg, budget_gb=args.gpu_mem_gb, dense_params=sum(p.numel() for p in model.parameters()),
                             kv_bytes=kv_cache_bytes(cfg, max(args.decode_batch, 1), slots),
                             prefill_tokens=max(max(tokens), args.prefill, args.calib_tokens))
    hybrid = HybridModel(model, host, costs, memory, device, cpu_lane=args.cpu_lane,
                         zero_copy=in_place, cpu_on_device=cpu_on_device)
    console.print(f"{cfg.n_layers} layers x {cfg.moe.num_experts} experts ({memory.per_expert / 2**20:.1f} MiB each) "
                  f"built in {time.perf_counter() - t0:.0f} s on {device}; GPU budget {args.gpu_mem_gb:g} GiB holds "
                  f"{memory.slots} of {memory.num_experts} experts; lane costs {costs}")
    for line in (hybrid.describe_cpu(), describe_cpu_timings(cpu_timings)):
        if line:
            console.print(line, style="dim")
    hybrid.place(Policy("calibrate", "none", "stream"))
    with torch.no_grad():
        ids = torch.randint(0, cfg.vocab_size, (1, args.calib_tokens), generator=torch.Generator().manual_seed(3))
        hybrid.model(ids.to(device))
    hot = hybrid.hot_LE.copy()
    inputs = layer_inputs(hybrid, max(tokens), args.sweep_layers, device)
    results = []
    graphs = DecodeGraphs(hybrid.model) if device.type == "cuda" and args.decode_graph != "off" else None
    for policy in policies:
        t1 = time.perf_counter()
        results.append(measure_policy(hybrid, policy, hot, inputs, args, tokens, device, graphs))
        r = results[-1]
        eager = f" (eager {r['decode_eager_tokens_per_s']:.2f})" if "decode_eager_tokens_per_s" in r else ""
        console.print(f"{policy.name:>12}: decode {r['decode_tokens_per_s']:8.2f} tok/s{eager}, prefill "
                      f"{r['prefill_tokens_per_s']:9.1f} tok/s ({time.perf_counter() - t1:.0f} s)")
        if args.out:  # what is measured so far survives a timeout
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "partial.json").write_text(json.dumps(results, indent=1))
    report = {"config": args.config, "overrides": args.overrides, "device": device_info(device),
              "gpu_mem_gb": args.gpu_mem_gb, "cpu_threads": torch.get_num_threads(),
              "cpu_experts": hybrid.describe_cpu(),
              "zero_copy": hybrid.buffers.zero_copy,  # few-row experts on zero_copy.py's kernels
              "cpu_on_device": hybrid.mailbox is not None,  # CPU experts beside the device path (mailbox.py)
              "costs": costs.__dict__, "cpu_timings": cpu_timings, "memory": dict(memory.rows()), "results": results,
              "args": {k: str(v) for k, v in vars(args).items() if k not in ("func",)}}
    report["adaptive_vs_fixed"] = adaptive_vs_fixed(results)
    report["overlap_share"], report["step_ms"] = {}, {}
    for policy in (traced if args.out else []):
        name = policy.name
        hybrid.place(policy, hot)
        report["overlap_share"][name], report["step_ms"][name] = record_timelines(hybrid, args, args.out, graphs,
                                                                                  name)
        for phase, ms in report["step_ms"][name].items():
            console.print(f"{name} {phase} step, ms: " + ", ".join(f"{k} {v:.2f}" for k, v in ms.items()))
    print_table(console, results, report["adaptive_vs_fixed"])
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(report, indent=1))
        save_costs(costs, args.out / "costs.json", device=report["device"]["name"], d_model=cfg.d_model,
                   d_ff=cfg.moe.experts.d_ff)
        plot_sweep(results, args.out / "sweep.png", f"{args.config} {' '.join(args.overrides)} on "
                   f"{report['device']['name']}, GPU budget {args.gpu_mem_gb:g} GiB")
        console.print(f"wrote {args.out}/results.json, sweep.png, timelines")
    hybrid.close()  # (else at exit)
    return 0


def adaptive_vs_fixed(results: list[dict]) -> dict[str, float]:
    """Per sweep size: the best fixed split's time over the adaptive one's (>= 0.91 means within 10%)."""
    ours = next((r for r in results if r["policy"] == "scheinfer"), None)
    fixed = [r for r in results if r["policy"].startswith(FIXED)]
    if ours is None or not fixed:
        return {}
    return {t: min(r["sweep_s_per_layer"][t] for r in fixed) / s for t, s in ours["sweep_s_per_layer"].items()}


def print_table(console: Console, results: list[dict], ratio: dict[str, float]) -> None:
    sizes = list(results[0]["sweep_s_per_layer"])
    table = Table(title="ms per MoE layer by tokens in the forward; decode and prefill tokens/s")
    for col in ["policy", *sizes, "decode tok/s", "prefill tok/s"]:
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(r["policy"], *(f"{1e3 * r['sweep_s_per_layer'][t]:.2f}" for t in sizes),
                      f"{r['decode_tokens_per_s']:.2f}", f"{r['prefill_tokens_per_s']:.1f}")
    if ratio:
        table.add_row("best fixed / scheinfer", *(f"{ratio[t]:.2f}" for t in sizes), "", "")
    console.print(table)

