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

Threads: with num_threads > 1 the output columns are split into one block
per OpenMP thread (BLAS must then be single-threaded: fastattn.mha pins it)
and an optional RoPE epilogue rotates the Q/K heads of each block on the
thread that computed it, right after its GEMM, while the block is still in
that core's caches (fa_rope_apply from the _kernels extension, reached
through a PyCapsule, run single-threaded).

The caller (fastattn/mha.py) has validated shapes and dtypes; the checks
here only guard memory safety (ranks, unit last strides, leading dimensions,
32-bit BLAS sizes).
"""
cimport numpy as cnp
from cpython.pycapsule cimport PyCapsule_GetPointer
from cython.parallel cimport prange
from libc.stdint cimport int64_t
from libc.string cimport memcpy, memset

from scipy.linalg.cython_blas cimport dgemm, dgemv, sgemm, sgemv

from fastattn._capi cimport FA_DTYPE_F32, FA_DTYPE_F64, FA_OK, fa_rope_args

cnp.import_array()

# A product with at most this many rows goes through GEMV, one row at a
# time: GEMM packs the whole weight matrix into its panel layout first. For
# a 768 x 2304 weight on one Zen 3 core, sgemm took ~1.4 ms for 1 to 8 rows
# (the packing) against 0.13 ms per row for sgemv; they cross near 12-16.
cdef enum:
    GEMV_MAX_ROWS = 12
    BLAS_INT_MAX = 2147483647
    # below this many multiply-adds a product stays on one thread: an OpenMP
    # fork/join costs a few microseconds, ~2^18 multiply-adds on one core
    PARALLEL_MIN_FLOPS = 262144


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


ctypedef int (*rope_fn)(int dtype, const fa_rope_args *args, int num_threads) noexcept nogil


cdef struct Epilogue:
    # RoPE on the first `heads` heads (columns [0, heads * D)) of the output
    rope_fn fn
    int dtype
    int layout
    int64_t heads, D
    const int64_t *index     # table row of (batch, head, row)
    int64_t istride[3]
    const void *cos
    const void *sin
    int64_t table_len


cdef int _rope_block(const Epilogue *ep, char *c, int64_t cbs, int64_t ldc, int64_t item,
                     int64_t nbatch, int64_t rows, int64_t b0, int64_t r0, int64_t n0,
                     int64_t n1) noexcept nogil:
    """Rotate the heads within columns [n0, n1) (multiples of D) of the
    output rows [r0, r0 + rows) of batches [b0, b0 + nbatch); c points at
    row r0 of batch b0, column 0."""
    cdef fa_rope_args args
    cdef int64_t h0 = n0 // ep.D, h1
    h1 = (n1 if n1 < ep.heads * ep.D else ep.heads * ep.D) // ep.D
    if h1 <= h0 or rows <= 0 or nbatch <= 0:
        return FA_OK
    args.N0 = nbatch
    args.N1 = h1 - h0
    args.L = rows
    args.D = ep.D
    args.x.data = c + h0 * ep.D * item
    args.x.stride[0] = cbs
    args.x.stride[1] = ep.D
    args.x.stride[2] = ldc
    args.x.stride[3] = 1
    args.y = args.x
    args.rows = NULL
    args.y_row_offset = NULL
    args.index = ep.index + b0 * ep.istride[0] + h0 * ep.istride[1] + r0 * ep.istride[2]
    args.index_stride[0] = ep.istride[0]
    args.index_stride[1] = ep.istride[1]
    args.index_stride[2] = ep.istride[2]
    args.cos = ep.cos
    args.sin = ep.sin
    args.table_len = ep.table_len
    args.layout = ep.layout
    return ep.fn(ep.dtype, &args, 1)


cdef int64_t _gcd(int64_t a, int64_t b) noexcept nogil:
    while b:
        a, b = b, a % b
    return a


cdef int _product_mt(int dbl, char *a, int64_t lda, char *w, int64_t ldw, char *c, int64_t ldc,
                     int64_t M, int64_t N, int64_t K, const char *bias, double alpha,
                     int nthreads, const Epilogue *ep, int64_t nbatch, int64_t cbs,
                     int64_t b0, int64_t r0) noexcept nogil:
    """_product with the columns split over nthreads OpenMP threads, in
    blocks of whole cache lines (and whole heads with an epilogue); BLAS
    itself must run single-threaded. The M rows are nbatch batches of
    M / nbatch rows, cbs apart in c (for the epilogue's view); b0, r0 locate
    them in the epilogue's index. Returns the epilogue's status."""
    cdef int64_t item = 8 if dbl else 4
    cdef int64_t align = 64 // item
    cdef int64_t per, n0, n1
    cdef const char *bb
    cdef int t
    cdef int status = FA_OK, st
    if ep != NULL:
        align = align // _gcd(align, ep.D) * ep.D  # lcm: whole heads, whole lines
    if nthreads <= 1 or N < 2 * align or M * N * K < PARALLEL_MIN_FLOPS:
        _product(dbl, a, lda, w, ldw, c, ldc, M, N, K, bias, alpha)
        if ep != NULL:
            status = _rope_block(ep, c, cbs, ldc, item, nbatch, M // nbatch, b0, r0, 0, N)
        return status
    per = (N + nthreads - 1) // nthreads
    per = (per + align - 1) // align * align
    for t in prange(nthreads, num_threads=nthreads, schedule="static", chunksize=1):
        n0 = t * per
        n1 = n0 + per
        if n1 > N:
            n1 = N
        bb = bias
        if bb != NULL:
            bb = bb + n0 * item
        if n1 > n0:
            _product(dbl, a, lda, w + n0 * item, ldw, c + n0 * item, ldc, M, n1 - n0, K, bb, alpha)
            if ep != NULL:
                st = _rope_block(ep, c, cbs, ldc, item, nbatch, M // nbatch, b0, r0, n0, n1)
                if st != FA_OK:
                    status = st  # benign race: any failure is reported
    return status


cdef rope_fn _ROPE_FN = NULL


def set_rope_kernel(object capsule):
    """Install fa_rope_apply (a PyCapsule from fastattn._kernels) for the
    RoPE epilogue."""
    global _ROPE_FN
    _ROPE_FN = <rope_fn>PyCapsule_GetPointer(capsule, b"fastattn.fa_rope_apply")


cdef const int64_t *_row_bounds(object arr, int64_t B, int64_t M, str name) except? NULL:
    """None, or a contiguous (B,) int64 array of row indices within [0, M]."""
    cdef cnp.ndarray a
    cdef const int64_t *p
    cdef int64_t b
    if arr is None:
        return NULL
    a = <cnp.ndarray>arr
    if (a.ndim != 1 or a.shape[0] != B or cnp.PyArray_TYPE(a) != cnp.NPY_INT64
            or not cnp.PyArray_IS_C_CONTIGUOUS(a)):
        raise ValueError(f"fastattn._blas.matmul: {name} must be a contiguous ({B},) int64 array")
    p = <const int64_t *>cnp.PyArray_DATA(a)
    for b in range(B):
        if p[b] < 0 or p[b] > M:
            raise ValueError(f"fastattn._blas.matmul: {name} out of range")
    return p


cdef int _epilogue(Epilogue *ep, object rope, cnp.ndarray c, int64_t B, int64_t M, int64_t N) except -1:
    """rope: (layout, heads, D, index, cos, sin) with index an int64
    (B, heads, M) view (zero strides broadcast) of rows of the contiguous
    (table_len, D/2) cos and sin tables of c's dtype."""
    cdef cnp.ndarray index, cos_t, sin_t
    cdef int i
    if _ROPE_FN == NULL:
        raise RuntimeError("fastattn._blas: the RoPE kernel is not installed")
    layout, heads, D, index, cos_t, sin_t = rope
    ep.fn = _ROPE_FN
    ep.dtype = FA_DTYPE_F64 if cnp.PyArray_TYPE(c) == cnp.NPY_FLOAT64 else FA_DTYPE_F32
    ep.layout = layout
    ep.heads = heads
    ep.D = D
    if ep.D <= 0 or ep.D % 2 or ep.heads < 0 or ep.heads * ep.D > N:
        raise ValueError("fastattn._blas.matmul: bad RoPE heads or head dim")
    if (index.ndim != 3 or index.shape[0] != B or index.shape[1] != ep.heads or index.shape[2] != M
            or cnp.PyArray_TYPE(index) != cnp.NPY_INT64):
        raise ValueError("fastattn._blas.matmul: the RoPE index must be an int64 (B, heads, M) view")
    if (cos_t.ndim != 2 or sin_t.ndim != 2 or cos_t.shape[1] != ep.D // 2 or sin_t.shape[1] != ep.D // 2
            or sin_t.shape[0] != cos_t.shape[0] or cnp.PyArray_TYPE(cos_t) != cnp.PyArray_TYPE(c)
            or cnp.PyArray_TYPE(sin_t) != cnp.PyArray_TYPE(c)
            or not cnp.PyArray_IS_C_CONTIGUOUS(cos_t) or not cnp.PyArray_IS_C_CONTIGUOUS(sin_t)):
        raise ValueError("fastattn._blas.matmul: RoPE tables must be contiguous (n, D/2) arrays of c's dtype")
    ep.index = <const int64_t *>cnp.PyArray_DATA(index)
    for i in range(3):
        ep.istride[i] = cnp.PyArray_STRIDES(index)[i] // 8
    ep.cos = cnp.PyArray_DATA(cos_t)
    ep.sin = cnp.PyArray_DATA(sin_t)
    ep.table_len = cos_t.shape[0]
    return 0


def matmul(cnp.ndarray a, cnp.ndarray w, cnp.ndarray c, object bias=None, object row_start=None,
           object row_stop=None, double alpha=1.0, int num_threads=1, object rope=None):
    """``c[b, r0:r1] = alpha * a[b, r0:r1] @ w (+ bias)`` for every b, with
    ``r0 = row_start[b]`` (default 0) and ``r1 = row_stop[b]`` (default M),
    then RoPE on the first heads of those rows.

    a (B, M, K), w (K, N), c (B, M, N): one dtype (float32 or float64), unit
    last-axis strides, any row and batch strides (column blocks of a wider
    buffer are fine). bias: None or a contiguous (N,) array. row_start,
    row_stop: None or contiguous (B,) int64 arrays within [0, M]; rows
    outside [r0, r1) are left untouched. Without them, when the batches are
    evenly spaced in a and c, one BLAS call covers them all. num_threads:
    OpenMP threads over column blocks (BLAS must be single-threaded then).
    rope: None or ``(layout, heads, D, index, cos, sin)``: rotate columns
    ``[0, heads * D)`` of the computed rows as ``heads`` heads of dim D, row
    ``(b, h, i)`` by table row ``index[b, h, i]`` (see fa_rope_apply).
    """
    cdef int dbl
    cdef int64_t B, M, K, N, lda, ldw, ldc, sab, scb, item, b, r0, r1
    cdef const int64_t *r0p
    cdef const int64_t *r1p
    cdef const char *bp = NULL
    cdef char *ap
    cdef char *wp
    cdef char *cp
    cdef cnp.ndarray bias_a
    cdef Epilogue ep
    cdef const Epilogue *epp = NULL
    cdef int status = FA_OK, st
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
    r0p = _row_bounds(row_start, B, M, "row_start")
    r1p = _row_bounds(row_stop, B, M, "row_stop")
    if rope is not None:
        _epilogue(&ep, rope, c, B, M, N)
        epp = &ep
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
    ap = <char *>cnp.PyArray_DATA(a)
    wp = <char *>cnp.PyArray_DATA(w)
    cp = <char *>cnp.PyArray_DATA(c)
    with nogil:
        if (r0p == NULL and r1p == NULL and B > 1 and sab == M * lda and scb == M * ldc
                and B * M <= BLAS_INT_MAX):
            status = _product_mt(dbl, ap, lda, wp, ldw, cp, ldc, B * M, N, K, bp, alpha,
                                 num_threads, epp, B, scb, 0, 0)
        else:
            for b in range(B):
                r0 = 0 if r0p == NULL else r0p[b]
                r1 = M if r1p == NULL else r1p[b]
                if r1 > r0:
                    st = _product_mt(dbl, ap + (b * sab + r0 * lda) * item, lda, wp, ldw,
                                     cp + (b * scb + r0 * ldc) * item, ldc, r1 - r0, N, K, bp,
                                     alpha, num_threads, epp, 1, scb, b, r0)
                    if st != FA_OK:
                        status = st
    if status != FA_OK:
        raise ValueError(f"fastattn._blas.matmul: the RoPE epilogue rejected its arguments (status {status})")
