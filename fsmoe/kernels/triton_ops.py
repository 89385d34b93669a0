"""Triton kernels behind the fast paths. Imported only where Triton exists (see ``__init__``).

Shape legend: T tokens, D model dim, N assignments (rows in expert order), K choices per token,
E experts, F expert hidden dim.

All row kernels read 16-byte vectors along D and accumulate in float32; index arithmetic is
int64 so N*D may pass 2**31. Launchers take contiguous rows (stride along D == 1) and allocate
their outputs; the autograd wrappers live in permute.py / swiglu.py / router.py / experts.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


def _row_block(D: int, cap: int = 2048) -> int:
    return min(triton.next_power_of_2(D), cap)


# ----------------------------------------------------------------------------- permute
@triton.jit
def _gather_rows_kernel(x_ptr, idx_ptr, out_ptr, D, stride_x, stride_o, BLOCK_D: tl.constexpr):
    """out[n] = x[idx[n]]."""
    n = tl.program_id(0).to(tl.int64)
    src = tl.load(idx_ptr + n).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        m = c < D
        v = tl.load(x_ptr + src * stride_x + c, mask=m)
        tl.store(out_ptr + n * stride_o + c, v, mask=m)


def gather_rows(x_TD: Tensor, idx_N: Tensor) -> Tensor:
    """[T, D], [N] int64 -> [N, D] with row n = x[idx[n]]."""
    N, D = idx_N.numel(), x_TD.shape[1]
    out = x_TD.new_empty(N, D)
    if N and D:
        _gather_rows_kernel[(N,)](x_TD, idx_N, out, D, x_TD.stride(0), out.stride(0),
                                  BLOCK_D=_row_block(D), num_warps=4)
    return out


@triton.jit
def _gather_sum_kernel(src_ptr, slots_ptr, eid_ptr, w_ptr, out_ptr, D, E, stride_s, stride_o,
                       K: tl.constexpr, KP: tl.constexpr, HAS_W: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t] = sum_j keep[s_j] * w[s_j] * src[s_j], s_j = slots[t, j], keep = expert id < E.

    Gathers the K rows of each token instead of scattering into it: no atomics, a fixed
    summation order (deterministic), and each output row is written once.
    """
    t = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, KP)
    jm = j < K
    slot = tl.load(slots_ptr + t * K + j, mask=jm, other=0).to(tl.int64)
    keep = jm & (tl.load(eid_ptr + slot, mask=jm, other=E) < E)
    if HAS_W:
        w = tl.load(w_ptr + slot, mask=keep, other=0.0).to(tl.float32)
    cols = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        m = c < D
        v = tl.load(src_ptr + slot[:, None] * stride_s + c[None, :], mask=keep[:, None] & m[None, :],
                    other=0.0).to(tl.float32)
        if HAS_W:
            v = v * w[:, None]
        acc = tl.sum(v, axis=0)
        tl.store(out_ptr + t * stride_o + c, acc.to(out_ptr.dtype.element_ty), mask=m)


# Block width along D of the gather-sum. Measured on an H100 (fsmoe/bench/launch_probe.py, bf16,
# T=16384): D=2048, K=8: 259 us at 1024 columns vs 390 at 512 and 1270 at 256; D=4096, K=2: 112 us
# at 1024 vs 124 at 4096; 8 warps was slower everywhere.
GATHER_SUM_BLOCK_D = 1024
GATHER_SUM_WARPS = 4


def gather_sum(src_ND: Tensor, slots_TK: Tensor, expert_ids_N: Tensor, num_experts: int,
               weights_N: Tensor | None = None, out_dtype: torch.dtype | None = None,
               block_d: int | None = None, num_warps: int | None = None) -> Tensor:
    """[N, D] -> [T, D]: out[t] = sum over t's K slots of (weight *) row, dropped rows skipped."""
    T, K = slots_TK.shape
    D = src_ND.shape[1]
    out = src_ND.new_empty(T, D, dtype=out_dtype or src_ND.dtype)
    if T and D:
        KP = triton.next_power_of_2(K)
        block_d = _row_block(D, block_d or GATHER_SUM_BLOCK_D)
        _gather_sum_kernel[(T,)](src_ND, slots_TK, expert_ids_N, weights_N if weights_N is not None else src_ND,
                                 out, D, num_experts, src_ND.stride(0), out.stride(0), K=K, KP=KP,
                                 HAS_W=weights_N is not None, BLOCK_D=block_d,
                                 num_warps=num_warps or GATHER_SUM_WARPS)
    return out


@triton.jit
def _combine_bwd_kernel(dy_ptr, y_ptr, tok_ptr, eid_ptr, w_ptr, dyn_ptr, dw_ptr, D, E, stride_dy, stride_y,
                        stride_dyn, NEED_DW: tl.constexpr, BLOCK_D: tl.constexpr):
    """Backward of the weighted combine, one assignment row n per program:
    dy_N[n] = w[n] * dy[tok[n]] (0 if dropped); dw[n] = <dy[tok[n]], y_N[n]> (0 if dropped)."""
    n = tl.program_id(0).to(tl.int64)
    tok = tl.load(tok_ptr + n).to(tl.int64)
    keep = tl.load(eid_ptr + n) < E
    w = tl.load(w_ptr + n).to(tl.float32)
    w = tl.where(keep, w, 0.0)
    cols = tl.arange(0, BLOCK_D)
    dot = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        m = c < D
        g = tl.load(dy_ptr + tok * stride_dy + c, mask=m, other=0.0).to(tl.float32)
        tl.store(dyn_ptr + n * stride_dyn + c, (g * w).to(dyn_ptr.dtype.element_ty), mask=m)
        if NEED_DW:
            yv = tl.load(y_ptr + n * stride_y + c, mask=m & keep, other=0.0).to(tl.float32)
            dot += g * yv
    if NEED_DW:
        tl.store(dw_ptr + n, tl.sum(dot, axis=0))


def combine_bwd(dy_TD: Tensor, y_ND: Tensor, token_ids_N: Tensor, expert_ids_N: Tensor, weights_N: Tensor,
                num_experts: int, need_dw: bool) -> tuple[Tensor, Tensor | None]:
    """Returns (dy_ND [N, D] in y's dtype, dw_N [N] float32 or None)."""
    N, D = y_ND.shape
    dy_ND = y_ND.new_empty(N, D)
    dw_N = torch.empty(N, device=y_ND.device, dtype=torch.float32) if need_dw else None
    if N and D:
        _combine_bwd_kernel[(N,)](dy_TD, y_ND, token_ids_N, expert_ids_N, weights_N, dy_ND,
                                  dw_N if need_dw else dy_ND, D, num_experts, dy_TD.stride(0), y_ND.stride(0),
                                  dy_ND.stride(0), NEED_DW=need_dw, BLOCK_D=_row_block(D), num_warps=4)
    elif need_dw:
        dw_N.zero_()
    return dy_ND, dw_N


# ----------------------------------------------------------------------------- tail rows
@triton.jit
def _zero_tail_kernel(x_ptr, offs_ptr, NE, N, D, stride_x, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """x[n, :] = 0 for n >= offs[NE-1]; blocks wholly before the end return at once."""
    r0 = tl.program_id(0) * BLOCK_M
    end = tl.load(offs_ptr + NE - 1).to(tl.int64)
    if r0 + BLOCK_M > end:
        rows = r0 + tl.arange(0, BLOCK_M).to(tl.int64)
        rm = (rows >= end) & (rows < N)
        cols = tl.arange(0, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            c = d0 + cols
            tl.store(x_ptr + rows[:, None] * stride_x + c[None, :],
                     tl.zeros([BLOCK_M, BLOCK_D], dtype=x_ptr.dtype.element_ty),
                     mask=rm[:, None] & (c < D)[None, :])


def zero_tail_rows_(x_ND: Tensor, offs_E: Tensor) -> Tensor:
    """In place: rows at or past offs[-1] become 0. No host synchronisation."""
    N, D = x_ND.shape
    if N and D and offs_E.numel():
        BLOCK_M = 16
        _zero_tail_kernel[(triton.cdiv(N, BLOCK_M),)](x_ND, offs_E, offs_E.numel(), N, D, x_ND.stride(0),
                                                       BLOCK_M=BLOCK_M, BLOCK_D=_row_block(D, 256), num_warps=4)
    return x_ND


# ----------------------------------------------------------------------------- SwiGLU
@triton.jit
def _swiglu_fwd_kernel(a_ptr, b_ptr, h_ptr, numel, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < numel
    a = tl.load(a_ptr + i, mask=m, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + i, mask=m, other=0.0).to(tl.float32)
    h = a * tl.sigmoid(a) * b
    tl.store(h_ptr + i, h.to(h_ptr.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd_kernel(a_ptr, b_ptr, dh_ptr, da_ptr, db_ptr, numel, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < numel
    a = tl.load(a_ptr + i, mask=m, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + i, mask=m, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + i, mask=m, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    silu = a * s
    da = dh * b * s * (1.0 + a * (1.0 - s))
    db = dh * silu
    tl.store(da_ptr + i, da.to(da_ptr.dtype.element_ty), mask=m)
    tl.store(db_ptr + i, db.to(db_ptr.dtype.element_ty), mask=m)


_EW_BLOCK = 2048


def swiglu_fwd(a: Tensor, b: Tensor) -> Tensor:
    h = torch.empty_like(a)
    n = a.numel()
    if n:
        _swiglu_fwd_kernel[(triton.cdiv(n, _EW_BLOCK),)](a, b, h, n, BLOCK=_EW_BLOCK, num_warps=8)
    return h


def swiglu_bwd(a: Tensor, b: Tensor, dh: Tensor) -> tuple[Tensor, Tensor]:
    da, db = torch.empty_like(a), torch.empty_like(b)
    n = a.numel()
    if n:
        _swiglu_bwd_kernel[(triton.cdiv(n, _EW_BLOCK),)](a, b, dh, da, db, n, BLOCK=_EW_BLOCK, num_warps=8)
    return da, db


# ----------------------------------------------------------------------------- router
@triton.jit
def _softmax_topk_kernel(logits_ptr, probs_ptr, w_ptr, ids_ptr, T, E, K: tl.constexpr, KP: tl.constexpr,
                         NORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """Per token: probs = softmax(logits); the K largest (first index wins ties), in
    descending order; weights = those probs, renormalised to sum 1 if NORMALIZE."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    rm = rows < T
    cm = cols < E
    x = tl.load(logits_ptr + rows[:, None] * E + cols[None, :], mask=rm[:, None] & cm[None, :],
                other=-float("inf")).to(tl.float32)
    mx = tl.max(x, axis=1)
    ex = tl.exp(x - mx[:, None])
    ex = tl.where(cm[None, :], ex, 0.0)
    p = ex / tl.sum(ex, axis=1)[:, None]
    tl.store(probs_ptr + rows[:, None] * E + cols[None, :], p, mask=rm[:, None] & cm[None, :])
    work = tl.where(cm[None, :], p, -1.0)
    nan_row = tl.sum((x != x).to(tl.int32), axis=1) > 0
    kc = tl.arange(0, KP)
    w_tile = tl.zeros([BLOCK_T, KP], dtype=tl.float32)
    id_tile = tl.zeros([BLOCK_T, KP], dtype=tl.int64)
    for j in tl.static_range(K):
        best = tl.max(work, axis=1)
        idx = tl.min(tl.where(work == best[:, None], cols[None, :], BLOCK_E), axis=1)
        # a token with a NaN logit has no order: it takes experts 0..K-1 with NaN weights, so the
        # ids stay valid (no row is sent past the last expert) and the NaN reaches the loss, where
        # the trainer's guard (train.on_nonfinite) deals with it
        idx = tl.where(nan_row, j, idx)
        best = tl.where(nan_row, float("nan"), best)
        w_tile = tl.where(kc[None, :] == j, best[:, None], w_tile)
        id_tile = tl.where(kc[None, :] == j, idx[:, None].to(tl.int64), id_tile)
        work = tl.where(cols[None, :] == idx[:, None], -1.0, work)
    if NORMALIZE:
        w_tile = w_tile / tl.sum(w_tile, axis=1)[:, None]
    om = rm[:, None] & (kc < K)[None, :]
    tl.store(w_ptr + rows[:, None] * K + kc[None, :], w_tile, mask=om)
    tl.store(ids_ptr + rows[:, None] * K + kc[None, :], id_tile, mask=om)


def softmax_topk(logits_TE: Tensor, k: int, normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """logits [T, E] float32 -> (probs [T, E] f32, weights [T, K] f32, ids [T, K] int64)."""
    T, E = logits_TE.shape
    logits_TE = logits_TE.contiguous()
    probs = torch.empty_like(logits_TE)
    w = torch.empty(T, k, device=logits_TE.device, dtype=torch.float32)
    ids = torch.empty(T, k, device=logits_TE.device, dtype=torch.int64)
    if T:
        BLOCK_E = triton.next_power_of_2(E)
        BLOCK_T = max(1, min(64, 4096 // BLOCK_E))
        _softmax_topk_kernel[(triton.cdiv(T, BLOCK_T),)](logits_TE, probs, w, ids, T, E, K=k,
                                                          KP=triton.next_power_of_2(k), NORMALIZE=normalize,
                                                          BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E, num_warps=4)
    return probs, w, ids


# ----------------------------------------------------------------------------- routing plan
@triton.jit
def _kmajor_keys_kernel(ids_ptr, keys_ptr, T, K, stride_t, stride_k, BLOCK: tl.constexpr):
    """keys[k*T + t] = ids[t, k], narrowed to the key dtype (k-major: first choices first)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < T * K
    k = i // T
    t = i - k * T
    v = tl.load(ids_ptr + t * stride_t + k * stride_k, mask=m, other=0)
    tl.store(keys_ptr + i, v.to(keys_ptr.dtype.element_ty), mask=m)


def kmajor_keys(ids_TK: Tensor, key_dtype: torch.dtype) -> Tensor:
    T, K = ids_TK.shape
    keys = torch.empty(T * K, device=ids_TK.device, dtype=key_dtype)
    if T * K:
        BLOCK = 1024
        _kmajor_keys_kernel[(triton.cdiv(T * K, BLOCK),)](ids_TK, keys, T, K, ids_TK.stride(0), ids_TK.stride(1),
                                                           BLOCK=BLOCK, num_warps=4)
    return keys


@triton.jit
def _sorted_counts_kernel(keys_ptr, out_ptr, N, E, ITERS, BLOCK_E: tl.constexpr):
    """out[e] = #(keys == e) for e < E from sorted keys (two vectorised binary searches);
    out[E] = 0 (the plan's dropped count: there is no capacity on this path)."""
    e = tl.arange(0, BLOCK_E)
    lo_a = tl.zeros([BLOCK_E], dtype=tl.int64)
    hi_a = tl.zeros([BLOCK_E], dtype=tl.int64) + N
    lo_b = tl.zeros([BLOCK_E], dtype=tl.int64)
    hi_b = tl.zeros([BLOCK_E], dtype=tl.int64) + N
    for _ in range(ITERS):  # lower_bound(e) in [lo_a, hi_a), lower_bound(e + 1) in [lo_b, hi_b)
        act_a = lo_a < hi_a
        mid_a = (lo_a + hi_a) // 2
        va = tl.load(keys_ptr + mid_a, mask=act_a, other=0).to(tl.int32)
        go_a = act_a & (va < e)
        lo_a = tl.where(go_a, mid_a + 1, lo_a)
        hi_a = tl.where(act_a & (va >= e), mid_a, hi_a)
        act_b = lo_b < hi_b
        mid_b = (lo_b + hi_b) // 2
        vb = tl.load(keys_ptr + mid_b, mask=act_b, other=0).to(tl.int32)
        go_b = act_b & (vb < e + 1)
        lo_b = tl.where(go_b, mid_b + 1, lo_b)
        hi_b = tl.where(act_b & (vb >= e + 1), mid_b, hi_b)
    counts = tl.where(e < E, lo_b - lo_a, 0)
    tl.store(out_ptr + e, counts, mask=e <= E)


def sorted_counts(sorted_keys_N: Tensor, num_experts: int) -> Tensor:
    """[E + 1] int64: per-expert counts of sorted keys, then a 0 (no drops)."""
    N = sorted_keys_N.numel()
    out = torch.empty(num_experts + 1, device=sorted_keys_N.device, dtype=torch.int64)
    _sorted_counts_kernel[(1,)](sorted_keys_N, out, N, num_experts, max(1, N.bit_length()),
                                BLOCK_E=triton.next_power_of_2(num_experts + 1), num_warps=4)
    return out


@triton.jit
def _plan_finish_kernel(perm_ptr, skeys_ptr, w_ptr, tok_ptr, exp_ptr, wout_ptr, slots_ptr, N, T, K,
                        stride_wt, stride_wk, BLOCK: tl.constexpr):
    """Row n of the sorted plan came from k-major assignment i = perm[n] = k*T + t:
    token t, expert skeys[n], weight w[t, k], and token t's k-th slot is n."""
    n = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = n < N
    i = tl.load(perm_ptr + n, mask=m, other=0).to(tl.int64)
    k = i // T
    t = i - k * T
    tl.store(tok_ptr + n, t, mask=m)
    tl.store(exp_ptr + n, tl.load(skeys_ptr + n, mask=m, other=0).to(tl.int64), mask=m)
    tl.store(wout_ptr + n, tl.load(w_ptr + t * stride_wt + k * stride_wk, mask=m, other=0.0), mask=m)
    tl.store(slots_ptr + t * K + k, n, mask=m)


def plan_finish(perm_N: Tensor, sorted_keys_N: Tensor, w_TK: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (token_ids_N, expert_ids_N, weights_N, token_slots_TK)."""
    T, K = w_TK.shape
    N = perm_N.numel()
    dev = perm_N.device
    tok = torch.empty(N, device=dev, dtype=torch.int64)
    exp = torch.empty(N, device=dev, dtype=torch.int64)
    w = torch.empty(N, device=dev, dtype=w_TK.dtype)
    slots = torch.empty(T, K, device=dev, dtype=torch.int64)
    if N:
        BLOCK = 1024
        _plan_finish_kernel[(triton.cdiv(N, BLOCK),)](perm_N, sorted_keys_N, w_TK, tok, exp, w, slots, N, T, K,
                                                      w_TK.stride(0), w_TK.stride(1), BLOCK=BLOCK, num_warps=4)
    return tok, exp, w, slots
