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
 *   2. e_j = exp(t_j - max) into y, summed with two accumulators;
 *   3. y_j *= 1 / sum (one division per row).
 * With a stage buffer, passes 1 and 2 work in it and pass 3 writes y with
 * non-temporal stores: for outputs much larger than the caches this saves
 * the read-for-ownership of every y line (3 memory transfers per element
 * become 2, as in a copy).
 * Two independent accumulators hide the 4-cycle FMA/max latency; more gave
 * nothing measurable on rows of 128 to 4096 keys.
 * A row whose max is -inf has no valid key: it is written as zeros, never
 * NaN. NaN in a kept score makes the sum NaN and so the whole row NaN, as
 * NumPy's softmax would.
 */
#include "simd_dtype.h"

void FA_KNAME(softmax_row, DT)(const T *x, T *y, int64_t n, T scale,
                                      const void *mask_row, int mask_kind, T *stage,
                                      int64_t n_zero) {
    T *const out = y;
    if (stage) y = stage;
    const uint8_t *keep = mask_kind == FA_MASK_BOOL ? (const uint8_t *)mask_row : NULL;
    const T *add = mask_kind == FA_MASK_ADD ? (const T *)mask_row : NULL;
    const V vscale = V_SET1(scale);
    const T neg_inf = (T)-INFINITY;

    /* pass 1: scale, mask, max */
    V m0 = V_SET1(neg_inf), m1 = V_SET1(neg_inf);
    int64_t j = 0;
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
    T mx = V_HMAX(V_MAX(m0, m1));
    for (; j < n; ++j) {
        T t = x[j] * scale;
        if (add) t += add[j];
        if (keep && !keep[j]) t = neg_inf;
        y[j] = t;
        mx = t > mx ? t : mx;
    }
    /* A NaN may have been dropped by max; it still poisons the sum below.
     * A max of -inf means no key is above -inf -- unless max skipped a NaN
     * (a NaN is the only kept score, or the others are -inf): that row must
     * come out NaN, not empty. The scan runs only for such rows. */
    if (mx == neg_inf) {
        int64_t q = 0;
        while (q < n && y[q] == y[q]) ++q;
        if (q == n) {
            memset(out, 0, (size_t)(n + n_zero) * sizeof(T));
            return;
        }
        mx = y[q]; /* NaN: every e_j and the sum become NaN */
    }

    /* pass 2: exponentiate and sum */
    const V vmx = V_SET1(mx);
    V s0 = V_ZERO(), s1 = V_ZERO();
    j = 0;
    for (; j + 2 * VL <= n; j += 2 * VL) {
        V a = V_EXP_NONPOS(V_SUB(V_LOADU(y + j), vmx));
        V b = V_EXP_NONPOS(V_SUB(V_LOADU(y + j + VL), vmx));
        V_STOREU(y + j, a);
        V_STOREU(y + j + VL, b);
        s0 = V_ADD(s0, a);
        s1 = V_ADD(s1, b);
    }
    T sum = V_HSUM(V_ADD(s0, s1));
    for (; j < n; ++j) {
        T e = S_EXP(y[j] - mx);
        y[j] = e;
        sum += e;
    }

    /* pass 3: normalise */
    const T inv = (T)1 / sum;
    const V vinv = V_SET1(inv);
    j = 0;
    if (stage) {
        /* scalar head up to the vector alignment that streaming stores need;
         * the masked tail is streamed too, so no output line is ever read */
        const int64_t end = n + n_zero;
        for (; j < n && ((uintptr_t)(out + j) % (VL * sizeof(T))) != 0; ++j) out[j] = y[j] * inv;
        for (; j + VL <= n; j += VL) V_STREAM(out + j, V_MUL(V_LOADU(y + j), vinv));
        for (; j < n; ++j) out[j] = y[j] * inv;
        for (; j < end && ((uintptr_t)(out + j) % (VL * sizeof(T))) != 0; ++j) out[j] = (T)0;
        for (; j + VL <= end; j += VL) V_STREAM(out + j, V_ZERO());
        for (; j < end; ++j) out[j] = (T)0;
        fa_stream_fence();
    } else {
        for (; j + VL <= n; j += VL) V_STOREU(y + j, V_MUL(V_LOADU(y + j), vinv));
        for (; j < n; ++j) y[j] *= inv;
        if (n_zero) memset(y + n, 0, (size_t)n_zero * sizeof(T));
    }
    /* A NaN row: keys the bool mask drops are still exactly 0 (their e_j = 0
     * times 1/NaN made them NaN above). */
    if (keep && sum != sum)
        for (j = 0; j < n; ++j)
            if (!keep[j]) out[j] = (T)0;
}
