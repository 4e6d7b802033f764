/*
 * fa_math.h: scalar exp for float and double, the same algorithm the SIMD
 * versions in simd_map.h use, so that vector bodies and scalar tails agree.
 *
 * exp(x) = 2^n * exp(r), n = round(x / ln2), r = x - n*ln2 (Cody-Waite split
 * of ln2 so that r is exact to working precision), |r| <= ln2/2 ~ 0.347.
 *   float (x <= 0 only, fa_expf_nonpos): degree-5 minimax, 1.0e-7;
 *   float 2^t (t <= 0 only, fa_exp2f_nonpos): n = round(t), r = t - n is
 *   exact, so no Cody-Waite split is needed; degree-5 minimax for 2^r;
 *   double: Taylor to r^13, truncation 0.347^14/14! ~ 4e-18 < 2^-53.
 * Inputs below the cutoff return exactly 0 (so exp(-inf) == 0 and masked
 * keys get probability 0); above the overflow bound, +inf; NaN stays NaN.
 * Every exponent the kernels take is a score minus its row maximum, never
 * positive, so float needs no general exp.
 */
#ifndef FASTATTN_MATH_H
#define FASTATTN_MATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#define FA_EXP_LO (-708.3964185322641)
#define FA_EXP_HI (709.782712893384)

#define FA_LOG2E_F 1.44269504088896341f
#define FA_LN2_HI_F 0.693359375f        /* 8 significant bits: n*hi is exact */
#define FA_LN2_LO_F (-2.12194440e-4f)
#define FA_LOG2E 1.4426950408889634
#define FA_LN2_HI 0.6931471803691238    /* 32 significant bits */
#define FA_LN2_LO 1.9082149292705877e-10

/* p * 2^(e - 127), for the biased exponent e in the low 9 bits of
 * `biased` (e in [0, 254]; e = 0 gives exactly 0): the scale is built in the
 * exponent field, as the vector code does with a shift by 23. */
static inline float fa_times_pow2f(float p, uint32_t biased) {
    const uint32_t bits = biased << 23;
    float s;
    memcpy(&s, &bits, 4);
    return p * s;
}

/* exp for x <= 0 only, as softmax exponents s - max are (the innermost loop
 * of the softmax and of attention). A degree-5 minimax polynomial for exp(r)
 * on |r| <= ln2/2 (fitted for relative error, 1.0e-7; at most 3 ulp after
 * float rounding, against the 1e-5 the outputs are held to) costs two FMAs
 * fewer than Taylor to r^7. Below -127 ln2 the scale 2^n has exponent
 * field 0, so the result is exactly 0 with no compare: exp(-inf) == 0 and
 * masked keys get probability 0. Below -126.5 ln2 (-87.68), n rounds to
 * -127 and the result is exactly 0, not the subnormal e^x (< 1.2e-38,
 * far below the 1e-5 tolerance); x in (-87.68, -87.34) gives a subnormal. */
#define FA_EXPF_NP_LO (-88.0296919f) /* -127 ln2 */
#define FA_EXPF_NP_C5 8.314719e-3f
#define FA_EXPF_NP_C4 4.1890208e-2f
#define FA_EXPF_NP_C3 1.666709e-1f
#define FA_EXPF_NP_C2 4.999923e-1f

static inline float fa_expf_nonpos(float x) {
    if (x != x) return x;
    const float xc = x > FA_EXPF_NP_LO ? x : FA_EXPF_NP_LO;
    const float n = nearbyintf(xc * FA_LOG2E_F);
    float r = xc - n * FA_LN2_HI_F;
    r = r - n * FA_LN2_LO_F;
    float p = FA_EXPF_NP_C5;
    p = p * r + FA_EXPF_NP_C4;
    p = p * r + FA_EXPF_NP_C3;
    p = p * r + FA_EXPF_NP_C2;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return fa_times_pow2f(p, (uint32_t)((int32_t)n + 127)); /* n in [-127, 0] */
}

/* 2^t for t <= 0 only (up to 1/8 above 0 is fine too: the softmax's
 * exponent of its max key can be that rounding error): the float softmax's
 * exponent, with log2(e) folded into its scale (as FlashAttention does), so
 * that the reduction costs one rounding-free subtraction instead of a
 * multiply and two FMAs. Degree-5 minimax for 2^r on |r| <= 1/2, fitted for
 * relative error (8.7e-8). After float rounding, checked over every float
 * in [-126, 0] (the normal results): at most 2.7 ulp with FMA, as the
 * vector code runs it, and 3.1 ulp without. n = round(t) comes from adding
 * FA_EXP2F_SHIFTER, 1.5 * 2^23 + 127: in [2^23, 2^24) a float holds only
 * integers, so the addition rounds t and leaves n + 127 in the low bits,
 * which a shift by 23 turns into the scale 2^n. The scalar and vector code
 * do the same arithmetic, so they agree but for the FMA rounding. (The
 * shifter is odd, so ties go to odd n, not even as nearbyintf's would;
 * either is inside the fitted range. Like all of fastattn's arithmetic, it
 * assumes the default rounding mode, to nearest.) From t = -126.5 down,
 * n = -127 makes the scale's exponent field 0 and the result exactly 0. */
#define FA_EXP2F_LO (-127.0f)
#define FA_EXP2F_SHIFTER 12583039.0f
#define FA_EXP2F_C1 6.931470037e-01f
#define FA_EXP2F_C2 2.402223200e-01f
#define FA_EXP2F_C3 5.550685152e-02f
#define FA_EXP2F_C4 9.671973996e-03f
#define FA_EXP2F_C5 1.327765407e-03f

static inline float fa_exp2f_nonpos(float t) {
    if (t != t) return t;
    const float tc = t > FA_EXP2F_LO ? t : FA_EXP2F_LO;
    const float nb = tc + FA_EXP2F_SHIFTER; /* as the vector code: same n */
    const float n = nb - FA_EXP2F_SHIFTER;
    const float r = tc - n;
    float p = FA_EXP2F_C5;
    p = p * r + FA_EXP2F_C4;
    p = p * r + FA_EXP2F_C3;
    p = p * r + FA_EXP2F_C2;
    p = p * r + FA_EXP2F_C1;
    p = p * r + 1.0f;
    uint32_t bits;
    memcpy(&bits, &nb, 4);
    return fa_times_pow2f(p, bits); /* its low bits: n + 127, in [0, 127] */
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

/* tanh for logit soft-capping, c * tanh(s / c). Two pieces, chosen per
 * element (the vector code computes both and blends):
 *   |x| < FA_TANH*_SPLIT: the odd Taylor series x + x z P(z), z = x^2,
 *     tanh's own coefficients 2^2n (2^2n - 1) B_2n / (2n)!; its terms
 *     shrink by about (2/pi)^2 z per step (pi/2 is the radius of
 *     convergence), so the first omitted term bounds the truncation:
 *     float, split 0.625, terms to x^19: 9.7e-5 * 0.39^10 ~ 8e-9 relative;
 *     double, split 0.25, terms to x^21: 3.9e-5 * 0.0625^11 ~ 2e-18;
 *   |x| >= split: (1 - e) / (1 + e) with e = exp(-2|x|) <= exp(-2 split),
 *     so 1 - e >= 0.71 (float) / 0.39 (double) and the exp's relative
 *     error (3 ulp float, 1 ulp double) is magnified at most
 *     e / (1 - e) < 0.41 (float) / 1.6 (double) times.
 * Bound (both pieces, with the roundings of the evaluation): float
 * <= 6e-7 relative (the fp32 scores it caps carry 6e-8 relative of
 * rounding each), double <= 1e-15 relative. Measured against long-double
 * tanhl on 8e6 points in [-400, 400] (dense near 0 and near the splits),
 * scalar and vector code alike: 1.8e-7 (float), 3.7e-16 (double). exp(-2|x|) underflows to 0 for
 * large |x|, giving exactly +-1; tanh(+-inf) = +-1; NaN stays NaN. */
#define FA_TANHF_SPLIT 0.625f
#define FA_TANH_SPLIT 0.25
#define FA_TANH_C3 (-0.3333333333333333)
#define FA_TANH_C5 0.13333333333333333
#define FA_TANH_C7 (-0.05396825396825397)
#define FA_TANH_C9 0.021869488536155203
#define FA_TANH_C11 (-0.008863235529902197)
#define FA_TANH_C13 0.003592128036572481
#define FA_TANH_C15 (-0.0014558343870513183)
#define FA_TANH_C17 0.000590027440945586
#define FA_TANH_C19 (-0.00023912911424355248)
#define FA_TANH_C21 9.691537956929451e-05

/* The series' z P(z) part, Horner from the highest term; TYPE's literals. */
#define FA_TANHF_POLY(FMA, MUL, SET, z)                                              \
    FMA(FMA(FMA(FMA(FMA(FMA(FMA(FMA(SET((float)FA_TANH_C19), z, SET((float)FA_TANH_C17)), z, \
        SET((float)FA_TANH_C15)), z, SET((float)FA_TANH_C13)), z, SET((float)FA_TANH_C11)), \
        z, SET((float)FA_TANH_C9)), z, SET((float)FA_TANH_C7)), z, SET((float)FA_TANH_C5)), \
        z, SET((float)FA_TANH_C3))
#define FA_TANH_POLY(FMA, MUL, SET, z)                                               \
    FMA(FMA(FMA(FMA(FMA(FMA(FMA(FMA(FMA(SET(FA_TANH_C21), z, SET(FA_TANH_C19)), z,         \
        SET(FA_TANH_C17)), z, SET(FA_TANH_C15)), z, SET(FA_TANH_C13)), z, SET(FA_TANH_C11)), \
        z, SET(FA_TANH_C9)), z, SET(FA_TANH_C7)), z, SET(FA_TANH_C5)), z, SET(FA_TANH_C3))

static inline float fa_scalar_fmaf_(float a, float b, float c) { return a * b + c; }
static inline float fa_scalar_mulf_(float a, float b) { return a * b; }
static inline float fa_scalar_setf_(float a) { return a; }
static inline double fa_scalar_fma_(double a, double b, double c) { return a * b + c; }
static inline double fa_scalar_mul_(double a, double b) { return a * b; }
static inline double fa_scalar_set_(double a) { return a; }

static inline float fa_tanhf(float x) {
    const float a = x < 0.0f ? -x : x;
    if (a < FA_TANHF_SPLIT) {
        const float z = x * x;
        const float p = FA_TANHF_POLY(fa_scalar_fmaf_, fa_scalar_mulf_, fa_scalar_setf_, z);
        return (x * z) * p + x;
    }
    const float e = fa_expf_nonpos(-2.0f * a); /* NaN stays NaN */
    const float t = (1.0f - e) / (1.0f + e);
    return x < 0.0f ? -t : t;
}

static inline double fa_tanh(double x) {
    const double a = x < 0.0 ? -x : x;
    if (a < FA_TANH_SPLIT) {
        const double z = x * x;
        const double p = FA_TANH_POLY(fa_scalar_fma_, fa_scalar_mul_, fa_scalar_set_, z);
        return (x * z) * p + x;
    }
    const double e = fa_exp(-2.0 * a);
    const double t = (1.0 - e) / (1.0 + e);
    return x < 0.0 ? -t : t;
}

#endif /* FASTATTN_MATH_H */
