/*
 * half_rows.c: the row conversions of half_rows.h: the selected ISA level's
 * vector version for contiguous rows, the scalar ones (half_float.h) for
 * strided rows and on non-x86 builds (contiguous rows widened by the loops
 * that the compiler vectorizes for the baseline). Compiled with baseline
 * flags.
 */
#include "half_rows.h"

#include <stddef.h>

#include "fastattn.h"
#include "half_float.h"

/* The vector versions of the selected level (NULL: scalar). The avx2
 * float16 versions use F16C, part of the avx2 level (cpu_features.c). */
static fa_half_widen_fn *widen_of(int dtype) {
#if defined(FA_HAVE_X86_KERNELS)
    const int isa = fa_get_isa();
    if (isa >= FA_ISA_AVX512) return dtype == FA_DTYPE_BF16 ? fa_bf16_widen_avx512 : fa_f16_widen_avx512;
    if (isa == FA_ISA_AVX2) return dtype == FA_DTYPE_BF16 ? fa_bf16_widen_avx2 : fa_f16_widen_avx2;
#else
    (void)dtype;
#endif
    return NULL;
}

static fa_half_narrow_fn *narrow_of(int dtype) {
#if defined(FA_HAVE_X86_KERNELS)
    const int isa = fa_get_isa();
    if (isa >= FA_ISA_AVX512) return dtype == FA_DTYPE_BF16 ? fa_bf16_narrow_avx512 : fa_f16_narrow_avx512;
    if (isa == FA_ISA_AVX2) return dtype == FA_DTYPE_BF16 ? fa_bf16_narrow_avx2 : fa_f16_narrow_avx2;
#else
    (void)dtype;
#endif
    return NULL;
}

void fa_half_row_to_f32(int dtype, const uint16_t *src, int64_t s, int64_t n, float *dst) {
    fa_half_widen_fn *fn = s == 1 ? widen_of(dtype) : NULL;
    if (fn) {
        fn(src, n, dst);
    } else if (s == 1) { /* the branch-free loops that compilers vectorize */
        if (dtype == FA_DTYPE_BF16)
            fa_bf16_row_to_f32(src, n, dst);
        else
            fa_f16_row_to_f32(src, n, dst);
    } else if (dtype == FA_DTYPE_BF16) {
        for (int64_t j = 0; j < n; ++j) dst[j] = fa_bf16_bits_to_f32(src[j * s]);
    } else {
        for (int64_t j = 0; j < n; ++j) dst[j] = fa_f16_bits_to_f32(src[j * s]);
    }
}

void fa_f32_row_to_half(int dtype, const float *src, int64_t n, uint16_t *dst, int64_t s) {
    fa_half_narrow_fn *fn = s == 1 ? narrow_of(dtype) : NULL;
    if (fn) {
        fn(src, n, dst);
    } else if (dtype == FA_DTYPE_BF16) {
        for (int64_t j = 0; j < n; ++j) dst[j * s] = fa_f32_to_bf16_bits(src[j]);
    } else {
        for (int64_t j = 0; j < n; ++j) dst[j * s] = fa_f32_to_f16_bits(src[j]);
    }
}
