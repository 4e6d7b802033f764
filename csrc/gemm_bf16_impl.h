/*
 * gemm_bf16_impl.h: the 16-bit GEMM kernels (activation packing, register
 * micro-kernel, epilogue), written once and instantiated per ISA level by
 * gemm_bf16_{scalar,avx2,avx512,avx512bf16}.c, which define FA_G16_LEVEL
 * (gemm_bf16_amx.c takes level 3's helpers, FA_G16_HELPERS_ONLY):
 *   0 scalar      any CPU; conversions in plain C;
 *   1 avx2        AVX2 + FMA + F16C, 8-float vectors;
 *   2 avx512      AVX-512 F/BW/VL/DQ + FMA, 16-float vectors;
 *   3 avx512bf16  level 2 plus vdpbf16ps for bf16 inputs.
 * Layouts: gemm_bf16.h. Tile: MR rows of a x FA_G16_NR (32) columns of w,
 * the sums held in registers for a whole run of pairs of k.
 *
 * Summation order, the same at every level: for each pair q = 0, 1, ...,
 * acc += a[2q+1] w[2q+1], then acc += a[2q] w[2q], each a float32 add of
 * an exact product (bf16 x bf16 and fp16 x fp16 products have at most 22
 * significant bits, so they fit a float exactly unless they underflow).
 * That is what vdpbf16ps computes, which makes the fp32 levels agree with
 * it bit for bit on normal numbers. The bf16 and fp16 weight tiles are
 * widened in registers as they are used, never copied out at float32 width.
 */
#include <stdint.h>
#include <string.h>

#include "gemm_bf16.h"

#if FA_G16_LEVEL >= 2

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || \
    !defined(__AVX512DQ__) || !defined(__FMA__) || !defined(__F16C__) || \
    (FA_G16_LEVEL >= 3 && !defined(__AVX512BF16__))
#error "FA_G16_LEVEL 2 needs -mavx512f -mavx512dq -mavx512bw -mavx512vl -mfma -mf16c, 3 also -mavx512bf16"
#endif
#include <immintrin.h>
#include "transpose_avx512.h"

#elif FA_G16_LEVEL == 1
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "FA_G16_LEVEL 1 needs -mavx2 -mfma -mf16c"
#endif
#include <immintrin.h>
#endif

/* MR: rows of the register tile. Level 2/3: 12 rows x 2 vectors = 24
 * accumulators + 2 weight vectors (dpbf16) or 4 widened ones (fp32 path)
 * + 1 broadcast <= 29 of 32 zmm (12 and 14 rows ran at the same speed).
 * Level 1: each 16-column half of the panel as 5 rows x 2 vectors = 10
 * accumulators + 2 weights + 1 broadcast + the bf16 high-half mask = 14 of
 * 16 ymm; 6 rows spilled an accumulator to the stack (88 GF/s on a Zen 5
 * core against 120 for 5 rows, 106 for 4). Scalar: 4 rows x 32 columns in
 * memory the compiler keeps close. Rows per tile also set the padding
 * waste (12 rows: 3% at M = 128), which level 3's tail kernel avoids. */
#if FA_G16_LEVEL >= 2
#define G16_MR 12
#elif FA_G16_LEVEL == 1
#define G16_MR 5
#else
#define G16_MR 4
#endif

#define G16_NR FA_G16_NR
#define G16_CAT2(a, b) a##_##b
#define G16_CAT(a, b) G16_CAT2(a, b)
#if FA_G16_LEVEL == 0
#define G16_SUFFIX scalar
#elif FA_G16_LEVEL == 1
#define G16_SUFFIX avx2
#elif FA_G16_LEVEL == 2
#define G16_SUFFIX avx512
#else
#define G16_SUFFIX avx512bf16
#endif

/* ---- scalar conversions of one element (F16C where the level has it) ---- */

static inline float g16_bf16(uint16_t h) { return fa_bf16_bits_to_f32(h); }

static inline float g16_f16(uint16_t h) {
#if FA_G16_LEVEL >= 1
    return _cvtsh_ss(h);
#else
    return fa_f16_bits_to_f32(h);
#endif
}

static inline uint16_t g16_to_f16(float x) {
#if FA_G16_LEVEL >= 1
    return (uint16_t)_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    return fa_f32_to_f16_bits(x);
#endif
}

/* ---- activation packing: fp32 layout (gemm_bf16.h) ----------------------
 * a: rows [0, rows) with row stride lda, K elements each -> ceil(rows / MR)
 * tiles of K2 pairs x MR rows x 2 floats; padding rows and the odd k = K
 * are zero, so they add exact zeros to the sums (never NaN: a pad is
 * never multiplied by a NaN weight, as the packed weight pads with zero
 * too). */
#define G16_PACK_A_F32(NAME, CONV)                                                        \
    static void NAME(const uint16_t *a, int64_t lda, int64_t rows, int64_t K,             \
                     void *packed) {                                                      \
        const int64_t K2 = (K + 1) / 2, tiles = (rows + G16_MR - 1) / G16_MR;             \
        float *p = (float *)packed;                                                       \
        for (int64_t t = 0; t < tiles; ++t) {                                             \
            float *tile = p + t * K2 * 2 * G16_MR;                                        \
            for (int64_t r = 0; r < G16_MR; ++r) {                                        \
                float *dst = tile + 2 * r;                                                \
                const int64_t row = t * G16_MR + r;                                       \
                if (row >= rows) {                                                        \
                    for (int64_t q = 0; q < K2; ++q) dst[q * 2 * G16_MR] = dst[q * 2 * G16_MR + 1] = 0.0f; \
                    continue;                                                             \
                }                                                                         \
                const uint16_t *src = a + row * lda;                                      \
                for (int64_t q = 0; q < K / 2; ++q) {                                     \
                    dst[q * 2 * G16_MR] = CONV(src[2 * q]);                               \
                    dst[q * 2 * G16_MR + 1] = CONV(src[2 * q + 1]);                       \
                }                                                                         \
                if (K & 1) {                                                              \
                    dst[(K2 - 1) * 2 * G16_MR] = CONV(src[K - 1]);                        \
                    dst[(K2 - 1) * 2 * G16_MR + 1] = 0.0f;                                \
                }                                                                         \
            }                                                                             \
        }                                                                                 \
    }

G16_PACK_A_F32(g16_pack_a_f32_bf16, g16_bf16)
G16_PACK_A_F32(g16_pack_a_f32_f16, g16_f16)

/* ---- micro-kernels -------------------------------------------------------
 * c (MR, 32) floats, row stride ldc = (accumulate ? c : 0) + sum over
 * npairs pairs of a_tile (packed) x w_panel (packed, 64 uint16 a pair). */

#if FA_G16_LEVEL == 0

/* The panel's pair q as two rows of 32 floats: k = 2q (even) and 2q + 1. */
static inline void g16_widen_pair_bf16(const uint16_t *w, float *even, float *odd) {
    for (int c = 0; c < G16_NR; ++c) {
        even[c] = g16_bf16(w[2 * c]);
        odd[c] = g16_bf16(w[2 * c + 1]);
    }
}
static inline void g16_widen_pair_f16(const uint16_t *w, float *even, float *odd) {
    for (int c = 0; c < G16_NR; ++c) {
        even[c] = g16_f16(w[32 * (c / 16) + c % 16]);
        odd[c] = g16_f16(w[32 * (c / 16) + 16 + c % 16]);
    }
}

#define G16_MICRO_SCALAR(NAME, WIDEN)                                                     \
    static void NAME(int64_t npairs, const void *a_tile, const uint16_t *w, float *c,     \
                     int64_t ldc, int accumulate) {                                       \
        const float *a = (const float *)a_tile;                                           \
        float acc[G16_MR][G16_NR], even[G16_NR], odd[G16_NR];                             \
        for (int r = 0; r < G16_MR; ++r)                                                  \
            for (int j = 0; j < G16_NR; ++j) acc[r][j] = accumulate ? c[r * ldc + j] : 0.0f; \
        for (int64_t q = 0; q < npairs; ++q, w += FA_G16_PAIR_ELEMS, a += 2 * G16_MR) {   \
            WIDEN(w, even, odd);                                                          \
            for (int r = 0; r < G16_MR; ++r) {                                            \
                const float a0 = a[2 * r], a1 = a[2 * r + 1];                             \
                for (int j = 0; j < G16_NR; ++j) {                                        \
                    float s = acc[r][j] + a1 * odd[j];                                    \
                    acc[r][j] = s + a0 * even[j];                                         \
                }                                                                         \
            }                                                                             \
        }                                                                                 \
        for (int r = 0; r < G16_MR; ++r)                                                  \
            for (int j = 0; j < G16_NR; ++j) c[r * ldc + j] = acc[r][j];                  \
    }

G16_MICRO_SCALAR(g16_micro_bf16, g16_widen_pair_bf16)
G16_MICRO_SCALAR(g16_micro_f16, g16_widen_pair_f16)

#elif FA_G16_LEVEL == 1

/* One 16-column half h of the panel: the widened weights of k = 2q + 1
 * (odd) and k = 2q (even), 8 columns per vector. */
#define G16_ODD_BF16(w, h, v0, v1)                                                        \
    do {                                                                                  \
        const __m256i hi_ = _mm256_set1_epi32((int)0xffff0000u);                          \
        v0 = _mm256_castsi256_ps(_mm256_and_si256(                                        \
            _mm256_loadu_si256((const __m256i *)((w) + 32 * (h))), hi_));                 \
        v1 = _mm256_castsi256_ps(_mm256_and_si256(                                        \
            _mm256_loadu_si256((const __m256i *)((w) + 32 * (h) + 16)), hi_));            \
    } while (0)
#define G16_EVEN_BF16(w, h, v0, v1)                                                       \
    do {                                                                                  \
        v0 = _mm256_castsi256_ps(_mm256_slli_epi32(                                       \
            _mm256_loadu_si256((const __m256i *)((w) + 32 * (h))), 16));                  \
        v1 = _mm256_castsi256_ps(_mm256_slli_epi32(                                       \
            _mm256_loadu_si256((const __m256i *)((w) + 32 * (h) + 16)), 16));             \
    } while (0)
#define G16_ODD_F16(w, h, v0, v1)                                                         \
    do {                                                                                  \
        v0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((w) + 32 * (h) + 16)));    \
        v1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((w) + 32 * (h) + 24)));    \
    } while (0)
#define G16_EVEN_F16(w, h, v0, v1)                                                        \
    do {                                                                                  \
        v0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((w) + 32 * (h))));         \
        v1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((w) + 32 * (h) + 8)));     \
    } while (0)

#define G16_MICRO_AVX2(NAME, ODD, EVEN)                                                   \
    static void NAME(int64_t npairs, const void *a_tile, const uint16_t *w_panel,         \
                     float *c, int64_t ldc, int accumulate) {                             \
        for (int h = 0; h < 2; ++h) {                                                     \
            const float *a = (const float *)a_tile;                                       \
            const uint16_t *w = w_panel;                                                  \
            __m256 acc0[G16_MR], acc1[G16_MR];                                            \
            for (int r = 0; r < G16_MR; ++r) {                                            \
                acc0[r] = accumulate ? _mm256_loadu_ps(c + r * ldc + 16 * h) : _mm256_setzero_ps(); \
                acc1[r] = accumulate ? _mm256_loadu_ps(c + r * ldc + 16 * h + 8) : _mm256_setzero_ps(); \
            }                                                                             \
            for (int64_t q = 0; q < npairs; ++q, w += FA_G16_PAIR_ELEMS, a += 2 * G16_MR) { \
                __m256 w0, w1;                                                            \
                ODD(w, h, w0, w1);                                                        \
                _Pragma("GCC unroll 5") for (int r = 0; r < G16_MR; ++r) {                \
                    const __m256 x = _mm256_broadcast_ss(a + 2 * r + 1);                  \
                    acc0[r] = _mm256_fmadd_ps(x, w0, acc0[r]);                            \
                    acc1[r] = _mm256_fmadd_ps(x, w1, acc1[r]);                            \
                }                                                                         \
                EVEN(w, h, w0, w1);                                                       \
                _Pragma("GCC unroll 5") for (int r = 0; r < G16_MR; ++r) {                \
                    const __m256 x = _mm256_broadcast_ss(a + 2 * r);                      \
                    acc0[r] = _mm256_fmadd_ps(x, w0, acc0[r]);                            \
                    acc1[r] = _mm256_fmadd_ps(x, w1, acc1[r]);                            \
                }                                                                         \
            }                                                                             \
            for (int r = 0; r < G16_MR; ++r) {                                            \
                _mm256_storeu_ps(c + r * ldc + 16 * h, acc0[r]);                          \
                _mm256_storeu_ps(c + r * ldc + 16 * h + 8, acc1[r]);                      \
            }                                                                             \
        }                                                                                 \
    }

G16_MICRO_AVX2(g16_micro_bf16, G16_ODD_BF16, G16_EVEN_BF16)
G16_MICRO_AVX2(g16_micro_f16, G16_ODD_F16, G16_EVEN_F16)

#else /* levels 2 and 3 */

/* The whole 32-column panel: widened weights of k = 2q + 1 (odd) and
 * k = 2q (even), 16 columns per vector. */
#define G16_ODD_BF16(w, v0, v1)                                                           \
    do {                                                                                  \
        const __m512i hi_ = _mm512_set1_epi32((int)0xffff0000u);                          \
        v0 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512((w)), hi_));         \
        v1 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512((w) + 32), hi_));    \
    } while (0)
#define G16_EVEN_BF16(w, v0, v1)                                                          \
    do {                                                                                  \
        v0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512((w)), 16));         \
        v1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512((w) + 32), 16));    \
    } while (0)
#define G16_ODD_F16(w, v0, v1)                                                            \
    do {                                                                                  \
        v0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((w) + 16)));            \
        v1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((w) + 48)));            \
    } while (0)
#define G16_EVEN_F16(w, v0, v1)                                                           \
    do {                                                                                  \
        v0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((w))));                 \
        v1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((w) + 32)));            \
    } while (0)

#define G16_MICRO_AVX512(NAME, ODD, EVEN)                                                 \
    static void NAME(int64_t npairs, const void *a_tile, const uint16_t *w, float *c,     \
                     int64_t ldc, int accumulate) {                                       \
        const float *a = (const float *)a_tile;                                           \
        __m512 acc0[G16_MR], acc1[G16_MR];                                                \
        for (int r = 0; r < G16_MR; ++r) {                                                \
            acc0[r] = accumulate ? _mm512_loadu_ps(c + r * ldc) : _mm512_setzero_ps();    \
            acc1[r] = accumulate ? _mm512_loadu_ps(c + r * ldc + 16) : _mm512_setzero_ps(); \
        }                                                                                 \
        for (int64_t q = 0; q < npairs; ++q, w += FA_G16_PAIR_ELEMS, a += 2 * G16_MR) {   \
            __m512 w0, w1;                                                                \
            ODD(w, w0, w1);                                                               \
            _Pragma("GCC unroll 12") for (int r = 0; r < G16_MR; ++r) {                   \
                const __m512 x = _mm512_set1_ps(a[2 * r + 1]);                            \
                acc0[r] = _mm512_fmadd_ps(x, w0, acc0[r]);                                \
                acc1[r] = _mm512_fmadd_ps(x, w1, acc1[r]);                                \
            }                                                                             \
            EVEN(w, w0, w1);                                                              \
            _Pragma("GCC unroll 12") for (int r = 0; r < G16_MR; ++r) {                   \
                const __m512 x = _mm512_set1_ps(a[2 * r]);                                \
                acc0[r] = _mm512_fmadd_ps(x, w0, acc0[r]);                                \
                acc1[r] = _mm512_fmadd_ps(x, w1, acc1[r]);                                \
            }                                                                             \
        }                                                                                 \
        for (int r = 0; r < G16_MR; ++r) {                                                \
            _mm512_storeu_ps(c + r * ldc, acc0[r]);                                       \
            _mm512_storeu_ps(c + r * ldc + 16, acc1[r]);                                  \
        }                                                                                 \
    }

#if FA_G16_LEVEL == 2
G16_MICRO_AVX512(g16_micro_bf16, G16_ODD_BF16, G16_EVEN_BF16)
G16_MICRO_AVX512(g16_micro_f16, G16_ODD_F16, G16_EVEN_F16)
#else
/* Level 3, bf16: one vdpbf16ps per 16 columns and row does both k of a
 * pair (odd first, then even: the order above). a_tile: uint32 pairs, a
 * tile of G16_MR rows; the first nr (a constant at each call) are
 * computed. */
static inline __attribute__((always_inline)) void g16_micro_dpbf16_rows(
    int64_t npairs, const void *a_tile, const uint16_t *w, float *c, int64_t ldc, int accumulate,
    const int nr) {
    const uint32_t *a = (const uint32_t *)a_tile;
    __m512 acc0[G16_MR], acc1[G16_MR];
    for (int r = 0; r < nr; ++r) {
        acc0[r] = accumulate ? _mm512_loadu_ps(c + r * ldc) : _mm512_setzero_ps();
        acc1[r] = accumulate ? _mm512_loadu_ps(c + r * ldc + 16) : _mm512_setzero_ps();
    }
    for (int64_t q = 0; q < npairs; ++q, w += FA_G16_PAIR_ELEMS, a += G16_MR) {
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w);
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + 32);
        _Pragma("GCC unroll 12") for (int r = 0; r < nr; ++r) {
            const __m512bh x = (__m512bh)_mm512_set1_epi32((int)a[r]);
            acc0[r] = _mm512_dpbf16_ps(acc0[r], x, w0);
            acc1[r] = _mm512_dpbf16_ps(acc1[r], x, w1);
        }
    }
    for (int r = 0; r < nr; ++r) {
        _mm512_storeu_ps(c + r * ldc, acc0[r]);
        _mm512_storeu_ps(c + r * ldc + 16, acc1[r]);
    }
}

static void g16_micro_dpbf16(int64_t npairs, const void *a_tile, const uint16_t *w, float *c,
                             int64_t ldc, int accumulate) {
    g16_micro_dpbf16_rows(npairs, a_tile, w, c, ldc, accumulate, G16_MR);
}

/* A last tile of rows < G16_MR rows: 4 or 8 rows computed, not 12 (the
 * padding rows of a 128-row call were 3% of its products). Each row's sums
 * run as in the full tile, so the bits do not change. */
static void g16_micro_dpbf16_tail(int64_t npairs, const void *a_tile, const uint16_t *w,
                                  float *c, int64_t ldc, int accumulate, int rows) {
    if (rows <= 4)
        g16_micro_dpbf16_rows(npairs, a_tile, w, c, ldc, accumulate, 4);
    else if (rows <= 8)
        g16_micro_dpbf16_rows(npairs, a_tile, w, c, ldc, accumulate, 8);
    else
        g16_micro_dpbf16_rows(npairs, a_tile, w, c, ldc, accumulate, G16_MR);
}

/* Activation packing for it: each k pair of a row as one uint32, the
 * operand vdpbf16ps broadcasts. Padding rows and the odd k = K are zero.
 * Whole blocks of 16 pairs go through a 16 x 16 register transpose (the
 * tile's rows, zero rows below them), 12 pairs stored per vector; pair by
 * pair, the packing took 2% of a bf16 layer's time at S = 128 (Zen 4). */
static void g16_pack_a_pairs(const uint16_t *a, int64_t lda, int64_t rows, int64_t K,
                             void *packed) {
    const int64_t K2 = (K + 1) / 2, tiles = (rows + G16_MR - 1) / G16_MR;
    const int64_t Q16 = K / 32 * 16; /* pairs in whole 16-pair blocks */
    const __mmask16 tile_rows = (__mmask16)((1u << G16_MR) - 1u);
    uint32_t *p = (uint32_t *)packed;
    for (int64_t t = 0; t < tiles; ++t) {
        uint32_t *tile = p + t * K2 * G16_MR;
        const int64_t nr = rows - t * G16_MR < G16_MR ? rows - t * G16_MR : G16_MR;
        for (int64_t q0 = 0; q0 < Q16; q0 += 16) {
            __m512i blk[16];
            for (int64_t r = 0; r < 16; ++r)
                blk[r] = r < nr ? _mm512_loadu_si512(a + (t * G16_MR + r) * lda + 2 * q0)
                                : _mm512_setzero_si512();
            fa_transpose16_epi32(blk);
            for (int64_t c = 0; c < 16; ++c)
                _mm512_mask_storeu_ps((float *)(tile + (q0 + c) * G16_MR), tile_rows,
                                      _mm512_castsi512_ps(blk[c]));
        }
        for (int64_t r = 0; r < G16_MR; ++r) {
            uint32_t *dst = tile + r;
            const int64_t row = t * G16_MR + r;
            if (row >= rows) {
                for (int64_t q = Q16; q < K2; ++q) dst[q * G16_MR] = 0;
                continue;
            }
            const uint16_t *src = a + row * lda;
            for (int64_t q = Q16; q < K / 2; ++q)
                dst[q * G16_MR] = (uint32_t)src[2 * q] | ((uint32_t)src[2 * q + 1] << 16);
            if (K & 1) dst[(K2 - 1) * G16_MR] = src[K - 1];
        }
    }
}
#endif
#endif /* levels */

/* ---- epilogue: out = convert(alpha * acc (+ bias)) ----------------------- */

#if FA_G16_LEVEL >= 2
#include "bf16_round_avx512.h"

static void g16_epilogue(const float *acc, int64_t ldacc, int64_t rows, int64_t cols,
                         float alpha, const float *bias, void *out, int64_t ldout,
                         int out_dtype) {
    const __m512 va = _mm512_set1_ps(alpha);
    for (int64_t r = 0; r < rows; ++r) {
        const float *src = acc + r * ldacc;
        for (int64_t j = 0; j < cols; j += 16) {
            const __mmask16 m = cols - j >= 16 ? (__mmask16)0xffff
                                               : (__mmask16)((1u << (cols - j)) - 1u);
            __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, src + j), va);
            if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias + j));
            if (out_dtype == FA_DTYPE_F32) {
                _mm512_mask_storeu_ps((float *)out + r * ldout + j, m, v);
            } else if (out_dtype == FA_DTYPE_BF16) {
                _mm512_mask_cvtepi32_storeu_epi16((uint16_t *)out + r * ldout + j, m,
                                                  fa_bf16_round16(v));
            } else {
                const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                _mm256_mask_storeu_epi16((uint16_t *)out + r * ldout + j, m, h);
            }
        }
    }
}
#else
static void g16_epilogue(const float *acc, int64_t ldacc, int64_t rows, int64_t cols,
                         float alpha, const float *bias, void *out, int64_t ldout,
                         int out_dtype) {
    for (int64_t r = 0; r < rows; ++r) {
        const float *src = acc + r * ldacc;
        for (int64_t j = 0; j < cols; ++j) {
            float v = src[j] * alpha;
            if (bias) v = v + bias[j];
            if (out_dtype == FA_DTYPE_F32)
                ((float *)out)[r * ldout + j] = v;
            else if (out_dtype == FA_DTYPE_BF16)
                ((uint16_t *)out)[r * ldout + j] = fa_f32_to_bf16_bits(v);
            else
                ((uint16_t *)out)[r * ldout + j] = g16_to_f16(v);
        }
    }
}
#endif

/* ---- the exported kernel sets -------------------------------------------- */

#if defined(FA_G16_HELPERS_ONLY)
/* gemm_bf16_amx.c: only the helpers above, under its own kernel set */
#elif FA_G16_LEVEL == 3
const fa_g16_kernels G16_CAT(fa_g16_bf16, G16_SUFFIX) = {
    .mr = G16_MR, .a_layout = FA_G16_A_PAIRS, .pair_align = 1, .pack_a = g16_pack_a_pairs,
    .micro = g16_micro_dpbf16, .micro_tail = g16_micro_dpbf16_tail, .epilogue = g16_epilogue};
#else
const fa_g16_kernels G16_CAT(fa_g16_bf16, G16_SUFFIX) = {
    .mr = G16_MR, .a_layout = FA_G16_A_F32, .pair_align = 1, .pack_a = g16_pack_a_f32_bf16,
    .micro = g16_micro_bf16, .epilogue = g16_epilogue};
const fa_g16_kernels G16_CAT(fa_g16_f16, G16_SUFFIX) = {
    .mr = G16_MR, .a_layout = FA_G16_A_F32, .pair_align = 1, .pack_a = g16_pack_a_f32_f16,
    .micro = g16_micro_f16, .epilogue = g16_epilogue};
#endif
