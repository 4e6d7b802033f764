/*
 * scratch.h: the per-call scratch buffers of the drivers, allocated once
 * per call (never in a hot loop) and aligned for the vector kernels.
 */
#ifndef FASTATTN_SCRATCH_H
#define FASTATTN_SCRATCH_H

#include <stdint.h>

/* Aligned scratch (64 bytes: one cache line, one AVX-512 register). Returns
 * NULL on overflow or failure. */
void *fa_scratch_alloc(int64_t count, int64_t elem_size);
void fa_scratch_free(void *p);

#endif /* FASTATTN_SCRATCH_H */
