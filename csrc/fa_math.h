/*
 * fa_math.h: scalar exp for float and double, the same algorithm the SIMD
 * versions in simd_map.h use, so that vector bodies and scalar tails agree.
 *
 * exp(x) = 2^n * exp(r), n = round(x / ln2), r = x - n*ln2 (Cody-Waite split
 * of ln2 so that r is exact to working precision), |r| <= ln2/2 ~ 0.347.
 *   float:  Taylor to r^7,  truncation 0.347^8/8!  ~ 5e-9  < 2^-24;
 *   double: Taylor to r^13, truncation 0.347^14/14! ~ 4e-18 < 2^-53.
 * Inputs below the cutoff return exactly 0 (so exp(-inf) == 0 and masked
 * keys get probability 0); above the overflow bound, +inf; NaN stays NaN.
 */
#ifndef FASTATTN_MATH_H
#define FASTATTN_MATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* float: below -87.33 the result is subnormal; flush it to 0 (the relative
 * error there is irrelevant next to a row maximum of exp(0) = 1). */
#define FA_EXPF_LO (-87.33654f)
#define FA_EXPF_HI (88.72283f)
#define FA_EXP_LO (-708.3964185322641)
#define FA_EXP_HI (709.782712893384)

#define FA_LOG2E_F 1.44269504088896341f
#define FA_LN2_HI_F 0.693359375f        /* 8 significant bits: n*hi is exact */
#define FA_LN2_LO_F (-2.12194440e-4f)
#define FA_LOG2E 1.4426950408889634
#define FA_LN2_HI 0.6931471803691238    /* 32 significant bits */
#define FA_LN2_LO 1.9082149292705877e-10

/* 1/k! for the Taylor polynomials, highest degree first (Horner order). */
#define FA_EXPF_C7 1.98412698e-4f
#define FA_EXPF_C6 1.38888889e-3f
#define FA_EXPF_C5 8.33333333e-3f
#define FA_EXPF_C4 4.16666667e-2f
#define FA_EXPF_C3 1.66666667e-1f
#define FA_EXPF_C2 0.5f

static inline float fa_expf(float x) {
    if (!(x >= FA_EXPF_LO)) return (x != x) ? x : 0.0f; /* NaN or underflow */
    if (x > FA_EXPF_HI) return INFINITY;
    float n = nearbyintf(x * FA_LOG2E_F);
    float r = x - n * FA_LN2_HI_F;
    r = r - n * FA_LN2_LO_F;
    float p = FA_EXPF_C7;
    p = p * r + FA_EXPF_C6;
    p = p * r + FA_EXPF_C5;
    p = p * r + FA_EXPF_C4;
    p = p * r + FA_EXPF_C3;
    p = p * r + FA_EXPF_C2;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    /* n is in [-126, 128]; 2^n as two factors so that n = 128 cannot overflow
     * the exponent field before the multiply. */
    int32_t ni = (int32_t)n;
    int32_t h = ni / 2;
    uint32_t b1 = (uint32_t)(h + 127) << 23, b2 = (uint32_t)(ni - h + 127) << 23;
    float s1, s2;
    memcpy(&s1, &b1, 4);
    memcpy(&s2, &b2, 4);
    return p * s1 * s2;
}

static inline double fa_exp(double x) {
    if (!(x >= FA_EXP_LO)) return (x != x) ? x : 0.0;
    if (x > FA_EXP_HI) return INFINITY;
    double n = nearbyint(x * FA_LOG2E);
    double r = x - n * FA_LN2_HI;
    r = r - n * FA_LN2_LO;
    double p = 1.0 / 6227020800.0;          /* 1/13! */
    p = p * r + 1.0 / 479001600.0;          /* 1/12! */
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    int64_t ni = (int64_t)n;
    int64_t h = ni / 2;
    uint64_t b1 = (uint64_t)(h + 1023) << 52, b2 = (uint64_t)(ni - h + 1023) << 52;
    double s1, s2;
    memcpy(&s1, &b1, 8);
    memcpy(&s2, &b2, 8);
    return p * s1 * s2;
}

#endif /* FASTATTN_MATH_H */
