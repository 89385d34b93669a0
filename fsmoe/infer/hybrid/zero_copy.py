"""Streamed experts read straight from pinned host memory by the GPU ("zero copy").

Shape legend: N routed rows grouped by expert (``x_ND``), D model dim, F expert hidden dim, E
experts of the layer, S experts run here.

A decode step routes a few rows to each expert, so a CG expert's GEMMs are matrix-vector products
that read each weight once. Copying the weights into a GPU buffer first (the copy stream, two
buffers, events) costs the host about fifteen CUDA calls per expert; at a decode step's eight
experts per layer that is most of the layer's issue time, longer than the copies themselves.
Here the GEMMs read the weights where they lie: pinned host memory is mapped into the GPU's
address space (UVA), so a kernel's loads of it travel over PCIe, and the whole layer's CG experts
are two launches (the up-projection with its activation, then the down-projection) whatever
their number. Each program streams a tile of one expert's weight rows (contiguous, so the reads
coalesce into full PCIe transactions); many programs keep enough reads in flight to fill the bus.

A program holds :data:`MAX_ROWS` rows of its expert, so an expert with more rows has its weights
read once per MAX_ROWS rows: the engine reads in place only the experts with at most that many
(a decode step's) and copies the others once on its copy stream. The same launches also run
experts whose weights are on the GPU (the resident ones, picked per expert by a slot table), so
the streaming policy's small forwards run every expert of a layer here (:mod:`.in_place`).
:func:`host_experts_mlp` is the Triton path (the GPU, or Triton's interpreter on CPU tensors); the
reference it must equal is the engine's ``expert_mlp`` over each expert's rows.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

MAX_ROWS = 16  # rows of one expert a program holds (its M tile)
# "0" turns the path off (every streamed expert is copied to the GPU first); on by default where the
# kernels run: on an H200 they made streaming's decode 1.15x faster (docs/inference.md)
ENV = "FSMOE_ZERO_COPY"
DEFAULT = "1"
# tl.dot's precision per dtype: float32 in full (torch's float32 GEMMs do not use TF32 by default)
PRECISION = {torch.bfloat16: "tf32", torch.float16: "tf32", torch.float32: "ieee"}

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the engine copies instead
    triton = None


def runs_on(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernels can run here: CUDA, Triton importable, a dtype of :data:`PRECISION`."""
    return triton is not None and device.type == "cuda" and dtype in PRECISION


def enabled(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether experts with few rows run on this module's kernels on ``device`` (CG ones reading
    their weights from host memory): :func:`runs_on`, unless ``FSMOE_ZERO_COPY=0``."""
    from fsmoe.config import ConfigError

    value = os.environ.get(ENV, DEFAULT)
    if value not in ("0", "1"):
        raise ConfigError(ENV, value, "allowed: 0 (copy every streamed expert to the GPU first), 1 (read "
                                      "few-row experts from pinned host memory)")
    return value == "1" and runs_on(device, dtype)


def resolve(choice: str | None, device: torch.device, dtype: torch.dtype, field: str = "--zero-copy") -> bool:
    """A command's ``--zero-copy on|off`` (None: ``FSMOE_ZERO_COPY``, default on where the kernels
    run); "on" where the kernels cannot run is a ConfigError naming ``field``."""
    from fsmoe.config import ConfigError

    if choice is None:
        return enabled(device, dtype)
    if choice not in ("on", "off"):
        raise ConfigError(field, choice, "allowed: on, off")
    if choice == "on" and not runs_on(device, dtype):
        raise ConfigError(field, choice, f"needs a CUDA device, Triton and weights in one of "
                                         f"{[str(t).removeprefix('torch.') for t in PRECISION]} (here: {device.type}, "
                                         f"{'Triton' if triton is not None else 'no Triton'}, "
                                         f"{str(dtype).removeprefix('torch.')})")
    return choice == "on"


if triton is not None:
    @triton.jit
    def _expert_of(plan_ptr, slot_ptr, w_ptr, g_ptr, S, s_we, HAS_GPU: tl.constexpr):
        """This program's expert: (its weight matrix, first row, end row) from plan[:, program 0];
        with HAS_GPU a resident expert (slot[e] >= 0) is read from its GPU copy g[slot[e]]."""
        s = tl.program_id(0)
        e = tl.load(plan_ptr + s).to(tl.int64)
        r0 = tl.load(plan_ptr + S + s)
        r1 = tl.load(plan_ptr + 2 * S + s)
        w = w_ptr + e * s_we
        if HAS_GPU:
            g = tl.load(slot_ptr + e).to(tl.int64)
            if g >= 0:
                w = g_ptr + g * s_we
        return w, r0, r1

    @triton.jit
    def _rows_times_tile(acc, a_ptr, rows, row_mask, s_a, w_ptr, cols, col_mask, s_w, K,
                         BK: tl.constexpr, PRECISION: tl.constexpr):
        """acc [BM, BN] += a[rows, :K] @ w[cols, :K]^T; w rows are contiguous in K (the linear layout)."""
        rk = tl.arange(0, BK)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            a = tl.load(a_ptr + rows[:, None] * s_a + kk[None, :], mask=row_mask[:, None] & (kk[None, :] < K),
                        other=0.0)
            w = tl.load(w_ptr + cols[:, None] * s_w + kk[None, :], mask=col_mask[:, None] & (kk[None, :] < K),
                        other=0.0)
            acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
        return acc

    # S (the experts run) changes every forward: one compiled kernel for all (Triton would make
    # another for S == 1)
    @triton.jit(do_not_specialize=["S"])
    def _up_kernel(x_ptr, w1_ptr, w3_ptr, g1_ptr, g3_ptr, slot_ptr, h_ptr, plan_ptr, S, D, F, s_x, s_h, s_we,
                   SWIGLU: tl.constexpr, HAS_GPU: tl.constexpr, BM: tl.constexpr, BF: tl.constexpr,
                   BK: tl.constexpr, PRECISION: tl.constexpr):
        """h[rows, f tile] = act(x[rows] @ w1[e]^T) (* x[rows] @ w3[e]^T): grid (S, F / BF). An
        expert without rows reads nothing; more than BM rows are taken BM at a time."""
        w1, r0, r1 = _expert_of(plan_ptr, slot_ptr, w1_ptr, g1_ptr, S, s_we, HAS_GPU)
        w3, r0, r1 = _expert_of(plan_ptr, slot_ptr, w3_ptr, g3_ptr, S, s_we, HAS_GPU)
        cols = tl.program_id(1) * BF + tl.arange(0, BF)
        col_mask = cols < F
        for m0 in range(r0, r1, BM):
            rows = m0 + tl.arange(0, BM)
            row_mask = rows < r1
            acc1 = _rows_times_tile(tl.zeros((BM, BF), tl.float32), x_ptr, rows, row_mask, s_x, w1, cols, col_mask,
                                    D, D, BK, PRECISION)
            if SWIGLU:
                acc3 = _rows_times_tile(tl.zeros((BM, BF), tl.float32), x_ptr, rows, row_mask, s_x, w3, cols,
                                        col_mask, D, D, BK, PRECISION)
                h = acc1 * tl.sigmoid(acc1) * acc3
            else:  # GeLU (erf), as torch's default
                h = 0.5 * acc1 * (1.0 + tl.erf(acc1 * 0.7071067811865476))
            tl.store(h_ptr + rows[:, None] * s_h + cols[None, :], h.to(h_ptr.dtype.element_ty),
                     mask=row_mask[:, None] & col_mask[None, :])

    @triton.jit(do_not_specialize=["S"])
    def _down_kernel(h_ptr, w2_ptr, g2_ptr, slot_ptr, y_ptr, plan_ptr, S, D, F, s_h, s_y, s_we,
                     HAS_GPU: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
                     PRECISION: tl.constexpr):
        """y[rows, d tile] = h[rows] @ w2[e]^T: grid (S, D / BD)."""
        w2, r0, r1 = _expert_of(plan_ptr, slot_ptr, w2_ptr, g2_ptr, S, s_we, HAS_GPU)
        cols = tl.program_id(1) * BD + tl.arange(0, BD)
        col_mask = cols < D
        for m0 in range(r0, r1, BM):
            rows = m0 + tl.arange(0, BM)
            row_mask = rows < r1
            acc = _rows_times_tile(tl.zeros((BM, BD), tl.float32), h_ptr, rows, row_mask, s_h, w2, cols, col_mask,
                                   F, F, BK, PRECISION)
            tl.store(y_ptr + rows[:, None] * s_y + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=row_mask[:, None] & col_mask[None, :])


@dataclass(frozen=True)
class Tiles:
    """A program's output columns (``bf`` of the up-projection, ``bd`` of the down-projection) and
    its K step ``bk``; more, narrower programs keep more PCIe reads in flight."""

    bf: int = 32
    bd: int = 64
    bk: int = 128
    warps: int = 4
    stages: int = 3


def host_experts_mlp(x_ND: Tensor, w: tuple[Tensor, Tensor | None, Tensor], plan_3S: Tensor, y_ND: Tensor,
                     h_NF: Tensor | None = None, tiles: Tiles = Tiles(),
                     resident: tuple[tuple[Tensor, Tensor | None, Tensor], Tensor] | None = None) -> None:
    """y_ND[rows of s] = expert_mlp(x_ND[rows of s], w[e_s]) for each s < S, rows untouched elsewhere.

    x_ND, y_ND: [N, D] on the GPU; w = (w1 [E, F, D], w3 [E, F, D] | None, w2 [E, D, F]) in pinned
    host memory (read over PCIe) or on the GPU (the engine's resident experts in a decode step:
    two launches for all of them instead of five per expert); plan_3S: int32 [3, S] on the GPU:
    expert ids, first rows, end rows (rows of different experts disjoint; an expert without rows
    costs nothing, one with more than :data:`MAX_ROWS` reads its weights once per MAX_ROWS rows);
    ``resident``: (the GPU copies [G, ...] of some experts, slot_E int32 [E]: expert e's index in
    them, or -1): those experts are read from the GPU, the others from ``w``; h_NF: scratch for the
    hidden rows (allocated when None)."""
    w1, w3, w2 = w
    N, D = x_ND.shape
    F, S = w1.shape[1], plan_3S.shape[1]
    if S == 0:
        return
    assert x_ND.stride(1) == 1 and y_ND.stride(1) == 1 and all(t is None or t.is_contiguous() for t in w)
    g1, g3, g2 = w if resident is None else resident[0]
    slot = plan_3S if resident is None else resident[1]  # (unread without resident experts)
    h = h_NF if h_NF is not None else x_ND.new_empty(N, F)
    t, prec, on_gpu = tiles, PRECISION[x_ND.dtype], resident is not None
    _up_kernel[(S, triton.cdiv(F, t.bf))](x_ND, w1, w3 if w3 is not None else w1, g1, g3 if g3 is not None else g1,
                                          slot, h, plan_3S, S, D, F, x_ND.stride(0), h.stride(0), w1.stride(0),
                                          SWIGLU=w3 is not None, HAS_GPU=on_gpu, BM=MAX_ROWS, BF=t.bf, BK=t.bk,
                                          PRECISION=prec, num_warps=t.warps, num_stages=t.stages)
    _down_kernel[(S, triton.cdiv(D, t.bd))](h, w2, g2, slot, y_ND, plan_3S, S, D, F, h.stride(0), y_ND.stride(0),
                                            w2.stride(0), HAS_GPU=on_gpu, BM=MAX_ROWS, BD=t.bd, BK=t.bk,
                                            PRECISION=prec, num_warps=t.warps, num_stages=t.stages)


def warm_up(w: tuple[Tensor, Tensor | None, Tensor], device: torch.device) -> None:
    """Compile the kernels for these weights (one layer's, host or GPU) now: a first launch compiles
    for seconds, which inside a timed forward would price the in-place path out of a race."""
    D, E = w[0].shape[2], w[0].shape[0]
    x = torch.zeros(2, D, dtype=w[0].dtype, device=device)
    plan = torch.tensor([[0, 0], [0, 1], [1, 2]], dtype=torch.int32, device=device)  # expert 0 twice, a row each
    slot_E = torch.full((E,), -1, dtype=torch.int32, device=device)  # no expert resident: nothing read from it
    for resident in (None, (w, slot_E)):
        host_experts_mlp(x, w, plan, torch.empty_like(x), resident=resident)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
