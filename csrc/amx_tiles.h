/*
 * amx_tiles.h: the AMX tile configuration the amx level's kernels share
 * (gemm_bf16_amx.c, attention_amx.c): every tile 16 rows x 64 bytes, the
 * shape of a TDPBF16PS operand of 16 x 16 floats (C), 16 rows of 16 bf16
 * pairs (A) or 16 pairs of 16 columns (B). The configuration is per
 * thread: a kernel loads it before its first tile instruction and
 * releases the tiles after its last.
 */
#ifndef FASTATTN_AMX_TILES_H
#define FASTATTN_AMX_TILES_H

#include <stdint.h>
#include <string.h>
#include <immintrin.h>

/* palette 1: byte 0 the palette, bytes 16-47 each tile's bytes per row
 * (uint16), bytes 48-63 its rows (uint8) */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} fa_amx_tile_config;

static inline void fa_amx_begin(void) {
    fa_amx_tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; ++t) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
}

static inline void fa_amx_end(void) { _tile_release(); }

#endif /* FASTATTN_AMX_TILES_H */
