/* int4 (or int8) weights x int8 activations on CPU: integer dot products (AVX-512 VNNI, or AVX2 maddubs).
 *
 * Why: torch's weight-only int4 CPU op re-expands the weights for every row, so its cost grows
 * linearly with the number of rows (M), and at M = 8 it is no faster than a bf16 GEMM on AMX hosts.
 * Here the activations are quantized per row to int8 in blocks of 32 (absmax scale, the way
 * llama.cpp's Q8 activations are), and each 64-byte load of packed weights feeds up to 8 rows.
 *
 * Math (per output n, weight group g of G columns, activation block b of 32 columns):
 *   codes u = q + 8 in [0, 15], weight w = s[n,g] * (u - 8 - z[n,g])
 *   x_hat[m,k] = d[m,b] * xq[m,k], xq in [-127, 127], d = absmax / 127
 *   out[m,n] = sum_g ( s * sum_{b in g} d[m,b] * sum_{k in b} xq*u ) - s*(8+z) * sum_{k in g} x_hat[m,k]
 *
 * Packed weight layout: tiles of 16 outputs; per tile, K/8 chunks of 64 bytes; byte 4*l + i of chunk p
 * holds u[16t + l, 8p + i] in its low nibble and u[16t + l, 8p + 4 + i] in its high nibble, so one
 * 64-byte load gives two 16-lane x 4-column blocks for vpdpbusd.
 * scale and zterm (= s * (8 + z)) are float32 [N/16][G groups][16].
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 32      /* activation quantization block (columns) */
#define TILE 16       /* outputs per tile */
#define MAX_ROWS 8    /* rows sharing one weight load */

__attribute__((target("avx2,fma"))) static inline float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Row m of x, as float32, into dst[K]. dtype: 0 float32, 1 bfloat16. */
__attribute__((target("avx2,fma"))) static void load_row(const void *x, int dtype, int64_t m, int64_t K, float *dst) {
    if (dtype == 0) {
        memcpy(dst, (const float *)x + m * K, (size_t)K * sizeof(float));
    } else {
        const uint16_t *src = (const uint16_t *)x + m * K;
        for (int64_t k = 0; k < K; ++k) dst[k] = bf16_to_float(src[k]);
    }
}

/* Per row: int8 codes, one scale per block, and per weight group the sum of the dequantized x.
 * Compiled for AVX2 (both kernel paths imply it) so the loops vectorise. */
__attribute__((target("avx2,fma"))) static void quantize_rows(const void *x, int dtype, int64_t M, int64_t K, int64_t G, int8_t *xq, float *d,
                          float *xsum) {
    const int64_t nb = K / BLOCK, ng = (K + G - 1) / G, bpg = G / BLOCK;
#pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
        float *row = (float *)malloc((size_t)K * sizeof(float));
        load_row(x, dtype, m, K, row);
        for (int64_t b = 0; b < nb; ++b) {
            const float *xb = row + b * BLOCK;
            float amax = 0.0f;
            for (int i = 0; i < BLOCK; ++i) amax = fmaxf(amax, fabsf(xb[i]));
            const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
            float v[BLOCK];
            int32_t isum = 0;
            for (int i = 0; i < BLOCK; ++i) v[i] = __builtin_rintf(xb[i] / scale); /* round half to even */
            for (int i = 0; i < BLOCK; ++i) {
                xq[m * K + b * BLOCK + i] = (int8_t)v[i];
                isum += (int32_t)v[i];
            }
            d[m * nb + b] = scale;
            if (b % bpg == 0) xsum[m * ng + b / bpg] = 0.0f;
            xsum[m * ng + b / bpg] += scale * (float)isum;
        }
        free(row);
    }
}

/* ---- AVX-512 VNNI ---------------------------------------------------------------------------- */
#define ALWAYS_INLINE __attribute__((always_inline)) static inline
/* `rows` is a compile-time constant at every call site (see the switch in w4a8_mm), so the per-row
 * accumulators stay in registers. */
__attribute__((target("avx512f,avx512bw,avx512vnni"))) ALWAYS_INLINE void tile_avx512(
    const uint8_t *wt, const float *st, const float *zt, const int8_t *xq, const float *d, const float *xsum,
    float *out, int64_t m0, int rows, int64_t K, int64_t G, int64_t N, int64_t n0, int bits) {
    const int64_t nb = K / BLOCK, ng = (K + G - 1) / G, bpg = G / BLOCK;
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 accf[MAX_ROWS];
    for (int r = 0; r < rows; ++r) accf[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
        const __m512 s = _mm512_loadu_ps(st + g * TILE);
        for (int64_t bb = 0; bb < bpg && g * bpg + bb < nb; ++bb) { /* the last group may be short */
            const int64_t b = g * bpg + bb, k0 = b * BLOCK;
            __m512i acci[MAX_ROWS], accj[MAX_ROWS]; /* two chains per row: vpdpbusd latency */
            for (int r = 0; r < rows; ++r) acci[r] = accj[r] = _mm512_setzero_si512();
            for (int p = 0; p < BLOCK / 8; ++p) { /* columns k0 + 8p .. +3 (wl) and +4 .. +7 (wh) */
                __m512i wl, wh;
                if (bits == 4) {
                    const __m512i w = _mm512_loadu_si512((const void *)(wt + (k0 / 8 + p) * 64));
                    wl = _mm512_and_si512(w, low);
                    wh = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
                } else { /* 8 bits: one 64-byte chunk per 4 columns */
                    wl = _mm512_loadu_si512((const void *)(wt + (k0 / 4 + 2 * p) * 64));
                    wh = _mm512_loadu_si512((const void *)(wt + (k0 / 4 + 2 * p + 1) * 64));
                }
                for (int r = 0; r < rows; ++r) {
                    const int8_t *xr = xq + (m0 + r) * K + k0 + 8 * p;
                    int32_t a, c;
                    memcpy(&a, xr, 4);
                    memcpy(&c, xr + 4, 4);
                    acci[r] = _mm512_dpbusd_epi32(acci[r], wl, _mm512_set1_epi32(a));
                    accj[r] = _mm512_dpbusd_epi32(accj[r], wh, _mm512_set1_epi32(c));
                }
            }
            for (int r = 0; r < rows; ++r) {
                const __m512 ds = _mm512_mul_ps(s, _mm512_set1_ps(d[(m0 + r) * nb + b]));
                const __m512i sum = _mm512_add_epi32(acci[r], accj[r]);
                accf[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), ds, accf[r]);
            }
        }
        const __m512 z = _mm512_loadu_ps(zt + g * TILE);
        for (int r = 0; r < rows; ++r)
            accf[r] = _mm512_fnmadd_ps(_mm512_set1_ps(xsum[(m0 + r) * ng + g]), z, accf[r]);
    }
    for (int r = 0; r < rows; ++r) _mm512_storeu_ps(out + (m0 + r) * N + n0, accf[r]);
}

/* ---- AVX2 ------------------------------------------------------------------------------------ */
/* The same layout, one 8-lane half of a tile at a time (vpmaddubsw + vpmaddwd instead of vpdpbusd). */
#define AVX2_ROWS 4
__attribute__((target("avx2,fma"))) ALWAYS_INLINE void half_avx2(
    const uint8_t *wt, const float *st, const float *zt, const int8_t *xq, const float *d, const float *xsum,
    float *out, int64_t m0, int rows, int64_t K, int64_t G, int64_t N, int64_t n0, int half) {
    const int64_t nb = K / BLOCK, ng = (K + G - 1) / G, bpg = G / BLOCK;
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 accf[AVX2_ROWS];
    for (int r = 0; r < rows; ++r) accf[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
        const __m256 s = _mm256_loadu_ps(st + g * TILE + 8 * half);
        for (int64_t bb = 0; bb < bpg && g * bpg + bb < nb; ++bb) { /* the last group may be short */
            const int64_t b = g * bpg + bb, k0 = b * BLOCK;
            __m256i acci[AVX2_ROWS];
            for (int r = 0; r < rows; ++r) acci[r] = _mm256_setzero_si256();
            for (int p = 0; p < BLOCK / 8; ++p) {
                const __m256i w = _mm256_loadu_si256((const __m256i *)(wt + (k0 / 8 + p) * 64 + 32 * half));
                const __m256i wl = _mm256_and_si256(w, low);
                const __m256i wh = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
                for (int r = 0; r < rows; ++r) {
                    const int8_t *xr = xq + (m0 + r) * K + k0 + 8 * p;
                    int32_t a, c;
                    memcpy(&a, xr, 4);
                    memcpy(&c, xr + 4, 4);
                    const __m256i pl = _mm256_maddubs_epi16(wl, _mm256_set1_epi32(a));
                    const __m256i ph = _mm256_maddubs_epi16(wh, _mm256_set1_epi32(c));
                    acci[r] = _mm256_add_epi32(acci[r], _mm256_madd_epi16(_mm256_add_epi16(pl, ph), ones));
                }
            }
            for (int r = 0; r < rows; ++r) {
                const __m256 ds = _mm256_mul_ps(s, _mm256_set1_ps(d[(m0 + r) * nb + b]));
                accf[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acci[r]), ds, accf[r]);
            }
        }
        const __m256 z = _mm256_loadu_ps(zt + g * TILE + 8 * half);
        for (int r = 0; r < rows; ++r)
            accf[r] = _mm256_fnmadd_ps(_mm256_set1_ps(xsum[(m0 + r) * ng + g]), z, accf[r]);
    }
    for (int r = 0; r < rows; ++r) _mm256_storeu_ps(out + (m0 + r) * N + n0 + 8 * half, accf[r]);
}

#define TILE_ARGS wt, st, zt, xq, d, xsum, out, m0
#define CASE512(R, B) case R: tile_avx512(TILE_ARGS, R, K, G, N, n0, B); break;
#define ROWS512(B) CASE512(1, B) CASE512(2, B) CASE512(3, B) CASE512(4, B) CASE512(5, B) CASE512(6, B) \
    CASE512(7, B) CASE512(8, B)
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void run_avx512(
    const uint8_t *wt, const float *st, const float *zt, const int8_t *xq, const float *d, const float *xsum,
    float *out, int64_t m0, int rows, int64_t K, int64_t G, int64_t N, int64_t n0, int bits) {
    if (bits == 4) {
        switch (rows) { ROWS512(4) }
    } else {
        switch (rows) { ROWS512(8) }
    }
}

#define CASE2(R) case R: half_avx2(TILE_ARGS, R, K, G, N, n0, 0); half_avx2(TILE_ARGS, R, K, G, N, n0, 1); break;
__attribute__((target("avx2,fma"))) static void run_avx2(
    const uint8_t *wt, const float *st, const float *zt, const int8_t *xq, const float *d, const float *xsum,
    float *out, int64_t m0, int rows, int64_t K, int64_t G, int64_t N, int64_t n0) {
    switch (rows) { CASE2(1) CASE2(2) CASE2(3) CASE2(4) }
}

/* 2 = AVX-512 VNNI, 1 = AVX2, 0 = neither (the caller must not call w4a8_mm). */
int w4a8_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vnni"))
        return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
    return 0;
}

/* out[M, N] (float32) = x[M, K] @ W^T. Needs K % 32 == 0, G % 32 == 0 (the last group may be short), N % 16 == 0; isa as w4a8_isa();
 * bits 4, or 8 (AVX-512 VNNI only: vpmaddubsw would saturate on 8-bit codes). For 8 bits the codes
 * are u = q + 128, one byte each, 64-byte chunks of 16 outputs x 4 columns. */
int w4a8_mm(const void *x, int dtype, int64_t M, int64_t K, int64_t N, int64_t G, const uint8_t *wp,
            const float *scale, const float *zterm, float *out, int isa, int bits) {
    if (K % BLOCK || G % BLOCK || N % TILE || isa < 1 || isa > 2) return 1;
    if (bits != 4 && !(bits == 8 && isa == 2)) return 3;
    const int64_t nb = K / BLOCK, ng = (K + G - 1) / G, tiles = N / TILE;
    int8_t *xq = (int8_t *)malloc((size_t)(M * K));
    float *d = (float *)malloc((size_t)(M * nb) * sizeof(float));
    float *xsum = (float *)malloc((size_t)(M * ng) * sizeof(float));
    if (!xq || !d || !xsum) {
        free(xq), free(d), free(xsum);
        return 2;
    }
    quantize_rows(x, dtype, M, K, G, xq, d, xsum);
    const int chunk = isa == 2 ? MAX_ROWS : AVX2_ROWS;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
        const uint8_t *wt = wp + t * (K / (bits == 4 ? 8 : 4)) * 64;
        const float *st = scale + t * ng * TILE, *zt = zterm + t * ng * TILE;
        for (int64_t m0 = 0; m0 < M; m0 += chunk) {
            const int rows = (int)(M - m0 < chunk ? M - m0 : chunk);
            if (isa == 2)
                run_avx512(wt, st, zt, xq, d, xsum, out, m0, rows, K, G, N, t * TILE, bits);
            else
                run_avx2(wt, st, zt, xq, d, xsum, out, m0, rows, K, G, N, t * TILE);
        }
    }
    free(xq), free(d), free(xsum);
    return 0;
}
