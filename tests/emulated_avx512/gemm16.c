/*
 * gemm16.c: the emulated AVX-512 job's test of the 16-bit GEMM
 * (csrc/gemm_bf16.c): fa_gemm16 at levels 1 (native AVX2 + FMA + F16C),
 * 2 (emulated AVX-512) and 3 (emulated AVX-512 + vdpbf16ps) against level 0
 * (scalar), bit for bit, on random cases from a fixed seed:
 *   M, N, K from 1 (K up to 1100: two k chunks of 512 pairs and an odd tail),
 *   row strides past the row length, bf16 and fp16, float32 or 16-bit
 *   output, bias or none, alpha.
 * Every level sums each element in the same order (gemm_bf16_impl.h), and
 * the inputs are normal numbers whose products and partial sums stay
 * normal, so vdpbf16ps' flushing of denormals never applies and the bits
 * must agree. Level 4 (amx: TDPBF16PS on tiles, emulated by emuamx.h, bf16
 * only) adds each pair's products in the SDM's order, so it is held to the
 * error bound instead, against level 0: |amx - scalar| <= 2 gamma_{K+2}
 * (|alpha| sum_k |a_k w_k| + |bias|), plus one unit in the last place of a
 * 16-bit output (both round); and to the same bits for 1 and 2 threads.
 * Memory is exact-size heap blocks, so ASan sees any access past a row,
 * the packed weight or the output.
 *
 *   gemm16 CASES SEED      exit status 0 on agreement, 1 on a mismatch
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <math.h>

#include "case_random.h"
#include "fastattn.h"
#include "half_float.h"

/* cpu_features.c is not linked: every level is "available" here, level 2
 * and 3 through emu512.h, 4 through emuamx.h, level 1 natively (the job's
 * CPU has AVX2 + FMA + F16C) */
int fa_cpu_best_isa(void) { return FA_ISA_AMX; }
int fa_compiled_max_isa(void) { return FA_ISA_AMX; }
int fa_cpu_has_f16c(void) { return 1; }

/* a normal bf16 / fp16 of magnitude in [2^-4, 2^4): products in [2^-8, 2^8),
 * sums of up to 1100 of them far from the subnormal range */
static uint16_t rand_value(int dtype) {
    const uint16_t sign = (uint16_t)((rnd() & 1) << 15);
    if (dtype == FA_DTYPE_BF16) return (uint16_t)(sign | (uint16_t)(ri(123, 130) << 7) | (rnd() & 0x7f));
    return (uint16_t)(sign | (uint16_t)(ri(11, 18) << 10) | (rnd() & 0x3ff));
}

static int mismatches = 0;

/* output element el of c as a float, and one unit in its last place (0 for
 * a float32 output) */
static double out_value(const unsigned char *c, int64_t el, int out_dtype, double *ulp) {
    if (out_dtype == FA_DTYPE_F32) {
        float f;
        memcpy(&f, c + 4 * el, 4);
        *ulp = 0.0;
        return f;
    }
    uint16_t h;
    memcpy(&h, c + 2 * el, 2);
    const double v = out_dtype == FA_DTYPE_BF16 ? fa_bf16_bits_to_f32(h) : fa_f16_bits_to_f32(h);
    int e;
    frexp(v, &e);
    *ulp = ldexp(1.0, e - (out_dtype == FA_DTYPE_BF16 ? 8 : 11));
    return v;
}

static double in_value(uint16_t h, int dtype) {
    return dtype == FA_DTYPE_BF16 ? fa_bf16_bits_to_f32(h) : fa_f16_bits_to_f32(h);
}

/* level 4 against level 0 within the bound above; 0 when it holds */
static int check_bound(int case_no, const unsigned char *ref, const unsigned char *got,
                       const uint16_t *a, int64_t lda, const uint16_t *w, const float *bias,
                       float alpha, int64_t M, int64_t N, int64_t K, int64_t ldc, int dtype,
                       int out_dtype) {
    const double u = ldexp(1.0, -24), gamma = (K + 2) * u / (1 - (K + 2) * u);
    for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) {
            double scale = 0.0;
            for (int64_t k = 0; k < K; ++k)
                scale += fabs(in_value(a[i * lda + k], dtype) * in_value(w[j * K + k], dtype));
            scale = fabs(alpha) * scale + (bias ? fabs(bias[j]) : 0.0);
            double ulp_r, ulp_g;
            const double r = out_value(ref, i * ldc + j, out_dtype, &ulp_r);
            const double g = out_value(got, i * ldc + j, out_dtype, &ulp_g);
            const double allowed = 2 * gamma * scale + (ulp_r > ulp_g ? ulp_r : ulp_g);
            if (!(fabs(g - r) <= allowed)) {
                if (mismatches < 10)
                    printf("MISMATCH case %d: level 4 (amx) vs scalar beyond the bound, M=%" PRId64
                           " N=%" PRId64 " K=%" PRId64 ", row %" PRId64 " col %" PRId64
                           ": %.9g vs %.9g (allowed %.3g)\n",
                           case_no, M, N, K, i, j, g, r, allowed);
                return 1;
            }
        }
    return 0;
}

static int run_case(int case_no) {
    const int dtype = (rnd() & 1) ? FA_DTYPE_BF16 : FA_DTYPE_F16;
    const int out_dtype = (rnd() & 1) ? FA_DTYPE_F32 : dtype;
    const int64_t M = ri(1, 40), N = ri(1, 80), K = (rnd() % 4 == 0) ? ri(1030, 1100) : ri(1, 70);
    const int64_t lda = K + ri(0, 3), ldc = N + ri(0, 3);
    const int64_t out_size = out_dtype == FA_DTYPE_F32 ? 4 : 2;
    uint16_t *a = malloc((size_t)((M - 1) * lda + K) * 2);
    uint16_t *w = malloc((size_t)(N * K) * 2);
    float *bias = (rnd() & 1) ? malloc((size_t)N * 4) : NULL;
    const int64_t pe = fa_gemm16_packed_elems(N, K);
    uint16_t *packed = malloc((size_t)pe * 2);
    const size_t c_bytes = (size_t)(((M - 1) * ldc + N) * out_size);
    unsigned char *ref = malloc(c_bytes), *got = malloc(c_bytes);
    for (int64_t i = 0; i < (M - 1) * lda + K; ++i) a[i] = rand_value(dtype);
    for (int64_t i = 0; i < N * K; ++i) w[i] = rand_value(dtype);
    if (bias)
        for (int64_t j = 0; j < N; ++j) bias[j] = (float)ri(-1000, 1000) / 64.0f;
    const float alpha = (float)ri(1, 16) / 8.0f;
    if (fa_gemm16_pack_weight(dtype, w, N, K, K, 1, packed, pe, 1) != FA_OK) {
        printf("MISMATCH case %d: packing failed\n", case_no);
        return 1;
    }
    fa_gemm16_args g = {dtype, out_dtype, M, N, K, a, lda, packed, pe, NULL, ldc, bias, alpha};
    int bad = 0;
    for (int level = 0; level <= 3; ++level) {
        if (fa_set_isa(level) != FA_OK) {
            printf("MISMATCH case %d: fa_set_isa(%d) failed\n", case_no, level);
            return 1;
        }
        unsigned char *c = level == 0 ? ref : got;
        memset(c, 0xa5, c_bytes); /* the gaps between rows must stay untouched */
        g.c = c;
        const int threads = level == 2 ? 2 : 1;
        if (fa_gemm16(&g, threads) != FA_OK) {
            printf("MISMATCH case %d: fa_gemm16 failed at level %d\n", case_no, level);
            return 1;
        }
        if (level > 0 && memcmp(ref, got, c_bytes) != 0) {
            for (size_t i = 0; i < c_bytes; ++i)
                if (ref[i] != got[i]) {
                    const int64_t el = (int64_t)i / out_size;
                    if (mismatches < 10)
                        printf("MISMATCH case %d: level %d vs scalar, %s -> %s, M=%" PRId64
                               " N=%" PRId64 " K=%" PRId64 ", first at row %" PRId64
                               " col %" PRId64 "\n",
                               case_no, level, dtype == FA_DTYPE_BF16 ? "bf16" : "fp16",
                               out_dtype == FA_DTYPE_F32 ? "f32" : "16-bit", M, N, K, el / ldc,
                               el % ldc);
                    break;
                }
            ++mismatches;
            bad = 1;
        }
    }
    if (dtype == FA_DTYPE_BF16) { /* level 4: bf16 only (fp16 keeps the avx512 set) */
        unsigned char *one = malloc(c_bytes);
        fa_set_isa(FA_ISA_AMX);
        for (int threads = 1; threads <= 2; ++threads) {
            unsigned char *c = threads == 1 ? one : got;
            memset(c, 0xa5, c_bytes);
            g.c = c;
            if (fa_gemm16(&g, threads) != FA_OK) {
                printf("MISMATCH case %d: fa_gemm16 failed at level 4\n", case_no);
                return 1;
            }
        }
        int wrong = 0;
        if (memcmp(one, got, c_bytes) != 0) {
            if (mismatches < 10)
                printf("MISMATCH case %d: level 4 (amx) differs between 1 and 2 threads\n", case_no);
            wrong = 1;
        } else {
            /* the gaps between rows stay untouched */
            for (int64_t i = 0; i + 1 < M && !wrong; ++i)
                for (int64_t b = N * out_size; b < ldc * out_size; ++b)
                    if (got[i * ldc * out_size + b] != 0xa5) {
                        if (mismatches < 10)
                            printf("MISMATCH case %d: level 4 (amx) wrote between rows\n", case_no);
                        wrong = 1;
                        break;
                    }
        }
        if (!wrong)
            wrong = check_bound(case_no, ref, got, a, lda, w, bias, alpha, M, N, K, ldc, dtype,
                                out_dtype);
        mismatches += wrong;
        bad |= wrong;
        free(one);
    }
    free(a);
    free(w);
    free(bias);
    free(packed);
    free(ref);
    free(got);
    return bad;
}

int main(int argc, char **argv) {
    const int cases = argc > 1 ? atoi(argv[1]) : 300;
    seed_cases((uint64_t)(argc > 2 ? atoll(argv[2]) : 1));
    int bad_cases = 0;
    for (int i = 0; i < cases; ++i) bad_cases += run_case(i);
    printf("gemm16: %d cases, %d mismatching\n", cases, bad_cases);
    return bad_cases ? 1 : 0;
}
