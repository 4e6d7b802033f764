/*
 * heads.c: head split and merge, pure data movement.
 *   split: x (B, S, H, D) strided view of (B, S, H*D) -> y (B, H, S, D) contiguous
 *   merge: x (B, H, S, D) strided                    -> y (B, S, H, D) contiguous
 * Each (b, s, h) moves one D-vector; when the D axis is contiguous that is a
 * memcpy of D*elem_size bytes (256 B for D = 64 floats), which keeps both the
 * reads and the writes in whole cache lines. Work is split over (b, s) so a
 * thread writes (merge) or reads (split) one contiguous H*D row at a time.
 */
#include <string.h>

#include "internal.h"

static void move_vec(char *dst, const char *src, int64_t src_stride, int64_t D,
                     int64_t es) {
    if (src_stride == 1) {
        /* The usual head sizes (32/64/128 floats or doubles) as constant-size
         * copies, which the compiler inlines as vector moves: a libc call per
         * 256-byte vector costs about as much as the copy itself. */
        switch (D * es) {
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

static int check_args(int es, const fa_view4 *x, const void *y, const int64_t dims[4]) {
    if (es != 4 && es != 8) return FA_ERR_INVALID;
    const int64_t total = fa_product(dims, 4);
    if (total < 0) return FA_ERR_OVERFLOW;
    if (total == 0) return -1; /* nothing to do */
    if (x->data == NULL || y == NULL) return FA_ERR_INVALID;
    const int64_t unit[4] = {dims[1] * dims[2] * dims[3], dims[2] * dims[3], dims[3], 1};
    if (!fa_view_ok(dims, x->stride, 4, es) || !fa_view_ok(dims, unit, 4, es))
        return FA_ERR_OVERFLOW;
    return FA_OK;
}

int fa_split_heads(int elem_size, fa_view4 x, void *y, int64_t B, int64_t S, int64_t H,
                   int64_t D, int num_threads) {
    const int64_t dims[4] = {B, S, H, D};
    int st = check_args(elem_size, &x, y, dims);
    if (st != FA_OK) return st < 0 ? FA_OK : st;
    const int64_t es = elem_size, rows = B * S;
    const int nthreads = fa_resolve_threads(num_threads, rows, rows * H * D);
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
#endif
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t b = r / S, s = r % S;
        const char *src = (const char *)x.data + (b * x.stride[0] + s * x.stride[1]) * es;
        char *dst = (char *)y + ((b * H) * S + s) * D * es;
        for (int64_t h = 0; h < H; ++h)
            move_vec(dst + h * S * D * es, src + h * x.stride[2] * es, x.stride[3], D, es);
    }
    return FA_OK;
}

int fa_merge_heads(int elem_size, fa_view4 x, void *y, int64_t B, int64_t H, int64_t S,
                   int64_t D, int num_threads) {
    const int64_t dims[4] = {B, H, S, D};
    int st = check_args(elem_size, &x, y, dims);
    if (st != FA_OK) return st < 0 ? FA_OK : st;
    const int64_t es = elem_size, rows = B * S;
    const int nthreads = fa_resolve_threads(num_threads, rows, rows * H * D);
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
#endif
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t b = r / S, s = r % S;
        char *dst = (char *)y + r * H * D * es;
        const char *src = (const char *)x.data + (b * x.stride[0] + s * x.stride[2]) * es;
        for (int64_t h = 0; h < H; ++h)
            move_vec(dst + h * D * es, src + h * x.stride[1] * es, x.stride[3], D, es);
    }
    return FA_OK;
}
