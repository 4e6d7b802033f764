/*
 * half_bits.h: bfloat16 / IEEE half <-> float32, one element at a time:
 * the scalar references that the 16-bit GEMM's epilogue and the row
 * conversions (half_rows.c) match. No vector intrinsics, so any file may
 * include it.
 *
 * Widening is exact. Narrowing rounds to nearest even, once; a NaN stays a
 * (quiet) NaN and a value past the format's range becomes infinity.
 */
#ifndef FASTATTN_HALF_BITS_H
#define FASTATTN_HALF_BITS_H

#include <stdint.h>

#include "fastattn.h"

/* float32 -> bfloat16 / float16 bits, round to nearest even; NaN stays a
 * quiet NaN; overflow gives infinity. The scalar references the vector
 * epilogues match. */
static inline uint16_t fa_f32_to_bf16_bits(float x) {
    uint32_t u;
    __builtin_memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float fa_bf16_bits_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float x;
    __builtin_memcpy(&x, &u, 4);
    return x;
}

static inline float fa_f16_bits_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13); /* inf, NaN (payload kept) */
    } else if (exp != 0) {
        u = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        u = sign;
    } else { /* subnormal half: normalise; every one is a normal float */
        int shift = 0;
        while (!(man & 0x400u)) {
            man <<= 1;
            ++shift;
        }
        u = sign | ((uint32_t)(113 - shift) << 23) | ((man & 0x3ffu) << 13);
    }
    float x;
    __builtin_memcpy(&x, &u, 4);
    return x;
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


#endif /* FASTATTN_HALF_BITS_H */
