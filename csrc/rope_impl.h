/*
 * rope_impl.h: the rotary row kernel (fa_rope_row_*_fn in kernel_table.h),
 * written once and instantiated per ISA and dtype (see rope_scalar.c,
 * rope_avx2.c, rope_avx512.c).
 *
 * Row x, y: (2 * half) contiguous, cs, sn: (half) contiguous. Per pair
 * (a, b) it writes (a cos - b sin, b cos + a sin): 2 loads, 4 multiplies,
 * 2 adds and 2 stores, so the row is memory-bound and plain C is enough:
 * the compiler vectorises the contiguous NEOX loops with each ISA file's
 * flags, and the strided GPTJ ones where it can. Every element is computed
 * by the same operations in the same order at every ISA (no reduction, and
 * no fused multiply-add: -ffp-contract=off, plus the GPTJ form below), so
 * the ISA levels give bit-identical rows; the emulated AVX-512 job checks
 * them bit for bit.
 *
 * GPTJ pairs are written a * cos + (-b) * sin, which rounds exactly as
 * a * cos - b * sin (negation is exact and x + (-y) is x - y), because
 * GCC 12 recognises the subtracting form on interleaved pairs as a complex
 * multiplication and emits a fused vfmaddsub for it despite
 * -ffp-contract=off: the double rows at avx2/avx512 then differed from the
 * scalar ones in the last bit.
 */
#include "simd_dtype.h"

/* out of place: y and x never overlap */
static void FA_KNAME(rope_row_apart, DT)(const T *restrict x, T *restrict y,
                                         const T *restrict cs, const T *restrict sn,
                                         int64_t half, int layout) {
    if (layout == FA_ROPE_NEOX) {
        for (int64_t j = 0; j < half; ++j) {
            const T a = x[j], b = x[j + half];
            y[j] = a * cs[j] - b * sn[j];
            y[j + half] = b * cs[j] + a * sn[j];
        }
    } else {
        for (int64_t j = 0; j < half; ++j) {
            const T a = x[2 * j], b = x[2 * j + 1];
            y[2 * j] = a * cs[j] + (-b) * sn[j]; /* not "- b * sn[j]": see the top */
            y[2 * j + 1] = b * cs[j] + a * sn[j];
        }
    }
}

/* in place: each pair is read before it is written */
static void FA_KNAME(rope_row_inplace, DT)(T *p, const T *restrict cs, const T *restrict sn,
                                           int64_t half, int layout) {
    if (layout == FA_ROPE_NEOX) {
        T *restrict lo = p, *restrict hi = p + half;
        for (int64_t j = 0; j < half; ++j) {
            const T a = lo[j], b = hi[j];
            lo[j] = a * cs[j] - b * sn[j];
            hi[j] = b * cs[j] + a * sn[j];
        }
    } else {
        for (int64_t j = 0; j < half; ++j) {
            const T a = p[2 * j], b = p[2 * j + 1];
            p[2 * j] = a * cs[j] + (-b) * sn[j]; /* not "- b * sn[j]": see the top */
            p[2 * j + 1] = b * cs[j] + a * sn[j];
        }
    }
}

void FA_KNAME(rope_row, DT)(const T *x, T *y, const T *cs, const T *sn, int64_t half,
                            int layout) {
    if (x == y)
        FA_KNAME(rope_row_inplace, DT)(y, cs, sn, half, layout);
    else
        FA_KNAME(rope_row_apart, DT)(x, y, cs, sn, half, layout);
}
