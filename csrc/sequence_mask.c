/*
 * sequence_mask.c: the classic padding mask applied in place of a mask array.
 * x, y: (B, P, L, C); positions l >= lengths[b] along L are zeroed ("mul")
 * or lowered by 1e12 ("add"). Pure streaming: one read and one write per
 * element, parallel over (b, p, l) rows of C elements.
 */
#include <string.h>

#include "internal.h"

/* The "add" mode's penalty: large enough that exp(score - 1e12) is 0 in
 * float and double, as in the classic formula x - (1 - mask) * 1e12. */
#define FA_SEQMASK_PENALTY 1e12

#define FA_DEFINE_SEQMASK_ROW(T)                                                    \
    static void seqmask_row_##T(const T *x, int64_t xs, T *y, int64_t ys, int64_t C, \
                                int valid, int mode) {                              \
        if (valid) {                                                                \
            if (x == y && xs == ys) return;                                         \
            for (int64_t c = 0; c < C; ++c) y[c * ys] = x[c * xs];                  \
        } else if (mode == FA_SEQMASK_MUL) {                                        \
            for (int64_t c = 0; c < C; ++c) y[c * ys] = (T)0;                       \
        } else {                                                                    \
            const T pen = (T)FA_SEQMASK_PENALTY;                                    \
            for (int64_t c = 0; c < C; ++c) y[c * ys] = x[c * xs] - pen;            \
        }                                                                           \
    }
FA_DEFINE_SEQMASK_ROW(float)
FA_DEFINE_SEQMASK_ROW(double)

int fa_apply_sequence_mask(int dtype, fa_view4 x, fa_view4 y, int64_t B, int64_t P,
                           int64_t L, int64_t C, const int64_t *lengths, int mode,
                           int num_threads) {
    if (dtype != FA_DTYPE_F32 && dtype != FA_DTYPE_F64) return FA_ERR_INVALID;
    if (mode != FA_SEQMASK_MUL && mode != FA_SEQMASK_ADD) return FA_ERR_INVALID;
    const int64_t dims[4] = {B, P, L, C};
    const int64_t es = dtype == FA_DTYPE_F32 ? 4 : 8;
    const int64_t total = fa_product(dims, 4);
    if (total < 0) return FA_ERR_OVERFLOW;
    if (total == 0) return FA_OK;
    if (x.data == NULL || y.data == NULL || lengths == NULL) return FA_ERR_INVALID;
    if (!fa_view_ok(dims, x.stride, 4, es) || !fa_view_ok(dims, y.stride, 4, es))
        return FA_ERR_OVERFLOW;

    const int64_t rows = B * P * L;
    const int nthreads = fa_resolve_threads(num_threads, rows, total);
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
#endif
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t l = r % L, bp = r / L, p = bp % P, b = bp / P;
        const int valid = l < lengths[b];
        const int64_t xo = b * x.stride[0] + p * x.stride[1] + l * x.stride[2];
        const int64_t yo = b * y.stride[0] + p * y.stride[1] + l * y.stride[2];
        if (dtype == FA_DTYPE_F32)
            seqmask_row_float((const float *)x.data + xo, x.stride[3],
                              (float *)y.data + yo, y.stride[3], C, valid, mode);
        else
            seqmask_row_double((const double *)x.data + xo, x.stride[3],
                               (double *)y.data + yo, y.stride[3], C, valid, mode);
    }
    return FA_OK;
}
