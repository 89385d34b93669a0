"""Timing, memory and profile helpers shared by ``fsmoe bench layer`` and ``fsmoe bench train``.

Method (see docs/performance.md): warm up, then time each call with CUDA events and take the
median; the baselines run in the same process as fsmoe, on the same card, so fractions compare
like with like. On CPU (CI smoke runs) the host clock is used.
"""
from __future__ import annotations

import platform
import statistics
import time
from collections import defaultdict
from typing import Callable

import torch

from fsmoe.models import flops as models_flops

def device_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=p.name, sms=p.multi_processor_count, memory_gb=round(p.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    else:
        info["name"] = platform.processor() or "cpu"
    return info


def peak_tflops(device: torch.device) -> float | None:
    """The card's dense bf16 peak (TFLOP/s) for MFU; None on CPU or an unknown card."""
    return models_flops.peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def bench_ms(fn: Callable[[], None], device: torch.device, iters: int = 20, warmup: int = 5,
             windows: int | None = None) -> float:
    """Median milliseconds of ``fn()`` after ``warmup`` untimed calls.

    ``windows=None``: each of ``iters`` calls timed on its own (the device waits for the host
    between calls). ``windows=W``: the calls run back to back in W windows of iters // W calls,
    as a training loop runs them (the host queues the next call while the device works), and the
    median window's time per call is returned.
    """
    for _ in range(warmup):
        fn()
    per_window = 1 if windows is None else max(1, iters // windows)
    n = iters if windows is None else windows
    if device.type != "cuda":
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            for _ in range(per_window):
                fn()
            ts.append((time.perf_counter() - t0) * 1e3 / per_window)
        return statistics.median(ts)
    torch.cuda.synchronize(device)
    ts = []
    for _ in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(per_window):
            fn()
        e.record()
        torch.cuda.synchronize(device)
        ts.append(s.elapsed_time(e) / per_window)
    return statistics.median(ts)


def step_peak_memory_gb(fn: Callable[[], None], device: torch.device) -> float | None:
    """Peak memory one call of ``fn`` allocates above what was resident before it (GiB)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return round((torch.cuda.max_memory_allocated(device) - base) / 2**30, 3)


FSMOE_TRITON_KERNELS = {"_gather_rows_kernel", "_gather_sum_kernel", "_combine_bwd_kernel", "_swiglu_fwd_kernel",
                        "_swiglu_bwd_kernel", "_softmax_topk_kernel", "_zero_tail_kernel"}


def kernel_category(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("gemm", "cutlass", "xmma", "nvjet", "sm90_", "wgmma", "cublas")):
        return "gemm"
    if name in FSMOE_TRITON_KERNELS:
        return "fsmoe_triton"
    if any(s in n for s in ("sort", "radix", "scan", "searchsorted", "histogram")):
        return "sort/scan"
    if any(s in n for s in ("index", "scatter", "gather")):
        return "index/scatter"
    if "reduce" in n:
        return "reduce"
    return "elementwise/other"


def profile_kernels(fn: Callable[[], None], device: torch.device, iters: int = 3, top: int = 12) -> dict:
    """GPU kernel time of ``iters`` calls of ``fn`` by kernel and by category (torch.profiler).

    Returns {"total_ms": per call, "categories": {cat: {ms, pct}}, "top": [{name, ms, pct, calls}]}.
    """
    if device.type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize(device)
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            k = per_kernel[ev.name]
            k[0] += ev.time_range.elapsed_us() / 1e3 / iters  # ms per call
            k[1] += 1
    total = sum(v[0] for v in per_kernel.values()) or 1.0
    cats: dict[str, float] = defaultdict(float)
    for name, (ms, _) in per_kernel.items():
        cats[kernel_category(name)] += ms
    top_k = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "total_ms": round(total, 3),
        "categories": {c: {"ms": round(ms, 3), "pct": round(100 * ms / total, 1)}
                       for c, ms in sorted(cats.items(), key=lambda kv: -kv[1])},
        "top": [{"name": n[:120], "ms": round(v[0], 4), "pct": round(100 * v[0] / total, 1),
                 "calls": v[1] // iters} for n, v in top_k],
    }
