"""The hybrid executor: one MoE layer's routed experts run on three lanes at once.

Shape legend: N routed rows grouped by expert (``x_ND``), D model dim, F expert hidden dim,
E experts of the layer, G of them resident on the GPU.

A :class:`HybridExecutor` replaces a layer's executor (``MoELayer.executor``: rows grouped by
expert in, their outputs out), so routing, ordering, shared experts and the combine are the
layer's own. Per forward it reads the token counts (one small device-to-host copy), asks the
policy for a :class:`~.partition.Split` and then issues, in this order:

1. CC: the CC experts' rows go to pinned host memory, and a worker thread computes them with all
   CPU cores but one (the experts with a few bf16 tokens together in one call of the native kernel
   of :mod:`.cpu_kernel`, which reads the weights at memory speed; the others expert by expert on
   torch's intra-op threads); with
   ``cpu_lane="inline"`` the calling thread computes them itself after steps 2 and 3 are issued;
2. GG: the resident experts that have tokens, on the compute stream: with in-place reads on (the
   default where they run; ``FSMOE_ZERO_COPY=0`` turns them off) and at most
   ``zero_copy.MAX_ROWS`` rows each (a decode step) all of them in two launches of
   :mod:`.zero_copy`'s kernels; else one by one on their own rows when they are few, or one
   grouped GEMM over their rows;
3. CG: with in-place reads on, an expert with at most ``zero_copy.MAX_ROWS`` rows is read in
   place: the GPU reads its weights from pinned host memory over PCIe, every such expert of the
   layer in two launches on the copy stream (:mod:`.zero_copy`). The others' weights are copied a
   chunk at a time on the copy stream into one of two GPU buffers, and the compute stream runs a
   chunk (one grouped GEMM) once its copy has landed; a buffer is refilled only after the chunk
   that used it is done (events), so copy i+1 overlaps compute i. The PCIe work is issued before
   steps 1 and 2: the PCIe lane is the longest in a decode step, and the host's time to issue
   the others would delay it;
4. the CPU results come back and are written into their rows.

On a machine without CUDA the same code runs with the "GPU" on the CPU and no streams (CI checks
the numbers there); the lanes then do not overlap.

Expert weights are held as ``nn.Linear`` holds its weight, ``[out, in]``: w1, w3 ``[E, F, D]``, w2
``[E, D, F]`` (:func:`linear_layout` turns the training layout into it). torch's one-token bf16
GEMV reads that layout at 34.5 GB/s against 26.6 GB/s for ``[in, out]`` on an H200 host's 16
cores (``benchmarks/cpu_expert_kernels.py``), and the native kernel reads rows of it; the GPU runs
either layout alike (grouped GEMMs take the transposed views).
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsmoe.experts import reference_mlp
from fsmoe.infer.hybrid.cpu_kernel import cpu_experts_mlp
from fsmoe.infer.hybrid.partition import CC, GG, Split
from fsmoe.infer.hybrid.zero_copy import MAX_ROWS as ZERO_COPY_ROWS
from fsmoe.infer.hybrid.zero_copy import enabled as zero_copy_on
from fsmoe.infer.hybrid.zero_copy import host_experts_mlp
from fsmoe.kernels.grouped_mm import grouped_mm_supported, grouped_mm_unmasked

SWITCH_INTERVAL_S = 1e-4  # the GIL's switch interval while a CPU worker runs beside the GPU issuer
FEW_EXPERTS = 4  # at most this many resident experts with tokens: run them one by one
EARLY_ROWS = 64  # at most this many routed rows (a decode step): all go to the host with the counts


def expert_mlp(x_nD: Tensor, w1_FD: Tensor, w3_FD: Tensor | None, w2_DF: Tensor) -> Tensor:
    """One expert's MLP on n rows [n, D] -> [n, D] (SwiGLU when ``w3`` is given, else GeLU);
    weights in the linear layout ``[out, in]``."""
    h = F.linear(x_nD, w1_FD)
    h = F.silu(h) * F.linear(x_nD, w3_FD) if w3_FD is not None else F.gelu(h)
    return F.linear(h, w2_DF)


def grouped_expert_mlp(x_ND: Tensor, w: tuple[Tensor, Tensor | None, Tensor], offs_G: Tensor) -> Tensor:
    """G experts' MLPs over rows grouped by expert (``offs_G`` [G] int32 row ends, the last = N: every
    row belongs to one); ``w`` = (w1 [G, F, D], w3 [G, F, D] | None, w2 [G, D, F]) in the linear
    layout, handed to the grouped GEMM transposed. With no rows past the last expert, torch's
    grouped GEMM runs unmasked: the training path's masking of a dropped tail costs five more
    launches per GEMM, which in a decode step the host would issue for nothing."""
    w1, w3, w2 = (None if t is None else t.transpose(1, 2) for t in w)
    if not grouped_mm_supported(x_ND, w1):  # (its D and F checks cover the other two GEMMs)
        return reference_mlp(x_ND, w1, w3, w2, offs_G)
    h = grouped_mm_unmasked(x_ND, w1, offs_G)
    h = F.silu(h) * grouped_mm_unmasked(x_ND, w3, offs_G) if w3 is not None else F.gelu(h)
    return grouped_mm_unmasked(h, w2, offs_G)


def linear_layout(w1_EDF: Tensor, w3_EDF: Tensor | None, w2_EFD: Tensor, pin: bool = False
                  ) -> tuple[Tensor, Tensor | None, Tensor]:
    """The training layout (w1, w3 [E, D, F], w2 [E, F, D]) as the engine holds it: each expert
    ``[out, in]`` (w1, w3 [E, F, D], w2 [E, D, F]), contiguous, in host memory (pinned when
    ``pin``); meta tensors give meta tensors of those shapes (random_model draws the weights)."""
    def t(w):
        if w is None:
            return None
        meta = w.is_meta
        out = torch.empty(w.shape[0], w.shape[2], w.shape[1], dtype=w.dtype, device="meta" if meta else "cpu",
                          pin_memory=pin and not meta)
        if not meta:
            for e in range(w.shape[0]):  # one expert at a time: no second whole copy in flight
                out[e].copy_(w[e].t())
        return out
    return t(w1_EDF), t(w3_EDF), t(w2_EFD)


@dataclass
class LayerExperts:
    """One layer's routed experts: all of them in host memory (pinned where CUDA is used), the
    resident ones also on the GPU, stacked in ascending expert id."""

    host: tuple[Tensor, Tensor | None, Tensor]  # w1 [E, F, D], w3 [E, F, D] | None, w2 [E, D, F]
    resident_E: np.ndarray  # [E] bool
    gpu: tuple[Tensor, Tensor | None, Tensor] | None  # [G, F, D], [G, F, D] | None, [G, D, F]


class HostExperts(nn.Module):
    """Stands in for a layer's ``experts`` once the hybrid engine holds the weights (no parameters,
    so moving the model moves nothing of them)."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts


class PinnedUploads:
    """Small host arrays (indices, offsets) to the GPU through a ring of pinned buffers. A copy from
    pageable memory makes the host wait for the stream to reach it, so the thread issuing a layer's
    GPU work could not run ahead of the GPU; from pinned memory it is truly asynchronous. A slot is
    reused only after its last copy has completed (an event per slot)."""

    SLOTS = 64

    def __init__(self, device: torch.device):
        self.device, self.cuda, self.next = device, device.type == "cuda", 0
        self.bufs: list[Tensor | None] = [None] * self.SLOTS
        self.done = [torch.cuda.Event() for _ in range(self.SLOTS)] if self.cuda else None
        self.used = [False] * self.SLOTS

    def __call__(self, array: np.ndarray, dtype: torch.dtype) -> Tensor:
        t = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
        if not self.cuda:
            return t.to(self.device)
        i = self.next
        self.next = (i + 1) % self.SLOTS
        if self.used[i]:
            self.done[i].synchronize()
        buf = self.bufs[i]
        if buf is None or buf.numel() < t.numel() or buf.dtype != dtype:
            buf = self.bufs[i] = torch.empty(max(t.numel(), 1024), dtype=dtype, pin_memory=True)
        staged = buf[:t.numel()]
        staged.copy_(t.reshape(-1))  # the ring's buffers are flat: any shape goes up as its elements
        out = staged.to(self.device, non_blocking=True).view(t.shape)
        self.done[i].record()
        self.used[i] = True
        return out


CPU_LANES = ("worker", "inline")


class StreamBuffers:
    """What every layer shares: two GPU buffers for streamed experts, the copy stream, the events
    that order buffer reuse, pinned staging for the CC rows, and the CPU worker."""

    def __init__(self, device: torch.device, d_model: int, d_ff: int, swiglu: bool, dtype: torch.dtype,
                 chunk: int = 1, cpu_threads: int | None = None, cpu_lane: str = "worker",
                 zero_copy: bool | None = None):
        if cpu_lane not in CPU_LANES:
            raise ValueError(f"cpu_lane {cpu_lane!r}; allowed: {list(CPU_LANES)}")
        self.device, self.cuda, self.chunk, self.cpu_lane = device, device.type == "cuda", chunk, cpu_lane
        # "inline": the layer's GPU work is issued first, then the calling thread computes the CC
        # experts itself: no second Python thread to trade the GIL with. "worker": a worker
        # thread computes them while the GPU work is issued. Either way indices go up through
        # pinned memory, so issuing never waits for the GPU (from pageable memory the host waited
        # for the compute stream, so for a streamed chunk's weights to land).
        self.upload = PinnedUploads(device) if self.cuda else None
        shapes = [(chunk, d_ff, d_model), (chunk, d_ff, d_model) if swiglu else None, (chunk, d_model, d_ff)]
        self.slots = [tuple(torch.empty(s, device=device, dtype=dtype) if s else None for s in shapes)
                      for _ in range(2)]
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.ready = [torch.cuda.Event() for _ in range(2)] if self.cuda else None
        self.free = [torch.cuda.Event() for _ in range(2)] if self.cuda else None
        self.used = [False, False]  # a slot's free event has been recorded at least once
        self.returned = torch.cuda.Event() if self.cuda else None  # the last CC outputs are on the GPU
        self.returned_pending = False
        # CG experts with a few rows read from pinned host memory by the GPU (zero_copy.py): None
        # decides from the device, dtype and FSMOE_ZERO_COPY; True also runs on CPU tensors under
        # Triton's interpreter (tests)
        self.zero_copy = zero_copy_on(device, dtype) if zero_copy is None else zero_copy
        self.zc_ready = torch.cuda.Event() if self.cuda else None  # its inputs are on the compute stream
        self.zc_done = torch.cuda.Event() if self.cuda else None  # its rows of y are written
        self.staging: dict[str, Tensor] = {}
        # "worker": one thread; its intra-op pool leaves a core to the thread that issues the GPU work
        # (with every core busy in the GEMMs, that thread's launches and the OpenMP barriers stall
        # each other). The two hand the GIL to each other between ops; at Python's default 5 ms
        # switch interval a handoff can stall a layer for milliseconds.
        self.cpu_threads = cpu_threads or cpu_expert_threads()
        self.cpu_kernel_tokens: int | None = None  # tokens per expert the native kernel takes (None: its default)
        self.pool = None
        if cpu_lane == "worker":
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsmoe-cpu-experts",
                                           initializer=torch.set_num_threads, initargs=(self.cpu_threads,))
            sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))

    def stage(self, name: str, n: int, d: int, dtype: torch.dtype) -> Tensor:
        """A reusable host buffer [n, d] (pinned under CUDA), grown as needed."""
        buf = self.staging.get(name)
        if buf is None or buf.shape[0] < n or buf.dtype != dtype:
            buf = torch.empty(max(n, 64), d, dtype=dtype, pin_memory=self.cuda)
            self.staging[name] = buf
        return buf[:n]


CPU_THREADS_ENV = "FSMOE_CPU_THREADS"


def cpu_expert_threads() -> int:
    """Threads for the CPU experts: ``FSMOE_CPU_THREADS`` when set, else every core the process
    may use but one (left to the thread issuing GPU work)."""
    import os

    value = os.environ.get(CPU_THREADS_ENV, "")
    if value:
        if not value.isdigit() or int(value) < 1:
            from fsmoe.config import ConfigError

            raise ConfigError(CPU_THREADS_ENV, value, "must be a whole number of threads, at least 1")
        return int(value)
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, n - 1)


class Recorder:
    """Optional lane timeline of the forwards it watches: (lane, label, t0, t1) in seconds since
    ``start()``, GPU spans from CUDA events, CPU spans from the host clock."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.spans: list[tuple[str, str, float, float]] = []
        self._events: list[tuple[str, str, object, object]] = []
        self._base = None
        self._t0 = 0.0

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self._base = torch.cuda.Event(enable_timing=True)
            self._base.record()
        self._t0 = time.perf_counter()

    @contextmanager
    def gpu(self, lane: str, label: str, stream=None):
        if not self.cuda:
            with self.host(lane, label):
                yield
            return
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(stream)
        yield
        b.record(stream)
        self._events.append((lane, label, a, b))

    @contextmanager
    def host(self, lane: str, label: str):
        t0 = time.perf_counter()
        yield
        self.spans.append((lane, label, t0 - self._t0, time.perf_counter() - self._t0))

    def finish(self) -> list[tuple[str, str, float, float]]:
        if self.cuda:
            torch.cuda.synchronize()
            for lane, label, a, b in self._events:
                self.spans.append((lane, label, self._base.elapsed_time(a) / 1e3, self._base.elapsed_time(b) / 1e3))
            self._events.clear()
        return sorted(self.spans, key=lambda s: s[2])


class HybridExecutor:
    """``executor(layer, x_ND, plan) -> y_ND`` for one MoE layer (see the module docstring)."""

    needs_host = True  # reads the token counts on the host: a CUDA-graphed decode step is cut here

    def __init__(self, index: int, experts: LayerExperts, buffers: StreamBuffers, choose, recorder=None,
                 observe=None):
        self.index, self.experts, self.buffers = index, experts, buffers
        self.choose = choose  # (layer index, counts [E] list, resident [E] bool, tokens) -> Split
        self.observe = observe  # (split, seconds the CPU experts took) -> None: the online refit
        self.recorder = recorder

    def __call__(self, layer, x_ND: Tensor, plan) -> Tensor:
        rec = self.recorder or _NoRecorder()
        early = self._rows_early(x_ND)
        with rec.host("host", f"L{self.index} wait for counts"):
            counts = plan.tokens_per_expert_E.tolist()  # the one host sync: the split needs the counts
        with rec.host("host", f"L{self.index} split"):
            split = self.choose(self.index, counts, self.experts.resident_E, plan.num_tokens)
        return self.run(x_ND, counts, split, early)

    def _rows_early(self, x_ND: Tensor) -> Tensor | None:
        """A few rows (a decode step): all of them to pinned host memory now, queued behind the
        router, so the sync for the counts brings them too and the CPU experts' rows need no
        second round trip to the GPU (tens of microseconds per layer)."""
        b = self.buffers
        if x_ND.shape[0] > EARLY_ROWS:  # (on a machine without CUDA too: the same code path is tested)
            return None
        host = b.stage("x_all", x_ND.shape[0], x_ND.shape[1], x_ND.dtype)
        host.copy_(x_ND, non_blocking=True)
        return host

    def run(self, x_ND: Tensor, counts: list[int], split: Split, early: Tensor | None = None) -> Tensor:
        """x_ND [N, D] rows grouped by expert (``counts`` [E] rows each, then dropped rows) -> [N, D];
        ``early``: the same rows already in host memory (:meth:`_rows_early`)."""
        rec = self.recorder or _NoRecorder()
        with rec.host("host", f"L{self.index} issue"):
            offs = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            expert_of_row = np.repeat(np.arange(len(counts)), counts)
            class_of_row = np.asarray(split.classes, dtype=np.int8)[expert_of_row]
            y_ND = torch.zeros_like(x_ND)  # dropped rows (past offs[-1]) stay 0
            read = self._read_from_host(split.cg_order, counts)
            in_place = set(read)
            chunks = self._chunks([e for e in split.cg_order if e not in in_place])
            if read:  # the PCIe lane is the longest: its work before anything else
                self._zero_copy(x_ND, y_ND, read, offs, rec)
            if chunks:
                self._copy_chunk(0, chunks[0], rec)
            cc = [e for e, c in enumerate(split.classes) if c == CC and counts[e]]
            pending = self._start_cpu(x_ND, class_of_row, cc, counts, rec, early) if cc else None
            with rec.gpu("gpu", f"L{self.index} GG"):
                self._resident(x_ND, y_ND, class_of_row, counts, offs)
            self._streamed(x_ND, y_ND, chunks, offs, rec)
        if pending is not None:
            self._finish_cpu(y_ND, pending, rec, split)
        if read and self.buffers.cuda:
            torch.cuda.current_stream().wait_event(self.buffers.zc_done)
        return y_ND

    # ---------------------------------------------------------------- lanes
    def _to_device(self, array, dtype: torch.dtype) -> Tensor:
        b = self.buffers
        if b.upload is not None:
            return b.upload(np.asarray(array), dtype)
        return torch.as_tensor(np.asarray(array)).to(dtype)

    def _rows(self, mask: np.ndarray) -> Tensor:
        return self._to_device(np.flatnonzero(mask), torch.int64)

    def _resident(self, x_ND: Tensor, y_ND: Tensor, class_of_row: np.ndarray, counts: list[int],
                  offs: np.ndarray) -> None:
        """The GG rows: with few rows per expert (a decode step) all in two launches of the in-place
        kernel (zero_copy.py, here on GPU memory), or without it expert by expert on their own rows
        when a few experts have tokens (no gather, no weights read but theirs); else one grouped
        GEMM."""
        ex = self.experts
        resident = np.flatnonzero(ex.resident_E)
        active = [(g, int(e)) for g, e in enumerate(resident) if counts[e]]
        if not active:
            return
        if self.buffers.zero_copy and all(counts[e] <= ZERO_COPY_ROWS for _, e in active):
            g, e = np.asarray(active).T
            host_experts_mlp(x_ND, ex.gpu, self._plan(g, e, offs), y_ND)
            return
        if len(active) <= FEW_EXPERTS:
            for g, e in active:
                y_ND[int(offs[e]):int(offs[e + 1])] = expert_mlp(
                    x_ND[int(offs[e]):int(offs[e + 1])], *(None if w is None else w[g] for w in ex.gpu))
            return
        idx = self._rows(class_of_row == GG)
        offs_G = self._to_device(np.cumsum([counts[e] for e in resident]), torch.int32)
        y_ND.index_copy_(0, idx, grouped_expert_mlp(x_ND.index_select(0, idx), ex.gpu, offs_G))

    def _plan(self, index: np.ndarray, experts: np.ndarray, offs: np.ndarray) -> Tensor:
        """The in-place kernels' int32 [3, S] on the device: each expert's index in the weights they
        read, its first row and its end row."""
        return self._to_device(np.stack([index, offs[experts], offs[experts + 1]]), torch.int32)

    def _read_from_host(self, cg_order, counts: list[int]) -> list[int]:
        """The CG experts the GPU reads from host memory in place (at most ZERO_COPY_ROWS rows each:
        a decode step's); [] when the buffers do not read in place."""
        if not self.buffers.zero_copy:
            return []
        return [int(e) for e in cg_order if 0 < counts[e] <= ZERO_COPY_ROWS]

    def _zero_copy(self, x_ND: Tensor, y_ND: Tensor, experts: list[int], offs: np.ndarray, rec) -> None:
        """These CG experts' rows of y, their weights read over PCIe where they lie: two launches on
        the copy stream, beside the compute stream's work, once x, y's zeros and the plan are there."""
        b = self.buffers
        e = np.asarray(experts)
        plan = self._plan(e, e, offs)
        if not b.cuda:
            host_experts_mlp(x_ND, self.experts.host, plan, y_ND)
            return
        plan.record_stream(b.copy_stream)  # made on the compute stream, read on the copy stream
        b.zc_ready.record()
        with torch.cuda.stream(b.copy_stream):
            b.copy_stream.wait_event(b.zc_ready)
            with rec.gpu("pcie", f"L{self.index} read {len(experts)} experts in place", b.copy_stream):
                host_experts_mlp(x_ND, self.experts.host, plan, y_ND)
            b.zc_done.record(b.copy_stream)

    def _chunks(self, order) -> list[list[int]]:
        return [list(order[i:i + self.buffers.chunk]) for i in range(0, len(order), self.buffers.chunk)]

    def _copy_chunk(self, i: int, group: list[int], rec) -> None:
        """Chunk i's weights into buffer i % 2, on the copy stream once the chunk that used that
        buffer last is done; the compute stream will wait for them (synchronous without CUDA)."""
        b, s = self.buffers, i % 2
        if not b.cuda:
            self._copy_in(b.slots[s], self.experts.host, group, non_blocking=False)
            return
        with torch.cuda.stream(b.copy_stream):
            if b.used[s]:
                b.copy_stream.wait_event(b.free[s])
            with rec.gpu("pcie", f"L{self.index} e{group}", b.copy_stream):
                self._copy_in(b.slots[s], self.experts.host, group, non_blocking=True)
            b.ready[s].record(b.copy_stream)

    def _streamed(self, x_ND: Tensor, y_ND: Tensor, chunks: list[list[int]], offs: np.ndarray, rec) -> None:
        """The CG experts, a chunk at a time (one grouped GEMM each): chunk i + 1's copy overlaps
        chunk i's compute. Chunk 0's copy has been issued already (first thing in the layer)."""
        b = self.buffers
        for i, group in enumerate(chunks):
            s = i % 2
            if i:
                self._copy_chunk(i, group, rec)
            if b.cuda:
                torch.cuda.current_stream().wait_event(b.ready[s])
            rows = [(int(offs[e]), int(offs[e + 1])) for e in group]
            if any(r1 > r0 for r0, r1 in rows):
                with rec.gpu("gpu", f"L{self.index} CG {group}"):
                    self._chunk_mlp(x_ND, y_ND, b.slots[s], rows)
            if b.cuda:
                b.free[s].record()
                b.used[s] = True

    @staticmethod
    def _copy_in(slot, host, group, non_blocking: bool) -> None:
        for dst, src in zip(slot, host):
            if dst is not None:
                for j, e in enumerate(group):
                    dst[j].copy_(src[e], non_blocking=non_blocking)

    def _chunk_mlp(self, x_ND: Tensor, y_ND: Tensor, slot, rows: list[tuple[int, int]]) -> None:
        k = len(rows)
        w = tuple(None if t is None else t[:k] for t in slot)
        if k == 1:
            r0, r1 = rows[0]
            y_ND[r0:r1] = expert_mlp(x_ND[r0:r1], *(None if t is None else t[0] for t in w))
            return
        idx = self._to_device(np.concatenate([np.arange(r0, r1) for r0, r1 in rows]), torch.int64)
        offs = self._to_device(np.cumsum([r1 - r0 for r0, r1 in rows]), torch.int32)
        y_ND.index_copy_(0, idx, grouped_expert_mlp(x_ND.index_select(0, idx), w, offs))

    def _start_cpu(self, x_ND, class_of_row, cc, counts, rec, early=None):
        b = self.buffers
        mask = class_of_row == CC
        idx = self._rows(mask)
        with rec.host("cpu", f"L{self.index} rows to host"):
            x_host = b.stage("x", idx.numel(), x_ND.shape[1], x_ND.dtype)
            if early is not None:
                torch.index_select(early, 0, torch.from_numpy(np.flatnonzero(mask)), out=x_host)
            else:
                x_host.copy_(x_ND.index_select(0, idx))  # synchronous: the worker reads it next
            if b.cuda and b.returned_pending:
                b.returned.synchronize()  # the last layer's outputs have left the staging buffer
            y_host = b.stage("y", idx.numel(), x_ND.shape[1], x_ND.dtype)
        if b.cpu_lane == "inline":  # run by _finish_cpu, once the GPU work is issued
            return idx, y_host, lambda: self._cpu_experts(x_host, y_host, cc, counts, rec)
        return idx, y_host, b.pool.submit(self._cpu_experts, x_host, y_host, cc, counts, rec).result

    def _cpu_experts(self, x_host: Tensor, y_host: Tensor, cc: list[int], counts: list[int], rec) -> float:
        t0 = time.perf_counter()
        with rec.host("cpu", f"L{self.index} CC {len(cc)} experts"):
            cpu_experts_mlp(x_host, self.experts.host, cc, [counts[e] for e in cc], y_host,
                            threads=self.buffers.cpu_threads, max_tokens=self.buffers.cpu_kernel_tokens)
        return time.perf_counter() - t0

    def _finish_cpu(self, y_ND: Tensor, pending, rec, split: Split) -> None:
        idx, y_host, result = pending
        with rec.host("host", f"L{self.index} wait for CPU experts"):
            seconds = result()
        if self.observe is not None:
            self.observe(split, seconds)
        with rec.gpu("gpu", f"L{self.index} CC rows back"):
            y_ND.index_copy_(0, idx, y_host.to(y_ND.device, non_blocking=True))
        if self.buffers.cuda:
            self.buffers.returned.record()
            self.buffers.returned_pending = True


class _NoRecorder:
    @contextmanager
    def gpu(self, lane, label, stream=None):
        yield

    @contextmanager
    def host(self, lane, label):
        yield
