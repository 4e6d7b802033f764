/*
 * checked_size.c: the view check of checked_size.h.
 */
#include <stddef.h>

#include "checked_size.h"

int fa_view_ok(const int64_t *dims, const int64_t *strides, int n,
               int64_t elem_size) {
    int64_t reach = 0;
    for (int i = 0; i < n; ++i) {
        if (dims[i] < 0) return 0;
        if (dims[i] == 0) return 1; /* empty: nothing is ever addressed */
        int64_t s = strides[i] < 0 ? -strides[i] : strides[i];
        if (strides[i] == INT64_MIN) return 0;
        int64_t span;
        if (!fa_mul_ok(dims[i] - 1, s, &span)) return 0;
        if (reach > INT64_MAX - span) return 0;
        reach += span;
    }
    int64_t bytes;
    return fa_mul_ok(reach + 1, elem_size, &bytes) && (uint64_t)bytes <= SIZE_MAX;
}
