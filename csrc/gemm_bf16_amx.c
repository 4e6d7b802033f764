/*
 * gemm_bf16_amx.c: the bfloat16 GEMM's kernel set at the amx level: AMX
 * tiles (TDPBF16PS) for the products, the avx512bf16 epilogue for the rest.
 * Exports fa_g16_bf16_amx (gemm_bf16.h); the driver is gemm_bf16.c.
 *
 * Tiles, one configuration for the whole GEMM (amx_tiles.h: each 16 rows x
 * 64 bytes):
 *   C 0..3  the float32 sums of the 32 x 32 register tile: rows 0-15 and
 *           16-31 (tiles 0, 1 and 2, 3) x columns 0-15 and 16-31;
 *   A 4, 5  rows 0-15 and 16-31 of the packed activations, 16 pairs of k
 *           (FA_G16_A_ROWS16: a row's 16 pairs are its 64 bytes);
 *   B 6, 7  16 pairs of k of the weight panel's columns 0-15 and 16-31: the
 *           packed weight already interleaves the pairs per column (pair q
 *           of a panel is 128 bytes, columns 0-15 its first 64), which is
 *           the B operand's layout, so B tiles load from the panel in place
 *           with a 128-byte stride.
 * Per 16 pairs (32 k): 2 A and 2 B loads, 4 TDPBF16PS of 16 x 16 x 32.
 *
 * Summation: TDPBF16PS adds each pair's two products to the float32 sum
 * with denormal inputs and results flushed to zero, in its own order, so
 * this level's results are not bit for bit those of the others (which all
 * follow vdpbf16ps, gemm_bf16_impl.h); they keep the same error bound, and
 * the same bits for every thread count (each element's sums do not depend
 * on the partition).
 */
#include <stdint.h>
#include <string.h>

/* GCC spells the macros __AMX_TILE__ / __AMX_BF16__, clang __AMXTILE__ /
 * __AMXBF16__ */
#if !(defined(__AMX_TILE__) || defined(__AMXTILE__)) || !(defined(__AMX_BF16__) || defined(__AMXBF16__))
#error "gemm_bf16_amx.c needs -mamx-tile -mamx-bf16"
#endif

/* the level-3 helpers (packing of nothing here, the epilogue), without the
 * level's exported kernel sets */
#include "fastattn.h"
#define FA_G16_LEVEL 3
#define FA_G16_HELPERS_ONLY 1
#include "gemm_bf16_impl.h"
#include "amx_tiles.h"

/* rows of the register tile: two A tiles */
#define AMX_MR 32
/* pairs of k per tile column block: a 64-byte tile row of bf16 pairs */
#define AMX_KP 16

/* Packs rows [0, rows) of a (row stride lda, K elements) into tiles of
 * AMX_MR rows (zero rows past the end): tile t, pair block s (16 pairs),
 * row r, pair q % 16 at t K2a MR + s 16 MR + 16 r + q % 16 uint32, with
 * K2a = ceil(K2 / 16) 16 and zero pairs past K2 (and an odd K's last pair
 * high half 0), so that every block is a whole A tile. */
static void amx_pack_a(const uint16_t *a, int64_t lda, int64_t rows, int64_t K, void *packed) {
    const int64_t K2 = (K + 1) / 2, K2a = (K2 + AMX_KP - 1) / AMX_KP * AMX_KP;
    const int64_t tiles = (rows + AMX_MR - 1) / AMX_MR;
    uint32_t *p = (uint32_t *)packed;
    for (int64_t t = 0; t < tiles; ++t) {
        uint32_t *tile = p + t * K2a * AMX_MR;
        for (int64_t r = 0; r < AMX_MR; ++r) {
            const int64_t row = t * AMX_MR + r;
            const uint16_t *src = row < rows ? a + row * lda : NULL;
            for (int64_t s = 0; s < K2a / AMX_KP; ++s) {
                uint32_t *dst = tile + s * AMX_KP * AMX_MR + r * AMX_KP;
                for (int64_t e = 0; e < AMX_KP; ++e) {
                    const int64_t q = s * AMX_KP + e;
                    uint32_t w = 0;
                    if (src && 2 * q + 1 < K)
                        w = (uint32_t)src[2 * q] | ((uint32_t)src[2 * q + 1] << 16);
                    else if (src && 2 * q < K)
                        w = src[2 * q]; /* an odd K's last pair: high half 0 */
                    dst[e] = w;
                }
            }
        }
    }
}

/* c (32, 32) floats, row stride ldc = (accumulate ? c : 0) + a_tile (32
 * rows, npairs pairs from a block start) . w_panel (npairs pairs)^T. The
 * last block of fewer than 16 pairs reads its weight pairs from a copy
 * padded with zero pairs (past them the panel holds the next panel, or
 * ends), against the packing's zero pairs of a. */
static void amx_micro(int64_t npairs, const void *a_tile, const uint16_t *w, float *c,
                      int64_t ldc, int accumulate) {
    const uint32_t *a = (const uint32_t *)a_tile;
    const int64_t cst = ldc * (int64_t)sizeof(float);
    if (accumulate) {
        _tile_loadd(0, c, cst);
        _tile_loadd(1, c + 16, cst);
        _tile_loadd(2, c + 16 * ldc, cst);
        _tile_loadd(3, c + 16 * ldc + 16, cst);
    } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
    }
    const int64_t full = npairs / AMX_KP, left = npairs % AMX_KP;
    const int64_t wst = FA_G16_PAIR_ELEMS * (int64_t)sizeof(uint16_t);
    uint16_t tail[AMX_KP * FA_G16_PAIR_ELEMS] __attribute__((aligned(64)));
    if (left) {
        memcpy(tail, w + full * AMX_KP * FA_G16_PAIR_ELEMS,
               (size_t)(left * FA_G16_PAIR_ELEMS) * sizeof(uint16_t));
        memset(tail + left * FA_G16_PAIR_ELEMS, 0,
               (size_t)((AMX_KP - left) * FA_G16_PAIR_ELEMS) * sizeof(uint16_t));
    }
    for (int64_t s = 0; s < full + (left > 0); ++s) {
        const uint32_t *as = a + s * AMX_KP * AMX_MR;
        const uint16_t *ws = s < full ? w + s * AMX_KP * FA_G16_PAIR_ELEMS : tail;
        _tile_loadd(4, as, AMX_KP * 4);
        _tile_loadd(5, as + 16 * AMX_KP, AMX_KP * 4);
        _tile_loadd(6, ws, wst);
        _tile_loadd(7, ws + 32, wst);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, c, cst);
    _tile_stored(1, c + 16, cst);
    _tile_stored(2, c + 16 * ldc, cst);
    _tile_stored(3, c + 16 * ldc + 16, cst);
}

const fa_g16_kernels fa_g16_bf16_amx = {
    .mr = AMX_MR, .a_layout = FA_G16_A_ROWS16, .pair_align = AMX_KP, .pack_a = amx_pack_a,
    .micro = amx_micro, .epilogue = g16_epilogue, .begin = fa_amx_begin, .end = fa_amx_end};
