/*
 * attention.c: the fused scaled-dot-product attention driver. It checks
 * the arguments, splits the work into (batch, head, query block) items,
 * skips padded queries and keys past the key length, runs the items on
 * OpenMP threads through the selected ISA's work-item kernel
 * (attention_impl.h), and for decode shapes splits the keys and merges the
 * partial results.
 *
 * Determinism: an item's result depends only on the shapes, never on which
 * thread runs it or when; the split-KV count and chunk boundaries depend
 * only on the shapes; the merge adds the splits in a fixed order. So the
 * output is bitwise identical for every num_threads.
 */
#include <stdlib.h>
#include <string.h>

#include "fa_math.h"
#include "half_rows.h"
#include "checked_size.h"
#include "kernel_table.h"
#include "scratch.h"
#include "threads.h"
#include "valid_lengths.h"

/* Decode shapes (fewer than FA_ATTN_ROW_PATH queries) with fewer than
 * FA_SPLIT_MIN_ITEMS (batch, head) items leave cores idle, so their keys are
 * split into chunks of at least FA_SPLIT_CHUNK keys, at most FA_SPLIT_MAX
 * of them, and no more than it takes to make FA_SPLIT_ITEMS items (two
 * for each of 32 threads). 512 keys of D = 128 floats are 256 KiB of K and
 * V: enough work to amortise the merge. Splitting further than the items
 * need costs a split's setup and merge for nothing: 8 GQA groups over 8192
 * keys ran 5% faster in bfloat16 and int8 as 64 items of 1024 keys than as
 * 128 of 512 (Zen 5, 2 threads). The constants, not the thread count,
 * decide. */
#define FA_SPLIT_MIN_ITEMS 16
#define FA_SPLIT_CHUNK 512
#define FA_SPLIT_MAX 16
#define FA_SPLIT_ITEMS 64

/* First valid key of head (b, h): keys before it are left padding. */
static int64_t start_at(const fa_lengths_view *lv, int64_t b, int64_t h, int64_t full) {
    return lv->data == NULL ? 0 : fa_length_at(lv, b, h, full);
}

/* Bytes of an element of the compute dtype (scratch, partial results,
 * weights, masks) and of q and out (16-bit with job->io16). */
static int64_t compute_size(const fa_attn_job *job) { return job->dtype == FA_DTYPE_F32 ? 4 : 8; }
static int64_t io_size(const fa_attn_job *job) { return job->io16 ? 2 : compute_size(job); }

/* Zero out rows [r0, r1) of heads [h, h + heads) of sequence b, and their
 * weights: several heads only where their output rows form one run (head
 * stride Dv) and there are no weights (token_rows_zeroed). */
static void zero_rows(const fa_attn_job *job, int64_t b, int64_t h, int64_t heads, int64_t r0,
                      int64_t r1) {
    const int64_t row0 = fa_attn_q_row0(job, b), es = compute_size(job), os = io_size(job);
    for (int64_t i = r0; i < r1; ++i) {
        memset(job->out + (b * job->os[0] + h * job->os[1] + (row0 + i) * job->os[2]) * os, 0,
               (size_t)(heads * job->Dv * os));
        if (job->weights)
            memset(job->weights + (b * job->ws[0] + h * job->ws[1] + i * job->ws[2]) * es, 0,
                   (size_t)(job->Lk * es));
    }
}

/* In a (B, L, H, Dv) output viewed as (B, H, L, Dv), with query lengths
 * shared by a sequence's heads and no weights output, a padded query
 * position's rows of all heads are one contiguous run: the head-0 item of
 * each query block zeroes them in one go for every head. Zeroing each
 * head's row apart (a 128-byte memset each) made transformers' padded batch
 * (B = 32, H = 12, L = 128, D = 32, lengths 3-128) 5-6% slower (Zen 4, 2
 * threads). */
static int token_rows_zeroed(const fa_attn_job *job, const fa_lengths_view *ql) {
    return job->H > 1 && job->os[1] == job->Dv && job->os[3] == 1 && !job->weights &&
           (ql == NULL || ql->data == NULL || ql->stride_m == 0);
}

int fa_attn_dtypes(int dtype, int kv_dtype, int *compute, int *io16, int *kvd) {
    if (dtype != FA_DTYPE_F32 && dtype != FA_DTYPE_F64 && dtype != FA_DTYPE_BF16 &&
        dtype != FA_DTYPE_F16)
        return FA_ERR_INVALID;
    if (kv_dtype < FA_KV_SAME || kv_dtype > FA_KV_I8) return FA_ERR_INVALID;
    *io16 = dtype == FA_DTYPE_BF16 || dtype == FA_DTYPE_F16 ? dtype : 0;
    *compute = *io16 ? FA_DTYPE_F32 : dtype;
    *kvd = kv_dtype;
    if (*io16 && *kvd == FA_KV_SAME) *kvd = *io16 == FA_DTYPE_BF16 ? FA_KV_BF16 : FA_KV_F16;
    /* narrow K/V are read by the float32 kernels only */
    return *kvd != FA_KV_SAME && *compute != FA_DTYPE_F32 ? FA_ERR_INVALID : FA_OK;
}

void fa_attention_run_block(const fa_attn_job *job, int64_t b, int64_t h, int64_t q0, int64_t q1,
                            int64_t k0, int64_t k1, void *part, void *part_ml, void *scratch) {
    const fa_kernel_table *kt = fa_kernels();
    if (job->dtype == FA_DTYPE_F64) {
        kt->attention_block_f64(job, b, h, q0, q1, k0, k1, part, part_ml, scratch);
        return;
    }
    if (job->io16 == FA_DTYPE_BF16 && job->kv_dtype == FA_KV_BF16 && kt->attention_block_bf16dp) {
        kt->attention_block_bf16dp(job, b, h, q0, q1, k0, k1, part, part_ml, scratch);
        return;
    }
    fa_attention_block_f32_fn *fn = job->kv_dtype == FA_KV_BF16  ? kt->attention_block_f32_bf16
                                    : job->kv_dtype == FA_KV_F16 ? kt->attention_block_f32_f16
                                    : job->kv_dtype == FA_KV_I8  ? kt->attention_block_f32_i8
                                                                 : kt->attention_block_f32;
    fn(job, b, h, q0, q1, k0, k1, part, part_ml, scratch);
}

/* out row = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s, in split order;
 * a sink (NULL: none) joins M and the denominator once, after the splits,
 * so that the result matches the unsplit kernel's. */
#define FA_DEFINE_MERGE(T, EXP)                                                        \
    static void merge_row_##T(const T *po, const T *pml, int64_t nsplit, int64_t stride_o, \
                              int64_t stride_ml, int64_t Dv, const T *sink, T *out) { \
        T M = (T)-INFINITY;                                                          \
        int nan = 0;                                                                 \
        for (int64_t s = 0; s < nsplit; ++s) {                                       \
            const T m = pml[s * stride_ml];                                          \
            if (m != m) nan = 1;                                                     \
            if (m > M) M = m;                                                        \
        }                                                                            \
        if (nan) M = (T)NAN;                                                         \
        if (M == (T)-INFINITY) {                                                     \
            memset(out, 0, (size_t)Dv * sizeof(T));                                  \
            return;                                                                  \
        }                                                                            \
        if (sink && *sink > M) M = *sink;                                            \
        T L = 0;                                                                     \
        for (int64_t c = 0; c < Dv; ++c) out[c] = 0;                                 \
        for (int64_t s = 0; s < nsplit; ++s) {                                       \
            const T m = pml[s * stride_ml];                                          \
            const T wgt = m == (T)-INFINITY ? (T)0 : EXP(m - M);                     \
            L += wgt * pml[s * stride_ml + 1];                                       \
            const T *o = po + s * stride_o;                                          \
            for (int64_t c = 0; c < Dv; ++c) out[c] += wgt * o[c];                   \
        }                                                                            \
        if (sink) L += EXP(*sink - M);                                               \
        const T inv = (T)1 / L;                                                      \
        for (int64_t c = 0; c < Dv; ++c) out[c] *= inv;                              \
    }
FA_DEFINE_MERGE(float, fa_expf_nonpos)
FA_DEFINE_MERGE(double, fa_exp)

/* Item it of the unsplit schedule: query block it % nqb of head it / nqb;
 * padded query rows are zeroed, not computed. */
static void block_item(const fa_attn_job *job, const fa_lengths_view *ql, int64_t nqb,
                       int64_t it, void *scratch) {
    const int64_t Lq = job->Lq;
    if (job->row_heads > 1) { /* item: (b, row_heads heads from h0), lengths shared */
        const int64_t per_b = job->H / job->row_heads;
        const int64_t b = it / per_b, h0 = it % per_b * job->row_heads;
        const int64_t qv1 = fa_length_at(ql, b, h0, Lq), klen = fa_length_at(&job->key_len, b, h0, job->Lk);
        const int64_t kstart = start_at(&job->key_start, b, h0, klen);
        if (qv1 > 0) fa_attention_run_block(job, b, h0, 0, qv1, kstart, klen, NULL, NULL, scratch);
        for (int64_t h = h0; h < h0 + job->row_heads; ++h) zero_rows(job, b, h, 1, qv1, Lq);
        return;
    }
    const int64_t qb = it % nqb, bh = it / nqb, h = bh % job->H, b = bh / job->H;
    const int64_t q0 = qb * FA_ATTN_MQ;
    const int64_t q1 = q0 + FA_ATTN_MQ < Lq ? q0 + FA_ATTN_MQ : Lq;
    const int64_t qlen = fa_length_at(ql, b, h, Lq), klen = fa_length_at(&job->key_len, b, h, job->Lk);
    const int64_t kstart = start_at(&job->key_start, b, h, klen);
    const int64_t qv1 = q1 < qlen ? q1 : qlen;
    if (q0 < qv1) fa_attention_run_block(job, b, h, q0, qv1, kstart, klen, NULL, NULL, scratch);
    if (token_rows_zeroed(job, ql)) {
        if (h == 0) zero_rows(job, b, 0, job->H, q0 > qv1 ? q0 : qv1, q1);
        return;
    }
    zero_rows(job, b, h, 1, q0 > qv1 ? q0 : qv1, q1);
}

/* Item it of the split-KV schedule: key chunk it % nsplit of head
 * it / nsplit, into its slot of the partial results. The chunks tile keys
 * [span0, span0 + nsplit * chunk), fixed by the shapes; each is clipped to
 * the head's valid keys [key_start, key_len). */
static void split_item(const fa_attn_job *job, const fa_lengths_view *ql, int64_t nsplit,
                       int64_t span0, int64_t chunk, char *part, char *part_ml, int64_t it,
                       void *scratch) {
    const int64_t Lq = job->Lq, es = compute_size(job);
    const int64_t s = it % nsplit;
    int64_t bh = it / nsplit, h = bh % job->H, b = bh / job->H;
    if (job->row_heads > 1) { /* item: (b, heads from h, split); its slots are head h's */
        const int64_t u = it / nsplit, per_b = job->H / job->row_heads;
        b = u / per_b, h = u % per_b * job->row_heads, bh = b * job->H + h;
        it = bh * nsplit + s;
    }
    const int64_t qv1 = fa_length_at(ql, b, h, Lq), klen = fa_length_at(&job->key_len, b, h, job->Lk);
    const int64_t kstart = start_at(&job->key_start, b, h, klen);
    int64_t k0 = span0 + s * chunk, k1 = k0 + chunk;
    k0 = k0 < kstart ? kstart : k0 > klen ? klen : k0;
    k1 = k1 < k0 ? k0 : k1 > klen ? klen : k1;
    if (qv1 > 0)
        fa_attention_run_block(job, b, h, 0, qv1, k0, k1, part + (it * Lq * job->Dv) * es,
                               part_ml + (it * Lq * 2) * es, scratch);
}

/* Head bh's output rows from its nsplit partial results, in split order.
 * row: Dv floats of scratch, where a 16-bit output row is merged before it
 * is rounded. */
static void merge_head(const fa_attn_job *job, const fa_lengths_view *ql, int64_t nsplit,
                       const char *part, const char *part_ml, int64_t bh, float *row) {
    const int64_t Lq = job->Lq, Dv = job->Dv, es = io_size(job);
    const int64_t h = bh % job->H, b = bh / job->H;
    const int64_t qv1 = fa_length_at(ql, b, h, Lq);
    const int64_t first = bh * nsplit;
    for (int64_t i = 0; i < qv1; ++i) {
        char *orow = job->out + (b * job->os[0] + h * job->os[1] + i * job->os[2]) * es;
        /* the sink, shifted as the kernel shifted the row's ALiBi scores */
        const int64_t ipos = i + fa_attn_offset(job, b);
        if (job->dtype == FA_DTYPE_F32) {
            float sink = 0.0f;
            if (job->sinks) {
                const float slope = job->alibi ? ((const float *)job->alibi)[h] : 0.0f;
                sink = ((const float *)job->sinks)[h];
                if (slope != 0.0f)
                    sink += slope * (float)(ipos - fa_attn_alibi_ref(job, b, h, ipos, slope < 0.0f));
            }
            merge_row_float((const float *)part + (first * Lq + i) * Dv,
                            (const float *)part_ml + (first * Lq + i) * 2, nsplit, Lq * Dv,
                            Lq * 2, Dv, job->sinks ? &sink : NULL, job->io16 ? row : (float *)orow);
            if (job->io16) fa_f32_row_to_half(job->io16, row, Dv, (uint16_t *)orow, 1);
        } else {
            double sink = 0.0;
            if (job->sinks) {
                const double slope = job->alibi ? ((const double *)job->alibi)[h] : 0.0;
                sink = ((const double *)job->sinks)[h];
                if (slope != 0.0)
                    sink += slope * (double)(ipos - fa_attn_alibi_ref(job, b, h, ipos, slope < 0.0));
            }
            merge_row_double((const double *)part + (first * Lq + i) * Dv,
                             (const double *)part_ml + (first * Lq + i) * 2, nsplit, Lq * Dv,
                             Lq * 2, Dv, job->sinks ? &sink : NULL, (double *)orow);
        }
    }
    zero_rows(job, b, h, 1, qv1, Lq);
}

static int check_view(const fa_view4 *v, int64_t d0, int64_t d1, int64_t d2, int64_t d3,
                      int64_t es) {
    const int64_t dims[4] = {d0, d1, d2, d3};
    if (fa_product(dims, 4) == 0) return FA_OK;
    if (v->data == NULL) return FA_ERR_INVALID;
    if (d3 > 1 && v->stride[3] != 1) return FA_ERR_INVALID;
    return fa_view_ok(dims, v->stride, 4, es) ? FA_OK : FA_ERR_OVERFLOW;
}

static int run_job(const fa_attn_job *jp, const fa_lengths_view *ql, int num_threads);

int fa_scaled_dot_product_attention(int dtype, const fa_attention_args *a, int num_threads) {
    int io16, kvd;
    if (a == NULL || fa_attn_dtypes(dtype, a->kv_dtype, &dtype, &io16, &kvd) != FA_OK)
        return FA_ERR_INVALID;
    const int64_t B = a->B, H = a->H, Hkv = a->Hkv, Lq = a->Lq, Lk = a->Lk, D = a->D,
                  Dv = a->Dv;
    if (B < 0 || H < 0 || Hkv < 0 || Lq < 0 || Lk < 0 || D < 0 || Dv < 0) return FA_ERR_INVALID;
    if (H > 0 && (Hkv == 0 || H % Hkv != 0)) return FA_ERR_INVALID;
    if (a->alignment != FA_CAUSAL_TOP_LEFT && a->alignment != FA_CAUSAL_BOTTOM_RIGHT)
        return FA_ERR_INVALID;
    if (!fa_attn_features_ok(a->window, a->window_left, a->window_right, a->softcap))
        return FA_ERR_INVALID;
    const int64_t es = dtype == FA_DTYPE_F32 ? 4 : 8, io_es = fa_attn_io_size(dtype, io16);
    const int64_t kv_es = fa_attn_kv_size(dtype, kvd); /* int8 needs both scale views */
    int st;
    if ((st = check_view(&a->q, B, H, Lq, D, io_es)) != FA_OK) return st;
    if ((st = check_view(&a->k, B, Hkv, Lk, D, kv_es)) != FA_OK) return st;
    if ((st = check_view(&a->v, B, Hkv, Lk, Dv, kv_es)) != FA_OK) return st;
    if (kvd == FA_KV_I8) {
        if ((st = check_view(&a->k_scale, B, Hkv, Lk, 1, 4)) != FA_OK) return st;
        if ((st = check_view(&a->v_scale, B, Hkv, Lk, 1, 4)) != FA_OK) return st;
        if (Lk > 1 && (a->k_scale.stride[2] != 1 || a->v_scale.stride[2] != 1))
            return FA_ERR_INVALID;
    }
    if ((st = check_view(&a->out, B, H, Lq, Dv, io_es)) != FA_OK) return st;
    if (a->weights.data && (st = check_view(&a->weights, B, H, Lq, Lk, es)) != FA_OK) return st;
    if (a->mask.data) {
        if (a->mask.kind != FA_MASK_BOOL && a->mask.kind != FA_MASK_ADD) return FA_ERR_INVALID;
        const int64_t dims[4] = {B, H, Lq, Lk};
        const int64_t ms[4] = {a->mask.stride_b, a->mask.stride_m, a->mask.stride_q,
                               a->mask.stride_k};
        if (!fa_view_ok(dims, ms, 4, a->mask.kind == FA_MASK_BOOL ? 1 : es))
            return FA_ERR_OVERFLOW;
    }
    const int64_t heads = B * H; /* fits: the q view was checked */
    if (heads == 0 || Lq == 0) return FA_OK;

    fa_attn_job job;
    memset(&job, 0, sizeof job);
    job.dtype = dtype;
    job.B = B, job.H = H, job.Hkv = Hkv, job.Lq = Lq, job.Lk = Lk, job.D = D, job.Dv = Dv;
    job.group = H / Hkv;
    job.q = a->q.data, job.k = a->k.data, job.v = a->v.data;
    job.out = a->out.data;
    job.weights = a->weights.data;
    memcpy(job.qs, a->q.stride, sizeof job.qs);
    memcpy(job.ks, a->k.stride, sizeof job.ks);
    memcpy(job.vs, a->v.stride, sizeof job.vs);
    memcpy(job.os, a->out.stride, sizeof job.os);
    memcpy(job.ws, a->weights.stride, sizeof job.ws);
    job.mask = a->mask;
    job.key_len = a->key_len;
    if (!job.mask.data) job.mask.kind = FA_MASK_NONE;
    job.causal = a->is_causal ? a->alignment : FA_CAUSAL_NONE;
    job.causal_offset = a->alignment == FA_CAUSAL_BOTTOM_RIGHT ? Lk - Lq : 0;
    job.scale = a->scale;
    job.alibi = a->alibi_slopes;
    job.alignment = a->alignment;
    job.key_start = a->key_start;
    job.softcap = a->softcap;
    job.sinks = a->sinks;
    /* GQA decode reads each kv head once for its whole group of query heads
     * (attention_rows), when the group's rows fit one work item and share
     * their lengths (per-batch lengths, not per-head ones) */
    const int group_rows = Lq < FA_ATTN_ROW_PATH && job.group > 1 &&
                           job.group * Lq <= FA_ATTN_MQ && !a->weights.data &&
                           (!a->key_len.data || a->key_len.stride_m == 0) &&
                           (!a->key_start.data || a->key_start.stride_m == 0) &&
                           (!a->query_len.data || a->query_len.stride_m == 0);
    job.row_heads = group_rows ? job.group : 1;
    job.kv_dtype = kvd;
    job.io16 = io16;
    if (kvd == FA_KV_I8) {
        job.k_scale = (const float *)a->k_scale.data;
        job.v_scale = (const float *)a->v_scale.data;
        job.kss[0] = a->k_scale.stride[0], job.kss[1] = a->k_scale.stride[1];
        job.vss[0] = a->v_scale.stride[0], job.vss[1] = a->v_scale.stride[1];
    }
    /* windows beyond the key axis in either direction change nothing: clamping
     * them to Lk + Lq keeps i_pos +- window inside int64 */
    const int64_t reach = Lk + Lq;
    job.has_left = (a->window & FA_WINDOW_LEFT) != 0;
    job.left = job.has_left ? (a->window_left < reach ? a->window_left : reach) : 0;
    job.has_right = a->is_causal || (a->window & FA_WINDOW_RIGHT) != 0;
    job.right = a->is_causal ? 0 : job.has_right ? (a->window_right < reach ? a->window_right : reach) : 0;
    return run_job(&job, &a->query_len, num_threads);
}

/* Whether K and V hold each key's kv heads closer together than its
 * successive keys, as a (B, Lk, Hkv, D) cache does. */
static int heads_interleave(const fa_attn_job *job) {
    return llabs(job->ks[1]) < llabs(job->ks[2]) && llabs(job->vs[1]) < llabs(job->vs[2]);
}

/* Schedules a prepared job (padded or paged keys) over the threads: query
 * blocks, or split-KV for decode shapes, then the fixed-order merge. */
static int run_job(const fa_attn_job *jp, const fa_lengths_view *ql, int num_threads) {
    fa_attn_job job = *jp;
    const int64_t B = job.B, H = job.H, Hkv = job.Hkv, Lq = job.Lq, Lk = job.Lk, D = job.D,
                  Dv = job.Dv;
    const int64_t es = job.dtype == FA_DTYPE_F32 ? 4 : 8;
    const int64_t heads = B * H;
    const int64_t nqb = (Lq + FA_ATTN_MQ - 1) / FA_ATTN_MQ;
    /* Keys some row can see: a window narrows them. For padded keys this
     * goes by the shapes alone (the split must not depend on the values of
     * key_len); a paged cache's sequence lengths are its shape. */
    int64_t span0 = 0, span1 = Lk;
    /* the diagonal offsets of the sequences: one for padded keys, one per
     * sequence in a paged cache (its length - Lq), whose extremes bound the
     * window; a paged sequence alone then splits as its contiguous keys do */
    int64_t off_lo = job.causal_offset, off_hi = job.causal_offset;
    if (job.block_table)
        for (int64_t b = 0; b < B; ++b) {
            const int64_t off = fa_attn_offset(&job, b);
            off_lo = b == 0 || off < off_lo ? off : off_lo;
            off_hi = b == 0 || off > off_hi ? off : off_hi;
        }
    if (job.has_left && off_lo - job.left > span0) span0 = off_lo - job.left;
    if (job.has_right && Lq - 1 + off_hi + job.right + 1 < span1)
        span1 = Lq - 1 + off_hi + job.right + 1;
    if (span1 < span0) span1 = span0;
    /* work items before any split: query blocks of each head, or kv heads */
    const int64_t units = job.row_heads > 1 ? B * (H / job.row_heads) : heads * nqb;
    int64_t nsplit = 1;
    if (!job.weights && Lq < FA_ATTN_ROW_PATH && units < FA_SPLIT_MIN_ITEMS &&
        span1 - span0 >= 2 * FA_SPLIT_CHUNK) {
        nsplit = (span1 - span0) / FA_SPLIT_CHUNK;
        if (nsplit > FA_SPLIT_MAX) nsplit = FA_SPLIT_MAX;
        const int64_t enough = (FA_SPLIT_ITEMS + units - 1) / units;
        if (nsplit > enough) nsplit = enough;
    }
    int64_t items = units * nsplit;
    job.part_head_stride = nsplit * Lq * Dv;
    job.part_ml_head_stride = nsplit * Lq * 2;

    /* work estimate for the thread decision: the score matrix size */
    int64_t work;
    if (!fa_mul_ok(heads * Lq, Lk > 0 ? Lk : 1, &work)) work = INT64_MAX;
    const int nthreads = fa_resolve_threads(num_threads, items, work);
    if ((job.block_table || heads_interleave(&job)) && Lq < FA_ATTN_ROW_PATH &&
        job.row_heads == job.group) {
        /* Paged decode, or a cache laid out (B, Lk, Hkv, D): a token's kv
         * heads lie side by side in its row, so one head's keys touch a new
         * page every row; items of several kv heads read a few token rows
         * whole at a time (attention_rows). Such a (B, Lk, Hkv, D) cache
         * decodes 1.3-2.3x faster this way than a head at a time, and
         * paged (block size 16) in 0.93-1.01x the time of (B, Hkv, Lk, D)
         * when read from memory (Zen 4, 2 threads). A row's result does
         * not depend on its item's other heads, so the item size may follow
         * the thread count: the most kv heads per item (a divisor of Hkv,
         * at most FA_ATTN_MQ rows) that still leaves two items per thread. */
        int64_t per = 1;
        for (int64_t c = 2; c <= Hkv; ++c)
            if (Hkv % c == 0 && c * job.group * Lq <= FA_ATTN_MQ &&
                B * (Hkv / c) * nsplit >= (items < 2 * nthreads ? items : 2 * (int64_t)nthreads))
                per = c;
        job.row_heads = per * job.group;
        items = B * (Hkv / per) * nsplit;
    }

    const int64_t per_thread_elems = fa_attention_scratch_elems(D, Dv);
    if (per_thread_elems < 0) return FA_ERR_OVERFLOW;
    const int64_t per_thread = (per_thread_elems * es + 63) & ~(int64_t)63;
    char *scratch = fa_scratch_alloc(per_thread, nthreads);
    if (scratch == NULL) return FA_ERR_NOMEM;

    /* One thread runs the items itself: even an if(false) parallel region
     * costs a futex call in libgomp, a fifth of a tiny decode call. */
    if (nsplit == 1) {
        if (nthreads == 1) {
            for (int64_t it = 0; it < items; ++it) block_item(&job, ql, nqb, it, scratch);
        } else {
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
#endif
            for (int64_t it = 0; it < items; ++it)
                block_item(&job, ql, nqb, it, scratch + fa_thread_id() * per_thread);
        }
        fa_scratch_free(scratch);
        return FA_OK;
    }

    /* split-KV: partial (o, m, l) per (b, h, split, row), then a fixed-order merge */
    const int64_t chunk = (span1 - span0 + nsplit - 1) / nsplit;
    int64_t n_part, n_ml;
    if (!fa_mul_ok(heads * nsplit * Lq, Dv, &n_part) || !fa_mul_ok(heads * nsplit * Lq, 2, &n_ml)) {
        fa_scratch_free(scratch);
        return FA_ERR_OVERFLOW;
    }
    char *part = fa_scratch_alloc(n_part + n_ml, es);
    if (part == NULL) {
        fa_scratch_free(scratch);
        return FA_ERR_NOMEM;
    }
    char *part_ml = part + n_part * es;
    if (nthreads == 1) {
        for (int64_t it = 0; it < items; ++it)
            split_item(&job, ql, nsplit, span0, chunk, part, part_ml, it, scratch);
        for (int64_t bh = 0; bh < heads; ++bh)
            merge_head(&job, ql, nsplit, part, part_ml, bh, (float *)scratch);
    } else {
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
#endif
        {
            char *mine = scratch + fa_thread_id() * per_thread;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
            for (int64_t it = 0; it < items; ++it)
                split_item(&job, ql, nsplit, span0, chunk, part, part_ml, it, mine);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (int64_t bh = 0; bh < heads; ++bh)
                merge_head(&job, ql, nsplit, part, part_ml, bh, (float *)mine);
        }
    }
    fa_scratch_free(part);
    fa_scratch_free(scratch);
    return FA_OK;
}

/* Paged keys: the cache's block table replaces the key rows' stride (see
 * kv_row in attention_impl.h); everything else is the padded driver. */
int fa_paged_attention(int dtype, const fa_paged_args *a, int num_threads) {
    int io16, kvd;
    if (a == NULL || fa_attn_dtypes(dtype, a->kv_dtype, &dtype, &io16, &kvd) != FA_OK)
        return FA_ERR_INVALID;
    const int64_t B = a->B, H = a->H, Hkv = a->Hkv, Lq = a->Lq, D = a->D, Dv = a->Dv;
    const int64_t nb = a->num_blocks, bs = a->block_size, mb = a->max_blocks;
    if (B < 0 || H < 0 || Hkv < 0 || Lq < 0 || D < 0 || Dv < 0 || nb < 0 || bs < 1 || mb < 0)
        return FA_ERR_INVALID;
    if (H > 0 && (Hkv == 0 || H % Hkv != 0)) return FA_ERR_INVALID;
    if (!fa_attn_features_ok(a->window, a->window_left, a->window_right, a->softcap))
        return FA_ERR_INVALID;
    const int64_t io_es = fa_attn_io_size(dtype, io16);
    const int64_t kv_es = fa_attn_kv_size(dtype, kvd); /* int8 needs both scale views */
    int st;
    if ((st = check_view(&a->q, B, H, Lq, D, io_es)) != FA_OK) return st;
    if ((st = check_view(&a->out, B, H, Lq, Dv, io_es)) != FA_OK) return st;
    /* cache views as (num_blocks, Hkv, block_size, cols) */
    const fa_view4 kc = {a->k_cache.data, {a->k_cache.stride[0], a->k_cache.stride[2],
                                           a->k_cache.stride[1], a->k_cache.stride[3]}};
    const fa_view4 vc = {a->v_cache.data, {a->v_cache.stride[0], a->v_cache.stride[2],
                                           a->v_cache.stride[1], a->v_cache.stride[3]}};
    if ((st = check_view(&kc, nb, Hkv, bs, D, kv_es)) != FA_OK) return st;
    if ((st = check_view(&vc, nb, Hkv, bs, Dv, kv_es)) != FA_OK) return st;
    /* scale views likewise as (num_blocks, Hkv, block_size, 1) */
    const fa_view4 ksc = {a->k_scale.data, {a->k_scale.stride[0], a->k_scale.stride[2],
                                            a->k_scale.stride[1], a->k_scale.stride[3]}};
    const fa_view4 vsc = {a->v_scale.data, {a->v_scale.stride[0], a->v_scale.stride[2],
                                            a->v_scale.stride[1], a->v_scale.stride[3]}};
    if (kvd == FA_KV_I8) {
        if (nb * Hkv * bs > 0 && (ksc.data == NULL || vsc.data == NULL)) return FA_ERR_INVALID;
        if ((st = check_view(&ksc, nb, Hkv, bs, 1, 4)) != FA_OK) return st;
        if ((st = check_view(&vsc, nb, Hkv, bs, 1, 4)) != FA_OK) return st;
    }
    if (B * H == 0 || Lq == 0) return FA_OK;
    int64_t capacity;
    if (!fa_mul_ok(mb, bs, &capacity)) return FA_ERR_OVERFLOW;
    if (a->seq_lens == NULL || (mb > 0 && a->block_table == NULL)) return FA_ERR_INVALID;
    /* every block a sequence reads must exist: never a read out of bounds */
    int64_t Lk = 0;
    for (int64_t b = 0; b < B; ++b) {
        const int64_t n = a->seq_lens[b];
        if (n < Lq || n > capacity) return FA_ERR_INVALID;
        for (int64_t t = 0; t < (n + bs - 1) / bs; ++t) {
            const int64_t blk = a->block_table[b * a->bt_stride + t];
            if (blk < 0 || blk >= nb) return FA_ERR_INVALID;
        }
        Lk = n > Lk ? n : Lk;
    }

    fa_attn_job job;
    memset(&job, 0, sizeof job);
    job.dtype = dtype;
    job.B = B, job.H = H, job.Hkv = Hkv, job.Lq = Lq, job.Lk = Lk, job.D = D, job.Dv = Dv;
    job.group = H / Hkv;
    job.q = a->q.data, job.k = kc.data, job.v = vc.data;
    job.out = a->out.data;
    memcpy(job.qs, a->q.stride, sizeof job.qs);
    memcpy(job.os, a->out.stride, sizeof job.os);
    memcpy(job.ks, kc.stride, sizeof job.ks); /* block, head, row, 1 */
    memcpy(job.vs, vc.stride, sizeof job.vs);
    job.mask.kind = FA_MASK_NONE;
    job.key_len.data = a->seq_lens, job.key_len.stride_b = 1, job.key_len.stride_m = 0;
    job.causal = a->is_causal ? FA_CAUSAL_BOTTOM_RIGHT : FA_CAUSAL_NONE;
    job.alignment = FA_CAUSAL_BOTTOM_RIGHT;
    job.causal_offset = Lk - Lq; /* per sequence: fa_attn_offset */
    job.scale = a->scale;
    job.alibi = a->alibi_slopes;
    job.softcap = a->softcap;
    job.sinks = a->sinks;
    job.block_table = a->block_table, job.bt_stride = a->bt_stride, job.block_size = bs;
    job.kv_dtype = kvd;
    job.io16 = io16;
    if (kvd == FA_KV_I8) {
        job.k_scale = (const float *)ksc.data, job.v_scale = (const float *)vsc.data;
        memcpy(job.kss, ksc.stride, sizeof job.kss); /* block, head, row */
        memcpy(job.vss, vsc.stride, sizeof job.vss);
    }
    /* GQA decode reads each kv head once for its group, as for contiguous
     * keys (the lengths are per sequence, shared by the group's heads) */
    job.row_heads = Lq < FA_ATTN_ROW_PATH && job.group > 1 && job.group * Lq <= FA_ATTN_MQ
                        ? job.group
                        : 1;
    const int64_t reach = Lk + Lq;
    job.has_left = (a->window & FA_WINDOW_LEFT) != 0;
    job.left = job.has_left ? (a->window_left < reach ? a->window_left : reach) : 0;
    job.has_right = a->is_causal || (a->window & FA_WINDOW_RIGHT) != 0;
    job.right = a->is_causal ? 0 : job.has_right ? (a->window_right < reach ? a->window_right : reach) : 0;
    const fa_lengths_view no_query_lengths = {NULL, 0, 0};
    return run_job(&job, &no_query_lengths, num_threads);
}
