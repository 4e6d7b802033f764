/*
 * internal.h: what the C files share and Cython never sees: the per-ISA
 * kernel table, checked size arithmetic and the OpenMP helpers.
 */
#ifndef FASTATTN_INTERNAL_H
#define FASTATTN_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "fastattn.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* ---- per-ISA kernels ---------------------------------------------------- */

/* One softmax row. x, y: (n) contiguous; y may equal x.
 * mask_row: NULL, or (n) contiguous uint8 (mask_kind FA_MASK_BOOL) or (n)
 * contiguous values of the row's dtype (FA_MASK_ADD).
 * Writes y_j = softmax(x * scale + add)_j over the keys the bool mask keeps;
 * kept-out keys get exactly 0. A row whose maximum is -inf (nothing valid)
 * is written as zeros. */
typedef void fa_softmax_row_f32_fn(const float *x, float *y, int64_t n,
                                   float scale, const void *mask_row,
                                   int mask_kind);
typedef void fa_softmax_row_f64_fn(const double *x, double *y, int64_t n,
                                   double scale, const void *mask_row,
                                   int mask_kind);

typedef struct {
    int isa;
    fa_softmax_row_f32_fn *softmax_row_f32;
    fa_softmax_row_f64_fn *softmax_row_f64;
} fa_kernel_table;

/* The table of the selected ISA; never NULL. */
const fa_kernel_table *fa_kernels(void);

/* Every kernel each ISA file exports, as X(name, dtype-suffix, fn-type);
 * dispatch.c expands it into declarations and into one table per ISA. */
#define FA_KERNEL_LIST(X)                                  \
    X(softmax_row, f32, fa_softmax_row_f32_fn)             \
    X(softmax_row, f64, fa_softmax_row_f64_fn)

/* ---- checked arithmetic -------------------------------------------------- */

/* r = a * b for non-negative a, b; returns 0 on overflow or negative input. */
static inline int fa_mul_ok(int64_t a, int64_t b, int64_t *r) {
    if (a < 0 || b < 0) return 0;
    if (a != 0 && b > INT64_MAX / a) return 0;
    *r = a * b;
    return 1;
}

/* Product of n non-negative sizes, or -1 on overflow / negative input. */
static inline int64_t fa_product(const int64_t *dims, int n) {
    int64_t r = 1;
    for (int i = 0; i < n; ++i)
        if (!fa_mul_ok(r, dims[i], &r)) return -1;
    return r;
}

/* 1 when every element offset of a view with these dims and strides fits in
 * int64 and in the address space (the largest |offset| times elem_size). */
int fa_view_ok(const int64_t *dims, const int64_t *strides, int n,
               int64_t elem_size);

/* ---- threads ------------------------------------------------------------- */

/* Work below this many elements runs on one thread: an OpenMP fork/join costs
 * a few microseconds, about what two cores spend on ~32K float ops. */
#define FA_MIN_PARALLEL_ELEMS 32768

/* Thread count for a call: the request (or the OpenMP default when <= 0),
 * capped by the number of independent work items and forced to 1 for work
 * smaller than FA_MIN_PARALLEL_ELEMS elements. */
int fa_resolve_threads(int requested, int64_t work_items, int64_t total_elems);

static inline int fa_thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* Split [0, n) into nthreads contiguous ranges; thread t gets [*lo, *hi). A
 * static partition keeps each thread's rows fixed, which keeps results
 * independent of scheduling. */
static inline void fa_partition(int64_t n, int nthreads, int t, int64_t *lo,
                                int64_t *hi) {
    int64_t base = n / nthreads, rem = n % nthreads;
    *lo = t * base + (t < rem ? t : rem);
    *hi = *lo + base + (t < rem ? 1 : 0);
}

/* Aligned scratch (64 bytes: one cache line, one AVX-512 register). Returns
 * NULL on overflow or failure. */
void *fa_scratch_alloc(int64_t count, int64_t elem_size);
void fa_scratch_free(void *p);

#endif /* FASTATTN_INTERNAL_H */
