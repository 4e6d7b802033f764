/*
 * helpers.c: the emulated AVX-512 job's test of the level-2 vector helpers
 * of csrc/simd_map.h (tests/emulated_avx512/run.sh, docs/reliability.md),
 * against the native AVX2 ones (helpers_level.c, compiled per level):
 *
 *   exp      vf32_exp_nonpos, vf32_exp2_nonpos and vf64_exp over about 4M
 *            inputs each plus NaN, +-inf, +-0, subnormals and the clamp
 *            edges: bit-identical to AVX2;
 *   hmax     vf32_hmax bit-identical (NaN included) to the AVX2 hmax of the
 *            two halves' vector max; hmax/hsum values on 100k random
 *            vectors with NaN and -inf;
 *   keep     every drop / r from 0 to the lane count with both byte tables
 *            the kernels use, and mask bytes other than 0 and 1;
 *   loadn    loadn/storen for every n from 0 to the lane count, on heap
 *            buffers of exactly n elements, so ASan reports any access
 *            outside them.
 *
 *   helpers          (exit 0: all checks pass; 1: a check failed)
 */
#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DECLARE(s)                                                                 \
    int lanes32_##s(void);                                                         \
    int lanes64_##s(void);                                                         \
    void exp32_##s(const float *, float *, int64_t);                               \
    void exp2_32_##s(const float *, float *, int64_t);                             \
    void exp64_##s(const double *, double *, int64_t);                             \
    float hsum32_##s(const float *);                                               \
    float hmax32_##s(const float *);                                               \
    double hsum64_##s(const double *);                                             \
    double hmax64_##s(const double *);                                             \
    void keep32_##s(const float *, const uint8_t *, float *);                      \
    void keep64_##s(const double *, const uint8_t *, double *);                    \
    void loadn32_##s(const float *, int64_t, float *);                             \
    void storen32_##s(float *, const float *, int64_t);                            \
    void loadn64_##s(const double *, int64_t, double *);                           \
    void storen64_##s(double *, const double *, int64_t);                          \
    void max32_##s(const float *, const float *, float *);                         \
    void widen_##s(const void *, int, int64_t, float *);
DECLARE(avx2)
DECLARE(avx512)

static int fails = 0;
#define CHECK(cond, ...)                   \
    do {                                   \
        if (!(cond) && fails++ < 40) {     \
            printf("FAIL: " __VA_ARGS__);  \
            printf("\n");                  \
        }                                  \
    } while (0)

static int same32(float a, float b) {
    uint32_t x, y;
    memcpy(&x, &a, 4);
    memcpy(&y, &b, 4);
    return x == y || (a != a && b != b);
}
static int same64(double a, double b) {
    uint64_t x, y;
    memcpy(&x, &a, 8);
    memcpy(&y, &b, 8);
    return x == y || (a != a && b != b);
}
static uint32_t rng = 12345;
static uint32_t rnd(void) {
    rng = rng * 1664525u + 1013904223u;
    return rng >> 8;
}

static void test_exp(void) {
    enum { N = 1 << 22 };
    float *x = malloc(N * 4), *y1 = malloc(N * 4), *y2 = malloc(N * 4);
    int64_t n = 0;
    for (int64_t i = 0; i < N - 64; ++i) x[n++] = -200.0f + 201.0f * (float)i / (float)(N - 64);
    static const float sp[] = {NAN, -NAN, -INFINITY, INFINITY, 0.0f, -0.0f, 1e-45f, -1e-45f,
                               -87.33f, -87.34f, -87.68f, -88.0296919f, -88.03f, -103.0f, -104.0f,
                               -126.0f, -126.5f, -126.49f, -127.0f, -127.5f, -149.0f, -150.0f,
                               0.125f, 0.1f, -1e30f, -FLT_MAX};
    for (unsigned i = 0; i < sizeof sp / sizeof sp[0]; ++i) x[n++] = sp[i];
    while (n % 16) x[n++] = -1.0f;

    exp32_avx2(x, y1, n);
    exp32_avx512(x, y2, n);
    int bad = 0;
    for (int64_t i = 0; i < n; ++i)
        if (!same32(y1[i], y2[i]) && bad++ < 5) printf("  exp x=%a avx2=%a avx512=%a\n", x[i], y1[i], y2[i]);
    CHECK(bad == 0, "vf32_exp_nonpos differs from AVX2 in %d of %" PRId64 " lanes", bad, n);
    int ntot = (int)n;

    exp2_32_avx2(x, y1, n);
    exp2_32_avx512(x, y2, n);
    bad = 0;
    for (int64_t i = 0; i < n; ++i)
        if (!same32(y1[i], y2[i]) && bad++ < 5) printf("  exp2 x=%a avx2=%a avx512=%a\n", x[i], y1[i], y2[i]);
    CHECK(bad == 0, "vf32_exp2_nonpos differs from AVX2 in %d of %" PRId64 " lanes", bad, n);

    double *xd = malloc(N * 8), *z1 = malloc(N * 8), *z2 = malloc(N * 8);
    n = 0;
    for (int64_t i = 0; i < N - 64; ++i) xd[n++] = -760.0 + 1530.0 * (double)i / (double)(N - 64);
    static const double spd[] = {NAN, -NAN, -INFINITY, INFINITY, 0.0, -0.0, 4.9e-324,
                                 -708.3964185322641, -708.39641853226, -708.4, -745.0,
                                 709.782712893384, 709.79, 1e300, -1e300, -DBL_MAX, DBL_MAX,
                                 -707.0, -709.0};
    for (unsigned i = 0; i < sizeof spd / sizeof spd[0]; ++i) xd[n++] = spd[i];
    while (n % 8) xd[n++] = -1.0;
    exp64_avx2(xd, z1, n);
    exp64_avx512(xd, z2, n);
    bad = 0;
    for (int64_t i = 0; i < n; ++i)
        if (!same64(z1[i], z2[i]) && bad++ < 5) printf("  exp64 x=%a avx2=%a avx512=%a\n", xd[i], z1[i], z2[i]);
    CHECK(bad == 0, "vf64_exp differs from AVX2 in %d of %" PRId64 " lanes", bad, n);
    printf("exp: %d float inputs (exp, exp2) and %d double inputs, bit-identical to AVX2: %s\n",
           ntot, (int)n, fails ? "NO" : "yes");
    free(x); free(y1); free(y2); free(xd); free(z1); free(z2);
}

static void test_reductions(void) {
    for (int t = 0; t < 100000; ++t) {
        float v[16];
        double d[8];
        for (int i = 0; i < 16; ++i) {
            v[i] = (float)((int)(rnd() % 2001) - 1000) / 7.0f;
            if (rnd() % 13 == 0) v[i] = -INFINITY;
            if (rnd() % 29 == 0) v[i] = NAN;
        }
        for (int i = 0; i < 8; ++i) {
            d[i] = (double)((int)(rnd() % 2001) - 1000) / 7.0;
            if (rnd() % 13 == 0) d[i] = -INFINITY;
            if (rnd() % 29 == 0) d[i] = NAN;
        }
        /* reference: the AVX2 reduction of the vector max of the two halves */
        float m1[8];
        max32_avx2(v, v + 8, m1);
        float ref = hmax32_avx2(m1), got = hmax32_avx512(v);
        CHECK(same32(ref, got), "vf32_hmax %g vs AVX2 %g", got, ref);
        int hasnan = 0;
        float mx = -INFINITY;
        double s = 0;
        for (int i = 0; i < 16; ++i) {
            if (v[i] != v[i]) hasnan = 1;
            else if (v[i] > mx) mx = v[i];
            s += v[i];
        }
        if (!hasnan) CHECK(got == mx, "vf32_hmax %g vs %g", got, mx);
        float hs = hsum32_avx512(v);
        if (s == s) CHECK(fabs(hs - s) <= 1e-3 * (1 + fabs(s)) || (isinf(s) && hs == (float)s), "vf32_hsum %g vs %g", hs, s);

        double dm = -INFINITY, ds = 0;
        hasnan = 0;
        for (int i = 0; i < 8; ++i) {
            if (d[i] != d[i]) hasnan = 1;
            else if (d[i] > dm) dm = d[i];
            ds += d[i];
        }
        double dgot = hmax64_avx512(d);
        if (!hasnan) CHECK(dgot == dm, "vf64_hmax %g vs %g", dgot, dm);
        double dhs = hsum64_avx512(d);
        if (ds == ds) CHECK(fabs(dhs - ds) <= 1e-9 * (1 + fabs(ds)) || (isinf(ds) && dhs == ds), "vf64_hsum %g vs %g", dhs, ds);
    }
}

static void test_keep(void) {
    /* the attention ramp (64 x 0, 64 x 1: drop the first `drop` lanes) and
     * the softmax first-lanes table (64 x 1, 64 x 0: keep the first r) */
    uint8_t ramp[128], first[128];
    for (int i = 0; i < 128; ++i) {
        ramp[i] = i >= 64;
        first[i] = i < 64;
    }
    float v[16], out[16];
    double d[8], dout[8];
    for (int i = 0; i < 16; ++i) v[i] = (float)(i + 1);
    for (int i = 0; i < 8; ++i) d[i] = (double)(i + 1);
    for (int drop = 0; drop <= 16; ++drop) {
        keep32_avx512(v, ramp + 64 - drop, out);
        for (int i = 0; i < 16; ++i)
            CHECK(out[i] == (i < drop ? -INFINITY : v[i]), "vf32_keep ramp drop=%d lane %d = %g", drop, i, out[i]);
        if (drop >= 1) {
            keep32_avx512(v, first + 64 - drop, out);
            for (int i = 0; i < 16; ++i)
                CHECK(out[i] == (i < drop ? v[i] : -INFINITY), "vf32_keep first r=%d lane %d = %g", drop, i, out[i]);
        }
    }
    for (int drop = 0; drop <= 8; ++drop) {
        keep64_avx512(d, ramp + 64 - drop, dout);
        for (int i = 0; i < 8; ++i)
            CHECK(dout[i] == (i < drop ? -INFINITY : d[i]), "vf64_keep ramp drop=%d lane %d = %g", drop, i, dout[i]);
        if (drop >= 1) {
            keep64_avx512(d, first + 64 - drop, dout);
            for (int i = 0; i < 8; ++i)
                CHECK(dout[i] == (i < drop ? d[i] : -INFINITY), "vf64_keep first r=%d lane %d = %g", drop, i, dout[i]);
        }
    }
    /* bool-mask bytes other than 1 */
    uint8_t m[16];
    for (int i = 0; i < 16; ++i) m[i] = (uint8_t)((i * 37) & 0xff);
    m[3] = 0;
    m[0] = 0x80;
    keep32_avx512(v, m, out);
    for (int i = 0; i < 16; ++i) CHECK(out[i] == (m[i] ? v[i] : -INFINITY), "vf32_keep byte %#x lane %d = %g", m[i], i, out[i]);
    keep64_avx512(d, m, dout);
    for (int i = 0; i < 8; ++i) CHECK(dout[i] == (m[i] ? d[i] : -INFINITY), "vf64_keep byte %#x lane %d = %g", m[i], i, dout[i]);
}

static void test_loadn_storen(void) {
    float v[16], out[16];
    double d[8], dout[8];
    for (int i = 0; i < 16; ++i) v[i] = (float)(i + 101);
    for (int i = 0; i < 8; ++i) d[i] = (double)(i + 101);
    for (int k = 0; k <= 16; ++k) {
        float *p = malloc((size_t)(k ? k : 1) * 4);
        for (int i = 0; i < k; ++i) p[i] = (float)(i + 1);
        loadn32_avx512(p, k, out);
        for (int i = 0; i < 16; ++i) CHECK(out[i] == (i < k ? (float)(i + 1) : 0.0f), "vf32_loadn n=%d lane %d = %g", k, i, out[i]);
        for (int i = 0; i < k; ++i) p[i] = -5;
        storen32_avx512(p, v, k);
        for (int i = 0; i < k; ++i) CHECK(p[i] == v[i], "vf32_storen n=%d lane %d = %g", k, i, p[i]);
        free(p);
    }
    for (int k = 0; k <= 8; ++k) {
        double *p = malloc((size_t)(k ? k : 1) * 8);
        for (int i = 0; i < k; ++i) p[i] = (double)(i + 1);
        loadn64_avx512(p, k, dout);
        for (int i = 0; i < 8; ++i) CHECK(dout[i] == (i < k ? (double)(i + 1) : 0.0), "vf64_loadn n=%d lane %d = %g", k, i, dout[i]);
        for (int i = 0; i < k; ++i) p[i] = -5;
        storen64_avx512(p, d, k);
        for (int i = 0; i < k; ++i) CHECK(p[i] == d[i], "vf64_storen n=%d lane %d = %g", k, i, p[i]);
        free(p);
    }
}

/* Narrow K/V widening: every one of the 65536 bfloat16 and half bit
 * patterns and the 256 int8 values, at both levels, against the exact
 * value (computed here from the bits, independently of simd_map.h): bit
 * for bit, NaNs as quiet NaNs with the payload kept. The odd count (65535)
 * exercises the loadn tail. */
static float half_value(uint16_t h) {
    const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    const float sign = (h & 0x8000) ? -1.0f : 1.0f;
    if (e == 0x1f) {
        if (m == 0) return sign * INFINITY;
        uint32_t u = (h & 0x8000u) << 16 | 0x7fc00000u | (uint32_t)m << 13;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    return sign * (e ? ldexpf((float)(m | 0x400), e - 25) : ldexpf((float)m, -24));
}
static void test_widen(void) {
    static uint16_t bits[65536];
    static int8_t i8[256];
    static float want[65536], got[65536];
    for (int i = 0; i < 65536; ++i) bits[i] = (uint16_t)i;
    for (int i = 0; i < 256; ++i) i8[i] = (int8_t)(i - 128);
    for (int kind = 1; kind <= 3; ++kind) {
        const int64_t n = kind == 3 ? 255 : 65535;
        for (int64_t i = 0; i < n; ++i) {
            if (kind == 1) {
                uint32_t u = (uint32_t)bits[i] << 16;
                memcpy(&want[i], &u, 4);
            } else {
                want[i] = kind == 2 ? half_value(bits[i]) : (float)i8[i];
            }
        }
        const void *src = kind == 3 ? (const void *)i8 : (const void *)bits;
        for (int level = 1; level <= 2; ++level) {
            memset(got, 0, sizeof got);
            if (level == 1) widen_avx2(src, kind, n, got);
            else widen_avx512(src, kind, n, got);
            int bad = 0;
            for (int64_t i = 0; i < n; ++i) bad += memcmp(&got[i], &want[i], 4) != 0;
            CHECK(bad == 0, "widen kind %d level %d: %d of %" PRId64 " values differ", kind, level,
                  bad, n);
        }
    }
}

int main(void) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
        printf("FAIL: this CPU lacks AVX2 or FMA; the AVX2 helpers run natively here\n");
        return 2;
    }
    CHECK(lanes32_avx512() == 16 && lanes64_avx512() == 8 && lanes32_avx2() == 8 && lanes64_avx2() == 4,
          "lane counts avx512 %d/%d avx2 %d/%d", lanes32_avx512(), lanes64_avx512(), lanes32_avx2(), lanes64_avx2());
    test_exp();
    int f = fails;
    test_reductions();
    test_keep();
    test_loadn_storen();
    test_widen();
    printf("helpers: hmax/hsum on 100000 random vectors, keep for every drop/r, loadn/storen for every n, narrow K/V widening of every bit pattern: %d failing checks\n",
           fails - f);
    return fails ? 1 : 0;
}
