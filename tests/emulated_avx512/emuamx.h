/*
 * emuamx.h: a per-element emulation of the AMX tile intrinsics that
 * csrc/gemm_bf16_amx.c uses, after the Intel SDM's pseudocode (vol. 2,
 * LDTILECFG, TILELOADD, TILESTORED, TILEZERO, TDPBF16PS, TILERELEASE), for
 * the emulated job (run.sh), which swaps it in for the file's
 * -mamx-tile/-mamx-bf16 guard in its scratch copy of csrc/.
 *
 * State per thread: the configuration and eight tiles of 16 rows x 64
 * bytes. What real hardware would fault on, or leave undefined, is an
 * "emu512: amx ..." line on stderr (the job fails on it) and an abort: a
 * tile instruction without a loaded configuration, a palette other than 1,
 * a tile of more than 16 rows or 64 bytes a row, and TDPBF16PS operands
 * whose shapes do not match (C rows = A rows, A bytes a row / 4 = B rows,
 * C bytes a row = B bytes a row).
 *
 * TDPBF16PS, per the SDM: for each row m of C, each pair k of A and each
 * column n of C, C[m][n] += A[m].bf16[2k] * B[k].bf16[2n], then
 * += A[m].bf16[2k+1] * B[k].bf16[2n+1]; each product of two bf16 is exact
 * in float32; denormal inputs count as zero and denormal results are
 * flushed to zero; each addition rounds to nearest even.
 */
#ifndef FASTATTN_EMUAMX_H
#define FASTATTN_EMUAMX_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
/* the compiler's own AMX declarations first (immintrin.h, through
 * emu512.h, declares them whatever the flags), so that the macros below
 * replace their uses, not their definitions; emu512.h also gives the bf16
 * widening with DAZ (emu_bf16) and the flush to zero (emu_daz) that
 * vdpbf16ps shares with TDPBF16PS */
#include "emu512.h"

typedef struct {
    int configured;
    uint16_t colsb[8];
    uint8_t rows[8];
    uint8_t data[8][16][64];
} emuamx_state;

static _Thread_local emuamx_state emuamx;

static void emuamx_fail(const char *what, int t) {
    fprintf(stderr, "emu512: amx %s (tile %d)\n", what, t);
    abort();
}

static void emuamx_check(int t) {
    if (!emuamx.configured) emuamx_fail("tile instruction without a configuration", t);
    if (t < 0 || t > 7) emuamx_fail("no such tile", t);
}

static inline void emuamx_loadconfig(const void *cfg) {
    const uint8_t *b = (const uint8_t *)cfg;
    if (b[0] != 1) emuamx_fail("palette other than 1", -1);
    memset(&emuamx, 0, sizeof emuamx);
    for (int t = 0; t < 8; ++t) {
        memcpy(&emuamx.colsb[t], b + 16 + 2 * t, 2);
        emuamx.rows[t] = b[48 + t];
        if (emuamx.colsb[t] > 64 || emuamx.rows[t] > 16) emuamx_fail("tile larger than 16 x 64", t);
    }
    emuamx.configured = 1;
}

static inline void emuamx_release(void) { memset(&emuamx, 0, sizeof emuamx); }

static inline void emuamx_zero(int t) {
    emuamx_check(t);
    memset(emuamx.data[t], 0, sizeof emuamx.data[t]);
}

static inline void emuamx_loadd(int t, const void *base, int64_t stride) {
    emuamx_check(t);
    memset(emuamx.data[t], 0, sizeof emuamx.data[t]);
    for (int r = 0; r < emuamx.rows[t]; ++r)
        memcpy(emuamx.data[t][r], (const uint8_t *)base + r * stride, emuamx.colsb[t]);
}

static inline void emuamx_stored(int t, void *base, int64_t stride) {
    emuamx_check(t);
    for (int r = 0; r < emuamx.rows[t]; ++r)
        memcpy((uint8_t *)base + r * stride, emuamx.data[t][r], emuamx.colsb[t]);
}

/* element i of a tile row of bf16, widened, denormals read as zero */
static inline float emuamx_bf16(const uint8_t *row, int i) {
    uint16_t h;
    memcpy(&h, row + 2 * i, 2);
    return emu_bf16(h);
}

static inline void emuamx_dpbf16ps(int c, int a, int b) {
    emuamx_check(c);
    emuamx_check(a);
    emuamx_check(b);
    if (emuamx.rows[c] != emuamx.rows[a] || emuamx.colsb[a] / 4 != emuamx.rows[b] ||
        emuamx.colsb[c] != emuamx.colsb[b] || emuamx.colsb[a] % 4 || emuamx.colsb[c] % 4)
        emuamx_fail("tdpbf16ps operand shapes do not match", c);
    for (int m = 0; m < emuamx.rows[c]; ++m)
        for (int n = 0; n < emuamx.colsb[c] / 4; ++n) {
            float acc;
            memcpy(&acc, emuamx.data[c][m] + 4 * n, 4);
            for (int k = 0; k < emuamx.colsb[a] / 4; ++k) {
                /* volatile: one rounding per addition, never contracted */
                volatile float p0 = emuamx_bf16(emuamx.data[a][m], 2 * k) *
                                    emuamx_bf16(emuamx.data[b][k], 2 * n);
                acc = emu_daz(acc + p0);
                volatile float p1 = emuamx_bf16(emuamx.data[a][m], 2 * k + 1) *
                                    emuamx_bf16(emuamx.data[b][k], 2 * n + 1);
                acc = emu_daz(acc + p1);
            }
            memcpy(emuamx.data[c][m] + 4 * n, &acc, 4);
        }
}

#undef _tile_loadconfig
#undef _tile_release
#undef _tile_zero
#undef _tile_loadd
#undef _tile_stored
#undef _tile_dpbf16ps
#define _tile_loadconfig(cfg) emuamx_loadconfig(cfg)
#define _tile_release() emuamx_release()
#define _tile_zero(t) emuamx_zero(t)
#define _tile_loadd(t, base, stride) emuamx_loadd((t), (base), (int64_t)(stride))
#define _tile_stored(t, base, stride) emuamx_stored((t), (base), (int64_t)(stride))
#define _tile_dpbf16ps(c, a, b) emuamx_dpbf16ps((c), (a), (b))

#endif /* FASTATTN_EMUAMX_H */
