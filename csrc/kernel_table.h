/*
 * kernel_table.h: the per-ISA kernels. Each kernel is written once in a
 * *_impl.h template, compiled once per ISA file (*_scalar.c, *_avx2.c,
 * *_avx512.c, each with its own flags) and reached through the table of the
 * selected ISA (dispatch.c), so that a driver never names an ISA.
 */
#ifndef FASTATTN_KERNEL_TABLE_H
#define FASTATTN_KERNEL_TABLE_H

#include <stdint.h>

#include "attention_job.h"
#include "cache_hints.h"
#include "fastattn.h"

/* One softmax row. x, y: (n) contiguous; y may equal x.
 * mask_row: NULL, or (n) contiguous uint8 (mask_kind FA_MASK_BOOL) or (n)
 * contiguous values of the row's dtype (FA_MASK_ADD).
 * Writes y_j = softmax(x * scale + add)_j over the keys the bool mask keeps;
 * kept-out keys get exactly 0. A row whose maximum is -inf (nothing valid)
 * is written as zeros. stage: NULL, or (n) scratch in which the row is
 * computed before y is written with non-temporal stores. y has n + n_zero
 * entries; the last n_zero (keys past the valid prefix) are written as 0.
 * ahead: NULL, or a later row's bytes to request from memory a line at a
 * time while this row is exponentiated (fa_prefetch_cursor). */
typedef void fa_softmax_row_f32_fn(const float *x, float *y, int64_t n,
                                   float scale, const void *mask_row,
                                   int mask_kind, float *stage, int64_t n_zero,
                                   fa_prefetch_cursor *ahead);
typedef void fa_softmax_row_f64_fn(const double *x, double *y, int64_t n,
                                   double scale, const void *mask_row,
                                   int mask_kind, double *stage, int64_t n_zero,
                                   fa_prefetch_cursor *ahead);

/* Queries [q0, q1) of head (b, h) against keys [k0, k1) (already clipped to
 * the key length). With part == NULL the normalised rows go to job->out
 * (and job->weights); otherwise the unnormalised accumulator goes to
 * part[(q - q0) * Dv + c] and the running max / sum to
 * part_ml[2 * (q - q0)], part_ml[2 * (q - q0) + 1] for a split-KV merge.
 * scratch: fa_attention_scratch_elems() elements of the dtype. */
typedef void fa_attention_block_f32_fn(const fa_attn_job *job, int64_t b, int64_t h,
                                       int64_t q0, int64_t q1, int64_t k0, int64_t k1,
                                       float *part, float *part_ml, float *scratch);
typedef void fa_attention_block_f64_fn(const fa_attn_job *job, int64_t b, int64_t h,
                                       int64_t q0, int64_t q1, int64_t k0, int64_t k1,
                                       double *part, double *part_ml, double *scratch);

/* One rotary row (rope_impl.h): pairs (j, j + half) for layout FA_ROPE_NEOX,
 * (2j, 2j + 1) for FA_ROPE_GPTJ, rotated by the angles whose cosines and
 * sines are cs, sn: (half) contiguous each. x, y: (2 * half) contiguous;
 * y == x rotates in place, otherwise the two must not overlap. */
typedef void fa_rope_row_f32_fn(const float *x, float *y, const float *cs, const float *sn,
                                int64_t half, int layout);
typedef void fa_rope_row_f64_fn(const double *x, double *y, const double *cs,
                                const double *sn, int64_t half, int layout);

typedef struct {
    int isa;
    fa_softmax_row_f32_fn *softmax_row_f32;
    fa_softmax_row_f64_fn *softmax_row_f64;
    fa_attention_block_f32_fn *attention_block_f32;
    fa_attention_block_f64_fn *attention_block_f64;
    /* float queries against bfloat16, half or int8 K/V (fa_kv_dtype) */
    fa_attention_block_f32_fn *attention_block_f32_bf16;
    fa_attention_block_f32_fn *attention_block_f32_f16;
    fa_attention_block_f32_fn *attention_block_f32_i8;
    fa_rope_row_f32_fn *rope_row_f32;
    fa_rope_row_f64_fn *rope_row_f64;
    /* bfloat16 q, k, v on vdpbf16ps tiles (job->io16 == FA_DTYPE_BF16 with
     * bf16 K/V); NULL below the avx512bf16 level, where attention_block_f32_bf16
     * widens the tiles instead */
    fa_attention_block_f32_fn *attention_block_bf16dp;
} fa_kernel_table;

/* The table of the selected ISA; never NULL. */
const fa_kernel_table *fa_kernels(void);

/* Every kernel each ISA file exports, as X(name, dtype-suffix, fn-type);
 * dispatch.c expands it into declarations and into one table per ISA. */
#define FA_KERNEL_LIST(X)                                  \
    X(softmax_row, f32, fa_softmax_row_f32_fn)             \
    X(softmax_row, f64, fa_softmax_row_f64_fn)             \
    X(attention_block, f32, fa_attention_block_f32_fn)     \
    X(attention_block, f64, fa_attention_block_f64_fn)     \
    X(attention_block, f32_bf16, fa_attention_block_f32_fn) \
    X(attention_block, f32_f16, fa_attention_block_f32_fn) \
    X(attention_block, f32_i8, fa_attention_block_f32_fn)  \
    X(rope_row, f32, fa_rope_row_f32_fn)                   \
    X(rope_row, f64, fa_rope_row_f64_fn)

#endif /* FASTATTN_KERNEL_TABLE_H */
