/*
 * rope.c: rotary position embedding (RoPE, Su et al. 2021), in two steps.
 *
 *   fa_rope_table: cos/sin of pos * base^(-2j/D) for a list of positions,
 *                  (n, D/2) each. Computed once per set of positions and
 *                  shared by every head (the layer caches it across calls),
 *                  so the trigonometry is off the per-head path.
 *   fa_rope_apply: x (N0, N1, L, D) -> y, rotating each row by the table row
 *                  that its index names: layout NEOX rotates the pairs
 *                  (j, j + D/2) (GPT-NeoX, LLaMA's rotate_half), GPTJ the
 *                  pairs (2j, 2j + 1); NONE only copies (the layer appends V
 *                  to a KV cache with it). y rows may be shifted per n0
 *                  (y_row_offset), which is how new keys land at the end of
 *                  each sequence of a ragged KV cache in the same pass.
 *
 * Why a table: a row of D = 128 needs 64 sin/cos pairs (tens of ns each in
 * double libm) but only 256 multiply-adds to rotate; the table moves the
 * libm calls from the B*H*L rows to the B*L (or L) positions.
 *
 * Accuracy: angles are formed and evaluated in double and rounded once to
 * the dtype. A run of consecutive positions advances each column by one
 * rotation from an exact libm value restarted every FA_SINCOS_BLOCK_F32
 * (float) or FA_SINCOS_BLOCK_F64 (double) positions (sincos_steps.h).
 *
 * The table is libm-bound (sin and cos in double), so it is computed here,
 * with baseline flags, the same way at every ISA level. The rotation of a
 * row is the selected ISA's kernel (rope_impl.h, through fa_kernels()).
 *
 * bfloat16 / float16 rows (fa_rope_apply with FA_DTYPE_BF16 / F16) take
 * float32 tables: each row is widened into a float row of scratch, rotated
 * there by the float kernel and rounded back to the dtype (nearest even)
 * as it is stored, so nothing wider than a row is ever made.
 */
#include <math.h>
#include <string.h>

#include "checked_size.h"
#include "half_rows.h"
#include "fastattn.h"
#include "kernel_table.h"
#include "scratch.h"
#include "sincos_steps.h"
#include "threads.h"

/* ---- the cos / sin table ------------------------------------------------- */

/* Positions [p0, p1) of the table, stored as float or double. s, c: (half)
 * the running sin / cos of this thread; ws, wc: (half) sin / cos of one
 * step of each column. Only runs of consecutive positions are stepped;
 * any other position restarts from libm. */
static void rope_table_rows(int dtype, void *cos_out, void *sin_out, int64_t half,
                            const int64_t *pos, int64_t start, const double *inv, double *s,
                            double *c, const double *ws, const double *wc, int64_t p0,
                            int64_t p1) {
    const int64_t block = dtype == FA_DTYPE_F32 ? FA_SINCOS_BLOCK_F32 : FA_SINCOS_BLOCK_F64;
    int64_t prev = 0, since = block;
    for (int64_t p = p0; p < p1; ++p) {
        const int64_t q = pos ? pos[p] : start + p;
        if (since < block && q - 1 == prev) {
            fa_sincos_step(s, c, ws, wc, half);
            ++since;
        } else {
            fa_sincos_exact(s, c, (double)q, inv, half);
            since = 1;
        }
        prev = q;
        if (dtype == FA_DTYPE_F32) {
            float *cs = (float *)cos_out + p * half, *sn = (float *)sin_out + p * half;
            for (int64_t j = 0; j < half; ++j) {
                cs[j] = (float)c[j];
                sn[j] = (float)s[j];
            }
        } else {
            double *cs = (double *)cos_out + p * half, *sn = (double *)sin_out + p * half;
            for (int64_t j = 0; j < half; ++j) {
                cs[j] = c[j];
                sn[j] = s[j];
            }
        }
    }
}

typedef struct {
    int dtype;
    void *cos_out, *sin_out;
    int64_t n, half;
    const int64_t *positions;
    int64_t start;
    double *inv; /* (half) frequencies, then 4 * half doubles of scratch a thread */
    int64_t per_thread;
} rope_table_job;

/* This thread's static share of the positions. */
static void rope_table_part(void *ctx, int t, int nthreads) {
    const rope_table_job *j = ctx;
    const int64_t half = j->half;
    double *s = j->inv + half + (int64_t)t * j->per_thread, *c = s + half;
    double *ws = c + half, *wc = ws + half;
    fa_sincos_exact(ws, wc, 1.0, j->inv, half); /* the step: one position */
    int64_t p0, p1;
    fa_partition(j->n, nthreads, t, &p0, &p1);
    rope_table_rows(j->dtype, j->cos_out, j->sin_out, half, j->positions, j->start, j->inv, s,
                    c, ws, wc, p0, p1);
}

int fa_rope_table(int dtype, void *cos_out, void *sin_out, int64_t n, int64_t half,
                  const int64_t *positions, int64_t start, double base, int num_threads) {
    if (dtype != FA_DTYPE_F32 && dtype != FA_DTYPE_F64) return FA_ERR_INVALID;
    if (n < 0 || half < 0 || !(base > 0.0) || !isfinite(base)) return FA_ERR_INVALID;
    int64_t total;
    if (!fa_mul_ok(n, half, &total)) return FA_ERR_OVERFLOW;
    if (total == 0) return FA_OK;
    if (cos_out == NULL || sin_out == NULL) return FA_ERR_INVALID;
    if (positions == NULL && start > INT64_MAX - n) return FA_ERR_OVERFLOW;
    /* a position costs ~half libm pairs: parallelise from a few hundred on */
    int64_t work;
    if (!fa_mul_ok(total, 64, &work)) work = INT64_MAX;
    const int nthreads = fa_resolve_threads(num_threads, n, work);
    int64_t per_thread, elems;
    if (!fa_mul_ok(half, 4, &per_thread) || !fa_mul_ok(per_thread, nthreads, &elems) ||
        elems > INT64_MAX - half)
        return FA_ERR_OVERFLOW;
    double *inv = fa_scratch_alloc(elems + half, sizeof(double));
    if (inv == NULL) return FA_ERR_NOMEM;
    /* theta_j = base^(-2j / D), D = 2 * half */
    for (int64_t j = 0; j < half; ++j)
        inv[j] = pow(base, -(double)(2 * j) / (double)(2 * half));
    rope_table_job job = {dtype, cos_out, sin_out, n, half, positions, start, inv, per_thread};
    fa_run_team(nthreads, rope_table_part, &job);
    fa_scratch_free(inv);
    return FA_OK;
}

/* ---- applying it ----------------------------------------------------------- */

typedef struct {
    const fa_rope_args *a;
    int dtype, rotate;
    int64_t es, half, D, N1, L, rows;
    float *scratch; /* 16-bit rows: a float row of D per thread, row_floats apart */
    int64_t row_floats;
} rope_apply_job;

static int rope_is_half(int dtype) { return dtype == FA_DTYPE_BF16 || dtype == FA_DTYPE_F16; }

/* This thread's static share of the (n0, n1, l) rows. */
static void rope_apply_rows(void *ctx, int t, int nthreads) {
    const rope_apply_job *j = ctx;
    const fa_rope_args *a = j->a;
    const int64_t es = j->es, half = j->half, L = j->L, N1 = j->N1;
    const fa_kernel_table *k = fa_kernels();
    const char *xb = a->x.data;
    char *yb = a->y.data;
    int64_t lo, hi;
    fa_partition(j->rows, nthreads, t, &lo, &hi);
    for (int64_t r = lo; r < hi; ++r) {
        const int64_t l = r % L, n1 = (r / L) % N1, n0 = r / (L * N1);
        if (a->rows && l >= a->rows[n0]) continue;
        const int64_t yl = l + (a->y_row_offset ? a->y_row_offset[n0] : 0);
        const char *xr = xb + (n0 * a->x.stride[0] + n1 * a->x.stride[1] + l * a->x.stride[2]) * es;
        char *yr = yb + (n0 * a->y.stride[0] + n1 * a->y.stride[1] + yl * a->y.stride[2]) * es;
        if (!j->rotate) {
            if (xr != yr) memmove(yr, xr, (size_t)(j->D * es));
            continue;
        }
        const int64_t ti =
            a->index[n0 * a->index_stride[0] + n1 * a->index_stride[1] + l * a->index_stride[2]];
        if (j->scratch) {
            float *row = j->scratch + (int64_t)t * j->row_floats;
            const float *cs = (const float *)a->cos + ti * half, *sn = (const float *)a->sin + ti * half;
            fa_half_row_to_f32(j->dtype, (const uint16_t *)xr, 1, j->D, row);
            k->rope_row_f32(row, row, cs, sn, half, a->layout);
            fa_f32_row_to_half(j->dtype, row, j->D, (uint16_t *)yr, 1);
        } else if (j->dtype == FA_DTYPE_F32)
            k->rope_row_f32((const float *)xr, (float *)yr, (const float *)a->cos + ti * half,
                            (const float *)a->sin + ti * half, half, a->layout);
        else
            k->rope_row_f64((const double *)xr, (double *)yr, (const double *)a->cos + ti * half,
                            (const double *)a->sin + ti * half, half, a->layout);
    }
}

int fa_rope_apply(int dtype, const fa_rope_args *a, int num_threads) {
    if (a == NULL || (dtype != FA_DTYPE_F32 && dtype != FA_DTYPE_F64 && !rope_is_half(dtype)))
        return FA_ERR_INVALID;
    if (a->layout != FA_ROPE_NONE && a->layout != FA_ROPE_NEOX && a->layout != FA_ROPE_GPTJ)
        return FA_ERR_INVALID;
    const int64_t N0 = a->N0, N1 = a->N1, L = a->L, D = a->D;
    if (N0 < 0 || N1 < 0 || L < 0 || D < 0) return FA_ERR_INVALID;
    const int rotate = a->layout != FA_ROPE_NONE;
    if (rotate && D % 2) return FA_ERR_INVALID;
    const int64_t es = rope_is_half(dtype) ? 2 : dtype == FA_DTYPE_F32 ? 4 : 8;
    /* the tables: float32 for 16-bit rows */
    const int64_t table_es = rope_is_half(dtype) ? 4 : es;
    const int64_t dims[4] = {N0, N1, L, D};
    const int64_t total = fa_product(dims, 4);
    if (total < 0) return FA_ERR_OVERFLOW;
    if (total == 0) return FA_OK;
    if (a->x.data == NULL || a->y.data == NULL) return FA_ERR_INVALID;
    if (D > 1 && (a->x.stride[3] != 1 || a->y.stride[3] != 1)) return FA_ERR_INVALID;
    if (!fa_view_ok(dims, a->x.stride, 4, es)) return FA_ERR_OVERFLOW;
    /* rows of n0: [0, nrows(n0)); y rows reach y_row_offset[n0] + nrows(n0) - 1 */
    int64_t yrows = 0;
    for (int64_t n = 0; n < N0; ++n) {
        const int64_t cnt = a->rows ? a->rows[n] : L;
        const int64_t o = a->y_row_offset ? a->y_row_offset[n] : 0;
        if (cnt < 0 || cnt > L || o < 0 || o > INT64_MAX - cnt) return FA_ERR_INVALID;
        if (o + cnt > yrows) yrows = o + cnt;
    }
    const int64_t ydims[4] = {N0, N1, yrows, D};
    if (!fa_view_ok(ydims, a->y.stride, 4, es)) return FA_ERR_OVERFLOW;
    const int64_t half = D / 2;
    if (rotate) {
        if (a->index == NULL || a->cos == NULL || a->sin == NULL || a->table_len < 0)
            return FA_ERR_INVALID;
        const int64_t ts[3] = {half, 0, 0}, tdims[3] = {a->table_len, 1, 1};
        if (!fa_view_ok(tdims, ts, 1, table_es)) return FA_ERR_OVERFLOW;
        const int64_t idims[3] = {N0, N1, L};
        if (!fa_view_ok(idims, a->index_stride, 3, 8)) return FA_ERR_OVERFLOW;
        /* every index must name a table row: checked before anything is written */
        for (int64_t n0 = 0; n0 < N0; ++n0)
            for (int64_t n1 = 0; n1 < N1; ++n1) {
                if (n1 > 0 && a->index_stride[1] == 0) break;
                const int64_t cnt = a->rows ? a->rows[n0] : L;
                for (int64_t l = 0; l < cnt; ++l) {
                    const int64_t t = a->index[n0 * a->index_stride[0] +
                                               n1 * a->index_stride[1] + l * a->index_stride[2]];
                    if (t < 0 || t >= a->table_len) return FA_ERR_INVALID;
                }
            }
    }
    const int64_t rows = N0 * N1 * L;
    const int nthreads = fa_resolve_threads(num_threads, rows, total);
    rope_apply_job job = {a, dtype, rotate, es, half, D, N1, L, rows, NULL, 0};
    if (rotate && rope_is_half(dtype)) {
        /* whole 64-byte lines per thread, so threads never share one */
        job.row_floats = (D + 15) / 16 * 16;
        int64_t count;
        if (!fa_mul_ok(job.row_floats, nthreads, &count)) return FA_ERR_OVERFLOW;
        job.scratch = fa_scratch_alloc(count, sizeof(float));
        if (job.scratch == NULL) return FA_ERR_NOMEM;
    }
    fa_run_team(nthreads, rope_apply_rows, &job);
    fa_scratch_free(job.scratch);
    return FA_OK;
}
