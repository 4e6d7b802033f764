# cython: freethreading_compatible = True
"""Thin bindings to csrc/fastattn.h.

This module only turns already-validated NumPy arrays into pointers and
element strides, releases the GIL around each kernel and turns C status
codes into exceptions. Validation, broadcasting and dtype handling live in
the Python modules that call it.
"""
cimport numpy as cnp
from libc.stdint cimport int64_t

from scipy.linalg.cython_blas cimport dgemm, dgemv, sgemm, sgemv

from fastattn._capi cimport *

cnp.import_array()


cdef int check(int status) except -1:
    if status == FA_OK:
        return 0
    if status == FA_ERR_NOMEM:
        raise MemoryError("fastattn: could not allocate kernel scratch memory")
    if status == FA_ERR_OVERFLOW:
        raise ValueError("fastattn: array sizes overflow the addressable range")
    if status == FA_ERR_ISA:
        raise ValueError("fastattn: that ISA level is not supported on this CPU")
    raise ValueError(f"fastattn: the C kernel rejected its arguments (status {status})")


cdef inline int dtype_code(cnp.ndarray a) except -1:
    if cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32:
        return FA_DTYPE_F32
    if cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT64:
        return FA_DTYPE_F64
    if cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT16:
        return FA_DTYPE_F16
    if a.dtype.name == "bfloat16":
        return FA_DTYPE_BF16
    raise TypeError(f"fastattn: kernel dtype must be float32, float64, float16 or bfloat16, "
                    f"got {a.dtype}")


cdef inline int64_t elem_stride(Py_ssize_t stride, Py_ssize_t item) except? -1:
    """A byte stride in elements. The Python layer copies arrays whose strides
    are not whole elements (e.g. structured-array fields); this guard turns a
    miss there into an error instead of silently wrong addresses."""
    if stride % item:
        raise ValueError(f"fastattn: stride {stride} is not a multiple of the item size {item}")
    return stride // item


cdef inline fa_view4 view4(cnp.ndarray a) except *:
    """A 4-D array as a C view: base pointer and strides in elements."""
    cdef fa_view4 v
    cdef Py_ssize_t item = cnp.PyArray_ITEMSIZE(a)
    cdef int i
    v.data = cnp.PyArray_DATA(a)
    for i in range(4):
        v.stride[i] = elem_stride(cnp.PyArray_STRIDES(a)[i], item)
    return v


cdef inline fa_view4 view3(cnp.ndarray a) except *:
    cdef fa_view4 v
    cdef Py_ssize_t item = cnp.PyArray_ITEMSIZE(a)
    cdef int i
    v.data = cnp.PyArray_DATA(a)
    for i in range(3):
        v.stride[i] = elem_stride(cnp.PyArray_STRIDES(a)[i], item)
    v.stride[3] = 0
    return v


cdef inline fa_lengths_view lengths2(object a) except *:
    """None, or a (B, M) int64 array (zero strides where broadcast)."""
    cdef fa_lengths_view v
    cdef cnp.ndarray arr
    if a is None:
        v.data = NULL
        v.stride_b = 0
        v.stride_m = 0
        return v
    arr = <cnp.ndarray>a
    v.data = <const int64_t *>cnp.PyArray_DATA(arr)
    v.stride_b = elem_stride(cnp.PyArray_STRIDES(arr)[0], 8)
    v.stride_m = elem_stride(cnp.PyArray_STRIDES(arr)[1], 8)
    return v


cdef inline fa_mask_view mask4(object mask, int kind) except *:
    """None, or a 4-D broadcast view (uint8 for bool masks)."""
    cdef fa_mask_view mv
    cdef cnp.ndarray m
    cdef Py_ssize_t item
    mv.data = NULL
    mv.kind = FA_MASK_NONE
    mv.stride_b = mv.stride_m = mv.stride_q = mv.stride_k = 0
    if mask is None:
        return mv
    m = <cnp.ndarray>mask
    item = cnp.PyArray_ITEMSIZE(m)
    mv.data = cnp.PyArray_DATA(m)
    mv.kind = kind
    mv.stride_b = elem_stride(cnp.PyArray_STRIDES(m)[0], item)
    mv.stride_m = elem_stride(cnp.PyArray_STRIDES(m)[1], item)
    mv.stride_q = elem_stride(cnp.PyArray_STRIDES(m)[2], item)
    mv.stride_k = elem_stride(cnp.PyArray_STRIDES(m)[3], item)
    return mv


cdef inline fa_pe_params pe_params(int layout, double min_timescale, double max_timescale,
                                   int64_t start_index):
    cdef fa_pe_params p
    p.layout = layout
    p.min_timescale = min_timescale
    p.max_timescale = max_timescale
    p.start_index = start_index
    return p


# ---- the C enums, as Python sees them -----------------------------------------
# Every code Python passes to a kernel comes from these names, compiled from
# csrc/fastattn.h; the CUDA header derives its values from the same enums.

DTYPE_CODES = {"float32": FA_DTYPE_F32, "float64": FA_DTYPE_F64}
ISA_CODES = {"scalar": FA_ISA_SCALAR, "avx2": FA_ISA_AVX2, "avx512": FA_ISA_AVX512}
MASK_NONE = FA_MASK_NONE
MASK_BOOL = FA_MASK_BOOL
MASK_ADD = FA_MASK_ADD
CAUSAL_NONE = FA_CAUSAL_NONE
CAUSAL_ALIGNMENTS = {"top_left": FA_CAUSAL_TOP_LEFT, "bottom_right": FA_CAUSAL_BOTTOM_RIGHT}
SEQUENCE_MASK_MODES = {"mul": FA_SEQMASK_MUL, "add": FA_SEQMASK_ADD}
PE_LAYOUTS = {"concat": FA_PE_CONCAT, "interleaved": FA_PE_INTERLEAVED}
KV_SAME = FA_KV_SAME
KV_DTYPE_CODES = {"bfloat16": FA_KV_BF16, "float16": FA_KV_F16, "int8": FA_KV_I8}
ROPE_NONE = FA_ROPE_NONE
ROPE_LAYOUTS = {"neox": FA_ROPE_NEOX, "gptj": FA_ROPE_GPTJ}


# ---- configuration ---------------------------------------------------------

def cpu_best_isa():
    return fa_cpu_best_isa()

def compiled_max_isa():
    return fa_compiled_max_isa()

def get_isa():
    return fa_get_isa()

def set_isa(int isa):
    check(fa_set_isa(isa))

def isa_name(int isa):
    return fa_isa_name(isa).decode()

def openmp_enabled():
    return bool(fa_openmp_enabled())

def default_num_threads():
    return fa_default_num_threads()

def build_compiler():
    return fa_build_compiler().decode()

def build_flags():
    return fa_build_flags().decode()

def fork_child_serial():
    """True in the thread that called fork() in a child process: its kernels
    run on one thread (csrc/fork_safety.c)."""
    return bool(fa_fork_child_serial())


# ---- kernels -----------------------------------------------------------------

def masked_softmax(cnp.ndarray x, cnp.ndarray y, double scale, object mask,
                   int mask_kind, object key_len, object query_len, int causal,
                   int num_threads):
    """x, y: (B, M, Lq, Lk); mask: None or 4-D broadcast view; lengths: None
    or (B, M) int64 broadcast views. x and y: float32, float64, bfloat16 or
    float16 (then an additive mask is float32)."""
    cdef int dt = dtype_code(x)
    if cnp.PyArray_TYPE(y) != cnp.PyArray_TYPE(x) or cnp.PyArray_ITEMSIZE(y) != cnp.PyArray_ITEMSIZE(x):
        raise ValueError("fastattn: masked_softmax x and y must share one dtype")
    if mask is not None and mask_kind == MASK_ADD and cnp.PyArray_TYPE(<cnp.ndarray>mask) != (
            cnp.NPY_FLOAT32 if dt == FA_DTYPE_BF16 or dt == FA_DTYPE_F16 else cnp.PyArray_TYPE(x)):
        raise ValueError("fastattn: an additive mask must have x's dtype (float32 for 16-bit x)")
    cdef fa_view4 vx = view4(x), vy = view4(y)
    cdef fa_mask_view mv = mask4(mask, mask_kind)
    cdef fa_lengths_view kl = lengths2(key_len), ql = lengths2(query_len)
    cdef int64_t B = x.shape[0], M = x.shape[1], Lq = x.shape[2], Lk = x.shape[3]
    cdef int st
    with nogil:
        st = fa_masked_softmax(dt, vx, vy, B, M, Lq, Lk, scale, &mv, &kl, &ql,
                               causal, num_threads)
    check(st)


cdef inline int window_side(object side, int flag, int64_t *bound) except -1:
    """The window flag ``flag`` when ``side`` (None: unbounded, or an int >= 0)
    bounds the window, and its bound in ``bound``."""
    if side is None:
        bound[0] = 0
        return 0
    bound[0] = side
    return flag


cdef inline const void *data_or_null(object a):
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray>a)


# The two attention entry points take fa_attention_args / fa_varlen_args as
# keyword-only arguments named after the struct fields (csrc/fastattn.h), so a
# new field is its .pxd line, one keyword here and one assignment; arrays become
# views and pointers, nothing else is interpreted. Shapes come from the arrays.

def scaled_dot_product_attention(cnp.ndarray q, cnp.ndarray k, cnp.ndarray v, cnp.ndarray out, *,
                                 object weights=None, double scale, object mask=None,
                                 int mask_kind=FA_MASK_NONE, object key_len=None,
                                 object query_len=None, bint is_causal=False,
                                 int alignment=FA_CAUSAL_TOP_LEFT, object alibi_slopes=None,
                                 object key_start=None, object window_left=None,
                                 object window_right=None, double softcap=0.0,
                                 object sinks=None, int kv_dtype=FA_KV_SAME,
                                 object k_scale=None, object v_scale=None, int num_threads):
    """q (B,H,Lq,D), k (B,Hkv,Lk,D), v (B,Hkv,Lk,Dv), out (B,H,Lq,Dv),
    weights None or (B,H,Lq,Lk); all with a unit last-axis stride. mask:
    None or a 4-D broadcast view of kind mask_kind; key_len, query_len,
    key_start: None or (B, H) int64 views; window_left/right: None
    (unbounded) or an int >= 0; alibi_slopes, sinks: None or (H,)
    contiguous in the dtype. kv_dtype: FA_KV_SAME (k, v in q's dtype) or a
    KV_DTYPE_CODES value, k and v in that storage; int8 takes k_scale,
    v_scale (B, Hkv, Lk) float32 views with a unit last stride."""
    cdef int dt = dtype_code(q)
    cdef fa_attention_args a
    cdef int st
    a.B, a.H, a.Lq, a.D = q.shape[0], q.shape[1], q.shape[2], q.shape[3]
    a.Hkv, a.Lk, a.Dv = k.shape[1], k.shape[2], v.shape[3]
    a.q, a.k, a.v, a.out = view4(q), view4(k), view4(v), view4(out)
    if weights is None:
        a.weights.data = NULL
        a.weights.stride[0] = a.weights.stride[1] = a.weights.stride[2] = a.weights.stride[3] = 0
    else:
        a.weights = view4(<cnp.ndarray>weights)
    a.mask = mask4(mask, mask_kind)
    a.key_len = lengths2(key_len)
    a.query_len = lengths2(query_len)
    a.is_causal = is_causal
    a.alignment = alignment
    a.scale = scale
    a.alibi_slopes = data_or_null(alibi_slopes)
    a.key_start = lengths2(key_start)
    a.window = (window_side(window_left, FA_WINDOW_LEFT, &a.window_left)
                | window_side(window_right, FA_WINDOW_RIGHT, &a.window_right))
    a.softcap = softcap
    a.sinks = data_or_null(sinks)
    a.kv_dtype = kv_dtype
    a.k_scale.data = a.v_scale.data = NULL
    if k_scale is not None:
        a.k_scale = view3(<cnp.ndarray>k_scale)
        a.v_scale = view3(<cnp.ndarray>v_scale)
    with nogil:
        st = fa_scaled_dot_product_attention(dt, &a, num_threads)
    check(st)


def quantize_kv(cnp.ndarray x, cnp.ndarray values, cnp.ndarray scales, int num_threads):
    """x (B,H,L,D) float32 -> values (B,H,L,D) int8, scales (B,H,L) float32;
    x and values with a unit last stride."""
    cdef fa_view4 xv = view4(x), qv = view4(values), sv = view3(scales)
    cdef int64_t B = x.shape[0], H = x.shape[1], L = x.shape[2], D = x.shape[3]
    cdef int st
    with nogil:
        st = fa_quantize_kv(xv, qv, sv, B, H, L, D, num_threads)
    check(st)


def dequantize_kv(cnp.ndarray values, cnp.ndarray scales, cnp.ndarray y, int num_threads):
    """values (B,H,L,D) int8, scales (B,H,L) float32 -> y (B,H,L,D) float32."""
    cdef fa_view4 qv = view4(values), sv = view3(scales), yv = view4(y)
    cdef int64_t B = y.shape[0], H = y.shape[1], L = y.shape[2], D = y.shape[3]
    cdef int st
    with nogil:
        st = fa_dequantize_kv(qv, sv, yv, B, H, L, D, num_threads)
    check(st)


cdef fa_view4 packed_view(cnp.ndarray a) except *:
    """(total, heads, cols) as the (1, heads, total, cols) view varlen takes."""
    cdef fa_view4 v
    cdef Py_ssize_t item = cnp.PyArray_ITEMSIZE(a)
    v.data = cnp.PyArray_DATA(a)
    v.stride[0] = 0
    v.stride[1] = elem_stride(cnp.PyArray_STRIDES(a)[1], item)
    v.stride[2] = elem_stride(cnp.PyArray_STRIDES(a)[0], item)
    v.stride[3] = elem_stride(cnp.PyArray_STRIDES(a)[2], item)
    return v


def varlen_attention(cnp.ndarray q, cnp.ndarray k, cnp.ndarray v, cnp.ndarray out, *,
                     cnp.ndarray cu_q, cnp.ndarray cu_k, double scale, bint is_causal=False,
                     int alignment=FA_CAUSAL_TOP_LEFT, object alibi_slopes=None,
                     object window_left=None, object window_right=None, double softcap=0.0,
                     object sinks=None, int num_threads, int kv_dtype=FA_KV_SAME):
    """q (total_q, H, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv),
    out (total_q, H, Dv), unit last-axis strides; cu_q, cu_k (B+1,)
    contiguous int64; kv_dtype and the rest as in
    scaled_dot_product_attention (no int8)."""
    cdef int dt = dtype_code(q)
    cdef fa_varlen_args a
    cdef int st
    a.B = cu_q.shape[0] - 1
    a.H, a.Hkv = q.shape[1], k.shape[1]
    a.total_q, a.total_k = q.shape[0], k.shape[0]
    a.D, a.Dv = q.shape[2], v.shape[2]
    a.cu_q = <const int64_t *>cnp.PyArray_DATA(cu_q)
    a.cu_k = <const int64_t *>cnp.PyArray_DATA(cu_k)
    a.q, a.k, a.v, a.out = packed_view(q), packed_view(k), packed_view(v), packed_view(out)
    a.is_causal = is_causal
    a.alignment = alignment
    a.scale = scale
    a.alibi_slopes = data_or_null(alibi_slopes)
    a.window = (window_side(window_left, FA_WINDOW_LEFT, &a.window_left)
                | window_side(window_right, FA_WINDOW_RIGHT, &a.window_right))
    a.softcap = softcap
    a.sinks = data_or_null(sinks)
    a.kv_dtype = kv_dtype
    with nogil:
        st = fa_varlen_attention(dt, &a, num_threads)
    check(st)


def paged_attention(cnp.ndarray q, cnp.ndarray key_cache, cnp.ndarray value_cache,
                    cnp.ndarray out, cnp.ndarray block_tables, cnp.ndarray seq_lens,
                    double scale, bint is_causal, object alibi, object window, double softcap,
                    object sinks, int num_threads, int kv_dtype=FA_KV_SAME,
                    object k_scale=None, object v_scale=None):
    """q (B,H,Lq,D), caches (num_blocks, block_size, Hkv, D / Dv), out
    (B,H,Lq,Dv), unit last-axis strides; block_tables (B, max_blocks) int64
    with a unit last stride; seq_lens (B,) contiguous int64. kv_dtype: the
    caches' storage (a KV_DTYPE_CODES value, or FA_KV_SAME: q's dtype);
    int8 takes k_scale, v_scale (num_blocks, block_size, Hkv) float32."""
    cdef int dt = dtype_code(q)
    cdef fa_paged_args a
    cdef int st
    a.B = q.shape[0]
    a.H = q.shape[1]
    a.Lq = q.shape[2]
    a.D = q.shape[3]
    a.num_blocks = key_cache.shape[0]
    a.block_size = key_cache.shape[1]
    a.Hkv = key_cache.shape[2]
    a.Dv = value_cache.shape[3]
    a.max_blocks = block_tables.shape[1]
    a.q = view4(q)
    a.out = view4(out)
    a.k_cache = view4(key_cache)
    a.v_cache = view4(value_cache)
    a.block_table = <const int64_t *>cnp.PyArray_DATA(block_tables)
    a.bt_stride = elem_stride(cnp.PyArray_STRIDES(block_tables)[0], 8)
    a.seq_lens = <const int64_t *>cnp.PyArray_DATA(seq_lens)
    a.is_causal = is_causal
    a.scale = scale
    a.alibi_slopes = NULL if alibi is None else cnp.PyArray_DATA(<cnp.ndarray>alibi)
    a.window = 0
    a.window_left = a.window_right = 0
    if window is not None:
        if window[0] is not None:
            a.window |= FA_WINDOW_LEFT
            a.window_left = window[0]
        if window[1] is not None:
            a.window |= FA_WINDOW_RIGHT
            a.window_right = window[1]
    a.softcap = softcap
    a.sinks = NULL if sinks is None else cnp.PyArray_DATA(<cnp.ndarray>sinks)
    a.kv_dtype = kv_dtype
    a.k_scale.data = a.v_scale.data = NULL
    if k_scale is not None:
        a.k_scale = view3(<cnp.ndarray>k_scale)
    if v_scale is not None:
        a.v_scale = view3(<cnp.ndarray>v_scale)
    with nogil:
        st = fa_paged_attention(dt, &a, num_threads)
    check(st)


def apply_sequence_mask(cnp.ndarray x, cnp.ndarray y, cnp.ndarray lengths, int mode,
                        int num_threads):
    """x, y: (B, P, L, C); lengths: (B,) contiguous int64."""
    cdef int dt = dtype_code(x)
    cdef fa_view4 vx = view4(x), vy = view4(y)
    cdef const int64_t *lp = <const int64_t *>cnp.PyArray_DATA(lengths)
    cdef int64_t B = x.shape[0], P = x.shape[1], L = x.shape[2], C = x.shape[3]
    cdef int st
    with nogil:
        st = fa_apply_sequence_mask(dt, vx, vy, B, P, L, C, lp, mode, num_threads)
    check(st)


def split_heads(cnp.ndarray x4, cnp.ndarray y, int num_threads):
    """x4: (B, S, H, D) view; y: contiguous (B, H, S, D)."""
    cdef fa_view4 vx = view4(x4)
    cdef void *yp = cnp.PyArray_DATA(y)
    cdef int es = cnp.PyArray_ITEMSIZE(x4)
    cdef int64_t B = x4.shape[0], S = x4.shape[1], H = x4.shape[2], D = x4.shape[3]
    cdef int st
    with nogil:
        st = fa_split_heads(es, vx, yp, B, S, H, D, num_threads)
    check(st)


def merge_heads(cnp.ndarray x, cnp.ndarray y, int num_threads):
    """x: (B, H, S, D) view; y: contiguous (B, S, H*D)."""
    cdef fa_view4 vx = view4(x)
    cdef void *yp = cnp.PyArray_DATA(y)
    cdef int es = cnp.PyArray_ITEMSIZE(x)
    cdef int64_t B = x.shape[0], H = x.shape[1], S = x.shape[2], D = x.shape[3]
    cdef int st
    with nogil:
        st = fa_merge_heads(es, vx, yp, B, H, S, D, num_threads)
    check(st)


def position_encoding(cnp.ndarray out, int layout, double min_timescale,
                      double max_timescale, int64_t start_index, int num_threads):
    """out: (length, channels) with a unit column stride."""
    cdef int dt = dtype_code(out)
    cdef fa_pe_params p = pe_params(layout, min_timescale, max_timescale, start_index)
    cdef void *op = cnp.PyArray_DATA(out)
    cdef int64_t rs = elem_stride(cnp.PyArray_STRIDES(out)[0], cnp.PyArray_ITEMSIZE(out))
    cdef int64_t L = out.shape[0], C = out.shape[1]
    cdef int st
    with nogil:
        st = fa_position_encoding(dt, op, rs, L, C, &p, num_threads)
    check(st)


def add_position_encoding(cnp.ndarray x, cnp.ndarray y, int layout, double min_timescale,
                          double max_timescale, int64_t start_index, int num_threads):
    """x, y: (B, length, channels) views."""
    cdef int dt = dtype_code(x)
    cdef fa_pe_params p = pe_params(layout, min_timescale, max_timescale, start_index)
    cdef fa_view4 vx = view3(x), vy = view3(y)
    cdef int64_t B = x.shape[0], L = x.shape[1], C = x.shape[2]
    cdef int st
    with nogil:
        st = fa_add_position_encoding(dt, vx, vy, B, L, C, &p, num_threads)
    check(st)


# ---- RoPE (the multi-head attention layer) ----------------------------------

def rope_table(cnp.ndarray cos_out, cnp.ndarray sin_out, object positions, int64_t start,
               double base, int num_threads):
    """cos_out, sin_out: contiguous (n, half) of one dtype; positions: None
    (start + arange(n)) or a contiguous (n,) int64 array."""
    cdef int dt = dtype_code(cos_out)
    cdef int64_t n = cos_out.shape[0], half = cos_out.shape[1]
    cdef const int64_t *pp = NULL
    cdef cnp.ndarray pa
    cdef int st
    if (cos_out.ndim != 2 or sin_out.ndim != 2 or sin_out.shape[0] != n or sin_out.shape[1] != half
            or cnp.PyArray_TYPE(sin_out) != cnp.PyArray_TYPE(cos_out)
            or not cnp.PyArray_IS_C_CONTIGUOUS(cos_out) or not cnp.PyArray_IS_C_CONTIGUOUS(sin_out)):
        raise ValueError("fastattn: rope tables must be contiguous (n, half) arrays of one dtype")
    if positions is not None:
        pa = <cnp.ndarray>positions
        if (pa.ndim != 1 or pa.shape[0] != n or cnp.PyArray_TYPE(pa) != cnp.NPY_INT64
                or not cnp.PyArray_IS_C_CONTIGUOUS(pa)):
            raise ValueError("fastattn: rope positions must be a contiguous (n,) int64 array")
        pp = <const int64_t *>cnp.PyArray_DATA(pa)
    with nogil:
        st = fa_rope_table(dt, cnp.PyArray_DATA(cos_out), cnp.PyArray_DATA(sin_out), n, half,
                           pp, start, base, num_threads)
    check(st)


def rope_apply(cnp.ndarray x, cnp.ndarray y, object index, object cos_t, object sin_t,
               int layout, object y_row_offset, object rows, int num_threads):
    """x (N0, N1, L, D), y (N0, N1, L', D) views with unit last strides;
    index: None (layout NONE) or an int64 (N0, N1, L) broadcast view; cos_t,
    sin_t: contiguous (table_len, D/2); y_row_offset, rows: None or
    contiguous (N0,) int64 (rows: how many rows of each n0 to process).
    bfloat16 / float16 x and y take float32 tables."""
    cdef int dt = dtype_code(x)
    cdef int table_type = cnp.NPY_FLOAT32 if dt == FA_DTYPE_BF16 or dt == FA_DTYPE_F16 \
        else cnp.PyArray_TYPE(x)
    cdef fa_rope_args a
    cdef cnp.ndarray ia, ca, sa, oa, ra
    cdef int st
    cdef int i
    if x.ndim != 4 or y.ndim != 4 or cnp.PyArray_TYPE(y) != cnp.PyArray_TYPE(x):
        raise ValueError("fastattn: rope_apply needs 4-D x and y of one dtype")
    if y.shape[0] != x.shape[0] or y.shape[1] != x.shape[1] or y.shape[3] != x.shape[3]:
        raise ValueError("fastattn: rope_apply x and y shapes differ")
    if y_row_offset is None and y.shape[2] != x.shape[2]:
        raise ValueError("fastattn: rope_apply x and y shapes differ")
    a.N0 = x.shape[0]
    a.N1 = x.shape[1]
    a.L = x.shape[2]
    a.D = x.shape[3]
    a.x = view4(x)
    a.y = view4(y)
    a.layout = layout
    a.y_row_offset = NULL
    a.rows = NULL
    a.index = NULL
    a.index_stride[0] = a.index_stride[1] = a.index_stride[2] = 0
    a.cos = NULL
    a.sin = NULL
    a.table_len = 0
    if y_row_offset is not None:
        oa = <cnp.ndarray>y_row_offset
        if (oa.ndim != 1 or oa.shape[0] != a.N0 or cnp.PyArray_TYPE(oa) != cnp.NPY_INT64
                or not cnp.PyArray_IS_C_CONTIGUOUS(oa)):
            raise ValueError("fastattn: y_row_offset must be a contiguous (N0,) int64 array")
        a.y_row_offset = <const int64_t *>cnp.PyArray_DATA(oa)
    if rows is not None:
        ra = <cnp.ndarray>rows
        if (ra.ndim != 1 or ra.shape[0] != a.N0 or cnp.PyArray_TYPE(ra) != cnp.NPY_INT64
                or not cnp.PyArray_IS_C_CONTIGUOUS(ra)):
            raise ValueError("fastattn: rows must be a contiguous (N0,) int64 array")
        a.rows = <const int64_t *>cnp.PyArray_DATA(ra)
    for i in range(a.N0):
        if ((a.rows != NULL and (a.rows[i] < 0 or a.rows[i] > a.L))
                or (a.y_row_offset != NULL and a.y_row_offset[i] < 0)
                or (a.y_row_offset[i] if a.y_row_offset != NULL else 0)
                   + (a.rows[i] if a.rows != NULL else a.L) > y.shape[2]):
            raise ValueError("fastattn: rope_apply rows or y_row_offset out of range")
    if index is not None:
        ia = <cnp.ndarray>index
        ca = <cnp.ndarray>cos_t
        sa = <cnp.ndarray>sin_t
        if (ia.ndim != 3 or ia.shape[0] != a.N0 or ia.shape[1] != a.N1 or ia.shape[2] != a.L
                or cnp.PyArray_TYPE(ia) != cnp.NPY_INT64):
            raise ValueError("fastattn: rope index must be an int64 (N0, N1, L) view")
        if (ca.ndim != 2 or sa.ndim != 2 or ca.shape[1] != a.D // 2 or sa.shape[1] != a.D // 2
                or sa.shape[0] != ca.shape[0] or cnp.PyArray_TYPE(ca) != table_type
                or cnp.PyArray_TYPE(sa) != table_type
                or not cnp.PyArray_IS_C_CONTIGUOUS(ca) or not cnp.PyArray_IS_C_CONTIGUOUS(sa)):
            raise ValueError("fastattn: rope tables must be contiguous (n, D/2) arrays of x's "
                             "dtype (float32 for 16-bit x)")
        a.index = <const int64_t *>cnp.PyArray_DATA(ia)
        for i in range(3):
            a.index_stride[i] = cnp.PyArray_STRIDES(ia)[i] // 8
        a.cos = cnp.PyArray_DATA(ca)
        a.sin = cnp.PyArray_DATA(sa)
        a.table_len = ca.shape[0]
    elif layout != FA_ROPE_NONE:
        raise ValueError("fastattn: rope_apply needs an index and tables to rotate")
    with nogil:
        st = fa_rope_apply(dt, &a, num_threads)
    check(st)



# ---- projections (csrc/linear.c) through scipy's BLAS --------------------------

cdef fa_blas _SCIPY_BLAS
_SCIPY_BLAS.sgemm = <fa_sgemm_fn *>sgemm
_SCIPY_BLAS.dgemm = <fa_dgemm_fn *>dgemm
_SCIPY_BLAS.sgemv = <fa_sgemv_fn *>sgemv
_SCIPY_BLAS.dgemv = <fa_dgemv_fn *>dgemv


cdef inline const int64_t *int64_data(object a):
    if a is None:
        return NULL
    return <const int64_t *>cnp.PyArray_DATA(<cnp.ndarray>a)


def linear(cnp.ndarray a, cnp.ndarray w, cnp.ndarray c, object bias, object row_start,
           object row_stop, double alpha, int num_threads, object rope, bint deterministic=True):
    """a (B, M, K), w (K, N), c (B, M, N) of one dtype; bias None or (N,);
    row_start, row_stop None or contiguous (B,) int64; rope None or
    (layout, heads, D, index (B, heads, M) int64 view, cos, sin);
    deterministic: thread-count-independent column blocks."""
    cdef int dt = dtype_code(a)
    cdef fa_linear_args p
    cdef Py_ssize_t item = cnp.PyArray_ITEMSIZE(a)
    cdef cnp.ndarray index
    cdef int i, st
    p.B, p.M, p.K, p.N = a.shape[0], a.shape[1], a.shape[2], w.shape[1]
    p.a = cnp.PyArray_DATA(a)
    p.w = cnp.PyArray_DATA(w)
    p.c = cnp.PyArray_DATA(c)
    for i in range(3):
        p.a_stride[i] = elem_stride(cnp.PyArray_STRIDES(a)[i], item)
        p.c_stride[i] = elem_stride(cnp.PyArray_STRIDES(c)[i], item)
    for i in range(2):
        p.w_stride[i] = elem_stride(cnp.PyArray_STRIDES(w)[i], item)
    p.bias = NULL if bias is None else cnp.PyArray_DATA(<cnp.ndarray>bias)
    p.row_start = int64_data(row_start)
    p.row_stop = int64_data(row_stop)
    p.alpha = alpha
    p.deterministic = deterministic
    p.rope.enabled = rope is not None
    if rope is None:
        p.rope.layout = FA_ROPE_NONE
        p.rope.heads = p.rope.D = p.rope.table_len = 0
        p.rope.index = NULL
        p.rope.index_stride[0] = p.rope.index_stride[1] = p.rope.index_stride[2] = 0
        p.rope.cos = p.rope.sin = NULL
    else:
        p.rope.layout, p.rope.heads, p.rope.D, index, cos_t, sin_t = rope
        p.rope.index = <const int64_t *>cnp.PyArray_DATA(index)
        for i in range(3):
            p.rope.index_stride[i] = elem_stride(cnp.PyArray_STRIDES(index)[i], 8)
        p.rope.cos = cnp.PyArray_DATA(<cnp.ndarray>cos_t)
        p.rope.sin = cnp.PyArray_DATA(<cnp.ndarray>sin_t)
        p.rope.table_len = (<cnp.ndarray>cos_t).shape[0]
    with nogil:
        st = fa_linear(dt, &p, &_SCIPY_BLAS, num_threads)
    check(st)


# ---- 16-bit GEMM (csrc/gemm_bf16.c; fastattn/bf16_gemm.py validates) ----

DTYPE_BF16 = FA_DTYPE_BF16
DTYPE_F16 = FA_DTYPE_F16

def gemm16_packed_elems(int64_t N, int64_t K):
    """uint16 elements of the packed form of a (N, K) weight."""
    cdef int64_t n = fa_gemm16_packed_elems(N, K)
    if n < 0:
        raise ValueError(f"fastattn: a ({N}, {K}) weight overflows the addressable range")
    return n


def gemm16_pack_weight(int dtype, cnp.ndarray w, cnp.ndarray packed, int num_threads):
    """w: (N, K) uint16 bits of the dtype, any strides; packed: 1-D uint16,
    contiguous, gemm16_packed_elems(N, K) long."""
    cdef Py_ssize_t item = cnp.PyArray_ITEMSIZE(w)
    cdef int64_t sn = elem_stride(cnp.PyArray_STRIDES(w)[0], item)
    cdef int64_t sk = elem_stride(cnp.PyArray_STRIDES(w)[1], item)
    cdef int64_t N = w.shape[0], K = w.shape[1], n = packed.shape[0]
    cdef const void *wp = cnp.PyArray_DATA(w)
    cdef void *pp = cnp.PyArray_DATA(packed)
    cdef int st
    with nogil:
        st = fa_gemm16_pack_weight(dtype, wp, N, K, sn, sk, pp, n, num_threads)
    check(st)


def gemm16(int dtype, cnp.ndarray a, cnp.ndarray packed, int64_t N, cnp.ndarray c,
           object bias, float alpha, int num_threads):
    """c (M, N) = alpha * a (M, K) . w^T (+ bias). a: uint16 bits of the
    dtype, unit column stride; c: float32 or uint16 bits of the dtype, unit
    column stride; bias: None or (N,) float32 contiguous."""
    cdef fa_gemm16_args g
    cdef int st
    g.dtype = dtype
    g.out_dtype = FA_DTYPE_F32 if cnp.PyArray_TYPE(c) == cnp.NPY_FLOAT32 else dtype
    g.M = a.shape[0]
    g.N = N
    g.K = a.shape[1]
    g.a = cnp.PyArray_DATA(a)
    g.a_row_stride = elem_stride(cnp.PyArray_STRIDES(a)[0], cnp.PyArray_ITEMSIZE(a))
    g.packed_w = cnp.PyArray_DATA(packed)
    g.packed_elems = packed.shape[0]
    g.c = cnp.PyArray_DATA(c)
    g.c_row_stride = elem_stride(cnp.PyArray_STRIDES(c)[0], cnp.PyArray_ITEMSIZE(c))
    g.bias = NULL
    if bias is not None:
        g.bias = <const float *>cnp.PyArray_DATA(<cnp.ndarray>bias)
    g.alpha = alpha
    with nogil:
        st = fa_gemm16(&g, num_threads)
    check(st)
