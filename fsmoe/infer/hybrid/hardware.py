"""Measure the lane costs of one expert shape on this machine (:class:`~.partition.LaneCosts`).

Each cost is timed on the real operation at a few sizes and fitted as ``fixed + per_token * n``
(least squares on relative error, so the small sizes that decode lives on weigh as much as the
large ones): the expert MLP on the CPU with all cores (the CC lane: four experts a call, as the
engine runs a layer's, on the faster of the native kernel and torch's GEMM at each size), the same
on the GPU (GG and CG), one expert's weights from pinned host memory to the GPU (the PCIe lane),
and rows to the host and back (the CC activations). One to eight one-token experts in one call of
the native kernel give the part of a CPU call paid once per layer (``cpu_call``: waking the
threads, the barrier). Without CUDA the "GPU" is the CPU, so the numbers only keep the code paths
alive (CI).
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from fsmoe.infer.hybrid.cpu_kernel import UNBOUNDED, CpuExpertKernel, cpu_expert_mlp, cpu_experts_mlp
from fsmoe.infer.hybrid.engine import cpu_expert_threads, expert_mlp
from fsmoe.infer.hybrid.partition import LaneCosts

CPU_TOKENS = (1, 4, 16, 64, 128, 256)
CPU_MANY = 4  # experts per call where the CPU experts' cost per token is timed
CPU_BATCH = (1, 2, 4, 8)  # experts of one token in one call: the call's own cost is the intercept
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


def median_seconds(fn, sync, reps: int, budget_s: float = 2.0) -> float:
    """Median seconds of ``fn()`` (then ``sync()``) after one untimed call: ``reps`` calls, fewer
    once ``budget_s`` has passed (a CPU expert at 4096 tokens takes seconds)."""
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


def measure_costs(host, device: torch.device, reps: int = 5, timings: dict | None = None) -> LaneCosts:
    """Lane costs of one layer's experts ``host`` = (w1 [E, F, D], w3 | None, w2 [E, D, F]) in host
    memory. Every timed call takes the next expert in turn, so the CPU reads weights from DRAM as
    in a real forward, not from a cache that one re-used expert would sit in. ``timings``, where
    given, receives the CPU lane's calls as timed (ms by tokens per expert, kernel and torch)."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    E, d_model = host[0].shape[0], host[0].shape[2]
    turn = iter(range(1 << 30))
    g = torch.Generator().manual_seed(0)
    dev = tuple(None if w is None else w[:1].to(device) for w in host)
    dtype = host[0].dtype
    threads = cpu_expert_threads()

    def host_mlp(n):
        x = torch.randn(n, d_model, generator=g).to(dtype)

        def fn():
            e = next(turn) % E
            return cpu_expert_mlp(x, *(None if w is None else w[e] for w in host), threads=threads)
        return fn

    def host_many(n, max_tokens):  # CPU_MANY experts of n tokens in one call, as the engine runs them
        x = torch.randn(CPU_MANY * n, d_model, generator=g).to(dtype)
        out = torch.empty_like(x)

        def fn():
            first = next(turn) * CPU_MANY
            return cpu_experts_mlp(x, host, [(first + j) % E for j in range(CPU_MANY)], [n] * CPU_MANY, out,
                                   threads=threads, max_tokens=max_tokens)
        return fn

    def dev_mlp(n):
        x = torch.randn(n, d_model, generator=g).to(dtype).to(device)
        return lambda: expert_mlp(x, *(None if w is None else w[0] for w in dev))

    def host_batch(m):
        x = torch.randn(m, d_model, generator=g).to(dtype)
        out = torch.empty_like(x)

        def fn():
            first = next(turn) * m
            return cpu_experts_mlp(x, host, [(first + j) % E for j in range(m)], [1] * m, out, threads=threads)
        return fn

    bufs = [None if w is None else torch.empty_like(w[0]) for w in dev]

    def copy_next():
        e = next(turn) % E
        for b, h in zip(bufs, host):
            if b is not None:
                b.copy_(h[e], non_blocking=True)

    # The CPU lane is timed on the engine's worker thread, with its thread count.
    with ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        many_t, kernel_tokens = _cpu_times(pool, host_many, reps, native=dtype == torch.bfloat16, timings=timings)
        batch_t = [pool.submit(median_seconds, host_batch(m), lambda: None, reps).result() for m in CPU_BATCH]
        alone = pool.submit(median_seconds, host_mlp(1), lambda: None, reps).result()
        gpu_t = [median_seconds(dev_mlp(n), sync, reps) for n in GPU_TOKENS]
        stream = median_seconds(copy_next, sync, reps)
        cpu_busy, stream_busy = _contended(pool, host_mlp(1), copy_next, stream, sync) if cuda else (alone, stream)

    def round_trip(n):
        x = torch.randn(n, d_model, device=device).to(dtype)
        stage = torch.empty(n, d_model, dtype=dtype, pin_memory=cuda)
        return lambda: x.copy_(stage.copy_(x).to(device, non_blocking=True))

    act_t = [median_seconds(round_trip(n), sync, reps) for n in ACT_TOKENS]
    # one call of m experts = call + m * expert: the call's part is paid once per layer, not per expert
    call = min(fit_affine(CPU_BATCH, batch_t)[0], min(many_t))
    cpu_fixed, cpu_per = fit_affine(CPU_TOKENS, [max(t - call, 0.1 * t) / CPU_MANY for t in many_t])
    return LaneCosts(cpu_fixed, cpu_per, *fit_affine(GPU_TOKENS, gpu_t), stream, *fit_affine(ACT_TOKENS, act_t),
                     cpu_contended=max(1.0, cpu_busy / alone), stream_contended=max(1.0, stream_busy / stream),
                     cpu_call=call, cpu_kernel_tokens=kernel_tokens)


def _cpu_times(pool, host_many, reps: int, native: bool, timings: dict | None = None) -> tuple[list[float], int | None]:
    """Seconds of one call of CPU_MANY experts at each of CPU_TOKENS tokens, the faster of the native
    kernel and torch's GEMM, and up to how many tokens the kernel was the faster at every size
    measured (None: it does not run here). Where it stops winning depends on the CPU and the
    expert's shape (AMX tiles on an H200 host: 128 tokens for a Qwen3 expert, 64 for a Mixtral
    one). Each is timed twice at each size, in the order kernel, torch, torch, kernel, and keeps
    its faster: a slow spell of the host, or the other's threads still awake, then hits both."""
    def timed(n, max_tokens):
        return pool.submit(median_seconds, host_many(n, max_tokens), lambda: None, reps).result()

    if not native or CpuExpertKernel.load() is None:
        torch_t = [timed(n, 0) for n in CPU_TOKENS]
        if timings is not None:
            timings["cpu_ms_per_call"] = {n: {"torch": t * 1e3} for n, t in zip(CPU_TOKENS, torch_t)}
        return torch_t, None
    kernel_t, torch_t = [], []
    for n in CPU_TOKENS:
        k1, t1, t2, k2 = timed(n, UNBOUNDED), timed(n, 0), timed(n, 0), timed(n, UNBOUNDED)
        kernel_t.append(min(k1, k2))
        torch_t.append(min(t1, t2))
    if timings is not None:
        timings["cpu_ms_per_call"] = {n: {"kernel": k * 1e3, "torch": t * 1e3}
                                      for n, k, t in zip(CPU_TOKENS, kernel_t, torch_t)}
        timings["experts_per_call"] = CPU_MANY
    wins = [k <= t for k, t in zip(kernel_t, torch_t)]
    kernel_tokens = 0 if not wins[0] else CPU_TOKENS[wins.index(False) - 1] if False in wins else CPU_TOKENS[-1]
    return [min(k, t) for k, t in zip(kernel_t, torch_t)], kernel_tokens


def describe_cpu_timings(timings: dict) -> str:
    """One console line from :func:`measure_costs`' ``timings``: the CPU lane's calls as timed, ms
    on the native kernel / torch's GEMM by tokens per expert ("" when nothing was timed)."""
    calls = timings.get("cpu_ms_per_call")
    if not calls:
        return ""
    parts = [f"{n}: " + " / ".join(f"{ms[k]:.2f}" for k in ("kernel", "torch") if k in ms) for n, ms in calls.items()]
    paths = " / ".join(k for k in ("kernel", "torch") if k in next(iter(calls.values())))
    return (f"CPU lane timed {timings.get('experts_per_call', CPU_MANY)} experts a call, ms on {paths} "
            f"by tokens per expert: " + ", ".join(parts))


def _contended(pool, cpu_fn, copy_fn, stream: float, sync) -> tuple[float, float]:
    """(one CPU expert's seconds, one expert copy's seconds) while the other lane runs: both read
    host memory, so each slows the other."""
    n_copies = max(4, int(0.3 / max(stream, 1e-6)))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    side = torch.cuda.Stream()

    def cpu_loop():
        times = []
        while not end.query() or not times:
            t0 = time.perf_counter()
            cpu_fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    sync()
    with torch.cuda.stream(side):
        start.record(side)
        for _ in range(n_copies):
            copy_fn()
        end.record(side)
    cpu_busy = pool.submit(cpu_loop).result()
    sync()
    return cpu_busy, start.elapsed_time(end) / 1e3 / n_copies


def save_costs(costs: LaneCosts, path: Path, **meta) -> None:
    Path(path).write_text(json.dumps({**meta, "costs": asdict(costs)}, indent=1))


def load_costs(path: Path) -> LaneCosts:
    from fsmoe.config import ConfigError

    try:
        return LaneCosts(**json.loads(Path(path).read_text())["costs"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError("--costs", str(path),
                          f"must be a lane-cost file written by fsmoe bench infer ({e})") from None
