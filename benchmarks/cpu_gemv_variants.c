/* Ways to read bf16 weight rows from DRAM and dot them with n tokens on the CPU (a decode step's
   expert matrix-vector products), against the machine's plain read bandwidth.

   Each call streams one block of R rows x K columns (an expert's worth of weights, 9 MiB by
   default), one OpenMP region per call as the engine's kernel does, the blocks taken in turn from
   a buffer larger than the last-level cache. Prints GB/s of weights read per variant.

     cc -O3 -march=native -fopenmp -o /tmp/gemv benchmarks/cpu_gemv_variants.c -lm
     /tmp/gemv [threads] [tokens] [blocks]

   Variants:
     read     sum the block's 64-byte lines (no arithmetic on them): the ceiling
     cvt1     bf16 -> fp32 in registers, fp32 FMA, x fp32; one row at a time (the engine's kernel)
     cvt4     the same, four rows at a time (each x load serves four rows)
     dp1      AVX512-BF16 dot products (vdpbf16ps), x rounded to bf16 once; one row at a time
     dp4      the same, four rows at a time
*/
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define MAXN 16

static inline __m512 cvt16(const uint16_t *w) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)w)), 16));
}

static float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

/* out[i * R + r] for rows r0..r0+RB-1, tokens i < n; x fp32 [n, K] or bf16 [n, K] */
static void cvt_rows(const uint16_t *w, int RB, const float *x, int n, int K, float *out, int ostride) {
    for (int i0 = 0; i0 < n; i0 += 4) {
        int nn = n - i0 < 4 ? n - i0 : 4;
        __m512 acc[4][4];
        for (int r = 0; r < RB; r++)
            for (int i = 0; i < nn; i++) acc[r][i] = _mm512_setzero_ps();
        for (int k = 0; k < K; k += 16) {
            __m512 xv[4];
            for (int i = 0; i < nn; i++) xv[i] = _mm512_loadu_ps(x + (size_t)(i0 + i) * K + k);
            for (int r = 0; r < RB; r++) {
                __m512 wv = cvt16(w + (size_t)r * K + k);
                for (int i = 0; i < nn; i++) acc[r][i] = _mm512_fmadd_ps(wv, xv[i], acc[r][i]);
            }
        }
        for (int r = 0; r < RB; r++)
            for (int i = 0; i < nn; i++) out[(size_t)(i0 + i) * ostride + r] = hsum(acc[r][i]);
    }
}

static void dp_rows(const uint16_t *w, int RB, const uint16_t *x, int n, int K, float *out, int ostride) {
    for (int i0 = 0; i0 < n; i0 += 4) {
        int nn = n - i0 < 4 ? n - i0 : 4;
        __m512 acc[4][4];
        for (int r = 0; r < RB; r++)
            for (int i = 0; i < nn; i++) acc[r][i] = _mm512_setzero_ps();
        for (int k = 0; k < K; k += 32) {
            __m512i xv[4];
            for (int i = 0; i < nn; i++) xv[i] = _mm512_loadu_si512((const void *)(x + (size_t)(i0 + i) * K + k));
            for (int r = 0; r < RB; r++) {
                __m512i wv = _mm512_loadu_si512((const void *)(w + (size_t)r * K + k));
                for (int i = 0; i < nn; i++)
                    acc[r][i] = _mm512_dpbf16_ps(acc[r][i], (__m512bh)wv, (__m512bh)xv[i]);
            }
        }
        for (int r = 0; r < RB; r++)
            for (int i = 0; i < nn; i++) out[(size_t)(i0 + i) * ostride + r] = hsum(acc[r][i]);
    }
}

enum { READ, CVT1, CVT4, DP1, DP4, NV };
static const char *names[NV] = {"read", "cvt1", "cvt4", "dp1", "dp4"};

static double run(int v, const uint16_t *W, size_t blocks, int R, int K, const float *xf, const uint16_t *xb,
                  int n, float *out, int threads, int calls) {
    volatile uint64_t sink = 0;
    double t0 = 0;
    for (int c = -2; c < calls; c++) {
        if (c == 0) t0 = omp_get_wtime();
        const uint16_t *blk = W + (size_t)((c + 2) % blocks) * R * K;
#pragma omp parallel num_threads(threads)
        {
            uint64_t s = 0;
            int RB = (v == CVT4 || v == DP4) ? 4 : 1;
#pragma omp for schedule(static)
            for (int r = 0; r < R; r += RB) {
                const uint16_t *w = blk + (size_t)r * K;
                if (v == READ) {
                    __m512i a = _mm512_setzero_si512();
                    for (int k = 0; k < K; k += 32) a = _mm512_xor_si512(a, _mm512_loadu_si512((const void *)(w + k)));
                    s += (uint64_t)_mm512_reduce_add_epi64(a);
                } else if (v == CVT1 || v == CVT4) {
                    cvt_rows(w, RB, xf, n, K, out + r, R);
                } else {
                    dp_rows(w, RB, xb, n, K, out + r, R);
                }
            }
            if (s) sink += s;
        }
    }
    (void)sink;
    return (omp_get_wtime() - t0) / calls;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : omp_get_max_threads();
    int n = argc > 2 ? atoi(argv[2]) : 1;
    size_t blocks = argc > 3 ? (size_t)atol(argv[3]) : 96;
    int huge = argc > 4 ? atoi(argv[4]) : 0;
    const int R = 2304, K = 2048; /* 9 MiB: w1, w3 [768, 2048] and w2 as 768 rows of 2048 */
    size_t bytes = blocks * R * K * 2;
    uint16_t *W = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (W == MAP_FAILED) return 1;
    madvise(W, bytes, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
#pragma omp parallel for num_threads(threads)
    for (size_t j = 0; j < bytes / 2; j++) W[j] = (uint16_t)(0x3f80 + (j * 2654435761u >> 25));
    float *xf = malloc(sizeof(float) * MAXN * K), *out = malloc(sizeof(float) * MAXN * R);
    uint16_t *xb = malloc(2 * MAXN * K);
    for (int j = 0; j < MAXN * K; j++) { xf[j] = 1.0f / (1 + j % 7); uint32_t u; memcpy(&u, &xf[j], 4); xb[j] = u >> 16; }
    int calls = (int)blocks * 3;
    printf("threads %d, tokens %d, %zu blocks of %.1f MiB, %s pages\n", threads, n, blocks, R * K * 2 / 1048576.0,
           huge ? "2 MiB" : "4 KiB");
    for (int v = 0; v < NV; v++) {
        double s = run(v, W, blocks, R, K, xf, xb, n, out, threads, calls);
        printf("  %-5s %8.3f ms  %6.1f GB/s\n", names[v], s * 1e3, R * (double)K * 2 / s / 1e9);
    }
    return 0;
}
