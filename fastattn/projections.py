"""The layer's projections on the CPU: one GEMM per projection, its columns
split over the OpenMP threads, RoPE as its epilogue, into scratch buffers
laid out for the attention kernel.

The GEMMs go through ``scipy.linalg.cython_blas``, called from C
(csrc/linear.c) without the GIL. While a layer call runs, scipy's BLAS is
held at one thread (:class:`BlasThreads`), so that every parallel step of
the call runs on fastattn's one OpenMP pool.
"""

import threading

import numpy as np

from fastattn import _backend, _kernels
from fastattn._validation import as_array, compute_dtype, is_half_dtype, reshaped_view


class BlasThreads:
    """Holds the BLAS libraries at one thread while layer calls run, so that
    all parallel work of a call runs on fastattn's OpenMP threads.

    Why: BLAS (OpenBLAS with its own pthreads pool) and the OpenMP kernels
    would otherwise take turns, and each pool's idle workers keep spinning
    for a while after their last job (libgomp ~300k pause loops, OpenBLAS
    yield loops), stealing cores from the other. Measured on a 2-core
    machine, a GEMM right after an attention call ran ~1.6x slower and the
    attention after a GEMM ~1.4x slower than back to back. So the layer
    splits each GEMM's columns over its OpenMP threads (csrc/linear.c),
    each block a single-threaded BLAS call, and RoPE and attention follow
    on the same threads.

    The libraries are threadpoolctl's (one ``ThreadpoolController``
    created on first use: looking them up costs milliseconds), as
    scikit-learn limits BLAS around its OpenMP loops; the limit itself is
    set and restored through each library's controller (``get_num_threads``
    / ``set_num_threads``, which keep threadpoolctl's rule that one thread
    controls a pthreads OpenBLAS). ``ThreadpoolController.limit`` and its
    restore, which also gather every library's info, cost 14 us a call,
    a fifth of a small layer's decode step. Concurrent calls share one
    limit, restored when the last of them returns. Without threadpoolctl or
    OpenMP, or when another thread controls the BLAS thread count, BLAS
    keeps its own threads and the GEMMs are single calls.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._controller = None  # None: not looked up yet; False: cannot limit
        self._depth = 0
        self._restore = []  # (library controller, its thread count) to restore
        self._pinned = False

    def _lookup(self):
        controller = False
        if _kernels.openmp_enabled():
            try:
                from threadpoolctl import ThreadpoolController

                controller = ThreadpoolController().select(user_api="blas")
                if not controller.lib_controllers:
                    controller = False
            except Exception:  # not installed, or an unusual BLAS: keep BLAS threading
                controller = False
        self._controller = controller

    def enter(self):
        """Limit BLAS (first concurrent caller); True when the GEMMs may be
        split over OpenMP threads."""
        with self._lock:
            if self._controller is None:
                self._lookup()
            self._depth += 1
            if self._depth == 1 and self._controller:
                try:
                    # filled as the limits are set, so that exit restores
                    # them even when a later library fails
                    restore = self._restore = []
                    for lib in self._controller.lib_controllers:
                        n = lib.get_num_threads()
                        # already at one thread (OPENBLAS_NUM_THREADS=1, say):
                        # nothing to limit or to restore
                        if n != 1:
                            restore.append((lib, n))
                            lib.set_num_threads(1)  # a no-op when another thread controls it
                    self._pinned = all(lib.get_num_threads() == 1 for lib, _ in restore)
                except Exception:
                    self._pinned = False
            return self._pinned

    def exit(self):
        with self._lock:
            self._depth -= 1
            if self._depth:
                return
            self._pinned = False
            restore, self._restore = self._restore, []
            try:
                for lib, n in restore:
                    if n is not None:
                        lib.set_num_threads(n)
                    # threadpoolctl >= 3.7 lets one thread control a pthreads
                    # OpenBLAS; do not keep that control
                    clear = getattr(lib, "clear_controlling_thread", None)
                    if clear is not None:
                        clear()
            except Exception:
                pass


BLAS_THREADS = BlasThreads()
_BLAS_INT_MAX = 2**31 - 1  # BLAS sizes and leading dimensions are 32-bit ints


def linear(a, w, c, bias=None, row_start=None, row_stop=None, alpha=1.0, num_threads=1, rope=None,
           deterministic=True):
    """``c[b, r0:r1] = alpha * a[b, r0:r1] @ w (+ bias)`` for every b, with
    ``r0 = row_start[b]`` (default 0) and ``r1 = row_stop[b]`` (default M),
    then RoPE on the first heads of those rows (csrc/linear.c, fa_linear).

    a (B, M, K), w (K, N), c (B, M, N): one dtype (float32 or float64), unit
    last-axis strides, any row and batch strides (column blocks of a wider
    buffer are fine); w may instead have a unit first-axis stride, as the
    transpose ``weight.T`` of a row-major (N, K) weight (torch's
    ``nn.Linear`` layout) is, and is then read in place. bias: None or a contiguous (N,) array. row_start,
    row_stop: None or contiguous (B,) int64 arrays within [0, M]; rows
    outside [r0, r1) are left untouched. num_threads: OpenMP threads over
    column blocks (BLAS must be single-threaded then: see BlasThreads). rope:
    None or ``(layout, heads, D, index, cos, sin)``: rotate columns
    ``[0, heads * D)`` of the computed rows as ``heads`` heads of dim D, row
    ``(b, h, i)`` by table row ``index[b, h, i]`` (an int64 (B, heads, M)
    view; cos, sin contiguous (n, D/2) tables of c's dtype). deterministic:
    split the columns into blocks fixed by the sizes alone, so that c is
    bitwise the same for every num_threads; False: one block per thread
    (fewer BLAS calls; the last bits may change with num_threads).
    """
    if a.ndim != 3 or c.ndim != 3:
        raise ValueError(f"linear: a and c must be 3-D, got a {a.shape} and c {c.shape}")
    if a.dtype not in (np.float32, np.float64):
        raise TypeError(f"linear: dtype must be float32 or float64, got {a.dtype}")
    if w.dtype != a.dtype or c.dtype != a.dtype:
        raise TypeError(f"linear: a, w and c must share one dtype, got {a.dtype}, {w.dtype} and {c.dtype}")
    if not c.flags.writeable:
        raise ValueError("linear: c is read-only")
    B, M, K = a.shape
    if w.ndim != 2:
        raise ValueError(f"linear: w must be 2-D, got {w.ndim}-D")
    N = w.shape[1]
    if w.shape[0] != K:
        raise ValueError(f"linear: w has shape {w.shape}, expected {(K, N)}")
    if c.shape != (B, M, N):
        raise ValueError(f"linear: c has shape {c.shape}, expected {(B, M, N)} for a {a.shape} and w {w.shape}")
    for name, r in (("row_start", row_start), ("row_stop", row_stop)):
        if r is None:
            continue
        if not (isinstance(r, np.ndarray) and r.shape == (B,) and r.dtype == np.int64 and r.flags.c_contiguous):
            raise ValueError(f"linear: {name} must be a contiguous ({B},) int64 array")
        if B and (r.min() < 0 or r.max() > M):
            raise ValueError(f"linear: {name} out of range [0, {M}]: {r}")
    if rope is not None:
        _check_rope_epilogue(rope, c)
    if B == 0 or M == 0 or N == 0:
        return
    item = a.itemsize
    # a weight's transpose (unit first-axis stride) is checked as the
    # row-major (N, K) matrix it is
    w_rows = w.size == 0 or N <= 1 or w.strides[1] == item
    w_checked = w if w_rows or K <= 1 or w.strides[0] != item else w.T
    for name, t in (("a", a), ("w", w_checked), ("c", c)):
        rows, cols = t.shape[-2:]
        if t.size and cols > 1 and t.strides[-1] != item:
            unit = "a unit stride on its last or first axis" if name == "w" else "a unit last-axis stride"
            raise ValueError(f"linear: {name} needs {unit}, got strides {t.strides}")
        if rows > 1 and cols > 0 and t.strides[-2] < cols * item:
            raise ValueError(f"linear: the rows of {name} {t.shape} overlap (strides {t.strides})")
        if rows > 1 and t.strides[-2] // item > _BLAS_INT_MAX:
            raise ValueError(f"linear: the row stride of {name} exceeds the 32-bit BLAS range")
    if max(M, N, K) > _BLAS_INT_MAX:
        raise ValueError(f"linear: a matrix dimension of a {a.shape} @ w {w.shape} exceeds the 32-bit BLAS range")
    if bias is not None and not (isinstance(bias, np.ndarray) and bias.shape == (N,) and bias.dtype == a.dtype
                                 and bias.flags.c_contiguous):
        raise ValueError(f"linear: bias must be a contiguous ({N},) {a.dtype} array")
    linear_checked(a, w, c, bias, row_start, row_stop, alpha, num_threads, rope, deterministic)


def linear_checked(a, w, c, bias=None, row_start=None, row_stop=None, alpha=1.0, num_threads=1,
                   rope=None, deterministic=True):
    """:func:`linear` on arguments that meet its checks by construction: a
    layer's validated input, its own weights, row buffers, lengths and RoPE
    spec. The checks cost more than a decode step's two small GEMMs (about
    3 us a call), and the kernel trusts the shapes, so nothing else may
    call this."""
    if a.shape[0] and a.shape[1] and w.shape[1]:
        _backend.cpu_backend().linear(a, w, c, bias=bias, row_start=row_start, row_stop=row_stop,
                                      alpha=alpha, rope=rope, num_threads=num_threads,
                                      deterministic=deterministic)


def _check_rope_epilogue(rope, c):
    """rope = (layout, heads, D, index, cos, sin) for c (B, M, N), see _linear."""
    B, M, N = c.shape
    layout, heads, D, index, cos, sin = rope
    if D <= 0 or D % 2 or heads < 0 or heads * D > N:
        raise ValueError(f"linear: bad RoPE heads ({heads}) or head dim ({D}) for {N} output columns")
    if not (isinstance(index, np.ndarray) and index.shape == (B, heads, M) and index.dtype == np.int64):
        raise ValueError(f"linear: the RoPE index must be an int64 {(B, heads, M)} view")
    if not all(isinstance(t, np.ndarray) and t.ndim == 2 and t.shape == cos.shape and t.shape[1] == D // 2
               and t.dtype == c.dtype and t.flags.c_contiguous for t in (cos, sin)):
        raise ValueError(f"linear: RoPE tables must be contiguous (n, {D // 2}) arrays of {c.dtype}")


def check_input_shape(shape, name, dim):
    """A layer input must be (B, L, dim) (every device)."""
    if len(shape) != 3 or shape[2] != dim:
        raise ValueError(f"{name} must have shape (B, L, {dim}), got {tuple(shape)}")


def as_input(a, name, dim, dtype):
    """``a`` as a (B, L, dim) array of ``dtype`` whose rows BLAS can read."""
    arr = as_array(a, name)
    if arr.dtype != dtype and (is_half_dtype(dtype) or arr.dtype.name == "bfloat16"):
        # a 16-bit layer takes its own dtype only (a silent rounding of
        # float32 inputs would hide the precision the caller chose), and a
        # float layer no bfloat16 (NumPy cannot promote it)
        raise TypeError(f"{name} has dtype {arr.dtype} but the layer's weights are {np.dtype(dtype)}: "
                        f"pass {np.dtype(dtype)} inputs, or convert the layer with "
                        f"layer.astype({arr.dtype.name!r})")
    if arr.dtype != dtype:
        compute_dtype(arr.dtype, name)  # rejects complex, object, ...
    check_input_shape(arr.shape, name, dim)
    if arr.dtype != dtype:
        arr = arr.astype(dtype)
    item = arr.itemsize
    s0, s1, s2 = arr.strides
    if (dim > 1 and s2 != item) or (arr.shape[1] > 1 and s1 < dim * item) or s0 < 0:
        arr = np.ascontiguousarray(arr)
    return arr


def head_view(cols, heads, D):
    """(B, L, heads * D) column block -> (B, heads, L, D) view, never a copy."""
    B, L, _ = cols.shape
    v = reshaped_view(cols, (B, L, heads, D))
    if v is None:  # the layer's buffers always split; a copy would lose the writes
        raise ValueError(f"head_view: a {cols.shape} array with strides {cols.strides} does not "
                         f"split into {heads} heads of {D} without a copy")
    return v.transpose(0, 2, 1, 3)


def row_buffer(B, L, N, dtype):
    """An uninitialised (B, L, N) scratch array for the layer's GEMM outputs,
    64-byte aligned, whose row stride is an odd number of 64-byte lines.

    SDPA reads a head as L rows of D elements, one row stride apart. With
    a stride of an even number of lines, successive rows fall into a few
    L1 sets only (a 2304-float stride, 144 lines, uses 4 of the 64 sets),
    and a key tile of 48 rows no longer fits L1 by associativity: measured
    8-10% slower attention inside the layer, S = 128 and 512, E = 768.
    An odd stride spreads successive rows over every set. BLAS takes the
    stride as the leading dimension, so the padding costs no pass.

    Up to 8 rows fit an 8-way L1 however they alias, and rows under 256
    bytes span few lines: those buffers stay plain, which saves the ~5 us
    of the alignment step on decode calls."""
    dtype = np.dtype(dtype)
    line = 64 // dtype.itemsize
    if L <= 8 or N * dtype.itemsize < 256:
        return np.empty((B, L, N), dtype=dtype)
    stride = (-(-N // line) | 1) * line
    count = B * L * stride
    raw = np.empty(count + line, dtype=dtype)
    # numpy aligns to at least 16 bytes, so the offset is whole elements
    start = (-raw.__array_interface__["data"][0] % 64) // dtype.itemsize
    return raw[start:start + count].reshape(B, L, stride)[:, :, :N]
