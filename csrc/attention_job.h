/*
 * attention_job.h: what the attention driver (attention.c) hands the
 * per-ISA work-item kernels (attention_impl.h): the tile sizes both sides
 * agree on, the description of one call, and the scratch a thread needs.
 */
#ifndef FASTATTN_ATTENTION_JOB_H
#define FASTATTN_ATTENTION_JOB_H

#include <stddef.h>
#include <stdint.h>

#include "checked_size.h"
#include "fastattn.h"
#include "valid_lengths.h"

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
    fa_lengths_view key_start;               /* per (b, h); data NULL = 0 */
    /* The visible keys of query i are [i_pos - left, i_pos + right], each
     * side only when its has_ flag is set; causality is right = 0. */
    int has_left, has_right;
    int64_t left, right;
    double softcap;                          /* 0 = off */
    const void *sinks;                       /* (H,) in the dtype, or NULL */
    /* Packed (varlen) batches: sequence b is rows cu_q[b]:cu_q[b+1] of q
     * and out, cu_k[b]:cu_k[b+1] of k and v (the batch strides are 0);
     * NULL for padded batches. */
    const int64_t *cu_q, *cu_k;
    int alignment;
    /* K/V storage (fa_kv_dtype; FA_KV_SAME = the dtype) and, for int8, the
     * per-row scales (B, Hkv, Lk): b and kv-head strides, unit key stride;
     * in a paged cache (num_blocks, block_size, Hkv): block, kv-head and
     * row strides, as ks. */
    int kv_dtype;
    const float *k_scale, *v_scale;
    int64_t kss[3], vss[3];
    /* 16-bit queries and output (dtype FA_DTYPE_F32 computes): 0 when q and
     * out have the dtype, FA_DTYPE_BF16 or FA_DTYPE_F16 when they are 16-bit
     * floats, widened as they are packed and rounded (to nearest even) as
     * each output row is written. */
    int io16;
    /* Query heads per row-path work item (attention_rows), consecutive and
     * starting at a kv head's first: 0 or 1, one head; the group, for GQA
     * decode, so that the kv head is read once; several whole groups for
     * paged decode, so that the heads of each token, which lie side by side
     * in the cache, are read together. The split-KV partial results of
     * consecutive heads are part_head_stride (part_ml_head_stride)
     * elements apart. */
    int64_t row_heads;
    int64_t part_head_stride, part_ml_head_stride;
    /* Paged caches: k and v are (num_blocks, block_size, Hkv, D) with
     * ks[0] the block stride, ks[1] the head stride, ks[2] the row stride;
     * key t of sequence b is row t % block_size of block
     * block_table[b * bt_stride + t / block_size]; query i sits at
     * key_len[b] - Lq + i. NULL for contiguous keys. */
    const int64_t *block_table;
    int64_t bt_stride, block_size;
} fa_attn_job;

/* The window flags and sides and the softcap of an entry point's
 * arguments are valid: only the two window flags, sides >= 0 where set,
 * softcap 0 (off) or finite and positive (NaN and inf refused). */
static inline int fa_attn_features_ok(int window, int64_t left, int64_t right, double softcap) {
    if ((window & ~(FA_WINDOW_LEFT | FA_WINDOW_RIGHT)) != 0) return 0;
    if (((window & FA_WINDOW_LEFT) && left < 0) || ((window & FA_WINDOW_RIGHT) && right < 0))
        return 0;
    return softcap >= 0.0 && softcap <= 1e300;
}

/* i_pos - i for sequence b: the causal / ALiBi / window diagonal offset. */
static inline int64_t fa_attn_offset(const fa_attn_job *job, int64_t b) {
    if (job->block_table) return job->key_len.data[b * job->key_len.stride_b] - job->Lq;
    if (job->cu_q == NULL || job->alignment != FA_CAUSAL_BOTTOM_RIGHT) return job->causal_offset;
    return (job->cu_k[b + 1] - job->cu_k[b]) - (job->cu_q[b + 1] - job->cu_q[b]);
}

/* ALiBi adds -slope * (i_pos - j). Softmax ignores a per-row constant, so
 * the kernels add slope * (j - ref) with ref the row's last attendable key,
 * min(i_pos + right, key_len - 1) (the first one, max(key_start,
 * i_pos - left), for a negative slope). The bias near the row maximum then
 * stays near 0, where float keeps full precision: measured from i_pos it
 * can reach -1e3 (short key lengths, bottom-right alignment), where a float
 * score is only good to 6e-5. ref depends on the row and the lengths only,
 * never on the split. A sink, which is not shifted by ALiBi, is shifted by
 * slope * (i_pos - ref) to match. */
static inline int64_t fa_attn_alibi_ref(const fa_attn_job *job, int64_t b, int64_t h,
                                        int64_t ipos, int negative_slope) {
    if (negative_slope) { /* the row's first attendable key */
        int64_t ref = job->key_start.data ? fa_length_at(&job->key_start, b, h, job->Lk) : 0;
        if (job->has_left && ipos - job->left > ref) ref = ipos - job->left;
        return ref;
    }
    int64_t ref = fa_length_at(&job->key_len, b, h, job->Lk) - 1;
    if (job->has_right && ipos + job->right < ref) ref = ipos + job->right;
    return ref;
}

/* First query / key row of sequence b inside q, out / k, v (varlen). */
static inline int64_t fa_attn_q_row0(const fa_attn_job *job, int64_t b) {
    return job->cu_q ? job->cu_q[b] : 0;
}
static inline int64_t fa_attn_k_row0(const fa_attn_job *job, int64_t b) {
    return job->cu_k ? job->cu_k[b] : 0;
}

/* Scratch elements one thread needs for fa_attention_block_*: Q^T block,
 * score tile, accumulator, per-row state, the bf16 pair tiles of the
 * vdpbf16ps kernels (probabilities (NK/2, MQ) and values (NK/2, Dv + 32),
 * 32-bit pairs), the widened narrow K/V tiles (NK, D) and (NK, Dv), plus
 * slack for 64-byte alignment of each region. -1 on overflow. */
static inline int64_t fa_attention_scratch_elems(int64_t D, int64_t Dv) {
    int64_t qt, acc, v2;
    /* the accumulator's row stride rounds Dv up to a 32-lane chunk */
    if (D > INT64_MAX / 2 || Dv > INT64_MAX / 2) return -1;
    if (!fa_mul_ok(D, FA_ATTN_MQ, &qt) || !fa_mul_ok(Dv + 32, FA_ATTN_MQ, &acc) ||
        !fa_mul_ok(Dv + 32, FA_ATTN_NK / 2, &v2))
        return -1;
    const int64_t tile = (int64_t)FA_ATTN_NK * FA_ATTN_MQ;
    const int64_t rows = 4 * FA_ATTN_MQ;
    if (qt > INT64_MAX / 8 || acc > INT64_MAX / 8 || v2 > INT64_MAX / 8) return -1;
    /* the widened narrow K and V tiles (FA_ATTN_NK rows of D and of Dv) */
    int64_t kvw;
    if (!fa_mul_ok(D + Dv, FA_ATTN_NK, &kvw) || kvw > INT64_MAX / 8) return -1;
    /* + alignment slack of the regions */
    return qt + tile + acc + rows + tile / 2 + v2 + kvw + 256;
}

/* The dtypes of a call (attention.c), shared by every entry point: dtype
 * is q's and out's (FA_DTYPE_*), kv_dtype the K/V storage (fa_kv_dtype).
 * Sets *compute (FA_DTYPE_F32 or F64), *io16 (0, or the 16-bit dtype of q
 * and out, computed in float32) and *kvd (the storage; a 16-bit call's
 * FA_KV_SAME becomes its own dtype). FA_ERR_INVALID for an unknown dtype or
 * a narrow storage with float64 queries. */
int fa_attn_dtypes(int dtype, int kv_dtype, int *compute, int *io16, int *kvd);

/* Bytes of one element of q and out, and of K and V, for those dtypes. */
static inline int64_t fa_attn_io_size(int compute, int io16) {
    return io16 ? 2 : compute == FA_DTYPE_F32 ? 4 : 8;
}
static inline int64_t fa_attn_kv_size(int compute, int kvd) {
    return kvd == FA_KV_SAME ? (compute == FA_DTYPE_F32 ? 4 : 8) : kvd == FA_KV_I8 ? 1 : 2;
}

/* One work item of a prepared job on the selected ISA level's kernel for
 * its dtype and K/V storage (attention.c); the arguments as for
 * fa_attention_block_* in kernel_table.h. */
void fa_attention_run_block(const fa_attn_job *job, int64_t b, int64_t h, int64_t q0, int64_t q1,
                            int64_t k0, int64_t k1, void *part, void *part_ml, void *scratch);

#endif /* FASTATTN_ATTENTION_JOB_H */
