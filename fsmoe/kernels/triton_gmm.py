"""Grouped GEMM over experts in Triton: rows gathered on load, fused epilogues, both backward GEMMs.

Shape legend: T rows of the un-permuted input (tokens), N rows in expert order, E experts,
I input dim, O output dim, F expert hidden dim.

Rows of expert e are ``[offs[e-1], offs[e])`` of the expert-ordered side (``offs``: [E] int32
cumulative ends, on the device; nothing here reads it on the host). A program owns one BM x BN
output tile; the M tiles are laid out expert after expert (``ceil(rows_e / BM)`` each) and every
program finds its expert from ``offs`` itself (a cumulative sum over E in registers), so the grid
is an upper bound (``ceil(N / BM) + E`` M tiles) and programs past the real tile count return.

Gather on load (ScatterMoE's idea): with ``idx`` given, row n of A is ``a[idx[n]]``, so the
up-projection reads the tokens where they lie and no ``[N, I]`` permuted copy is written.
Rows past ``offs[E-1]`` (dropped assignments) are never written: callers zero them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fsmoe.kernels.tiles import TileConfig


@triton.jit
def _expert_tile(offs_ptr, tm, E, EP: tl.constexpr, BM: tl.constexpr):
    """M tile ``tm`` -> (exists, expert, first row of the tile, end row of its expert)."""
    e_idx = tl.arange(0, EP)
    in_e = e_idx < E
    ends = tl.load(offs_ptr + e_idx, mask=in_e, other=0)
    starts = tl.load(offs_ptr + e_idx - 1, mask=in_e & (e_idx > 0), other=0)
    tiles = tl.where(in_e, (ends - starts + BM - 1) // BM, 0)
    cum = tl.cumsum(tiles, 0)
    exists = tm < tl.sum(tiles, 0)
    e = tl.sum((cum <= tm).to(tl.int32), 0)
    before = tl.sum(tl.where(e_idx < e, tiles, 0), 0)
    start = tl.sum(tl.where(e_idx == e, starts, 0), 0)
    end = tl.sum(tl.where(e_idx == e, ends, 0), 0)
    return exists, e, start + (tm - before) * BM, end


@triton.jit
def _swizzle(pid, grid_m, grid_n, GROUP_M: tl.constexpr):
    """pid -> (M tile, N tile), GROUP_M M tiles at a time so their B columns stay in L2."""
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _mma(acc, a_rows, b_cols, mask_m, mask_n, K, s_ak, s_bk,
         BK: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    """acc += A[rows, :K] @ B[:K, cols]; a_rows: [BM, 1] row pointers, b_cols: [1, BN] column
    pointers (already at the tile's expert)."""
    rk = tl.arange(0, BK)
    a_ptrs = a_rows + rk[None, :] * s_ak
    b_ptrs = b_cols + rk[:, None] * s_bk
    for k0 in range(0, K, BK):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            kk = k0 + rk
            a = tl.load(a_ptrs, mask=mask_m[:, None] & (kk[None, :] < K), other=0.0)
            b = tl.load(b_ptrs, mask=(kk[:, None] < K) & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BK * s_ak
        b_ptrs += BK * s_bk
    return acc


@triton.jit
def _tile_rows(offs_ptr, idx_ptr, E, grid_m, grid_n, O,
               HAS_IDX: tl.constexpr, EP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               GROUP_M: tl.constexpr):
    """This program's tile: (exists, expert, rows [BM], row mask, A source rows, cols [BN], col mask)."""
    tm, tn = _swizzle(tl.program_id(0), grid_m, grid_n, GROUP_M)
    exists, e, row0, end = _expert_tile(offs_ptr, tm, E, EP, BM)
    rm = row0 + tl.arange(0, BM)
    mask_m = rm < end
    if HAS_IDX:
        src = tl.load(idx_ptr + rm, mask=mask_m, other=0).to(tl.int64)
    else:
        src = rm.to(tl.int64)
    rn = tn * BN + tl.arange(0, BN)
    return exists, e.to(tl.int64), rm.to(tl.int64), mask_m, src, rn, rn < O, row0, tn * BN


@triton.jit
def _store_tile(c_ptr, acc, rm, rn, mask_m, mask_n, s_cm, scale_ptr, HAS_SCALE: tl.constexpr):
    """c[rm, rn] = acc (times scale[rm] if HAS_SCALE), rows and columns masked."""
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + rm, mask=mask_m, other=0.0).to(tl.float32)[:, None]
    tl.store(c_ptr + rm[:, None] * s_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _store_swiglu(h1_ptr, h3_ptr, h_ptr, acc1, acc3, rm, rn, mask_m, mask_n, s_hm, STORE_PRE: tl.constexpr):
    """h = silu(acc1) * acc3 from the fp32 accumulators (and h1, h3 themselves if STORE_PRE)."""
    out = rm[:, None] * s_hm + rn[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if STORE_PRE:
        tl.store(h1_ptr + out, acc1.to(h1_ptr.dtype.element_ty), mask=mask)
        tl.store(h3_ptr + out, acc3.to(h3_ptr.dtype.element_ty), mask=mask)
    h = acc1 / (1.0 + tl.exp(-acc1)) * acc3
    tl.store(h_ptr + out, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_gathered(a_ptr, src, mask_m, k0, K, s_am, BK: tl.constexpr):
    """Rows a[src, k0:k0+BK] by pointer (gathered rows have no TMA form on Hopper)."""
    kk = k0 + tl.arange(0, BK)
    return tl.load(a_ptr + src[:, None] * s_am + kk[None, :], mask=mask_m[:, None] & (kk[None, :] < K), other=0.0)


@triton.jit
def _wgrad_tile(offs_ptr, I, O, BI: tl.constexpr, BO: tl.constexpr):
    """This weight-gradient program's (expert, its rows [start, end), first I and O index, I indices
    [BI], O indices [BO])."""
    pid = tl.program_id(0)
    grid_i, grid_o = tl.cdiv(I, BI), tl.cdiv(O, BO)
    e = pid // (grid_i * grid_o)
    start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
    end = tl.load(offs_ptr + e)
    i0, o0 = ((pid // grid_o) % grid_i) * BI, (pid % grid_o) * BO
    return e, start, end, i0, o0, i0 + tl.arange(0, BI), o0 + tl.arange(0, BO)


@triton.jit
def _load_rows_t(a_ptr, idx_ptr, r0, end, ri, I, s_am, s_ak, HAS_IDX: tl.constexpr, BM: tl.constexpr):
    """a[src(r0 .. r0+BM), ri] transposed to [BI, BM] by pointer, zeros at and past ``end``."""
    rm = r0 + tl.arange(0, BM)
    mask_m = rm < end
    if HAS_IDX:
        src = tl.load(idx_ptr + rm, mask=mask_m, other=0).to(tl.int64)
    else:
        src = rm.to(tl.int64)
    return tl.load(a_ptr + src[None, :] * s_am + ri[:, None] * s_ak, mask=(ri < I)[:, None] & mask_m[None, :],
                   other=0.0)


@triton.jit
def _store_wgrad(c_ptr, acc, e, ri, ro, I, O, s_ce, s_ci):
    tl.store(c_ptr + e.to(tl.int64) * s_ce + ri[:, None] * s_ci + ro[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=(ri < I)[:, None] & (ro < O)[None, :])


@triton.jit
def _gmm_kernel(a_ptr, b_ptr, a2_ptr, b2_ptr, c_ptr, offs_ptr, idx_ptr, scale_ptr,
                K, O, E, grid_m, s_am, s_ak, s_be, s_bk, s_bo, s_cm,
                HAS_IDX: tl.constexpr, HAS_SECOND: tl.constexpr, HAS_SCALE: tl.constexpr,
                EP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    """c[n] = (a[src(n)] @ b[e(n)] + a2[n] @ b2[e(n)]) * scale[n]."""
    grid_n = tl.cdiv(O, BN)
    exists, e, rm, mask_m, src, rn, mask_n, _, _ = _tile_rows(offs_ptr, idx_ptr, E, grid_m, grid_n, O,
                                                              HAS_IDX, EP, BM, BN, GROUP_M)
    if exists:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        b_cols = e * s_be + rn[None, :] * s_bo
        acc = _mma(acc, a_ptr + src[:, None] * s_am, b_ptr + b_cols, mask_m, mask_n, K, s_ak, s_bk,
                   BK, EVEN_K, PRECISION)
        if HAS_SECOND:
            acc = _mma(acc, a2_ptr + rm[:, None] * s_am, b2_ptr + b_cols, mask_m, mask_n, K, s_ak, s_bk,
                       BK, EVEN_K, PRECISION)
        _store_tile(c_ptr, acc, rm, rn, mask_m, mask_n, s_cm, scale_ptr, HAS_SCALE)


@triton.jit
def _gmm_swiglu_kernel(a_ptr, b1_ptr, b3_ptr, h1_ptr, h3_ptr, h_ptr, offs_ptr, idx_ptr,
                       K, O, E, grid_m, s_am, s_ak, s_be, s_bk, s_bo, s_hm,
                       HAS_IDX: tl.constexpr, STORE_PRE: tl.constexpr, EP: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                       EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    """h1 = a[src] @ b1[e], h3 = a[src] @ b3[e], h = silu(h1) * h3 (from the fp32 accumulators);
    A is read once for both projections."""
    grid_n = tl.cdiv(O, BN)
    exists, e, rm, mask_m, src, rn, mask_n, _, _ = _tile_rows(offs_ptr, idx_ptr, E, grid_m, grid_n, O,
                                                              HAS_IDX, EP, BM, BN, GROUP_M)
    if exists:
        acc1 = tl.zeros((BM, BN), dtype=tl.float32)
        acc3 = tl.zeros((BM, BN), dtype=tl.float32)
        rk = tl.arange(0, BK)
        a_ptrs = a_ptr + src[:, None] * s_am + rk[None, :] * s_ak
        b_off = e * s_be + rk[:, None] * s_bk + rn[None, :] * s_bo
        b1_ptrs, b3_ptrs = b1_ptr + b_off, b3_ptr + b_off
        for k0 in range(0, K, BK):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
                b1 = tl.load(b1_ptrs, mask=mask_n[None, :], other=0.0)
                b3 = tl.load(b3_ptrs, mask=mask_n[None, :], other=0.0)
            else:
                kk = k0 + rk
                a = tl.load(a_ptrs, mask=mask_m[:, None] & (kk[None, :] < K), other=0.0)
                kb = (kk[:, None] < K) & mask_n[None, :]
                b1 = tl.load(b1_ptrs, mask=kb, other=0.0)
                b3 = tl.load(b3_ptrs, mask=kb, other=0.0)
            acc1 = tl.dot(a, b1, acc1, input_precision=PRECISION)
            acc3 = tl.dot(a, b3, acc3, input_precision=PRECISION)
            a_ptrs += BK * s_ak
            b1_ptrs += BK * s_bk
            b3_ptrs += BK * s_bk
        _store_swiglu(h1_ptr, h3_ptr, h_ptr, acc1, acc3, rm, rn, mask_m, mask_n, s_hm, STORE_PRE)


@triton.jit
def _gmm_wgrad_kernel(a_ptr, g_ptr, c_ptr, offs_ptr, idx_ptr, I, O, E,
                      s_am, s_ak, s_gm, s_go, s_ce, s_ci,
                      HAS_IDX: tl.constexpr, BM: tl.constexpr, BI: tl.constexpr, BO: tl.constexpr,
                      PRECISION: tl.constexpr):
    """c[e] = a[src(rows of e)]^T @ g[rows of e]: [E, I, O]; an expert with no rows gets 0."""
    e, start, end, _, _, ri, ro = _wgrad_tile(offs_ptr, I, O, BI, BO)
    acc = tl.zeros((BI, BO), dtype=tl.float32)
    for r0 in range(start, end, BM):
        rm = r0 + tl.arange(0, BM)
        aT = _load_rows_t(a_ptr, idx_ptr, r0, end, ri, I, s_am, s_ak, HAS_IDX, BM)
        g = tl.load(g_ptr + rm.to(tl.int64)[:, None] * s_gm + ro[None, :] * s_go,
                    mask=(rm < end)[:, None] & (ro < O)[None, :], other=0.0)
        acc = tl.dot(aT, g, acc, input_precision=PRECISION)
    _store_wgrad(c_ptr, acc, e, ri, ro, I, O, s_ce, s_ci)


# ----------------------------------------------------------------------------- TMA variants
# Hopper's tensor memory accelerator copies whole tiles into shared memory, bounds-checked per
# dimension (zeros past the end). Weights are read through a 3-D descriptor [E, K, O] (or [E, O, K]
# for a transposed view), so a tile never runs into the next expert's matrix. Expert-ordered rows
# are read through a "ragged" descriptor: two leading dimensions whose strides wrap around the
# 64-bit address space let one descriptor bound its rows to [start, end) of any expert, so the
# weight gradient's tiles get zeros past their expert instead of masking in registers. Gathered
# rows (idx) have no TMA form on Hopper and are loaded by pointer.
_RAGGED_ROWS = 1 << 30


def ragged_desc(t: Tensor, block: tuple[int, int]):
    """A descriptor over the rows of 2-D ``t`` that ``_load_rows`` bounds to any [start, end)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    rs = t.stride(0)
    return TensorDescriptor(t, [0x7FFF0000, 0x7FFF0000, _RAGGED_ROWS, t.shape[1]],
                            [(1 << 34) - rs, rs, rs, t.stride(1)], [1, 1, *block])


@triton.jit
def _load_rows(desc, start, end, row, col):
    """Rows [row, row + BM) of the ragged descriptor, zeros at and past ``end``. The address
    works out to (start + row) * stride; the third dimension's bound stops the box at ``end``."""
    big = 1 << 30
    size = end - start
    blk = desc.load([big, start + size, big - size + (row - start), col])
    return tl.reshape(blk, blk.shape[2:])


@triton.jit
def _load_b(b_desc, e, k0, n0, TRANS_B: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
    """The [BK, BN] tile of expert e's weight (a [1, BN, BK] box, transposed, for TRANS_B)."""
    e = e.to(tl.int32)  # descriptor coordinates are 32-bit
    if TRANS_B:
        return tl.trans(tl.reshape(b_desc.load([e, n0, k0]), (BN, BK)))
    return tl.reshape(b_desc.load([e, k0, n0]), (BK, BN))


@triton.jit
def _gmm_tma_kernel(a_desc, b_desc, a2_desc, b2_desc, a_ptr, c_ptr, offs_ptr, idx_ptr, scale_ptr,
                    K, O, E, grid_m, s_am, s_cm,
                    HAS_IDX: tl.constexpr, HAS_SECOND: tl.constexpr, HAS_SCALE: tl.constexpr,
                    TRANS_B: tl.constexpr, EP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr):
    """``_gmm_kernel`` with the weights (and, unless gathered, the rows) read by TMA."""
    grid_n = tl.cdiv(O, BN)
    exists, e, rm, mask_m, src, rn, mask_n, row0, n0 = _tile_rows(offs_ptr, idx_ptr, E, grid_m, grid_n, O,
                                                                  HAS_IDX, EP, BM, BN, GROUP_M)
    if exists:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            if HAS_IDX:
                a = _load_gathered(a_ptr, src, mask_m, k0, K, s_am, BK)
            else:
                a = a_desc.load([row0, k0])
            acc = tl.dot(a, _load_b(b_desc, e, k0, n0, TRANS_B, BK, BN), acc, input_precision=PRECISION)
        if HAS_SECOND:
            for k0 in range(0, K, BK):
                acc = tl.dot(a2_desc.load([row0, k0]), _load_b(b2_desc, e, k0, n0, TRANS_B, BK, BN), acc,
                             input_precision=PRECISION)
        _store_tile(c_ptr, acc, rm, rn, mask_m, mask_n, s_cm, scale_ptr, HAS_SCALE)


@triton.jit
def _gmm_swiglu_tma_kernel(a_desc, b1_desc, b3_desc, a_ptr, h1_ptr, h3_ptr, h_ptr, offs_ptr, idx_ptr,
                           K, O, E, grid_m, s_am, s_hm,
                           HAS_IDX: tl.constexpr, STORE_PRE: tl.constexpr, EP: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                           PRECISION: tl.constexpr):
    """``_gmm_swiglu_kernel`` with the weights (and, unless gathered, the rows) read by TMA."""
    grid_n = tl.cdiv(O, BN)
    exists, e, rm, mask_m, src, rn, mask_n, row0, n0 = _tile_rows(offs_ptr, idx_ptr, E, grid_m, grid_n, O,
                                                                  HAS_IDX, EP, BM, BN, GROUP_M)
    if exists:
        acc1 = tl.zeros((BM, BN), dtype=tl.float32)
        acc3 = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            if HAS_IDX:
                a = _load_gathered(a_ptr, src, mask_m, k0, K, s_am, BK)
            else:
                a = a_desc.load([row0, k0])
            acc1 = tl.dot(a, _load_b(b1_desc, e, k0, n0, False, BK, BN), acc1, input_precision=PRECISION)
            acc3 = tl.dot(a, _load_b(b3_desc, e, k0, n0, False, BK, BN), acc3, input_precision=PRECISION)
        _store_swiglu(h1_ptr, h3_ptr, h_ptr, acc1, acc3, rm, rn, mask_m, mask_n, s_hm, STORE_PRE)


@triton.jit
def _gmm_wgrad_tma_kernel(a_desc, g_desc, a_ptr, c_ptr, offs_ptr, idx_ptr, I, O, E, s_am, s_ce, s_ci,
                          HAS_IDX: tl.constexpr, BM: tl.constexpr, BI: tl.constexpr, BO: tl.constexpr,
                          PRECISION: tl.constexpr):
    """``_gmm_wgrad_kernel`` with the gradient rows (and, unless gathered, the input rows) read by
    ragged TMA: zeros past the expert's end, no masking in registers."""
    e, start, end, i0, o0, ri, ro = _wgrad_tile(offs_ptr, I, O, BI, BO)
    acc = tl.zeros((BI, BO), dtype=tl.float32)
    for r0 in range(start, end, BM):
        if HAS_IDX:  # TMA rows need a unit stride along I, so s_ak is 1
            aT = _load_rows_t(a_ptr, idx_ptr, r0, end, ri, I, s_am, 1, HAS_IDX, BM)
        else:
            aT = tl.trans(_load_rows(a_desc, start, end, r0, i0))
        acc = tl.dot(aT, _load_rows(g_desc, start, end, r0, o0), acc, input_precision=PRECISION)
    _store_wgrad(c_ptr, acc, e, ri, ro, I, O, s_ce, s_ci)


# ----------------------------------------------------------------------------- launchers
def _precision(t: Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 else "tf32"


def _expert_pad(E: int) -> int:
    return max(16, triton.next_power_of_2(E))


def _m_tiles(N: int, E: int, bm: int) -> int:
    """Upper bound of the M tiles: every expert may end in a partial tile."""
    return triton.cdiv(N, bm) + E


def _tma_ok(*ts: Tensor) -> bool:
    """TMA needs 16-byte aligned bases and strides, and a unit last stride."""
    def ok(t):
        es = t.element_size()
        return (t.data_ptr() % 16 == 0 and t.stride(-1) == 1
                and all((st * es) % 16 == 0 for st in t.stride()[:-1]))
    return all(ok(t) for t in ts)


def _weight_desc(b_EIO: Tensor, bk: int, bn: int):
    """(descriptor, transposed?) for [E, K, O] weights stored either way round."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if b_EIO.stride(2) == 1:
        return TensorDescriptor.from_tensor(b_EIO, [1, bk, bn]), False
    return TensorDescriptor.from_tensor(b_EIO.transpose(1, 2), [1, bn, bk]), True


def _weights_tma_ok(b_EIO: Tensor) -> bool:
    return _tma_ok(b_EIO if b_EIO.stride(2) == 1 else b_EIO.transpose(1, 2))


def gmm(a: Tensor, b_EIO: Tensor, offs_E: Tensor, *, idx_N: Tensor | None = None,
        a2: Tensor | None = None, b2_EIO: Tensor | None = None, scale_N: Tensor | None = None,
        cfg: TileConfig = TileConfig()) -> Tensor:
    """c[n] = (a[idx[n]] @ b[e(n)] + a2[n] @ b2[e(n)]) * scale[n] -> [N, O].

    a: [T, I] (gathered through idx_N: [N]) or [N, I]; b_EIO: [E, I, O], either contiguous or a
    transposed view of [E, O, I] (read in place); a2/b2_EIO: like a/b (a2 not gathered). Rows past
    offs[-1] are left unwritten."""
    N = idx_N.numel() if idx_N is not None else a.shape[0]
    E, K, O = b_EIO.shape
    c = a.new_empty(N, O)
    if N == 0 or O == 0:
        return c
    b2 = b2_EIO if b2_EIO is not None else b_EIO
    assert a.stride(1) == 1 and (a2 is None or a2.stride() == a.stride()), "rows must be contiguous"
    assert b2.stride() == b_EIO.stride()
    gm = _m_tiles(N, E, cfg.bm)
    grid = (gm * triton.cdiv(O, cfg.bn),)
    flags = dict(HAS_IDX=idx_N is not None, HAS_SECOND=a2 is not None, HAS_SCALE=scale_N is not None,
                 EP=_expert_pad(E), BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, GROUP_M=cfg.group_m,
                 PRECISION=_precision(a), num_warps=cfg.warps, num_stages=cfg.stages)
    idx = idx_N if idx_N is not None else offs_E
    scale = scale_N if scale_N is not None else offs_E
    if cfg.tma and _tma_ok(a, *([a2] if a2 is not None else [])) and _weights_tma_ok(b_EIO):
        from triton.tools.tensor_descriptor import TensorDescriptor

        a_desc = TensorDescriptor.from_tensor(a, [cfg.bm, cfg.bk])
        b_desc, trans = _weight_desc(b_EIO, cfg.bk, cfg.bn)
        a2_desc = TensorDescriptor.from_tensor(a2, [cfg.bm, cfg.bk]) if a2 is not None else a_desc
        b2_desc = _weight_desc(b2, cfg.bk, cfg.bn)[0]
        _gmm_tma_kernel[grid](a_desc, b_desc, a2_desc, b2_desc, a, c, offs_E, idx, scale, K, O, E, gm,
                              a.stride(0), c.stride(0), TRANS_B=trans, **flags)
    else:
        _gmm_kernel[grid](a, b_EIO, a2 if a2 is not None else a, b2, c, offs_E, idx, scale, K, O, E, gm,
                          a.stride(0), a.stride(1), b_EIO.stride(0), b_EIO.stride(1), b_EIO.stride(2),
                          c.stride(0), EVEN_K=K % cfg.bk == 0, **flags)
    return c


def gmm_swiglu(a: Tensor, b1_EIF: Tensor, b3_EIF: Tensor, offs_E: Tensor, *, idx_N: Tensor | None = None,
               store_pre: bool = True, cfg: TileConfig = TileConfig()) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """(h1, h3, h) with h1 = a[idx] @ b1[e], h3 = a[idx] @ b3[e], h = silu(h1) * h3, each [N, F];
    h1/h3 are None when ``store_pre`` is False (inference needs only h)."""
    N = idx_N.numel() if idx_N is not None else a.shape[0]
    E, K, O = b1_EIF.shape
    h = a.new_empty(N, O)
    h1, h3 = (a.new_empty(N, O), a.new_empty(N, O)) if store_pre else (h, h)
    if N and O:
        assert a.stride(1) == 1 and b1_EIF.stride() == b3_EIF.stride()
        gm = _m_tiles(N, E, cfg.bm)
        grid = (gm * triton.cdiv(O, cfg.bn),)
        flags = dict(HAS_IDX=idx_N is not None, STORE_PRE=store_pre, EP=_expert_pad(E), BM=cfg.bm, BN=cfg.bn,
                     BK=cfg.bk, GROUP_M=cfg.group_m, PRECISION=_precision(a), num_warps=cfg.warps,
                     num_stages=cfg.stages)
        idx = idx_N if idx_N is not None else offs_E
        if cfg.tma and _tma_ok(a, b1_EIF, b3_EIF):
            from triton.tools.tensor_descriptor import TensorDescriptor

            a_desc = TensorDescriptor.from_tensor(a, [cfg.bm, cfg.bk])
            b1_desc, b3_desc = (TensorDescriptor.from_tensor(b, [1, cfg.bk, cfg.bn]) for b in (b1_EIF, b3_EIF))
            _gmm_swiglu_tma_kernel[grid](a_desc, b1_desc, b3_desc, a, h1, h3, h, offs_E, idx, K, O, E, gm,
                                        a.stride(0), h.stride(0), **flags)
        else:
            _gmm_swiglu_kernel[grid](a, b1_EIF, b3_EIF, h1, h3, h, offs_E, idx, K, O, E, gm, a.stride(0),
                                     a.stride(1), b1_EIF.stride(0), b1_EIF.stride(1), b1_EIF.stride(2),
                                     h.stride(0), EVEN_K=K % cfg.bk == 0, **flags)
    return (h1, h3, h) if store_pre else (None, None, h)


def gmm_wgrad(a: Tensor, g_NO: Tensor, offs_E: Tensor, num_experts: int, *, idx_N: Tensor | None = None,
              out_dtype: torch.dtype | None = None, cfg: TileConfig = TileConfig(bm=64, bn=128, bk=128)) -> Tensor:
    """dW[e] = a[idx[rows of e]]^T @ g[rows of e] -> [E, I, O] (the weight gradient of ``gmm``).

    a: [T, I] gathered through idx_N, or [N, I]; g_NO: [N, O]. Here ``cfg.bk`` is the I tile and
    ``cfg.bn`` the O tile; ``cfg.bm`` the rows per step."""
    I, O, E = a.shape[1], g_NO.shape[1], num_experts
    c = torch.empty(E, I, O, dtype=out_dtype or a.dtype, device=a.device)
    if E and I and O:
        grid = (E * triton.cdiv(I, cfg.bk) * triton.cdiv(O, cfg.bn),)
        flags = dict(HAS_IDX=idx_N is not None, BM=cfg.bm, BI=cfg.bk, BO=cfg.bn, PRECISION=_precision(a),
                     num_warps=cfg.warps, num_stages=cfg.stages)
        idx = idx_N if idx_N is not None else offs_E
        if cfg.tma and _tma_ok(a, g_NO):
            _gmm_wgrad_tma_kernel[grid](ragged_desc(a, (cfg.bm, cfg.bk)), ragged_desc(g_NO, (cfg.bm, cfg.bn)), a, c,
                                        offs_E, idx, I, O, E, a.stride(0), c.stride(0), c.stride(1), **flags)
        else:
            _gmm_wgrad_kernel[grid](a, g_NO, c, offs_E, idx, I, O, E, a.stride(0), a.stride(1), g_NO.stride(0),
                                    g_NO.stride(1), c.stride(0), c.stride(1), **flags)
    return c
