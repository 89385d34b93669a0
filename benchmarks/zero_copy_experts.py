"""A decode step's streamed experts: read in place from pinned host memory against copied first.

For S experts of one layer with one row each (a decode step), bf16, weights in pinned host memory:

* in place: ``fsmoe.infer.hybrid.zero_copy.host_experts_mlp`` (two launches, the GPU reads the
  weights over PCIe);
* copied: what the engine's copy stream does per expert (three copies into a GPU buffer) then
  the expert's MLP on the GPU;
* copy only: the same copies without the MLP (the PCIe lane alone).

Prints and writes (``--json``) the GPU time per layer, the host's time to issue it, and the GB/s
of weights read. Needs a GPU.

    python benchmarks/zero_copy_experts.py --json zero_copy.json
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from fsmoe.infer.hybrid.engine import expert_mlp
from fsmoe.infer.hybrid.zero_copy import Tiles, host_experts_mlp

SHAPES = {"qwen3": (128, 2048, 768), "mixtral": (8, 4096, 14336)}  # E, D, F


def timed(fn, iters: int) -> tuple[float, float]:
    """(GPU seconds per call, host seconds to issue one), medians."""
    gpu, host = [], []
    for _ in range(iters):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        a.record()
        fn()
        b.record()
        host.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        gpu.append(a.elapsed_time(b) / 1e3)
    return float(np.median(gpu)), float(np.median(host))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="qwen3,mixtral")
    p.add_argument("--experts", default="1,2,4,8")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--tiles", default="32/64/128/4/3,16/32/128/4/3,32/64/256/4/3,64/128/64/4/4,32/64/128/8/4",
                   help="BF/BD/BK/warps/stages candidates of the in-place kernels, the first the default")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dev, out = torch.device("cuda"), []
    counts = [int(s) for s in args.experts.split(",")]
    for name in args.shapes.split(","):
        E, D, F = SHAPES[name]
        E = min(E, max(counts))  # the experts asked for, not the whole layer's memory
        w = tuple(torch.randn(E, *s, dtype=torch.bfloat16).mul_(0.02).pin_memory() for s in ((F, D), (F, D), (D, F)))
        bufs = tuple(torch.empty(s, dtype=torch.bfloat16, device=dev) for s in ((F, D), (F, D), (D, F)))
        for S in counts:
            assert S <= E, f"{S} experts asked of {E}"
            experts = list(range(S))
            x = torch.randn(S, D, dtype=torch.bfloat16, device=dev)
            y = torch.zeros_like(x)
            plan = torch.tensor([experts, list(range(S)), list(range(1, S + 1))], dtype=torch.int32, device=dev)

            def in_place(tiles=Tiles()):
                host_experts_mlp(x, w, plan, y, tiles=tiles)

            def copied(compute=True):
                for s, e in enumerate(experts):
                    for dst, src in zip(bufs, w):
                        dst.copy_(src[e], non_blocking=True)
                    if compute:
                        y[s:s + 1] = expert_mlp(x[s:s + 1], *bufs)

            want = torch.cat([expert_mlp(x[s:s + 1], *(t[e].to(dev) for t in w)) for s, e in enumerate(experts)])
            in_place()
            err = (y.float() - want.float()).abs().max().item()
            nbytes = S * 3 * D * F * 2
            row = {"shape": name, "experts": S, "bytes": nbytes, "max_abs_err": err}
            for label, fn in (("in_place", in_place), ("copied", copied), ("copy_only", lambda: copied(False))):
                fn()  # warm-up (compiles the kernels on first use)
                g, h = timed(fn, args.iters)
                row[label] = {"gpu_ms": g * 1e3, "host_ms": h * 1e3, "GBps": nbytes / g / 1e9}
            row["tiles"] = {}
            for spec in args.tiles.split(","):
                tiles = Tiles(*(int(v) for v in spec.split("/")))
                in_place(tiles)
                row["tiles"][spec] = timed(lambda: in_place(tiles), args.iters)[0] * 1e3
            out.append(row)
            print(f"{name} S={S}: " + "  ".join(f"{k} {row[k]['gpu_ms']:.3f} ms GPU ({row[k]['GBps']:.1f} GB/s), "
                                                  f"{row[k]['host_ms']:.3f} ms host"
                                                  for k in ("in_place", "copied", "copy_only"))
                  + f"  max err {err:.2e}\n  in place by tiles (GPU ms): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in row["tiles"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()
