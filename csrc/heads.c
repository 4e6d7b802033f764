/*
 * heads.c: head split and merge, pure data movement.
 *   split: x (B, S, H, D) strided view of (B, S, H*D) -> y (B, H, S, D) contiguous
 *   merge: x (B, H, S, D) strided                    -> y (B, S, H, D) contiguous
 * Each (b, s, h) moves one D-vector; when the D axis is contiguous that is a
 * memcpy of D*elem_size bytes (256 B for D = 64 floats), which keeps both the
 * reads and the writes in whole cache lines. Elements are moved as bytes, so
 * 2-byte (bfloat16, float16), 4-byte and 8-byte elements all work.
 */
#include <string.h>

#include "checked_size.h"
#include "fastattn.h"
#include "threads.h"

static void move_vec(char *dst, const char *src, int64_t src_stride, int64_t D,
                     int64_t es) {
    if (src_stride == 1) {
        /* The usual head sizes (32/64/128 elements of 2, 4 or 8 bytes) as constant-size
         * copies, which the compiler inlines as vector moves: a libc call per
         * 256-byte vector costs about as much as the copy itself. */
        switch (D * es) {
            case 64: memcpy(dst, src, 64); break;
            case 128: memcpy(dst, src, 128); break;
            case 256: memcpy(dst, src, 256); break;
            case 512: memcpy(dst, src, 512); break;
            case 1024: memcpy(dst, src, 1024); break;
            default: memcpy(dst, src, (size_t)(D * es));
        }
    } else {
        for (int64_t d = 0; d < D; ++d)
            memcpy(dst + d * es, src + d * src_stride * es, (size_t)es);
    }
}

/* The shared body of split and merge: for every (b, s, h), copy the
 * D-vector at src + b*ss[0] + s*ss[1] + h*ss[2] (elements, stride ss[3]
 * along D) to the contiguous D-vector at dst + b*ds[0] + s*ds[1] + h*ds[2].
 * Work is split over (b, s): one H*D row of the (B, S, H*D) side each. */
typedef struct {
    const char *src;
    char *dst;
    const int64_t *ss, *ds;
    int64_t S, H, D, rows;
    int es;
} heads_job;

/* This thread's static share of the (b, s) rows. */
static void move_rows(void *ctx, int t, int nthreads) {
    const heads_job *j = ctx;
    int64_t lo, hi;
    fa_partition(j->rows, nthreads, t, &lo, &hi);
    for (int64_t r = lo; r < hi; ++r) {
        const int64_t b = r / j->S, s = r % j->S;
        const char *from = j->src + (b * j->ss[0] + s * j->ss[1]) * j->es;
        char *to = j->dst + (b * j->ds[0] + s * j->ds[1]) * j->es;
        for (int64_t h = 0; h < j->H; ++h)
            move_vec(to + h * j->ds[2] * j->es, from + h * j->ss[2] * j->es, j->ss[3], j->D, j->es);
    }
}

static int move_heads(int es, const char *src, const int64_t ss[4], char *dst,
                      const int64_t ds[3], int64_t B, int64_t S, int64_t H, int64_t D,
                      int num_threads) {
    if (es != 2 && es != 4 && es != 8) return FA_ERR_INVALID;
    const int64_t dims[4] = {B, S, H, D};
    const int64_t total = fa_product(dims, 4);
    if (total < 0) return FA_ERR_OVERFLOW;
    if (total == 0) return FA_OK;
    if (src == NULL || dst == NULL) return FA_ERR_INVALID;
    const int64_t dense[4] = {S * H * D, H * D, D, 1};
    if (!fa_view_ok(dims, ss, 4, es) || !fa_view_ok(dims, dense, 4, es)) return FA_ERR_OVERFLOW;
    heads_job job = {src, dst, ss, ds, S, H, D, B * S, es};
    fa_run_team(fa_resolve_threads(num_threads, job.rows, total), move_rows, &job);
    return FA_OK;
}

int fa_split_heads(int elem_size, fa_view4 x, void *y, int64_t B, int64_t S, int64_t H,
                   int64_t D, int num_threads) {
    /* x (B, S, H, D) -> y (B, H, S, D) */
    const int64_t ds[3] = {H * S * D, D, S * D};
    return move_heads(elem_size, x.data, x.stride, y, ds, B, S, H, D, num_threads);
}

int fa_merge_heads(int elem_size, fa_view4 x, void *y, int64_t B, int64_t H, int64_t S,
                   int64_t D, int num_threads) {
    /* x (B, H, S, D) -> y (B, S, H, D): read x in (b, s, h) order */
    const int64_t ss[4] = {x.stride[0], x.stride[2], x.stride[1], x.stride[3]};
    const int64_t ds[3] = {S * H * D, H * D, D};
    return move_heads(elem_size, x.data, ss, y, ds, B, S, H, D, num_threads);
}
