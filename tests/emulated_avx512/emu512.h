/*
 * emu512.h: a portable, per-lane emulation of the AVX-512 intrinsics that
 * the level-2 section of csrc/simd_map.h and the level-2/3 16-bit GEMM
 * kernels (csrc/gemm_bf16_impl.h, including AVX512_BF16's vdpbf16ps) use,
 * for the emulated AVX-512 job (tests/emulated_avx512/run.sh,
 * docs/reliability.md).
 *
 * Why: the level-2 (AVX-512) kernels run in production on CPUs with
 * AVX-512, but the CI machine has only AVX2 + FMA, so without this header
 * those kernels would only ever be compiled, never run. run.sh copies csrc/
 * to a scratch folder and, in the copy only, replaces the level-2 `#error`
 * guard and `#include <immintrin.h>` of simd_map.h with
 * `#include "emu512.h"`. The level-2 files are then compiled with
 * -mavx2 -mfma and no AVX-512 flag: every `_mm512_*` name below is a macro
 * that redirects to a plain C function, and the 128/256-bit SSE/AVX
 * intrinsics the level-2 code also uses stay native. An AVX-512 intrinsic
 * that is not emulated here cannot compile without -mavx512f, so a new one
 * in simd_map.h stops the job at build time instead of being skipped.
 *
 * Semantics: each function computes lane by lane what the Intel SDM
 * (Software Developer's Manual, vol. 2) specifies for the instruction, in
 * particular:
 *   - MAXPS/MAXPD/MINPD: the second operand is returned when either input
 *     is NaN or both are equal (zeros of either sign);
 *   - VCVTPS2DQ/VCVTPD2DQ: round with the MXCSR mode (nearest-even by
 *     default); NaN and out-of-range values give 0x80000000;
 *   - VRNDSCALE: imm8 bits 1:0 select the mode unless bit 2 (use MXCSR) is
 *     set; bits 7:4 (scale M) must be 0 here, anything else aborts;
 *   - masked loads and stores read or write only the lanes in the mask
 *     (masked-off lanes are never touched, as with fault suppression), so
 *     ASan sees exactly the memory the real instruction would access;
 *   - VMOVNTPS/VMOVNTPD with a zmm operand: #GP unless the address is
 *     64-byte aligned; emulated as an abort with a message;
 *   - VPSLLD/VPSLLQ: a count above the element width gives 0;
 *   - VPTESTMB: bit i is set when (a & b) byte i is nonzero;
 *   - VPMOVSXBD / VPMOVZXWD: sign- / zero-extension to 32 bits;
 *     VCVTDQ2PS: rounded with the MXCSR mode;
 *   - VDPBF16PS: per lane, acc += a[2i+1] b[2i+1], then acc += a[2i] b[2i],
 *     each an fp32 FMA rounded to nearest even, with denormal inputs
 *     (the bf16 operands and the accumulator) read as zero and denormal
 *     results flushed to zero, whatever MXCSR says;
 *   - VCVTPS2PH (nearest-even only) and VCVTPH2PS: exact IEEE conversions;
 *   - VCVTNE2PS2BF16: nearest even, a denormal input read as zero, a NaN
 *     quieted;
 *   - VPERMW / VPERMT2W: the index's low 5 bits (and bit 5 for the source);
 *   - VPMOVDW: truncation of each dword to its low word.
 * run.sh checks the conversions, vdpbf16ps and the permutes against the real
 * instructions where the CPU has AVX512_BF16 (emulation_vs_native.c).
 * Arithmetic is IEEE per lane in the same precision (fmaf/fma for the
 * fused operations, no contraction with -ffp-contract=off). The emulation is
 * only as faithful as this reading of the SDM; it says nothing about speed,
 * and it does not model MXCSR modes other than the default (no DAZ/FTZ; the
 * library sets none).
 */
#ifndef EMU512_H
#define EMU512_H

#include <immintrin.h> /* the types, constants and the native 128/256-bit intrinsics */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Lane views of the vector types. */
typedef union { __m512 v; float f[16]; int32_t i[16]; uint32_t u[16]; } emu_ps;
typedef union { __m512d v; double d[8]; int64_t q[8]; uint64_t uq[8]; } emu_pd;
typedef union { __m512i v; int32_t i[16]; uint32_t u[16]; int64_t q[8]; uint64_t uq[8]; } emu_si;
typedef union { __m256i v; int32_t i[8]; } emu_si256;
typedef union { __m128i v; uint8_t b[16]; } emu_si128;

#define EMU_NLANES(arr) ((int)(sizeof(arr) / sizeof((arr)[0])))
#define EMU_VEC(U) __typeof__(((U *)0)->v)

/* Element-wise operations: `expr` computes lane i from a.F[i], b.F[i], c.F[i]. */
#define EMU_BINARY(name, U, F, expr)                                          \
    static inline EMU_VEC(U) name(EMU_VEC(U) a_, EMU_VEC(U) b_) {            \
        U a, b, r;                                                            \
        a.v = a_;                                                             \
        b.v = b_;                                                             \
        for (int i = 0; i < EMU_NLANES(r.F); ++i) r.F[i] = (expr);            \
        return r.v;                                                           \
    }
#define EMU_TERNARY(name, U, F, expr)                                         \
    static inline EMU_VEC(U) name(EMU_VEC(U) a_, EMU_VEC(U) b_, EMU_VEC(U) c_) { \
        U a, b, c, r;                                                         \
        a.v = a_;                                                             \
        b.v = b_;                                                             \
        c.v = c_;                                                             \
        for (int i = 0; i < EMU_NLANES(r.F); ++i) r.F[i] = (expr);            \
        return r.v;                                                           \
    }

/* ---- arithmetic ------------------------------------------------------- */
EMU_BINARY(emu_mm512_add_ps, emu_ps, f, a.f[i] + b.f[i])
EMU_BINARY(emu_mm512_sub_ps, emu_ps, f, a.f[i] - b.f[i])
EMU_BINARY(emu_mm512_mul_ps, emu_ps, f, a.f[i] * b.f[i])
/* MAXPS: src1 > src2 ? src1 : src2, so src2 on NaN or equality */
EMU_BINARY(emu_mm512_max_ps, emu_ps, f, a.f[i] > b.f[i] ? a.f[i] : b.f[i])
EMU_BINARY(emu_mm512_div_ps, emu_ps, f, a.f[i] / b.f[i])
EMU_TERNARY(emu_mm512_fmadd_ps, emu_ps, f, fmaf(a.f[i], b.f[i], c.f[i]))
EMU_TERNARY(emu_mm512_fnmadd_ps, emu_ps, f, fmaf(-a.f[i], b.f[i], c.f[i]))

EMU_BINARY(emu_mm512_add_pd, emu_pd, d, a.d[i] + b.d[i])
EMU_BINARY(emu_mm512_sub_pd, emu_pd, d, a.d[i] - b.d[i])
EMU_BINARY(emu_mm512_mul_pd, emu_pd, d, a.d[i] * b.d[i])
EMU_BINARY(emu_mm512_div_pd, emu_pd, d, a.d[i] / b.d[i])
EMU_BINARY(emu_mm512_max_pd, emu_pd, d, a.d[i] > b.d[i] ? a.d[i] : b.d[i])
/* MINPD: src1 < src2 ? src1 : src2, so src2 on NaN or equality */
EMU_BINARY(emu_mm512_min_pd, emu_pd, d, a.d[i] < b.d[i] ? a.d[i] : b.d[i])
EMU_TERNARY(emu_mm512_fmadd_pd, emu_pd, d, fma(a.d[i], b.d[i], c.d[i]))
EMU_TERNARY(emu_mm512_fnmadd_pd, emu_pd, d, fma(-a.d[i], b.d[i], c.d[i]))

/* integer adds wrap (unsigned arithmetic, no UB) */
EMU_BINARY(emu_mm512_add_epi32, emu_si, u, a.u[i] + b.u[i])
EMU_BINARY(emu_mm512_add_epi64, emu_si, uq, a.uq[i] + b.uq[i])

/* ---- broadcasts ------------------------------------------------------- */
static inline __m512 emu_mm512_set1_ps(float x) {
    emu_ps r;
    for (int i = 0; i < 16; ++i) r.f[i] = x;
    return r.v;
}
static inline __m512d emu_mm512_set1_pd(double x) {
    emu_pd r;
    for (int i = 0; i < 8; ++i) r.d[i] = x;
    return r.v;
}
static inline __m512i emu_mm512_set1_epi32(int x) {
    emu_si r;
    for (int i = 0; i < 16; ++i) r.i[i] = x;
    return r.v;
}
static inline __m512i emu_mm512_set1_epi64(long long x) {
    emu_si r;
    for (int i = 0; i < 8; ++i) r.q[i] = x;
    return r.v;
}
static inline __m512 emu_mm512_setzero_ps(void) { return emu_mm512_set1_ps(0.0f); }
static inline __m512d emu_mm512_setzero_pd(void) { return emu_mm512_set1_pd(0.0); }

/* ---- loads and stores ------------------------------------------------- */
/* unaligned full loads/stores: all 64 bytes */
static inline __m512 emu_mm512_loadu_ps(const void *p) {
    emu_ps r;
    memcpy(r.f, p, 64);
    return r.v;
}
static inline __m512d emu_mm512_loadu_pd(const void *p) {
    emu_pd r;
    memcpy(r.d, p, 64);
    return r.v;
}
static inline void emu_mm512_storeu_ps(void *p, __m512 v) {
    emu_ps a;
    a.v = v;
    memcpy(p, a.f, 64);
}
static inline void emu_mm512_storeu_pd(void *p, __m512d v) {
    emu_pd a;
    a.v = v;
    memcpy(p, a.d, 64);
}
/* masked (VMOVUPS/PD with {k}{z} and {k}): only the lanes whose mask bit is
 * set are read or written; a zero-masked load gives 0 in the other lanes */
static inline __m512 emu_mm512_maskz_loadu_ps(__mmask16 k, const void *p) {
    const float *f = (const float *)p;
    emu_ps r;
    for (int i = 0; i < 16; ++i) r.f[i] = ((k >> i) & 1) ? f[i] : 0.0f;
    return r.v;
}
static inline __m512d emu_mm512_maskz_loadu_pd(__mmask8 k, const void *p) {
    const double *f = (const double *)p;
    emu_pd r;
    for (int i = 0; i < 8; ++i) r.d[i] = ((k >> i) & 1) ? f[i] : 0.0;
    return r.v;
}
static inline void emu_mm512_mask_storeu_ps(void *p, __mmask16 k, __m512 v) {
    float *f = (float *)p;
    emu_ps a;
    a.v = v;
    for (int i = 0; i < 16; ++i)
        if ((k >> i) & 1) f[i] = a.f[i];
}
static inline void emu_mm512_mask_storeu_pd(void *p, __mmask8 k, __m512d v) {
    double *f = (double *)p;
    emu_pd a;
    a.v = v;
    for (int i = 0; i < 8; ++i)
        if ((k >> i) & 1) f[i] = a.d[i];
}
/* non-temporal stores (VMOVNTPS/PD zmm): #GP unless 64-byte aligned */
static inline void emu_mm512_stream_ps(void *p, __m512 v) {
    if ((uintptr_t)p % 64) {
        fprintf(stderr, "emu512: #GP: _mm512_stream_ps to misaligned address %p\n", p);
        abort();
    }
    emu_mm512_storeu_ps(p, v);
}
static inline void emu_mm512_stream_pd(void *p, __m512d v) {
    if ((uintptr_t)p % 64) {
        fprintf(stderr, "emu512: #GP: _mm512_stream_pd to misaligned address %p\n", p);
        abort();
    }
    emu_mm512_storeu_pd(p, v);
}

/* ---- casts and lane extraction (bit copies) --------------------------- */
static inline __m512d emu_mm512_castps_pd(__m512 v) { __m512d r; memcpy(&r, &v, 64); return r; }
static inline __m512i emu_mm512_castps_si512(__m512 v) { __m512i r; memcpy(&r, &v, 64); return r; }
static inline __m512 emu_mm512_castsi512_ps(__m512i v) { __m512 r; memcpy(&r, &v, 64); return r; }
static inline __m512d emu_mm512_castsi512_pd(__m512i v) { __m512d r; memcpy(&r, &v, 64); return r; }
/* the low 256 bits */
static inline __m256 emu_mm512_castps512_ps256(__m512 v) { __m256 r; memcpy(&r, &v, 32); return r; }
static inline __m128 emu_mm512_castps512_ps128(__m512 v) { __m128 r; memcpy(&r, &v, 16); return r; }
/* VSHUFF32X4: 128-bit lanes 0, 1 from a and 2, 3 from b, each picked by two
 * bits of imm */
static inline __m512 emu_mm512_shuffle_f32x4(__m512 a_, __m512 b_, int imm) {
    emu_ps a, b, r;
    a.v = a_, b.v = b_;
    for (int l = 0; l < 4; ++l) {
        const int src = (imm >> (2 * l)) & 3;
        memcpy(&r.f[4 * l], l < 2 ? &a.f[4 * src] : &b.f[4 * src], 16);
    }
    return r.v;
}
/* VPERMILPS (immediate): in every 128-bit lane, element i takes lane
 * element imm[2i+1:2i] */
static inline __m512 emu_mm512_permute_ps(__m512 a_, int imm) {
    emu_ps a, r;
    a.v = a_;
    for (int i = 0; i < 16; ++i) r.f[i] = a.f[(i & ~3) + ((imm >> (2 * (i & 3))) & 3)];
    return r.v;
}
/* VPERMPS: element i takes a[idx[i] mod 16] */
static inline __m512 emu_mm512_permutexvar_ps(__m512i idx_, __m512 a_) {
    emu_si idx;
    emu_ps a, r;
    idx.v = idx_, a.v = a_;
    for (int i = 0; i < 16; ++i) r.f[i] = a.f[idx.i[i] & 15];
    return r.v;
}
static inline __m512i emu_mm512_setr_epi32(int e0, int e1, int e2, int e3, int e4, int e5,
                                           int e6, int e7, int e8, int e9, int e10, int e11,
                                           int e12, int e13, int e14, int e15) {
    const int e[16] = {e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15};
    emu_si r;
    for (int i = 0; i < 16; ++i) r.i[i] = e[i];
    return r.v;
}
static inline __m256d emu_mm512_castpd512_pd256(__m512d v) { __m256d r; memcpy(&r, &v, 32); return r; }
/* VEXTRACTF64X4: the 256-bit half selected by imm bit 0 */
static inline __m256d emu_mm512_extractf64x4_pd(__m512d v, int imm) {
    __m256d r;
    memcpy(&r, (const char *)&v + 32 * (imm & 1), 32);
    return r;
}

/* ---- conversions and rounding ----------------------------------------- */
/* VCVTPS2DQ / VCVTPD2DQ lane: MXCSR rounding (nearest-even by default);
 * NaN and values outside int32 give the "integer indefinite" 0x80000000 */
static inline int32_t emu_cvt_i32(double x) {
    if (x != x || x >= 2147483648.0 || x < -2147483648.0) return INT32_MIN;
    double r = nearbyint(x);
    if (r >= 2147483648.0 || r < -2147483648.0) return INT32_MIN;
    return (int32_t)r;
}
static inline __m512i emu_mm512_cvtps_epi32(__m512 v) {
    emu_ps a;
    emu_si r;
    a.v = v;
    for (int i = 0; i < 16; ++i) r.i[i] = emu_cvt_i32(a.f[i]);
    return r.v;
}
static inline __m256i emu_mm512_cvtpd_epi32(__m512d v) {
    emu_pd a;
    emu_si256 r;
    a.v = v;
    for (int i = 0; i < 8; ++i) r.i[i] = emu_cvt_i32(a.d[i]);
    return r.v;
}
/* VPMOVSXDQ: sign-extend 8 int32 to int64 */
static inline __m512i emu_mm512_cvtepi32_epi64(__m256i v) {
    emu_si256 a;
    emu_si r;
    a.v = v;
    for (int i = 0; i < 8; ++i) r.q[i] = a.i[i];
    return r.v;
}
/* VPMOVSXBD: sign-extend 16 int8 to int32 */
static inline __m512i emu_mm512_cvtepi8_epi32(__m128i v) {
    emu_si128 a;
    emu_si r;
    a.v = v;
    for (int i = 0; i < 16; ++i) r.i[i] = (int8_t)a.b[i];
    return r.v;
}
/* VPMOVZXWD: zero-extend 16 uint16 to int32 */
static inline __m512i emu_mm512_cvtepu16_epi32(__m256i v) {
    uint16_t a[16];
    emu_si r;
    memcpy(a, &v, 32);
    for (int i = 0; i < 16; ++i) r.u[i] = a[i];
    return r.v;
}
/* VCVTDQ2PS: int32 to float, rounded with the MXCSR mode (nearest-even) */
static inline __m512 emu_mm512_cvtepi32_ps(__m512i v) {
    emu_si a;
    emu_ps r;
    a.v = v;
    for (int i = 0; i < 16; ++i) r.f[i] = (float)a.i[i];
    return r.v;
}
/* VRNDSCALE lane: imm bits 7:4 = M (only 0 is emulated), bit 2 = use the
 * MXCSR mode (nearest-even by default), bits 1:0 = nearest/floor/ceil/trunc;
 * bit 3 (suppress precision exception) does not change the value */
static inline double emu_roundscale(double x, int imm) {
    if ((imm >> 4) != 0) {
        fprintf(stderr, "emu512: roundscale with M != 0 is not emulated\n");
        abort();
    }
    switch ((imm & 4) ? 0 : (imm & 3)) {
        case 0: return nearbyint(x);
        case 1: return floor(x);
        case 2: return ceil(x);
        default: return trunc(x);
    }
}
static inline __m512 emu_mm512_roundscale_ps(__m512 v, int imm) {
    emu_ps a;
    a.v = v;
    for (int i = 0; i < 16; ++i)
        if (a.f[i] == a.f[i]) a.f[i] = (float)emu_roundscale(a.f[i], imm); /* NaN stays as is */
    return a.v;
}
static inline __m512d emu_mm512_roundscale_pd(__m512d v, int imm) {
    emu_pd a;
    a.v = v;
    for (int i = 0; i < 8; ++i)
        if (a.d[i] == a.d[i]) a.d[i] = emu_roundscale(a.d[i], imm);
    return a.v;
}

/* ---- shifts (counts above the element width give 0) ------------------- */
static inline __m512i emu_mm512_slli_epi32(__m512i v, unsigned imm) {
    emu_si a;
    a.v = v;
    for (int i = 0; i < 16; ++i) a.u[i] = imm > 31 ? 0 : a.u[i] << imm;
    return a.v;
}
static inline __m512i emu_mm512_slli_epi64(__m512i v, unsigned imm) {
    emu_si a;
    a.v = v;
    for (int i = 0; i < 8; ++i) a.uq[i] = imm > 63 ? 0 : a.uq[i] << imm;
    return a.v;
}

/* ---- compares, masks and blends --------------------------------------- */
/* VCMPPD/VCMPPS into a mask: only the predicates the kernels use; ordered
 * predicates are false when either lane is NaN, _CMP_UNORD_Q true */
static inline __mmask8 emu_mm512_cmp_pd_mask(__m512d a_, __m512d b_, int pred) {
    emu_pd a, b;
    a.v = a_;
    b.v = b_;
    unsigned m = 0;
    for (int i = 0; i < 8; ++i) {
        int r;
        switch (pred) {
            case _CMP_LT_OQ: r = a.d[i] < b.d[i]; break;
            case _CMP_GT_OQ: r = a.d[i] > b.d[i]; break;
            default:
                fprintf(stderr, "emu512: _mm512_cmp_pd_mask predicate %d is not emulated\n", pred);
                abort();
        }
        m |= (unsigned)r << i;
    }
    return (__mmask8)m;
}
static inline __mmask16 emu_mm512_cmp_ps_mask(__m512 a_, __m512 b_, int pred) {
    emu_ps a, b;
    a.v = a_;
    b.v = b_;
    unsigned m = 0;
    for (int i = 0; i < 16; ++i) {
        int r;
        switch (pred) {
            case _CMP_LT_OQ: r = a.f[i] < b.f[i]; break;
            case _CMP_GT_OQ: r = a.f[i] > b.f[i]; break;
            case _CMP_UNORD_Q: r = a.f[i] != a.f[i] || b.f[i] != b.f[i]; break;
            default:
                fprintf(stderr, "emu512: _mm512_cmp_ps_mask predicate %d is not emulated\n", pred);
                abort();
        }
        m |= (unsigned)r << i;
    }
    return (__mmask16)m;
}
/* VBLENDMPS/PD: b where the mask bit is set, a elsewhere */
static inline __m512 emu_mm512_mask_blend_ps(__mmask16 k, __m512 a_, __m512 b_) {
    emu_ps a, b;
    a.v = a_;
    b.v = b_;
    for (int i = 0; i < 16; ++i)
        if ((k >> i) & 1) a.f[i] = b.f[i];
    return a.v;
}
static inline __m512d emu_mm512_mask_blend_pd(__mmask8 k, __m512d a_, __m512d b_) {
    emu_pd a, b;
    a.v = a_;
    b.v = b_;
    for (int i = 0; i < 8; ++i)
        if ((k >> i) & 1) a.d[i] = b.d[i];
    return a.v;
}
/* VMOVAPD {k}{z}: a where the mask bit is set, 0 elsewhere */
static inline __m512d emu_mm512_maskz_mov_pd(__mmask8 k, __m512d a_) {
    emu_pd a;
    a.v = a_;
    for (int i = 0; i < 8; ++i)
        if (!((k >> i) & 1)) a.d[i] = 0.0;
    return a.v;
}
/* VMOVAPD {k}: a where the mask bit is set, src elsewhere */
static inline __m512d emu_mm512_mask_mov_pd(__m512d src_, __mmask8 k, __m512d a_) {
    emu_pd a, s;
    a.v = a_;
    s.v = src_;
    for (int i = 0; i < 8; ++i)
        if ((k >> i) & 1) s.d[i] = a.d[i];
    return s.v;
}
/* VPTESTMB xmm (AVX512BW + VL): bit i = ((a & b) byte i != 0) */
static inline __mmask16 emu_mm_test_epi8_mask(__m128i a_, __m128i b_) {
    emu_si128 a, b;
    a.v = a_;
    b.v = b_;
    unsigned m = 0;
    for (int i = 0; i < 16; ++i) m |= (unsigned)((a.b[i] & b.b[i]) != 0) << i;
    return (__mmask16)m;
}

/* ---- the intrinsic names, redirected (51) ----------------------------- */
#define _mm512_add_ps emu_mm512_add_ps
#define _mm512_sub_ps emu_mm512_sub_ps
#define _mm512_mul_ps emu_mm512_mul_ps
#define _mm512_max_ps emu_mm512_max_ps
#define _mm512_fmadd_ps emu_mm512_fmadd_ps
#define _mm512_fnmadd_ps emu_mm512_fnmadd_ps
#define _mm512_add_pd emu_mm512_add_pd
#define _mm512_sub_pd emu_mm512_sub_pd
#define _mm512_mul_pd emu_mm512_mul_pd
#define _mm512_max_pd emu_mm512_max_pd
#define _mm512_min_pd emu_mm512_min_pd
#define _mm512_fmadd_pd emu_mm512_fmadd_pd
#define _mm512_fnmadd_pd emu_mm512_fnmadd_pd
#define _mm512_add_epi32 emu_mm512_add_epi32
#define _mm512_add_epi64 emu_mm512_add_epi64
#define _mm512_set1_ps emu_mm512_set1_ps
#define _mm512_set1_pd emu_mm512_set1_pd
#define _mm512_set1_epi32 emu_mm512_set1_epi32
#define _mm512_set1_epi64 emu_mm512_set1_epi64
#define _mm512_setzero_ps emu_mm512_setzero_ps
#define _mm512_setzero_pd emu_mm512_setzero_pd
#define _mm512_loadu_ps emu_mm512_loadu_ps
#define _mm512_loadu_pd emu_mm512_loadu_pd
#define _mm512_storeu_ps emu_mm512_storeu_ps
#define _mm512_storeu_pd emu_mm512_storeu_pd
#define _mm512_maskz_loadu_ps emu_mm512_maskz_loadu_ps
#define _mm512_maskz_loadu_pd emu_mm512_maskz_loadu_pd
#define _mm512_mask_storeu_ps emu_mm512_mask_storeu_ps
#define _mm512_mask_storeu_pd emu_mm512_mask_storeu_pd
#define _mm512_stream_ps emu_mm512_stream_ps
#define _mm512_stream_pd emu_mm512_stream_pd
#define _mm512_castps_pd emu_mm512_castps_pd
#define _mm512_castps_si512 emu_mm512_castps_si512
#define _mm512_castsi512_ps emu_mm512_castsi512_ps
#define _mm512_castsi512_pd emu_mm512_castsi512_pd
#define _mm512_castps512_ps256 emu_mm512_castps512_ps256
#define _mm512_castps512_ps128 emu_mm512_castps512_ps128
#define _mm512_shuffle_f32x4 emu_mm512_shuffle_f32x4
#define _mm512_permute_ps emu_mm512_permute_ps
#define _mm512_permutexvar_ps emu_mm512_permutexvar_ps
#undef _mm512_setr_epi32 /* a macro in GCC's avx512fintrin.h */
#define _mm512_setr_epi32 emu_mm512_setr_epi32
#define _mm512_castpd512_pd256 emu_mm512_castpd512_pd256
#define _mm512_extractf64x4_pd emu_mm512_extractf64x4_pd
#define _mm512_cvtps_epi32 emu_mm512_cvtps_epi32
#define _mm512_cvtpd_epi32 emu_mm512_cvtpd_epi32
#define _mm512_cvtepi32_epi64 emu_mm512_cvtepi32_epi64
#define _mm512_cvtepi8_epi32 emu_mm512_cvtepi8_epi32
#define _mm512_cvtepu16_epi32 emu_mm512_cvtepu16_epi32
#define _mm512_cvtepi32_ps emu_mm512_cvtepi32_ps
#define _mm512_roundscale_ps emu_mm512_roundscale_ps
#define _mm512_roundscale_pd emu_mm512_roundscale_pd
#define _mm512_slli_epi32 emu_mm512_slli_epi32
#define _mm512_slli_epi64 emu_mm512_slli_epi64
#define _mm512_cmp_pd_mask emu_mm512_cmp_pd_mask
#define _mm512_cmp_ps_mask emu_mm512_cmp_ps_mask
#define _mm512_div_ps emu_mm512_div_ps
#define _mm512_div_pd emu_mm512_div_pd
#define _mm512_mask_blend_ps emu_mm512_mask_blend_ps
#define _mm512_mask_blend_pd emu_mm512_mask_blend_pd
#define _mm512_maskz_mov_pd emu_mm512_maskz_mov_pd
#define _mm512_mask_mov_pd emu_mm512_mask_mov_pd
#define _mm_test_epi8_mask emu_mm_test_epi8_mask

/* ---- the 16-bit GEMM (csrc/gemm_bf16_impl.h, levels 2 and 3) ----------- */
static inline __m512i emu_mm512_loadu_si512(const void *p) {
    emu_si r;
    memcpy(r.u, p, 64);
    return r.v;
}
EMU_BINARY(emu_mm512_and_si512, emu_si, u, a.u[i] & b.u[i])
EMU_BINARY(emu_mm512_or_si512, emu_si, u, a.u[i] | b.u[i])
static inline __m512i emu_mm512_srli_epi32(__m512i v, unsigned imm) {
    emu_si a;
    a.v = v;
    for (int i = 0; i < 16; ++i) a.u[i] = imm > 31 ? 0 : a.u[i] >> imm;
    return a.v;
}
/* VPBLENDMD: b where the mask bit is set, a elsewhere */
static inline __m512i emu_mm512_mask_blend_epi32(__mmask16 k, __m512i a_, __m512i b_) {
    emu_si a, b;
    a.v = a_;
    b.v = b_;
    for (int i = 0; i < 16; ++i)
        if ((k >> i) & 1) a.u[i] = b.u[i];
    return a.v;
}
/* VPMOVDW to memory with {k}: the low 16 bits of each selected lane */
static inline void emu_mm512_mask_cvtepi32_storeu_epi16(void *p, __mmask16 k, __m512i v) {
    emu_si a;
    a.v = v;
    uint16_t *h = (uint16_t *)p;
    for (int i = 0; i < 16; ++i)
        if ((k >> i) & 1) h[i] = (uint16_t)a.u[i];
}
/* VMOVDQU16 ymm to memory with {k} (AVX512BW + VL) */
static inline void emu_mm256_mask_storeu_epi16(void *p, __mmask16 k, __m256i v) {
    uint16_t lanes[16];
    memcpy(lanes, &v, 32);
    uint16_t *h = (uint16_t *)p;
    for (int i = 0; i < 16; ++i)
        if ((k >> i) & 1) h[i] = lanes[i];
}
/* VCVTPH2PS: every half is exactly a float (subnormal halves are normal
 * floats); a signalling NaN comes back quiet, the payload shifted up */
static inline float emu_half_to_float(uint16_t h) {
    const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    float x;
    if (e == 0x1f) {
        uint32_t u = ((uint32_t)(h & 0x8000) << 16) | 0x7f800000u | ((uint32_t)m << 13);
        if (m) u |= 0x400000u;
        memcpy(&x, &u, 4);
        return x;
    }
    x = e ? ldexpf((float)(m | 0x400), e - 25) : ldexpf((float)m, -24);
    return (h & 0x8000) ? -x : x;
}
static inline __m512 emu_mm512_cvtph_ps(__m256i v) {
    uint16_t lanes[16];
    emu_ps r;
    memcpy(lanes, &v, 32);
    for (int i = 0; i < 16; ++i) r.f[i] = emu_half_to_float(lanes[i]);
    return r.v;
}
/* VCVTPS2PH: imm bits 1:0 = rounding, only nearest-even (0, with or
 * without bit 3, no exceptions) is emulated; computed in double, where
 * every step below is exact but the one nearbyint */
static inline uint16_t emu_float_to_half(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    if (x != x) return (uint16_t)(sign | 0x7e00 | ((u >> 13) & 0x3ff));
    double a = fabs((double)x);
    if (a >= 65520.0) return (uint16_t)(sign | 0x7c00); /* 65520 rounds to even: up */
    if (a < 0x1p-14) return (uint16_t)(sign | (uint16_t)nearbyint(a * 0x1p24)); /* may reach 0x400 */
    int e;
    frexp(a, &e); /* a = f 2^e, f in [0.5, 1) */
    const double mant = nearbyint(ldexp(a, 11 - e)); /* 1024 .. 2048 */
    return (uint16_t)(sign | (((uint32_t)(e + 14) << 10) + ((uint32_t)mant - 1024)));
}
static inline __m256i emu_mm512_cvtps_ph(__m512 v, int imm) {
    if ((imm & 7) != _MM_FROUND_TO_NEAREST_INT) {
        fprintf(stderr, "emu512: _mm512_cvtps_ph rounding %d is not emulated\n", imm);
        abort();
    }
    emu_ps a;
    uint16_t lanes[16];
    __m256i r;
    a.v = v;
    for (int i = 0; i < 16; ++i) lanes[i] = emu_float_to_half(a.f[i]);
    memcpy(&r, lanes, 32);
    return r;
}
/* VDPBF16PS, per the SDM's pseudo-code: for each lane i,
 *   srcdest.fp32[i] += make_fp32(src1.bf16[2i+1]) * make_fp32(src2.bf16[2i+1])
 *   srcdest.fp32[i] += make_fp32(src1.bf16[2i+0]) * make_fp32(src2.bf16[2i+0])
 * each step an fp32 FMA with round-to-nearest-even, denormal inputs treated
 * as zero (DAZ: the bf16 operands and the accumulator) and denormal results
 * flushed to zero (FTZ), MXCSR neither consulted nor updated. The products
 * are exact; only the adds round. FTZ here tests the rounded result (a sum
 * that rounds up to the smallest normal is kept). */
static inline float emu_daz(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) == 0) u &= 0x80000000u;
    memcpy(&x, &u, 4);
    return x;
}
static inline float emu_bf16(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, 4);
    return emu_daz(x);
}
static inline __m512 emu_mm512_dpbf16_ps(__m512 acc_, __m512bh a_, __m512bh b_) {
    emu_ps acc;
    uint16_t a[32], b[32];
    acc.v = acc_;
    memcpy(a, &a_, 64);
    memcpy(b, &b_, 64);
    for (int i = 0; i < 16; ++i) {
        float s = emu_daz(acc.f[i]);
        s = emu_daz(fmaf(emu_bf16(a[2 * i + 1]), emu_bf16(b[2 * i + 1]), s));
        s = emu_daz(fmaf(emu_bf16(a[2 * i]), emu_bf16(b[2 * i]), s));
        acc.f[i] = s;
    }
    return acc.v;
}

/* VCVTNE2PS2BF16: words 0-15 from b, 16-31 from a, each by the SDM's
 * convert_fp32_to_bfloat16: a NaN quieted (its top half with bit 6 set),
 * a denormal read as a zero of its sign, anything else rounded to nearest
 * even on its top 16 bits, whatever MXCSR says. */
static inline uint16_t emu_fp32_to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x7fffffu)) return (uint16_t)((u >> 16) | 0x40u);
    if ((u & 0x7f800000u) == 0) return (uint16_t)((u & 0x80000000u) >> 16);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static inline __m512bh emu_mm512_cvtne2ps_pbh(__m512 a_, __m512 b_) {
    emu_ps a, b;
    uint16_t w[32];
    __m512bh r;
    a.v = a_, b.v = b_;
    for (int i = 0; i < 16; ++i) w[i] = emu_fp32_to_bf16(b.f[i]), w[16 + i] = emu_fp32_to_bf16(a.f[i]);
    memcpy(&r, w, 64);
    return r;
}
/* VPERMW: word i of a at index idx[i] mod 32; VPERMT2W: index bit 5
 * picks b over a (the form with the table in the middle operand) */
static inline __m512i emu_mm512_permutexvar_epi16(__m512i idx_, __m512i a_) {
    uint16_t idx[32], a[32], r[32];
    __m512i out;
    memcpy(idx, &idx_, 64), memcpy(a, &a_, 64);
    for (int i = 0; i < 32; ++i) r[i] = a[idx[i] & 31];
    memcpy(&out, r, 64);
    return out;
}
static inline __m512i emu_mm512_permutex2var_epi16(__m512i a_, __m512i idx_, __m512i b_) {
    uint16_t idx[32], a[32], b[32], r[32];
    __m512i out;
    memcpy(idx, &idx_, 64), memcpy(a, &a_, 64), memcpy(b, &b_, 64);
    for (int i = 0; i < 32; ++i) r[i] = (idx[i] & 32) ? b[idx[i] & 31] : a[idx[i] & 31];
    memcpy(&out, r, 64);
    return out;
}
/* VPMOVDW: each dword truncated to its low word */
static inline __m256i emu_mm512_cvtepi32_epi16(__m512i a_) {
    emu_si a;
    uint16_t r[16];
    __m256i out;
    a.v = a_;
    for (int i = 0; i < 16; ++i) r[i] = (uint16_t)a.u[i];
    memcpy(&out, r, 32);
    return out;
}
static inline __m512i emu_mm512_load_si512(const void *p) {
    if ((uintptr_t)p % 64 != 0) {
        fprintf(stderr, "emu512: _mm512_load_si512 of an address not 64-byte aligned\n");
        abort();
    }
    __m512i r;
    memcpy(&r, p, 64);
    return r;
}

/* ---- the AMX attention's transposes (csrc/attention_impl.h, pv_tile_amx) -- */
static inline void emu_mm512_storeu_si512(void *p, __m512i v) { memcpy(p, &v, 64); }
static inline __m512i emu_mm512_setzero_si512(void) {
    emu_si r;
    memset(&r, 0, sizeof r);
    return r.v;
}
/* VPUNPCKL/HDQ and VPUNPCKL/HQDQ: per 128-bit lane, the low (high) 8
 * bytes of a and of b interleaved in elements of e bytes (4: dwords,
 * a[4L+o], b[4L+o], a[4L+o+1], b[4L+o+1]; 8: qwords, a[2L+o], b[2L+o]) */
static inline __m512i emu_unpack(__m512i a_, __m512i b_, int e, int high) {
    unsigned char a[64], b[64], r[64];
    __m512i out;
    memcpy(a, &a_, 64), memcpy(b, &b_, 64);
    for (int l = 0; l < 4; ++l)
        for (int k = 0; k < 8 / e; ++k) {
            const int src = 16 * l + 8 * high + e * k, dst = 16 * l + 2 * e * k;
            memcpy(r + dst, a + src, (size_t)e);
            memcpy(r + dst + e, b + src, (size_t)e);
        }
    memcpy(&out, r, 64);
    return out;
}
static inline __m512i emu_mm512_unpacklo_epi32(__m512i a, __m512i b) { return emu_unpack(a, b, 4, 0); }
static inline __m512i emu_mm512_unpackhi_epi32(__m512i a, __m512i b) { return emu_unpack(a, b, 4, 1); }
static inline __m512i emu_mm512_unpacklo_epi64(__m512i a, __m512i b) { return emu_unpack(a, b, 8, 0); }
static inline __m512i emu_mm512_unpackhi_epi64(__m512i a, __m512i b) { return emu_unpack(a, b, 8, 1); }
/* VSHUFI32X4: as VSHUFF32X4, on dwords */
static inline __m512i emu_mm512_shuffle_i32x4(__m512i a_, __m512i b_, int imm) {
    emu_si a, b, r;
    a.v = a_, b.v = b_;
    for (int l = 0; l < 4; ++l) {
        const int src = (imm >> (2 * l)) & 3;
        memcpy(&r.u[4 * l], l < 2 ? &a.u[4 * src] : &b.u[4 * src], 16);
    }
    return r.v;
}

#undef _mm512_shuffle_i32x4 /* a macro in GCC's avx512fintrin.h */
#define _mm512_storeu_si512 emu_mm512_storeu_si512
#define _mm512_setzero_si512 emu_mm512_setzero_si512
#define _mm512_unpacklo_epi32 emu_mm512_unpacklo_epi32
#define _mm512_unpackhi_epi32 emu_mm512_unpackhi_epi32
#define _mm512_unpacklo_epi64 emu_mm512_unpacklo_epi64
#define _mm512_unpackhi_epi64 emu_mm512_unpackhi_epi64
#define _mm512_shuffle_i32x4 emu_mm512_shuffle_i32x4
#define _mm512_loadu_si512 emu_mm512_loadu_si512
#define _mm512_and_si512 emu_mm512_and_si512
#define _mm512_or_si512 emu_mm512_or_si512
#define _mm512_srli_epi32 emu_mm512_srli_epi32
#define _mm512_mask_blend_epi32 emu_mm512_mask_blend_epi32
#define _mm512_mask_cvtepi32_storeu_epi16 emu_mm512_mask_cvtepi32_storeu_epi16
#define _mm256_mask_storeu_epi16 emu_mm256_mask_storeu_epi16
#define _mm512_cvtph_ps emu_mm512_cvtph_ps
#define _mm512_cvtps_ph emu_mm512_cvtps_ph
#define _mm512_dpbf16_ps emu_mm512_dpbf16_ps
#define _mm512_cvtne2ps_pbh emu_mm512_cvtne2ps_pbh
#define _mm512_permutexvar_epi16 emu_mm512_permutexvar_epi16
#define _mm512_permutex2var_epi16 emu_mm512_permutex2var_epi16
#define _mm512_load_si512 emu_mm512_load_si512
#define _mm512_cvtepi32_epi16 emu_mm512_cvtepi32_epi16

#endif /* EMU512_H */
