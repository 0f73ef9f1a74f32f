/* cpu_sparse_packed: activation sparsity over packed int4 / int8 weights, batch 1 (docs in
   act_sparse_packed.py). Plain C, no torch headers: built as a shared library for ctypes, and linked
   into the torch operator of act_sparse_packed_op.cpp. Compiled with -mavx512f -mavx512bw it uses
   AVX-512 intrinsics; otherwise the plain loops, which the compiler vectorises for AVX2. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define USE_AVX512 1
#else
#define USE_AVX512 0  /* the plain C loops below; the compiler vectorises them for AVX2 */
#endif
#define PREFETCH_AHEAD 16  /* kept rows prefetched ahead: they are scattered, no hardware prefetcher
                              follows them (8 and 32 measured no better); each group's scales too */

static float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

static uint16_t f32_to_bf16(float f) {  /* round to nearest even; NaN stays NaN */
  uint32_t u; memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

/* rows (ascending) of the `keep` largest scores; among equal scores the lower index wins.
   Scores are >= +0 (abs, times norms), so their bits order like unsigned integers: a radix select
   (8 bits per pass, high byte first, over the shrinking candidate set) finds the bits t of the
   keep-th largest score without data-dependent branches, which cost a quickselect several
   microseconds per call in mispredictions; one pass then collects the rows above t and the first ties. */
static int64_t select_rows(const float* score, int64_t k, int64_t keep, uint32_t* cand, int32_t* rows) {
  const uint32_t* bits = (const uint32_t*)score;
  const uint32_t* src = bits;
  int64_t ncand = k, need = keep;  /* the answer is the need-th largest candidate */
  uint32_t prefix = 0, pmask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    uint32_t hist[256] = {0}, top = 0;
    for (int64_t i = 0; i < ncand; ++i) {
      const uint32_t d = (src[i] >> shift) & 255u;
      hist[d]++; top = d > top ? d : top;
    }
    uint32_t d = top;
    while (hist[d] < need) need -= hist[d--];
    prefix |= d << shift; pmask |= 255u << shift;
    if (shift == 0) break;
    int64_t c = 0;  /* keep the candidates with this prefix (in place: c <= i) */
    for (int64_t i = 0; i < ncand; ++i) { const uint32_t v = src[i]; cand[c] = v; c += (v & pmask) == prefix; }
    ncand = c; src = cand;
  }
  const uint32_t t = prefix;
  int64_t cut = -1;  /* the index of the last tie kept: `need` scores equal to t are kept, lowest first */
  for (int64_t i = 0; need > 0; ++i) if (bits[i] == t) { cut = i; --need; }
  int64_t m = 0, i = 0;
#if USE_AVX512
  const __m512i vt = _mm512_set1_epi32((int)t), vcut = _mm512_set1_epi32((int)cut), step = _mm512_set1_epi32(16);
  __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; i + 16 <= k; i += 16, idx = _mm512_add_epi32(idx, step)) {
    const __m512i v = _mm512_loadu_si512(bits + i);
    const __mmask16 take = _mm512_cmpgt_epu32_mask(v, vt)
                           | (_mm512_cmpeq_epu32_mask(v, vt) & _mm512_cmple_epi32_mask(idx, vcut));
    _mm512_storeu_si512(rows + m, _mm512_maskz_compress_epi32(take, idx));  /* rows has k + 16 slots */
    m += __builtin_popcount(take);
  }
#endif
  for (; i < k; ++i) { rows[m] = (int32_t)i; m += (bits[i] > t) | ((bits[i] == t) & (i <= cut)); }
  return m;
}

/* Non-temporal (prefetchnta on x86): each code row is read once per token, so it should not evict
   what is reused (accumulators, x, scales). 15-25% faster than prefetcht0 on a cold-cache proxy of
   a token's layer calls; end to end (compiled decode) the same within noise. */
static void prefetch_row(const void* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch((const char*)p + b, 0, 0);
}

/* acc[i] += sum_t xs[t] * low nibble of r[t][i], acc[width + i] += the same with the high nibble.
   Inlined with a constant count (4 or 1), so both loops are straight-line code over t. */
static inline __attribute__((always_inline)) void add_rows_int4(float* restrict acc, int64_t width,
                                                                const uint8_t* const* r, const float* xs, int count) {
  int64_t i = 0;
#if USE_AVX512  /* 16 codes -> 16 lanes of int32 -> float, one FMA per kept weight */
  const __m512i low4 = _mm512_set1_epi32(15);
  for (; i + 16 <= width; i += 16) {
    __m512 lo = _mm512_loadu_ps(acc + i), hi = _mm512_loadu_ps(acc + width + i);
    for (int t = 0; t < count; ++t) {
      const __m512 x = _mm512_set1_ps(xs[t]);
      const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(r[t] + i)));
      lo = _mm512_fmadd_ps(x, _mm512_cvtepi32_ps(_mm512_and_si512(c, low4)), lo);
      hi = _mm512_fmadd_ps(x, _mm512_cvtepi32_ps(_mm512_srli_epi32(c, 4)), hi);
    }
    _mm512_storeu_ps(acc + i, lo);
    _mm512_storeu_ps(acc + width + i, hi);
  }
#endif
  for (; i < width; ++i) {
    float lo = acc[i], hi = acc[width + i];
    for (int t = 0; t < count; ++t) { lo += xs[t] * (float)(r[t][i] & 15); hi += xs[t] * (float)(r[t][i] >> 4); }
    acc[i] = lo; acc[width + i] = hi;
  }
}

static inline __attribute__((always_inline)) void add_rows_int8(float* restrict acc, int64_t width,
                                                                const int8_t* const* r, const float* xs, int count) {
  int64_t i = 0;
#if USE_AVX512
  for (; i + 16 <= width; i += 16) {
    __m512 a = _mm512_loadu_ps(acc + i);
    for (int t = 0; t < count; ++t) {
      const __m512i c = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(r[t] + i)));
      a = _mm512_fmadd_ps(_mm512_set1_ps(xs[t]), _mm512_cvtepi32_ps(c), a);
    }
    _mm512_storeu_ps(acc + i, a);
  }
#endif
  for (; i < width; ++i) {
    float a = acc[i];
    for (int t = 0; t < count; ++t) a += xs[t] * (float)r[t][i];
    acc[i] = a;
  }
}

/* One row: score |x| (times norms when given), keep the best `keep` inputs, then
   y[n] = sum_j x[r_j] * (c[r_j, n] * s[g_j, n] - o[g_j, n]),  g_j = r_j / group.
   The kept rows are ascending, so a group's rows are adjacent: they are accumulated
   unscaled (four rows per pass: a quarter of the accumulator traffic), and the group's
   scale and offset are applied once.
   int4: codes uint8 [K, width]: low nibble = column m, high nibble = column m + width (N = 2 width).
   int8: codes int8 [K, width] (N = width). x and y are float32 or bfloat16 (flags). 0 = ok. */
#define SPARSE_GEMV(NAME, CODE, INT4, ADD_ROWS)                                                          \
int NAME(const void* xin, int x_bf16, const float* norms, int64_t k, int64_t keep, const CODE* codes,     \
         int64_t width, const float* scale, const float* offset, int64_t group, void* yout, int y_bf16) {  \
  const int64_t n = INT4 ? 2 * width : width;                                                            \
  float* buf = (float*)malloc((size_t)(3 * k + 2 * n) * sizeof(float));                                  \
  int32_t* rows = (int32_t*)malloc((size_t)(k + 16) * sizeof(int32_t));                                   \
  if (buf == NULL || rows == NULL) { free(buf); free(rows); return 1; }                                   \
  float *x = buf, *score = buf + k, *acc = buf + 3 * k, *y = buf + 3 * k + n;                             \
  uint32_t* cand = (uint32_t*)(buf + 2 * k);                                                              \
  for (int64_t i = 0; i < k; ++i) {                                                                       \
    x[i] = x_bf16 ? bf16_to_f32(((const uint16_t*)xin)[i]) : ((const float*)xin)[i];                     \
    score[i] = norms ? fabsf(x[i]) * norms[i] : fabsf(x[i]);                                              \
  }                                                                                                       \
  const int64_t m = select_rows(score, k, keep, cand, rows);                                              \
  for (int64_t j = 0; j < m && j < PREFETCH_AHEAD; ++j) prefetch_row(codes + rows[j] * width, width);     \
  memset(y, 0, (size_t)n * sizeof(float));                                                                \
  int64_t j = 0;                                                                                          \
  while (j < m) {                                                                                         \
    const int64_t g = rows[j] / group;                                                                    \
    int64_t end = j;                                                                                      \
    while (end < m && rows[end] / group == g) ++end;                                                      \
    prefetch_row(scale + g * n, n * (int64_t)sizeof(float));  /* read at the group's end */              \
    prefetch_row(offset + g * n, n * (int64_t)sizeof(float));                                             \
    memset(acc, 0, (size_t)n * sizeof(float));                                                            \
    float xsum = 0.f;                                                                                     \
    for (; j < end; ) {                                                                                   \
      const int count = end - j >= 4 ? 4 : 1;                                                             \
      const CODE* r[4]; float xs[4];                                                                      \
      for (int t = 0; t < count; ++t, ++j) {                                                              \
        if (j + PREFETCH_AHEAD < m) prefetch_row(codes + rows[j + PREFETCH_AHEAD] * width, width);        \
        r[t] = codes + rows[j] * width; xs[t] = x[rows[j]]; xsum += xs[t];                                \
      }                                                                                                   \
      if (count == 4) ADD_ROWS(acc, width, r, xs, 4); else ADD_ROWS(acc, width, r, xs, 1);               \
    }                                                                                                     \
    const float* restrict s = scale + g * n;                                                              \
    const float* restrict o = offset + g * n;                                                             \
    for (int64_t i = 0; i < n; ++i) y[i] += s[i] * acc[i] - o[i] * xsum;                                  \
  }                                                                                                       \
  if (y_bf16) { for (int64_t i = 0; i < n; ++i) ((uint16_t*)yout)[i] = f32_to_bf16(y[i]); }               \
  else memcpy(yout, y, (size_t)n * sizeof(float));                                                        \
  free(buf); free(rows);                                                                                  \
  return 0;                                                                                               \
}

SPARSE_GEMV(sparse_gemv_int4, uint8_t, 1, add_rows_int4)
SPARSE_GEMV(sparse_gemv_int8, int8_t, 0, add_rows_int8)
