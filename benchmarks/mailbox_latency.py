"""The CPU lane beside the device path (fsmoe/infer/hybrid/mailbox.py): where a layer's time goes.

For one layer of a decode step (top-k rows, one row per routed expert), bf16 weights in pinned
host memory, the GPU posts the rows to the native server thread and collects its answer
(``Mailbox.post`` then ``Mailbox.collect``), with C of the routed experts the CPU's:

* round trip: C = 0 (the server answers at once): the handover's own latency;
* C = 1, 2, 4: the CPU's experts, against the same experts through the native kernel called
  directly from Python (``CpuExpertKernel.many``, no GPU);
* each after the GPU has been busy for ``--gap-ms`` (the layer's other work, so the server and its
  threads have gone idle, as they do between a decode step's layers) and without a gap.

Prints and writes (``--json``) the median per layer. Needs a GPU.

    python benchmarks/mailbox_latency.py --json mailbox_latency.json
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from fsmoe.infer.hybrid.cpu_kernel import CpuExpertKernel
from fsmoe.infer.hybrid.mailbox import Mailbox

SHAPES = {"qwen3": (128, 2048, 768, 8), "mixtral": (8, 4096, 14336, 2)}  # E, D, F, top-k


def host_weights(E: int, D: int, F: int, layers: int):
    g = torch.Generator().manual_seed(0)
    return [tuple((torch.randn(E, *s, generator=g) / s[-1] ** 0.5).to(torch.bfloat16).pin_memory()
                  for s in ((F, D), (F, D), (D, F))) for _ in range(layers)]


def gpu_busy(ms: float) -> None:
    if ms > 0:
        torch.cuda._sleep(int(ms * 1.7e6))  # about 1.7 GHz cycles (checked by the caller's timing)


def layer_times(box: Mailbox, layers: int, k: int, cpu_experts: int, gap_ms: float, iters: int, dev) -> list[float]:
    """Seconds from the post to the collected answer, each measured with CUDA events."""
    E, D = box.E, box.x.shape[-1]
    eligible = np.zeros((layers, E), dtype=bool)
    eligible[:, :cpu_experts] = True
    box.set_cpu(eligible, 1.0)  # every routed eligible expert the CPU's
    counts = torch.zeros(E, dtype=torch.int32)
    counts[:k] = 1  # experts 0..k-1 routed, the first cpu_experts of them the CPU's
    counts = counts.to(dev)
    x = torch.randn(k, D, device=dev, dtype=torch.bfloat16)
    y = torch.zeros(k, D, device=dev, dtype=torch.bfloat16)
    out = []
    for i in range(iters):
        layer = i % layers
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        gpu_busy(gap_ms)
        a.record()
        box.post(layer, x, counts)
        box.collect(layer, y)
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / 1e3)
    box.check()
    return out[3:]


def direct_times(kernel: CpuExpertKernel, w, k: int, cpu_experts: int, threads: int, iters: int) -> list[float]:
    """The same CPU experts through the native kernel called from Python (no GPU, no mailbox)."""
    D = w[0].shape[2]
    x = torch.randn(k, D).to(torch.bfloat16)
    y = torch.zeros(k, D, dtype=torch.bfloat16)
    e = np.arange(cpu_experts)
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        kernel.many(x[:cpu_experts], w, e, e, np.ones(cpu_experts), y[:cpu_experts], threads)
        out.append(time.perf_counter() - t0)
    return out[3:]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="qwen3,mixtral")
    p.add_argument("--threads", default="15,8")
    p.add_argument("--gap-ms", default="0,1")
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--json")
    args = p.parse_args()
    dev = torch.device("cuda")
    kernel = CpuExpertKernel.load()
    rows = []
    for shape in args.shapes.split(","):
        _, D, F, k = SHAPES[shape]
        layers = 2
        w = host_weights(k, D, F, layers)  # only the routed experts are read
        for threads in (int(t) for t in args.threads.split(",")):
            box = Mailbox(w, rows=k, device=dev, threads=threads)
            try:
                for c in sorted({0, 1, 2, min(4, k)}):
                    for gap in (float(g) for g in args.gap_ms.split(",")):
                        t = layer_times(box, layers, k, c, gap, args.iters, dev)
                        d = direct_times(kernel, w[0], k, c, threads, args.iters) if c else [0.0]
                        row = {"shape": shape, "threads": threads, "cpu_experts": c, "gap_ms": gap,
                               "mailbox_ms": 1e3 * float(np.median(t)), "mailbox_p90_ms": 1e3 * float(np.percentile(t, 90)),
                               "direct_ms": 1e3 * float(np.median(d))}
                        rows.append(row)
                        print(f"{shape:8} threads {threads:2} CPU experts {c} gap {gap:3.1f} ms: mailbox "
                              f"{row['mailbox_ms']:7.3f} ms (p90 {row['mailbox_p90_ms']:7.3f}), kernel alone "
                              f"{row['direct_ms']:7.3f} ms", flush=True)
            finally:
                box.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
