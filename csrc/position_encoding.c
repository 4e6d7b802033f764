/*
 * position_encoding.c: sinusoidal position-encoding tables, and their fused
 * addition to an input, without materialising the table.
 *
 * Accuracy: angles in double, each block of positions from an exact libm
 * value and rotated from there (sincos_steps.h).
 */
#include <math.h>
#include <string.h>

#include "checked_size.h"
#include "fastattn.h"
#include "scratch.h"
#include "sincos_steps.h"
#include "threads.h"

typedef struct {
    int64_t channels, nfreq;   /* nfreq = number of sin columns */
    int64_t block;             /* positions per exact restart */
    int layout;
    const double *inv, *sin_step, *cos_step;
    int64_t start;
} pe_plan;

static int64_t pe_nfreq(int layout, int64_t channels) {
    return layout == 0 ? channels / 2 : (channels + 1) / 2;
}

/* inv[i]: the angular frequency of column pair i.
 * concat (tensor2tensor get_timing_signal_1d):
 *   min_ts * exp(-i * log(max_ts / min_ts) / max(n - 1, 1))
 * interleaved (the paper, with the same min_ts convention):
 *   min_ts * (max_ts / min_ts) ^ (-2i / channels) */
static void pe_frequencies(const fa_pe_params *p, int64_t channels, int64_t n,
                           double *inv) {
    const double ratio = p->max_timescale / p->min_timescale;
    const double increment = log(ratio) / (double)(n > 1 ? n - 1 : 1);
    for (int64_t i = 0; i < n; ++i) {
        if (p->layout == 0)
            inv[i] = p->min_timescale * exp(-(double)i * increment);
        else
            inv[i] = p->min_timescale * pow(ratio, -2.0 * (double)i / (double)channels);
    }
}

/* Writes the rows pos in [p0, p1) one at a time into `row` (channels, in T),
 * calling emit(row, pos, ctx) for each. s, c: nfreq doubles of scratch. */
#define FA_DEFINE_PE_ROWS(T)                                                          \
    static void pe_rows_##T(const pe_plan *pl, int64_t p0, int64_t p1, double *s,    \
                            double *c, T *row,                                       \
                            void (*emit)(const T *, int64_t, void *), void *ctx) {  \
        const int64_t n = pl->nfreq, C = pl->channels;                              \
        for (int64_t b0 = p0; b0 < p1; b0 += pl->block) {                            \
            const int64_t b1 = b0 + pl->block < p1 ? b0 + pl->block : p1;            \
            fa_sincos_exact(s, c, (double)(pl->start + b0), pl->inv, n);           \
            for (int64_t q = b0; q < b1; ++q) {                                      \
                if (pl->layout == 0) {                                               \
                    for (int64_t i = 0; i < n; ++i) {                                \
                        row[i] = (T)s[i];                                            \
                        row[n + i] = (T)c[i];                                        \
                    }                                                                \
                    if (C & 1) row[C - 1] = (T)0;                                    \
                } else {                                                             \
                    for (int64_t i = 0; i < n; ++i) {                                \
                        row[2 * i] = (T)s[i];                                        \
                        if (2 * i + 1 < C) row[2 * i + 1] = (T)c[i];                 \
                    }                                                                \
                }                                                                    \
                emit(row, q, ctx);                                                   \
                if (q + 1 == b1) break;                                              \
                fa_sincos_step(s, c, pl->sin_step, pl->cos_step, n);                 \
            }                                                                        \
        }                                                                            \
    }
FA_DEFINE_PE_ROWS(float)
FA_DEFINE_PE_ROWS(double)

/* What to do with each generated row. */
typedef struct {
    int64_t B, C, es;
    char *out;             /* table mode: row stride out_rs */
    int64_t out_rs;
    fa_view4 x, y;         /* add mode: (B, L, C) views */
} pe_sink;

#define FA_DEFINE_PE_EMIT(T)                                                         \
    static void emit_table_##T(const T *row, int64_t pos, void *ctx) {              \
        const pe_sink *k = (const pe_sink *)ctx;                                    \
        memcpy((T *)k->out + pos * k->out_rs, row, (size_t)k->C * sizeof(T));        \
    }                                                                                \
    static void emit_add_##T(const T *row, int64_t pos, void *ctx) {                \
        const pe_sink *k = (const pe_sink *)ctx;                                    \
        for (int64_t b = 0; b < k->B; ++b) {                                         \
            const T *x = (const T *)k->x.data + b * k->x.stride[0] + pos * k->x.stride[1]; \
            T *y = (T *)k->y.data + b * k->y.stride[0] + pos * k->y.stride[1];        \
            const int64_t xs = k->x.stride[2], ys = k->y.stride[2];                 \
            if (xs == 1 && ys == 1) {                                                \
                for (int64_t j = 0; j < k->C; ++j) y[j] = x[j] + row[j];             \
            } else {                                                                 \
                for (int64_t j = 0; j < k->C; ++j) y[j * ys] = x[j * xs] + row[j];   \
            }                                                                        \
        }                                                                            \
    }
FA_DEFINE_PE_EMIT(float)
FA_DEFINE_PE_EMIT(double)

typedef struct {
    int dtype, add;
    const pe_plan *plan;
    pe_sink *sink;
    char *scratch;
    int64_t per_thread, blocks, block, length;
} pe_job;

/* This thread's static share of the position blocks. */
static void pe_part(void *ctx, int t, int nthreads) {
    const pe_job *j = ctx;
    double *s = (double *)(j->scratch + t * j->per_thread), *c = s + j->plan->nfreq;
    void *row = c + j->plan->nfreq;
    int64_t lo, hi;
    fa_partition(j->blocks, nthreads, t, &lo, &hi);
    const int64_t p0 = lo * j->block, p1 = hi == j->blocks ? j->length : hi * j->block;
    if (j->dtype == FA_DTYPE_F32)
        pe_rows_float(j->plan, p0, p1, s, c, (float *)row,
                      j->add ? emit_add_float : emit_table_float, j->sink);
    else
        pe_rows_double(j->plan, p0, p1, s, c, (double *)row,
                       j->add ? emit_add_double : emit_table_double, j->sink);
}

static int pe_run(int dtype, int64_t length, int64_t channels, const fa_pe_params *p,
                  pe_sink *sink, int add, int num_threads) {
    if (dtype != FA_DTYPE_F32 && dtype != FA_DTYPE_F64) return FA_ERR_INVALID;
    if (p == NULL || (p->layout != 0 && p->layout != 1)) return FA_ERR_INVALID;
    if (!(p->min_timescale > 0) || !(p->max_timescale > 0)) return FA_ERR_INVALID;
    if (length < 0 || channels <= 0) return FA_ERR_INVALID;
    if (length == 0) return FA_OK;
    const int64_t es = dtype == FA_DTYPE_F32 ? 4 : 8;
    const int64_t n = pe_nfreq(p->layout, channels);
    /* start + length must not overflow when positions are formed */
    if (p->start_index > INT64_MAX - length) return FA_ERR_OVERFLOW;
    /* element count and per-thread scratch (s, c: n doubles each, one row
     * of T, rounded to 64 bytes) must fit in int64 */
    const int64_t counts[3] = {length, channels, add ? sink->B : 1};
    const int64_t work = fa_product(counts, 3);
    int64_t row_bytes, sc_bytes, per_thread;
    if (work < 0 || !fa_mul_ok(channels, es, &row_bytes) || !fa_mul_ok(n, 16, &sc_bytes) ||
        row_bytes > INT64_MAX - 63 - sc_bytes)
        return FA_ERR_OVERFLOW;
    per_thread = (sc_bytes + row_bytes + 63) & ~(int64_t)63;

    double *freq = fa_scratch_alloc(3 * (n > 0 ? n : 1), sizeof(double));
    if (freq == NULL) return FA_ERR_NOMEM;
    double *sstep = freq + n, *cstep = freq + 2 * n;
    pe_frequencies(p, channels, n, freq);
    fa_sincos_exact(sstep, cstep, 1.0, freq, n); /* the step: one position */
    const int64_t block = dtype == FA_DTYPE_F32 ? FA_SINCOS_BLOCK_F32 : FA_SINCOS_BLOCK_F64;
    const pe_plan plan = {channels, n, block, p->layout, freq, sstep, cstep, p->start_index};

    const int64_t blocks = length / block + (length % block != 0);
    const int nthreads = fa_resolve_threads(num_threads, blocks, work);
    char *scratch = fa_scratch_alloc(per_thread, nthreads);
    if (scratch == NULL) {
        fa_scratch_free(freq);
        return FA_ERR_NOMEM;
    }
    pe_job job = {dtype, add, &plan, sink, scratch, per_thread, blocks, block, length};
    fa_run_team(nthreads, pe_part, &job);
    fa_scratch_free(scratch);
    fa_scratch_free(freq);
    return FA_OK;
}

int fa_position_encoding(int dtype, void *out, int64_t out_row_stride, int64_t length,
                         int64_t channels, const fa_pe_params *p, int num_threads) {
    if (out == NULL && length > 0) return FA_ERR_INVALID;
    const int64_t dims[2] = {length, channels}, strides[2] = {out_row_stride, 1};
    if (!fa_view_ok(dims, strides, 2, dtype == FA_DTYPE_F32 ? 4 : 8)) return FA_ERR_OVERFLOW;
    pe_sink sink = {0};
    sink.C = channels;
    sink.out = out;
    sink.out_rs = out_row_stride;
    return pe_run(dtype, length, channels, p, &sink, 0, num_threads);
}

int fa_add_position_encoding(int dtype, fa_view4 x, fa_view4 y, int64_t B, int64_t length,
                             int64_t channels, const fa_pe_params *p, int num_threads) {
    const int64_t dims[3] = {B, length, channels};
    const int64_t es = dtype == FA_DTYPE_F32 ? 4 : 8;
    if (B < 0) return FA_ERR_INVALID;
    if (B == 0) return FA_OK;
    if (x.data == NULL || y.data == NULL) return FA_ERR_INVALID;
    if (!fa_view_ok(dims, x.stride, 3, es) || !fa_view_ok(dims, y.stride, 3, es))
        return FA_ERR_OVERFLOW;
    pe_sink sink = {0};
    sink.B = B;
    sink.C = channels;
    sink.x = x;
    sink.y = y;
    return pe_run(dtype, length, channels, p, &sink, 1, num_threads);
}
