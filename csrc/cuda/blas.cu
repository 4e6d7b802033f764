/*
 * blas.cu: everything that touches cuBLAS: handles, the strided-batched GEMM
 * used by attention, and the projection y = x @ w + bias.
 *
 * This is the only file that includes cublas_v2.h, so the other files
 * compile with nvcc alone.
 *
 * Row-major arrays are column-major arrays transposed, so a row-major
 * product Y = X W is computed as the column-major product Y^T = W^T X^T:
 * the operands swap places and no data is transposed.
 */
#include <cublas_v2.h>
#include <limits.h>

#include "cuda_internal.h"

/* See copy.cu: a warp along the output features, 8 rows per block. */
#define BIAS_LANES 32
#define BIAS_ROWS_PER_BLOCK 8

namespace {

int cublas_failure(cublasStatus_t st, const char *what, int line) {
    const int status = st == CUBLAS_STATUS_ALLOC_FAILED ? FA_CUDA_ERR_NOMEM
                       : st == CUBLAS_STATUS_NOT_INITIALIZED ? FA_CUDA_ERR_NO_DEVICE
                                                             : FA_CUDA_ERR_CUBLAS;
    return fa_cuda_fail(status, "%s failed at %s:%d: %s (cublasStatus %d)", what, __FILE__, line,
                        cublasGetStatusString(st), (int)st);
}

#define FA_CUBLAS_TRY(call)                                                      \
    do {                                                                         \
        cublasStatus_t fa_st_ = (call);                                          \
        if (fa_st_ != CUBLAS_STATUS_SUCCESS) return cublas_failure(fa_st_, #call, __LINE__); \
    } while (0)

inline bool fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }

/* y: (rows, n_out) with row stride ys; every row becomes bias. */
template <typename T>
__global__ void __launch_bounds__(BIAS_LANES * BIAS_ROWS_PER_BLOCK)
broadcast_bias_kernel(T *y, int64_t ys, const T *bias, int64_t rows, int64_t n_out) {
    const int64_t row_step = (int64_t)gridDim.x * BIAS_ROWS_PER_BLOCK;
    for (int64_t r = (int64_t)blockIdx.x * BIAS_ROWS_PER_BLOCK + threadIdx.y; r < rows; r += row_step)
        for (int64_t o = threadIdx.x; o < n_out; o += BIAS_LANES) y[r * ys + o] = bias[o];
}

}  // namespace

extern "C" int fa_cuda_blas_create(void **handle) {
    fa_cuda_clear_stale_error();
    if (handle == NULL) return fa_cuda_fail(FA_CUDA_ERR_INVALID, "fa_cuda_blas_create: handle is NULL");
    *handle = NULL;
    cublasHandle_t h;
    FA_CUBLAS_TRY(cublasCreate(&h));
    /* DEFAULT math keeps at least the mantissa of the requested type: FP32
     * GEMMs stay FP32 (no TF32), which the 1e-5 tolerance needs. */
    cublasStatus_t st = cublasSetMathMode(h, CUBLAS_DEFAULT_MATH);
    if (st != CUBLAS_STATUS_SUCCESS) {
        cublasDestroy(h);
        return cublas_failure(st, "cublasSetMathMode", __LINE__);
    }
    *handle = h;
    return FA_CUDA_OK;
}

extern "C" int fa_cuda_blas_destroy(void *handle) {
    if (handle == NULL) return FA_CUDA_OK;
    FA_CUBLAS_TRY(cublasDestroy(static_cast<cublasHandle_t>(handle)));
    return FA_CUDA_OK;
}

int fa_cuda_gemm_strided_batched(void *blas, int dtype, int trans_a, int trans_b, int64_t m,
                                 int64_t n, int64_t k, double alpha, const void *a, int64_t lda,
                                 int64_t stride_a, const void *b, int64_t ldb, int64_t stride_b,
                                 double beta, void *c, int64_t ldc, int64_t stride_c,
                                 int64_t batch, cudaStream_t stream) {
    if (blas == NULL) return fa_cuda_fail(FA_CUDA_ERR_INVALID, "gemm: no cuBLAS handle");
    if (dtype != FA_CUDA_F32 && dtype != FA_CUDA_F64)
        return fa_cuda_fail(FA_CUDA_ERR_INVALID, "gemm: dtype %d is not float32/float64", dtype);
    if (!fits_int(m) || !fits_int(n) || !fits_int(k) || !fits_int(lda) || !fits_int(ldb) ||
        !fits_int(ldc) || batch < 0)
        return fa_cuda_fail(FA_CUDA_ERR_OVERFLOW,
                            "gemm: m=%lld n=%lld k=%lld lda=%lld ldb=%lld ldc=%lld exceed cuBLAS's int range",
                            (long long)m, (long long)n, (long long)k, (long long)lda,
                            (long long)ldb, (long long)ldc);
    if (m == 0 || n == 0 || batch == 0) return FA_CUDA_OK;
    if (k == 0) return fa_cuda_fail(FA_CUDA_ERR_INVALID, "gemm: k == 0 (the caller must fill C itself)");
    cublasHandle_t h = static_cast<cublasHandle_t>(blas);
    FA_CUBLAS_TRY(cublasSetStream(h, stream));
    const cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    const int64_t es = fa_cuda_dtype_size(dtype);
    /* cuBLAS counts batches in int: run larger batches in INT_MAX pieces. */
    for (int64_t done = 0; done < batch; done += INT_MAX) {
        const int count = (int)(batch - done < INT_MAX ? batch - done : INT_MAX);
        const char *pa = static_cast<const char *>(a) + done * stride_a * es;
        const char *pb = static_cast<const char *>(b) + done * stride_b * es;
        char *pc = static_cast<char *>(c) + done * stride_c * es;
        if (dtype == FA_CUDA_F32) {
            const float alpha_f = (float)alpha, beta_f = (float)beta;
            FA_CUBLAS_TRY(cublasSgemmStridedBatched(
                h, op_a, op_b, (int)m, (int)n, (int)k, &alpha_f, (const float *)pa, (int)lda,
                (long long)stride_a, (const float *)pb, (int)ldb, (long long)stride_b, &beta_f,
                (float *)pc, (int)ldc, (long long)stride_c, count));
        } else {
            FA_CUBLAS_TRY(cublasDgemmStridedBatched(
                h, op_a, op_b, (int)m, (int)n, (int)k, &alpha, (const double *)pa, (int)lda,
                (long long)stride_a, (const double *)pb, (int)ldb, (long long)stride_b, &beta,
                (double *)pc, (int)ldc, (long long)stride_c, count));
        }
    }
    return FA_CUDA_OK;
}

extern "C" int fa_cuda_linear(void *blas, int dtype, const void *x, int64_t x_row_stride,
                              const void *w, int64_t w_row_stride, const void *bias, void *y,
                              int64_t y_row_stride, int64_t rows, int64_t n_in, int64_t n_out,
                              void *stream) {
    fa_cuda_clear_stale_error();
    if (dtype != FA_CUDA_F32 && dtype != FA_CUDA_F64)
        return fa_cuda_fail(FA_CUDA_ERR_INVALID, "fa_cuda_linear: dtype %d is not float32/float64", dtype);
    if (rows < 0 || n_in < 0 || n_out < 0 || x_row_stride < n_in || w_row_stride < n_out ||
        y_row_stride < n_out)
        return fa_cuda_fail(FA_CUDA_ERR_INVALID,
                            "fa_cuda_linear: rows=%lld n_in=%lld n_out=%lld row strides x=%lld w=%lld y=%lld",
                            (long long)rows, (long long)n_in, (long long)n_out,
                            (long long)x_row_stride, (long long)w_row_stride,
                            (long long)y_row_stride);
    if (rows == 0 || n_out == 0) return FA_CUDA_OK;
    if (y == NULL || (n_in > 0 && (x == NULL || w == NULL)))
        return fa_cuda_fail(FA_CUDA_ERR_INVALID, "fa_cuda_linear: NULL operand");
    const int64_t es = fa_cuda_dtype_size(dtype);
    const int64_t ydims[2] = {rows, n_out}, ystr[2] = {y_row_stride, 1};
    const int64_t xdims[2] = {rows, n_in}, xstr[2] = {x_row_stride, 1};
    const int64_t wdims[2] = {n_in, n_out}, wstr[2] = {w_row_stride, 1};
    if (!fa_cuda_view_ok(ydims, ystr, 2, es) || !fa_cuda_view_ok(xdims, xstr, 2, es) ||
        !fa_cuda_view_ok(wdims, wstr, 2, es))
        return fa_cuda_fail(FA_CUDA_ERR_OVERFLOW, "fa_cuda_linear: sizes overflow");
    cudaStream_t s = static_cast<cudaStream_t>(stream);

    /* The bias goes in first and the GEMM accumulates onto it (beta = 1):
     * one pass over y instead of a GEMM pass plus a read-modify-write pass. */
    double beta = 0.0;
    if (bias != NULL || n_in == 0) {
        const dim3 block(BIAS_LANES, BIAS_ROWS_PER_BLOCK);
        const unsigned int grid = fa_cuda_grid(rows, BIAS_ROWS_PER_BLOCK);
        if (bias != NULL) {
            if (dtype == FA_CUDA_F32)
                broadcast_bias_kernel<float><<<grid, block, 0, s>>>(
                    static_cast<float *>(y), y_row_stride, static_cast<const float *>(bias), rows, n_out);
            else
                broadcast_bias_kernel<double><<<grid, block, 0, s>>>(
                    static_cast<double *>(y), y_row_stride, static_cast<const double *>(bias), rows, n_out);
            FA_CUDA_CHECK_LAUNCH("broadcast_bias_kernel");
        } else {
            /* x @ w with no input features is a zero matrix */
            FA_CUDA_TRY(cudaMemset2DAsync(y, (size_t)(y_row_stride * es), 0, (size_t)(n_out * es),
                                          (size_t)rows, s));
        }
        beta = 1.0;
    }
    if (n_in == 0) return FA_CUDA_OK;

    /* Column-major: Y^T (n_out x rows) = W^T (n_out x n_in) X^T (n_in x rows);
     * row-major W with row stride w_row_stride is W^T with lda = that stride.
     * cuBLAS's n is an int, so very tall inputs go in INT_MAX-row pieces. */
    for (int64_t r0 = 0; r0 < rows; r0 += INT_MAX) {
        const int64_t nr = rows - r0 < INT_MAX ? rows - r0 : INT_MAX;
        const char *xp = static_cast<const char *>(x) + r0 * x_row_stride * es;
        char *yp = static_cast<char *>(y) + r0 * y_row_stride * es;
        const int status = fa_cuda_gemm_strided_batched(blas, dtype, 0, 0, n_out, nr, n_in, 1.0, w,
                                                        w_row_stride, 0, xp, x_row_stride, 0, beta,
                                                        yp, y_row_stride, 0, 1, s);
        if (status != FA_CUDA_OK) return status;
    }
    return FA_CUDA_OK;
}
