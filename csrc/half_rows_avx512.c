/*
 * half_rows_avx512.c: the row conversions of half_rows.h at the avx512
 * level (also used at avx512bf16): 16 elements a step, the tail under a
 * lane mask (no access past the row). bfloat16 rounds with integer
 * operations (as fa_f32_to_bf16_bits: add 0x7fff plus the lowest kept bit,
 * NaN quieted instead); float16 converts with vcvtph2ps / vcvtps2ph, which
 * round to nearest even (the immediate, not MXCSR).
 */
#include <immintrin.h>

#include "half_rows.h"

static inline __mmask16 tail_mask(int64_t r) { return (__mmask16)((1u << r) - 1u); }

static inline __m512 bf16_widen16(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* bf16 bits of 16 floats, in the low halves of 32-bit lanes */
static inline __m512i bf16_round16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded =
        _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), rounded, quiet);
}

void fa_bf16_widen_avx512(const uint16_t *src, int64_t n, float *dst) {
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
        _mm512_storeu_ps(dst + j, bf16_widen16(_mm256_loadu_si256((const __m256i *)(src + j))));
    if (j < n) {
        const __mmask16 m = tail_mask(n - j);
        _mm512_mask_storeu_ps(dst + j, m, bf16_widen16(_mm256_maskz_loadu_epi16(m, src + j)));
    }
}

void fa_bf16_narrow_avx512(const float *src, int64_t n, uint16_t *dst) {
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
        _mm256_storeu_si256((__m256i *)(dst + j), _mm512_cvtepi32_epi16(bf16_round16(_mm512_loadu_ps(src + j))));
    if (j < n) {
        const __mmask16 m = tail_mask(n - j);
        _mm512_mask_cvtepi32_storeu_epi16(dst + j, m, bf16_round16(_mm512_maskz_loadu_ps(m, src + j)));
    }
}

void fa_f16_widen_avx512(const uint16_t *src, int64_t n, float *dst) {
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
        _mm512_storeu_ps(dst + j, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + j))));
    if (j < n) {
        const __mmask16 m = tail_mask(n - j);
        _mm512_mask_storeu_ps(dst + j, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, src + j)));
    }
}

void fa_f16_narrow_avx512(const float *src, int64_t n, uint16_t *dst) {
    const int rne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
        _mm256_storeu_si256((__m256i *)(dst + j), _mm512_cvtps_ph(_mm512_loadu_ps(src + j), rne));
    if (j < n) {
        const __mmask16 m = tail_mask(n - j);
        _mm256_mask_storeu_epi16(dst + j, m, _mm512_cvtps_ph(_mm512_maskz_loadu_ps(m, src + j), rne));
    }
}
