/*
 * differential.c: the emulated AVX-512 job's differential test
 * (tests/emulated_avx512/run.sh, docs/reliability.md).
 *
 * Linked with the scalar (level 0), native AVX2 (level 1) and emulated
 * AVX-512 (level 2, emu512.h) kernels of one scratch copy of csrc/. Every
 * case calls the public C entry point once per level with fa_set_isa and
 * compares levels 1 and 2 with level 0:
 *
 *   attention  fa_scaled_dot_product_attention, float and double: decode and
 *              split-KV shapes, Lq around the 12-row and 32-query tiles,
 *              random D/Dv including vector-width edges, bool masks with
 *              arbitrary nonzero bytes, additive masks with -inf/NaN,
 *              causal (both alignments), ALiBi, weights output, key and
 *              query lengths, GQA, padded (non-contiguous) rows;
 *   softmax    fa_masked_softmax, float and double: random shapes, strided
 *              input and output, misaligned output offsets, masks, lengths,
 *              causal, scale 0, +-1e30/-inf/NaN inputs, and a few rows long
 *              enough (>= 16 MiB) to take the streaming-store path;
 *   nan-rows   directed softmax rows, n = 1..70: all -inf, one NaN among
 *              -inf, one finite among -inf, one NaN among finite values;
 *   rope       fa_rope_apply rows, float, double, bfloat16 and float16
 *              (float32 tables; the rows widened and rounded back by each
 *              level's conversions, half_rows*.c), NEOX and GPTJ, in place
 *              and out of place, D = 2..80: every level must give the
 *              scalar level's bits exactly (the row kernels are elementwise,
 *              so only a fused multiply-add the compiler slipped in, or a
 *              mishandled tail, can change a bit).
 *
 * Outputs other than rope's must agree within 2e-5 (float) / 1e-11 (double) relative, with
 * NaN matching NaN and infinities equal; the returned status must match.
 * Output buffers are prefilled with 0x7f bytes, so a lane never written
 * shows up as a mismatch. Buffers are exactly sized heap blocks, so ASan
 * reports any read or write past them.
 *
 *   differential CASES SEED      (exit 0: no mismatch; 1: mismatches)
 */
#include <inttypes.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "case_random.h"
#include "fastattn.h"
#include "half_float.h"

/* The test replaces csrc/cpu_features.c (not linked): level 2 is "available"
 * on this CPU because the level-2 kernels are emulated. Level 1 runs native
 * AVX2 + FMA, checked in main. */
int fa_cpu_best_isa(void) { return FA_ISA_AVX512; }
int fa_compiled_max_isa(void) { return FA_ISA_AVX512; }

static const char *const level_name[3] = {"scalar", "avx2", "avx512(emulated)"};

static double rf(void) { return (double)(rnd() >> 11) / 9007199254740992.0 * 2 - 1; } /* [-1, 1) */

static int reported = 0; /* mismatch lines printed (capped) */
#define REPORT(...)                                      \
    do {                                                 \
        if (reported++ < 30) printf("MISMATCH " __VA_ARGS__); \
    } while (0)

static int close_enough(double a, double b, int f64) {
    if (a != a || b != b) return (a != a) && (b != b);
    if (isinf(a) || isinf(b)) return a == b;
    double tol = f64 ? 1e-11 : 2e-5;
    return fabs(a - b) <= tol * (1 + fabs(b));
}
static double get(const char *p, size_t i, int f64) {
    return f64 ? ((const double *)p)[i] : ((const float *)p)[i];
}
static void put(char *p, size_t i, int f64, double x) {
    if (f64) ((double *)p)[i] = x;
    else ((float *)p)[i] = (float)x;
}
static void set_level(int isa) {
    if (fa_set_isa(isa) != FA_OK) {
        printf("FAIL: fa_set_isa(%d) refused\n", isa);
        exit(2);
    }
}
/* number of elements of level `isa` not close to level 0; first index in *first */
static int64_t count_bad(const char *y, const char *y0, size_t n, int f64, int64_t *first,
                         double *got, double *want) {
    int64_t bad = 0;
    for (size_t i = 0; i < n; ++i) {
        double a = get(y, i, f64), b = get(y0, i, f64);
        if (!close_enough(a, b, f64)) {
            if (bad++ == 0) { *first = (int64_t)i; *got = a; *want = b; }
        }
    }
    return bad;
}

/* n random K/V elements in a narrow storage (fa_kv_dtype): int8 values,
 * bfloat16 in [-2, 2), or any finite half up to 2 (denormals included). */
static void fill_narrow(char *p, size_t n, int kvd) {
    for (size_t i = 0; i < n; ++i) {
        if (kvd == FA_KV_I8) {
            ((int8_t *)p)[i] = (int8_t)ri(-127, 127);
        } else if (kvd == FA_KV_BF16) {
            const float f = (float)(rf() * 2);
            uint32_t u;
            memcpy(&u, &f, 4);
            ((uint16_t *)p)[i] = (uint16_t)(u >> 16);
        } else {
            ((uint16_t *)p)[i] = (uint16_t)((rnd() & 1) << 15 | (rnd() % 17) << 10 | (rnd() & 0x3ff));
        }
    }
}

/* ------------------------------------------------------------------ attention */
static int run_attention(int iter) {
    const int f64 = (int)(rnd() % 2);
    const size_t es = f64 ? 8 : 4;
    int64_t B = ri(1, 2), Hkv = ri(1, 2), g = ri(1, 2), H = Hkv * g;
    int64_t Lq, Lk;
    int kind = (int)(rnd() % 10);
    if (kind < 2) { /* decode */
        Lq = ri(1, 3);
        Lk = ri(0, 200);
    } else if (kind == 2) { /* split-KV: few queries, many keys */
        Lq = ri(1, 3);
        Lk = ri(1024, 2200);
        B = 1;
        H = Hkv = 1;
    } else if (kind < 6) { /* Lq around the tile sizes */
        static const int64_t opts[] = {25, 26, 27, 28, 29, 30, 31, 32, 61, 62, 63, 64, 4, 5,
                                       13, 16, 33, 96, 97, 100, 17, 12, 24, 36, 48, 72, 84, 95};
        Lq = opts[rnd() % (sizeof opts / sizeof opts[0])];
        Lk = ri(0, 160);
    } else {
        Lq = ri(4, 230);
        Lk = ri(0, 260);
    }
    static const int64_t d_opts[] = {64, 128, 32, 16};
    static const int64_t dv_opts[] = {15, 16, 17, 31, 32, 33, 47, 48, 49, 63, 64, 65, 8, 7, 9, 1};
    int64_t D = (rnd() % 4 == 0) ? d_opts[rnd() % 4] : ri(1, 80);
    int64_t Dv = (rnd() % 3 == 0) ? D : ri(1, 80);
    if (rnd() % 6 == 0) Dv = dv_opts[rnd() % 16];
    int causal = (int)(rnd() % 3);   /* 0 none, 1 top-left, 2 bottom-right */
    int masktype = (int)(rnd() % 3); /* 0 none, 1 bool, 2 additive */
    int use_w = rnd() % 4 == 0 && kind != 2;
    int use_alibi = rnd() % 3 == 0;
    int use_kl = rnd() % 3 == 0, use_ql = rnd() % 4 == 0;
    int special = rnd() % 8 == 0; /* -inf / NaN entries in the additive mask */
    int64_t qpad = ri(0, 3);      /* padded rows: non-contiguous */

    fa_attention_args a;
    memset(&a, 0, sizeof a);
    a.B = B; a.H = H; a.Hkv = Hkv; a.Lq = Lq; a.Lk = Lk; a.D = D; a.Dv = Dv;
    int64_t qrow = D + qpad, krow = D + (int64_t)(rnd() % 2), vrow = Dv + (int64_t)(rnd() % 2);
    size_t nq = (size_t)(B * H * Lq * qrow), nk = (size_t)(B * Hkv * Lk * krow),
           nv = (size_t)(B * Hkv * Lk * vrow);
    char *q = malloc(nq * es + 1), *k = malloc(nk * es + 1), *v = malloc(nv * es + 1);
    for (size_t i = 0; i < nq; ++i) put(q, i, f64, rf() * 2);
    for (size_t i = 0; i < nk; ++i) put(k, i, f64, rf() * 2);
    for (size_t i = 0; i < nv; ++i) put(v, i, f64, rf());
    a.q = (fa_view4){q, {H * Lq * qrow, Lq * qrow, qrow, 1}};
    a.k = (fa_view4){k, {Hkv * Lk * krow, Lk * krow, krow, 1}};
    a.v = (fa_view4){v, {Hkv * Lk * vrow, Lk * vrow, vrow, 1}};
    /* float cases read K/V in one of the narrow storages half of the time */
    const int kvd = f64 || rnd() % 2 ? FA_KV_SAME : (int)ri(FA_KV_BF16, FA_KV_I8);
    char *kn = NULL, *vn = NULL;
    float *ksc = NULL, *vsc = NULL;
    if (kvd != FA_KV_SAME) {
        const size_t kes = kvd == FA_KV_I8 ? 1 : 2, ns = (size_t)(B * Hkv * Lk);
        kn = malloc(nk * kes + 1);
        vn = malloc(nv * kes + 1);
        fill_narrow(kn, nk, kvd);
        fill_narrow(vn, nv, kvd);
        a.k.data = kn;
        a.v.data = vn;
        a.kv_dtype = kvd;
        if (kvd == FA_KV_I8) {
            ksc = malloc(ns * 4 + 4);
            vsc = malloc(ns * 4 + 4);
            for (size_t i = 0; i < ns; ++i) ksc[i] = (float)(rf() + 1) * 0.01f;
            for (size_t i = 0; i < ns; ++i) vsc[i] = (float)(rf() + 1) * 0.01f;
            a.k_scale = (fa_view4){ksc, {Hkv * Lk, Lk, 1, 0}};
            a.v_scale = (fa_view4){vsc, {Hkv * Lk, Lk, 1, 0}};
        }
    }
    a.is_causal = causal != 0;
    a.alignment = causal == 2 ? FA_CAUSAL_BOTTOM_RIGHT : FA_CAUSAL_TOP_LEFT;
    a.scale = (rnd() % 5 == 0) ? rf() * 3 : 1.0 / sqrt((double)D);

    char *mask = NULL;
    size_t nm = (size_t)(B * H * Lq * Lk);
    if (masktype && nm) {
        mask = malloc(nm * (masktype == 1 ? 1 : es) + 1);
        for (size_t i = 0; i < nm; ++i) {
            if (masktype == 1) {
                ((uint8_t *)mask)[i] = (rnd() % 5 != 0) ? (uint8_t)ri(1, 255) : 0;
            } else {
                double x = rf();
                if (special) {
                    uint64_t r = rnd() % 20;
                    if (r == 0) x = -INFINITY;
                    else if (r == 1 && rnd() % 4 == 0) x = NAN;
                }
                put(mask, i, f64, x);
            }
        }
        a.mask = (fa_mask_view){mask, masktype, H * Lq * Lk, Lq * Lk, Lk, 1};
    }
    int64_t *kl = NULL, *ql = NULL;
    if (use_kl) {
        kl = malloc((size_t)(B * H) * 8);
        for (int64_t i = 0; i < B * H; ++i) kl[i] = ri(-1, Lk + 2);
        a.key_len = (fa_lengths_view){kl, H, 1};
    }
    if (use_ql) {
        ql = malloc((size_t)(B * H) * 8);
        for (int64_t i = 0; i < B * H; ++i) ql[i] = ri(0, Lq + 1);
        a.query_len = (fa_lengths_view){ql, H, 1};
    }
    char *alibi = NULL;
    if (use_alibi) {
        alibi = malloc((size_t)H * es);
        for (int64_t i = 0; i < H; ++i) put(alibi, (size_t)i, f64, rf() * 0.5);
        a.alibi_slopes = alibi;
    }
    /* model features: sliding window, soft-capping (through the vector
     * tanh), sinks, left padding */
    int64_t *ks = NULL;
    char *sinks = NULL;
    if (rnd() % 3 == 0) {
        a.window = (int)ri(1, 3);
        a.window_left = ri(0, 60);
        a.window_right = ri(0, 20);
    }
    if (rnd() % 4 == 0) a.softcap = 0.3 + 4 * (rf() + 1);
    if (rnd() % 4 == 0) {
        sinks = malloc((size_t)H * es);
        for (int64_t i = 0; i < H; ++i) put(sinks, (size_t)i, f64, rf() * 3);
        a.sinks = sinks;
    }
    if (rnd() % 4 == 0) {
        ks = malloc((size_t)(B * H) * 8);
        for (int64_t i = 0; i < B * H; ++i) ks[i] = ri(-1, Lk / 2 + 1);
        a.key_start = (fa_lengths_view){ks, H, 1};
    }

    size_t no = (size_t)(B * H * Lq * Dv), nw = (size_t)(B * H * Lq * Lk);
    char *out[3], *w[3];
    int st[3];
    for (int isa = 0; isa < 3; ++isa) {
        out[isa] = malloc(no * es + 1);
        memset(out[isa], 0x7f, no * es);
        w[isa] = use_w ? malloc(nw * es + 1) : NULL;
        if (w[isa]) memset(w[isa], 0x7f, nw * es);
        a.out = (fa_view4){out[isa], {H * Lq * Dv, Lq * Dv, Dv, 1}};
        a.weights = (fa_view4){w[isa], {H * Lq * Lk, Lq * Lk, Lk, 1}};
        set_level(isa);
        st[isa] = fa_scaled_dot_product_attention(f64 ? FA_DTYPE_F64 : FA_DTYPE_F32, &a, 1);
    }

    int bad = 0;
    for (int isa = 1; isa < 3; ++isa) {
        int64_t first = -1, wfirst = -1;
        double got = 0, want = 0, wgot = 0, wwant = 0;
        int64_t nbad = count_bad(out[isa], out[0], no, f64, &first, &got, &want);
        int64_t wbad = use_w ? count_bad(w[isa], w[0], nw, f64, &wfirst, &wgot, &wwant) : 0;
        if (st[isa] != st[0] || nbad || wbad) {
            bad = 1;
            REPORT("attention case %d, %s vs scalar: f64=%d B=%" PRId64 " H=%" PRId64
                   " Hkv=%" PRId64 " Lq=%" PRId64 " Lk=%" PRId64 " D=%" PRId64 " Dv=%" PRId64
                   " kv=%d causal=%d mask=%d weights=%d alibi=%d key_len=%d query_len=%d special=%d"
                   " window=%d(%" PRId64 ",%" PRId64 ") softcap=%g sinks=%d key_start=%d:"
                   " status %d vs %d, out %" PRId64 " bad (first [%" PRId64 "] %g vs %g),"
                   " weights %" PRId64 " bad (first [%" PRId64 "] %g vs %g)\n",
                   iter, level_name[isa], f64, B, H, Hkv, Lq, Lk, D, Dv, kvd, causal, masktype, use_w,
                   use_alibi, use_kl, use_ql, special, a.window, a.window_left, a.window_right,
                   a.softcap, sinks != NULL, ks != NULL, st[isa], st[0], nbad, first, got, want, wbad,
                   wfirst, wgot, wwant);
        }
    }
    for (int isa = 0; isa < 3; ++isa) {
        free(out[isa]);
        free(w[isa]);
    }
    free(q); free(k); free(v); free(mask); free(kl); free(ql); free(alibi); free(ks); free(sinks);
    free(kn); free(vn); free(ksc); free(vsc);
    return bad;
}

/* ------------------------------------------------------------------ softmax */
/* big: rows of >= 2^18 elements times Lq 33/65, i.e. a >= 16 MiB output,
 * which takes the streaming-store path (64-byte-aligned zmm stores) */
static int run_softmax(int iter, int big) {
    const int f64 = (int)(rnd() % 2);
    const size_t es = f64 ? 8 : 4;
    int64_t B = ri(1, 2), M = ri(1, 3), Lq = ri(1, 9), Lk = ri(1, 300);
    if (big) {
        B = 1;
        M = 1;
        Lq = f64 ? 33 : 65;
        Lk = (1 << 18) + ri(0, 40);
    }
    int causal = (int)(rnd() % 3), masktype = (int)(rnd() % 3);
    int64_t xs = (rnd() % 5 == 0) ? 2 : 1, ys = (rnd() % 5 == 0 && !big) ? 2 : 1; /* strides */
    int64_t yoff = ri(0, 17); /* output offset in elements: misaligned rows */
    double scale = (rnd() % 4 == 0) ? rf() * 4 : 0.125 + fabs(rf());
    if (rnd() % 20 == 0) scale = 0.0;
    int special = rnd() % 6 == 0; /* -inf, NaN, +-1e30 inputs */
    size_t n = (size_t)(B * M * Lq * Lk);
    char *x = malloc(n * (size_t)xs * es + 1);
    for (size_t i = 0; i < n * (size_t)xs; ++i) {
        double v = rf() * 20;
        if (special) {
            uint64_t r = rnd() % 30;
            if (r == 0) v = -INFINITY;
            else if (r == 1 && rnd() % 8 == 0) v = NAN;
            else if (r == 2) v = 1e30;
            else if (r == 3) v = -1e30;
        }
        put(x, i, f64, v);
    }
    fa_view4 xv = {x, {M * Lq * Lk * xs, Lq * Lk * xs, Lk * xs, xs}};
    char *mask = NULL;
    fa_mask_view mv;
    memset(&mv, 0, sizeof mv);
    if (masktype) {
        mask = malloc(n * (masktype == 1 ? 1 : es) + 1);
        for (size_t i = 0; i < n; ++i) {
            if (masktype == 1) {
                ((uint8_t *)mask)[i] = rnd() % 4 ? (uint8_t)ri(1, 255) : 0;
            } else {
                double v = rf();
                if (special && rnd() % 10 == 0) v = -INFINITY;
                put(mask, i, f64, v);
            }
        }
        mv = (fa_mask_view){mask, masktype, M * Lq * Lk, Lq * Lk, Lk, 1};
    }
    int64_t *kl = NULL, *ql = NULL;
    fa_lengths_view klv = {NULL, 0, 0}, qlv = {NULL, 0, 0};
    if (rnd() % 3 == 0) {
        kl = malloc((size_t)(B * M) * 8);
        for (int64_t i = 0; i < B * M; ++i) kl[i] = ri(0, Lk + 1);
        klv = (fa_lengths_view){kl, M, 1};
    }
    if (rnd() % 4 == 0) {
        ql = malloc((size_t)(B * M) * 8);
        for (int64_t i = 0; i < B * M; ++i) ql[i] = ri(0, Lq);
        qlv = (fa_lengths_view){ql, M, 1};
    }

    char *y[3];
    int st[3];
    size_t ny = n * (size_t)ys + (size_t)yoff;
    for (int isa = 0; isa < 3; ++isa) {
        y[isa] = malloc(ny * es + 64);
        memset(y[isa], 0x7f, ny * es);
        fa_view4 yv = {y[isa] + (size_t)yoff * es, {M * Lq * Lk * ys, Lq * Lk * ys, Lk * ys, ys}};
        set_level(isa);
        st[isa] = fa_masked_softmax(f64 ? FA_DTYPE_F64 : FA_DTYPE_F32, xv, yv, B, M, Lq, Lk, scale,
                                    masktype ? &mv : NULL, &klv, &qlv, causal, 1);
    }
    int bad = 0;
    for (int isa = 1; isa < 3; ++isa) {
        int64_t first = -1;
        double got = 0, want = 0;
        int64_t nbad = count_bad(y[isa], y[0], ny, f64, &first, &got, &want);
        if (st[isa] != st[0] || nbad) {
            bad = 1;
            REPORT("softmax case %d, %s vs scalar: f64=%d B=%" PRId64 " M=%" PRId64 " Lq=%" PRId64
                   " Lk=%" PRId64 " causal=%d mask=%d xs=%" PRId64 " ys=%" PRId64 " yoff=%" PRId64
                   " scale=%g special=%d key_len=%d query_len=%d: status %d vs %d, %" PRId64
                   " bad (first [%" PRId64 "] %g vs %g)\n",
                   iter, level_name[isa], f64, B, M, Lq, Lk, causal, masktype, xs, ys, yoff, scale,
                   special, kl != NULL, ql != NULL, st[isa], st[0], nbad, first, got, want);
        }
    }
    for (int isa = 0; isa < 3; ++isa) free(y[isa]);
    free(x); free(mask); free(kl); free(ql);
    return bad;
}

/* ------------------------------------------------------------------ NaN / -inf rows */
/* One softmax row of n elements: kind 0 all -inf; 1 NaN at pos among -inf;
 * 2 a finite value at pos among -inf; 3 NaN at pos among finite values.
 * Returns 1 on a mismatch. */
static int run_nan_row(int f64, int n, int pos, int kind) {
    const size_t es = f64 ? 8 : 4;
    char *x = malloc((size_t)n * es), *y[3];
    for (int j = 0; j < n; ++j) {
        double v = -INFINITY;
        if (kind == 1 && j == pos) v = NAN;
        if (kind == 2 && j == pos) v = 3.0;
        if (kind == 3) v = j == pos ? NAN : (double)j;
        put(x, (size_t)j, f64, v);
    }
    int st[3];
    for (int isa = 0; isa < 3; ++isa) {
        y[isa] = malloc((size_t)n * es);
        memset(y[isa], 0x7f, (size_t)n * es);
        fa_view4 xv = {x, {n, n, n, 1}}, yv = {y[isa], {n, n, n, 1}};
        set_level(isa);
        st[isa] = fa_masked_softmax(f64 ? FA_DTYPE_F64 : FA_DTYPE_F32, xv, yv, 1, 1, 1, n, 1.0,
                                    NULL, NULL, NULL, 0, 1);
    }
    int bad = 0;
    for (int isa = 1; isa < 3; ++isa) {
        int64_t first = -1;
        double got = 0, want = 0;
        int64_t nbad = count_bad(y[isa], y[0], (size_t)n, f64, &first, &got, &want);
        if (st[isa] != st[0] || nbad) {
            bad = 1;
            REPORT("nan-row %s vs scalar: f64=%d n=%d pos=%d kind=%d: status %d vs %d, %" PRId64
                   " bad (first [%" PRId64 "] %g vs %g)\n",
                   level_name[isa], f64, n, pos, kind, st[isa], st[0], nbad, first, got, want);
        }
    }
    for (int isa = 0; isa < 3; ++isa) free(y[isa]);
    free(x);
    return bad;
}

/* ------------------------------------------------------------------ rope */
/* Three rows of D = 2 * half values rotated by random table rows; levels 1
 * and 2 must match level 0 bit for bit. dtype: FA_DTYPE_F32, F64, BF16 or
 * F16 (16-bit rows take float32 tables). */
static int run_rope(int dtype, int64_t half, int layout, int inplace) {
    const int f64 = dtype == FA_DTYPE_F64, narrow = dtype == FA_DTYPE_BF16 || dtype == FA_DTYPE_F16;
    const size_t es = f64 ? 8 : narrow ? 2 : 4, tes = f64 ? 8 : 4;
    const size_t L = 3, D = (size_t)(2 * half), n = L * D;
    const int64_t table_len = 5;
    char *x = malloc(n * es + 1), *cs = malloc((size_t)(table_len * half) * tes + 1);
    char *sn = malloc((size_t)(table_len * half) * tes + 1), *y[3];
    for (size_t i = 0; i < n; ++i) {
        const double v = rf() * 4;
        if (dtype == FA_DTYPE_BF16) ((uint16_t *)x)[i] = fa_f32_to_bf16_bits((float)v);
        else if (dtype == FA_DTYPE_F16) ((uint16_t *)x)[i] = fa_f32_to_f16_bits((float)v);
        else put(x, i, f64, v);
    }
    for (int64_t i = 0; i < table_len * half; ++i) {
        const double a = rf() * 3.2;
        put(cs, (size_t)i, f64, cos(a));
        put(sn, (size_t)i, f64, sin(a));
    }
    int64_t index[3];
    for (size_t l = 0; l < L; ++l) index[l] = ri(0, table_len - 1);
    int st[3];
    for (int isa = 0; isa < 3; ++isa) {
        y[isa] = malloc(n * es + 1);
        if (inplace) memcpy(y[isa], x, n * es);
        else memset(y[isa], 0x7f, n * es);
        fa_rope_args a;
        memset(&a, 0, sizeof a);
        a.N0 = 1, a.N1 = 1, a.L = (int64_t)L, a.D = (int64_t)D;
        a.x.data = inplace ? y[isa] : x;
        a.x.stride[0] = a.x.stride[1] = (int64_t)n, a.x.stride[2] = (int64_t)D, a.x.stride[3] = 1;
        a.y = a.x;
        a.y.data = y[isa];
        a.index = index;
        a.index_stride[2] = 1;
        a.cos = cs, a.sin = sn, a.table_len = table_len, a.layout = layout;
        set_level(isa);
        st[isa] = fa_rope_apply(dtype, &a, 1);
    }
    int bad = 0;
    for (int isa = 1; isa < 3; ++isa) {
        if (st[isa] != st[0] || memcmp(y[isa], y[0], n * es) != 0) {
            bad = 1;
            REPORT("rope %s vs scalar: dtype=%d D=%zu layout=%d inplace=%d: status %d vs %d, "
                   "bits differ\n",
                   level_name[isa], dtype, D, layout, inplace, st[isa], st[0]);
        }
    }
    for (int isa = 0; isa < 3; ++isa) free(y[isa]);
    free(x), free(cs), free(sn);
    return bad;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s CASES SEED\n", argv[0]);
        return 2;
    }
    int cases = atoi(argv[1]);
    uint64_t seed = (uint64_t)strtoull(argv[2], NULL, 10);
    seed_cases(seed);
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
        printf("FAIL: this CPU lacks AVX2 or FMA; the level-1 kernels run natively here\n");
        return 2;
    }

    int attn_bad = 0, sm_bad = 0, sm_n = 0, nan_bad = 0, nan_n = 0;
    for (int it = 0; it < cases; ++it) {
        attn_bad += run_attention(it);
        sm_bad += run_softmax(it, 0);
        ++sm_n;
    }
    for (int it = 0; it < 4; ++it, ++sm_n) sm_bad += run_softmax(cases + it, 1);
    for (int f64 = 0; f64 < 2; ++f64)
        for (int n = 1; n <= 70; ++n)
            for (int pos = 0; pos < n; ++pos)
                for (int kind = 0; kind < 4; ++kind, ++nan_n) nan_bad += run_nan_row(f64, n, pos, kind);

    int rope_bad = 0, rope_n = 0;
    const int rope_dtypes[4] = {FA_DTYPE_F32, FA_DTYPE_F64, FA_DTYPE_BF16, FA_DTYPE_F16};
    for (int d = 0; d < 4; ++d)
        for (int64_t half = 1; half <= 40; ++half)
            for (int layout = FA_ROPE_NEOX; layout <= FA_ROPE_GPTJ; ++layout)
                for (int inplace = 0; inplace < 2; ++inplace, ++rope_n)
                    rope_bad += run_rope(rope_dtypes[d], half, layout, inplace);

    printf("attention: %d random cases (seed %" PRIu64 "), %d mismatching\n", cases, seed, attn_bad);
    printf("softmax: %d random cases (4 streaming), %d mismatching\n", sm_n, sm_bad);
    printf("nan-rows: %d directed softmax rows, %d mismatching\n", nan_n, nan_bad);
    printf("rope: %d directed row sets, %d not bit-identical\n", rope_n, rope_bad);
    return (attn_bad || sm_bad || nan_bad || rope_bad) ? 1 : 0;
}
