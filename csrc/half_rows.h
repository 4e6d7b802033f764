/*
 * half_rows.h: rows of bfloat16 / float16 widened to float32 and float32
 * rows rounded back, for the drivers that compute 16-bit arrays in float32
 * scratch rows (the masked softmax, RoPE). half_rows.c picks, per call, the
 * vector version of the selected ISA level (half_rows_avx2.c,
 * half_rows_avx512.c) for contiguous rows and the scalar one (half_float.h)
 * otherwise; every version gives the same bits for every finite value and
 * infinity (a NaN stays a NaN; its payload may differ between levels).
 */
#ifndef FASTATTN_HALF_ROWS_H
#define FASTATTN_HALF_ROWS_H

#include <stdint.h>

/* dst[j] = src[j * s] widened exactly to float, j < n; dtype FA_DTYPE_BF16
 * or FA_DTYPE_F16, s the element stride (any sign). */
void fa_half_row_to_f32(int dtype, const uint16_t *src, int64_t s, int64_t n, float *dst);

/* dst[j * s] = src[j] rounded to dtype (nearest even), j < n. */
void fa_f32_row_to_half(int dtype, const float *src, int64_t n, uint16_t *dst, int64_t s);

/* The contiguous vector versions (n elements, unit stride), per level. */
typedef void fa_half_widen_fn(const uint16_t *src, int64_t n, float *dst);
typedef void fa_half_narrow_fn(const float *src, int64_t n, uint16_t *dst);
#if defined(FA_HAVE_X86_KERNELS)
fa_half_widen_fn fa_bf16_widen_avx2, fa_f16_widen_avx2, fa_bf16_widen_avx512,
    fa_f16_widen_avx512;
fa_half_narrow_fn fa_bf16_narrow_avx2, fa_f16_narrow_avx2, fa_bf16_narrow_avx512,
    fa_f16_narrow_avx512;
#endif

#endif /* FASTATTN_HALF_ROWS_H */
