/*
 * softmax.cu: the fused masked softmax.
 *
 * x, y: (B, M, Lq, Lk) strided views; one row is (b, m, i) over the Lk keys.
 * Each row is handled by a team of kWidth threads (a warp, or a whole block
 * for long rows when there are few of them) in two passes:
 *   1. over the valid keys j < n (n from key_len and causality, 0 for a
 *      padded query), each thread folds t_j = x_j * scale + add_j + alibi_j
 *      into a running (max, sum of exp(t - max)), skipping keys the bool mask
 *      drops; the team then merges its partial (max, sum) pairs;
 *   2. every key of the row is written: exp(t_j - max) / sum for a kept key,
 *      exactly 0 for a masked one.
 * So x is read twice and y written once, and masked work is skipped. Masks
 * are read through their (broadcast) strides, never expanded.
 *
 * A row with no kept key, or whose kept scores are all -inf, is all zeros.
 * A NaN among the kept scores makes the row NaN, and a +inf makes it NaN
 * (exp(inf - inf)), exactly as the NumPy oracle behaves.
 *
 * Versions: v1 (this) uses a per-thread online softmax so that pass 1 reads
 * each score once; scores are not cached in shared memory because pass 2's
 * re-read of a row that was just read mostly hits L2.
 */
#include "cuda_internal.h"

/* 256 threads: 8 warps, a common sweet spot for bandwidth-bound kernels on
 * sm_80/sm_90 (enough warps in flight per SM without limiting residency). */
#define SOFTMAX_BLOCK 256
/* A warp per row while rows are short (<= 1024 keys is <= 32 keys a lane,
 * plenty of independent loads) or numerous (>= 65536 rows already fill every
 * SM many times over); otherwise a whole block per row, so that a few long
 * rows (decode: 1 query over tens of thousands of keys) still spread over
 * the GPU. */
#define SOFTMAX_WARP_MAX_KEYS 1024
#define SOFTMAX_WARP_MIN_ROWS 65536

namespace {

template <typename T>
struct SoftmaxArgs {
    const T *x;
    T *y;
    int64_t xs[4], ys[4];
    int64_t M, Lq, Lk, rows;
    T scale;
    int mask_kind;
    const void *mask;
    int64_t ms[4];
    const int64_t *key_len;
    int64_t kl_b, kl_m;
    const int64_t *query_len;
    int64_t ql_b, ql_m;
    int causal;
    const T *alibi; /* (M,) slopes, or NULL */
    int64_t alibi_offset;
};

/* Running softmax state of a set of scores: their max and sum(exp(t - max)). */
template <typename T>
struct RowStat {
    T max;
    T sum;
};

template <typename T>
__device__ __forceinline__ RowStat<T> merge_stats(RowStat<T> a, RowStat<T> b) {
    const T m = a.max > b.max ? a.max : b.max;
    /* Both empty: exp(-inf - -inf) would be NaN, so only add the sums
     * (0, or NaN when a NaN score was seen). */
    if (m == fa_neg_inf<T>::value()) return {m, a.sum + b.sum};
    /* exp(inf - inf) = NaN on purpose: a +inf score gives a NaN row. */
    return {m, a.sum * fa_exp(a.max - m) + b.sum * fa_exp(b.max - m)};
}

/* Fold one kept score into a thread's running state. */
template <typename T>
__device__ __forceinline__ void fold_score(RowStat<T> &st, T t) {
    if (t > st.max) {
        /* t - t is 0 for finite t and NaN for t = +inf, as exp(t - max) in
         * the oracle would be for the new maximum. */
        st.sum = st.sum * fa_exp(st.max - t) + fa_exp(t - t);
        st.max = t;
    } else if (!(t == fa_neg_inf<T>::value())) {
        st.sum += fa_exp(t - st.max); /* NaN t poisons the sum, as it should */
    }
    /* t = -inf (an additive -inf mask) contributes exactly nothing */
}

template <typename T, int kWidth>
__device__ __forceinline__ RowStat<T> team_reduce(RowStat<T> st, RowStat<T> *warp_stats) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        RowStat<T> other;
        other.max = __shfl_xor_sync(0xffffffffu, st.max, offset);
        other.sum = __shfl_xor_sync(0xffffffffu, st.sum, offset);
        st = merge_stats(st, other);
    }
    if (kWidth > 32) {
        const int warp = threadIdx.x / 32;
        if (threadIdx.x % 32 == 0) warp_stats[warp] = st;
        __syncthreads();
        st = warp_stats[0];
        for (int w = 1; w < kWidth / 32; ++w) st = merge_stats(st, warp_stats[w]);
        __syncthreads(); /* warp_stats is reused by the next row */
    }
    return st;
}

/* Keys [0, n) of row i (i < query_len) are not excluded by key_len or
 * causality. */
__device__ __forceinline__ int64_t valid_keys(int64_t i, int64_t Lq, int64_t Lk,
                                              int64_t key_len, int64_t query_len, int causal) {
    int64_t n = key_len < Lk ? key_len : Lk;
    int64_t limit = Lk;
    if (causal == FA_CUDA_CAUSAL_TOP_LEFT)
        limit = i + 1;
    else if (causal == FA_CUDA_CAUSAL_BOTTOM_RIGHT)
        limit = i + 1 + (Lk - Lq);
    else if (causal == FA_CUDA_CAUSAL_LENGTHS)
        limit = i + 1 + (n - query_len);
    if (limit < n) n = limit;
    return n < 0 ? 0 : n;
}

/* Score of key j of a row, or false when the bool mask drops it. */
template <typename T>
__device__ __forceinline__ bool row_score(const SoftmaxArgs<T> &a, const T *xrow,
                                          const unsigned char *keep, const T *add, T slope,
                                          int64_t i_pos, int64_t j, T &t) {
    if (keep != NULL && keep[j * a.ms[3]] == 0) return false;
    t = xrow[j * a.xs[3]] * a.scale;
    if (add != NULL) t += add[j * a.ms[3]];
    if (a.alibi != NULL) t -= slope * static_cast<T>(i_pos - j);
    return true;
}

/* Shapes: x, y (B, M, Lq, Lk) strided; mask broadcast to (B, M, Lq, Lk);
 * key_len, query_len (B, M); alibi (M,). Rows (b, m, i) flattened to r. */
template <typename T, int kWidth>
__global__ void __launch_bounds__(SOFTMAX_BLOCK) masked_softmax_kernel(const SoftmaxArgs<T> a) {
    constexpr int kRowsPerBlock = SOFTMAX_BLOCK / kWidth;
    __shared__ RowStat<T> warp_stats[SOFTMAX_BLOCK / 32];
    const int lane = threadIdx.x % kWidth;
    const int64_t row_step = (int64_t)gridDim.x * kRowsPerBlock;
    /* With kWidth == SOFTMAX_BLOCK every thread of a block has the same r, so
     * the __syncthreads() in team_reduce is reached uniformly. */
    for (int64_t r = (int64_t)blockIdx.x * kRowsPerBlock + threadIdx.x / kWidth; r < a.rows;
         r += row_step) {
        const int64_t i = r % a.Lq;
        const int64_t bm = r / a.Lq;
        const int64_t m = bm % a.M;
        const int64_t b = bm / a.M;
        T *yrow = a.y + b * a.ys[0] + m * a.ys[1] + i * a.ys[2];

        int64_t n = 0;
        const int64_t qlen = a.query_len ? a.query_len[b * a.ql_b + m * a.ql_m] : a.Lq;
        if (i < qlen) {
            const int64_t klen = a.key_len ? a.key_len[b * a.kl_b + m * a.kl_m] : a.Lk;
            n = valid_keys(i, a.Lq, a.Lk, klen, qlen, a.causal);
        }
        const T *xrow = a.x + b * a.xs[0] + m * a.xs[1] + i * a.xs[2];
        const int64_t moff = b * a.ms[0] + m * a.ms[1] + i * a.ms[2];
        const unsigned char *keep =
            a.mask_kind == FA_CUDA_MASK_BOOL ? static_cast<const unsigned char *>(a.mask) + moff : NULL;
        const T *add = a.mask_kind == FA_CUDA_MASK_ADD ? static_cast<const T *>(a.mask) + moff : NULL;
        const T slope = a.alibi != NULL ? a.alibi[m] : T(0);
        const int64_t i_pos = i + a.alibi_offset;

        RowStat<T> st = {fa_neg_inf<T>::value(), T(0)};
        for (int64_t j = lane; j < n; j += kWidth) {
            T t;
            if (row_score(a, xrow, keep, add, slope, i_pos, j, t)) fold_score(st, t);
        }
        /* also the barrier between reading x and writing y (in place) */
        st = team_reduce<T, kWidth>(st, warp_stats);

        const bool empty = st.max == fa_neg_inf<T>::value() && !(st.sum != st.sum);
        const T inv = T(1) / st.sum; /* one division per row */
        for (int64_t j = lane; j < a.Lk; j += kWidth) {
            T p = T(0);
            T t;
            if (j < n && !empty && row_score(a, xrow, keep, add, slope, i_pos, j, t))
                p = fa_exp(t - st.max) * inv;
            yrow[j * a.ys[3]] = p;
        }
    }
}

template <typename T>
int launch_typed(fa_cuda_view4 x, fa_cuda_view4 y, int64_t B, int64_t M, int64_t Lq,
                 int64_t Lk, double scale, const fa_cuda_mask_view *mask,
                 const fa_cuda_lengths_view *key_len, const fa_cuda_lengths_view *query_len,
                 int causal, const void *alibi, int64_t alibi_offset, cudaStream_t stream) {
    SoftmaxArgs<T> a;
    a.x = static_cast<const T *>(x.data);
    a.y = static_cast<T *>(y.data);
    for (int d = 0; d < 4; ++d) {
        a.xs[d] = x.stride[d];
        a.ys[d] = y.stride[d];
        a.ms[d] = 0;
    }
    a.M = M;
    a.Lq = Lq;
    a.Lk = Lk;
    a.rows = B * M * Lq;
    a.scale = static_cast<T>(scale);
    a.mask_kind = FA_CUDA_MASK_NONE;
    a.mask = NULL;
    if (mask != NULL && mask->data != NULL && mask->kind != FA_CUDA_MASK_NONE) {
        a.mask_kind = mask->kind;
        a.mask = mask->data;
        for (int d = 0; d < 4; ++d) a.ms[d] = mask->stride[d];
    }
    a.key_len = key_len ? key_len->data : NULL;
    a.kl_b = key_len ? key_len->stride_b : 0;
    a.kl_m = key_len ? key_len->stride_m : 0;
    a.query_len = query_len ? query_len->data : NULL;
    a.ql_b = query_len ? query_len->stride_b : 0;
    a.ql_m = query_len ? query_len->stride_m : 0;
    a.causal = causal;
    a.alibi = static_cast<const T *>(alibi);
    a.alibi_offset = alibi_offset;

    if (Lk <= SOFTMAX_WARP_MAX_KEYS || a.rows >= SOFTMAX_WARP_MIN_ROWS) {
        masked_softmax_kernel<T, 32>
            <<<fa_cuda_grid(a.rows, SOFTMAX_BLOCK / 32), SOFTMAX_BLOCK, 0, stream>>>(a);
        FA_CUDA_CHECK_LAUNCH("masked_softmax_kernel<warp per row>");
    } else {
        masked_softmax_kernel<T, SOFTMAX_BLOCK>
            <<<fa_cuda_grid(a.rows, 1), SOFTMAX_BLOCK, 0, stream>>>(a);
        FA_CUDA_CHECK_LAUNCH("masked_softmax_kernel<block per row>");
    }
    return FA_CUDA_OK;
}

}  // namespace

int fa_cuda_check_softmax_args(int dtype, int64_t B, int64_t M, int64_t Lq, int64_t Lk,
                               const fa_cuda_mask_view *mask,
                               const fa_cuda_lengths_view *key_len,
                               const fa_cuda_lengths_view *query_len, int causal) {
    (void)key_len;
    (void)query_len;
    if (dtype != FA_CUDA_F32 && dtype != FA_CUDA_F64)
        return fa_cuda_fail(FA_CUDA_ERR_INVALID, "masked softmax: dtype %d is not float32/float64", dtype);
    if (causal < FA_CUDA_CAUSAL_NONE || causal > FA_CUDA_CAUSAL_LENGTHS)
        return fa_cuda_fail(FA_CUDA_ERR_INVALID, "masked softmax: unknown causal mode %d", causal);
    const int64_t dims[4] = {B, M, Lq, Lk};
    if (fa_cuda_product(dims, 4) < 0)
        return fa_cuda_fail(FA_CUDA_ERR_OVERFLOW, "masked softmax: shape (%lld, %lld, %lld, %lld) overflows or is negative",
                            (long long)B, (long long)M, (long long)Lq, (long long)Lk);
    if (mask != NULL && mask->data != NULL && mask->kind != FA_CUDA_MASK_NONE) {
        if (mask->kind != FA_CUDA_MASK_BOOL && mask->kind != FA_CUDA_MASK_ADD)
            return fa_cuda_fail(FA_CUDA_ERR_INVALID, "masked softmax: unknown mask kind %d", mask->kind);
        const int64_t es = mask->kind == FA_CUDA_MASK_BOOL ? 1 : fa_cuda_dtype_size(dtype);
        if (!fa_cuda_view_ok(dims, mask->stride, 4, es))
            return fa_cuda_fail(FA_CUDA_ERR_OVERFLOW, "masked softmax: mask strides overflow");
    }
    return FA_CUDA_OK;
}

int fa_cuda_launch_masked_softmax(int dtype, fa_cuda_view4 x, fa_cuda_view4 y, int64_t B,
                                  int64_t M, int64_t Lq, int64_t Lk, double scale,
                                  const fa_cuda_mask_view *mask,
                                  const fa_cuda_lengths_view *key_len,
                                  const fa_cuda_lengths_view *query_len, int causal,
                                  const void *alibi_slopes, int64_t alibi_offset,
                                  cudaStream_t stream) {
    if (B == 0 || M == 0 || Lq == 0 || Lk == 0) return FA_CUDA_OK;
    if (dtype == FA_CUDA_F32)
        return launch_typed<float>(x, y, B, M, Lq, Lk, scale, mask, key_len, query_len, causal,
                                   alibi_slopes, alibi_offset, stream);
    return launch_typed<double>(x, y, B, M, Lq, Lk, scale, mask, key_len, query_len, causal,
                                alibi_slopes, alibi_offset, stream);
}

extern "C" int fa_cuda_masked_softmax(int dtype, fa_cuda_view4 x, fa_cuda_view4 y, int64_t B,
                                      int64_t M, int64_t Lq, int64_t Lk, double scale,
                                      const fa_cuda_mask_view *mask,
                                      const fa_cuda_lengths_view *key_len,
                                      const fa_cuda_lengths_view *query_len, int causal,
                                      void *stream) {
    fa_cuda_clear_stale_error();
    int status = fa_cuda_check_softmax_args(dtype, B, M, Lq, Lk, mask, key_len, query_len, causal);
    if (status != FA_CUDA_OK) return status;
    const int64_t dims[4] = {B, M, Lq, Lk};
    if (fa_cuda_product(dims, 4) == 0) return FA_CUDA_OK;
    const int64_t es = fa_cuda_dtype_size(dtype);
    if (x.data == NULL || y.data == NULL)
        return fa_cuda_fail(FA_CUDA_ERR_INVALID, "fa_cuda_masked_softmax: NULL x or y");
    if (!fa_cuda_view_ok(dims, x.stride, 4, es) || !fa_cuda_view_ok(dims, y.stride, 4, es))
        return fa_cuda_fail(FA_CUDA_ERR_OVERFLOW, "fa_cuda_masked_softmax: strides overflow");
    return fa_cuda_launch_masked_softmax(dtype, x, y, B, M, Lq, Lk, scale, mask, key_len,
                                         query_len, causal, NULL, 0,
                                         static_cast<cudaStream_t>(stream));
}
