/*
 * scratch.c: the aligned scratch buffers of scratch.h.
 */
#include <stdlib.h>

#include "checked_size.h"
#include "scratch.h"

void *fa_scratch_alloc(int64_t count, int64_t elem_size) {
    int64_t bytes;
    if (!fa_mul_ok(count, elem_size, &bytes)) return NULL;
    /* round up to the alignment, as aligned_alloc requires */
    if (bytes > INT64_MAX - 63) return NULL;
    bytes = (bytes + 63) & ~(int64_t)63;
    if (bytes == 0) bytes = 64;
    if ((uint64_t)bytes > SIZE_MAX) return NULL;
    return aligned_alloc(64, (size_t)bytes);
}

void fa_scratch_free(void *p) { free(p); }
