/*
 * transpose_avx512.h: the 16 x 16 transpose of 32-bit elements in AVX-512
 * registers, shared by the attention kernels (query blocks, probability
 * pairs) and the 16-bit GEMM's activation packing: where a strided gather
 * stores one element at a time, a transposed block stores whole vectors.
 * Written with the intrinsics the emulated AVX-512 job emulates; include
 * after the intrinsics (immintrin.h, or the job's emu512.h).
 */
#ifndef FASTATTN_TRANSPOSE_AVX512_H
#define FASTATTN_TRANSPOSE_AVX512_H

/* r[i] <- column i of the 16 x 16 dwords r[0..15] */
static inline void fa_transpose16_epi32(__m512i r[16]) {
    __m512i t[16], u[16], v[16];
    for (int k = 0; k < 16; k += 2) {
        t[k] = _mm512_unpacklo_epi32(r[k], r[k + 1]);
        t[k + 1] = _mm512_unpackhi_epi32(r[k], r[k + 1]);
    }
    for (int k = 0; k < 16; k += 4) {
        u[k] = _mm512_unpacklo_epi64(t[k], t[k + 2]);
        u[k + 1] = _mm512_unpackhi_epi64(t[k], t[k + 2]);
        u[k + 2] = _mm512_unpacklo_epi64(t[k + 1], t[k + 3]);
        u[k + 3] = _mm512_unpackhi_epi64(t[k + 1], t[k + 3]);
    }
    for (int k = 0; k < 16; k += 8)
        for (int c = 0; c < 4; ++c) {
            v[k + c] = _mm512_shuffle_i32x4(u[k + c], u[k + 4 + c], 0x88);
            v[k + 4 + c] = _mm512_shuffle_i32x4(u[k + c], u[k + 4 + c], 0xdd);
        }
    for (int c = 0; c < 8; ++c) {
        r[c] = _mm512_shuffle_i32x4(v[c], v[8 + c], 0x88);
        r[8 + c] = _mm512_shuffle_i32x4(v[c], v[8 + c], 0xdd);
    }
}

#endif /* FASTATTN_TRANSPOSE_AVX512_H */
