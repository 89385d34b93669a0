/* The CPU experts' kernel: compiled on first use by fsmoe/infer/hybrid/cpu_kernel.py (which
   documents it) with the system C compiler, -O3 -march=native -fopenmp, and called through ctypes. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAXN 16
/* 16 lanes: one AVX-512 register (-march=native lowers these to narrower registers elsewhere) */
typedef float v16f __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

static inline float bf2f(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }

static inline uint16_t f2bf(float f) {  /* round to nearest even; NaN stays NaN */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline v16f load_bf16(const uint16_t *w) {
    v16h h; memcpy(&h, w, 32);
    v16u u = __builtin_convertvector(h, v16u) << 16;
    v16f f; memcpy(&f, &u, 64);
    return f;
}

static inline float hsum(v16f v) { float s = 0.f; for (int j = 0; j < 16; j++) s += v[j]; return s; }

#if defined(__AVX512BF16__)
#include <immintrin.h>
/* With AVX512-BF16 the activations stay bf16 and each vdpbf16ps takes 32 weights straight from
   the row (no conversion to float32 first), four rows at a time so that each activation load
   serves four rows: 1.35x the float32 FMA path's bandwidth at one token, 1.7x at four and 2.5x at
   eight on an H200 host's 15 threads (benchmarks/cpu_gemv_variants.c). The hidden h is rounded to
   bf16 for the down projection, as torch's bf16 path rounds it. */
typedef uint16_t act_t;
static inline act_t to_act(float f) { return f2bf(f); }

/* out[i * 4 + r] = w[r] . x[i], r < 4 rows, i < NN tokens, each K long; float32 accumulation */
#define DP_BLOCK(NN)                                                                                  \
static void dp4x##NN(const uint16_t *const *w, const uint16_t *const *x, int K, float *out) {        \
    __m512 acc[4][NN];                                                                                \
    for (int r = 0; r < 4; r++)                                                                       \
        for (int i = 0; i < NN; i++) acc[r][i] = _mm512_setzero_ps();                                 \
    for (int k = 0; k < K; k += 32) {                                                                 \
        __mmask32 m = K - k >= 32 ? (__mmask32)~0u : (__mmask32)((1u << (K - k)) - 1u);              \
        __m512i xv[NN];                                                                               \
        for (int i = 0; i < NN; i++) xv[i] = _mm512_maskz_loadu_epi16(m, x[i] + k);                  \
        for (int r = 0; r < 4; r++) {                                                                 \
            __m512i wv = _mm512_maskz_loadu_epi16(m, w[r] + k);                                       \
            for (int i = 0; i < NN; i++)                                                              \
                acc[r][i] = _mm512_dpbf16_ps(acc[r][i], (__m512bh)wv, (__m512bh)xv[i]);               \
        }                                                                                             \
    }                                                                                                 \
    for (int r = 0; r < 4; r++)                                                                       \
        for (int i = 0; i < NN; i++) out[i * 4 + r] = _mm512_reduce_add_ps(acc[r][i]);                \
}
DP_BLOCK(1) DP_BLOCK(2) DP_BLOCK(4)

/* out[i * 4 + r] = w_r . x_i for rows r < rb <= 4 of w (row stride K) and tokens i < n <= MAXN of x
   [n, K]; short blocks repeat their first row or token (results past rb / n are scratch) */
static void rows_dot(const uint16_t *w, int rb, const act_t *x, int n, int K, float *out) {
    const uint16_t *wr[4];
    for (int r = 0; r < 4; r++) wr[r] = w + (size_t)(r < rb ? r : 0) * K;
    for (int i0 = 0; i0 < n; i0 += 4) {
        const uint16_t *xr[4];
        for (int i = 0; i < 4; i++) xr[i] = x + (size_t)(i0 + (i0 + i < n ? i : 0)) * K;
        int left = n - i0;
        if (left >= 3) dp4x4(wr, xr, K, out + i0 * 4);
        else if (left == 2) dp4x2(wr, xr, K, out + i0 * 4);
        else dp4x1(wr, xr, K, out + i0 * 4);
    }
}
#else
/* Elsewhere the weights are converted to float32 in registers and the activations stay float32. */
typedef float act_t;
static inline act_t to_act(float f) { return f; }

/* out[i] = w . x[i] for N float vectors x (row stride K): each 16 weights are loaded and converted
   once and used by all N accumulators, which a constant N keeps in registers */
#define DOTS(N)                                                                                   \
static void dots##N(const uint16_t *restrict w, const float *restrict x, int K, float *restrict out) { \
    v16f acc[N];                                                                                  \
    for (int i = 0; i < N; i++) acc[i] = (v16f){0};                                               \
    int k = 0;                                                                                    \
    for (; k + 16 <= K; k += 16) {                                                                \
        v16f wv = load_bf16(w + k);                                                               \
        for (int i = 0; i < N; i++) {                                                             \
            v16f xv; memcpy(&xv, x + (size_t)i * K + k, 64);                                      \
            acc[i] += wv * xv;                                                                    \
        }                                                                                         \
    }                                                                                             \
    for (int i = 0; i < N; i++) {                                                                 \
        float s = hsum(acc[i]);                                                                   \
        for (int kk = k; kk < K; kk++) s += bf2f(w[kk]) * x[(size_t)i * K + kk];                  \
        out[i] = s;                                                                               \
    }                                                                                             \
}
DOTS(1) DOTS(2) DOTS(4) DOTS(8)

/* any n <= MAXN, in groups of 8, 4, 2, 1 tokens (a group re-reads the row from cache) */
static void dots(const uint16_t *w, const float *x, int n, int K, float *out) {
    int i = 0;
    for (; i + 8 <= n; i += 8) dots8(w, x + (size_t)i * K, K, out + i);
    if (i + 4 <= n) { dots4(w, x + (size_t)i * K, K, out + i); i += 4; }
    if (i + 2 <= n) { dots2(w, x + (size_t)i * K, K, out + i); i += 2; }
    if (i < n) dots1(w, x + (size_t)i * K, K, out + i);
}

/* rows_dot's contract (out[i * 4 + r] = w_r . x_i), one row at a time */
static void rows_dot(const uint16_t *w, int rb, const act_t *x, int n, int K, float *out) {
    float t[MAXN];
    for (int r = 0; r < rb; r++) {
        dots(w + (size_t)r * K, x, n, K, t);
        for (int i = 0; i < n; i++) out[i * 4 + r] = t[i];
    }
}
#endif

#define UNIT 32 /* rows of a thread's block where AMX computes it (else 4) */
#define AMX_PASS 32 /* tokens per pass of the tiles over a block's rows (AMX experts take any number) */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <sys/syscall.h>
#include <unistd.h>
/* AMX (Sapphire Rapids and later): one tile multiply takes 16 weight rows x 32 weights (a 1 KiB
   tile loaded straight from the rows) against the tokens' activations in bf16 pairs, so from a
   few tokens per expert on the cores are no longer bound by their FMA ports. Linux hands out the
   tile state only on request (arch_prctl), once per process. */
#define HAVE_AMX 1
static int amx_state = -1; /* -1: not asked yet */
static int amx_ready(void) {
    int s = __atomic_load_n(&amx_state, __ATOMIC_ACQUIRE);
    if (s < 0) {
        s = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
        __atomic_store_n(&amx_state, s, __ATOMIC_RELEASE);
    }
    return s;
}

struct tile_config { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; };

/* The configuration last loaded on this thread (tokens of the two column tiles, a * 64 + b);
   -1 at the start of every call: torch's oneDNN may have used the tiles on this thread since. */
static __thread int amx_config = -1;

/* Tiles 0-1: the two 16-row halves' sums for tokens i0 .. i0 + na - 1, 5-6: for the next nb
   tokens; 2-3: the halves' weights; 4, 7: the two token groups' activations (pairs). */
static void amx_configure(int na, int nb) {
    if (amx_config == na * 64 + nb) return;
    struct tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    int cols[8] = {4 * na, 4 * na, 64, 64, 4 * na, 4 * nb, 4 * nb, 4 * nb};
    for (int t = 0; t < 8; t++)
        if (cols[t]) { c.rows[t] = 16; c.colsb[t] = cols[t]; }
    _tile_loadconfig(&c);
    amx_config = na * 64 + nb;
}

/* out[r * AMX_PASS + i - i0] = w_r . x_i (the tiles store their rows there) for the 32 rows of w
   (row stride K) and the tokens i0 <= i < i0 + nc (nc <= AMX_PASS) of an expert's n, K a multiple
   of 32; xv holds the n tokens in pairs, [K / 2][n][2]. Each pass over the rows serves 32 tokens:
   more tokens take more passes, the rows then read again from the core's L2. */
static void amx_rows32(const uint16_t *w, const uint16_t *xv, int n, int i0, int nc, int K, float *out) {
    int na = nc < 16 ? nc : 16, nb = nc - na;
    amx_configure(na, nb);
    _tile_zero(0);
    _tile_zero(1);
    if (nb) { _tile_zero(5); _tile_zero(6); }
    const uint16_t *xa = xv + (size_t)i0 * 2;
    for (int k = 0; k < K; k += 32) {
        _tile_loadd(2, w + k, K * 2);
        _tile_loadd(3, w + (size_t)16 * K + k, K * 2);
        _tile_loadd(4, xa + (size_t)k * n, 4 * n);
        _tile_dpbf16ps(0, 2, 4);
        _tile_dpbf16ps(1, 3, 4);
        if (nb) {
            _tile_loadd(7, xa + (size_t)k * n + 32, 4 * n);
            _tile_dpbf16ps(5, 2, 7);
            _tile_dpbf16ps(6, 3, 7);
        }
    }
    _tile_stored(0, out, AMX_PASS * 4);
    _tile_stored(1, out + 16 * AMX_PASS, AMX_PASS * 4);
    if (nb) {
        _tile_stored(5, out + 16, AMX_PASS * 4);
        _tile_stored(6, out + 16 * AMX_PASS + 16, AMX_PASS * 4);
    }
}
#define amx_release() (_tile_release(), amx_config = -1)
#else
#define HAVE_AMX 0
static int amx_ready(void) { return 0; }
static void amx_rows32(const uint16_t *w, const uint16_t *xv, int n, int i0, int nc, int K, float *out) {
    (void)w; (void)xv; (void)n; (void)i0; (void)nc; (void)K; (void)out;
}
#define amx_release() ((void)0)
#endif
#ifndef AMX_MIN_TOKENS /* an expert's tokens from which AMX computes its rows (-D to try others) */
#define AMX_MIN_TOKENS 4
#endif

/* w_r . x_i for rows r < rb <= UNIT of w (row stride K) and tokens i0 <= i < i0 + nc of an
   expert's n: with AMX (xv, the n tokens in pairs, given; nc <= AMX_PASS) in one call, into
   out[r * AMX_PASS + i - i0]; else (i0 = 0, nc = n <= MAXN) four rows at a time from x [n, K],
   into out[i * UNIT + r] */
static void block_dot(const uint16_t *w, int rb, const act_t *x, const uint16_t *xv, int n, int i0, int nc, int K,
                      float *out) {
    if (xv) {
        amx_rows32(w, xv, n, i0, nc, K, out);
        return;
    }
    float t[MAXN * 4];
    for (int s = 0; s < rb; s += 4) {
        int q = rb - s < 4 ? rb - s : 4;
        rows_dot(w + (size_t)s * K, q, x, n, K, t);
        for (int i = 0; i < n; i++)
            for (int r = 0; r < q; r++) out[i * UNIT + s + r] = t[i * 4 + r];
    }
}

/* 32-bit pairs of bf16 values (the tiles' layout), read and written through any pointer */
typedef uint32_t pair_t __attribute__((may_alias));

/* the hidden value of a row: silu(gate) * up, or gelu(gate) without an up projection */
static inline float hidden(float g, float u, int glu) {
    return glu ? g / (1.f + expf(-g)) * u : 0.5f * g * (1.f + erff(g * 0.70710678f));
}

#if HAVE_AMX
/* AMX experts' epilogues, 16 lanes at a time (a scalar expf per value cost as much as reading the
   weights once a pass serves 32 tokens). exp(x) = 2^t, t = x log2(e): 2^(t - round(t)) by its
   Taylor polynomial to degree 6 (relative error about 1e-7, far below bf16's), scaled by 2^round(t). */
static inline __m512 exp16(__m512 x) {
    __m512 t = _mm512_mul_ps(_mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-88.f)),
                             _mm512_set1_ps(1.44269504f));
    __m512 k = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), f = _mm512_sub_ps(t, k);
    static const float c[7] = {1.f, 0.693147181f, 0.240226507f, 0.0555041087f, 0.00961812911f, 0.00133335581f,
                               0.000154035304f};
    __m512 p = _mm512_set1_ps(c[6]);
    for (int q = 5; q >= 0; q--) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[q]));
    return _mm512_scalef_ps(p, k);
}

static inline __m512 silu_mul16(__m512 g, __m512 u) {
    __m512 sigmoid_inv = _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)));
    return _mm512_mul_ps(_mm512_div_ps(g, sigmoid_inv), u);
}

/* The hidden of a pass's 32 rows and nc tokens, silu(a) * b (a, b: the gate's and up's sums as
   the tiles stored them, [32][AMX_PASS]), as bf16 pairs (rows 2p, 2p + 1) of the hidden [F / 2][n]
   in pairs: row pair p of these tokens at hp[p * n], 16 tokens a store. */
static void amx_hidden_pairs(const float *a, const float *b, int nc, pair_t *hp, int n) {
    for (int q = 0; q < nc; q += 16) {
        __mmask16 m = nc - q >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (nc - q)) - 1u);
        for (int p = 0; p < 16; p++) {
            const float *a0 = a + 2 * p * AMX_PASS + q, *b0 = b + 2 * p * AMX_PASS + q;
            __m512 h0 = silu_mul16(_mm512_maskz_loadu_ps(m, a0), _mm512_maskz_loadu_ps(m, b0));
            __m512 h1 = silu_mul16(_mm512_maskz_loadu_ps(m, a0 + AMX_PASS), _mm512_maskz_loadu_ps(m, b0 + AMX_PASS));
            __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(h0));
            __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(h1));
            __m512i pairs = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
            _mm512_mask_storeu_epi32((void *)(hp + (size_t)p * n + q), m, pairs);
        }
    }
}

/* token i's 32 outputs (a as the tiles stored it, [32][AMX_PASS]) to bf16 at y */
static inline void amx_out_row(const float *a, int i, uint16_t *y) {
    __m512i at = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                    _mm512_set1_epi32(AMX_PASS));
    __m512 lo = _mm512_i32gather_ps(at, a + i, 4), hi = _mm512_i32gather_ps(at, a + 16 * AMX_PASS + i, 4);
    _mm512_storeu_si512((void *)y, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}
#endif

/* Many experts in one parallel region: expert j (weights at index experts[j] of w1, w3 [E, F, D]
   and w2 [E, D, F]; w3 NULL: GeLU) takes the rows start[j] .. start[j] + count[j] - 1 of x [N, D]
   and writes the same rows of y; all bf16. Threads take blocks of weight rows: 32 where AMX
   computes them (at least AMX_MIN_TOKENS tokens, D and F multiples of 32; any number of tokens,
   AMX_PASS at a time), else 4 (at most MAXN tokens). One region and one barrier for a layer's CPU
   experts instead of one region and two barriers per expert: waking the threads costs tens of
   microseconds, as long as reading a small expert's weights. 0 = done. */
int experts_mlp_bf16(const uint16_t *x, const uint16_t *w1, const uint16_t *w3, const uint16_t *w2,
                     uint16_t *y, const int *experts, const int *start, const int *count, int m, int N,
                     int D, int F, int threads) {
    if (m < 1) return 0;
    int amx_shape = HAVE_AMX && D % 32 == 0 && F % 32 == 0 && amx_ready();
    for (int j = 0; j < m; j++)
        if (count[j] < 1 || start[j] < 0 || start[j] + count[j] > N ||
            (count[j] > MAXN && !(amx_shape && count[j] >= AMX_MIN_TOKENS))) return 1;
    act_t *xa = malloc(sizeof(act_t) * (size_t)N * D), *h = malloc(sizeof(act_t) * (size_t)N * F);
    uint16_t *xv = HAVE_AMX ? malloc(sizeof(uint16_t) * (size_t)N * D) : NULL;
    int *amx = malloc(sizeof(int) * (size_t)m), *up0 = malloc(sizeof(int) * (size_t)(m + 1)),
        *dn0 = malloc(sizeof(int) * (size_t)(m + 1));
    if (!xa || !h || (HAVE_AMX && !xv) || !amx || !up0 || !dn0) {
        free(xa); free(h); free(xv); free(amx); free(up0); free(dn0);
        return 2;
    }
    up0[0] = dn0[0] = 0;
    for (int j = 0; j < m; j++) {  /* expert j's blocks are up0[j] .. up0[j + 1] - 1 (dn0: down) */
        amx[j] = amx_shape && count[j] >= AMX_MIN_TOKENS;
        int rows = amx[j] ? UNIT : 4;
        up0[j + 1] = up0[j] + (F + rows - 1) / rows;
        dn0[j + 1] = dn0[j] + (D + rows - 1) / rows;
    }
    const size_t FD = (size_t)F * D;
#pragma omp parallel num_threads(threads)
    {
        float a[AMX_PASS * UNIT], b[AMX_PASS * UNIT];
#if HAVE_AMX
        amx_config = -1;
#endif
        /* the activations as the paths take them, 32 columns of an expert's rows at a time: in
           pairs for the tiles (a transpose of 32-bit pairs into [D / 2][n]), else converted by row */
#pragma omp for collapse(2) schedule(static)
        for (int j = 0; j < m; j++)
            for (int k0 = 0; k0 < D; k0 += 32) {
                int n = count[j], k1 = D - k0 < 32 ? D : k0 + 32;
                const uint16_t *xj = x + (size_t)start[j] * D;
                if (amx[j]) {
                    const pair_t *src = (const pair_t *)(const void *)xj;
                    pair_t *dst = (pair_t *)(void *)(xv + (size_t)start[j] * D);
                    for (int i = 0; i < n; i++)
                        for (int kp = k0 / 2; kp < k1 / 2; kp++)
                            dst[(size_t)kp * n + i] = src[(size_t)i * (D / 2) + kp];
                } else {
                    for (int i = 0; i < n; i++)
                        for (int k = k0; k < k1; k++)
                            xa[(size_t)(start[j] + i) * D + k] = to_act(bf2f(xj[(size_t)i * D + k]));
                }
            }
        int j = 0;
#pragma omp for schedule(static)
        for (int u = 0; u < up0[m]; u++) {
            while (u >= up0[j + 1]) j++;
            while (u < up0[j]) j--;
            int rows = amx[j] ? UNIT : 4, f0 = (u - up0[j]) * rows, rb = F - f0 < rows ? F - f0 : rows;
            int r0 = start[j], n = count[j], pass = amx[j] ? AMX_PASS : n;
            size_t e = (size_t)experts[j];
            const uint16_t *xvj = amx[j] ? xv + (size_t)r0 * D : NULL;
            for (int i0 = 0; i0 < n; i0 += pass) {
                int nc = n - i0 < pass ? n - i0 : pass;
                block_dot(w1 + e * FD + (size_t)f0 * D, rb, xa + (size_t)r0 * D, xvj, n, i0, nc, D, a);
                if (w3) block_dot(w3 + e * FD + (size_t)f0 * D, rb, xa + (size_t)r0 * D, xvj, n, i0, nc, D, b);
#if HAVE_AMX
                if (amx[j] && w3) {
                    amx_hidden_pairs(a, b, nc, (pair_t *)(void *)(h + (size_t)r0 * F) + (size_t)(f0 >> 1) * n + i0, n);
                } else
#endif
                if (amx[j]) {  /* GeLU: two rows' values of a token make one pair of the hidden [F / 2][n] */
                    pair_t *hp = (pair_t *)(void *)(h + (size_t)r0 * F);
                    for (int r = 0; r < rb; r += 2)
                        for (int i = 0; i < nc; i++)
                            hp[(size_t)((f0 + r) >> 1) * n + i0 + i] =
                                (pair_t)f2bf(hidden(a[r * AMX_PASS + i], 0.f, 0)) |
                                (pair_t)f2bf(hidden(a[(r + 1) * AMX_PASS + i], 0.f, 0)) << 16;
                } else {
                    for (int i = 0; i < nc; i++)
                        for (int r = 0; r < rb; r++)
                            h[(size_t)(r0 + i) * F + f0 + r] =
                                to_act(hidden(a[i * UNIT + r], w3 ? b[i * UNIT + r] : 0.f, w3 != NULL));
                }
            }
        }
        j = 0;
#pragma omp for schedule(static)
        for (int u = 0; u < dn0[m]; u++) {
            while (u >= dn0[j + 1]) j++;
            while (u < dn0[j]) j--;
            int rows = amx[j] ? UNIT : 4, d0 = (u - dn0[j]) * rows, rb = D - d0 < rows ? D - d0 : rows;
            int r0 = start[j], n = count[j], pass = amx[j] ? AMX_PASS : n;
            const act_t *hj = h + (size_t)r0 * F;
            const uint16_t *hv = amx[j] ? (const uint16_t *)hj : NULL; /* the hidden in pairs for the tiles */
            for (int i0 = 0; i0 < n; i0 += pass) {
                int nc = n - i0 < pass ? n - i0 : pass;
                block_dot(w2 + (size_t)experts[j] * FD + (size_t)d0 * F, rb, hj, hv, n, i0, nc, F, a);
#if HAVE_AMX
                if (amx[j]) {
                    for (int i = 0; i < nc; i++) amx_out_row(a, i, y + (size_t)(r0 + i0 + i) * D + d0);
                    continue;
                }
#endif
                for (int i = 0; i < nc; i++)
                    for (int r = 0; r < rb; r++) y[(size_t)(r0 + i0 + i) * D + d0 + r] = f2bf(a[i * UNIT + r]);
            }
        }
        if (amx_shape) amx_release();
    }
    free(xa); free(h); free(xv); free(amx); free(up0); free(dn0);
    return 0;
}

/* The path experts_mlp_bf16 takes for an expert of enough tokens at these dims: 2 AMX tiles,
   1 bf16 dot products, 0 float32 FMAs */
int kernel_path(int D, int F) {
    if (HAVE_AMX && D % 32 == 0 && F % 32 == 0 && amx_ready()) return 2;
#if defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}

int amx_min_tokens(void) { return AMX_MIN_TOKENS; }

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* The CPU lane of forwards that run on the device alone (fsmoe/infer/hybrid/mailbox.py). For every
   layer l the GPU writes its rows x [R, D], token counts [E] and this forward's CPU experts
   (cpu [l * E + e] set) into pinned memory, then raises seq_in[l * 8]; this loop sees it move,
   computes those experts on their rows, writes y [R, D] (0 in every other row) and publishes seq_out[l * 8] = seq_in (-seq_in
   if the experts could not run), which the GPU waits for. The numbers sit 64 bytes apart and start
   at 0. Runs until *stop; spins while layers arrive, then sleeps 20 us at a time. */
int serve_mailbox(int L, int E, int D, int F, int R, const uint16_t *const *w1, const uint16_t *const *w3,
                  const uint16_t *const *w2, const uint8_t *cpu, const int32_t *counts, const uint16_t *x,
                  uint16_t *y, int64_t *seq_in, int64_t *seq_out, const int32_t *stop, int threads) {
    int64_t *last = malloc(sizeof(int64_t) * (size_t)L);
    int *experts = malloc(sizeof(int) * (size_t)E), *start = malloc(sizeof(int) * (size_t)E),
        *count = malloc(sizeof(int) * (size_t)E);
    if (!last || !experts || !start || !count) { free(last); free(experts); free(start); free(count); return 2; }
    /* numbers start at 0: a layer posted before this thread got here is still served */
    for (int l = 0; l < L; l++) last[l] = 0;
    long idle = 0;
    while (!__atomic_load_n(stop, __ATOMIC_ACQUIRE)) {
        int worked = 0;
        for (int l = 0; l < L; l++) {
            int64_t s = __atomic_load_n(&seq_in[(size_t)l * 8], __ATOMIC_ACQUIRE);
            if (s == last[l]) continue;
            last[l] = s;
            worked = 1;
            const int32_t *c = counts + (size_t)l * E;
            int m = 0, n = 0;
            for (int e = 0; e < E; e++) {
                if (c[e] > 0 && cpu[(size_t)l * E + e]) { experts[m] = e; start[m] = n; count[m] = c[e]; m++; }
                if (c[e] > 0) n += c[e];
            }
            uint16_t *yl = y + (size_t)l * R * D;
            int rc = n > R ? 3 : 0;
            if (!rc) {
                memset(yl, 0, sizeof(uint16_t) * (size_t)n * D);
                rc = experts_mlp_bf16(x + (size_t)l * R * D, w1[l], w3 ? w3[l] : NULL, w2[l], yl, experts, start,
                                      count, m, n, D, F, threads);
            }
            __atomic_store_n(&seq_out[(size_t)l * 8], rc ? -s : s, __ATOMIC_RELEASE);
        }
        if (worked) {
            idle = 0;
        } else if (++idle > 20000) {
            struct timespec ts = {0, 20000};
            nanosleep(&ts, NULL);
        } else {
            cpu_relax();
        }
    }
    free(last); free(experts); free(start); free(count);
    return 0;
}
