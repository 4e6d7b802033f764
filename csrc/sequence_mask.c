/*
 * sequence_mask.c: the classic padding mask applied in place of a mask array.
 * x, y: (B, P, L, C); positions l >= lengths[b] along L are zeroed ("mul")
 * or lowered by 1e12 ("add"). Pure streaming: one read and one write per
 * element, parallel over (b, p, l) rows of C elements.
 */
#include <string.h>

#include "checked_size.h"
#include "fastattn.h"
#include "threads.h"

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

typedef struct {
    fa_view4 x, y;
    int64_t P, L, C;
    const int64_t *lengths;
    int dtype, mode;
    int64_t rows;
} seqmask_job;

/* This thread's static share of the (b, p, l) rows. */
static void seqmask_rows(void *ctx, int t, int nthreads) {
    const seqmask_job *j = ctx;
    int64_t lo, hi;
    fa_partition(j->rows, nthreads, t, &lo, &hi);
    for (int64_t r = lo; r < hi; ++r) {
        const int64_t l = r % j->L, bp = r / j->L, p = bp % j->P, b = bp / j->P;
        const int valid = l < j->lengths[b];
        const int64_t xo = b * j->x.stride[0] + p * j->x.stride[1] + l * j->x.stride[2];
        const int64_t yo = b * j->y.stride[0] + p * j->y.stride[1] + l * j->y.stride[2];
        if (j->dtype == FA_DTYPE_F32)
            seqmask_row_float((const float *)j->x.data + xo, j->x.stride[3],
                              (float *)j->y.data + yo, j->y.stride[3], j->C, valid, j->mode);
        else
            seqmask_row_double((const double *)j->x.data + xo, j->x.stride[3],
                               (double *)j->y.data + yo, j->y.stride[3], j->C, valid, j->mode);
    }
}

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

    seqmask_job job = {x, y, P, L, C, lengths, dtype, mode, B * P * L};
    fa_run_team(fa_resolve_threads(num_threads, job.rows, total), seqmask_rows, &job);
    return FA_OK;
}
