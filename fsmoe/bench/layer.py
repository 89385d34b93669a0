"""``fsmoe bench layer``: forward+backward of one MoE layer against the dense ceiling and peers.

Shape legend: T tokens, D model dim, F expert hidden dim, E experts, K experts per token.

Every variant computes the same routed SwiGLU experts from the same weights and inputs (bf16 on
CUDA), and is timed in the same process:

  dense       one SwiGLU GEMM chain over T*K rows with one expert's shapes: the same FLOPs with no
              routing at all, the practical ceiling (``fraction`` = dense ms / variant ms)
  loop        per-expert Python loop with index_select/index_add (the Hugging Face Mixtral style)
  grouped     sort by expert + torch grouped_mm + index_add (the plain-PyTorch grouped-GEMM recipe)
  torchtitan  torchtitan's MoE layer (when its wheel imports)
  fsmoe       fsmoe's MoELayer with the fused kernels (``moe.kernels=auto``; the experts' GEMMs
              ours or torch's grouped_mm, whichever measured faster at the shape: experts.gemm=auto)
  fsmoe-cutlass  the same with the experts on torch's grouped_mm (CUTLASS; experts.gemm=torch)
  fsmoe-cublas   the same with one cuBLAS GEMM per expert (experts.gemm=cublas; one host sync)
  fsmoe-torch fsmoe's MoELayer on its plain-PyTorch reference path (``moe.kernels=torch``)
  *-graph     dense / fsmoe / fsmoe-cutlass with the whole step captured as one CUDA graph (no
              launch overhead; the graphs' fractions are taken against dense-graph)

TFLOP/s counts the routed expert matmuls only: 3 (fwd+bwd) * T*K * 3 matmuls * 2*D*F.
"""
from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from fsmoe.bench.common import bench_ms, device_info, profile_kernels, step_peak_memory_gb
from fsmoe.cli.arg_types import non_negative_int, output_file, positive_int
from fsmoe.config import ConfigError

# name -> shape; the four layer targets of docs/performance.md (H100).
LAYER_CONFIGS = {
    "mixtral-like": dict(T=8192, D=4096, F=14336, E=8, K=2),
    "gpt2xl-moe16": dict(T=16384, D=1600, F=6400, E=16, K=2),
    "fine-64e-top6": dict(T=16384, D=2048, F=1408, E=64, K=6),
    "fine-128e-top8": dict(T=16384, D=2048, F=768, E=128, K=8),
    "tiny": dict(T=64, D=32, F=48, E=4, K=2),  # CPU smoke test
}
DEFAULT_CONFIGS = ["mixtral-like", "gpt2xl-moe16", "fine-64e-top6", "fine-128e-top8"]
TARGETS = {"mixtral-like": 0.95, "gpt2xl-moe16": 0.93, "fine-64e-top6": 0.85, "fine-128e-top8": 0.80}
VARIANTS = ["dense", "loop", "grouped", "torchtitan", "fsmoe", "fsmoe-cutlass", "fsmoe-cublas", "fsmoe-torch",
            "dense-graph", "fsmoe-graph", "fsmoe-cutlass-graph"]


def routed_flops(s: dict) -> float:
    return 3.0 * s["T"] * s["K"] * 3 * 2 * s["D"] * s["F"]


class Weights:
    """One set of inputs and weights shared by every variant (each variant copies what it trains)."""

    def __init__(self, s: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
        g = torch.Generator(device=device).manual_seed(seed)
        T, D, Fh, E = s["T"], s["D"], s["F"], s["E"]

        def rnd(*shape, scale=1.0):
            return torch.randn(*shape, generator=g, device=device, dtype=dtype) * scale

        self.x = rnd(T, D)
        self.dy = rnd(T, D)
        self.router_DE = rnd(D, E, scale=D ** -0.5)
        self.w1 = rnd(E, D, Fh, scale=D ** -0.5)
        self.w3 = rnd(E, D, Fh, scale=D ** -0.5)
        self.w2 = rnd(E, Fh, D, scale=Fh ** -0.5)


def _swiglu(x, w1, w3, w2):
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _route(x, router_DE, K):
    p = (x @ router_DE).float().softmax(-1)
    w, idx = p.topk(K, dim=-1)
    return (w / w.sum(-1, keepdim=True)).to(x.dtype), idx


# ----------------------------------------------------------------------------- variants
# Each builder returns (step, forward_only): step() runs forward+backward from scratch;
# forward_only() returns the layer output (for the agreement check), or None.
def build_dense(s, W):
    xd = torch.randn(s["T"] * s["K"], s["D"], device=W.x.device, dtype=W.x.dtype, requires_grad=True)
    dyd = torch.randn_like(xd)
    w1, w3, w2 = _leaf(W.w1[0]), _leaf(W.w3[0]), _leaf(W.w2[0])

    def step():
        for t in (xd, w1, w3, w2):
            t.grad = None
        _swiglu(xd, w1, w3, w2).backward(dyd)

    return step, None


def build_loop(s, W):
    x, w1, w3, w2 = _leaf(W.x), _leaf(W.w1), _leaf(W.w3), _leaf(W.w2)
    E, K = s["E"], s["K"]

    def fwd():
        w, idx = _route(x, W.router_DE, K)
        y = torch.zeros_like(x)
        for e in range(E):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            h = _swiglu(x[tok], w1[e], w3[e], w2[e]) * w[tok, slot, None]
            y = y.index_add(0, tok, h)
        return y

    def step():
        for t in (x, w1, w3, w2):
            t.grad = None
        fwd().backward(W.dy)

    return step, fwd


def build_grouped(s, W):
    gmm = getattr(torch, "_grouped_mm", None) or getattr(F, "grouped_mm")
    x, w1, w3, w2 = _leaf(W.x), _leaf(W.w1), _leaf(W.w3), _leaf(W.w2)
    E, K = s["E"], s["K"]

    def fwd():
        w, idx = _route(x, W.router_DE, K)
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=E)
        offs = counts.cumsum(0).to(torch.int32)
        tok = order // K
        xs = x[tok]
        h = gmm(F.silu(gmm(xs, w1, offs=offs)) * gmm(xs, w3, offs=offs), w2, offs=offs)
        h = h * w.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add(0, tok, h)

    def step():
        for t in (x, w1, w3, w2):
            t.grad = None
        fwd().backward(W.dy)

    return step, fwd


def _fsmoe_layer(s, W, kernels, gemm="auto"):
    from fsmoe.config import ExpertsConfig, MoEConfig, RouterConfig
    from fsmoe.layer import MoELayer

    cfg = MoEConfig(num_experts=s["E"], kernels=kernels, router=RouterConfig(top_k=s["K"], aux_loss_coef=0.01),
                    experts=ExpertsConfig(d_ff=s["F"], gemm=gemm))
    cfg.validate()
    with torch.device(W.x.device):
        layer = MoELayer(cfg, s["D"]).to(W.x.dtype)
    with torch.no_grad():
        layer.router.proj.weight.copy_(W.router_DE.t())
        layer.experts.w1_EDF.copy_(W.w1)
        layer.experts.w3_EDF.copy_(W.w3)
        layer.experts.w2_EFD.copy_(W.w2)
    return layer


def _build_fsmoe(s, W, kernels, gemm="auto"):
    layer = _fsmoe_layer(s, W, kernels, gemm)
    x = _leaf(W.x)
    one = torch.ones((), device=x.device)

    def step():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        y, st = layer(x)
        torch.autograd.backward([y, st.aux_loss], [W.dy, one.to(st.aux_loss.dtype)])

    def fwd():
        return layer(x)[0]

    return step, fwd, layer


def build_fsmoe(s, W):
    step, fwd, _ = _build_fsmoe(s, W, "auto")
    return step, fwd


def build_fsmoe_cutlass(s, W):
    """Our layer with torch's grouped GEMM (CUTLASS) for the experts instead of ours."""
    step, fwd, _ = _build_fsmoe(s, W, "auto", gemm="torch")
    return step, fwd


def build_fsmoe_cublas(s, W):
    """Our layer with one cuBLAS GEMM per expert (reads the routing counts on the host)."""
    step, fwd, _ = _build_fsmoe(s, W, "auto", gemm="cublas")
    return step, fwd


def build_fsmoe_torch(s, W):
    step, fwd, _ = _build_fsmoe(s, W, "torch")
    return step, fwd


def build_torchtitan(s, W):
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import GroupedExperts, MoE, RoutedExperts, TokenChoiceTopKRouter
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    E, K, D, Fh = s["E"], s["K"], s["D"], s["F"]
    cfg = MoE.Config(
        num_experts=E, load_balance_coeff=None,
        routed_experts=RoutedExperts.Config(inner_experts=GroupedExperts.Config(dim=D, hidden_dim=Fh, num_experts=E),
                                            token_dispatcher=LocalTokenDispatcher.Config(num_experts=E, top_k=K)),
        router=TokenChoiceTopKRouter.Config(num_experts=E, gate=Linear.Config(in_features=D, out_features=E),
                                            top_k=K, score_func="softmax", route_norm=True))
    with torch.device(W.x.device):
        moe = cfg.build().to(W.x.dtype)
    ex = moe.routed_experts.inner_experts
    with torch.no_grad():
        moe.router.gate.weight.copy_(W.router_DE.t())
        ex.w1_EFD.copy_(W.w1.transpose(1, 2))
        ex.w3_EFD.copy_(W.w3.transpose(1, 2))
        ex.w2_EDF.copy_(W.w2.transpose(1, 2))
    moe.train()
    x = _leaf(W.x)

    def fwd():
        return moe(x.view(1, s["T"], D)).view(s["T"], D)

    def step():
        x.grad = None
        for p in moe.parameters():
            p.grad = None
        fwd().backward(W.dy)

    return step, fwd


def capture_graph(step):
    """The whole step (forward + backward + parameter gradients) as one CUDA graph, replayed.

    Possible only because the step has static shapes and never synchronises with the host; it
    removes the host's launch overhead, which is what a training loop that runs ahead of the GPU
    (or graphs its step) sees. Gradients are rewritten, not accumulated, at each replay.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _graphed(builder):
    def build(s, W):
        if W.x.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        step, _ = builder(s, W)
        return capture_graph(step), None

    return build


BUILDERS = {"dense": build_dense, "loop": build_loop, "grouped": build_grouped, "torchtitan": build_torchtitan,
            "fsmoe": build_fsmoe, "fsmoe-cutlass": build_fsmoe_cutlass, "fsmoe-cublas": build_fsmoe_cublas,
            "fsmoe-torch": build_fsmoe_torch,
            "dense-graph": _graphed(build_dense), "fsmoe-graph": _graphed(build_fsmoe),
            "fsmoe-cutlass-graph": _graphed(build_fsmoe_cutlass)}


def _rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_config(name: str, s: dict, variants: list[str], device: torch.device, iters: int, warmup: int,
               profile: bool, log=print, windows: int | None = None) -> dict:
    """Every variant of one shape; ``windows``: steps timed back to back in that many windows (the
    host issues the next step while the GPU runs this one, as in training) instead of one by one."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    W = Weights(s, device, dtype)
    flops = routed_flops(s)
    res: dict = {"shape": s, "flops": flops, "dtype": str(dtype).replace("torch.", ""), "variants": {}}
    if name in TARGETS:
        res["target"] = TARGETS[name]
    outs = {}
    for v in variants:
        row: dict = {}
        try:
            step, fwd = BUILDERS[v](s, W)
            slow = v == "loop" and s["E"] >= 32
            ms = bench_ms(step, device, iters=max(3, iters // 4) if slow else iters, warmup=2 if slow else warmup,
                          windows=windows)
            row.update(ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1))
            # a graph replays in its own pre-allocated pool: the allocator sees no step peak
            row["peak_mem_gb"] = None if v.endswith("-graph") else step_peak_memory_gb(step, device)
            if profile and v in ("dense", "grouped", "fsmoe", "torchtitan"):
                row["profile"] = profile_kernels(step, device)
            if fwd is not None and v in ("grouped", "fsmoe", "fsmoe-torch", "torchtitan", "loop"):
                with torch.no_grad():
                    outs[v] = fwd().float()
            del step, fwd
        except Exception as e:  # a peer that does not install or run is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        res["variants"][v] = row
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "ms" in res["variants"].get("dense", {}):
        # The card's clock drifts during a long run: time the ceiling again at the end and use the
        # mean of both, keeping both (their spread is the noise level of the fractions).
        try:
            step, _ = build_dense(s, W)
            again = bench_ms(step, device, iters=iters, warmup=warmup, windows=windows)
            first = res["variants"]["dense"]["ms"]
            res["variants"]["dense"].update(ms_first=first, ms_last=round(again, 3), ms=round((first + again) / 2, 3))
            res["variants"]["dense"]["tflops"] = round(flops / res["variants"]["dense"]["ms"] / 1e9, 1)
            del step
        except Exception as e:  # pragma: no cover
            res["variants"]["dense"]["retime_error"] = repr(e)[:200]
    dense_ms = res["variants"].get("dense", {}).get("ms")
    dense_graph_ms = res["variants"].get("dense-graph", {}).get("ms")
    for v, row in res["variants"].items():
        if dense_ms and "ms" in row:
            row["fraction"] = round(dense_ms / row["ms"], 3)
        if v.endswith("-graph") and dense_graph_ms and "ms" in row:  # graphed vs graphed dense
            row["fraction"] = round(dense_graph_ms / row["ms"], 3)
    ref = outs.get("grouped")
    if ref is not None:
        res["rel_err_vs_grouped"] = {v: round(_rel_err(o, ref), 5) for v, o in outs.items() if v != "grouped"}
    for v, row in res["variants"].items():
        if "error" in row:
            log(f"{name:16s} {v:12s} error: {row['error'][:160]}")
        else:
            mem = "" if row.get("peak_mem_gb") is None else f"{row['peak_mem_gb']:7.2f} GB"
            log(f"{name:16s} {v:12s} {row['ms']:9.3f} ms {row['tflops']:7.1f} TFLOP/s "
                f"{row.get('fraction', float('nan')):6.3f} of dense {mem}")
    return res


def shape_from_preset(preset: str, tokens: int) -> dict:
    from fsmoe.config import load_config

    m = load_config(preset).model
    return dict(T=tokens, D=m.d_model, F=m.moe.experts.d_ff, E=m.moe.num_experts, K=m.moe.router.top_k)


def run(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", args.device, "no CUDA device is visible here; use cpu or leave it out")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    configs = {}
    if args.preset:
        configs[f"preset:{args.preset}"] = shape_from_preset(args.preset, args.tokens)
    for n in (args.configs.split(",") if args.configs else ([] if args.preset else DEFAULT_CONFIGS)):
        if n not in LAYER_CONFIGS:
            raise ConfigError("--configs", n, f"known configs are {list(LAYER_CONFIGS)}")
        configs[n] = LAYER_CONFIGS[n]
    variants = args.variants.split(",") if args.variants else VARIANTS
    for v in variants:
        if v not in BUILDERS:
            raise ConfigError("--variants", v, f"known variants are {VARIANTS}")
    out = {"kind": "layer", "meta": device_info(device), "command": "fsmoe " + " ".join(sys.argv[1:]),
           "iters": args.iters, "timing": "back-to-back" if args.back_to_back else "one by one", "configs": {}}
    try:
        from fsmoe.select import resolve_kernels

        out["meta"]["fsmoe_kernels"] = resolve_kernels("auto")
    except Exception:  # pragma: no cover
        pass
    print(f"# {out['meta'].get('name')}  torch {out['meta']['torch']}  kernels={out['meta'].get('fsmoe_kernels')}")
    for name, s in configs.items():
        out["configs"][name] = run_config(name, s, variants, device, args.iters, args.warmup, args.profile,
                                          windows=max(1, args.iters // 5) if args.back_to_back else None)
        if args.json:  # written after each config: a run cut short keeps what it measured
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


def add_arguments(p) -> None:
    p.add_argument("--configs", help=f"comma-separated, from {list(LAYER_CONFIGS)} (default: the four layer targets)")
    p.add_argument("--preset", help="also/instead bench the MoE layer of this run preset (e.g. mixtral-8x7b)")
    p.add_argument("--tokens", type=positive_int, default=16384, help="tokens per step for --preset (default 16384)")
    p.add_argument("--variants", help=f"comma-separated, from {VARIANTS} (default: all)")
    p.add_argument("--iters", type=positive_int, default=20)
    p.add_argument("--warmup", type=non_negative_int, default=5)
    p.add_argument("--profile", action="store_true", help="add a torch.profiler kernel breakdown per variant")
    p.add_argument("--back-to-back", action="store_true",
                   help="time the steps back to back (the host issues the next step while the GPU runs this one, "
                        "as inside a model or a training loop); default: one by one, the GPU idle between steps, "
                        "so each step's host launch latency counts")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available")
    p.add_argument("--json", type=output_file, help="write the results here (JSON, read by scripts/perf_page.py)")
