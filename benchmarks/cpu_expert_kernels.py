"""How fast can this machine's CPU run one routed expert's MLP, decode's few tokens to prefill's hundreds?

Times the ways torch can compute a SwiGLU expert on the CPU in bf16, and the engine's native kernel
(fsmoe.infer.hybrid.cpu_kernel), over many experts in turn (so the weights come from DRAM, as in a
forward), at 1 to 256 tokens (``--tokens``), and reports the effective weight bandwidth (GB/s);
the native kernel also with 2 and 8 experts in one call, as the engine runs a layer's CPU
experts, with the weights in torch's memory, in 2 MiB pages and (with CUDA) pinned as the engine
holds them (``--native-only``: the kernel alone, 8 a call). ``FSMOE_CPU_SPIN`` sets how long its
threads spin between calls (see fsmoe.infer.hybrid.cpu_kernel). The hybrid engine's CPU lane is
only as fast as the best of these.

    python benchmarks/cpu_expert_kernels.py [--d 2048 --f 768 --experts 96 --threads 15]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from fsmoe.infer.hybrid.cpu_kernel import UNBOUNDED, CpuExpertKernel, cpu_expert_mlp, cpu_experts_mlp


def swiglu_kn(x, w1, w3, w2):  # weights [D, F], [D, F], [F, D] (the engine's layout)
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def swiglu_nk(x, w1, w3, w2):  # weights [F, D], [F, D], [D, F] (nn.Linear's layout)
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def swiglu_fused_nk(x, w13, w2):  # gate and up stacked [2F, D]: one GEMM reads both
    h = F.linear(x, w13)
    g, u = h.chunk(2, dim=-1)
    return F.linear(F.silu(g) * u, w2)


def native(threads: int):
    def fn(x, w1, w3, w2):  # weights [F, D], [F, D], [D, F]
        return cpu_expert_mlp(x, w1, w3, w2, threads=threads, max_tokens=UNBOUNDED)
    return fn


def bench(fn, weights, x, reps: int) -> float:
    E = len(weights)
    for e in range(min(E, 8)):
        fn(x, *weights[e])
    t0 = time.perf_counter()
    for i in range(reps):
        fn(x, *weights[i % E])
    return (time.perf_counter() - t0) / reps


def bench_many(stacked, x, m: int, threads: int, reps: int) -> float:
    """Seconds per expert when ``m`` experts of n tokens each run in one native call (a layer's CPU
    experts in a decode step), the experts taken in turn."""
    E, n = stacked[0].shape[0], x.shape[0]
    xs = x.repeat(m, 1)
    out = torch.empty_like(xs)
    calls = max(1, reps // m)
    for i in range(calls + 2):
        if i == 2:
            t0 = time.perf_counter()
        cpu_experts_mlp(xs, stacked, [(i * m + j) % E for j in range(m)], [n] * m, out, threads=threads,
                        max_tokens=UNBOUNDED)
    return (time.perf_counter() - t0) / (calls * m)


_KEEP = []  # the mappings behind huge_page_copy's tensors


def huge_page_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` in anonymous memory advised to use 2 MiB pages (transparent huge pages, where
    the kernel allows them): fewer TLB misses, and hardware prefetchers stop at page boundaries."""
    import mmap

    buf = mmap.mmap(-1, t.numel() * t.element_size())
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buf.madvise(mmap.MADV_HUGEPAGE)
    _KEEP.append(buf)
    return torch.frombuffer(buf, dtype=t.dtype).view(t.shape).copy_(t)


def memory_kinds(stacked) -> list[tuple[str, tuple]]:
    """The stacked expert weights as the engine may hold them: plain (torch's allocator), in 2 MiB
    pages, and pinned for CUDA (page-locked 4 KiB pages, as the hybrid engine holds them)."""
    kinds = [("", stacked), (", 2 MiB pages", tuple(huge_page_copy(w) for w in stacked))]
    if torch.cuda.is_available():
        kinds.append((", pinned", tuple(w.pin_memory() for w in stacked)))
    return kinds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--f", type=int, default=768)
    p.add_argument("--experts", type=int, default=96)
    p.add_argument("--threads", type=int, default=max(1, torch.get_num_threads() - 1))
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--tokens", default="1,2,4,8,16,32,64,128,256", help="tokens per expert, comma-separated")
    p.add_argument("--native-only", action="store_true", help="only the native kernel, 8 experts a call")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    D, Fd, E = args.d, args.f, args.experts
    print(f"torch {torch.__version__}, {args.threads} threads, expert D={D} F={Fd}, {E} experts in turn; "
          f"mkldnn bf16: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    g = torch.Generator().manual_seed(0)
    kn = [(torch.randn(D, Fd, generator=g).bfloat16(), torch.randn(D, Fd, generator=g).bfloat16(),
           torch.randn(Fd, D, generator=g).bfloat16()) for _ in range(E)]
    nk = [(a.t().contiguous(), b.t().contiguous(), c.t().contiguous()) for a, b, c in kn]
    fused = [(torch.cat([a, b]), c) for a, b, c in nk]
    nbytes = 3 * D * Fd * 2
    ways = [] if args.native_only else [("x @ W [D,F]", swiglu_kn, kn), ("linear W [F,D]", swiglu_nk, nk),
                                         ("linear, gate+up stacked", swiglu_fused_nk, fused)]
    if CpuExpertKernel.load() is not None and not args.native_only:
        ways.append(("native kernel W [F,D]", native(args.threads), nk))
    kinds = memory_kinds(tuple(torch.stack([w[i] for w in nk]) for i in range(3)))
    if args.native_only:
        kinds = kinds[:1]
    kernel = CpuExpertKernel.load()
    limit = kernel.row_limit(D, Fd) if kernel is not None else 0
    for n in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(n, D, generator=g).bfloat16()
        ref = swiglu_kn(x, *kn[0]).float()
        for name, fn, w in ways:
            if name.startswith("native") and n > limit:
                continue
            err = (fn(x, *w[0]).float() - ref).abs().max().item() / ref.abs().max().item()
            s = bench(fn, w, x, args.reps)
            print(f"  n={n:3d} {name:32s} {s * 1e3:7.3f} ms  {nbytes / s / 1e9:6.1f} GB/s  rel err {err:.1e}")
        if n <= limit:
            for kind, w in kinds:
                for m in (2, 8) if not kind and not args.native_only else (8,):
                    s = bench_many(w, x, m, args.threads, args.reps)
                    print(f"  n={n:3d} {f'native, {m} per call{kind}':32s} {s * 1e3:7.3f} ms  "
                          f"{nbytes / s / 1e9:6.1f} GB/s  (per expert)")


if __name__ == "__main__":
    main()
