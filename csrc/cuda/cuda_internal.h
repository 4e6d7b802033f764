/*
 * cuda_internal.h: what the .cu files share and Python never sees: error
 * recording, checked size arithmetic, launch geometry, element-type traits
 * and the host-side launchers one file calls in another.
 *
 * Included only by .cu files (it uses CUDA C++).
 */
#ifndef FASTATTN_CUDA_INTERNAL_H
#define FASTATTN_CUDA_INTERNAL_H

#include <cuda_runtime.h>
#include <stdint.h>

#include "fastattn_cuda.h"

/* ---- error recording ------------------------------------------------------- */

/* Record `status` with a printf-style description for fa_cuda_last_error()
 * and return it. */
int fa_cuda_fail(int status, const char *fmt, ...);
/* Record a CUDA runtime error from `what` (the call's source text) and map it
 * to a status: NOMEM, NO_DEVICE or RUNTIME. */
int fa_cuda_runtime_failure(cudaError_t err, const char *what, const char *file, int line);

/* Return from the enclosing function when a runtime call fails. */
#define FA_CUDA_TRY(call)                                                              \
    do {                                                                               \
        cudaError_t fa_err_ = (call);                                                  \
        if (fa_err_ != cudaSuccess)                                                    \
            return fa_cuda_runtime_failure(fa_err_, #call, __FILE__, __LINE__);        \
    } while (0)

/* After every kernel launch: a bad configuration or a sticky error from an
 * earlier kernel shows up here and is reported, never ignored. */
#define FA_CUDA_CHECK_LAUNCH(kernel_name)                                              \
    do {                                                                               \
        cudaError_t fa_err_ = cudaGetLastError();                                      \
        if (fa_err_ != cudaSuccess) {                                                  \
            fa_cuda_runtime_failure(fa_err_, "launch of " kernel_name, __FILE__,       \
                                    __LINE__);                                         \
            return fa_err_ == cudaErrorMemoryAllocation ? FA_CUDA_ERR_NOMEM            \
                                                        : FA_CUDA_ERR_LAUNCH;          \
        }                                                                              \
    } while (0)

/* Forget a launch error left pending by code outside fastattn, so that the
 * check after our own launch does not blame us for it. Sticky errors (a
 * crashed context) come back on the next call anyway. */
static inline void fa_cuda_clear_stale_error(void) { (void)cudaGetLastError(); }

/* ---- checked arithmetic ---------------------------------------------------- */

/* r = a * b for non-negative a, b; 0 on overflow or negative input. */
static inline int fa_cuda_mul_ok(int64_t a, int64_t b, int64_t *r) {
    if (a < 0 || b < 0) return 0;
    if (a != 0 && b > INT64_MAX / a) return 0;
    *r = a * b;
    return 1;
}

/* Product of n non-negative sizes, or -1 on overflow or negative input. */
static inline int64_t fa_cuda_product(const int64_t *dims, int n) {
    int64_t r = 1;
    for (int i = 0; i < n; ++i)
        if (!fa_cuda_mul_ok(r, dims[i], &r)) return -1;
    return r;
}

/* 1 when every element offset of the view fits in int64 bytes: the sum of
 * |stride| * (dim - 1) times elem_size. Kernels index with int64, so this is
 * what keeps their address arithmetic exact. Empty views are always fine. */
int fa_cuda_view_ok(const int64_t *dims, const int64_t *strides, int n, int64_t elem_size);

/* Size in bytes of one element of a fa_cuda_dtype; 0 when unknown. */
int64_t fa_cuda_dtype_size(int dtype);

/* ---- launch geometry ---------------------------------------------------------- */

/* Every kernel runs a grid-stride loop, so the grid only has to be large
 * enough to fill the GPU: 65536 blocks is ~60 waves of an H100's 132 SMs x 8
 * resident blocks, and stays far below gridDim.x's 2^31 - 1 limit. Larger
 * work simply loops. */
#define FA_CUDA_MAX_BLOCKS 65536

static inline unsigned int fa_cuda_grid(int64_t work_items, int64_t items_per_block) {
    int64_t blocks = (work_items + items_per_block - 1) / items_per_block;
    if (blocks < 1) blocks = 1;
    if (blocks > FA_CUDA_MAX_BLOCKS) blocks = FA_CUDA_MAX_BLOCKS;
    return (unsigned int)blocks;
}

/* ---- element types --------------------------------------------------------------- */

#ifdef __CUDACC__
template <typename T>
struct fa_neg_inf;
template <>
struct fa_neg_inf<float> {
    static __device__ __forceinline__ float value() { return -__int_as_float(0x7f800000); }
};
template <>
struct fa_neg_inf<double> {
    static __device__ __forceinline__ double value() {
        return -__longlong_as_double(0x7ff0000000000000LL);
    }
};

/* exp in the row's own precision; the full-accuracy library versions, never
 * __expf: softmax must meet 1e-5 (float) / 1e-12 (double) relative error. */
static __device__ __forceinline__ float fa_exp(float x) { return expf(x); }
static __device__ __forceinline__ double fa_exp(double x) { return exp(x); }
#endif

/* ---- launchers shared between files ------------------------------------------------- */

/* The masked softmax of fa_cuda_masked_softmax with an optional ALiBi bias:
 * alibi_slopes (M,) of the row dtype adds -slope[m] * (i + alibi_offset - j)
 * to each score (after scale, with the additive mask). Arguments are
 * already checked by the caller. */
int fa_cuda_launch_masked_softmax(int dtype, fa_cuda_view4 x, fa_cuda_view4 y, int64_t B,
                                  int64_t M, int64_t Lq, int64_t Lk, double scale,
                                  const fa_cuda_mask_view *mask,
                                  const fa_cuda_lengths_view *key_len,
                                  const fa_cuda_lengths_view *query_len, int causal,
                                  const void *alibi_slopes, int64_t alibi_offset,
                                  cudaStream_t stream);

/* Checks of fa_cuda_masked_softmax's arguments, shared with fa_cuda_sdpa. */
int fa_cuda_check_softmax_args(int dtype, int64_t B, int64_t M, int64_t Lq, int64_t Lk,
                               const fa_cuda_mask_view *mask,
                               const fa_cuda_lengths_view *key_len,
                               const fa_cuda_lengths_view *query_len, int causal);

/* Column-major strided-batched GEMM, C_b = alpha op(A_b) op(B_b) + beta C_b for
 * b < batch, in the dtype's precision. Splits a batch beyond INT_MAX and
 * rejects m, n, k or leading dimensions beyond cuBLAS's int. */
int fa_cuda_gemm_strided_batched(void *blas, int dtype, int trans_a, int trans_b,
                                 int64_t m, int64_t n, int64_t k, double alpha,
                                 const void *a, int64_t lda, int64_t stride_a,
                                 const void *b, int64_t ldb, int64_t stride_b,
                                 double beta, void *c, int64_t ldc, int64_t stride_c,
                                 int64_t batch, cudaStream_t stream);

#endif /* FASTATTN_CUDA_INTERNAL_H */
