/*
 * checked_size.h: size arithmetic that reports overflow instead of wrapping.
 * Every driver sizes its views and scratch with these before touching memory.
 */
#ifndef FASTATTN_CHECKED_SIZE_H
#define FASTATTN_CHECKED_SIZE_H

#include <stdint.h>

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

#endif /* FASTATTN_CHECKED_SIZE_H */
