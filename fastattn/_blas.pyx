# cython: freethreading_compatible = True
"""Row-major GEMMs for the attention layer's projections, through
scipy.linalg.cython_blas (sgemm / dgemm / sgemv / dgemv), called without
the GIL. Nothing is linked by hand and no BLAS is written here.

BLAS is column-major. A row-major (M, N) matrix with row stride ld is the
column-major (N, M) matrix with leading dimension ld, so the row-major
product C = A @ W is the column-major product Cᵀ = Wᵀ Aᵀ: sgemm is called
with the operands swapped (W first) and m = N, n = M.

Leading dimensions are the arrays' row strides, which is how the layer
writes Q, K and V straight into column blocks of a fused buffer, or rows of
a KV cache, with no copy pass.

A bias is added by filling each output row with it and calling BLAS with
beta = 1: BLAS would otherwise zero C first (beta = 0), so the bias costs
nothing extra.

The caller (fastattn/mha.py) has validated shapes and dtypes; the checks
here only guard memory safety (ranks, unit last strides, leading dimensions,
32-bit BLAS sizes).
"""
cimport numpy as cnp
from libc.stdint cimport int64_t
from libc.string cimport memcpy, memset

from scipy.linalg.cython_blas cimport dgemm, dgemv, sgemm, sgemv

cnp.import_array()

# A product with at most this many rows per weight goes through GEMV, one
# row at a time: GEMM packs the whole weight matrix into its panel layout
# first, which for a handful of rows (decode) costs more than the product.
cdef enum:
    GEMV_MAX_ROWS = 2
    BLAS_INT_MAX = 2147483647


cdef int _check_2d(cnp.ndarray a, str name, int64_t rows, int64_t cols) except -1:
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got {a.ndim}-D")
    if a.shape[0] != rows or a.shape[1] != cols:
        raise ValueError(f"{name} has shape {(a.shape[0], a.shape[1])}, expected {(rows, cols)}")
    return 0


cdef inline int64_t _row_stride(cnp.ndarray a, int axis, int64_t cols) except -2:
    """Row stride in elements for the BLAS leading dimension; a single row or
    an empty matrix may have any stride, BLAS still needs ld >= cols."""
    cdef int64_t item = cnp.PyArray_ITEMSIZE(a)
    cdef int64_t s = cnp.PyArray_STRIDES(a)[axis]
    if s % item:
        raise ValueError("fastattn._blas: misaligned stride")
    s //= item
    if a.shape[axis] <= 1 or s < cols:
        if a.shape[axis] > 1 and cols > 0:
            raise ValueError("fastattn._blas: rows overlap (row stride < columns)")
        s = cols if cols > 0 else 1
    return s


cdef inline int _unit_last(cnp.ndarray a, str name) except -1:
    if cnp.PyArray_SIZE(a) == 0:
        return 0
    if a.shape[a.ndim - 1] > 1 and cnp.PyArray_STRIDES(a)[a.ndim - 1] != cnp.PyArray_ITEMSIZE(a):
        raise ValueError(f"fastattn._blas: {name} needs a unit last-axis stride")
    return 0


cdef inline int _blas_int(int64_t v) except -1:
    if v < 0 or v > BLAS_INT_MAX:
        raise ValueError("fastattn._blas: a matrix dimension exceeds the 32-bit BLAS range")
    return 0


cdef void _product(int dbl, char *a, int64_t lda, char *w, int64_t ldw, char *c, int64_t ldc,
                   int64_t M, int64_t N, int64_t K, const char *bias, double alpha) noexcept nogil:
    """c[M, N] = alpha * a[M, K] @ w[K, N] (+ bias), all row-major."""
    cdef int64_t item = 8 if dbl else 4
    cdef int64_t i
    cdef int m_, n_, k_, lda_, ldw_, ldc_, one = 1
    cdef float fa = <float>alpha, fb
    cdef double da = alpha, db
    cdef char tn = b'N'
    if M <= 0 or N <= 0:
        return
    for i in range(M):
        if bias != NULL:
            memcpy(c + i * ldc * item, bias, <size_t>(N * item))
        elif K == 0:
            memset(c + i * ldc * item, 0, <size_t>(N * item))
    if K == 0:
        return
    fb = 1.0 if bias != NULL else 0.0
    db = 1.0 if bias != NULL else 0.0
    n_ = <int>N
    k_ = <int>K
    ldw_ = <int>ldw
    if M <= GEMV_MAX_ROWS:
        # y (N) = Wᵀ x: W row-major (K, N) is column-major (N, K), lda = ldw
        for i in range(M):
            if dbl:
                dgemv(&tn, &n_, &k_, &da, <double *>w, &ldw_, <double *>(a + i * lda * item), &one,
                      &db, <double *>(c + i * ldc * item), &one)
            else:
                sgemv(&tn, &n_, &k_, &fa, <float *>w, &ldw_, <float *>(a + i * lda * item), &one,
                      &fb, <float *>(c + i * ldc * item), &one)
        return
    m_ = <int>M
    lda_ = <int>lda
    ldc_ = <int>ldc
    if dbl:
        dgemm(&tn, &tn, &n_, &m_, &k_, &da, <double *>w, &ldw_, <double *>a, &lda_, &db,
              <double *>c, &ldc_)
    else:
        sgemm(&tn, &tn, &n_, &m_, &k_, &fa, <float *>w, &ldw_, <float *>a, &lda_, &fb,
              <float *>c, &ldc_)


def matmul(cnp.ndarray a, cnp.ndarray w, cnp.ndarray c, object bias=None, object rows=None,
           double alpha=1.0):
    """``c[b, r0:r1] = alpha * a[b, r0:r1] @ w (+ bias)`` for every b, with
    ``(r0, r1) = rows[b]``.

    a (B, M, K), w (K, N), c (B, M, N): one dtype (float32 or float64), unit
    last-axis strides, any row and batch strides (column blocks of a wider
    buffer are fine). bias: None or a contiguous (N,) array. rows: None (all
    M rows) or a contiguous (B, 2) int64 array of [start, stop) row ranges
    within [0, M]; other rows are left untouched. Without rows, when the
    batches are evenly spaced in a and c, one BLAS call covers them all.
    """
    cdef int dbl
    cdef int64_t B, M, K, N, lda, ldw, ldc, sab, scb, item, b, r0, r1
    cdef const int64_t *rp = NULL
    cdef const char *bp = NULL
    cdef char *ap
    cdef char *wp
    cdef char *cp
    cdef cnp.ndarray rows_a, bias_a
    if a.ndim != 3 or c.ndim != 3:
        raise ValueError("fastattn._blas.matmul: a and c must be 3-D")
    if cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT64:
        dbl = 1
    elif cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32:
        dbl = 0
    else:
        raise TypeError(f"fastattn._blas.matmul: dtype must be float32 or float64, got {a.dtype}")
    if cnp.PyArray_TYPE(w) != cnp.PyArray_TYPE(a) or cnp.PyArray_TYPE(c) != cnp.PyArray_TYPE(a):
        raise TypeError("fastattn._blas.matmul: a, w and c must share one dtype")
    if not cnp.PyArray_ISWRITEABLE(c):
        raise ValueError("fastattn._blas.matmul: c is read-only")
    B, M, K = a.shape[0], a.shape[1], a.shape[2]
    N = w.shape[1] if w.ndim == 2 else -1
    _check_2d(w, "w", K, N)
    if c.shape[0] != B or c.shape[1] != M or c.shape[2] != N:
        raise ValueError("fastattn._blas.matmul: c must have shape (B, M, N)")
    if B == 0 or M == 0 or N == 0:
        return
    _unit_last(a, "a")
    _unit_last(w, "w")
    _unit_last(c, "c")
    item = cnp.PyArray_ITEMSIZE(a)
    lda = _row_stride(a, 1, K)
    ldw = _row_stride(w, 0, N)
    ldc = _row_stride(c, 1, N)
    sab = cnp.PyArray_STRIDES(a)[0] // item
    scb = cnp.PyArray_STRIDES(c)[0] // item
    for v in (M, N, K, lda, ldw, ldc):
        _blas_int(v)
    if bias is not None:
        bias_a = <cnp.ndarray>bias
        if (bias_a.ndim != 1 or bias_a.shape[0] != N or cnp.PyArray_TYPE(bias_a) != cnp.PyArray_TYPE(a)
                or not cnp.PyArray_IS_C_CONTIGUOUS(bias_a)):
            raise ValueError("fastattn._blas.matmul: bias must be a contiguous (N,) array of the dtype")
        bp = <const char *>cnp.PyArray_DATA(bias_a)
    if rows is not None:
        rows_a = <cnp.ndarray>rows
        if (rows_a.ndim != 2 or rows_a.shape[0] != B or rows_a.shape[1] != 2
                or cnp.PyArray_TYPE(rows_a) != cnp.NPY_INT64 or not cnp.PyArray_IS_C_CONTIGUOUS(rows_a)):
            raise ValueError("fastattn._blas.matmul: rows must be a contiguous (B, 2) int64 array")
        rp = <const int64_t *>cnp.PyArray_DATA(rows_a)
        for b in range(B):
            if rp[2 * b] < 0 or rp[2 * b + 1] > M:
                raise ValueError("fastattn._blas.matmul: rows out of range")
    ap = <char *>cnp.PyArray_DATA(a)
    wp = <char *>cnp.PyArray_DATA(w)
    cp = <char *>cnp.PyArray_DATA(c)
    with nogil:
        if rp == NULL and B > 1 and sab == M * lda and scb == M * ldc and B * M <= BLAS_INT_MAX:
            _product(dbl, ap, lda, wp, ldw, cp, ldc, B * M, N, K, bp, alpha)
        else:
            for b in range(B):
                r0 = 0 if rp == NULL else rp[2 * b]
                r1 = M if rp == NULL else rp[2 * b + 1]
                if r1 > r0:
                    _product(dbl, ap + (b * sab + r0 * lda) * item, lda, wp, ldw,
                             cp + (b * scb + r0 * ldc) * item, ldc, r1 - r0, N, K, bp, alpha)
