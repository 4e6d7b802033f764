/*
 * bf16_round_avx512.h: float32 -> bfloat16 rounding of 16 lanes with
 * AVX-512 integer operations, the vector form of fa_f32_to_bf16_bits
 * (half_float.h): add 0x7fff plus the lowest kept bit, keep the top half;
 * a NaN is quieted instead (its top half with the quiet bit set), so it can
 * never round into an infinity. The bits land in the low halves of the
 * 32-bit lanes. Shared by the 16-bit row conversions and the 16-bit
 * GEMM's epilogue, which run at levels without AVX512_BF16's conversion
 * instruction; it uses only intrinsics the emulated AVX-512 job emulates.
 * Include after the intrinsics (immintrin.h, or the job's emu512.h).
 */
#ifndef FASTATTN_BF16_ROUND_AVX512_H
#define FASTATTN_BF16_ROUND_AVX512_H

static inline __m512i fa_bf16_round16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded =
        _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), rounded, quiet);
}

#endif /* FASTATTN_BF16_ROUND_AVX512_H */
