/*
 * simd_map.h: one small vocabulary of vector operations, mapped onto the ISA
 * that the including file was compiled for. Kernels are written once against
 * it (see the *_impl.h templates) and compiled once per ISA file.
 *
 * The including file defines FA_ISA_LEVEL before including this header:
 *   0 = scalar (a "vector" is one element; plain C, any architecture),
 *   1 = AVX2 + FMA (8 floats / 4 doubles),
 *   2 = AVX-512 F/DQ/BW/VL (16 floats / 8 doubles).
 * Level 1 and 2 files must be compiled with the matching -m flags; a
 * mismatch is a build error rather than a silent scalar build.
 *
 * Operations (vf32_* for float, vf64_* for double):
 *   loadu, storeu, set1, zero, add, sub, mul, fmadd(a,b,c) = a*b + c
 *   (one rounding where FA_FMA_FUSED is 1),
 *   max(a,b) (b is returned when either is NaN, so pass data second),
 *   hmax, hsum (horizontal, fixed order),
 *   exp_nonpos: exp for x <= 0 or NaN only, as softmax exponents are (see
 *   fa_math.h; vf64_exp, the general double exp, implements the double one),
 *   vf32_exp2_nonpos: 2^x for x <= 0 or NaN (fa_exp2f_nonpos),
 *   keep(v, m): v where the uint8 mask bytes m[0..LANES) are nonzero, -inf
 *   elsewhere;
 *   loadn(p, n), storen(p, v, n): the first n (0..LANES) lanes only, for
 *   tails; they never touch memory past p + n;
 *   div(a, b); select_lt(x, t, a, b): a where x < t, b elsewhere (NaN: b);
 *   tanh (fa_tanhf / fa_tanh, for logit soft-capping);
 *   load_bf16 / load_f16 / load_i8(p): LANES narrow K/V elements (bfloat16,
 *   IEEE half, int8) widened to float, exactly, in registers; loadn_*(p, n)
 *   the first n only (the rest 0), never touching memory past p + n;
 *   stream(p, v): a non-temporal store to a vector-aligned p, which skips
 *   the read-for-ownership of the destination line (fa_store_fence() in
 *   cache_hints.h orders such stores before later ones).
 */
#ifndef FASTATTN_SIMD_MAP_H
#define FASTATTN_SIMD_MAP_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "fa_math.h"
#include "half_float.h"

#ifndef FA_ISA_LEVEL
#error "define FA_ISA_LEVEL (0 scalar, 1 avx2, 2 avx512) before simd_map.h"
#endif

/* ======================================================================= */
#if FA_ISA_LEVEL == 0

#define FA_ISA_SUFFIX scalar
#define FA_VF32_LANES 1
#define FA_VF64_LANES 1
/* fmadd is a * b + c with two roundings (setup.py builds with
 * -ffp-contract=off) */
#define FA_FMA_FUSED 0
typedef float fa_vf32;
typedef double fa_vf64;

#define FA_SCALAR_OPS(T, P, EXP_NONPOS)                                           \
    static inline T P##_loadu(const T *p) { return *p; }                          \
    static inline void P##_storeu(T *p, T v) { *p = v; }                          \
    static inline T P##_set1(T x) { return x; }                                   \
    static inline T P##_zero(void) { return (T)0; }                               \
    static inline T P##_add(T a, T b) { return a + b; }                           \
    static inline T P##_sub(T a, T b) { return a - b; }                           \
    static inline T P##_mul(T a, T b) { return a * b; }                           \
    static inline T P##_fmadd(T a, T b, T c) { return a * b + c; }                \
    static inline T P##_max(T a, T b) { return a > b ? a : b; }                   \
    static inline T P##_hmax(T v) { return v; }                                   \
    static inline T P##_hsum(T v) { return v; }                                   \
    static inline T P##_exp_nonpos(T v) { return EXP_NONPOS(v); }                 \
    static inline T P##_keep(T v, const uint8_t *m) { return m[0] ? v : (T)-INFINITY; } \
    static inline T P##_loadn(const T *p, int64_t n) { return n > 0 ? *p : (T)0; }     \
    static inline void P##_storen(T *p, T v, int64_t n) { if (n > 0) *p = v; }         \
    static inline void P##_stream(T *p, T v) { *p = v; }                               \
    static inline T P##_div(T a, T b) { return a / b; }                               \
    static inline T P##_select_lt(T x, T t, T a, T b) { return x < t ? a : b; }

FA_SCALAR_OPS(float, vf32, fa_expf_nonpos)
FA_SCALAR_OPS(double, vf64, fa_exp)
static inline float vf32_exp2_nonpos(float v) { return fa_exp2f_nonpos(v); }
static inline float vf32_load_bf16(const uint16_t *p) { return fa_bf16_bits_to_f32(*p); }
static inline float vf32_load_f16(const uint16_t *p) { return fa_f16_bits_to_f32(*p); }
static inline float vf32_load_i8(const int8_t *p) { return (float)*p; }

/* Four-lane GNU C vectors for the scalar level's row kernels, which keep
 * four partial sums per dot product (attention_impl.h): plain C that GCC
 * and clang lower to the baseline vector unit (SSE2, NEON) or to scalar
 * code. The narrow loads widen exactly as vf32_load_bf16/f16/i8 do (one
 * lane each), with the selects as masks so that no branch remains. */
#define FA_LANES 4
typedef float fa_f32x4 __attribute__((vector_size(16)));
typedef double fa_f64x4 __attribute__((vector_size(32)));
typedef uint32_t fa_u32x4 __attribute__((vector_size(16)));
typedef int32_t fa_i32x4 __attribute__((vector_size(16)));
typedef uint16_t fa_u16x4 __attribute__((vector_size(8)));
typedef uint8_t fa_u8x4 __attribute__((vector_size(4)));
typedef uint16_t fa_u16x8 __attribute__((vector_size(16)));
typedef uint64_t fa_u64x2 __attribute__((vector_size(16)));
typedef uint8_t fa_u8x16 __attribute__((vector_size(16)));
#define FA_LANES_LOAD(dst, p) memcpy(&(dst), (p), sizeof(dst))
/* Each narrow element lands in the top of its 32-bit lane by one byte
 * interleave with zeros (punpcklwd / punpcklbw on SSE2, zip on NEON): the
 * bfloat16 value itself, the half's bits shifted by 16, the int8 value
 * times 2^24. GCC before 12 lacks __builtin_shufflevector and takes the
 * element-wise conversions instead (the same values, more operations). */
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define FA_LANES_TOP16(h) \
    ((fa_u32x4)__builtin_shufflevector((fa_u16x8){0}, (h), 0, 8, 1, 9, 2, 10, 3, 11))
/* bytes to the top of 16-bit lanes, then those to the top of 32-bit lanes */
#define FA_LANES_TOP8(b)                                                                    \
    FA_LANES_TOP16((fa_u16x8)__builtin_shufflevector((fa_u8x16){0}, (b), 0, 16, 1, 17, 2, 18, 3, \
                                                     19, 4, 20, 5, 21, 6, 22, 7, 23))
#else
#define FA_LANES_TOP16(h) \
    (__builtin_convertvector((fa_u16x4){(h)[0], (h)[1], (h)[2], (h)[3]}, fa_u32x4) << 16)
#define FA_LANES_TOP8(b) \
    (__builtin_convertvector((fa_u8x4){(b)[0], (b)[1], (b)[2], (b)[3]}, fa_u32x4) << 24)
#endif
/* four narrow elements at p in the low bytes of a vector (one movq / movd) */
#define FA_LANES_LOW64(p) ((fa_u16x8)(fa_u64x2){fa_load_u64(p), 0})
#define FA_LANES_LOW32(p) ((fa_u8x16)(fa_u32x4){fa_load_u32(p), 0, 0, 0})
static inline uint64_t fa_load_u64(const void *p) {
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline uint32_t fa_load_u32(const void *p) {
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}
#define FA_LANES_LOAD_BF16(dst, p)                                                  \
    do {                                                                           \
        const fa_u16x8 h_ = FA_LANES_LOW64(p);                                     \
        (dst) = (fa_f32x4)FA_LANES_TOP16(h_);                                      \
    } while (0)
/* the half's exponent and mantissa shifted into a float's place (t) read
 * as 2^-112 times its value, as in fa_f16_row_to_f32; exponent all ones
 * (em > 0x7bff << 16) rebuilt from t. SSE2 has signed 32-bit compares
 * only: em < 2^31. */
#define FA_LANES_LOAD_F16(dst, p)                                                   \
    do {                                                                           \
        const fa_u16x8 h_ = FA_LANES_LOW64(p);                                     \
        const fa_i32x4 x_ = (fa_i32x4)FA_LANES_TOP16(h_);                          \
        const fa_i32x4 sign_ = x_ & (int32_t)0x80000000u, em_ = x_ ^ sign_;        \
        const fa_i32x4 t_ = (fa_i32x4)((fa_u32x4)em_ >> 3);                        \
        const fa_i32x4 u_ = (fa_i32x4)((fa_f32x4)t_ * 0x1p112f);                   \
        const fa_i32x4 inf_nan_ = em_ > 0x7bffffff;                                \
        const fa_i32x4 special_ = 0x7f800000 | t_ | ((em_ > 0x7c00ffff) & 0x400000); \
        (dst) = (fa_f32x4)((special_ & inf_nan_) | (u_ & ~inf_nan_) | sign_);      \
    } while (0)
#define FA_LANES_LOAD_I8(dst, p)                                                    \
    do {                                                                           \
        const fa_u8x16 b_ = FA_LANES_LOW32(p);                                     \
        (dst) = __builtin_convertvector((fa_i32x4)FA_LANES_TOP8(b_) >> 24, fa_f32x4); \
    } while (0)

/* ======================================================================= */
#elif FA_ISA_LEVEL == 1

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "FA_ISA_LEVEL 1 needs -mavx2 -mfma -mf16c"
#endif
#include <immintrin.h>

#define FA_ISA_SUFFIX avx2
#define FA_VF32_LANES 8
#define FA_VF64_LANES 4
#define FA_FMA_FUSED 1
typedef __m256 fa_vf32;
typedef __m256d fa_vf64;

static inline __m256 vf32_loadu(const float *p) { return _mm256_loadu_ps(p); }
static inline void vf32_storeu(float *p, __m256 v) { _mm256_storeu_ps(p, v); }
static inline __m256 vf32_set1(float x) { return _mm256_set1_ps(x); }
static inline __m256 vf32_zero(void) { return _mm256_setzero_ps(); }
static inline __m256 vf32_add(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
static inline __m256 vf32_sub(__m256 a, __m256 b) { return _mm256_sub_ps(a, b); }
static inline __m256 vf32_mul(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
static inline __m256 vf32_fmadd(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
static inline __m256 vf32_max(__m256 a, __m256 b) { return _mm256_max_ps(a, b); }
static inline float vf32_hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline float vf32_hmax(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
/* First n (0..8) lanes from memory, the rest zero; never reads past p+n. */
static inline __m256i fa_avx2_lane_mask32(int64_t n) {
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), iota);
}
static inline __m256 vf32_loadn(const float *p, int64_t n) {
    return _mm256_maskload_ps(p, fa_avx2_lane_mask32(n));
}
static inline void vf32_storen(float *p, __m256 v, int64_t n) {
    _mm256_maskstore_ps(p, fa_avx2_lane_mask32(n), v);
}
static inline void vf32_stream(float *p, __m256 v) { _mm256_stream_ps(p, v); }
static inline void vf64_stream(double *p, __m256d v) { _mm256_stream_pd(p, v); }
/* exp for x <= 0 (or NaN): fa_expf_nonpos in fa_math.h, 8 lanes. max
 * returns its second operand when either is NaN, so NaN passes through;
 * round(NaN) converts to INT_MIN, whose scale is 1.0, so p = NaN stays. */
static inline __m256 vf32_exp_nonpos(__m256 x) {
    __m256 xc = _mm256_max_ps(_mm256_set1_ps(FA_EXPF_NP_LO), x);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(FA_LOG2E_F)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(FA_LN2_HI_F), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(FA_LN2_LO_F), r);
    __m256 p = _mm256_set1_ps(FA_EXPF_NP_C5);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(FA_EXPF_NP_C4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(FA_EXPF_NP_C3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(FA_EXPF_NP_C2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
/* 2^x for x <= 0 (or NaN): fa_exp2f_nonpos, with n found by the shifter
 * addition; NaN passes through max and the polynomial as above. */
static inline __m256 vf32_exp2_nonpos(__m256 x) {
    const __m256 shifter = _mm256_set1_ps(FA_EXP2F_SHIFTER);
    const __m256 xc = _mm256_max_ps(_mm256_set1_ps(FA_EXP2F_LO), x);
    const __m256 nb = _mm256_add_ps(xc, shifter); /* bits: ... | n + 127 */
    const __m256 r = _mm256_sub_ps(xc, _mm256_sub_ps(nb, shifter));
    __m256 p = _mm256_set1_ps(FA_EXP2F_C5);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(FA_EXP2F_C4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(FA_EXP2F_C3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(FA_EXP2F_C2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(FA_EXP2F_C1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_castps_si256(nb), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
static inline __m256 vf32_div(__m256 a, __m256 b) { return _mm256_div_ps(a, b); }
static inline __m256d vf64_div(__m256d a, __m256d b) { return _mm256_div_pd(a, b); }
static inline __m256 vf32_select_lt(__m256 x, __m256 t, __m256 a, __m256 b) {
    return _mm256_blendv_ps(b, a, _mm256_cmp_ps(x, t, _CMP_LT_OQ));
}
static inline __m256d vf64_select_lt(__m256d x, __m256d t, __m256d a, __m256d b) {
    return _mm256_blendv_pd(b, a, _mm256_cmp_pd(x, t, _CMP_LT_OQ));
}
static inline __m256 vf32_keep(__m256 v, const uint8_t *m) {
    __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)m));
    __m256 drop = _mm256_castsi256_ps(_mm256_cmpeq_epi32(w, _mm256_setzero_si256()));
    return _mm256_blendv_ps(v, _mm256_set1_ps(-INFINITY), drop);
}

/* Narrow K/V rows: 8 elements from one 16-byte (or 8-byte) load. No F16C:
 * the avx2 level does not require it, so half is widened with integer ops
 * (see fa_f16_bits_to_f32). */
static inline __m256 vf32_load_bf16(const uint16_t *p) {
    const __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
}
static inline __m256 vf32_load_f16(const uint16_t *p) { /* F16C: part of the level */
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
static inline __m256 vf32_load_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

static inline __m256d vf64_loadu(const double *p) { return _mm256_loadu_pd(p); }
static inline void vf64_storeu(double *p, __m256d v) { _mm256_storeu_pd(p, v); }
static inline __m256d vf64_set1(double x) { return _mm256_set1_pd(x); }
static inline __m256d vf64_zero(void) { return _mm256_setzero_pd(); }
static inline __m256d vf64_add(__m256d a, __m256d b) { return _mm256_add_pd(a, b); }
static inline __m256d vf64_sub(__m256d a, __m256d b) { return _mm256_sub_pd(a, b); }
static inline __m256d vf64_mul(__m256d a, __m256d b) { return _mm256_mul_pd(a, b); }
static inline __m256d vf64_fmadd(__m256d a, __m256d b, __m256d c) { return _mm256_fmadd_pd(a, b, c); }
static inline __m256d vf64_max(__m256d a, __m256d b) { return _mm256_max_pd(a, b); }
static inline double vf64_hsum(__m256d v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
    return _mm_cvtsd_f64(s);
}
static inline double vf64_hmax(__m256d v) {
    __m128d s = _mm_max_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    s = _mm_max_sd(s, _mm_unpackhi_pd(s, s));
    return _mm_cvtsd_f64(s);
}
static inline __m256d vf64_exp(__m256d x) {
    const __m256d lo = _mm256_set1_pd(FA_EXP_LO), hi = _mm256_set1_pd(FA_EXP_HI);
    __m256d under = _mm256_cmp_pd(x, lo, _CMP_LT_OQ);
    __m256d over = _mm256_cmp_pd(x, hi, _CMP_GT_OQ);
    __m256d xc = _mm256_min_pd(hi, _mm256_max_pd(lo, x));
    __m256d n = _mm256_round_pd(_mm256_mul_pd(xc, _mm256_set1_pd(FA_LOG2E)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(FA_LN2_HI), xc);
    r = _mm256_fnmadd_pd(n, _mm256_set1_pd(FA_LN2_LO), r);
    __m256d p = _mm256_set1_pd(1.0 / 6227020800.0);
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0 / 479001600.0));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0 / 39916800.0));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0 / 3628800.0));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0 / 362880.0));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0 / 40320.0));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0 / 5040.0));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0 / 720.0));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0 / 120.0));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0 / 24.0));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0 / 6.0));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(0.5));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0));
    /* |n| <= 1025 fits int32; widen after splitting. NaN lanes convert to
     * INT_MIN, which only scales a NaN. */
    __m128i ni = _mm256_cvtpd_epi32(n);
    __m128i h = _mm_srai_epi32(ni, 1);
    __m256i bias = _mm256_set1_epi64x(1023);
    __m256d s1 = _mm256_castsi256_pd(
        _mm256_slli_epi64(_mm256_add_epi64(_mm256_cvtepi32_epi64(h), bias), 52));
    __m256d s2 = _mm256_castsi256_pd(_mm256_slli_epi64(
        _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm_sub_epi32(ni, h)), bias), 52));
    __m256d res = _mm256_mul_pd(_mm256_mul_pd(p, s1), s2);
    res = _mm256_andnot_pd(under, res);
    return _mm256_blendv_pd(res, _mm256_set1_pd(INFINITY), over);
}
static inline __m256i fa_avx2_lane_mask64(int64_t n) {
    const __m256i iota = _mm256_setr_epi64x(0, 1, 2, 3);
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), iota);
}
static inline __m256d vf64_loadn(const double *p, int64_t n) {
    return _mm256_maskload_pd(p, fa_avx2_lane_mask64(n));
}
static inline void vf64_storen(double *p, __m256d v, int64_t n) {
    _mm256_maskstore_pd(p, fa_avx2_lane_mask64(n), v);
}
static inline __m256d vf64_exp_nonpos(__m256d x) { return vf64_exp(x); }
static inline __m256d vf64_keep(__m256d v, const uint8_t *m) {
    int32_t four;
    memcpy(&four, m, 4);
    __m256i w = _mm256_cvtepu8_epi64(_mm_cvtsi32_si128(four));
    __m256d drop = _mm256_castsi256_pd(_mm256_cmpeq_epi64(w, _mm256_setzero_si256()));
    return _mm256_blendv_pd(v, _mm256_set1_pd(-INFINITY), drop);
}

/* ======================================================================= */
#elif FA_ISA_LEVEL == 2

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || \
    !defined(__AVX512DQ__) || !defined(__FMA__)
#error "FA_ISA_LEVEL 2 needs -mavx512f -mavx512dq -mavx512bw -mavx512vl -mfma"
#endif
#include <immintrin.h>

#define FA_ISA_SUFFIX avx512
#define FA_VF32_LANES 16
#define FA_VF64_LANES 8
#define FA_FMA_FUSED 1
typedef __m512 fa_vf32;
typedef __m512d fa_vf64;

static inline __m512 vf32_loadu(const float *p) { return _mm512_loadu_ps(p); }
static inline void vf32_storeu(float *p, __m512 v) { _mm512_storeu_ps(p, v); }
static inline __m512 vf32_set1(float x) { return _mm512_set1_ps(x); }
static inline __m512 vf32_zero(void) { return _mm512_setzero_ps(); }
static inline __m512 vf32_add(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
static inline __m512 vf32_sub(__m512 a, __m512 b) { return _mm512_sub_ps(a, b); }
static inline __m512 vf32_mul(__m512 a, __m512 b) { return _mm512_mul_ps(a, b); }
static inline __m512 vf32_fmadd(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
static inline __m512 vf32_max(__m512 a, __m512 b) { return _mm512_max_ps(a, b); }
static inline float vf32_hsum(__m512 v) {
    __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v),
                              _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline float vf32_hmax(__m512 v) {
    __m256 s8 = _mm256_max_ps(_mm512_castps512_ps256(v),
                              _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline __m512 vf32_loadn(const float *p, int64_t n) {
    return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), p);
}
static inline void vf32_storen(float *p, __m512 v, int64_t n) {
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1u), v);
}
static inline void vf32_stream(float *p, __m512 v) { _mm512_stream_ps(p, v); }
static inline void vf64_stream(double *p, __m512d v) { _mm512_stream_pd(p, v); }
static inline __m512 vf32_exp_nonpos(__m512 x) { /* as the avx2 version */
    __m512 xc = _mm512_max_ps(_mm512_set1_ps(FA_EXPF_NP_LO), x);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(FA_LOG2E_F)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(FA_LN2_HI_F), xc);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(FA_LN2_LO_F), r);
    __m512 p = _mm512_set1_ps(FA_EXPF_NP_C5);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(FA_EXPF_NP_C4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(FA_EXPF_NP_C3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(FA_EXPF_NP_C2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}
/* The two halves of 2^x = 2^n 2^r around a polynomial for 2^r (as the
 * avx2 vf32_exp2_nonpos): vf32_exp2_reduce gives r in [-1/2, 1/2] and *nb,
 * whose low bits hold n + 127; vf32_exp2_scale gives p 2^n. */
static inline __m512 vf32_exp2_reduce(__m512 x, __m512 *nb) {
    const __m512 shifter = _mm512_set1_ps(FA_EXP2F_SHIFTER);
    const __m512 xc = _mm512_max_ps(_mm512_set1_ps(FA_EXP2F_LO), x);
    *nb = _mm512_add_ps(xc, shifter);
    return _mm512_sub_ps(xc, _mm512_sub_ps(*nb, shifter));
}
static inline __m512 vf32_exp2_scale(__m512 p, __m512 nb) {
    return _mm512_mul_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(nb), 23)));
}
static inline __m512 vf32_exp2_nonpos(__m512 x) {
    __m512 nb;
    const __m512 r = vf32_exp2_reduce(x, &nb);
    __m512 p = _mm512_set1_ps(FA_EXP2F_C5);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(FA_EXP2F_C4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(FA_EXP2F_C3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(FA_EXP2F_C2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(FA_EXP2F_C1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return vf32_exp2_scale(p, nb);
}
static inline __m512 vf32_div(__m512 a, __m512 b) { return _mm512_div_ps(a, b); }
static inline __m512d vf64_div(__m512d a, __m512d b) { return _mm512_div_pd(a, b); }
static inline __m512 vf32_select_lt(__m512 x, __m512 t, __m512 a, __m512 b) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, t, _CMP_LT_OQ), b, a);
}
static inline __m512d vf64_select_lt(__m512d x, __m512d t, __m512d a, __m512d b) {
    return _mm512_mask_blend_pd(_mm512_cmp_pd_mask(x, t, _CMP_LT_OQ), b, a);
}
static inline __m512 vf32_keep(__m512 v, const uint8_t *m) {
    __m128i b = _mm_loadu_si128((const __m128i *)m);
    __mmask16 k = _mm_test_epi8_mask(b, b);
    return _mm512_mask_blend_ps(k, _mm512_set1_ps(-INFINITY), v);
}

/* Narrow K/V rows: 16 elements from one 32-byte (or 16-byte) load. */
static inline __m512 vf32_load_bf16(const uint16_t *p) {
    const __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
}
static inline __m512 vf32_load_f16(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}
static inline __m512 vf32_load_i8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

static inline __m512d vf64_loadu(const double *p) { return _mm512_loadu_pd(p); }
static inline void vf64_storeu(double *p, __m512d v) { _mm512_storeu_pd(p, v); }
static inline __m512d vf64_set1(double x) { return _mm512_set1_pd(x); }
static inline __m512d vf64_zero(void) { return _mm512_setzero_pd(); }
static inline __m512d vf64_add(__m512d a, __m512d b) { return _mm512_add_pd(a, b); }
static inline __m512d vf64_sub(__m512d a, __m512d b) { return _mm512_sub_pd(a, b); }
static inline __m512d vf64_mul(__m512d a, __m512d b) { return _mm512_mul_pd(a, b); }
static inline __m512d vf64_fmadd(__m512d a, __m512d b, __m512d c) { return _mm512_fmadd_pd(a, b, c); }
static inline __m512d vf64_max(__m512d a, __m512d b) { return _mm512_max_pd(a, b); }
static inline double vf64_hsum(__m512d v) {
    __m256d s4 = _mm256_add_pd(_mm512_castpd512_pd256(v), _mm512_extractf64x4_pd(v, 1));
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(s4), _mm256_extractf128_pd(s4, 1));
    s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
    return _mm_cvtsd_f64(s);
}
static inline double vf64_hmax(__m512d v) {
    __m256d s4 = _mm256_max_pd(_mm512_castpd512_pd256(v), _mm512_extractf64x4_pd(v, 1));
    __m128d s = _mm_max_pd(_mm256_castpd256_pd128(s4), _mm256_extractf128_pd(s4, 1));
    s = _mm_max_sd(s, _mm_unpackhi_pd(s, s));
    return _mm_cvtsd_f64(s);
}
static inline __m512d vf64_exp(__m512d x) {
    const __m512d lo = _mm512_set1_pd(FA_EXP_LO), hi = _mm512_set1_pd(FA_EXP_HI);
    __mmask8 under = _mm512_cmp_pd_mask(x, lo, _CMP_LT_OQ);
    __mmask8 over = _mm512_cmp_pd_mask(x, hi, _CMP_GT_OQ);
    __m512d xc = _mm512_min_pd(hi, _mm512_max_pd(lo, x));
    __m512d n = _mm512_roundscale_pd(_mm512_mul_pd(xc, _mm512_set1_pd(FA_LOG2E)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512d r = _mm512_fnmadd_pd(n, _mm512_set1_pd(FA_LN2_HI), xc);
    r = _mm512_fnmadd_pd(n, _mm512_set1_pd(FA_LN2_LO), r);
    __m512d p = _mm512_set1_pd(1.0 / 6227020800.0);
    p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0 / 479001600.0));
    p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0 / 39916800.0));
    p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0 / 3628800.0));
    p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0 / 362880.0));
    p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0 / 40320.0));
    p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0 / 5040.0));
    p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0 / 720.0));
    p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0 / 120.0));
    p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0 / 24.0));
    p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0 / 6.0));
    p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(0.5));
    p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0));
    p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0));
    __m256i ni = _mm512_cvtpd_epi32(n);
    __m256i h = _mm256_srai_epi32(ni, 1);
    __m512i bias = _mm512_set1_epi64(1023);
    __m512d s1 = _mm512_castsi512_pd(
        _mm512_slli_epi64(_mm512_add_epi64(_mm512_cvtepi32_epi64(h), bias), 52));
    __m512d s2 = _mm512_castsi512_pd(_mm512_slli_epi64(
        _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm256_sub_epi32(ni, h)), bias), 52));
    __m512d res = _mm512_mul_pd(_mm512_mul_pd(p, s1), s2);
    res = _mm512_maskz_mov_pd((__mmask8)~under, res);
    return _mm512_mask_mov_pd(res, over, _mm512_set1_pd(INFINITY));
}
static inline __m512d vf64_loadn(const double *p, int64_t n) {
    return _mm512_maskz_loadu_pd((__mmask8)((1u << n) - 1u), p);
}
static inline void vf64_storen(double *p, __m512d v, int64_t n) {
    _mm512_mask_storeu_pd(p, (__mmask8)((1u << n) - 1u), v);
}
static inline __m512d vf64_exp_nonpos(__m512d x) { return vf64_exp(x); }
static inline __m512d vf64_keep(__m512d v, const uint8_t *m) {
    __m128i b = _mm_loadl_epi64((const __m128i *)m);
    __mmask8 k = (__mmask8)_mm_test_epi8_mask(b, b);
    return _mm512_mask_blend_pd(k, _mm512_set1_pd(-INFINITY), v);
}

#else
#error "unknown FA_ISA_LEVEL"
#endif

/* tanh (fa_tanhf / fa_tanh in fa_math.h, same pieces and error bound):
 * both pieces are computed and blended per lane. |x| = max(x, -x) keeps NaN
 * (max returns its second operand then), and a NaN lane takes the exp piece,
 * which keeps it NaN. */
#define FA_DEFINE_VTANH(T, V, P, POLY, SPLIT)                                      \
    static inline V P##_tanh(V x) {                                                \
        const V zero = P##_zero(), one = P##_set1((T)1);                           \
        const V a = P##_max(x, P##_sub(zero, x));                                  \
        const V z = P##_mul(x, x);                                                 \
        const V p = POLY(P##_fmadd, P##_mul, P##_set1, z);                         \
        const V small = P##_fmadd(P##_mul(x, z), p, x);                            \
        const V e = P##_exp_nonpos(P##_mul(a, P##_set1((T)-2)));                   \
        V big = P##_div(P##_sub(one, e), P##_add(one, e));                         \
        big = P##_select_lt(x, zero, P##_sub(zero, big), big);                     \
        return P##_select_lt(a, P##_set1(SPLIT), small, big);                      \
    }
FA_DEFINE_VTANH(float, fa_vf32, vf32, FA_TANHF_POLY, FA_TANHF_SPLIT)
FA_DEFINE_VTANH(double, fa_vf64, vf64, FA_TANH_POLY, FA_TANH_SPLIT)

/* Tails of narrow rows: the n elements go through a zeroed buffer, so no
 * byte past p + n is read (n < LANES; only a row's last vector). */
#define FA_DEFINE_NARROW_LOADN(KT, NAME)                                           \
    static inline fa_vf32 vf32_loadn_##NAME(const KT *p, int64_t n) {              \
        KT buf[FA_VF32_LANES];                                                     \
        memset(buf, 0, sizeof buf);                                                \
        if (n > 0) memcpy(buf, p, (size_t)n * sizeof(KT));                         \
        return vf32_load_##NAME(buf);                                              \
    }
FA_DEFINE_NARROW_LOADN(uint16_t, bf16)
FA_DEFINE_NARROW_LOADN(uint16_t, f16)
FA_DEFINE_NARROW_LOADN(int8_t, i8)

/* Name mangling for template instances: FA_KNAME(softmax_row, f32) ->
 * fa_softmax_row_f32_avx2 in the AVX2 file. */
#define FA_CAT4_(a, b, c, d) a##_##b##_##c##_##d
#define FA_CAT4(a, b, c, d) FA_CAT4_(a, b, c, d)
#define FA_KNAME(name, dt) FA_CAT4(fa, name, dt, FA_ISA_SUFFIX)

#endif /* FASTATTN_SIMD_MAP_H */
