/*
 * bf16_attention.c: the emulated AVX-512 job's test of the all-bfloat16
 * attention kernel (attention_avx512bf16.c: Q.K^T and P.V on vdpbf16ps pair
 * tiles) on an emulated vdpbf16ps (emu512.h), and of its amx version
 * (attention_amx.c: Q.K^T on AMX tiles where D is a multiple of 32, on
 * emuamx.h), against the scalar level.
 *
 * Random cases of fa_scaled_dot_product_attention with bfloat16 q, k, v and
 * output: odd and even D and Dv (the odd-D and odd-key-count pairs), query
 * blocks on both sides of the tiled path's threshold and past a 96-row
 * block, key counts around the 48-key tile, causal (both alignments), key
 * and query lengths, GQA, padded rows. Level 0 widens the tiles to float
 * and rounds the output once; level 3 also rounds each probability to
 * bfloat16 for P.V, which moves an output by at most 2^-9 max|v| (relative
 * error 2^-9 per probability; they sum to 1). So the two must agree within
 * one bfloat16 ulp of the output (the two roundings) plus 2^-8 max|v|; at
 * level 4 the float scores' last bits (another summation order) move the
 * probabilities far less than their bf16 rounding does. A
 * key or a pair element dropped costs about |v| / Lk, far above that for
 * the key counts drawn here. Output buffers are prefilled with 0x7f bytes
 * and exactly sized, so an unwritten lane or a stray access shows.
 *
 *   bf16_attention CASES SEED      (exit 0: no mismatch; 1: mismatches)
 */
#include <inttypes.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "case_random.h"
#include "fastattn.h"

/* The test replaces csrc/cpu_features.c: every level up to amx is
 * "available", its AVX-512, vdpbf16ps and tile instructions being emulated. */
int fa_cpu_best_isa(void) { return FA_ISA_AMX; }
int fa_compiled_max_isa(void) { return FA_ISA_AMX; }

static double rf(void) { return (double)(rnd() >> 11) / 9007199254740992.0 * 2 - 1; }

static uint16_t to_bf16(double x) { /* truncation is enough to make inputs */
    const float f = (float)x;
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)(u >> 16);
}
static double from_bf16(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static int reported = 0;

static int run_case(int iter) {
    const int64_t B = ri(1, 2), Hkv = ri(1, 2), H = Hkv * ri(1, 3);
    /* a third of the cases with a D the AMX scores take (multiples of 32) */
    const int64_t D = rnd() % 3 == 0 ? 32 * ri(1, 4) : ri(1, 70), Dv = ri(1, 70);
    const int64_t Lq = rnd() % 4 == 0 ? ri(1, 5) : ri(4, 200);
    const int64_t Lk = rnd() % 3 == 0 ? ri(1, 20) : ri(1, 160);
    const int64_t qpad = ri(0, 2), kpad = ri(0, 1);
    fa_attention_args a;
    memset(&a, 0, sizeof a);
    a.B = B, a.H = H, a.Hkv = Hkv, a.Lq = Lq, a.Lk = Lk, a.D = D, a.Dv = Dv;
    const int64_t qrow = D + qpad, krow = D + kpad, vrow = Dv + kpad;
    const size_t nq = (size_t)(B * H * Lq * qrow), nk = (size_t)(B * Hkv * Lk * krow),
                 nv = (size_t)(B * Hkv * Lk * vrow), no = (size_t)(B * H * Lq * Dv);
    uint16_t *q = malloc(nq * 2 + 2), *k = malloc(nk * 2 + 2), *v = malloc(nv * 2 + 2);
    double vmax = 0;
    for (size_t i = 0; i < nq; ++i) q[i] = to_bf16(rf() * 2);
    for (size_t i = 0; i < nk; ++i) k[i] = to_bf16(rf() * 2);
    for (size_t i = 0; i < nv; ++i) {
        v[i] = to_bf16(rf());
        vmax = fmax(vmax, fabs(from_bf16(v[i])));
    }
    a.q = (fa_view4){q, {H * Lq * qrow, Lq * qrow, qrow, 1}};
    a.k = (fa_view4){k, {Hkv * Lk * krow, Lk * krow, krow, 1}};
    a.v = (fa_view4){v, {Hkv * Lk * vrow, Lk * vrow, vrow, 1}};
    const int causal = (int)(rnd() % 3);
    a.is_causal = causal != 0;
    a.alignment = causal == 2 ? FA_CAUSAL_BOTTOM_RIGHT : FA_CAUSAL_TOP_LEFT;
    a.scale = 1.0 / sqrt((double)D);
    int64_t *kl = NULL, *ql = NULL;
    if (rnd() % 3 == 0) {
        kl = malloc((size_t)(B * H) * 8);
        for (int64_t i = 0; i < B * H; ++i) kl[i] = ri(0, Lk);
        a.key_len = (fa_lengths_view){kl, H, 1};
    }
    if (rnd() % 4 == 0) {
        ql = malloc((size_t)(B * H) * 8);
        for (int64_t i = 0; i < B * H; ++i) ql[i] = ri(0, Lq);
        a.query_len = (fa_lengths_view){ql, H, 1};
    }
    uint16_t *out[3];
    int st[3];
    const int levels[3] = {FA_ISA_SCALAR, FA_ISA_AVX512BF16, FA_ISA_AMX};
    for (int l = 0; l < 3; ++l) {
        out[l] = malloc(no * 2 + 2);
        memset(out[l], 0x7f, no * 2);
        a.out = (fa_view4){out[l], {H * Lq * Dv, Lq * Dv, Dv, 1}};
        if (fa_set_isa(levels[l]) != FA_OK) {
            printf("FAIL: fa_set_isa(%d) refused\n", levels[l]);
            exit(2);
        }
        st[l] = fa_scaled_dot_product_attention(FA_DTYPE_BF16, &a, 1 + (int)(rnd() % 2));
    }
    int wrong = 0;
    for (int l = 1; l < 3; ++l) {
        int64_t bad = 0, first = -1;
        for (size_t i = 0; i < no; ++i) {
            const double x = from_bf16(out[l][i]), y = from_bf16(out[0][i]);
            const double tol = ldexp(fabs(y), -7) + ldexp(vmax, -8);
            if (!(fabs(x - y) <= tol)) {
                if (first < 0) first = (int64_t)i;
                ++bad;
            }
        }
        if (st[0] != st[l] || bad) {
            if (reported++ < 30)
                printf("MISMATCH case %d: level %d vs scalar, B=%" PRId64 " H=%" PRId64
                       " Hkv=%" PRId64 " Lq=%" PRId64 " Lk=%" PRId64 " D=%" PRId64 " Dv=%" PRId64
                       " causal=%d status %d/%d, %" PRId64 " elements off, first %" PRId64
                       " (%g vs %g)\n",
                       iter, levels[l], B, H, Hkv, Lq, Lk, D, Dv, causal, st[l], st[0], bad, first,
                       first >= 0 ? from_bf16(out[l][first]) : 0.0,
                       first >= 0 ? from_bf16(out[0][first]) : 0.0);
            wrong = 1;
        }
    }
    free(q), free(k), free(v), free(kl), free(ql), free(out[0]), free(out[1]), free(out[2]);
    return wrong;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s CASES SEED\n", argv[0]);
        return 2;
    }
    const int cases = atoi(argv[1]);
    seed_cases((uint64_t)strtoull(argv[2], NULL, 10));
    int bad = 0;
    for (int it = 0; it < cases; ++it) bad += run_case(it);
    printf("bf16 attention: %d random cases, %d mismatching\n", cases, bad);
    return bad ? 1 : 0;
}
