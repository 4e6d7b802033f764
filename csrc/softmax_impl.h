/*
 * softmax_impl.h: the masked-softmax row kernel, written once against
 * simd_map.h and instantiated per ISA file and per dtype (see
 * softmax_scalar.c, softmax_avx2.c, softmax_avx512.c).
 *
 * Row x: (n) contiguous, y: (n + n_zero) contiguous (may alias x), the last
 * n_zero entries (masked keys) written as 0; stage: NULL, or (n) scratch
 * that stays in L1.
 * Three passes over a row that stays in L1 (a 4096-key float row is 16 KiB):
 *   1. t_j = x_j * scale (+ additive mask), -inf where the bool mask drops j;
 *      store t_j in y, track the running max with two accumulators;
 *   2. e_j = exp(t_j - max) into y, summed with two accumulators; float
 *      takes it as 2^((t_j - max) log2 e), which saves three vector
 *      operations of the exponential's range reduction (simd_dtype.h) for
 *      2^-24 |z| relative per rounding of the exponent z = t_j - max
 *      (docs/reliability.md);
 *   3. y_j *= 1 / sum (one division per row).
 * With no mask row and 0 < scale * log2 e < inf (the common case),
 * max(x * scale) is scale * max(x): pass 1 only reads x for its max, and
 * pass 2 forms the exponent x_j * mul - max * mul (mul = scale * log2 e)
 * in one FMA, which saves a store and a multiply a key.
 * With a stage buffer, passes 1 and 2 work in it and pass 3 writes y with
 * non-temporal stores: for outputs much larger than the caches this saves
 * the read-for-ownership of every y line (3 memory transfers per element
 * become 2, as in a copy). Only whole 64-byte lines are streamed: a line
 * written partly by normal stores and partly by streaming ones is evicted
 * and merged in memory, which cost more than streaming saved (rows whose
 * valid length is not a multiple of the vector width were 50% slower).
 * The caller fences the streamed stores (fa_store_fence) once per batch of
 * rows, not per row.
 * Two independent accumulators hide the 4-cycle FMA/max latency; more gave
 * nothing measurable on rows of 128 to 4096 keys.
 * A row whose max is -inf has no valid key: it is written as zeros, never
 * NaN. NaN in a kept score makes the sum NaN and so the whole row NaN, as
 * NumPy's softmax would.
 */
#include "simd_dtype.h"

#ifndef FA_SOFTMAX_IMPL_ONCE
#define FA_SOFTMAX_IMPL_ONCE
/* 1 (keep) for the first 64 entries, then 0 (drop): fa_first_lanes + 64 - r
 * is a lane mask that keeps the first r lanes, for the last, partial vector
 * of a row. */
static const uint8_t fa_first_lanes[128] = {
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
#endif

/* out[0, end) = the first n entries of y times inv, then zeros; whole
 * 64-byte lines with streaming stores, partial ones with normal stores. */
static void FA_KNAME(softmax_stream_out, DT)(T *out, const T *y, int64_t n, int64_t end, T inv) {
    const int64_t line = 64 / (int64_t)sizeof(T);
    int64_t a0 = end, a1 = end; /* [a0, a1): the streamed whole lines */
    if ((uintptr_t)out % sizeof(T) == 0) {
        a0 = (int64_t)((64 - (uintptr_t)out % 64) % 64 / sizeof(T));
        if (a0 > end) a0 = end;
        a1 = a0 + (end - a0) / line * line;
    }
    int64_t j = 0;
    for (; j < a0; ++j) out[j] = j < n ? y[j] * inv : (T)0;
    const V vinv = V_SET1(inv);
    const int64_t vn = n < a1 ? n : a1; /* valid entries inside the lines */
    for (; j + VL <= vn; j += VL) V_STREAM(out + j, V_MUL(V_LOADU(y + j), vinv));
    /* the vector holding the last valid entries, zero-padded; a line is a
     * whole number of vectors, so it ends inside [a0, a1) */
    if (j < vn) {
        V_STREAM(out + j, V_MUL(V_LOADN(y + j, vn - j), vinv));
        j += VL;
    }
    for (; j < a1; j += VL) V_STREAM(out + j, V_ZERO());
    for (j = a1; j < end; ++j) out[j] = j < n ? y[j] * inv : (T)0;
}

/* Pass 2's share of the prefetch cursor (fa_prefetch_cursor): at key j of
 * an iteration over 2 VL keys, one line of the later row per 64 bytes of
 * this one, so that the requests keep pace with the exponentials. */
static inline void FA_KNAME(prefetch_paced, DT)(const char **p, int64_t *left, int64_t j) {
    const int64_t step = 2 * VL * (int64_t)sizeof(T); /* this row's bytes per iteration */
    if (step < 64 && j * (int64_t)sizeof(T) % 64 != 0) return;
    for (int64_t b = 0; b < (step < 64 ? 64 : step) && *left > 0; b += 64) {
        __builtin_prefetch(*p, 0, 0);
        *p += 64;
        *left -= 64;
    }
}

/* The exponent u = t * mul + shift (shift = -max * mul), or when exact,
 * (t + shift) * mul (shift = -max); see pass 2. Without a fused
 * multiply-add (the scalar build) the exact form is always taken, worked in
 * double with one rounding at the end, as the fused vector form has. */
static inline V FA_KNAME(softmax_exponent, DT)(V t, V vmul, V vshift, int exact) {
#if !FA_FMA_FUSED
    (void)exact;
    return (T)(((double)t + (double)vshift) * (double)vmul);
#else
    return exact ? V_MUL(V_ADD(t, vshift), vmul) : V_FMADD(t, vmul, vshift);
#endif
}

void FA_KNAME(softmax_row, DT)(const T *x, T *y, int64_t n, T scale,
                                      const void *mask_row, int mask_kind, T *stage,
                                      int64_t n_zero, fa_prefetch_cursor *ahead) {
    T *const out = y;
    if (stage) y = stage;
    const uint8_t *keep = mask_kind == FA_MASK_BOOL ? (const uint8_t *)mask_row : NULL;
    const T *add = mask_kind == FA_MASK_ADD ? (const T *)mask_row : NULL;
    const V vscale = V_SET1(scale);
    const T neg_inf = (T)-INFINITY;
    /* scale > 0 and scale * log_B(e) finite: x * scale keeps the order of
     * x, and pass 2 can multiply by mul */
    const T fold_mul = (T)((double)scale * T_LOGB_E);
    const int fold = mask_kind == FA_MASK_NONE && scale > (T)0 && fold_mul < (T)INFINITY;

    /* pass 1: scale, mask, max (x's max only, when the scale is folded) */
    V m0 = V_SET1(neg_inf), m1 = V_SET1(neg_inf);
    int64_t j = 0;
    const T *t = fold ? x : y; /* where the row's pass-1 values live */
    if (fold) {
        for (; j + 2 * VL <= n; j += 2 * VL) {
            m0 = V_MAX(m0, V_LOADU(x + j));
            m1 = V_MAX(m1, V_LOADU(x + j + VL));
        }
        /* the last 1 .. 2 VL - 1 keys as vectors, lanes past n at -inf: a
         * scalar tail cost a tenth of a row of random length */
        for (; j < n; j += VL) {
            const int64_t r = n - j < VL ? n - j : VL;
            m0 = V_MAX(m0, V_KEEP(V_LOADN(x + j, r), fa_first_lanes + 64 - r));
        }
    } else {
        for (; j + 2 * VL <= n; j += 2 * VL) {
            V a = V_MUL(V_LOADU(x + j), vscale);
            V b = V_MUL(V_LOADU(x + j + VL), vscale);
            if (add) {
                a = V_ADD(a, V_LOADU(add + j));
                b = V_ADD(b, V_LOADU(add + j + VL));
            }
            if (keep) {
                a = V_KEEP(a, keep + j);
                b = V_KEEP(b, keep + j + VL);
            }
            V_STOREU(y + j, a);
            V_STOREU(y + j + VL, b);
            m0 = V_MAX(m0, a);
            m1 = V_MAX(m1, b);
        }
    }
    T mx = V_HMAX(V_MAX(m0, m1));
    for (; j < n; ++j) {
        T v = x[j];
        if (!fold) {
            v *= scale;
            if (add) v += add[j];
            if (keep && !keep[j]) v = neg_inf;
            y[j] = v;
        }
        mx = v > mx ? v : mx;
    }
    /* A NaN may have been dropped by max; it still poisons the sum below.
     * A max of -inf means no key is above -inf -- unless max skipped a NaN
     * (a NaN is the only kept score, or the others are -inf): that row must
     * come out NaN, not empty. The scan runs only for such rows. */
    if (mx == neg_inf) {
        int64_t q = 0;
        while (q < n && t[q] == t[q]) ++q;
        if (q == n) {
            memset(out, 0, (size_t)(n + n_zero) * sizeof(T));
            return;
        }
        mx = t[q]; /* NaN: every e_j and the sum become NaN */
    }

    /* pass 2: exponentiate and sum, in base B (simd_dtype.h), of
     * u_j = (t_j - max) * (scale when folded) * log_B(e), as one FMA
     * t_j * mul - max * mul. The rounding error of max * mul shifts every
     * u_j alike, which the normalisation cancels, as long as it is small:
     * for |max * mul| >= 2^22 (a huge max) it is not, and such a row
     * subtracts first, exactly near the max, then multiplies. So does every
     * row where fmadd rounds t_j * mul on its own (the scalar build): that
     * error differs from key to key. On the fused path the max key's own
     * exponent is that rounding error, up to 1/8 above 0, which
     * V_EXPB_NONPOS takes. */
    const T mul = fold ? fold_mul : (T)T_LOGB_E;
    const T mxm = mx * mul;
    const int exact = !FA_FMA_FUSED || !(mxm > (T)-4194304.0 && mxm < (T)4194304.0);
    const V vmul = V_SET1(mul), vshift = V_SET1(exact ? -mx : -mxm);
    V s0 = V_ZERO(), s1 = V_ZERO();
    const char *pf_p = ahead ? ahead->p : NULL; /* in registers for the loop */
    int64_t pf_left = ahead ? ahead->left : 0;
    j = 0;
    for (; j + 2 * VL <= n; j += 2 * VL) {
        V a = V_EXPB_NONPOS(FA_KNAME(softmax_exponent, DT)(V_LOADU(t + j), vmul, vshift, exact));
        V b = V_EXPB_NONPOS(FA_KNAME(softmax_exponent, DT)(V_LOADU(t + j + VL), vmul, vshift, exact));
        V_STOREU(y + j, a);
        V_STOREU(y + j + VL, b);
        s0 = V_ADD(s0, a);
        s1 = V_ADD(s1, b);
        FA_KNAME(prefetch_paced, DT)(&pf_p, &pf_left, j);
    }
    /* the last keys as vectors too; lanes past n are -inf, so exp gives 0 */
    for (; j < n; j += VL) {
        const int64_t r = n - j < VL ? n - j : VL;
        const V a = V_KEEP(FA_KNAME(softmax_exponent, DT)(V_LOADN(t + j, r), vmul, vshift, exact),
                           fa_first_lanes + 64 - r);
        const V e = V_EXPB_NONPOS(a);
        V_STOREN(y + j, e, r);
        s0 = V_ADD(s0, e);
    }
    T sum = V_HSUM(V_ADD(s0, s1));
    if (ahead) {
        ahead->p = pf_p;
        ahead->left = pf_left;
    }

    /* pass 3: normalise. A NaN row is stored normally: the padding lanes of
     * the streamed vector would be 0 * NaN. */
    const T inv = (T)1 / sum;
    if (stage && sum == sum) {
        FA_KNAME(softmax_stream_out, DT)(out, y, n, n + n_zero, inv);
        return;
    }
    const V vinv = V_SET1(inv);
    for (j = 0; j + VL <= n; j += VL) V_STOREU(out + j, V_MUL(V_LOADU(y + j), vinv));
    for (; j < n; ++j) out[j] = y[j] * inv;
    if (n_zero) memset(out + n, 0, (size_t)n_zero * sizeof(T));
    /* A NaN row: keys the bool mask drops are still exactly 0 (their e_j = 0
     * times 1/NaN made them NaN above). */
    if (keep && sum != sum)
        for (j = 0; j < n; ++j)
            if (!keep[j]) out[j] = (T)0;
}
