/*
 * internal.h: what the C files share and Cython never sees: the per-ISA
 * kernel table, checked size arithmetic and the OpenMP helpers.
 */
#ifndef FASTATTN_INTERNAL_H
#define FASTATTN_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "fastattn.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* ---- checked arithmetic -------------------------------------------------- */

/* r = a * b for non-negative a, b; returns 0 on overflow or negative input. */
static inline int fa_mul_ok(int64_t a, int64_t b, int64_t *r) {
    if (a < 0 || b < 0) return 0;
    if (a != 0 && b > INT64_MAX / a) return 0;
    *r = a * b;
    return 1;
}

/* Product of n non-negative sizes, or -1 on overflow / negative input. */
static inline int64_t fa_product(const int64_t *dims, int n) {
    int64_t r = 1;
    for (int i = 0; i < n; ++i)
        if (!fa_mul_ok(r, dims[i], &r)) return -1;
    return r;
}

/* ---- per-ISA kernels ---------------------------------------------------- */

/* One softmax row. x, y: (n) contiguous; y may equal x.
 * mask_row: NULL, or (n) contiguous uint8 (mask_kind FA_MASK_BOOL) or (n)
 * contiguous values of the row's dtype (FA_MASK_ADD).
 * Writes y_j = softmax(x * scale + add)_j over the keys the bool mask keeps;
 * kept-out keys get exactly 0. A row whose maximum is -inf (nothing valid)
 * is written as zeros. stage: NULL, or (n) scratch in which the row is
 * computed before y is written with non-temporal stores. y has n + n_zero
 * entries; the last n_zero (keys past the valid prefix) are written as 0.
 * ahead: NULL, or a later row's bytes to request from memory a line at a
 * time while this row is exponentiated (fa_prefetch_cursor). */
typedef struct fa_prefetch_cursor fa_prefetch_cursor;
typedef void fa_softmax_row_f32_fn(const float *x, float *y, int64_t n,
                                   float scale, const void *mask_row,
                                   int mask_kind, float *stage, int64_t n_zero,
                                   fa_prefetch_cursor *ahead);
typedef void fa_softmax_row_f64_fn(const double *x, double *y, int64_t n,
                                   double scale, const void *mask_row,
                                   int mask_kind, double *stage, int64_t n_zero,
                                   fa_prefetch_cursor *ahead);

/* ---- fused attention ------------------------------------------------------
 * Tile sizes shared by the driver (attention.c, which sizes scratch) and
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
    /* Paged caches: k and v are (num_blocks, block_size, Hkv, D) with
     * ks[0] the block stride, ks[1] the head stride, ks[2] the row stride;
     * key t of sequence b is row t % block_size of block
     * block_table[b * bt_stride + t / block_size]; query i sits at
     * key_len[b] - Lq + i. NULL for contiguous keys. */
    const int64_t *block_table;
    int64_t bt_stride, block_size;
} fa_attn_job;

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
        int64_t ref = 0;
        if (job->key_start.data) {
            ref = job->key_start.data[b * job->key_start.stride_b + h * job->key_start.stride_m];
            ref = ref < 0 ? 0 : ref > job->Lk ? job->Lk : ref;
        }
        if (job->has_left && ipos - job->left > ref) ref = ipos - job->left;
        return ref;
    }
    int64_t klen = job->Lk;
    if (job->key_len.data) {
        klen = job->key_len.data[b * job->key_len.stride_b + h * job->key_len.stride_m];
        klen = klen < 0 ? 0 : klen > job->Lk ? job->Lk : klen;
    }
    int64_t ref = klen - 1;
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

/* Queries [q0, q1) of head (b, h) against keys [k0, k1) (already clipped to
 * the key length). With part == NULL the normalised rows go to job->out
 * (and job->weights); otherwise the unnormalised accumulator goes to
 * part[(q - q0) * Dv + c] and the running max / sum to
 * part_ml[2 * (q - q0)], part_ml[2 * (q - q0) + 1] for a split-KV merge.
 * scratch: fa_attention_scratch_elems() elements of the dtype. */
typedef void fa_attention_block_f32_fn(const fa_attn_job *job, int64_t b, int64_t h,
                                       int64_t q0, int64_t q1, int64_t k0, int64_t k1,
                                       float *part, float *part_ml, float *scratch);
typedef void fa_attention_block_f64_fn(const fa_attn_job *job, int64_t b, int64_t h,
                                       int64_t q0, int64_t q1, int64_t k0, int64_t k1,
                                       double *part, double *part_ml, double *scratch);

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

typedef struct {
    int isa;
    fa_softmax_row_f32_fn *softmax_row_f32;
    fa_softmax_row_f64_fn *softmax_row_f64;
    fa_attention_block_f32_fn *attention_block_f32;
    fa_attention_block_f64_fn *attention_block_f64;
} fa_kernel_table;

/* The table of the selected ISA; never NULL. */
const fa_kernel_table *fa_kernels(void);

/* Every kernel each ISA file exports, as X(name, dtype-suffix, fn-type);
 * dispatch.c expands it into declarations and into one table per ISA. */
#define FA_KERNEL_LIST(X)                                  \
    X(softmax_row, f32, fa_softmax_row_f32_fn)             \
    X(softmax_row, f64, fa_softmax_row_f64_fn)             \
    X(attention_block, f32, fa_attention_block_f32_fn)     \
    X(attention_block, f64, fa_attention_block_f64_fn)

/* 1 when every element offset of a view with these dims and strides fits in
 * int64 and in the address space (the largest |offset| times elem_size). */
int fa_view_ok(const int64_t *dims, const int64_t *strides, int n,
               int64_t elem_size);

/* ---- threads ------------------------------------------------------------- */

/* Work below this many elements runs on one thread: an OpenMP fork/join costs
 * a few microseconds, about what two cores spend on ~32K float ops. */
#define FA_MIN_PARALLEL_ELEMS 32768

/* Thread count for a call: the request (or the OpenMP default when <= 0),
 * capped by the number of independent work items and forced to 1 for work
 * smaller than FA_MIN_PARALLEL_ELEMS elements. */
int fa_resolve_threads(int requested, int64_t work_items, int64_t total_elems);

/* Runs fn(ctx, t, nthreads) for t = 0 .. nthreads-1, one call per thread of
 * an OpenMP team; with nthreads == 1 the caller runs fn(ctx, 0, 1) itself
 * and no OpenMP region is entered, since even an if(false) region costs a
 * futex call in libgomp (a fifth of a tiny attention call). */
typedef void (*fa_team_fn)(void *ctx, int t, int nthreads);
void fa_run_team(int nthreads, fa_team_fn fn, void *ctx);

static inline int fa_thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* Split [0, n) into nthreads contiguous ranges; thread t gets [*lo, *hi). A
 * static partition keeps each thread's rows fixed, which keeps results
 * independent of scheduling. */
static inline void fa_partition(int64_t n, int nthreads, int t, int64_t *lo,
                                int64_t *hi) {
    int64_t base = n / nthreads, rem = n % nthreads;
    *lo = t * base + (t < rem ? t : rem);
    *hi = *lo + base + (t < rem ? 1 : 0);
}

/* Orders this thread's earlier streaming (non-temporal) stores before its
 * later stores, so that another thread that sees the later ones (an OpenMP
 * barrier, the caller's return) also sees the streamed data. Streaming
 * stores exist only in the x86 kernels. */
#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
#include <xmmintrin.h>
static inline void fa_store_fence(void) { _mm_sfence(); }
#else
static inline void fa_store_fence(void) {}
#endif

/* Asks the caches for [p, p + bytes) ahead of its use, one request per
 * 64-byte line. For streams the hardware prefetcher loses track of: rows
 * handed out in chunks, or K and V rows read in alternating tiles. */
static inline void fa_prefetch(const void *p, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch((const char *)p + o, 0, 0);
}

/* A prefetch issued a line at a time, paced by a kernel's progress (the
 * masked softmax requests a line of a later row per line of the row it
 * exponentiates). Requesting a whole row at once asks for more misses than
 * a core tracks at a time (a few dozen lines; a 512-key float row is 32),
 * and the surplus waits or is dropped; paced, the requests keep the memory
 * busy while the core computes. On a 2-core Zen 3 the softmax of
 * (8, 12, 512, 512) float32 took 4-16% less time than with whole-row
 * requests (interleaved medians). p: the next line to request; left: the
 * bytes still to request. */
struct fa_prefetch_cursor {
    const char *p;
    int64_t left;
};

/* Requests what is left of the cursor's bytes at once and points it at
 * [p, p + bytes). */
static inline void fa_prefetch_retarget(fa_prefetch_cursor *c, const void *p, int64_t bytes) {
    if (c->left > 0) fa_prefetch(c->p, c->left);
    c->p = (const char *)p;
    c->left = bytes;
}

/* Aligned scratch (64 bytes: one cache line, one AVX-512 register). Returns
 * NULL on overflow or failure. */
void *fa_scratch_alloc(int64_t count, int64_t elem_size);
void fa_scratch_free(void *p);

#endif /* FASTATTN_INTERNAL_H */
