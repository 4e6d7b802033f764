/*
 * half_rows_avx512.c: the row conversions of half_rows.h at the avx512
 * level (also used at avx512bf16): 16 elements a step. bfloat16 rounds
 * with integer operations (as fa_f32_to_bf16_bits: add 0x7fff plus the
 * lowest kept bit; a NaN is quieted instead), float16 converts with
 * vcvtph2ps / vcvtps2ph, rounding to nearest even (the immediate, not
 * MXCSR). Stores of the last n % 16 are masked; the last loads go through a
 * zeroed 16-element buffer, so nothing past a row is touched. Written with
 * the intrinsics simd_map.h's level 2 uses, so that the emulated AVX-512
 * job (tests/emulated_avx512) runs it too.
 */
#include <string.h>

#include "half_rows.h"
#define FA_ISA_LEVEL 2
#include "simd_map.h"
#include "bf16_round_avx512.h"

static inline __mmask16 tail_mask(int64_t r) { return (__mmask16)((1u << r) - 1u); }

/* 16 bits of the row from j on (the last, partial vector zero-padded) */
static inline __m256i load16(const uint16_t *src, int64_t j, int64_t n) {
    if (n - j >= 16) return _mm256_loadu_si256((const __m256i *)(src + j));
    uint16_t buf[16] = {0};
    memcpy(buf, src + j, (size_t)(n - j) * sizeof(uint16_t));
    return _mm256_loadu_si256((const __m256i *)buf);
}

static inline __mmask16 lanes(int64_t j, int64_t n) {
    return n - j >= 16 ? (__mmask16)0xffff : tail_mask(n - j);
}


void fa_bf16_widen_avx512(const uint16_t *src, int64_t n, float *dst) {
    for (int64_t j = 0; j < n; j += 16) {
        const __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(load16(src, j, n)), 16);
        _mm512_mask_storeu_ps(dst + j, lanes(j, n), _mm512_castsi512_ps(w));
    }
}

void fa_bf16_narrow_avx512(const float *src, int64_t n, uint16_t *dst) {
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = lanes(j, n);
        _mm512_mask_cvtepi32_storeu_epi16(dst + j, m, fa_bf16_round16(_mm512_maskz_loadu_ps(m, src + j)));
    }
}

void fa_f16_widen_avx512(const uint16_t *src, int64_t n, float *dst) {
    for (int64_t j = 0; j < n; j += 16)
        _mm512_mask_storeu_ps(dst + j, lanes(j, n), _mm512_cvtph_ps(load16(src, j, n)));
}

void fa_f16_narrow_avx512(const float *src, int64_t n, uint16_t *dst) {
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = lanes(j, n);
        _mm256_mask_storeu_epi16(dst + j, m,
                                 _mm512_cvtps_ph(_mm512_maskz_loadu_ps(m, src + j),
                                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
}
