/*
 * emulation_vs_native.c: emu512.h's vdpbf16ps, VCVTPS2PH, VCVTPH2PS and
 * VCVTNE2PS2BF16, the dword unpacks, VSHUFI32X4, VPERMW, VPERMT2W and
 * VPMOVDW, against the real instructions. Built and run by run.sh only where the CPU
 * has AVX512_BF16 (elsewhere there is nothing to compare with), with the
 * AVX-512 flags, so that the emulated function (emu_mm512_*) and the
 * intrinsic (_mm512_*, native here: the #defines are undone below) are
 * both available.
 *
 * Inputs: random bf16 with zero, denormal, tiny, normal, infinite and NaN
 * exponents; accumulators with denormal, zero and normal values; floats
 * across the half range including its subnormals, overflow and NaN.
 * Outputs are compared bit for bit, NaN lanes as NaN only (the payload a
 * NaN keeps is not modelled).
 *
 *   emulation_vs_native ITERATIONS    exit status 0 on agreement
 */
#include "emu512.h"

#undef _mm512_dpbf16_ps
#undef _mm512_cvtps_ph
#undef _mm512_cvtph_ps
#undef _mm512_loadu_si512
#undef _mm512_loadu_ps
#undef _mm512_storeu_ps
#undef _mm512_storeu_si512
#undef _mm512_unpacklo_epi32
#undef _mm512_unpackhi_epi32
#undef _mm512_unpacklo_epi64
#undef _mm512_unpackhi_epi64
#undef _mm512_shuffle_i32x4
#undef _mm512_cvtne2ps_pbh
#undef _mm512_permutexvar_epi16
#undef _mm512_permutex2var_epi16
#undef _mm512_cvtepi32_epi16

/* the permutes of the AMX attention's transposes: every immediate the code
 * uses and a few more, on random dwords; 1 on a mismatch */
static int check_permutes(uint32_t (*rnd32)(void)) {
    int bad = 0;
    for (int it = 0; it < 1000; ++it) {
        uint32_t x[16], y[16], n[16], e[16];
        for (int i = 0; i < 16; ++i) x[i] = rnd32(), y[i] = rnd32();
        const __m512i a = _mm512_loadu_si512(x), b = _mm512_loadu_si512(y);
        const __m512i nat[4] = {_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b),
                                _mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b)};
        const __m512i emu[4] = {emu_mm512_unpacklo_epi32(a, b), emu_mm512_unpackhi_epi32(a, b),
                                emu_mm512_unpacklo_epi64(a, b), emu_mm512_unpackhi_epi64(a, b)};
        for (int k = 0; k < 4; ++k) {
            _mm512_storeu_si512(n, nat[k]);
            emu_mm512_storeu_si512(e, emu[k]);
            bad |= memcmp(n, e, 64) != 0;
        }
#define EMU_CHECK_SHUF(imm)                                            \
        _mm512_storeu_si512(n, _mm512_shuffle_i32x4(a, b, imm));       \
        emu_mm512_storeu_si512(e, emu_mm512_shuffle_i32x4(a, b, imm)); \
        bad |= memcmp(n, e, 64) != 0;
        EMU_CHECK_SHUF(0x88)
        EMU_CHECK_SHUF(0xdd)
        EMU_CHECK_SHUF(0x1b)
        EMU_CHECK_SHUF(0x4e)
#undef EMU_CHECK_SHUF
    }
    return bad;
}

/* VPERMW and VPERMT2W on random words with random indices (all 16 bits
 * random, so that the ignored high bits are exercised), and VPMOVDW on
 * random dwords; 1 on a mismatch */
static int check_word_permutes(uint32_t (*rnd32)(void)) {
    int bad = 0;
    for (int it = 0; it < 1000; ++it) {
        uint16_t x[32], y[32], idx[32], n[32], e[32];
        for (int i = 0; i < 32; ++i) x[i] = (uint16_t)rnd32(), y[i] = (uint16_t)rnd32(), idx[i] = (uint16_t)rnd32();
        const __m512i a = _mm512_loadu_si512(x), b = _mm512_loadu_si512(y), ix = _mm512_loadu_si512(idx);
        _mm512_storeu_si512(n, _mm512_permutexvar_epi16(ix, a));
        emu_mm512_storeu_si512(e, emu_mm512_permutexvar_epi16(ix, a));
        bad |= memcmp(n, e, 64) != 0;
        _mm512_storeu_si512(n, _mm512_permutex2var_epi16(a, ix, b));
        emu_mm512_storeu_si512(e, emu_mm512_permutex2var_epi16(a, ix, b));
        bad |= memcmp(n, e, 64) != 0;
        const __m256i nt = _mm512_cvtepi32_epi16(a), et = emu_mm512_cvtepi32_epi16(a);
        bad |= memcmp(&nt, &et, 32) != 0;
    }
    return bad;
}

static uint64_t rs = 1;
static uint32_t r32(void) {
    rs ^= rs << 13;
    rs ^= rs >> 7;
    rs ^= rs << 17;
    return (uint32_t)rs;
}
static uint16_t rand_bf16(void) {
    const uint32_t kind = r32() % 8;
    const uint16_t exp = kind == 0 ? 0 : kind == 1 ? (uint16_t)(1 + r32() % 3)
                       : kind == 2 ? 0xff : (uint16_t)(100 + r32() % 60);
    return (uint16_t)(((r32() & 1) << 15) | (exp << 7) | (r32() & 0x7f));
}
static float rand_acc(void) {
    const uint32_t kind = r32() % 6;
    uint32_t u = kind == 0 ? (r32() & 0x807fffffu)   /* zero or denormal */
               : kind == 1 ? (r32() & 0x80ffffffu)   /* tiny */
               : (((r32() & 1) << 31) | ((60 + r32() % 130) << 23) | (r32() & 0x7fffff));
    float x;
    memcpy(&x, &u, 4);
    return x;
}
static int same(float a, float b) {
    if (a != a || b != b) return a != a && b != b;
    return memcmp(&a, &b, 4) == 0;
}

int main(int argc, char **argv) {
    const long iterations = argc > 1 ? atol(argv[1]) : 100000;
    long lanes = 0, bad_dp = 0, bad_to_half = 0, bad_from_half = 0;
    for (long it = 0; it < iterations; ++it) {
        uint16_t a[32], b[32];
        float c[16], hw[16], em[16];
        for (int i = 0; i < 32; ++i) a[i] = rand_bf16(), b[i] = rand_bf16();
        for (int i = 0; i < 16; ++i) c[i] = rand_acc();
        _mm512_storeu_ps(hw, _mm512_dpbf16_ps(_mm512_loadu_ps(c), (__m512bh)_mm512_loadu_si512(a),
                                              (__m512bh)_mm512_loadu_si512(b)));
        emu_ps ec;
        __m512bh ea, eb;
        memcpy(ec.f, c, 64);
        memcpy(&ea, a, 64);
        memcpy(&eb, b, 64);
        const __m512 e = emu_mm512_dpbf16_ps(ec.v, ea, eb);
        memcpy(em, &e, 64);
        for (int i = 0; i < 16; ++i, ++lanes)
            if (!same(hw[i], em[i])) {
                if (bad_dp < 5)
                    printf("MISMATCH vdpbf16ps lane: acc %a, pairs %04x*%04x + %04x*%04x: native %a, emulated %a\n",
                           c[i], a[2 * i + 1], b[2 * i + 1], a[2 * i], b[2 * i], hw[i], em[i]);
                ++bad_dp;
            }
        float f[16];
        for (int i = 0; i < 16; ++i) {
            uint32_t u = ((r32() & 1) << 31) | ((90 + r32() % 60) << 23) | (r32() & 0x7fffff);
            if (r32() % 10 == 0) u = r32();
            memcpy(&f[i], &u, 4);
        }
        const __m256i h = _mm512_cvtps_ph(_mm512_loadu_ps(f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        emu_ps ef;
        memcpy(ef.f, f, 64);
        const __m256i eh = emu_mm512_cvtps_ph(ef.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        uint16_t hb[16], ehb[16];
        memcpy(hb, &h, 32);
        memcpy(ehb, &eh, 32);
        for (int i = 0; i < 16; ++i) {
            const int nan = (hb[i] & 0x7c00) == 0x7c00 && (hb[i] & 0x3ff);
            const int enan = (ehb[i] & 0x7c00) == 0x7c00 && (ehb[i] & 0x3ff);
            if (nan != enan || (!nan && hb[i] != ehb[i])) ++bad_to_half;
        }
        float back[16], eback[16];
        const __m512 bk = _mm512_cvtph_ps(h), ebk = emu_mm512_cvtph_ps(h);
        memcpy(back, &bk, 64);
        memcpy(eback, &ebk, 64);
        for (int i = 0; i < 16; ++i) bad_from_half += !same(back[i], eback[i]);
    }
    /* VCVTNE2PS2BF16 on floats of every kind: zero, denormal, the
     * smallest normals, the rounding carry into the exponent, overflow to
     * infinity, infinities and NaNs */
    long bad_bf16 = 0, lanes_bf16 = 0;
    for (long it = 0; it < iterations; ++it) {
        float f[32];
        for (int i = 0; i < 32; ++i) {
            const uint32_t kind = r32() % 6;
            uint32_t u = kind == 0 ? (r32() & 0x807fffffu)
                       : kind == 1 ? (r32() & 0x80ffffffu)
                       : kind == 2 ? (((r32() & 1) << 31) | 0x7f000000u | (r32() & 0xffffffu))
                       : kind == 3 ? (((r32() & 1) << 31) | ((r32() % 255) << 23) | (r32() & 0x7f0000u) |
                                      (0x7fffu + r32() % 3)) /* just below, at and above a tie */
                       : kind == 4 ? r32()
                       : (((r32() & 1) << 31) | ((1 + r32() % 254) << 23) | (r32() & 0x7fffff));
            memcpy(&f[i], &u, 4);
        }
        const __m512 lo = _mm512_loadu_ps(f), hi = _mm512_loadu_ps(f + 16);
        uint16_t n[32], e[32];
        const __m512bh nb = _mm512_cvtne2ps_pbh(hi, lo), eb = emu_mm512_cvtne2ps_pbh(hi, lo);
        memcpy(n, &nb, 64);
        memcpy(e, &eb, 64);
        for (int i = 0; i < 32; ++i, ++lanes_bf16) {
            const int nan = (n[i] & 0x7f80) == 0x7f80 && (n[i] & 0x7f);
            const int enan = (e[i] & 0x7f80) == 0x7f80 && (e[i] & 0x7f);
            if (nan != enan || (!nan && n[i] != e[i])) {
                if (bad_bf16 < 5)
                    printf("MISMATCH VCVTNE2PS2BF16 lane: %a: native %04x, emulated %04x\n", f[i], n[i], e[i]);
                ++bad_bf16;
            }
        }
    }
    const int bad_perm = check_permutes(r32) || check_word_permutes(r32);
    printf("emulation vs native: %ld vdpbf16ps lanes, %ld mismatching; VCVTPS2PH %ld, VCVTPH2PS %ld "
           "mismatching of %ld lanes each; VCVTNE2PS2BF16 %ld of %ld lanes; dword unpacks, "
           "VSHUFI32X4, VPERMW, VPERMT2W and VPMOVDW %s\n", lanes, bad_dp, bad_to_half, bad_from_half, lanes,
           bad_bf16, lanes_bf16, bad_perm ? "MISMATCHING" : "identical");
    return bad_dp || bad_to_half || bad_from_half || bad_bf16 || bad_perm;
}
