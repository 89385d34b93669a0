"""CPU experts beside a forward that runs on the device alone: no host round trip.

Shape legend: L MoE layers, E experts per layer, D model dim, R rows a mailbox holds per layer,
N routed rows of one forward (grouped by expert).

On the device path (:mod:`.in_place`) a small forward's experts are all read by the GPU, resident
ones from GPU memory and the others over PCIe, so the host never waits for the token counts; the
CPU sits idle although it reads host memory about as fast as PCIe does. Here a share of the
forward's routed non-resident experts is computed by the CPU instead, still without the host
issuing anything per forward, so it stays capturable in a CUDA graph:

1. the GPU picks the CPU's experts of this forward (:func:`cpu_of_forward`: ``share`` of the routed
   non-resident ones, rounded, spread over them) and writes them, the layer's rows and its token
   counts into pinned host memory; then, behind a system-scope fence, it raises the layer's
   sequence number there (one one-program kernel);
2. a native server thread (``serve_mailbox`` in :mod:`.cpu_kernel`, started with the mailbox)
   sees the number move, computes the layer's CPU experts on their rows with every thread it was
   given, writes their output rows (zeros elsewhere) and publishes the same number back;
3. meanwhile the GPU runs the other experts in place; then a one-program kernel waits for the
   number to come back (reading host memory; it gives up after about ``MAX_SPIN`` reads and sets
   :attr:`Mailbox.status`) and adds the CPU's rows, read from host memory.

Each layer has its own slots and numbers, and the GPU waits for layer l's answer before it can post
layer l again, so nothing is overwritten while in use. The CPU's experts are chosen per forward,
not as a fixed set per layer: with a fixed set a decode step's routes sent all, some or none of
their experts to the CPU (on Mixtral's top-2, a fixed half of the experts decoded at 12.5 tok/s
against 14.2 for the host path), while per forward the two lanes always share the work. The share
is measured when the model is placed (fsmoe.infer.hybrid.model), and the adaptive policy's small
forwards take this path up to the largest size at which it beat the host path there.
"""
from __future__ import annotations

import ctypes
import threading
import weakref

import numpy as np
import torch
from torch import Tensor

from fsmoe.infer.hybrid.cpu_kernel import CpuExpertKernel

SEQ_STRIDE = 8  # int64s between two layers' numbers: each on its own 64-byte line
MAX_SPIN = 1 << 22  # reads of the answer before the GPU gives up (about seconds over PCIe)
COLLECT_ROWS = 4  # rows of the answer each program of the collect adds (a decode step of top-8: 2 programs)
FAILED = {1: "the CPU lane did not answer in time (is its server thread running?)",
          2: "the CPU lane could not run its experts (rows past the mailbox, or out of memory)"}

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    @triton.jit
    def _post_kernel(x_ptr, counts_ptr, eligible_ptr, share, N, D, E, s_x, mail_x_ptr, mail_counts_ptr,
                     mail_cpu_ptr, cpu_ptr, seq_ptr, flag_ptr, BD: tl.constexpr, BE: tl.constexpr,
                     FENCE: tl.constexpr):
        """One program: the rows x [N, D], counts [E] and this forward's CPU experts [E] (of the
        routed ``eligible`` ones, the r-th taken when rounding r * share moves up:
        :func:`cpu_of_forward`) into the mailbox, the CPU experts also to ``cpu_ptr`` on the device,
        then the layer's next number, on the device and in the mailbox. The number is written after
        a barrier and a system-scope fence, so the server cannot see it before the rest (a copy
        engine's writes followed by a kernel's would have no such order). FENCE: off under Triton's
        interpreter, which has no inline assembly (and one memory)."""
        cols = tl.arange(0, BD)
        for r in range(0, N):
            for d0 in range(0, D, BD):
                m = d0 + cols < D
                tl.store(mail_x_ptr + r * D + d0 + cols, tl.load(x_ptr + r * s_x + d0 + cols, mask=m), mask=m)
        es = tl.arange(0, BE)
        before = tl.sum(tl.zeros([BE], tl.int32), 0)  # routed eligible experts in earlier blocks
        for e0 in range(0, E, BE):
            m = e0 + es < E
            c = tl.load(counts_ptr + e0 + es, mask=m, other=0)
            tl.store(mail_counts_ptr + e0 + es, c, mask=m)
            pick = ((c > 0) & (tl.load(eligible_ptr + e0 + es, mask=m, other=0) != 0)).to(tl.int32)
            rank = (before + tl.cumsum(pick, 0) - pick).to(tl.float32)
            cpu = (pick != 0) & (tl.floor((rank + 1.0) * share + 0.5) > tl.floor(rank * share + 0.5))
            tl.store(mail_cpu_ptr + e0 + es, cpu.to(tl.uint8), mask=m)
            tl.store(cpu_ptr + e0 + es, cpu, mask=m)
            before += tl.sum(pick, 0)
        s = tl.load(seq_ptr) + 1
        tl.store(seq_ptr, s)
        tl.debug_barrier()
        if FENCE:
            tl.inline_asm_elementwise("fence.sc.sys; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False,
                                      pack=1)
        tl.store(flag_ptr, s)

    @triton.jit
    def _collect_kernel(y_ptr, s_y, N, D, mail_y_ptr, seq_ptr, flag_ptr, status_ptr, max_spin,
                        RB: tl.constexpr, BD: tl.constexpr, FENCE: tl.constexpr):
        """Program p: spin until the server has published this number (or its negation: it
        failed), at most ``max_spin`` reads, then add rows [p * RB, p * RB + RB) of its answer
        [N, D] into y (every row: zeros but the CPU experts'); any other end sets the status
        instead. The rows are read from host memory here (volatile, after a fence), by several
        programs when there are many (each read waits on PCIe): no copy engine, so nothing for a
        graph capture to track but this kernel."""
        s = tl.load(seq_ptr)
        seen = tl.load(flag_ptr, volatile=True)
        i = s * 0
        while (seen != s) & (seen != -s) & (i < max_spin):
            seen = tl.load(flag_ptr, volatile=True)
            i += 1
        if seen == s:
            if FENCE:
                tl.inline_asm_elementwise("fence.sc.sys; mov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                                          is_pure=False, pack=1)
            cols = tl.arange(0, BD)
            r0 = tl.program_id(0) * RB
            for r in range(r0, tl.minimum(r0 + RB, N)):
                for d0 in range(0, D, BD):
                    m = d0 + cols < D
                    v = tl.load(mail_y_ptr + r * D + d0 + cols, mask=m, other=0.0, volatile=True)
                    y = tl.load(y_ptr + r * s_y + d0 + cols, mask=m, other=0.0)
                    tl.store(y_ptr + r * s_y + d0 + cols, (y.to(tl.float32) + v.to(tl.float32)).to(y.dtype), mask=m)
        else:
            tl.store(status_ptr, tl.where(seen == -s, 2, 1).to(tl.int32))


def resolve(choice: str | None, in_place: bool, dtype: torch.dtype, field: str = "--cpu-on-device") -> bool:
    """A command's ``--cpu-on-device auto|on|off`` (default auto: on wherever it can run, the share
    measured at placement, so 0 where the CPU does not help); "on" where it cannot run is a
    ConfigError naming ``field``, before anything is loaded."""
    from fsmoe.config import ConfigError

    if choice == "off":
        return False
    if choice not in (None, "auto", "on"):
        raise ConfigError(field, choice, "allowed: auto, on, off")
    why = None
    if not in_place:
        why = "needs the in-place expert kernels (a CUDA device, Triton, and not --zero-copy off)"
    elif dtype != torch.bfloat16:
        why = f"the native CPU kernel takes bfloat16 weights (here {dtype})"
    elif CpuExpertKernel.load() is None:
        why = "needs the native CPU kernel, which could not be built (no C compiler?)"
    if why is not None and choice == "on":
        raise ConfigError(field, choice, why)
    return why is None


def cpu_of_forward(counts_E, eligible_E, share: float) -> np.ndarray:
    """[E] bool: the experts the CPU computes in a forward with ``counts_E`` [E] rows per expert,
    as the post kernel picks them: of the routed experts that are ``eligible_E`` (not resident),
    the r-th (in expert order) when rounding r * share moves up, so round(n * share) of n, spread
    over them. In float32, as the kernel computes it."""
    pick = (np.asarray(counts_E) > 0) & np.asarray(eligible_E, dtype=bool)
    rank = (np.cumsum(pick) - pick).astype(np.float32)
    q = np.float32(share)
    return pick & (np.floor((rank + 1) * q + np.float32(0.5)) > np.floor(rank * q + np.float32(0.5)))


class Mailbox:
    """Pinned slots and numbers for every MoE layer, and the CPU server thread reading them.

    ``weights``: each layer's host expert weights (w1, w3 | None [E, F, D], w2 [E, D, F], bf16,
    pinned, kept alive by the caller); ``rows``: the most routed rows a forward on the device path
    has (tokens x top_k)."""

    def __init__(self, weights: list[tuple[Tensor, Tensor | None, Tensor]], rows: int, device: torch.device,
                 threads: int):
        kernel = CpuExpertKernel.load()
        if kernel is None:
            raise RuntimeError("the CPU lane on the device path needs the native CPU kernel (a C compiler)")
        L, (E, F, D) = len(weights), weights[0][0].shape
        pin = device.type == "cuda"
        self.device, self.rows, self.L, self.E = device, rows, L, E
        self.x = torch.zeros(L, rows, D, dtype=torch.bfloat16, pin_memory=pin)
        self.y = torch.zeros(L, rows, D, dtype=torch.bfloat16, pin_memory=pin)
        self.counts = torch.zeros(L, E, dtype=torch.int32, pin_memory=pin)
        self.seq_in = torch.zeros(L * SEQ_STRIDE, dtype=torch.int64, pin_memory=pin)
        self.seq_out = torch.zeros(L * SEQ_STRIDE, dtype=torch.int64, pin_memory=pin)
        self.status = torch.zeros(1, dtype=torch.int32, pin_memory=pin)  # written by the GPU
        self.seq_dev = torch.zeros(L, dtype=torch.int64, device=device)
        self.cpu_mail = torch.zeros(L, E, dtype=torch.uint8, pin_memory=pin)  # this forward's CPU experts
        self.cpu_now = torch.zeros(L, E, dtype=torch.bool, device=device)  # the same, for the GPU's launches
        self.eligible = np.zeros((L, E), dtype=bool)
        self.eligible_dev = torch.zeros(L, E, dtype=torch.int8, device=device)
        self.share = 0.0
        self.active = [False] * L
        self._start_server(kernel, weights, (E, D, F), threads)

    def _start_server(self, kernel: CpuExpertKernel, weights, shape: tuple[int, int, int], threads: int) -> None:
        """``serve_mailbox`` on its own thread (ctypes lets the GIL go for the whole loop), stopped
        when the mailbox goes, or at exit before the buffers it reads are freed."""
        E, D, F = shape
        ptrs = [(ctypes.c_void_p * self.L)(*[None if w[j] is None else w[j].data_ptr() for w in weights])
                for j in range(3)]
        self._keep = (weights, ptrs)
        self._stop = np.zeros(1, dtype=np.int32)
        args = (self.L, E, D, F, self.rows, ptrs[0], ptrs[1] if weights[0][1] is not None else None, ptrs[2],
                self.cpu_mail.data_ptr(), self.counts.data_ptr(), self.x.data_ptr(), self.y.data_ptr(),
                self.seq_in.data_ptr(), self.seq_out.data_ptr(), self._stop.ctypes.data, threads)
        self.rc: int | None = None
        self._thread = threading.Thread(target=self._serve, args=(kernel, args), name="fsmoe-cpu-mailbox",
                                        daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, _stop_server, self._stop, self._thread)

    def _serve(self, kernel: CpuExpertKernel, args) -> None:
        self.rc = kernel.serve_fn(*args)

    def set_cpu(self, eligible_LE: np.ndarray, share: float) -> None:
        """The CPU computes ``share`` (0 to 1) of each forward's routed experts that are
        ``eligible_LE`` ([L, E] bool: the non-resident ones); only between forwards."""
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share {share}: must be in [0, 1]")
        self.eligible[:] = eligible_LE
        self.eligible_dev.copy_(torch.from_numpy(self.eligible.astype(np.int8)))
        self.share = float(share)
        self.active = [share > 0 and bool(row.any()) for row in self.eligible]

    def post(self, layer: int, x_ND: Tensor, counts_E: Tensor) -> None:
        """Hand layer ``layer``'s bf16 rows [N, D] and int32 counts [E] to the CPU, which takes the
        experts the kernel marks in ``cpu_now[layer]`` (queued on the stream)."""
        n, d = x_ND.shape
        if n > self.rows:
            raise ValueError(f"{n} routed rows: the CPU lane's mailbox holds {self.rows} per layer")
        assert x_ND.dtype == torch.bfloat16 and x_ND.stride(1) == 1 and counts_E.dtype == torch.int32
        _post_kernel[(1,)](x_ND, counts_E, self.eligible_dev[layer], self.share, n, d, self.E, x_ND.stride(0),
                           self.x[layer], self.counts[layer], self.cpu_mail[layer], self.cpu_now[layer],
                           self.seq_dev[layer:], self.seq_in[layer * SEQ_STRIDE:],
                           BD=min(1024, triton.next_power_of_2(d)), BE=min(1024, triton.next_power_of_2(self.E)),
                           FENCE=x_ND.is_cuda, num_warps=8)

    def collect(self, layer: int, y_ND: Tensor) -> None:
        """Once the CPU has answered, add its rows into y_ND [N, D] (queued on the stream)."""
        n, d = y_ND.shape
        assert y_ND.stride(1) == 1
        _collect_kernel[(triton.cdiv(n, COLLECT_ROWS),)](
            y_ND, y_ND.stride(0), n, d, self.y[layer], self.seq_dev[layer:], self.seq_out[layer * SEQ_STRIDE:],
            self.status, MAX_SPIN, RB=COLLECT_ROWS, BD=min(1024, triton.next_power_of_2(d)), FENCE=y_ND.is_cuda,
            num_warps=8)

    def check(self) -> None:
        """Raise if a forward's CPU lane failed (read from pinned memory: no device sync)."""
        code = int(self.status[0])
        if code:
            raise RuntimeError(f"hybrid inference: {FAILED.get(code, code)}")
        if self.rc is not None and self._finalizer.alive:
            raise RuntimeError(f"hybrid inference: the CPU lane's server stopped (code {self.rc})")

    def close(self) -> None:
        self._finalizer()


def _stop_server(stop: np.ndarray, thread: threading.Thread) -> None:
    stop[0] = 1
    thread.join(timeout=5)
