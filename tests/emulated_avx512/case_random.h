/*
 * case_random.h: the random numbers from which the emulated AVX-512 job's
 * randomized tests (differential.c, gemm16.c) draw their cases. xorshift64
 * from a fixed start, moved by the SEED argument, so that a run with the
 * same CASES and SEED repeats exactly. Include it from one .c file per
 * program: the state is that file's own.
 */
#ifndef EMU512_CASE_RANDOM_H
#define EMU512_CASE_RANDOM_H

#include <stdint.h>

static uint64_t rs = 88172645463325252ull;

static uint64_t rnd(void) {
    rs ^= rs << 13;
    rs ^= rs >> 7;
    rs ^= rs << 17;
    return rs;
}

/* uniform enough in [lo, hi] for drawing test sizes (modulo bias is
 * negligible for ranges this small) */
static int64_t ri(int64_t lo, int64_t hi) { return lo + (int64_t)(rnd() % (uint64_t)(hi - lo + 1)); }

/* mix the command line's seed into the start; the odd multiplier spreads
 * small seeds over all 64 bits, and a zero state (xorshift's fixed point)
 * is moved off */
static void seed_cases(uint64_t seed) {
    rs ^= seed * 0x9e3779b97f4a7c15ull;
    if (rs == 0) rs = 1;
}

#endif /* EMU512_CASE_RANDOM_H */
