"""A native CPU kernel for one routed expert's MLP on a few tokens (a decode step), bf16 weights.

Shape legend: n tokens, D model dim, F expert hidden dim.

With one to a few tokens an expert's MLP is three matrix-vector products: reading the weights
from DRAM is all the work. On the 16 cores of an H200 host torch's bf16 ``linear`` reads them at
29-34 GB/s; this kernel, with a layer's eight experts in one call, at 83 GB/s for one token, 49 for
four and 44 for eight (15 threads; ``benchmarks/cpu_expert_kernels.py``), where the machine reads
plain memory at 95-100 GB/s (``benchmarks/cpu_gemv_variants.c``). Where the CPU has AVX512-BF16
it takes 32 weights per ``vdpbf16ps`` straight from the row, four rows at a time so that each
activation load serves four rows, float32 accumulation; elsewhere it widens the weights to float32
in registers and uses FMAs (53 GB/s for one token on the same host). Where the CPU also has AMX,
an expert with at least ``AMX_MIN_TOKENS`` (4) tokens is computed on tiles, 32 rows at a time (D
and F multiples of 32): with several tokens the dot products above become bound by the cores'
FMA ports (21.7 GB/s at 16 tokens on the H200 host), the tiles are not (53.7 GB/s there), and
they take any number of tokens, 32 a pass over a block's rows (42 GB/s at 32 tokens, 29 at 64,
against torch's 20 and 14), so a prefill's experts run on them too. One OpenMP thread per block
of rows:

    h[i, f] = silu(w1[f] . x[i]) * (w3[f] . x[i])    (GeLU: gelu(w1[f] . x[i]))     f < F, i < n
    y[i, d] = w2[d] . h[i]                                                            d < D

Weights in the engine's linear layout (w1, w3 ``[F, D]``, w2 ``[D, F]``, bf16, contiguous); the
hidden ``h`` is rounded to bf16 on the AVX512-BF16 path (as torch's path rounds it) and stays
float32 on the other. The C source (``cpu_kernel.c`` beside this file) is compiled once per
machine with the system C compiler (``-O3 -march=native -fopenmp``) into
``$FSMOE_CACHE_DIR/cpu_expert_<hash>.so`` (default ``~/.cache/fsmoe``) and called through ctypes,
which releases the GIL for the call, so the thread issuing GPU work runs meanwhile. Without a
compiler, or for more tokens than the kernel beats torch's GEMM at (measured with the lane costs;
else ``MAX_TOKENS_BY_PATH``: 4, 8 or 128; ``FSMOE_CPU_KERNEL_TOKENS`` overrides both),
:func:`cpu_expert_mlp` uses torch.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fsmoe.environ import patched_environ

# Up to how many tokens per expert the kernel beats torch's GEMM, by the path it takes, where the
# lane costs did not measure it (fsmoe.infer.hybrid.hardware does, per machine and expert shape).
# H200 host, 8 experts a call, GB/s against torch's: float32 FMAs 42 against 37 at 4 tokens, 25
# against 29 at 8; bf16 dot products 44 at 8, 30 at 16 (a tie); AMX tiles 15.8 against 11.6 at 128
# and 6.7 against 7.2 at 256 for a Qwen3 expert (a Mixtral one: a tie at 64)
MAX_TOKENS_BY_PATH = {"fp32": 4, "bf16": 8, "amx": 128}
KERNEL_MAX_TOKENS = 16  # what the compiled kernel's dot-product paths accept (AMX tiles: any number)
UNBOUNDED = 1 << 30

SOURCE = (Path(__file__).parent / "cpu_kernel.c").read_text()  # the kernel, compiled on first use


def _cache_dir() -> Path:
    return Path(os.environ.get("FSMOE_CACHE_DIR") or Path.home() / ".cache" / "fsmoe")


FLAGS_ENV = "FSMOE_CPU_KERNEL_FLAGS"  # extra compiler flags, e.g. -mno-avx512bf16 (the float32 path) to compare


def _extra_flags() -> tuple[str, ...]:
    return tuple(os.environ.get(FLAGS_ENV, "").split())


def _library_path() -> Path:
    """Keyed by the source, the compiler, this CPU (``-march=native``) and ``FSMOE_CPU_KERNEL_FLAGS``."""
    cpu = ""
    try:
        cpu = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        pass
    key = hashlib.sha256((SOURCE + (shutil.which("cc") or "") + cpu + sys.platform + " ".join(_extra_flags()))
                         .encode()).hexdigest()[:16]
    return _cache_dir() / f"cpu_expert_{key}.so"


def _compile(path: Path, flags: tuple[str, ...] = ()) -> None:
    """Build the library at ``path``; ``flags`` go to the compiler after ``-march=native`` (the
    tests build the float32 path with ``-mno-avx512bf16``)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler (cc or gcc) on PATH")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "cpu_expert.c", Path(tmp) / "cpu_expert.so"
        src.write_text(SOURCE)
        cmd = [cc, "-O3", "-march=native", *flags, "-fopenmp", "-shared", "-fPIC", "-o", str(out), str(src), "-lm"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise OSError(f"{cc} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        os.replace(out, path.with_suffix(f".{os.getpid()}.tmp"))  # same filesystem as path: the rename is atomic
        os.replace(path.with_suffix(f".{os.getpid()}.tmp"), path)


TOKENS_ENV = "FSMOE_CPU_KERNEL_TOKENS"  # up to how many tokens per expert the kernel runs (default: by path)


def tokens_override() -> int | None:
    """``FSMOE_CPU_KERNEL_TOKENS`` where set (a whole number >= 0; 0: torch's GEMM always), else None."""
    value = os.environ.get(TOKENS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit():
        from fsmoe.config import ConfigError
        raise ConfigError(TOKENS_ENV, value, "must be a whole number of tokens per expert (0: never the native kernel)")
    return int(value)


SPIN_ENV = "FSMOE_CPU_SPIN"
# libgomp spin iterations before a thread sleeps. 0: at once (passive): decode measured 26.4 tok/s
# against 22.5 with libgomp's default spinning; 1000 measured the same as 0 for the kernel alone
DEFAULT_SPIN = 0


def _load_quiet(path: Path) -> ctypes.CDLL:
    """Load the library with its OpenMP threads spinning ``FSMOE_CPU_SPIN`` iterations after a
    parallel region before they sleep (default 0: at once). By default libgomp's threads spin for
    300,000 iterations (milliseconds on recent Xeons): on every core at once, starving the thread
    that issues the GPU work. Sleeping at once makes every call's start and barrier a futex
    wake-up of each thread instead, which a layer's experts in one call pay once. The setting is read
    when this library's OpenMP runtime starts (torch's own, a separate copy, has started already),
    so the environment is restored right after."""
    spin = os.environ.get(SPIN_ENV, str(DEFAULT_SPIN))
    if not spin.isdigit():
        from fsmoe.config import ConfigError
        raise ConfigError(SPIN_ENV, spin, "must be a whole number of spin iterations (0: threads sleep at once)")
    with patched_environ({"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": spin}):
        return ctypes.CDLL(str(path))


class CpuExpertKernel:
    """The compiled kernel; ``None`` from :meth:`load` where it cannot be built (said once)."""

    _loaded: "CpuExpertKernel | None | bool" = False  # False: not tried yet

    def __init__(self, lib: ctypes.CDLL):
        self.many_fn = lib.experts_mlp_bf16
        self.many_fn.restype = ctypes.c_int
        self.many_fn.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int] * 5
        self.path_fn = lib.kernel_path
        self.path_fn.restype = ctypes.c_int
        self.path_fn.argtypes = [ctypes.c_int, ctypes.c_int]
        self.amx_min_tokens = int(lib.amx_min_tokens())
        self.serve_fn = lib.serve_mailbox  # fsmoe.infer.hybrid.mailbox
        self.serve_fn.restype = ctypes.c_int
        self.serve_fn.argtypes = [ctypes.c_int] * 5 + [ctypes.c_void_p] * 10 + [ctypes.c_int]

    @classmethod
    def load(cls) -> "CpuExpertKernel | None":
        if cls._loaded is False:
            try:
                path = _library_path()
                if not path.is_file():
                    _compile(path, _extra_flags())
                cls._loaded = cls(_load_quiet(path))
            except (OSError, subprocess.SubprocessError) as e:
                warnings.warn(f"the CPU experts run on torch's kernels: the native kernel could not be built ({e})",
                              stacklevel=2)
                cls._loaded = None
        return cls._loaded

    def path(self, D: int, F: int) -> str:
        """One of "amx", "bf16", "fp32": how an expert of several tokens at these dims is computed."""
        return ("fp32", "bf16", "amx")[self.path_fn(D, F)]

    def max_tokens(self, D: int, F: int) -> int:
        """Up to how many tokens per expert this kernel beats torch's GEMM at these dims (where
        ``FSMOE_CPU_KERNEL_TOKENS`` is set: that, up to what the kernel accepts)."""
        override = tokens_override()
        return min(MAX_TOKENS_BY_PATH[self.path(D, F)] if override is None else override, self.row_limit(D, F))

    def row_limit(self, D: int, F: int) -> int:
        """Up to how many rows per expert the compiled kernel accepts at these dims: any number
        on AMX tiles (which take every expert past ``KERNEL_MAX_TOKENS``), else KERNEL_MAX_TOKENS."""
        amx = self.path(D, F) == "amx" and self.amx_min_tokens <= KERNEL_MAX_TOKENS + 1
        return UNBOUNDED if amx else KERNEL_MAX_TOKENS

    def __call__(self, x_nD: Tensor, w1_FD: Tensor, w3_FD: Tensor | None, w2_DF: Tensor, out_nD: Tensor,
                 threads: int) -> Tensor:
        """One expert (w1, w3 [F, D] | None, w2 [D, F]) on all n rows of x_nD: :meth:`many` of one."""
        w = tuple(None if t is None else t.unsqueeze(0) for t in (w1_FD, w3_FD, w2_DF))
        return self.many(x_nD, w, np.zeros(1), np.zeros(1), np.full(1, x_nD.shape[0]), out_nD, threads)

    def many(self, x_ND: Tensor, w: tuple[Tensor, Tensor | None, Tensor], experts_m: np.ndarray,
             start_m: np.ndarray, count_m: np.ndarray, out_ND: Tensor, threads: int) -> Tensor:
        """Several experts in one call: expert ``experts_m[j]`` of ``w`` (w1, w3 [E, F, D] | None,
        w2 [E, D, F]) takes rows ``start_m[j]`` to ``start_m[j] + count_m[j]`` of x_ND [N, D] (1 to
        KERNEL_MAX_TOKENS each) and writes them in out_ND [N, D]."""
        for t in (x_ND, *w, out_ND):
            if t is not None and (t.dtype != torch.bfloat16 or not t.is_contiguous() or t.device.type != "cpu"):
                raise ValueError("the native CPU expert kernel takes contiguous bf16 host tensors")
        experts, start, count = (np.ascontiguousarray(a, dtype=np.int32) for a in (experts_m, start_m, count_m))
        m = len(experts)
        if m and not 0 <= experts.min() <= experts.max() < w[0].shape[0]:
            raise ValueError(f"experts {experts.tolist()} out of range for {w[0].shape[0]} experts")
        w1, w3, w2 = w
        rc = self.many_fn(x_ND.data_ptr(), w1.data_ptr(), None if w3 is None else w3.data_ptr(), w2.data_ptr(),
                          out_ND.data_ptr(), experts.ctypes.data, start.ctypes.data, count.ctypes.data, m,
                          x_ND.shape[0], x_ND.shape[1], w1.shape[1], threads)
        if rc:
            raise RuntimeError(f"native CPU expert kernel failed (code {rc}): starts {start.tolist()}, counts "
                               f"{count.tolist()} of {x_ND.shape[0]} rows")
        return out_ND


def describe_cpu_experts(D: int, F: int, threads: int, dtype: torch.dtype = torch.bfloat16,
                         max_tokens: int | None = None) -> str:
    """One line for the console and the benchmark's record: what computes the CPU experts here
    (``max_tokens``: the kernel's share as measured, default its path's)."""
    cores = f"{threads} thread{'' if threads == 1 else 's'}"
    if dtype != torch.bfloat16:
        return f"CPU experts on torch's GEMM, {cores} (the native kernel takes bf16 weights)"
    kernel = CpuExpertKernel.load()
    if kernel is None:
        return f"CPU experts on torch's GEMM, {cores} (no native kernel)"
    path = kernel.path(D, F)
    most = kernel.max_tokens(D, F) if max_tokens is None else min(max_tokens, kernel.row_limit(D, F))
    how = {"amx": f"AMX tiles from {kernel.amx_min_tokens} tokens, bf16 dot products below",
           "bf16": "bf16 dot products", "fp32": "float32 FMAs"}[path]
    return f"CPU experts on the native kernel ({how}) up to {most} tokens each, torch's GEMM beyond; {cores}"


def _bf16_on_cpu(x: Tensor, w1: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and w1.dtype == torch.bfloat16


def native_max_tokens(x_nD: Tensor, w1_FD: Tensor, max_tokens: int | None = None) -> int:
    """``max_tokens`` when given, else up to how many tokens per expert the native kernel takes these
    operands (w1 ``[F, D]`` or stacked ``[E, F, D]``): its bound at these dims
    (:meth:`CpuExpertKernel.max_tokens`), 0 where it does not run."""
    if max_tokens is not None:
        return max_tokens
    kernel = CpuExpertKernel.load() if _bf16_on_cpu(x_nD, w1_FD) else None
    return 0 if kernel is None else kernel.max_tokens(x_nD.shape[1], w1_FD.shape[-2])


def native_applies(x_nD: Tensor, w1_FD: Tensor, max_tokens: int | None = None, rows: int | None = None) -> bool:
    """Whether :func:`cpu_expert_mlp` takes the native kernel for these operands (``rows``: an
    expert's rows, default all of ``x_nD``'s; ``max_tokens``: default :func:`native_max_tokens`)."""
    rows = x_nD.shape[0] if rows is None else rows
    kernel = CpuExpertKernel.load() if _bf16_on_cpu(x_nD, w1_FD) else None
    return (kernel is not None and 1 <= rows <= kernel.row_limit(x_nD.shape[1], w1_FD.shape[-2])
            and rows <= native_max_tokens(x_nD, w1_FD, max_tokens))


def cpu_expert_mlp(x_nD: Tensor, w1_FD: Tensor, w3_FD: Tensor | None, w2_DF: Tensor, out_nD: Tensor | None = None,
                   threads: int | None = None, max_tokens: int | None = None) -> Tensor:
    """One expert's MLP on the CPU, [n, D] -> [n, D] (into ``out_nD`` when given): the native kernel
    for up to ``max_tokens`` bf16 tokens (default :func:`native_max_tokens`; 0: never) where it
    could be built, else torch (fsmoe.infer.hybrid.engine.expert_mlp)."""
    from fsmoe.infer.hybrid.engine import expert_mlp

    kernel = CpuExpertKernel.load() if native_applies(x_nD, w1_FD, max_tokens) else None
    if kernel is None or not (x_nD.is_contiguous() and (out_nD is None or out_nD.is_contiguous())):
        y = expert_mlp(x_nD, w1_FD, w3_FD, w2_DF)
        return y if out_nD is None else out_nD.copy_(y)
    out = torch.empty_like(x_nD) if out_nD is None else out_nD
    return kernel(x_nD, w1_FD, w3_FD, w2_DF, out, threads or torch.get_num_threads())


def cpu_experts_mlp(x_ND: Tensor, w: tuple[Tensor, Tensor | None, Tensor], experts: list[int], counts: list[int],
                    out_ND: Tensor, threads: int | None = None, max_tokens: int | None = None) -> Tensor:
    """Several experts' MLPs on the CPU: x_ND [N, D] holds their rows grouped in the order of
    ``experts`` (``counts`` rows each); w = (w1, w3 | None [E, F, D], w2 [E, D, F]). The experts
    with at most ``max_tokens`` rows (default :func:`native_max_tokens`) run in one call of the
    native kernel, the others one by one (:func:`cpu_expert_mlp`). Writes and returns out_ND [N, D]."""
    threads = threads or torch.get_num_threads()
    max_tokens = native_max_tokens(x_ND, w[0], max_tokens)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    counts_m = np.asarray(counts, dtype=np.int64)
    kernel = None
    if native_applies(x_ND, w[0], max_tokens, rows=1) and x_ND.is_contiguous() and out_ND.is_contiguous():
        kernel = CpuExpertKernel.load()
    limit = min(max_tokens, kernel.row_limit(x_ND.shape[1], w[0].shape[-2])) if kernel is not None else 0
    small = (counts_m >= 1) & (counts_m <= limit)
    if small.any():
        kernel.many(x_ND, w, np.asarray(experts)[small], starts[small], counts_m[small], out_ND, threads)
    w1, w3, w2 = w
    for j in np.flatnonzero(~small & (counts_m > 0)).tolist():
        r0, r1, e = int(starts[j]), int(starts[j] + counts_m[j]), experts[j]
        cpu_expert_mlp(x_ND[r0:r1], w1[e], None if w3 is None else w3[e], w2[e], out_nD=out_ND[r0:r1],
                       threads=threads, max_tokens=max_tokens)
    return out_ND
