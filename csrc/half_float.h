/*
 * half_float.h: scalar conversions between float32 and the two 16-bit
 * float formats (bfloat16, IEEE half), shared by every kernel that reads or
 * writes them. The vector forms live with each ISA's helpers (simd_map.h,
 * gemm_bf16_impl.h) and match these bit for bit.
 */
#ifndef FASTATTN_HALF_FLOAT_H
#define FASTATTN_HALF_FLOAT_H

#include <stdint.h>
#include <string.h>

/* Exact widening of one narrow K/V element. bfloat16 is the top half of a
 * float. IEEE half: the exponent and mantissa bits shifted into a float's
 * place read as 2^-112 times the value (subnormal halves become float
 * subnormals), so one multiplication by 2^112 rebiases them exactly; inf
 * and NaN (exponent all ones) are rebuilt, NaNs quieted as VCVTPH2PS does. */
static inline float fa_bf16_bits_to_f32(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline float fa_f16_bits_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, em = h & 0x7fffu;
    uint32_t u;
    if (em >= 0x7c00u) {
        u = 0x7f800000u | ((em & 0x3ffu) << 13) | (em > 0x7c00u ? 0x400000u : 0u);
    } else {
        const uint32_t t = em << 13;
        float f;
        memcpy(&f, &t, sizeof f);
        f *= 0x1p112f;
        memcpy(&u, &f, sizeof u);
    }
    u |= sign;
    float r;
    memcpy(&r, &u, sizeof r);
    return r;
}

/* The same widenings over a contiguous row, written without branches (inf
 * and NaN picked by a select) so that compilers turn the loops into vector
 * code for any target's baseline (SSE2, NEON): the scalar kernels widen
 * K/V tiles with them instead of paying a scalar conversion per element.
 * Bit for bit the functions above. */
static inline void fa_bf16_row_to_f32(const uint16_t *restrict src, int64_t n,
                                      float *restrict dst) {
    for (int64_t i = 0; i < n; ++i) {
        const uint32_t u = (uint32_t)src[i] << 16;
        memcpy(dst + i, &u, sizeof u);
    }
}
static inline void fa_f16_row_to_f32(const uint16_t *restrict src, int64_t n,
                                     float *restrict dst) {
    for (int64_t i = 0; i < n; ++i) {
        const uint32_t h = src[i], em = h & 0x7fffu, t = em << 13;
        float f;
        memcpy(&f, &t, sizeof f);
        f *= 0x1p112f;
        uint32_t u;
        memcpy(&u, &f, sizeof u);
        /* exponent all ones: t already holds the mantissa in place; the
         * selects as masks, which GCC vectorizes where ?: stays a branch */
        const uint32_t special = 0x7f800000u | t | (uint32_t)(em > 0x7c00u) << 22;
        const uint32_t inf_nan = 0u - (uint32_t)(em >= 0x7c00u);
        u = (special & inf_nan) | (u & ~inf_nan) | (h & 0x8000u) << 16;
        memcpy(dst + i, &u, sizeof u);
    }
}

/* float32 -> bfloat16 / float16 bits, round to nearest even; NaN stays a
 * quiet NaN; overflow gives infinity. The scalar references the vector
 * epilogues match. */
static inline uint16_t fa_f32_to_bf16_bits(float x) {
    uint32_t u;
    __builtin_memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline uint16_t fa_f32_to_f16_bits(float x) {
    uint32_t u;
    __builtin_memcpy(&u, &x, 4);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu)); /* quiet NaN */
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds past 65504: inf */
    if (a >= 0x38800000u) { /* normal half: drop 13 bits, round to nearest even */
        uint32_t r = a - 0x38000000u; /* rebias 127 -> 15 */
        r += 0xfffu + ((r >> 13) & 1u);
        return (uint16_t)(sign | (r >> 13));
    }
    if (a < 0x33000000u) return sign; /* below half the smallest subnormal: 0 */
    /* subnormal half: value = m * 2^-24 with m = the significand shifted */
    const uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e; /* 14 .. 24 */
    uint32_t h = m >> shift;
    const uint32_t rest = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rest > half || (rest == half && (h & 1u))) ++h;
    return (uint16_t)(sign | h);
}

#endif /* FASTATTN_HALF_FLOAT_H */
