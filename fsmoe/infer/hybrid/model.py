"""A decoder whose routed experts live in host memory, with the hybrid executor on every MoE layer.

Everything that is not a routed expert goes to the GPU; the experts stay in (pinned) host memory
and the policy's resident share is copied to the GPU by :meth:`HybridModel.place`, which can be
called again to switch policies in one process (the benchmarks do). Routing frequencies are
recorded by every forward (``hot_LE``) and choose the resident experts at the next ``place``.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch

from fsmoe.config import ModelConfig
from fsmoe.infer.hybrid.cpu_kernel import CpuExpertKernel, describe_cpu_experts, tokens_override
from fsmoe.infer.hybrid.engine import (HostExperts, HybridExecutor, LayerExperts, Recorder, StreamBuffers,
                                       linear_layout)
from fsmoe.infer.hybrid.in_place import InPlaceStreamExecutor, slots_of
from fsmoe.infer.hybrid.mailbox import Mailbox
from fsmoe.infer.hybrid.memory import GpuMemoryPlan
from fsmoe.infer.hybrid.partition import CC, CG, LaneCosts, Split
from fsmoe.infer.hybrid.policies import Policy, candidate_split
from fsmoe.infer.hybrid.race import SplitRace
from fsmoe.infer.hybrid.residency import resident_experts
from fsmoe.infer.hybrid.zero_copy import MAX_ROWS, warm_up
from fsmoe.infer.model import materialise
from fsmoe.models import MoEDecoder, build_model

CPU_REFIT_WEIGHT = 0.2  # weight of the newest forward in the CPU lane's moving average
# One forward moves the CPU lane's scale by at most this factor's CPU_REFIT_WEIGHT-th power: a
# single outlier (the native kernel built by the first CC forward: seconds against a modelled
# fraction of a millisecond) once priced the CPU lane at 120x what it runs at, after which no
# split chose it again and so nothing measured it back down.
CPU_REFIT_STEP = 4.0
# the CPU's shares of the non-resident experts tried on the device path, and routes timed at each
CPU_SHARES = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75)  # binary fractions: exact in the kernel's float32
CPU_SHARE_TRIALS = 16  # routes drawn per share: a decode step meets them all, so their mean is compared
CPU_SHARE_ROUNDS = 3  # each share timed this many times, interleaved; the median round counts
CPU_LANE_SIZES = (1, 4, 16)  # forward sizes at which the device path with the CPU lane is timed against the host path
Weights = tuple[torch.Tensor, "torch.Tensor | None", torch.Tensor]


def detach_experts(model: MoEDecoder, pin: bool) -> list[Weights]:
    """Take every MoE layer's routed expert weights out of ``model`` as host tensors in the
    engine's linear layout (pinned when ``pin``; fsmoe.infer.hybrid.engine), leaving a
    parameterless stand-in so that moving the model moves none of them."""
    out = []
    for layer in model.moe_layers():
        ex = layer.experts
        out.append(linear_layout(*(None if w is None else w.detach() for w in (ex.w1_EDF, ex.w3_EDF, ex.w2_EFD)),
                                 pin=pin))
        layer.experts = HostExperts(ex.num_experts)
    return out


def random_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0
                 ) -> tuple[MoEDecoder, list[Weights]]:
    """A randomly initialised model in ``dtype``: non-expert weights on ``device`` (the usual init),
    routed experts ~ N(0, 1/fan_in) in host memory (the engine's ``[out, in]`` layout), drawn on
    ``device`` one expert at a time (a host-side draw of tens of GB would take minutes)."""
    with torch.device("meta"):
        model = build_model(cfg, seed=seed)
    meta = detach_experts(model, pin=False)  # only their shapes are read
    materialise(model, device, dtype, init=True)
    g = torch.Generator(device=device).manual_seed(seed)

    def draw(w_meta):
        t = torch.empty(w_meta.shape, dtype=dtype, pin_memory=device.type == "cuda")
        for e in range(t.shape[0]):
            t[e].copy_(torch.randn(t.shape[1:], generator=g, device=device, dtype=torch.float32)
                       .div_(math.sqrt(t.shape[2])).to(dtype))
        return t

    return model, [tuple(None if w is None else draw(w) for w in ws) for ws in meta]


def loaded_model(path: Path, device: torch.device, dtype: torch.dtype
                 ) -> tuple[MoEDecoder, list[Weights], ModelConfig, bool]:
    """An fsmoe run directory or Hugging Face directory, loaded on the host with its experts taken
    out (pinned when ``device`` is a GPU); the caller moves the rest to ``device`` once it has
    checked that the GPU budget holds it."""
    from fsmoe.infer.model import load_model

    model, cfg, converted = load_model(path, torch.device("cpu"), dtype)
    host = detach_experts(model, pin=device.type == "cuda")
    return model, host, cfg, converted


class HybridModel:
    """``model`` with a :class:`HybridExecutor` on every MoE layer; ``place(policy)`` decides the
    resident experts; ``model(...)`` then runs as usual (fsmoe.infer.generate works unchanged)."""

    def __init__(self, model: MoEDecoder, host: list[Weights], costs: LaneCosts, memory: GpuMemoryPlan,
                 device: torch.device, cpu_threads: int | None = None, chunk: int | None = None,
                 keep_splits: bool = True, cpu_lane: str = "worker", zero_copy: bool | None = None,
                 cpu_on_device: bool = False, cpu_share: float | None = None):
        self.model, self.memory, self.device = model.eval(), memory, device
        cfg = model.cfg
        E = cfg.moe.num_experts
        dtype = host[0][0].dtype
        if dtype == torch.bfloat16:  # build (or load) the native CPU kernel now, not in the first forward
            CpuExpertKernel.load()
        self.buffers = StreamBuffers(device, cfg.d_model, cfg.moe.experts.d_ff, host[0][1] is not None, dtype,
                                     chunk or memory.chunk, cpu_threads, cpu_lane, zero_copy)
        if tokens_override() is None:  # the crossover measured with the costs (FSMOE_CPU_KERNEL_TOKENS: the user's)
            self.buffers.cpu_kernel_tokens = costs.cpu_kernel_tokens
        if self.buffers.zero_copy:  # and the in-place kernels compiled now, not in a timed forward
            warm_up(host[0], device)
        self.costs = dataclasses.replace(costs, chunk=self.buffers.chunk)
        self.hot_LE = np.zeros((len(host), E))
        self.policy: Policy | None = None
        self.race: SplitRace | None = None  # the adaptive split's check against the clock, per placement
        self.recorder: Recorder | None = None
        self.keep_splits = keep_splits  # keep every split chosen (reports; off for long generations)
        self.splits: list[Split] = []
        self._hot_for_policy = self.hot_LE
        self.base_costs = self.costs
        self.cpu_scale = 1.0  # measured / modelled CPU lane, averaged over forwards (the online refit)
        self.executors = [HybridExecutor(i, LayerExperts(w, np.zeros(E, dtype=bool), None), self.buffers, self._choose,
                                         observe=self._observe_cpu)
                          for i, w in enumerate(host)]
        for layer, ex in zip(model.moe_layers(), self.executors):
            layer.executor = ex
        # scheinfer's forwards on the device path with some experts on the CPU (mailbox.py); the
        # CPU's share measured at each placement unless ``cpu_share`` fixes it
        self.mailbox: Mailbox | None = None
        if cpu_on_device:
            if not self.buffers.zero_copy:
                raise ValueError("the CPU lane on the device path needs the in-place kernels (zero_copy)")
            self.mailbox = Mailbox(host, MAX_ROWS * cfg.moe.router.top_k, device, self.buffers.cpu_threads)
        self.fixed_cpu_share = cpu_share
        self.cpu_share, self.cpu_share_ms = 0.0, {}
        self.cpu_lane_tokens, self.cpu_lane_ms = 0, {}  # forwards up to this size take the CPU lane at once

    def place(self, policy: Policy, hot_LE=None) -> np.ndarray:
        """Make ``policy`` current: choose its resident experts from ``hot_LE`` (default: the
        frequencies recorded so far) and the memory plan's slots, and copy them to the GPU.
        Returns the residency [L, E] bool."""
        hot = self.hot_LE if hot_LE is None else np.asarray(hot_LE, dtype=np.float64)
        resident = resident_experts(hot, self.memory.slots, policy.residency)
        for ex in self.executors:
            ex.experts.gpu = None  # free the old resident copies before making the new ones
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # and give their blocks back, so the new set is not fragmented
        self.policy = policy
        self.race = SplitRace() if policy.race else None
        # with the in-place kernels, small forwards need no host (in_place.py): always when streaming
        # (not the passes that count routing), else as _small_forward_on_device decides
        in_place = self.buffers.zero_copy and (policy.device_only or policy.race)
        on_device = self._small_forward_on_device if policy.race else None
        mailbox = self.mailbox if policy.race else None
        for layer, ex, res in zip(self.model.moe_layers(), self.executors, resident):
            idx = torch.from_numpy(np.flatnonzero(res))
            ex.experts.resident_E = res
            ex.experts.gpu = (tuple(None if w is None else w.index_select(0, idx).to(self.device)
                                    for w in ex.experts.host) if len(idx) else None)
            layer.executor = (InPlaceStreamExecutor(ex, slots_of(res, self.device), on_device, mailbox)
                              if in_place else ex)
        if mailbox is not None:
            self.cpu_share, self.cpu_share_ms = self._cpu_share(hot, resident)
            mailbox.set_cpu(~resident, self.cpu_share)
            self.cpu_lane_tokens, self.cpu_lane_ms = (self._cpu_lane_tokens(hot, resident) if self.cpu_share > 0
                                                      else (0, {}))
            if self.cpu_lane_tokens == 0 and self.cpu_share > 0:  # it lost to the host path even at one token
                self.cpu_share = 0.0
                mailbox.set_cpu(~resident, 0.0)
            for layer in self.model.moe_layers():
                layer.executor.cpu_max_tokens = self.cpu_lane_tokens
        self._hot_for_policy = hot
        return resident

    def _cpu_share(self, hot_LE: np.ndarray, resident_LE: np.ndarray) -> tuple[float, dict[str, float]]:
        """(the CPU's share of each forward's routed non-resident experts on the device path, ms per
        one-token layer at each share tried): the middle MoE layer on routes drawn from its
        frequencies, each share in turn, over several rounds; ``cpu_share`` given at construction
        skips the measurement."""
        if self.fixed_cpu_share is not None:
            return self.fixed_cpu_share, {}
        mid, ex = self._middle_layer()
        routes = self._routes(hot_LE[mid], 1)
        rounds: dict[float, list[float]] = {q: [] for q in CPU_SHARES}
        for _ in range(CPU_SHARE_ROUNDS):  # interleaved: a slow spell of the host hits every share alike
            for share in CPU_SHARES:
                self.mailbox.set_cpu(~resident_LE, share)
                rounds[share].append(self._layer_s(lambda x, c, c_dev: ex.device_forward(x, c_dev), routes))
        self.mailbox.check()
        times = {q: float(np.median(t)) for q, t in rounds.items()}
        return min(times, key=times.get), {str(q): round(t * 1e3, 3) for q, t in times.items()}

    def _cpu_lane_tokens(self, hot_LE: np.ndarray, resident_LE: np.ndarray) -> tuple[int, dict[str, dict]]:
        """(the largest forward size of ``CPU_LANE_SIZES`` up to which the device path with the
        CPU's share beat the host path's split at every size timed, 0 if not even at one token; ms
        per layer of both at each size timed): the middle MoE layer on routes drawn from its
        frequencies. The lane's lead shrinks with the size: with more tokens the CPU's experts have
        several rows each, which the CPU kernel reads its weights slower for (Mixtral's shape on an
        H200 host: 6.3 against 8.5 ms at one token, 15.0 against 20.1 at 4, 36.9 against 37.9 at
        16; in another run's per-layer sweep the lane lost at 16, 28.8 against 21.5 ms). The host
        path's runs here do not feed its online refit of the CPU's costs."""
        if self.fixed_cpu_share is not None:
            return MAX_ROWS, {}
        mid, ex = self._middle_layer()
        observe, ex.host.observe = ex.host.observe, None  # these runs are not the online refit's forwards
        try:
            tokens, ms = self._lane_sizes(ex, resident_LE[mid], hot_LE[mid])
        finally:
            ex.host.observe = observe
        self.mailbox.check()
        return tokens, ms

    def _lane_sizes(self, ex: InPlaceStreamExecutor, resident_E: np.ndarray, hot_E: np.ndarray
                    ) -> tuple[int, dict[str, dict]]:
        """:meth:`_cpu_lane_tokens` on layer executor ``ex``, its residency and frequencies [E]."""
        tokens, ms = 0, {}
        for T in (t for t in CPU_LANE_SIZES if t <= MAX_ROWS):
            routes = self._routes(hot_E, T)
            device = self._layer_s(lambda x, c, c_dev: ex.device_forward(x, c_dev), routes)
            host = self._layer_s(lambda x, c, c_dev: ex.host.run(
                x, c.tolist(), self.policy.split(c, resident_E, self.costs, T, hot_E)), routes)
            ms[str(T)] = {"device": round(device * 1e3, 3), "host": round(host * 1e3, 3)}
            if device > host:
                break
            tokens = T
        return tokens, ms

    def _middle_layer(self) -> tuple[int, InPlaceStreamExecutor]:
        """(index, executor) of the middle MoE layer, the one the CPU lane is timed on at placement."""
        mid = len(self.executors) // 2
        return mid, self.model.moe_layers()[mid].executor

    def _routes(self, hot_E: np.ndarray, tokens: int) -> list[np.ndarray]:
        """``CPU_SHARE_TRIALS`` forwards' token counts [E] of ``tokens`` tokens, each token routed to
        top-k distinct experts drawn by the frequencies ``hot_E`` (the same draws on every call)."""
        moe = self.model.cfg.moe
        rng = np.random.default_rng(tokens)
        p = (hot_E + 1.0) / (hot_E + 1.0).sum()
        return [sum(np.bincount(rng.choice(moe.num_experts, size=moe.router.top_k, replace=False, p=p),
                                minlength=moe.num_experts) for _ in range(tokens))
                for _ in range(CPU_SHARE_TRIALS)]

    def _layer_s(self, forward, routes: list[np.ndarray]) -> float:
        """Mean seconds of ``forward(x_ND, counts_E, counts_E on the device)`` over ``routes`` (rows
        grouped by expert; the first run unmeasured), the device synced around every forward. The
        mean, not the median: routes differ in how many of their experts are resident, and a
        decode step pays them all."""
        D, dtype = self.model.cfg.d_model, self.executors[0].experts.host[0].dtype
        g = torch.Generator().manual_seed(0)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        took = []
        with torch.no_grad():
            for counts in [routes[0], *routes]:
                x = torch.randn(int(counts.sum()), D, generator=g).to(self.device, dtype)
                c_dev = torch.from_numpy(counts).to(self.device)
                sync()
                t0 = time.perf_counter()
                forward(x, counts, c_dev)
                sync()
                took.append(time.perf_counter() - t0)
        return float(np.mean(took[1:]))

    def describe_cpu(self) -> str:
        """What computes this model's CPU experts (kernel path, tokens per expert, threads)."""
        cfg, w1 = self.model.cfg, self.executors[0].experts.host[0]
        return describe_cpu_experts(cfg.d_model, cfg.moe.experts.d_ff, self.buffers.cpu_threads, w1.dtype,
                                    self.buffers.cpu_kernel_tokens)

    def check(self) -> None:
        """Raise if the CPU lane on the device path failed in a forward so far (no device sync)."""
        if self.mailbox is not None:
            self.mailbox.check()

    def close(self) -> None:
        """Stop the CPU lane's server thread, if there is one."""
        if self.mailbox is not None:
            self.mailbox.close()

    def _small_forward_on_device(self, tokens: int) -> bool:
        """Whether the adaptive policy runs a small forward of ``tokens`` tokens on the device path:
        at once where the CPU lane there beat the host path at placement (its CPU, PCIe and GPU
        lanes without the host), else once streaming has won that size's race (without the CPU
        lane beyond ``cpu_lane_tokens``)."""
        return tokens <= self.cpu_lane_tokens or (self.race is not None and self.race.settled(tokens) == "stream")

    def record(self, on: bool) -> Recorder | None:
        """Start (or stop) a lane timeline of the next forwards."""
        self.recorder = Recorder(self.device.type == "cuda") if on else None
        for ex in self.executors:
            ex.recorder = self.recorder
        if self.recorder is not None:
            self.recorder.start()
        return self.recorder

    def _choose(self, index: int, counts: list[int], resident_E: np.ndarray, num_tokens: int) -> Split:
        self.hot_LE[index] += counts
        if self.race is None:
            split = self.policy.split(counts, resident_E, self.costs, num_tokens, self._hot_for_policy[index])
        else:
            now = time.perf_counter()  # just after this layer's token-count sync
            memo: dict[str, Split] = {}

            def candidate(name: str) -> Split:
                if name not in memo:
                    memo[name] = candidate_split(name, counts, resident_E, self.costs)
                return memo[name]

            split = candidate(self.race.pick(index, num_tokens, now, lambda c: candidate(c).predicted_s))
        if self.keep_splits:
            self.splits.append(split)
        return split

    def _observe_cpu(self, split: Split, seconds: float) -> None:
        """Refit the CPU lane online: a forward's CPU experts run beside the GPU issuer, the copies
        and the other lanes' memory traffic, which a measurement of one expert alone does not see.
        The costs the split uses follow the measured/modelled ratio (a moving average of its
        logarithm; one forward moves it by at most ``CPU_REFIT_STEP ** CPU_REFIT_WEIGHT``)."""
        c = self.base_costs.busy() if split.count(CG) else self.base_costs
        modelled = c.cpu_call + sum(c.cpu(n) for cls, n in zip(split.classes, split.counts) if cls == CC and n)
        if modelled <= 0 or seconds <= 0:
            return
        # a moving average of log(measured / modelled), each forward's clipped near the current scale
        step = np.clip(np.log(seconds / modelled / self.cpu_scale), -np.log(CPU_REFIT_STEP), np.log(CPU_REFIT_STEP))
        self.cpu_scale *= float(np.exp(CPU_REFIT_WEIGHT * step))
        b = self.base_costs
        self.costs = dataclasses.replace(b, cpu_fixed=b.cpu_fixed * self.cpu_scale,
                                         cpu_per_token=b.cpu_per_token * self.cpu_scale,
                                         cpu_call=b.cpu_call * self.cpu_scale)
