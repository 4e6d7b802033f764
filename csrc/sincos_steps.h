/*
 * sincos_steps.h: sin and cos of pos * inv[i] for runs of consecutive
 * positions, shared by the sinusoidal position encodings
 * (position_encoding.c) and the rotary tables (rope.c).
 *
 * The angle pos * inv reaches 1e6 rad and more, where a float angle is off
 * by ~0.06 rad, so everything is carried in double. A run starts from an
 * exact libm sin/cos (fa_sincos_exact); each following position rotates
 * (sin, cos) by the per-column step angle (sin w, cos w) (fa_sincos_step):
 * 4 multiplies and 2 adds instead of two libm calls, at about one double
 * ulp lost per step.
 */
#ifndef FASTATTN_SINCOS_STEPS_H
#define FASTATTN_SINCOS_STEPS_H

#include <math.h>
#include <stdint.h>

/* Positions per exact restart for float tables: 16 rotation steps cost
 * < 1e-14 absolute error (float's own rounding is 6e-8) while cutting libm
 * calls 16-fold. Double tables restart at every position (block 1): past
 * position ~1e4 the rounding of the double angle pos * inv itself exceeds
 * 1e-12, so a double table is only reproducible as sin(fl(pos * inv)). */
#define FA_SINCOS_BLOCK_F32 16
#define FA_SINCOS_BLOCK_F64 1

/* s[i], c[i] = sin, cos of pos * inv[i] for i < n, from libm. */
static inline void fa_sincos_exact(double *s, double *c, double pos, const double *inv,
                                   int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        const double a = pos * inv[i];
        s[i] = sin(a);
        c[i] = cos(a);
    }
}

/* Advances each (s[i], c[i]) by one step: the angle grows by w_i, where
 * ws[i], wc[i] = sin, cos of w_i. */
static inline void fa_sincos_step(double *s, double *c, const double *ws, const double *wc,
                                  int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        const double ns = s[i] * wc[i] + c[i] * ws[i];
        c[i] = c[i] * wc[i] - s[i] * ws[i];
        s[i] = ns;
    }
}

#endif /* FASTATTN_SINCOS_STEPS_H */
