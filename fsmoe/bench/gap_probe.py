"""Where does a layer step's wall time go beyond the sum of its GPU kernels?

For one config of ``fsmoe bench layer``, for the fsmoe and dense variants:
  gpu_ms     median step time (CUDA events)
  kernel_ms  sum of kernel durations (profiler)
  cpu_ms     host time to issue one step (no sync): if close to gpu_ms, the step is launch-bound
  gaps       the largest GPU idle gaps, the kernel after each, and what the host was doing
  syncs      host synchronisations reported by torch.cuda.set_sync_debug_mode("warn")

Usage: python -m fsmoe.bench.gap_probe [config] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

from fsmoe.bench.common import bench_ms
from fsmoe.bench.layer import BUILDERS, LAYER_CONFIGS, Weights


def cpu_issue_ms(step, n=10):
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        ts.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    return statistics.median(ts)


def gaps(step, top=12):
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    evs = prof.events()
    kern = sorted([e for e in evs if e.device_type == torch.autograd.DeviceType.CUDA],
                  key=lambda e: e.time_range.start)
    cpu = [e for e in evs if e.device_type == torch.autograd.DeviceType.CPU]
    out = []
    for a, b in zip(kern, kern[1:]):
        g = b.time_range.start - a.time_range.end
        if g > 15:
            lo, hi = a.time_range.end, b.time_range.start
            busy = sorted(((min(hi, c.time_range.end) - max(lo, c.time_range.start), c.name) for c in cpu
                           if c.time_range.start < hi and c.time_range.end > lo and not c.name.startswith("cuda")),
                          reverse=True)[:4]
            out.append({"gap_us": round(g, 1), "next_kernel": b.name[:80], "prev_kernel": a.name[:60],
                        "host_ops": [f"{n[:60]} ({round(t)}us)" for t, n in busy]})
    span = kern[-1].time_range.end - kern[0].time_range.start if kern else 0
    busy_us = sum(k.time_range.elapsed_us() for k in kern)
    return {"span_ms": round(span / 1e3, 3), "kernel_ms": round(busy_us / 1e3, 3), "n_kernels": len(kern),
            "n_gaps_over_15us": len(out), "gap_total_ms": round(sum(o["gap_us"] for o in out) / 1e3, 3),
            "largest": sorted(out, key=lambda o: -o["gap_us"])[:top]}


def syncs(step):
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        step()
    torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sorted({str(x.message)[:200] for x in w if "synchroniz" in str(x.message).lower()})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="*", default=["gpt2xl-moe16"])
    ap.add_argument("--variants", default="dense,fsmoe")
    ap.add_argument("--json")
    a = ap.parse_args()
    res = {}
    for c in a.configs:
        s = LAYER_CONFIGS[c]
        W = Weights(s, torch.device("cuda"), torch.bfloat16)
        for v in a.variants.split(","):
            step, _ = BUILDERS[v](s, W)
            r = {"gpu_ms": round(bench_ms(step, torch.device("cuda")), 3), "cpu_ms": round(cpu_issue_ms(step), 3)}
            r.update(gaps(step))
            r["syncs"] = syncs(step)
            res[f"{c}/{v}"] = r
            print(f"{c}/{v}: gpu {r['gpu_ms']} ms, host issue {r['cpu_ms']} ms, kernels {r['kernel_ms']} ms "
                  f"over a {r['span_ms']} ms span, {r['n_gaps_over_15us']} gaps > 15us = {r['gap_total_ms']} ms, "
                  f"syncs {len(r['syncs'])}")
            for gp in r["largest"][:6]:
                print(f"   gap {gp['gap_us']:8.1f} us before {gp['next_kernel'][:50]} | host: {gp['host_ops'][:2]}")
            for sm in r["syncs"][:5]:
                print("   sync:", sm)
            del step
            torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
