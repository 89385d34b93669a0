"""Host launch cost of the fast ops, gather_sum tile sweep, fused vs torch router in the layer.

Usage: python -m fsmoe.bench.launch_probe [--json OUT]
Prints one line per measurement; numbers feed docs/performance.md (profile evidence).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from fsmoe.bench.common import bench_ms
from fsmoe.bench.layer import LAYER_CONFIGS, Weights, _build_fsmoe
from fsmoe.kernels import permute, router, triton_ops
from fsmoe.routing.plan import RoutingPlan


def host_us(fn, n=300):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return round((t1 - t0) / n * 1e6, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--host-only", action="store_true", help="only the host launch costs")
    a = ap.parse_args()
    out = {}
    dev = "cuda"
    # 1. host cost per launch (tiny tensors: the GPU is never the bottleneck)
    x = torch.randn(64, 64, device=dev)
    idx = torch.randint(0, 64, (128,), device=dev)
    p = RoutingPlan.from_topk(torch.randint(0, 8, (64, 2), device=dev), torch.rand(64, 2, device=dev), 8)
    lg = torch.randn(64, 8, device=dev)
    out["host_us"] = {
        "torch.index_select": host_us(lambda: x.index_select(0, idx)),
        "torch.add": host_us(lambda: x + x),
        "triton gather_rows": host_us(lambda: triton_ops.gather_rows(x, idx)),
        "_PermuteRows.apply": host_us(lambda: permute._PermuteRows.apply(x, p.token_ids_N, p.token_slots_TK,
                                                                          p.expert_ids_N, 8)),
        "triton softmax_topk": host_us(lambda: triton_ops.softmax_topk(lg, 2, True)),
        "softmax_topk_ref": host_us(lambda: router.softmax_topk_ref(lg, 2, True)),
        "RoutingPlan.from_topk": host_us(lambda: RoutingPlan.from_topk(p.expert_ids_N.view(64, 2),
                                                                       lg[:, :2], 8), n=100),
    }
    print("host us/launch:", out["host_us"], flush=True)
    if a.host_only:
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)
        return

    # 2. gather_sum tile / warps sweep (GPU time)
    out["gather_sum"] = {}
    for name in ("mixtral-like", "fine-64e-top6", "fine-128e-top8"):
        s = LAYER_CONFIGS[name]
        T, K, D, E = s["T"], s["K"], s["D"], s["E"]
        ids = torch.rand(T, E, device=dev).topk(K, dim=-1).indices
        pl = RoutingPlan.from_topk(ids, torch.rand(T, K, device=dev), E)
        src = torch.randn(T * K, D, device=dev, dtype=torch.bfloat16)
        res = {}
        for bd in (256, 512, 1024, 2048):
            for nw in (4, 8):
                ms = bench_ms(lambda: triton_ops.gather_sum(src, pl.token_slots_TK, pl.expert_ids_N, E, pl.weights_N,
                                                            block_d=bd, num_warps=nw), torch.device(dev), iters=30)
                res[f"block{bd}_w{nw}"] = round(ms * 1e3, 1)
        gb = (T * K * D + T * D) * 2 / 1e9
        best = min(res, key=res.get)
        out["gather_sum"][name] = {"us": res, "best": best, "best_TBps": round(gb / res[best] * 1e3, 2)}
        print(f"gather_sum {name}: {res} best {best} {out['gather_sum'][name]['best_TBps']} TB/s", flush=True)

    # 3. layer: fused router vs torch router (eager, synced per step)
    out["layer_router"] = {}
    for name in ("gpt2xl-moe16", "fine-128e-top8"):
        s = LAYER_CONFIGS[name]
        W = Weights(s, torch.device(dev), torch.bfloat16)
        step, _, layer = _build_fsmoe(s, W, "auto")
        r = {"fused_ms": round(bench_ms(step, torch.device(dev), iters=30), 3)}
        # same layer, torch router
        layer.router.use_kernels("torch")
        r["torch_router_ms"] = round(bench_ms(step, torch.device(dev), iters=30), 3)
        layer.router.use_kernels("triton")
        r["fused_again_ms"] = round(bench_ms(step, torch.device(dev), iters=30), 3)
        out["layer_router"][name] = r
        print(f"layer {name}: {r}", flush=True)
        del step, layer, W
        torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
