# cython: freethreading_compatible = True
"""Thin bindings to csrc/cuda/fastattn_cuda.h (built only with FASTATTN_CUDA=1).

Device pointers, element strides and stream handles arrive as Python ints
from :mod:`fastattn._backend.cuda`, which has already validated shapes and dtypes.
This module only packs them into the C views, releases the GIL around each
call (the calls queue work and return) and turns status codes into
exceptions carrying the C side's description of the failing call.
"""
from libc.stdint cimport int64_t, uintptr_t


cdef extern from "fastattn_cuda.h" nogil:
    ctypedef enum fa_cuda_status:
        FA_CUDA_OK
        FA_CUDA_ERR_INVALID
        FA_CUDA_ERR_OVERFLOW
        FA_CUDA_ERR_NOMEM
        FA_CUDA_ERR_RUNTIME
        FA_CUDA_ERR_LAUNCH
        FA_CUDA_ERR_CUBLAS
        FA_CUDA_ERR_NO_DEVICE

    ctypedef struct fa_cuda_view4:
        void *data
        int64_t stride[4]

    ctypedef struct fa_cuda_mask_view:
        const void *data
        int kind
        int64_t stride[4]

    ctypedef struct fa_cuda_lengths_view:
        const int64_t *data
        int64_t stride_b, stride_m

    ctypedef struct fa_cuda_sdpa_args:
        int dtype
        int64_t B, H, Hkv, Lq, Lk, D, Dv
        double scale
        int causal
        fa_cuda_mask_view mask
        fa_cuda_lengths_view key_len
        fa_cuda_lengths_view query_len
        const void *alibi_slopes
        int64_t alibi_offset
        const int64_t *key_extent

    ctypedef enum fa_cuda_dtype:
        FA_CUDA_F32
        FA_CUDA_F64
        FA_CUDA_F16
        FA_CUDA_BOOL
        FA_CUDA_I8
        FA_CUDA_U8
        FA_CUDA_I16
        FA_CUDA_U16
        FA_CUDA_I32
        FA_CUDA_U32
        FA_CUDA_I64
        FA_CUDA_U64
    ctypedef enum fa_cuda_causal:
        FA_CUDA_CAUSAL_LENGTHS

    const char *fa_cuda_last_error()
    int fa_cuda_device_count(int *count)
    int fa_cuda_versions(int *runtime_version, int *driver_version)
    int fa_cuda_set_device(int device)
    int fa_cuda_pointer_device(const void *ptr, int *device)
    int fa_cuda_stream_wait(void *consumer, void *producer)
    int fa_cuda_blas_create(void **handle)
    int fa_cuda_blas_destroy(void *handle)
    int fa_cuda_copy(int dst_dtype, int src_dtype, fa_cuda_view4 src, fa_cuda_view4 dst,
                     int64_t n0, int64_t n1, int64_t n2, int64_t n3, void *stream)
    int fa_cuda_append_rows(int dtype, fa_cuda_view4 src, fa_cuda_view4 dst, int64_t B,
                            int64_t M, int64_t L, int64_t C, int64_t dst_len,
                            const int64_t *dst_row, const int64_t *rows, void *stream)
    int fa_cuda_zero_padded_rows(int dtype, void *y, int64_t B, int64_t M, int64_t L,
                                 int64_t C, const fa_cuda_lengths_view *lengths, void *stream)
    int fa_cuda_masked_softmax(int dtype, fa_cuda_view4 x, fa_cuda_view4 y, int64_t B,
                               int64_t M, int64_t Lq, int64_t Lk, double scale,
                               const fa_cuda_mask_view *mask,
                               const fa_cuda_lengths_view *key_len,
                               const fa_cuda_lengths_view *query_len, int causal,
                               void *stream)
    int fa_cuda_position_encoding(int dtype, void *out, int64_t row_stride, int64_t length,
                                  int64_t channels, int layout, double min_timescale,
                                  double max_timescale, int64_t start_index, void *stream)
    int fa_cuda_add_position_encoding(int dtype, fa_cuda_view4 x, fa_cuda_view4 y, int64_t B,
                                      int64_t length, int64_t channels, int layout,
                                      double min_timescale, double max_timescale,
                                      int64_t start_index, void *stream)
    int fa_cuda_apply_rotary(int dtype, fa_cuda_view4 x, fa_cuda_view4 y, int64_t B,
                             int64_t M, int64_t L, int64_t D, fa_cuda_view4 positions,
                             int layout, double base, void *stream)
    int fa_cuda_linear(void *blas, int dtype, const void *x, int64_t x_row_stride,
                       const void *w, int64_t w_row_stride, const void *bias, void *y,
                       int64_t y_row_stride, int64_t rows, int64_t n_in, int64_t n_out,
                       void *stream)
    int fa_cuda_sdpa(void *blas, const fa_cuda_sdpa_args *args, const void *q, const void *k,
                     const void *v, void *out, void *scores, int64_t scores_batch,
                     void *stream)


# Element type codes by NumPy dtype name, and the causal mode only the CUDA
# kernels have (bottom-right per row, aligned to the lengths: a ragged KV
# cache); both compiled from csrc/cuda/fastattn_cuda.h, whose shared values
# come from csrc/fastattn.h.
DTYPE_CODES = {
    "float32": FA_CUDA_F32, "float64": FA_CUDA_F64, "float16": FA_CUDA_F16,
    "bool": FA_CUDA_BOOL, "int8": FA_CUDA_I8, "uint8": FA_CUDA_U8,
    "int16": FA_CUDA_I16, "uint16": FA_CUDA_U16, "int32": FA_CUDA_I32,
    "uint32": FA_CUDA_U32, "int64": FA_CUDA_I64, "uint64": FA_CUDA_U64,
}
CAUSAL_LENGTHS = FA_CUDA_CAUSAL_LENGTHS


class CudaError(RuntimeError):
    """A CUDA runtime, driver or cuBLAS call failed; the message says which."""


cdef int check(int status, str what) except -1:
    if status == FA_CUDA_OK:
        return 0
    detail = fa_cuda_last_error().decode("utf-8", "replace")
    if status == FA_CUDA_ERR_NOMEM:
        raise MemoryError(f"fastattn.cuda: {what}: out of GPU memory: {detail}")
    if status == FA_CUDA_ERR_INVALID or status == FA_CUDA_ERR_OVERFLOW:
        raise ValueError(f"fastattn.cuda: {what}: {detail}")
    raise CudaError(f"fastattn.cuda: {what}: {detail}")


cdef inline void *ptr(object p) except? NULL:
    """A pointer passed as a Python int; None means NULL."""
    if p is None:
        return NULL
    return <void *><uintptr_t>p


cdef fa_cuda_view4 view4(object data, tuple strides) except *:
    """A device pointer and up to 4 element strides (missing ones are 0)."""
    cdef fa_cuda_view4 v
    cdef int i
    v.data = ptr(data)
    for i in range(4):
        v.stride[i] = strides[i] if i < len(strides) else 0
    return v


cdef fa_cuda_lengths_view lengths2(object data, tuple strides) except *:
    cdef fa_cuda_lengths_view v
    v.data = <const int64_t *>ptr(data)
    v.stride_b = strides[0] if data else 0
    v.stride_m = strides[1] if data else 0
    return v


cdef fa_cuda_mask_view mask4(object data, int kind, tuple strides) except *:
    cdef fa_cuda_mask_view v
    cdef int i
    v.data = ptr(data)
    v.kind = kind if data else 0
    for i in range(4):
        v.stride[i] = strides[i] if data else 0
    return v


# ---- runtime -----------------------------------------------------------------

def device_count():
    cdef int n = 0
    cdef int status
    with nogil:
        status = fa_cuda_device_count(&n)
    check(status, "cudaGetDeviceCount")
    return n


def versions():
    """(runtime version compiled against, installed driver version); 0 = none."""
    cdef int rt = 0, drv = 0
    check(fa_cuda_versions(&rt, &drv), "version query")
    return rt, drv


def set_device(int device):
    cdef int status
    with nogil:
        status = fa_cuda_set_device(device)
    check(status, "cudaSetDevice")


def pointer_device(object p):
    cdef int dev = -1
    cdef void *raw = ptr(p)
    cdef int status
    with nogil:
        status = fa_cuda_pointer_device(raw, &dev)
    check(status, "pointer query")
    return dev


def stream_wait(object consumer, object producer):
    cdef void *c = ptr(consumer)
    cdef void *pr = ptr(producer)
    cdef int status
    with nogil:
        status = fa_cuda_stream_wait(c, pr)
    check(status, "stream synchronisation")


cdef class BlasHandle:
    """A cuBLAS handle for the device current at creation."""
    cdef void *handle

    def __cinit__(self):
        self.handle = NULL
        cdef int status
        with nogil:
            status = fa_cuda_blas_create(&self.handle)
        check(status, "cublasCreate")

    def __dealloc__(self):
        if self.handle != NULL:
            # at interpreter exit the context may be gone: nothing to report
            fa_cuda_blas_destroy(self.handle)
            self.handle = NULL

    @property
    def ptr(self):
        return <uintptr_t>self.handle


cdef inline void *blas_ptr(BlasHandle h):
    return h.handle


# ---- kernels -------------------------------------------------------------------

def copy(int dst_dtype, int src_dtype, object src, tuple src_strides, object dst,
         tuple dst_strides, tuple shape, object stream):
    cdef fa_cuda_view4 s = view4(src, src_strides)
    cdef fa_cuda_view4 d = view4(dst, dst_strides)
    cdef int64_t n0 = shape[0], n1 = shape[1], n2 = shape[2], n3 = shape[3]
    cdef void *st = ptr(stream)
    cdef int status
    with nogil:
        status = fa_cuda_copy(dst_dtype, src_dtype, s, d, n0, n1, n2, n3, st)
    check(status, "copy kernel")


def append_rows(int dtype, object src, tuple src_strides, object dst, tuple dst_strides,
                tuple shape, int64_t dst_len, object dst_row, object rows, object stream):
    """shape = (B, M, L, C) of src; dst is (B, M, dst_len, C); dst_row and
    rows are device int64 (B,)."""
    cdef fa_cuda_view4 s = view4(src, src_strides)
    cdef fa_cuda_view4 d = view4(dst, dst_strides)
    cdef int64_t B = shape[0], M = shape[1], L = shape[2], C = shape[3]
    cdef const int64_t *dr = <const int64_t *>ptr(dst_row)
    cdef const int64_t *nr = <const int64_t *>ptr(rows)
    cdef void *st = ptr(stream)
    cdef int status
    with nogil:
        status = fa_cuda_append_rows(dtype, s, d, B, M, L, C, dst_len, dr, nr, st)
    check(status, "append_rows kernel")


def zero_padded_rows(int dtype, object y, tuple shape, object lengths, tuple len_strides,
                     object stream):
    cdef fa_cuda_lengths_view lv = lengths2(lengths, len_strides)
    cdef void *yp = ptr(y)
    cdef int64_t B = shape[0], M = shape[1], L = shape[2], C = shape[3]
    cdef void *st = ptr(stream)
    cdef int status
    with nogil:
        status = fa_cuda_zero_padded_rows(dtype, yp, B, M, L, C, &lv, st)
    check(status, "zero_padded_rows kernel")


def masked_softmax(int dtype, object x, tuple x_strides, object y, tuple y_strides,
                   tuple shape, double scale, object mask, int mask_kind, tuple mask_strides,
                   object key_len, tuple key_len_strides, object query_len,
                   tuple query_len_strides, int causal, object stream):
    cdef fa_cuda_view4 xv = view4(x, x_strides)
    cdef fa_cuda_view4 yv = view4(y, y_strides)
    cdef fa_cuda_mask_view mv = mask4(mask, mask_kind, mask_strides)
    cdef fa_cuda_lengths_view kl = lengths2(key_len, key_len_strides)
    cdef fa_cuda_lengths_view ql = lengths2(query_len, query_len_strides)
    cdef int64_t B = shape[0], M = shape[1], Lq = shape[2], Lk = shape[3]
    cdef void *st = ptr(stream)
    cdef int status
    with nogil:
        status = fa_cuda_masked_softmax(dtype, xv, yv, B, M, Lq, Lk, scale, &mv, &kl, &ql,
                                        causal, st)
    check(status, "masked_softmax kernel")


def position_encoding(int dtype, object out, int64_t row_stride, int64_t length,
                      int64_t channels, int layout, double min_timescale,
                      double max_timescale, int64_t start_index, object stream):
    cdef void *o = ptr(out)
    cdef void *st = ptr(stream)
    cdef int status
    with nogil:
        status = fa_cuda_position_encoding(dtype, o, row_stride, length, channels, layout,
                                           min_timescale, max_timescale, start_index, st)
    check(status, "position_encoding kernel")


def add_position_encoding(int dtype, object x, tuple x_strides, object y, tuple y_strides,
                          tuple shape, int layout, double min_timescale,
                          double max_timescale, int64_t start_index, object stream):
    cdef fa_cuda_view4 xv = view4(x, x_strides)
    cdef fa_cuda_view4 yv = view4(y, y_strides)
    cdef int64_t B = shape[0], L = shape[1], C = shape[2]
    cdef void *st = ptr(stream)
    cdef int status
    with nogil:
        status = fa_cuda_add_position_encoding(dtype, xv, yv, B, L, C, layout, min_timescale,
                                               max_timescale, start_index, st)
    check(status, "add_position_encoding kernel")


def apply_rotary(int dtype, object x, tuple x_strides, object y, tuple y_strides,
                 tuple shape, object positions, tuple positions_strides, int layout,
                 double base, object stream):
    cdef fa_cuda_view4 xv = view4(x, x_strides)
    cdef fa_cuda_view4 yv = view4(y, y_strides)
    cdef fa_cuda_view4 pv = view4(positions, positions_strides)
    cdef int64_t B = shape[0], M = shape[1], L = shape[2], D = shape[3]
    cdef void *st = ptr(stream)
    cdef int status
    with nogil:
        status = fa_cuda_apply_rotary(dtype, xv, yv, B, M, L, D, pv, layout, base, st)
    check(status, "apply_rotary kernel")


def linear(BlasHandle handle, int dtype, object x, int64_t x_row_stride, object w,
           int64_t w_row_stride, object bias, object y, int64_t y_row_stride, int64_t rows,
           int64_t n_in, int64_t n_out, object stream):
    cdef void *h = blas_ptr(handle)
    cdef const void *xp = ptr(x)
    cdef const void *wp = ptr(w)
    cdef const void *bp = ptr(bias)
    cdef void *yp = ptr(y)
    cdef void *st = ptr(stream)
    cdef int status
    with nogil:
        status = fa_cuda_linear(h, dtype, xp, x_row_stride, wp, w_row_stride, bp, yp,
                                y_row_stride, rows, n_in, n_out, st)
    check(status, "linear (cuBLAS GEMM)")


def sdpa(BlasHandle handle, object q, object k, object v, object out, *, int dtype, tuple shape,
         double scale, int causal, object mask=None, int mask_kind=0, tuple mask_strides=(),
         object key_len=None, tuple key_len_strides=(), object query_len=None,
         tuple query_len_strides=(), object alibi_slopes=None, int64_t alibi_offset=0,
         const int64_t[::1] key_extent=None, object scores, int64_t scores_batch, object stream):
    """fa_cuda_sdpa_args as keyword-only arguments named after its fields
    (shape = (B, H, Hkv, Lq, Lk, D, Dv)); device pointers as ints, with the
    element strides of each view; key_extent: host int64 (B,) or None."""
    cdef fa_cuda_sdpa_args a
    a.dtype = dtype
    a.B, a.H, a.Hkv, a.Lq, a.Lk, a.D, a.Dv = shape
    a.scale = scale
    a.causal = causal
    a.mask = mask4(mask, mask_kind, mask_strides)
    a.key_len = lengths2(key_len, key_len_strides)
    a.query_len = lengths2(query_len, query_len_strides)
    a.alibi_slopes = ptr(alibi_slopes)
    a.alibi_offset = alibi_offset
    a.key_extent = NULL
    if key_extent is not None:
        if key_extent.shape[0] != a.B:
            raise ValueError("fastattn.cuda: key_extent must have one entry per batch item")
        if a.B > 0:
            a.key_extent = &key_extent[0]
    cdef void *h = blas_ptr(handle)
    cdef const void *qp = ptr(q)
    cdef const void *kp = ptr(k)
    cdef const void *vp = ptr(v)
    cdef void *op = ptr(out)
    cdef void *sp = ptr(scores)
    cdef void *st = ptr(stream)
    cdef int status
    with nogil:
        status = fa_cuda_sdpa(h, &a, qp, kp, vp, op, sp, scores_batch, st)
    check(status, "scaled_dot_product_attention")
