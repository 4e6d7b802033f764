/*
 * valid_lengths.h: reading the per-(batch, head) valid lengths
 * (fa_lengths_view) that the softmax and attention drivers share.
 */
#ifndef FASTATTN_VALID_LENGTHS_H
#define FASTATTN_VALID_LENGTHS_H

#include <stdint.h>

#include "fastattn.h"

/* The valid length of (b, m), clamped to [0, full]; full when lv is NULL or
 * has no data (every position valid). Clamping lets a caller use the result
 * as a loop bound without checking the lengths first. */
static inline int64_t fa_length_at(const fa_lengths_view *lv, int64_t b, int64_t m,
                                   int64_t full) {
    if (lv == NULL || lv->data == NULL) return full;
    const int64_t n = lv->data[b * lv->stride_b + m * lv->stride_m];
    return n < 0 ? 0 : n > full ? full : n;
}

#endif /* FASTATTN_VALID_LENGTHS_H */
