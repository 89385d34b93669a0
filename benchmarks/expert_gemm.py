"""Expert MLP GEMMs on one GPU: our Triton grouped GEMMs against torch's grouped GEMM path and the
dense cuBLAS chain of the same FLOPs, per kernel and for the whole forward + backward.

    python benchmarks/expert_gemm.py [--out results.json] [--configs mixtral-like,...]

Rows are routed by a random top-k (uniform router), as in ``fsmoe bench layer``. Every time is
the median of CUDA-event timings in this process on this card; the tile choice is the tuner's
(``fsmoe.kernels.gmm_tune``). Also checks each Triton output against float32 torch.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from fsmoe.kernels import gmm_tune
from fsmoe.kernels import triton_gmm as tg
from fsmoe.kernels.expert_gemm import triton_swiglu_mlp
from fsmoe.kernels.experts import expert_mlp
from fsmoe.kernels.grouped_mm import grouped_mm_unmasked

CONFIGS = {  # name: (T, d, f, E, k), the layer benchmark's four
    "mixtral-like": (8192, 4096, 14336, 8, 2),
    "gpt2xl-moe16": (16384, 1600, 6400, 16, 2),
    "fine-64e-top6": (16384, 2048, 1408, 64, 6),
    "fine-128e-top8": (16384, 2048, 768, 128, 8),
}


def routed_offsets(T: int, E: int, k: int, gen) -> torch.Tensor:
    ids = torch.rand(T, E, generator=gen, device="cuda").topk(k, dim=1).indices
    return torch.cumsum(torch.bincount(ids.flatten(), minlength=E), 0).to(torch.int32)


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def grads(fn, args, dy):
    def run():
        return torch.autograd.grad(fn(*args), args[:4], dy)
    return run


def _torch_wgrad_ms(x, h, offs) -> float:
    """torch's grouped GEMM in its weight-gradient form (x^T @ h per expert), as autograd calls it."""
    try:
        return gmm_tune._bench_ms(lambda: grouped_mm_unmasked(x.t(), h, offs))
    except (RuntimeError, TypeError):
        return float("nan")


def dense_chain(x, w1, w3, w2):
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def one_config(name, T, D, Fh, E, k, gen) -> dict:
    N = T * k
    dt = torch.bfloat16
    offs = routed_offsets(T, E, k, gen)
    x = (torch.randn(N, D, generator=gen, device="cuda") * 0.5).to(dt).requires_grad_()
    w1, w3 = ((torch.randn(E, D, Fh, generator=gen, device="cuda") * D ** -0.5).to(dt).requires_grad_() for _ in range(2))
    w2 = (torch.randn(E, Fh, D, generator=gen, device="cuda") * Fh ** -0.5).to(dt).requires_grad_()
    dy = torch.randn(N, D, generator=gen, device="cuda").to(dt)
    tiles = gmm_tune.tune_tiles(x.detach(), w1.detach(), w2.detach())
    out = {"config": name, "T": T, "d": D, "f": Fh, "E": E, "k": k, "tiles": {k2: vars(v) for k2, v in vars(tiles).items()}}
    # numerics against float32 torch (same bf16 inputs)
    args = (x, w1, w3, w2, offs)
    y = triton_swiglu_mlp(*args, tiles)
    g = torch.autograd.grad(y, args[:4], dy)
    a32 = [t.detach().float().requires_grad_() for t in args[:4]]
    y32 = expert_mlp(*a32, offs)
    g32 = torch.autograd.grad(y32, a32, dy.float())
    yt = expert_mlp(*args)
    gt = torch.autograd.grad(yt, args[:4], dy)
    out["rel_err"] = {"triton": [rel(y, y32)] + [rel(a, b) for a, b in zip(g, g32)],
                      "torch": [rel(yt, y32)] + [rel(a, b) for a, b in zip(gt, g32)]}
    del y, g, y32, g32, a32, yt, gt
    ms = gmm_tune._bench_ms
    # whole MLP, forward + backward, and forward only
    dense_args = (x[:N].detach().requires_grad_(), w1[0].detach().requires_grad_(),
                  w3[0].detach().requires_grad_(), w2[0].detach().requires_grad_())
    # the dense chain of the same FLOPs: one [N, D] x [D, F] chain (N rows, as if one expert)
    with torch.no_grad():
        out["fwd_ms"] = {"triton": ms(lambda: triton_swiglu_mlp(*args, tiles)), "torch": ms(lambda: expert_mlp(*args)),
                         "dense": ms(lambda: dense_chain(*dense_args))}
    out["fwd_bwd_ms"] = {"triton": ms(grads(lambda *a: triton_swiglu_mlp(*a, tiles), args, dy)),
                         "torch": ms(grads(expert_mlp, args, dy)),
                         "dense": ms(lambda: torch.autograd.grad(dense_chain(*dense_args), dense_args, dy))}
    # per kernel, Triton's best tile vs torch grouped_mm
    xd, w1d, w3d, w2d = (t.detach() for t in (x, w1, w3, w2))
    h = torch.randn(N, Fh, generator=gen, device="cuda").to(dt)
    with torch.no_grad():
        out["kernel_ms"] = {
            "up (w1,w3,swiglu)": [ms(lambda: tg.gmm_swiglu(xd, w1d, w3d, offs, cfg=tiles.up)),
                                  ms(lambda: (grouped_mm_unmasked(xd, w1d, offs), grouped_mm_unmasked(xd, w3d, offs)))],
            "down": [ms(lambda: tg.gmm(h, w2d, offs, cfg=tiles.down)), ms(lambda: grouped_mm_unmasked(h, w2d, offs))],
            "dgrad (dh1,dh3)": [ms(lambda: tg.gmm(h, w1d.transpose(1, 2), offs, a2=h, b2_EIO=w3d.transpose(1, 2), cfg=tiles.dgrad)),
                                ms(lambda: grouped_mm_unmasked(h, w1d.transpose(1, 2), offs) + grouped_mm_unmasked(h, w3d.transpose(1, 2), offs))],
            "wgrad (one)": [ms(lambda: tg.gmm_wgrad(xd, h, offs, E, cfg=tiles.wgrad)), _torch_wgrad_ms(xd, h, offs)],
        }
    out["fraction_of_dense_fwd_bwd"] = {p: out["fwd_bwd_ms"]["dense"] / out["fwd_bwd_ms"][p] for p in ("triton", "torch")}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "configs": []}
    for name in a.configs.split(","):
        r = one_config(name, *CONFIGS[name], gen)
        res["configs"].append(r)
        fb, fw = r["fwd_bwd_ms"], r["fwd_ms"]
        print(f"{name}: fwd+bwd ms triton {fb['triton']:.2f} torch {fb['torch']:.2f} dense {fb['dense']:.2f} "
              f"(triton/torch {fb['torch'] / fb['triton']:.3f}x; of dense {r['fraction_of_dense_fwd_bwd']['triton']:.3f} "
              f"vs {r['fraction_of_dense_fwd_bwd']['torch']:.3f}); fwd triton {fw['triton']:.2f} torch {fw['torch']:.2f} "
              f"dense {fw['dense']:.2f}", flush=True)
        for kname, (t, ref) in r["kernel_ms"].items():
            print(f"   {kname:20s} triton {t:.3f} ms  torch {ref:.3f} ms  ({ref / t:.3f}x)")
        print("   rel err triton", ["%.1e" % v for v in r["rel_err"]["triton"]], "torch", ["%.1e" % v for v in r["rel_err"]["torch"]])
        print("   tiles", r["tiles"], flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
