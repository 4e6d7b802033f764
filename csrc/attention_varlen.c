/*
 * attention_varlen.c: attention over packed variable-length batches
 * (flash-attn's varlen layout, see fastattn.h). The sequences are never
 * padded: each (sequence, head, query chunk of at most FA_ATTN_MQ rows) is
 * one work item of the same fused kernel the padded driver uses
 * (attention_impl.h), which addresses sequence b's rows through the
 * prefix sums in the job.
 *
 * Balance: the items are sorted by their estimated cost (rows times the
 * keys they can see), longest first, and handed out dynamically, so a
 * batch with one long sequence among many short ones keeps every thread
 * busy (balance by tokens, not by sequences). Each item's result depends
 * only on the inputs, never on the thread or the order, so the output is
 * bitwise identical for every num_threads.
 */
#include <stdlib.h>
#include <string.h>

#include "attention_job.h"
#include "checked_size.h"
#include "scratch.h"
#include "threads.h"
#include "valid_lengths.h"

typedef struct {
    int64_t cost, b, q0; /* sort key first */
} fa_varlen_chunk;

/* Longest first; ties in (b, q0) order, so the order is fixed too. */
static int chunk_cmp(const void *pa, const void *pb) {
    const fa_varlen_chunk *a = pa, *b = pb;
    if (a->cost != b->cost) return a->cost > b->cost ? -1 : 1;
    if (a->b != b->b) return a->b < b->b ? -1 : 1;
    return a->q0 < b->q0 ? -1 : a->q0 > b->q0;
}

/* (1, heads, rows, cols) view: unit last stride, addressable extent. */
static int check_packed(const fa_view4 *v, int64_t heads, int64_t rows, int64_t cols,
                        int64_t es) {
    const int64_t dims[3] = {heads, rows, cols};
    if (fa_product(dims, 3) == 0) return FA_OK;
    if (v->data == NULL) return FA_ERR_INVALID;
    if (cols > 1 && v->stride[3] != 1) return FA_ERR_INVALID;
    const int64_t strides[3] = {v->stride[1], v->stride[2], v->stride[3]};
    return fa_view_ok(dims, strides, 3, es) ? FA_OK : FA_ERR_OVERFLOW;
}

/* 0 = cu[0] <= ... <= cu[B] = total */
static int check_cu(const int64_t *cu, int64_t B, int64_t total) {
    if (cu == NULL || cu[0] != 0 || cu[B] != total) return 0;
    for (int64_t b = 0; b < B; ++b)
        if (cu[b + 1] < cu[b]) return 0;
    return 1;
}

typedef struct {
    const fa_attn_job *job;
    const fa_varlen_chunk *chunks;
    int64_t nchunks;
    char *scratch;
    int64_t per_thread;
} fa_varlen_run;

static void run_item(const fa_varlen_run *r, int64_t it, void *scratch) {
    const fa_attn_job *job = r->job;
    const fa_varlen_chunk *c = &r->chunks[it / job->H];
    const int64_t h = it % job->H, b = c->b;
    const int64_t qlen = job->cu_q[b + 1] - job->cu_q[b];
    const int64_t klen = job->cu_k[b + 1] - job->cu_k[b];
    const int64_t q1 = c->q0 + FA_ATTN_MQ < qlen ? c->q0 + FA_ATTN_MQ : qlen;
    fa_attention_run_block(job, b, h, c->q0, q1, 0, klen, NULL, NULL, scratch);
}

int fa_varlen_attention(int dtype, const fa_varlen_args *a, int num_threads) {
    int io16, kvd;
    if (a == NULL || fa_attn_dtypes(dtype, a->kv_dtype, &dtype, &io16, &kvd) != FA_OK ||
        kvd == FA_KV_I8) /* int8 needs scales, which packed batches do not take */
        return FA_ERR_INVALID;
    const int64_t B = a->B, H = a->H, Hkv = a->Hkv, D = a->D, Dv = a->Dv;
    if (B < 0 || H < 0 || Hkv < 0 || D < 0 || Dv < 0 || a->total_q < 0 || a->total_k < 0)
        return FA_ERR_INVALID;
    if (H > 0 && (Hkv == 0 || H % Hkv != 0)) return FA_ERR_INVALID;
    if (a->alignment != FA_CAUSAL_TOP_LEFT && a->alignment != FA_CAUSAL_BOTTOM_RIGHT)
        return FA_ERR_INVALID;
    if (!fa_attn_features_ok(a->window, a->window_left, a->window_right, a->softcap))
        return FA_ERR_INVALID;
    if (!check_cu(a->cu_q, B, a->total_q) || !check_cu(a->cu_k, B, a->total_k))
        return FA_ERR_INVALID;
    const int64_t es = dtype == FA_DTYPE_F32 ? 4 : 8;
    const int64_t io_es = fa_attn_io_size(dtype, io16), kv_es = fa_attn_kv_size(dtype, kvd);
    int st;
    if ((st = check_packed(&a->q, H, a->total_q, D, io_es)) != FA_OK) return st;
    if ((st = check_packed(&a->k, Hkv, a->total_k, D, kv_es)) != FA_OK) return st;
    if ((st = check_packed(&a->v, Hkv, a->total_k, Dv, kv_es)) != FA_OK) return st;
    if ((st = check_packed(&a->out, H, a->total_q, Dv, io_es)) != FA_OK) return st;
    if (H == 0 || a->total_q == 0) return FA_OK;

    int64_t Lq = 0, Lk = 0, nchunks = 0;
    for (int64_t b = 0; b < B; ++b) {
        const int64_t lq = a->cu_q[b + 1] - a->cu_q[b], lk = a->cu_k[b + 1] - a->cu_k[b];
        Lq = lq > Lq ? lq : Lq;
        Lk = lk > Lk ? lk : Lk;
        nchunks += (lq + FA_ATTN_MQ - 1) / FA_ATTN_MQ; /* <= total_q */
    }
    int64_t items;
    if (!fa_mul_ok(nchunks, H, &items)) return FA_ERR_OVERFLOW;

    fa_attn_job job;
    memset(&job, 0, sizeof job);
    job.dtype = dtype;
    job.B = B, job.H = H, job.Hkv = Hkv, job.Lq = Lq, job.Lk = Lk, job.D = D, job.Dv = Dv;
    job.group = H / Hkv;
    job.q = a->q.data, job.k = a->k.data, job.v = a->v.data;
    job.out = a->out.data;
    memcpy(job.qs, a->q.stride, sizeof job.qs);
    memcpy(job.ks, a->k.stride, sizeof job.ks);
    memcpy(job.vs, a->v.stride, sizeof job.vs);
    memcpy(job.os, a->out.stride, sizeof job.os);
    job.qs[0] = job.ks[0] = job.vs[0] = job.os[0] = 0; /* rows come from cu_q / cu_k */
    job.mask.kind = FA_MASK_NONE;
    job.causal = a->is_causal ? a->alignment : FA_CAUSAL_NONE;
    job.causal_offset = 0; /* per sequence: fa_attn_offset */
    job.alignment = a->alignment;
    job.scale = a->scale;
    job.alibi = a->alibi_slopes;
    job.softcap = a->softcap;
    job.sinks = a->sinks;
    job.cu_q = a->cu_q, job.cu_k = a->cu_k;
    job.kv_dtype = kvd;
    job.io16 = io16;
    const int64_t reach = Lk + Lq; /* wider windows change nothing */
    job.has_left = (a->window & FA_WINDOW_LEFT) != 0;
    job.left = job.has_left ? (a->window_left < reach ? a->window_left : reach) : 0;
    job.has_right = a->is_causal || (a->window & FA_WINDOW_RIGHT) != 0;
    job.right = a->is_causal ? 0 : job.has_right ? (a->window_right < reach ? a->window_right : reach) : 0;

    /* per-sequence key lengths, for the ALiBi reference key */
    int64_t *klens = malloc((size_t)(B > 0 ? B : 1) * sizeof(int64_t));
    fa_varlen_chunk *chunks = malloc((size_t)(nchunks > 0 ? nchunks : 1) * sizeof *chunks);
    if (klens == NULL || chunks == NULL) {
        free(klens);
        free(chunks);
        return FA_ERR_NOMEM;
    }
    for (int64_t b = 0; b < B; ++b) klens[b] = a->cu_k[b + 1] - a->cu_k[b];
    job.key_len.data = klens, job.key_len.stride_b = 1, job.key_len.stride_m = 0;

    /* chunk cost: rows x the keys the chunk's rows can reach (an estimate;
     * it orders the items and never changes a result) */
    int64_t n = 0, work = 0;
    for (int64_t b = 0; b < B; ++b) {
        const int64_t lq = a->cu_q[b + 1] - a->cu_q[b], lk = klens[b];
        const int64_t off = fa_attn_offset(&job, b);
        for (int64_t q0 = 0; q0 < lq; q0 += FA_ATTN_MQ) {
            const int64_t rows = lq - q0 < FA_ATTN_MQ ? lq - q0 : FA_ATTN_MQ;
            int64_t lo = 0, hi = lk;
            if (job.has_left && q0 + off - job.left > lo) lo = q0 + off - job.left;
            if (job.has_right && q0 + rows + off + job.right < hi) hi = q0 + rows + off + job.right;
            const int64_t keys = hi > lo ? hi - lo : 0;
            int64_t cost;
            if (!fa_mul_ok(rows, keys + 1, &cost)) cost = INT64_MAX / 2;
            chunks[n].cost = cost, chunks[n].b = b, chunks[n].q0 = q0;
            work = work > INT64_MAX / 2 - cost ? INT64_MAX / 2 : work + cost;
            ++n;
        }
    }
    qsort(chunks, (size_t)nchunks, sizeof *chunks, chunk_cmp);

    int64_t work_all;
    if (!fa_mul_ok(work, H, &work_all)) work_all = INT64_MAX;
    const int nthreads = fa_resolve_threads(num_threads, items, work_all);
    const int64_t per_thread_elems = fa_attention_scratch_elems(D, Dv);
    if (per_thread_elems < 0) {
        free(klens);
        free(chunks);
        return FA_ERR_OVERFLOW;
    }
    const int64_t per_thread = (per_thread_elems * es + 63) & ~(int64_t)63;
    char *scratch = fa_scratch_alloc(per_thread, nthreads);
    if (scratch == NULL) {
        free(klens);
        free(chunks);
        return FA_ERR_NOMEM;
    }
    fa_varlen_run r = {&job, chunks, nchunks, scratch, per_thread};
    if (nthreads == 1) {
        for (int64_t it = 0; it < items; ++it) run_item(&r, it, scratch);
    } else {
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
#endif
        for (int64_t it = 0; it < items; ++it)
            run_item(&r, it, scratch + fa_thread_id() * per_thread);
    }
    fa_scratch_free(scratch);
    free(klens);
    free(chunks);
    return FA_OK;
}
