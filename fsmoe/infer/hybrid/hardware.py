"""Measure the lane costs of one expert shape on this machine (:class:`~.partition.LaneCosts`).

Each cost is timed on the real operation at a few sizes and fitted as ``fixed + per_token * n``
(least squares on relative error, so the small sizes that decode lives on weigh as much as the
large ones): the expert MLP on the CPU with all cores (the CC lane), the same on the GPU (GG and
CG), one expert's weights from pinned host memory to the GPU (the PCIe lane), and rows to the host
and back (the CC activations). Without CUDA the "GPU" is the CPU, so the numbers only keep the
code paths alive (CI).
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from fsmoe.infer.hybrid.engine import cpu_expert_threads, expert_mlp
from fsmoe.infer.hybrid.partition import LaneCosts

CPU_TOKENS = (1, 4, 16, 64, 256)
GPU_TOKENS = (1, 64, 512, 4096)
ACT_TOKENS = (1, 256, 4096)


def fit_affine(n, t) -> tuple[float, float]:
    """(fixed, per_token) >= 0 minimising the relative error of fixed + per_token * n against t."""
    n, t = np.asarray(n, dtype=np.float64), np.asarray(t, dtype=np.float64)
    a = np.stack([np.ones_like(n), n], 1) / t[:, None]
    (fixed, per), *_ = np.linalg.lstsq(a, np.ones_like(t), rcond=None)
    if per < 0:
        return float(np.median(t)), 0.0
    if fixed < 0:
        return 0.0, float(np.median(t / n))
    return float(fixed), float(per)


def _time(fn, sync, reps: int, budget_s: float = 2.0) -> float:
    fn()
    sync()
    times = []
    t_end = time.perf_counter() + budget_s
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() > t_end:
            break
    return float(np.median(times))


def measure_costs(d_model: int, d_ff: int, swiglu: bool, device: torch.device, dtype: torch.dtype,
                  reps: int = 5) -> LaneCosts:
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    g = torch.Generator().manual_seed(0)
    host = [torch.randn(*s, generator=g).to(dtype) for s in
            ([(d_model, d_ff), (d_model, d_ff)] if swiglu else [(d_model, d_ff)]) + [(d_ff, d_model)]]
    if cuda:
        host = [t.pin_memory() for t in host]
    w_host = (host[0], host[1] if swiglu else None, host[-1])
    dev = [t.to(device) for t in host]
    w_dev = (dev[0], dev[1] if swiglu else None, dev[-1])

    def mlp_at(w, dev_, n):
        x = torch.randn(n, d_model, generator=g).to(dtype).to(dev_)
        return lambda: expert_mlp(x, *w)

    # The CPU lane is timed on the engine's worker thread, with its thread count.
    with ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(cpu_expert_threads(),)) as pool:
        cpu_t = [pool.submit(_time, mlp_at(w_host, "cpu", n), lambda: None, reps).result() for n in CPU_TOKENS]
    gpu_t = [_time(mlp_at(w_dev, device, n), sync, reps) for n in GPU_TOKENS]
    bufs = [torch.empty_like(t) for t in dev]
    stream = _time(lambda: [b.copy_(h, non_blocking=True) for b, h in zip(bufs, host)], sync, reps)

    def round_trip(n):
        x = torch.randn(n, d_model, device=device).to(dtype)
        stage = torch.empty(n, d_model, dtype=dtype, pin_memory=cuda)
        return lambda: x.copy_(stage.copy_(x).to(device, non_blocking=True))

    act_t = [_time(round_trip(n), sync, reps) for n in ACT_TOKENS]
    return LaneCosts(*fit_affine(CPU_TOKENS, cpu_t), *fit_affine(GPU_TOKENS, gpu_t), stream,
                     *fit_affine(ACT_TOKENS, act_t))


def save_costs(costs: LaneCosts, path: Path, **meta) -> None:
    Path(path).write_text(json.dumps({**meta, "costs": asdict(costs)}, indent=1))


def load_costs(path: Path) -> LaneCosts:
    from fsmoe.config import ConfigError

    try:
        return LaneCosts(**json.loads(Path(path).read_text())["costs"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError("--costs", str(path), f"must be a lane-cost file written by fsmoe bench infer ({e})") from None
