/*
 * attention.cu: scaled dot-product attention as cuBLAS GEMM -> fused masked
 * softmax -> cuBLAS GEMM, the same three steps as torch's math backend.
 *
 * Shapes: q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv),
 * out (B, H, Lq, Dv), scores (scores_batch, H, Lq, Lk), all contiguous.
 *
 * Grouped-query attention without copies: the G = H / Hkv query heads that
 * share kv head g are adjacent in q, so for one (b, g) they form a single
 * contiguous (G * Lq, D) matrix, and their scores a contiguous
 * (G * Lq, Lk) block of the (B, H, Lq, Lk) scores. One strided-batched GEMM
 * over the B * Hkv pairs (b, g) therefore computes every head, with K and V
 * read once per group:
 *   S_bg = scale * Q_bg K_bg^T   (G*Lq x Lk)
 *   O_bg = P_bg V_bg             (G*Lq x Dv)
 *
 * Skipped work: the caller passes, per batch item, the number of keys any of
 * its rows may attend (from key lengths and causality). Both GEMMs of that
 * item then run over those keys only, so padded keys cost nothing and V is
 * never read there (a NaN in an unused cache slot cannot leak into P V).
 *
 * Memory: the batch runs in chunks of scores_batch items so that the score
 * workspace stays bounded; with scores_batch == B the workspace ends up
 * holding the attention weights (return_weights).
 */
#include "cuda_internal.h"

namespace {

int check_args(const fa_cuda_sdpa_args *a, int64_t scores_batch) {
    if (a->dtype != FA_CUDA_F32 && a->dtype != FA_CUDA_F64)
        return fa_cuda_fail(FA_CUDA_ERR_INVALID, "fa_cuda_sdpa: dtype %d is not float32/float64", a->dtype);
    if (a->B < 0 || a->H < 0 || a->Hkv < 0 || a->Lq < 0 || a->Lk < 0 || a->D < 0 || a->Dv < 0)
        return fa_cuda_fail(FA_CUDA_ERR_INVALID, "fa_cuda_sdpa: negative size");
    if (a->H > 0 && (a->Hkv == 0 || a->H % a->Hkv != 0))
        return fa_cuda_fail(FA_CUDA_ERR_INVALID, "fa_cuda_sdpa: H=%lld is not a multiple of Hkv=%lld",
                            (long long)a->H, (long long)a->Hkv);
    const int64_t shapes[5][4] = {{a->B, a->H, a->Lq, a->D},
                                  {a->B, a->Hkv, a->Lk, a->D},
                                  {a->B, a->Hkv, a->Lk, a->Dv},
                                  {a->B, a->H, a->Lq, a->Dv},
                                  {scores_batch, a->H, a->Lq, a->Lk}};
    for (int i = 0; i < 5; ++i) {
        const int64_t n = fa_cuda_product(shapes[i], 4);
        int64_t bytes;
        if (n < 0 || !fa_cuda_mul_ok(n, fa_cuda_dtype_size(a->dtype), &bytes))
            return fa_cuda_fail(FA_CUDA_ERR_OVERFLOW, "fa_cuda_sdpa: operand %d's size overflows", i);
    }
    if (a->B > 0 && (scores_batch < 1 || scores_batch > a->B))
        return fa_cuda_fail(FA_CUDA_ERR_INVALID, "fa_cuda_sdpa: scores_batch %lld not in [1, B=%lld]",
                            (long long)scores_batch, (long long)a->B);
    if (a->key_extent != NULL)
        for (int64_t b = 0; b < a->B; ++b)
            if (a->key_extent[b] < 0 || a->key_extent[b] > a->Lk)
                return fa_cuda_fail(FA_CUDA_ERR_INVALID, "fa_cuda_sdpa: key_extent[%lld] = %lld not in [0, Lk=%lld]",
                                    (long long)b, (long long)a->key_extent[b], (long long)a->Lk);
    return fa_cuda_check_softmax_args(a->dtype, a->B, a->H, a->Lq, a->Lk, &a->mask, &a->key_len,
                                      &a->query_len, a->causal);
}

/* A view of something indexed (B, M, ...) starting at batch item b0. */
fa_cuda_lengths_view lengths_from(const fa_cuda_lengths_view &v, int64_t b0) {
    fa_cuda_lengths_view out = v;
    if (out.data != NULL) out.data += b0 * v.stride_b;
    return out;
}

}  // namespace

extern "C" int fa_cuda_sdpa(void *blas, const fa_cuda_sdpa_args *args, const void *q,
                            const void *k, const void *v, void *out, void *scores,
                            int64_t scores_batch, void *stream) {
    fa_cuda_clear_stale_error();
    if (args == NULL) return fa_cuda_fail(FA_CUDA_ERR_INVALID, "fa_cuda_sdpa: args is NULL");
    const fa_cuda_sdpa_args &a = *args;
    int status = check_args(&a, scores_batch);
    if (status != FA_CUDA_OK) return status;
    if (a.B == 0 || a.H == 0 || a.Lq == 0) return FA_CUDA_OK; /* no query row at all */
    if (blas == NULL || q == NULL || out == NULL || (a.Lk > 0 && (k == NULL || v == NULL || scores == NULL)))
        return fa_cuda_fail(FA_CUDA_ERR_INVALID, "fa_cuda_sdpa: NULL handle or operand");

    cudaStream_t s = static_cast<cudaStream_t>(stream);
    const int64_t es = fa_cuda_dtype_size(a.dtype);
    const int64_t G = a.H / a.Hkv;
    const int64_t group_rows = G * a.Lq; /* rows of one (b, kv head) GEMM */
    /* element counts of one batch item of each operand */
    const int64_t q_item = a.H * a.Lq * a.D, k_item = a.Hkv * a.Lk * a.D;
    const int64_t v_item = a.Hkv * a.Lk * a.Dv, o_item = a.H * a.Lq * a.Dv;
    const int64_t s_item = a.H * a.Lq * a.Lk;
    const char *qc = static_cast<const char *>(q);
    const char *kc = static_cast<const char *>(k);
    const char *vc = static_cast<const char *>(v);
    char *oc = static_cast<char *>(out);
    char *sc = static_cast<char *>(scores);
    const int64_t mask_es = a.mask.kind == FA_CUDA_MASK_BOOL ? 1 : es;

    for (int64_t b0 = 0; b0 < a.B; b0 += scores_batch) {
        const int64_t nb = a.B - b0 < scores_batch ? a.B - b0 : scores_batch;
        char *chunk_out = oc + b0 * o_item * es;

        /* 1. S = scale * Q K^T, as column-major S^T (keys x G*Lq) = K Q^T.
         *    A whole chunk is one batched GEMM unless keys vary per item. */
        if (a.D == 0 && a.Lk > 0) {
            /* empty dot products are 0 */
            FA_CUDA_TRY(cudaMemsetAsync(sc, 0, (size_t)(nb * s_item * es), s));
        } else if (a.key_extent == NULL) {
            status = fa_cuda_gemm_strided_batched(
                blas, a.dtype, 1, 0, a.Lk, group_rows, a.D, a.scale, kc + b0 * k_item * es, a.D,
                a.Lk * a.D, qc + b0 * q_item * es, a.D, group_rows * a.D, 0.0, sc, a.Lk,
                group_rows * a.Lk, nb * a.Hkv, s);
            if (status != FA_CUDA_OK) return status;
        } else {
            for (int64_t i = 0; i < nb; ++i) {
                const int64_t b = b0 + i, keys = a.key_extent[b];
                if (keys == 0) continue; /* softmax writes the all-zero rows */
                status = fa_cuda_gemm_strided_batched(
                    blas, a.dtype, 1, 0, keys, group_rows, a.D, a.scale, kc + b * k_item * es, a.D,
                    a.Lk * a.D, qc + b * q_item * es, a.D, group_rows * a.D, 0.0,
                    sc + i * s_item * es, a.Lk, group_rows * a.Lk, a.Hkv, s);
                if (status != FA_CUDA_OK) return status;
            }
        }

        /* 2. P = masked softmax(S + mask + ALiBi) in place; scale is in S. */
        fa_cuda_view4 sview;
        sview.data = sc;
        sview.stride[0] = s_item;
        sview.stride[1] = a.Lq * a.Lk;
        sview.stride[2] = a.Lk;
        sview.stride[3] = 1;
        fa_cuda_mask_view mask = a.mask;
        if (mask.data != NULL)
            mask.data = static_cast<const char *>(mask.data) + b0 * mask.stride[0] * mask_es;
        const fa_cuda_lengths_view key_len = lengths_from(a.key_len, b0);
        const fa_cuda_lengths_view query_len = lengths_from(a.query_len, b0);
        status = fa_cuda_launch_masked_softmax(a.dtype, sview, sview, nb, a.H, a.Lq, a.Lk, 1.0,
                                               &mask, &key_len, &query_len, a.causal,
                                               a.alibi_slopes, a.alibi_offset, s);
        if (status != FA_CUDA_OK) return status;

        /* 3. O = P V, as column-major O^T (Dv x G*Lq) = V^T P^T. */
        if (a.key_extent == NULL) {
            if (a.Lk == 0) {
                FA_CUDA_TRY(cudaMemsetAsync(chunk_out, 0, (size_t)(nb * o_item * es), s));
            } else {
                status = fa_cuda_gemm_strided_batched(
                    blas, a.dtype, 0, 0, a.Dv, group_rows, a.Lk, 1.0, vc + b0 * v_item * es, a.Dv,
                    a.Lk * a.Dv, sc, a.Lk, group_rows * a.Lk, 0.0, chunk_out, a.Dv,
                    group_rows * a.Dv, nb * a.Hkv, s);
                if (status != FA_CUDA_OK) return status;
            }
        } else {
            for (int64_t i = 0; i < nb; ++i) {
                const int64_t b = b0 + i, keys = a.key_extent[b];
                char *item_out = oc + b * o_item * es;
                if (keys == 0) {
                    FA_CUDA_TRY(cudaMemsetAsync(item_out, 0, (size_t)(o_item * es), s));
                    continue;
                }
                status = fa_cuda_gemm_strided_batched(
                    blas, a.dtype, 0, 0, a.Dv, group_rows, keys, 1.0, vc + b * v_item * es, a.Dv,
                    a.Lk * a.Dv, sc + i * s_item * es, a.Lk, group_rows * a.Lk, 0.0, item_out,
                    a.Dv, group_rows * a.Dv, a.Hkv, s);
                if (status != FA_CUDA_OK) return status;
            }
        }

        /* 4. Padded queries are exactly 0 even when V holds NaN or Inf
         *    (0 * NaN in the GEMM would not be). */
        if (a.query_len.data != NULL) {
            status = fa_cuda_zero_padded_rows(a.dtype, chunk_out, nb, a.H, a.Lq, a.Dv, &query_len, stream);
            if (status != FA_CUDA_OK) return status;
        }
    }
    return FA_CUDA_OK;
}
