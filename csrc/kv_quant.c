/*
 * kv_quant.c: symmetric int8 quantisation of K/V rows (one scale per token
 * per head) and its inverse. The attention kernel reads the int8 values and
 * the scales directly (attention_impl.h); these functions fill a cache and
 * serve the oracle tests.
 *
 * Bit-exact contract with fastattn.reference.quantize_kv: every step is one
 * IEEE float operation (max of |x|, one division by 127, one division per
 * element, round half to even), so plain NumPy in float32 reproduces it.
 * A division rather than a multiplication by a reciprocal keeps that true.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "fastattn.h"
#include "checked_size.h"
#include "threads.h"

/* x (D), q (D), one scale. */
static void quantize_row(const float *x, int64_t D, int8_t *q, float *scale) {
    float amax = 0.0f;
    int nan = 0;
    for (int64_t d = 0; d < D; ++d) {
        const float a = fabsf(x[d]);
        if (a != a) nan = 1;
        amax = a > amax ? a : amax;
    }
    const float s = nan ? NAN : amax / 127.0f;
    *scale = s;
    /* zero, NaN or infinite scale: nothing finite to encode */
    if (!(s > 0.0f) || s == INFINITY) {
        for (int64_t d = 0; d < D; ++d) q[d] = 0;
        return;
    }
    for (int64_t d = 0; d < D; ++d) {
        float r = rintf(x[d] / s);
        /* |x| <= amax, so |x / s| <= 127 up to one rounding: clamp anyway */
        r = r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r;
        q[d] = (int8_t)r;
    }
}

/* The three views of one call: FA_OK, or why not. */
static int check_views(const fa_view4 *a, int64_t es_a, const fa_view4 *q,
                       const fa_view4 *s, int64_t B, int64_t H, int64_t L, int64_t D) {
    if (B < 0 || H < 0 || L < 0 || D < 0) return FA_ERR_INVALID;
    const int64_t dims[4] = {B, H, L, D}, sdims[3] = {B, H, L};
    if (fa_product(sdims, 3) == 0) return FA_OK; /* no rows: nothing is addressed */
    if (s->data == NULL || (D > 0 && (a->data == NULL || q->data == NULL))) return FA_ERR_INVALID;
    if (D > 1 && (a->stride[3] != 1 || q->stride[3] != 1)) return FA_ERR_INVALID;
    if (!fa_view_ok(dims, a->stride, 4, es_a) || !fa_view_ok(dims, q->stride, 4, 1) ||
        !fa_view_ok(sdims, s->stride, 3, 4))
        return FA_ERR_OVERFLOW;
    return FA_OK;
}

int fa_quantize_kv(fa_view4 x, fa_view4 values, fa_view4 scales, int64_t B, int64_t H,
                   int64_t L, int64_t D, int num_threads) {
    const int st = check_views(&x, 4, &values, &scales, B, H, L, D);
    if (st != FA_OK || B == 0 || H == 0 || L == 0) return st;
    const int64_t rows = B * H * L; /* fits: the views were checked */
    /* a row is the unit of work: its scale needs all of it */
    const int nthreads = fa_resolve_threads(num_threads, rows, rows * (D > 0 ? D : 1));
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
#endif
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t l = r % L, h = r / L % H, b = r / L / H;
        quantize_row((const float *)x.data + b * x.stride[0] + h * x.stride[1] + l * x.stride[2],
                     D,
                     (int8_t *)values.data + b * values.stride[0] + h * values.stride[1] +
                         l * values.stride[2],
                     (float *)scales.data + b * scales.stride[0] + h * scales.stride[1] +
                         l * scales.stride[2]);
    }
    (void)nthreads;
    return FA_OK;
}

int fa_dequantize_kv(fa_view4 values, fa_view4 scales, fa_view4 y, int64_t B, int64_t H,
                     int64_t L, int64_t D, int num_threads) {
    const int st = check_views(&y, 4, &values, &scales, B, H, L, D);
    if (st != FA_OK || B == 0 || H == 0 || L == 0 || D == 0) return st;
    const int64_t rows = B * H * L;
    const int nthreads = fa_resolve_threads(num_threads, rows, rows * D);
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
#endif
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t l = r % L, h = r / L % H, b = r / L / H;
        const int8_t *q = (const int8_t *)values.data + b * values.stride[0] +
                          h * values.stride[1] + l * values.stride[2];
        const float s = ((const float *)scales.data)[b * scales.stride[0] + h * scales.stride[1] +
                                                     l * scales.stride[2]];
        float *o = (float *)y.data + b * y.stride[0] + h * y.stride[1] + l * y.stride[2];
        for (int64_t d = 0; d < D; ++d) o[d] = (float)q[d] * s;
    }
    (void)nthreads;
    return FA_OK;
}
