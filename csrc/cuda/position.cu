/*
 * position.cu: sinusoidal position-encoding tables, their fused addition,
 * and rotary position embeddings (RoPE).
 *
 * Accuracy: angles reach 1e6 rad and more, where a float angle is off by
 * ~0.06 rad. Every thread therefore forms its angle as pos * inv_timescale in
 * double and takes a double sin/cos (the CUDA library versions, accurate to
 * 2 ulp), then rounds once to the output type; float32 tables match the
 * float64 oracle to float rounding at any position below 2^53.
 *
 * Unlike the CPU code, nothing is carried from one position to the next
 * (no rotation recurrence): every element is independent, which is what a
 * GPU wants, and the double transcendentals are amortised over the batch in
 * the fused add.
 */
#include "cuda_internal.h"

/* A warp spans the channel axis (coalesced rows); 8 rows per block gives
 * 256-thread blocks (see copy.cu). */
#define PE_LANES 32
#define PE_ROWS_PER_BLOCK 8

namespace {

struct PeParams {
    int layout;
    int64_t channels;
    int64_t nfreq_concat;  /* channels / 2: sin columns of the concat layout */
    double min_timescale;
    double log_increment;  /* concat: log(max/min) / max(n - 1, 1) */
    double ratio;          /* interleaved: max / min */
    int64_t start_index;
};

/* PE[pos, c] in double (see fastattn.reference.sinusoidal_position_encoding). */
__device__ __forceinline__ double pe_value(const PeParams &p, int64_t pos, int64_t c) {
    const double position = static_cast<double>(pos);
    if (p.layout == FA_CUDA_PE_CONCAT) {
        const int64_t n = p.nfreq_concat;
        if (c >= 2 * n) return 0.0; /* odd channel count: trailing zero column */
        const int64_t pair = c < n ? c : c - n;
        const double inv = p.min_timescale * exp(-static_cast<double>(pair) * p.log_increment);
        const double angle = position * inv;
        return c < n ? sin(angle) : cos(angle);
    }
    const int64_t pair = c / 2;
    const double inv = p.min_timescale *
                       pow(p.ratio, -2.0 * static_cast<double>(pair) / static_cast<double>(p.channels));
    const double angle = position * inv;
    return (c & 1) ? cos(angle) : sin(angle);
}

/* out: (length, channels), row stride out_rs, unit column stride. */
template <typename T>
__global__ void __launch_bounds__(PE_LANES * PE_ROWS_PER_BLOCK)
position_table_kernel(T *out, int64_t out_rs, int64_t length, const PeParams p) {
    const int64_t row_step = (int64_t)gridDim.x * PE_ROWS_PER_BLOCK;
    for (int64_t l = (int64_t)blockIdx.x * PE_ROWS_PER_BLOCK + threadIdx.y; l < length; l += row_step) {
        const int64_t pos = p.start_index + l;
        for (int64_t c = threadIdx.x; c < p.channels; c += PE_LANES)
            out[l * out_rs + c] = static_cast<T>(pe_value(p, pos, c));
    }
}

/* x, y: (B, length, channels) strided; y may equal x. Each thread computes
 * one table entry once and applies it to every batch item. */
template <typename T>
__global__ void __launch_bounds__(PE_LANES * PE_ROWS_PER_BLOCK)
add_position_kernel(const T *x, T *y, int64_t B, int64_t length, int64_t xs0, int64_t xs1,
                    int64_t xs2, int64_t ys0, int64_t ys1, int64_t ys2, const PeParams p) {
    const int64_t row_step = (int64_t)gridDim.x * PE_ROWS_PER_BLOCK;
    for (int64_t l = (int64_t)blockIdx.x * PE_ROWS_PER_BLOCK + threadIdx.y; l < length; l += row_step) {
        const int64_t pos = p.start_index + l;
        for (int64_t c = threadIdx.x; c < p.channels; c += PE_LANES) {
            /* rounded to T first, as the CPU adds a table row of type T */
            const T pe = static_cast<T>(pe_value(p, pos, c));
            for (int64_t b = 0; b < B; ++b)
                y[b * ys0 + l * ys1 + c * ys2] = x[b * xs0 + l * xs1 + c * xs2] + pe;
        }
    }
}

struct Strides4 {
    int64_t s[4];
};

/* x, y: (B, M, L, D) strided; positions: int64 (B, M, L) strided. A row
 * (b, m, l) is one warp; lane i handles the pairs i, i + 32, ... of D / 2.
 * y may equal x: each thread reads both elements of its pair before
 * writing them. */
template <typename T>
__global__ void __launch_bounds__(PE_LANES * PE_ROWS_PER_BLOCK)
rotary_kernel(const T *x, T *y, const int64_t *positions, int64_t M, int64_t L, int64_t D,
              int64_t rows, Strides4 xs, Strides4 ys, Strides4 ps, int layout, double base) {
    const int64_t half = D / 2;
    const int64_t row_step = (int64_t)gridDim.x * PE_ROWS_PER_BLOCK;
    for (int64_t r = (int64_t)blockIdx.x * PE_ROWS_PER_BLOCK + threadIdx.y; r < rows; r += row_step) {
        const int64_t l = r % L;
        const int64_t bm = r / L;
        const int64_t m = bm % M;
        const int64_t b = bm / M;
        const T *xrow = x + b * xs.s[0] + m * xs.s[1] + l * xs.s[2];
        T *yrow = y + b * ys.s[0] + m * ys.s[1] + l * ys.s[2];
        const double pos = static_cast<double>(positions[b * ps.s[0] + m * ps.s[1] + l * ps.s[2]]);
        for (int64_t i = threadIdx.x; i < half; i += PE_LANES) {
            const double inv = pow(base, -2.0 * static_cast<double>(i) / static_cast<double>(D));
            double s, c;
            sincos(pos * inv, &s, &c);
            const int64_t ia = layout == FA_CUDA_ROPE_NEOX ? i : 2 * i;
            const int64_t ib = layout == FA_CUDA_ROPE_NEOX ? i + half : 2 * i + 1;
            const double a = static_cast<double>(xrow[ia * xs.s[3]]);
            const double bv = static_cast<double>(xrow[ib * xs.s[3]]);
            yrow[ia * ys.s[3]] = static_cast<T>(a * c - bv * s);
            yrow[ib * ys.s[3]] = static_cast<T>(bv * c + a * s);
        }
    }
}

int make_params(int layout, int64_t channels, double min_timescale, double max_timescale,
                int64_t start_index, PeParams *p) {
    if (layout != FA_CUDA_PE_CONCAT && layout != FA_CUDA_PE_INTERLEAVED)
        return fa_cuda_fail(FA_CUDA_ERR_INVALID, "position encoding: unknown layout %d", layout);
    if (!(min_timescale > 0.0) || !(max_timescale > 0.0) || !isfinite(min_timescale) ||
        !isfinite(max_timescale))
        return fa_cuda_fail(FA_CUDA_ERR_INVALID, "position encoding: timescales must be positive and finite");
    const int64_t n = channels / 2;
    p->layout = layout;
    p->channels = channels;
    p->nfreq_concat = n;
    p->min_timescale = min_timescale;
    p->ratio = max_timescale / min_timescale;
    /* computed once on the host, in double, exactly as the oracle does */
    p->log_increment = log(p->ratio) / static_cast<double>(n > 1 ? n - 1 : 1);
    p->start_index = start_index;
    return FA_CUDA_OK;
}

int check_dtype(int dtype, const char *what) {
    if (dtype != FA_CUDA_F32 && dtype != FA_CUDA_F64)
        return fa_cuda_fail(FA_CUDA_ERR_INVALID, "%s: dtype %d is not float32/float64", what, dtype);
    return FA_CUDA_OK;
}

}  // namespace

extern "C" int fa_cuda_position_encoding(int dtype, void *out, int64_t row_stride,
                                         int64_t length, int64_t channels, int layout,
                                         double min_timescale, double max_timescale,
                                         int64_t start_index, void *stream) {
    fa_cuda_clear_stale_error();
    int status = check_dtype(dtype, "fa_cuda_position_encoding");
    if (status != FA_CUDA_OK) return status;
    if (length < 0 || channels <= 0)
        return fa_cuda_fail(FA_CUDA_ERR_INVALID, "fa_cuda_position_encoding: length %lld, channels %lld",
                            (long long)length, (long long)channels);
    PeParams p;
    status = make_params(layout, channels, min_timescale, max_timescale, start_index, &p);
    if (status != FA_CUDA_OK) return status;
    if (length == 0) return FA_CUDA_OK;
    if (out == NULL) return fa_cuda_fail(FA_CUDA_ERR_INVALID, "fa_cuda_position_encoding: out is NULL");
    const int64_t dims[2] = {length, channels};
    const int64_t strides[2] = {row_stride, 1};
    if (!fa_cuda_view_ok(dims, strides, 2, fa_cuda_dtype_size(dtype)))
        return fa_cuda_fail(FA_CUDA_ERR_OVERFLOW, "fa_cuda_position_encoding: size overflows");
    /* pos = start + l must not overflow int64 */
    if (start_index > 0 && length - 1 > INT64_MAX - start_index)
        return fa_cuda_fail(FA_CUDA_ERR_OVERFLOW, "fa_cuda_position_encoding: start_index + length overflows");
    const dim3 block(PE_LANES, PE_ROWS_PER_BLOCK);
    const unsigned int grid = fa_cuda_grid(length, PE_ROWS_PER_BLOCK);
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (dtype == FA_CUDA_F32)
        position_table_kernel<float><<<grid, block, 0, s>>>(static_cast<float *>(out), row_stride, length, p);
    else
        position_table_kernel<double><<<grid, block, 0, s>>>(static_cast<double *>(out), row_stride, length, p);
    FA_CUDA_CHECK_LAUNCH("position_table_kernel");
    return FA_CUDA_OK;
}

extern "C" int fa_cuda_add_position_encoding(int dtype, fa_cuda_view4 x, fa_cuda_view4 y,
                                             int64_t B, int64_t length, int64_t channels,
                                             int layout, double min_timescale,
                                             double max_timescale, int64_t start_index,
                                             void *stream) {
    fa_cuda_clear_stale_error();
    int status = check_dtype(dtype, "fa_cuda_add_position_encoding");
    if (status != FA_CUDA_OK) return status;
    if (B < 0 || length < 0 || channels <= 0)
        return fa_cuda_fail(FA_CUDA_ERR_INVALID, "fa_cuda_add_position_encoding: shape (%lld, %lld, %lld)",
                            (long long)B, (long long)length, (long long)channels);
    PeParams p;
    status = make_params(layout, channels, min_timescale, max_timescale, start_index, &p);
    if (status != FA_CUDA_OK) return status;
    const int64_t dims[3] = {B, length, channels};
    if (fa_cuda_product(dims, 3) < 0)
        return fa_cuda_fail(FA_CUDA_ERR_OVERFLOW, "fa_cuda_add_position_encoding: size overflows");
    if (B == 0 || length == 0) return FA_CUDA_OK;
    if (x.data == NULL || y.data == NULL)
        return fa_cuda_fail(FA_CUDA_ERR_INVALID, "fa_cuda_add_position_encoding: NULL x or y");
    const int64_t es = fa_cuda_dtype_size(dtype);
    if (!fa_cuda_view_ok(dims, x.stride, 3, es) || !fa_cuda_view_ok(dims, y.stride, 3, es))
        return fa_cuda_fail(FA_CUDA_ERR_OVERFLOW, "fa_cuda_add_position_encoding: strides overflow");
    if (start_index > 0 && length - 1 > INT64_MAX - start_index)
        return fa_cuda_fail(FA_CUDA_ERR_OVERFLOW, "fa_cuda_add_position_encoding: start_index + length overflows");
    const dim3 block(PE_LANES, PE_ROWS_PER_BLOCK);
    const unsigned int grid = fa_cuda_grid(length, PE_ROWS_PER_BLOCK);
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (dtype == FA_CUDA_F32)
        add_position_kernel<float><<<grid, block, 0, s>>>(
            static_cast<const float *>(x.data), static_cast<float *>(y.data), B, length,
            x.stride[0], x.stride[1], x.stride[2], y.stride[0], y.stride[1], y.stride[2], p);
    else
        add_position_kernel<double><<<grid, block, 0, s>>>(
            static_cast<const double *>(x.data), static_cast<double *>(y.data), B, length,
            x.stride[0], x.stride[1], x.stride[2], y.stride[0], y.stride[1], y.stride[2], p);
    FA_CUDA_CHECK_LAUNCH("add_position_kernel");
    return FA_CUDA_OK;
}

extern "C" int fa_cuda_apply_rotary(int dtype, fa_cuda_view4 x, fa_cuda_view4 y, int64_t B,
                                    int64_t M, int64_t L, int64_t D, fa_cuda_view4 positions,
                                    int layout, double base, void *stream) {
    fa_cuda_clear_stale_error();
    int status = check_dtype(dtype, "fa_cuda_apply_rotary");
    if (status != FA_CUDA_OK) return status;
    if (layout != FA_CUDA_ROPE_NEOX && layout != FA_CUDA_ROPE_GPTJ)
        return fa_cuda_fail(FA_CUDA_ERR_INVALID, "fa_cuda_apply_rotary: unknown layout %d", layout);
    if (!(base > 0.0) || !isfinite(base))
        return fa_cuda_fail(FA_CUDA_ERR_INVALID, "fa_cuda_apply_rotary: base must be positive and finite");
    if (D % 2 != 0)
        return fa_cuda_fail(FA_CUDA_ERR_INVALID, "fa_cuda_apply_rotary: head dim %lld is odd", (long long)D);
    const int64_t dims[4] = {B, M, L, D};
    const int64_t total = fa_cuda_product(dims, 4);
    if (total < 0) return fa_cuda_fail(FA_CUDA_ERR_OVERFLOW, "fa_cuda_apply_rotary: size overflows or is negative");
    if (total == 0) return FA_CUDA_OK;
    if (x.data == NULL || y.data == NULL || positions.data == NULL)
        return fa_cuda_fail(FA_CUDA_ERR_INVALID, "fa_cuda_apply_rotary: NULL x, y or positions");
    const int64_t es = fa_cuda_dtype_size(dtype);
    if (!fa_cuda_view_ok(dims, x.stride, 4, es) || !fa_cuda_view_ok(dims, y.stride, 4, es) ||
        !fa_cuda_view_ok(dims, positions.stride, 3, 8))
        return fa_cuda_fail(FA_CUDA_ERR_OVERFLOW, "fa_cuda_apply_rotary: strides overflow");
    Strides4 xs, ys, ps;
    for (int d = 0; d < 4; ++d) {
        xs.s[d] = x.stride[d];
        ys.s[d] = y.stride[d];
        ps.s[d] = d < 3 ? positions.stride[d] : 0;
    }
    const int64_t rows = B * M * L;
    const dim3 block(PE_LANES, PE_ROWS_PER_BLOCK);
    const unsigned int grid = fa_cuda_grid(rows, PE_ROWS_PER_BLOCK);
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    const int64_t *pos = static_cast<const int64_t *>(positions.data);
    if (dtype == FA_CUDA_F32)
        rotary_kernel<float><<<grid, block, 0, s>>>(static_cast<const float *>(x.data),
                                                    static_cast<float *>(y.data), pos, M, L, D,
                                                    rows, xs, ys, ps, layout, base);
    else
        rotary_kernel<double><<<grid, block, 0, s>>>(static_cast<const double *>(x.data),
                                                     static_cast<double *>(y.data), pos, M, L, D,
                                                     rows, xs, ys, ps, layout, base);
    FA_CUDA_CHECK_LAUNCH("rotary_kernel");
    return FA_CUDA_OK;
}
