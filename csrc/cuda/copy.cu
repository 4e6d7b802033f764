/*
 * copy.cu: data movement kernels.
 *
 *   strided_convert_kernel  any 4-D strided view -> any 4-D strided view,
 *                           converting the element type. split_heads and
 *                           merge_heads are this copy with permuted source
 *                           strides; it also makes inputs contiguous,
 *                           promotes float16/int inputs to float32/float64 and
 *                           copies results into a strided `out=`.
 *   append_rows_kernel      KV-cache append: each batch item's rows go to
 *                           its own row offset of the cache.
 *   zero_rows_kernel        zeroes the rows of padded queries.
 *
 * All are bandwidth-bound. The innermost dimension is spread over the 32
 * lanes of a warp so that the reads of a contiguous innermost axis (the head
 * dimension in split/merge) and the writes are coalesced.
 */
#include <cuda_fp16.h>

#include "cuda_internal.h"

/* A warp spans the innermost axis (coalescing); 8 warps per block process 8
 * rows at once, which gives 256-thread blocks, enough resident warps per SM
 * to hide memory latency on sm_80/sm_90. */
#define COPY_LANES 32
#define COPY_ROWS_PER_BLOCK 8

namespace {

struct Strides4 {
    int64_t s[4];
};

/* One byte of a bool array: nonzero is true (NumPy and torch store 0/1). */
struct BoolByte {
    unsigned char value;
};

template <typename Dst, typename Src>
__device__ __forceinline__ Dst convert_value(Src v) {
    return static_cast<Dst>(v);
}
template <>
__device__ __forceinline__ float convert_value<float, __half>(__half v) {
    return __half2float(v);
}
template <>
__device__ __forceinline__ double convert_value<double, __half>(__half v) {
    return static_cast<double>(__half2float(v)); /* exact: half fits in float */
}
template <>
__device__ __forceinline__ float convert_value<float, BoolByte>(BoolByte v) {
    return v.value ? 1.0f : 0.0f;
}
template <>
__device__ __forceinline__ double convert_value<double, BoolByte>(BoolByte v) {
    return v.value ? 1.0 : 0.0;
}

/* Row r of a flattened (n0, n1, n2) index as its (i0, i1, i2). */
struct RowIndex {
    int64_t i0, i1, i2;
};
__device__ __forceinline__ RowIndex split_row(int64_t r, int64_t n1, int64_t n2) {
    const int64_t i01 = r / n2;
    return {i01 / n1, i01 % n1, r % n2};
}

/* src, dst: (n0, n1, n2, n3) views with strides sv, dv (elements).
 * Row r of the flattened (n0, n1, n2) index is handled by one warp, whose
 * lanes stride over n3. */
template <typename Src, typename Dst>
__global__ void __launch_bounds__(COPY_LANES * COPY_ROWS_PER_BLOCK)
strided_convert_kernel(const Src *src, Dst *dst, int64_t n1, int64_t n2, int64_t n3,
                       int64_t rows, Strides4 sv, Strides4 dv) {
    const int64_t row_step = (int64_t)gridDim.x * COPY_ROWS_PER_BLOCK;
    for (int64_t r = (int64_t)blockIdx.x * COPY_ROWS_PER_BLOCK + threadIdx.y; r < rows;
         r += row_step) {
        const RowIndex x = split_row(r, n1, n2);
        const Src *s = src + x.i0 * sv.s[0] + x.i1 * sv.s[1] + x.i2 * sv.s[2];
        Dst *d = dst + x.i0 * dv.s[0] + x.i1 * dv.s[1] + x.i2 * dv.s[2];
        for (int64_t i3 = threadIdx.x; i3 < n3; i3 += COPY_LANES)
            d[i3 * dv.s[3]] = convert_value<Dst>(s[i3 * sv.s[3]]);
    }
}

/* src: (B, M, L, C) view, dst: (B, M, dst_len, C) view, strides sv, dv;
 * dst_row, rows: device int64 (B,). Row (b, m, i) is handled by one warp:
 * for i < rows[b] it goes to dst row dst_row[b] + i when that lies in
 * [0, dst_len). T is an element-sized bit pattern (a same-type copy). */
template <typename T>
__global__ void __launch_bounds__(COPY_LANES * COPY_ROWS_PER_BLOCK)
append_rows_kernel(const T *src, T *dst, int64_t M, int64_t L, int64_t C, int64_t dst_len,
                   int64_t src_rows, Strides4 sv, Strides4 dv, const int64_t *dst_row,
                   const int64_t *rows) {
    const int64_t row_step = (int64_t)gridDim.x * COPY_ROWS_PER_BLOCK;
    for (int64_t r = (int64_t)blockIdx.x * COPY_ROWS_PER_BLOCK + threadIdx.y; r < src_rows;
         r += row_step) {
        const RowIndex x = split_row(r, M, L); /* (b, m, i) */
        if (x.i2 >= rows[x.i0]) continue;       /* a padded query of this call */
        const int64_t to = dst_row[x.i0] + x.i2;
        if (to < 0 || to >= dst_len) continue;
        const T *s = src + x.i0 * sv.s[0] + x.i1 * sv.s[1] + x.i2 * sv.s[2];
        T *d = dst + x.i0 * dv.s[0] + x.i1 * dv.s[1] + to * dv.s[2];
        for (int64_t c = threadIdx.x; c < C; c += COPY_LANES) d[c * dv.s[3]] = s[c * sv.s[3]];
    }
}

/* y: contiguous (B, M, L, C); rows l >= len(b, m) become +0. */
template <typename T>
__global__ void __launch_bounds__(COPY_LANES * COPY_ROWS_PER_BLOCK)
zero_rows_kernel(T *y, int64_t M, int64_t L, int64_t C, int64_t rows,
                 const int64_t *lengths, int64_t len_stride_b, int64_t len_stride_m) {
    const int64_t row_step = (int64_t)gridDim.x * COPY_ROWS_PER_BLOCK;
    for (int64_t r = (int64_t)blockIdx.x * COPY_ROWS_PER_BLOCK + threadIdx.y; r < rows;
         r += row_step) {
        const RowIndex x = split_row(r, M, L); /* (b, m, l) */
        if (x.i2 < lengths[x.i0 * len_stride_b + x.i1 * len_stride_m]) continue;
        T *row = y + r * C;
        for (int64_t c = threadIdx.x; c < C; c += COPY_LANES) row[c] = T(0);
    }
}

template <typename Src, typename Dst>
int launch_copy(const fa_cuda_view4 &src, const fa_cuda_view4 &dst, const int64_t *n,
                int64_t rows, cudaStream_t stream) {
    Strides4 sv, dv;
    for (int i = 0; i < 4; ++i) {
        sv.s[i] = src.stride[i];
        dv.s[i] = dst.stride[i];
    }
    const dim3 block(COPY_LANES, COPY_ROWS_PER_BLOCK);
    strided_convert_kernel<Src, Dst><<<fa_cuda_grid(rows, COPY_ROWS_PER_BLOCK), block, 0, stream>>>(
        static_cast<const Src *>(src.data), static_cast<Dst *>(dst.data), n[1], n[2], n[3],
        rows, sv, dv);
    FA_CUDA_CHECK_LAUNCH("strided_convert_kernel");
    return FA_CUDA_OK;
}

template <typename Dst>
int launch_convert_to(int src_dtype, const fa_cuda_view4 &src, const fa_cuda_view4 &dst,
                      const int64_t *n, int64_t rows, cudaStream_t stream) {
    switch (src_dtype) {
        case FA_CUDA_F32: return launch_copy<float, Dst>(src, dst, n, rows, stream);
        case FA_CUDA_F64: return launch_copy<double, Dst>(src, dst, n, rows, stream);
        case FA_CUDA_F16: return launch_copy<__half, Dst>(src, dst, n, rows, stream);
        case FA_CUDA_BOOL: return launch_copy<BoolByte, Dst>(src, dst, n, rows, stream);
        case FA_CUDA_I8: return launch_copy<int8_t, Dst>(src, dst, n, rows, stream);
        case FA_CUDA_U8: return launch_copy<uint8_t, Dst>(src, dst, n, rows, stream);
        case FA_CUDA_I16: return launch_copy<int16_t, Dst>(src, dst, n, rows, stream);
        case FA_CUDA_U16: return launch_copy<uint16_t, Dst>(src, dst, n, rows, stream);
        case FA_CUDA_I32: return launch_copy<int32_t, Dst>(src, dst, n, rows, stream);
        case FA_CUDA_U32: return launch_copy<uint32_t, Dst>(src, dst, n, rows, stream);
        case FA_CUDA_I64: return launch_copy<int64_t, Dst>(src, dst, n, rows, stream);
        case FA_CUDA_U64: return launch_copy<uint64_t, Dst>(src, dst, n, rows, stream);
        default: return fa_cuda_fail(FA_CUDA_ERR_INVALID, "fa_cuda_copy: unknown source dtype %d", src_dtype);
    }
}

/* A same-type copy moves bits, so one instantiation per element size serves
 * every dtype. */
int launch_same_type_copy(int64_t elem_size, const fa_cuda_view4 &src, const fa_cuda_view4 &dst,
                          const int64_t *n, int64_t rows, cudaStream_t stream) {
    switch (elem_size) {
        case 1: return launch_copy<uint8_t, uint8_t>(src, dst, n, rows, stream);
        case 2: return launch_copy<uint16_t, uint16_t>(src, dst, n, rows, stream);
        case 4: return launch_copy<uint32_t, uint32_t>(src, dst, n, rows, stream);
        case 8: return launch_copy<uint64_t, uint64_t>(src, dst, n, rows, stream);
        default: return fa_cuda_fail(FA_CUDA_ERR_INVALID, "fa_cuda_copy: element size %lld", (long long)elem_size);
    }
}

}  // namespace

extern "C" int fa_cuda_copy(int dst_dtype, int src_dtype, fa_cuda_view4 src, fa_cuda_view4 dst,
                            int64_t n0, int64_t n1, int64_t n2, int64_t n3, void *stream) {
    fa_cuda_clear_stale_error();
    const int64_t n[4] = {n0, n1, n2, n3};
    const int64_t src_size = fa_cuda_dtype_size(src_dtype);
    const int64_t dst_size = fa_cuda_dtype_size(dst_dtype);
    if (src_size == 0 || dst_size == 0)
        return fa_cuda_fail(FA_CUDA_ERR_INVALID, "fa_cuda_copy: unknown dtype (dst %d, src %d)", dst_dtype, src_dtype);
    if (dst_dtype != src_dtype && dst_dtype != FA_CUDA_F32 && dst_dtype != FA_CUDA_F64)
        return fa_cuda_fail(FA_CUDA_ERR_INVALID, "fa_cuda_copy: can only convert to float32/float64, not dtype %d", dst_dtype);
    const int64_t total = fa_cuda_product(n, 4);
    if (total < 0) return fa_cuda_fail(FA_CUDA_ERR_OVERFLOW, "fa_cuda_copy: size overflows or is negative");
    if (total == 0) return FA_CUDA_OK;
    if (src.data == NULL || dst.data == NULL) return fa_cuda_fail(FA_CUDA_ERR_INVALID, "fa_cuda_copy: NULL data");
    if (!fa_cuda_view_ok(n, src.stride, 4, src_size) || !fa_cuda_view_ok(n, dst.stride, 4, dst_size))
        return fa_cuda_fail(FA_CUDA_ERR_OVERFLOW, "fa_cuda_copy: strides overflow the address range");
    const int64_t rows = n0 * n1 * n2;
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (dst_dtype == src_dtype) return launch_same_type_copy(src_size, src, dst, n, rows, s);
    if (dst_dtype == FA_CUDA_F32) return launch_convert_to<float>(src_dtype, src, dst, n, rows, s);
    return launch_convert_to<double>(src_dtype, src, dst, n, rows, s);
}

extern "C" int fa_cuda_append_rows(int dtype, fa_cuda_view4 src, fa_cuda_view4 dst, int64_t B,
                                   int64_t M, int64_t L, int64_t C, int64_t dst_len,
                                   const int64_t *dst_row, const int64_t *rows, void *stream) {
    fa_cuda_clear_stale_error();
    if (dtype != FA_CUDA_F32 && dtype != FA_CUDA_F64)
        return fa_cuda_fail(FA_CUDA_ERR_INVALID, "fa_cuda_append_rows: dtype %d is not float32/float64", dtype);
    const int64_t sdims[4] = {B, M, L, C};
    const int64_t ddims[4] = {B, M, dst_len, C};
    const int64_t s_total = fa_cuda_product(sdims, 4);
    const int64_t d_total = fa_cuda_product(ddims, 4);
    if (s_total < 0 || d_total < 0)
        return fa_cuda_fail(FA_CUDA_ERR_OVERFLOW, "fa_cuda_append_rows: size overflows or is negative");
    if (s_total == 0 || d_total == 0) return FA_CUDA_OK; /* nothing to move, or nowhere to put it */
    if (src.data == NULL || dst.data == NULL || dst_row == NULL || rows == NULL)
        return fa_cuda_fail(FA_CUDA_ERR_INVALID, "fa_cuda_append_rows: NULL src, dst, dst_row or rows");
    const int64_t es = fa_cuda_dtype_size(dtype);
    if (!fa_cuda_view_ok(sdims, src.stride, 4, es) || !fa_cuda_view_ok(ddims, dst.stride, 4, es))
        return fa_cuda_fail(FA_CUDA_ERR_OVERFLOW, "fa_cuda_append_rows: strides overflow the address range");
    Strides4 sv, dv;
    for (int d = 0; d < 4; ++d) {
        sv.s[d] = src.stride[d];
        dv.s[d] = dst.stride[d];
    }
    const int64_t src_rows = B * M * L;
    const dim3 block(COPY_LANES, COPY_ROWS_PER_BLOCK);
    const unsigned int grid = fa_cuda_grid(src_rows, COPY_ROWS_PER_BLOCK);
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (es == 4)
        append_rows_kernel<uint32_t><<<grid, block, 0, s>>>(
            static_cast<const uint32_t *>(src.data), static_cast<uint32_t *>(dst.data), M, L, C,
            dst_len, src_rows, sv, dv, dst_row, rows);
    else
        append_rows_kernel<uint64_t><<<grid, block, 0, s>>>(
            static_cast<const uint64_t *>(src.data), static_cast<uint64_t *>(dst.data), M, L, C,
            dst_len, src_rows, sv, dv, dst_row, rows);
    FA_CUDA_CHECK_LAUNCH("append_rows_kernel");
    return FA_CUDA_OK;
}

extern "C" int fa_cuda_zero_padded_rows(int dtype, void *y, int64_t B, int64_t M, int64_t L,
                                        int64_t C, const fa_cuda_lengths_view *lengths,
                                        void *stream) {
    fa_cuda_clear_stale_error();
    if (dtype != FA_CUDA_F32 && dtype != FA_CUDA_F64)
        return fa_cuda_fail(FA_CUDA_ERR_INVALID, "fa_cuda_zero_padded_rows: dtype %d is not float32/float64", dtype);
    const int64_t dims[4] = {B, M, L, C};
    const int64_t total = fa_cuda_product(dims, 4);
    int64_t bytes;
    if (total < 0 || !fa_cuda_mul_ok(total, fa_cuda_dtype_size(dtype), &bytes))
        return fa_cuda_fail(FA_CUDA_ERR_OVERFLOW, "fa_cuda_zero_padded_rows: size overflows or is negative");
    if (total == 0 || lengths == NULL || lengths->data == NULL) return FA_CUDA_OK;
    if (y == NULL) return fa_cuda_fail(FA_CUDA_ERR_INVALID, "fa_cuda_zero_padded_rows: y is NULL");
    const int64_t rows = B * M * L;
    const dim3 block(COPY_LANES, COPY_ROWS_PER_BLOCK);
    const unsigned int grid = fa_cuda_grid(rows, COPY_ROWS_PER_BLOCK);
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (dtype == FA_CUDA_F32)
        zero_rows_kernel<float><<<grid, block, 0, s>>>(static_cast<float *>(y), M, L, C, rows,
                                                       lengths->data, lengths->stride_b, lengths->stride_m);
    else
        zero_rows_kernel<double><<<grid, block, 0, s>>>(static_cast<double *>(y), M, L, C, rows,
                                                        lengths->data, lengths->stride_b, lengths->stride_m);
    FA_CUDA_CHECK_LAUNCH("zero_rows_kernel");
    return FA_CUDA_OK;
}
