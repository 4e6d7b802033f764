/*
 * attention_job.h: what the attention driver (attention.c) hands the
 * per-ISA work-item kernels (attention_impl.h): the tile sizes both sides
 * agree on, the description of one call, and the scratch a thread needs.
 */
#ifndef FASTATTN_ATTENTION_JOB_H
#define FASTATTN_ATTENTION_JOB_H

#include <stdint.h>

#include "checked_size.h"
#include "fastattn.h"

/* Tile sizes shared by the driver (attention.c, which sizes scratch) and
 * the kernels (attention_impl.h):
 *   FA_ATTN_MQ = 96 query rows per work item: a multiple of every ISA's
 *     query chunk (2 vectors: 2, 8, 16, 32 lanes) and of every P.V row
 *     block (4, 6, 12); the packed Q^T block is 96*D elements (24 KiB for
 *     D = 64 floats), which stays in L1/L2 while K streams past it.
 *   FA_ATTN_NK = 48 keys per tile: a multiple of every register tile's
 *     key count (4, 6, 12), so only the last tile of a row has leftovers;
 *     P.V then sweeps the 48 x 96 score tile (18 KiB in float) plus one
 *     48-row chunk of V (3 KiB), which stays inside a 32 KiB L1 (64 keys
 *     did not: profiles showed P.V stalling on V loads).
 *   Rows fewer than FA_ATTN_ROW_PATH take the per-row (GEMV-style) path,
 *     which vectorises along D instead of along queries: a 1-query block
 *     would waste 15/16 of a 16-query chunk. */
#define FA_ATTN_MQ 96
#define FA_ATTN_NK 48
#define FA_ATTN_ROW_PATH 4

/* Everything one SDPA call needs, with strides in elements. */
typedef struct {
    int dtype;
    int64_t B, H, Hkv, Lq, Lk, D, Dv, group; /* group = H / Hkv */
    const char *q, *k, *v;                   /* (B,H,Lq,D) (B,Hkv,Lk,D) (B,Hkv,Lk,Dv) */
    char *out, *weights;                     /* (B,H,Lq,Dv), optional (B,H,Lq,Lk) */
    int64_t qs[4], ks[4], vs[4], os[4], ws[4];
    fa_mask_view mask;                       /* broadcast to (B,H,Lq,Lk) */
    fa_lengths_view key_len;                 /* per (b, h); data NULL = Lk */
    int causal;
    int64_t causal_offset;                   /* 0 top-left, Lk - Lq bottom-right */
    double scale;
    const void *alibi;                       /* (H,) in the dtype, or NULL */
} fa_attn_job;

/* Scratch elements one thread needs for fa_attention_block_*: Q^T block,
 * score tile, accumulator, per-row state, plus slack for 64-byte alignment
 * of each region. -1 on overflow. */
static inline int64_t fa_attention_scratch_elems(int64_t D, int64_t Dv) {
    int64_t qt, acc;
    /* the accumulator's row stride rounds Dv up to a 32-lane chunk */
    if (D > INT64_MAX / 2 || Dv > INT64_MAX / 2) return -1;
    if (!fa_mul_ok(D, FA_ATTN_MQ, &qt) || !fa_mul_ok(Dv + 32, FA_ATTN_MQ, &acc)) return -1;
    const int64_t tile = (int64_t)FA_ATTN_NK * FA_ATTN_MQ;
    const int64_t rows = 4 * FA_ATTN_MQ;
    if (qt > INT64_MAX / 4 || acc > INT64_MAX / 4) return -1;
    return qt + tile + acc + rows + 64; /* + alignment slack of the regions */
}

#endif /* FASTATTN_ATTENTION_JOB_H */
