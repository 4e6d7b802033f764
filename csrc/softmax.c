/*
 * softmax.c: the fused masked softmax driver. It walks the rows of
 * x (B, M, Lq, Lk), works out each row's valid key prefix from key_len and
 * causality without building any mask, gathers strided rows when needed and
 * calls the selected ISA's row kernel (softmax_impl.h).
 *
 * bfloat16 and float16 rows (x and y of one such dtype) are widened into a
 * float row of scratch, computed by the float row kernel (float32
 * exponentials, max and sum) and rounded back to the dtype once per
 * element, to nearest even, as they are stored; additive masks are float32
 * then (widening a 16-bit mask into them is exact). No array wider than a
 * row is ever made.
 */
#include <string.h>

#include "cache_hints.h"
#include "checked_size.h"
#include "half_rows.h"
#include "kernel_table.h"
#include "scratch.h"
#include "threads.h"
#include "valid_lengths.h"

/* Outputs at least this large are written with non-temporal stores: 16 MiB
 * is past the L2s and most of a shared L3, so the rows will not be read
 * back from cache anyway and skipping the read-for-ownership saves a third
 * of the memory traffic. Smaller outputs stay cached for their consumer. */
#define FA_SOFTMAX_STREAM_BYTES (16 << 20)
/* How many rows ahead the x rows are requested. With the requests paced by
 * pass 2 (fa_prefetch_cursor), the next row was best: 1 took 6-13% less
 * time than 2, and 3 or 4 were no better than 2, on (8, 12, 512, 512)
 * float32, 2 threads, Zen 3. */
#ifndef FA_SOFTMAX_PREFETCH_ROWS
#define FA_SOFTMAX_PREFETCH_ROWS 1
#endif

/* Keys [0, n_valid) of row i may be attended; keys after it are zero. */
static int64_t valid_keys(int64_t i, int64_t Lq, int64_t Lk, int64_t key_len,
                          int causal) {
    int64_t n = key_len < Lk ? key_len : Lk;
    int64_t limit = Lk;
    if (causal == FA_CAUSAL_TOP_LEFT) limit = i + 1;
    else if (causal == FA_CAUSAL_BOTTOM_RIGHT) limit = i + 1 + (Lk - Lq);
    if (limit < n) n = limit;
    return n < 0 ? 0 : n;
}

/* Copy n elements of esize bytes at element stride s into contiguous dst and
 * return dst, or return src unchanged when it already is contiguous. */
static const void *gather(const void *src, int64_t s, int64_t n, int64_t esize,
                          void *dst) {
    if (s == 1) return src;
    const char *from = (const char *)src;
    char *to = (char *)dst;
    for (int64_t j = 0; j < n; ++j) memcpy(to + j * esize, from + j * s * esize, (size_t)esize);
    return dst;
}

typedef struct {
    fa_view4 x, y;
    int64_t B, M, Lq, Lk, esize;
    double scale;
    const fa_mask_view *mask;
    const fa_lengths_view *key_len, *query_len;
    int causal, dtype, stream;
} softmax_job;

static int is_half(int dtype) { return dtype == FA_DTYPE_BF16 || dtype == FA_DTYPE_F16; }

/* Bytes of one additive-mask element: float32 for 16-bit scores. */
static int64_t add_mask_esize(int dtype) { return is_half(dtype) ? 4 : dtype == FA_DTYPE_F32 ? 4 : 8; }

/* A row of the flattened (B, M, Lq) row index as (b, m, i): found with
 * divisions once per block of rows, then stepped without any. */
typedef struct {
    int64_t b, m, i;
} row_pos;

static row_pos pos_of(const softmax_job *job, int64_t r) {
    const int64_t bm = r / job->Lq;
    return (row_pos){bm / job->M, bm % job->M, r % job->Lq};
}

static void pos_step(const softmax_job *job, row_pos *p) {
    if (++p->i < job->Lq) return;
    p->i = 0;
    if (++p->m < job->M) return;
    p->m = 0;
    ++p->b;
}

/* The valid key count of the row at p and the address of its x row. */
static int64_t row_valid(const softmax_job *job, row_pos p, const char **xrow) {
    *xrow = (const char *)job->x.data +
            (p.b * job->x.stride[0] + p.m * job->x.stride[1] + p.i * job->x.stride[2]) * job->esize;
    if (p.i >= fa_length_at(job->query_len, p.b, p.m, job->Lq)) return 0;
    return valid_keys(p.i, job->Lq, job->Lk, fa_length_at(job->key_len, p.b, p.m, job->Lk), job->causal);
}

/* One 16-bit row of n valid keys (of Lk): x at element stride xs widened
 * into xbuf, the float row kernel into ybuf, then y (element stride ys)
 * rounded from ybuf, its masked tail zero (0x0000 in both formats). */
static void softmax_half_row(const softmax_job *job, const fa_kernel_table *k, const char *xrow,
                             char *yrow, int64_t n, const void *mrow, int mkind, float *xbuf,
                             float *ybuf) {
    const int64_t ys = job->y.stride[3];
    fa_half_row_to_f32(job->dtype, (const uint16_t *)xrow, job->x.stride[3], n, xbuf);
    k->softmax_row_f32(xbuf, ybuf, n, (float)job->scale, mrow, mkind, NULL, 0, NULL);
    uint16_t *y = (uint16_t *)yrow;
    fa_f32_row_to_half(job->dtype, ybuf, n, y, ys);
    for (int64_t j = n; j < job->Lk; ++j) y[j * ys] = 0;
}

/* Rows [lo, hi) of the flattened (B, M, Lq) row index. scratch holds an x
 * row, a y row (also the streaming stage) and a mask row; for 16-bit rows,
 * float ones. */
static void softmax_rows(const softmax_job *job, int64_t lo, int64_t hi, char *scratch) {
    const fa_kernel_table *k = fa_kernels();
    const int64_t M = job->M, Lq = job->Lq, Lk = job->Lk, es = job->esize;
    const fa_mask_view *mask = job->mask;
    const int mkind = mask && mask->data ? mask->kind : FA_MASK_NONE;
    const int half = is_half(job->dtype);
    const int64_t mes = mkind == FA_MASK_BOOL ? 1 : add_mask_esize(job->dtype);
    const int64_t ses = half ? 4 : es; /* bytes of a scratch row element */
    char *xbuf = scratch, *ybuf = scratch ? scratch + Lk * ses : NULL;
    char *mbuf = scratch ? scratch + 2 * Lk * ses : NULL;
    const int64_t ys = job->y.stride[3];

    /* The valid keys of the row FA_SOFTMAX_PREFETCH_ROWS ahead are requested
     * while this row is computed, a line per line of this row that pass 2
     * exponentiates (fa_prefetch_cursor), so that the load overlaps the
     * exponentials; rows past this block are usually this thread's next
     * block (chunks are 16 consecutive blocks). */
    const int prefetch = job->stream && job->x.stride[3] == 1;
    const int64_t all_rows = job->B * M * Lq;
    /* valid counts and x rows of the next FA_SOFTMAX_PREFETCH_ROWS rows, each
     * worked out once, when the row is FA_SOFTMAX_PREFETCH_ROWS ahead */
    const char *ahead_x[FA_SOFTMAX_PREFETCH_ROWS] = {NULL};
    int64_t ahead_n[FA_SOFTMAX_PREFETCH_ROWS] = {0};
    row_pos cur = pos_of(job, lo), ahead = cur;
    fa_prefetch_cursor pf = {NULL, 0};
    for (int64_t p = 0; p < FA_SOFTMAX_PREFETCH_ROWS && lo + p < all_rows; ++p) {
        ahead_n[p] = row_valid(job, ahead, &ahead_x[p]);
        if (prefetch) fa_prefetch(ahead_x[p], ahead_n[p] * es);
        pos_step(job, &ahead);
    }
    for (int64_t r = lo; r < hi; ++r, pos_step(job, &cur), pos_step(job, &ahead)) {
        const int64_t i = cur.i, m = cur.m, b = cur.b;
        char *yrow = (char *)job->y.data +
                     (b * job->y.stride[0] + m * job->y.stride[1] + i * job->y.stride[2]) * es;
        const int slot = (int)((r - lo) % FA_SOFTMAX_PREFETCH_ROWS);
        const char *xrow = ahead_x[slot];
        const int64_t n = ahead_n[slot];
        if (r + FA_SOFTMAX_PREFETCH_ROWS < all_rows) { /* the slot now holds that row */
            ahead_n[slot] = row_valid(job, ahead, &ahead_x[slot]);
            if (prefetch) fa_prefetch_retarget(&pf, ahead_x[slot], ahead_n[slot] * es);
        }
        if (n > 0) {
            const void *mrow = NULL;
            if (mkind != FA_MASK_NONE) {
                const int64_t off = b * mask->stride_b + m * mask->stride_m + i * mask->stride_q;
                mrow = gather((const char *)mask->data + off * mes, mask->stride_k, n, mes, mbuf);
            }
            if (half) {
                softmax_half_row(job, k, xrow, yrow, n, mrow, mkind, (float *)xbuf, (float *)ybuf);
                continue;
            }
            const void *xc = gather(xrow, job->x.stride[3], n, es, xbuf);
            void *yc = ys == 1 ? (void *)yrow : (void *)ybuf;
            void *stage = job->stream && ys == 1 ? (void *)ybuf : NULL;
            /* a contiguous row's masked tail is zeroed by the row kernel */
            const int64_t n_zero = ys == 1 ? Lk - n : 0;
            if (job->dtype == FA_DTYPE_F32)
                k->softmax_row_f32((const float *)xc, (float *)yc, n, (float)job->scale, mrow,
                                   mkind, (float *)stage, n_zero, prefetch ? &pf : NULL);
            else
                k->softmax_row_f64((const double *)xc, (double *)yc, n, job->scale, mrow, mkind,
                                   (double *)stage, n_zero, prefetch ? &pf : NULL);
            if (ys != 1) {
                for (int64_t j = 0; j < n; ++j) memcpy(yrow + j * ys * es, ybuf + j * es, (size_t)es);
                for (int64_t j = n; j < Lk; ++j) memset(yrow + j * ys * es, 0, (size_t)es);
            }
        } else if (ys == 1) {
            memset(yrow, 0, (size_t)(Lk * es)); /* 0 bits are +0 in every dtype */
        } else {
            for (int64_t j = 0; j < Lk; ++j) memset(yrow + j * ys * es, 0, (size_t)es);
        }
    }
    fa_prefetch_retarget(&pf, NULL, 0);
    if (job->stream) fa_store_fence();
}

int fa_masked_softmax(int dtype, fa_view4 x, fa_view4 y, int64_t B, int64_t M,
                      int64_t Lq, int64_t Lk, double scale,
                      const fa_mask_view *mask, const fa_lengths_view *key_len,
                      const fa_lengths_view *query_len, int causal,
                      int num_threads) {
    if (dtype != FA_DTYPE_F32 && dtype != FA_DTYPE_F64 && !is_half(dtype)) return FA_ERR_INVALID;
    if (causal < FA_CAUSAL_NONE || causal > FA_CAUSAL_BOTTOM_RIGHT) return FA_ERR_INVALID;
    const int64_t dims[4] = {B, M, Lq, Lk};
    const int64_t esize = is_half(dtype) ? 2 : dtype == FA_DTYPE_F32 ? 4 : 8;
    const int64_t total = fa_product(dims, 4);
    if (total < 0) return FA_ERR_OVERFLOW;
    if (total == 0) return FA_OK;
    if (x.data == NULL || y.data == NULL) return FA_ERR_INVALID;
    if (!fa_view_ok(dims, x.stride, 4, esize) || !fa_view_ok(dims, y.stride, 4, esize))
        return FA_ERR_OVERFLOW;
    if (mask && mask->data) {
        if (mask->kind != FA_MASK_BOOL && mask->kind != FA_MASK_ADD) return FA_ERR_INVALID;
        const int64_t ms[4] = {mask->stride_b, mask->stride_m, mask->stride_q, mask->stride_k};
        if (!fa_view_ok(dims, ms, 4, mask->kind == FA_MASK_BOOL ? 1 : add_mask_esize(dtype)))
            return FA_ERR_OVERFLOW;
    }

    const int64_t rows = B * M * Lq;
    const int nthreads = fa_resolve_threads(num_threads, rows, total);

    /* Scratch when some operand is strided along the key axis, or to stage
     * rows that are streamed out. */
    int64_t out_bytes;
    const int stream = !is_half(dtype) && fa_mul_ok(total, esize, &out_bytes) &&
                       out_bytes >= FA_SOFTMAX_STREAM_BYTES;
    /* 16-bit rows always work in float scratch rows */
    const int strided = x.stride[3] != 1 || y.stride[3] != 1 || stream || is_half(dtype) ||
                        (mask && mask->data && mask->stride_k != 1);
    char *scratch = NULL;
    int64_t per_thread = 0;
    if (strided) {
        /* xbuf + ybuf + mask row (the mask row in the widest element:
         * float for 16-bit rows, whose scratch rows are float too) */
        if (!fa_mul_ok(Lk, 3 * (is_half(dtype) ? 4 : esize), &per_thread) || per_thread > INT64_MAX - 63)
            return FA_ERR_OVERFLOW;
        per_thread = (per_thread + 63) & ~(int64_t)63;
        scratch = fa_scratch_alloc(per_thread, nthreads);
        if (scratch == NULL) return FA_ERR_NOMEM;
    }
    const softmax_job job = {x, y, B, M, Lq, Lk, esize, scale, mask,
                             key_len, query_len, causal, dtype, stream};
    if (nthreads == 1) {
        softmax_rows(&job, 0, rows, scratch);
    } else {
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
#endif
        {
            /* Rows are independent, so any schedule gives the same bits;
             * dynamic chunks balance rows whose valid lengths differ (key
             * lengths, causality). A chunk is 16 blocks of 16 rows: 256
             * rows of 512 keys are ~0.1 ms of work, far above the cost of
             * taking a chunk, and a block is the unit of one store fence. */
            char *mine = scratch ? scratch + fa_thread_id() * per_thread : NULL;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 16)
#endif
            for (int64_t r0 = 0; r0 < rows; r0 += 16)
                softmax_rows(&job, r0, r0 + 16 < rows ? r0 + 16 : rows, mine);
        }
    }
    fa_scratch_free(scratch);
    return FA_OK;
}
