/*
 * half_rows_avx2.c: the row conversions of half_rows.h at the avx2 level:
 * 8 elements a step, the last n % 8 with the scalar conversions of
 * half_float.h (the same bits). bfloat16 with integer operations, float16
 * with F16C (part of the avx2 level).
 */
#include <immintrin.h>

#include "half_float.h"
#include "half_rows.h"

void fa_bf16_widen_avx2(const uint16_t *src, int64_t n, float *dst) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + j)));
        _mm256_storeu_ps(dst + j, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
    }
    for (; j < n; ++j) dst[j] = fa_bf16_bits_to_f32(src[j]);
}

void fa_bf16_narrow_avx2(const float *src, int64_t n, uint16_t *dst) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 v = _mm256_loadu_ps(src + j);
        const __m256i u = _mm256_castps_si256(v);
        const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        const __m256i rounded = _mm256_srli_epi32(
            _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
        const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
        const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        const __m256i bits = _mm256_blendv_epi8(rounded, quiet, nan); /* < 2^16 each */
        /* packus works within 128-bit halves: lanes 0-3 and 4-7 land in
         * the low 64 bits of each half; gather them into the low 128 */
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0x08);
        _mm_storeu_si128((__m128i *)(dst + j), _mm256_castsi256_si128(packed));
    }
    for (; j < n; ++j) dst[j] = fa_f32_to_bf16_bits(src[j]);
}

void fa_f16_widen_avx2(const uint16_t *src, int64_t n, float *dst) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + j))));
    for (; j < n; ++j) dst[j] = fa_f16_bits_to_f32(src[j]);
}

void fa_f16_narrow_avx2(const float *src, int64_t n, uint16_t *dst) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        _mm_storeu_si128((__m128i *)(dst + j),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + j),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; j < n; ++j) dst[j] = fa_f32_to_f16_bits(src[j]);
}
