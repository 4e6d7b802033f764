"""The multi-head attention layer and its KV cache.

Data flow of one self-attention call, batch first, ``x`` of shape (B, L, E)::

    x @ [W_Q | W_K | W_V] (+ b)   one GEMM into buf (B, L, (H + 2 Hkv) D),
                                  its columns split over the OpenMP threads;
                                  buf's rows are padded to an odd number of
                                  cache lines (see _row_buffer)
      epilogue: RoPE              each thread rotates the Q and K heads of
                                  its own column block, from a cached table
    SDPA                          reads Q, K, V as strided (B, heads, L, D)
                                  views of buf and writes its output as a
                                  (B, H, L, D) view of attn (B, L, H D)
    attn @ W_O (+ b_O)            one GEMM into y (B, L, E)

So the head split is the projection's output layout (no transpose pass)
and the head merge is the attention kernel's output layout (no merge pass).
GEMMs go through ``scipy.linalg.cython_blas``, called from C
(csrc/linear.c, :func:`_linear`) without the GIL, and every step of a call runs on one pool of OpenMP
threads (see :class:`_OnePool`). Padded work is skipped: rows past
``query_lengths`` are neither projected nor attended, and K/V rows past
``key_lengths`` are never projected.
"""

import math
import os
import threading

import numpy as np

from fastattn import _kernels
from fastattn._config import get_num_threads
from fastattn._validation import compute_dtype, float_array, index_value, int_array, lengths_view
from fastattn.masks import prepare_mask
from fastattn.rotary import ROPE_LAYOUTS, ROPE_NONE, _check_base, rope_tables

_TOP_LEFT = _kernels.CAUSAL_ALIGNMENTS["top_left"]
_BOTTOM_RIGHT = _kernels.CAUSAL_ALIGNMENTS["bottom_right"]
_WEIGHT_NAMES = ("w_q", "w_k", "w_v", "w_o")
_BIAS_NAMES = ("b_q", "b_k", "b_v", "b_o")
_STATE_NAMES = _WEIGHT_NAMES + _BIAS_NAMES


class _OnePool:
    """Keeps scipy's BLAS single-threaded while layer calls run, so that all
    parallel work of a call runs on fastattn's OpenMP threads.

    Why: BLAS (OpenBLAS with its own pthreads pool) and the OpenMP kernels
    would otherwise take turns, and each pool's idle workers keep spinning
    for a while after their last job (libgomp ~300k pause loops, OpenBLAS
    yield loops), stealing cores from the other. Measured on a 2-core
    machine, a GEMM right after an attention call ran ~1.6x slower and the
    attention after a GEMM ~1.4x slower than back to back. So the layer
    splits each GEMM's columns over its OpenMP threads (csrc/linear.c),
    each block a single-threaded BLAS call, and RoPE and attention
    follow on the same threads.

    Scipy's BLAS thread count is lowered with threadpoolctl (as scikit-learn
    does around its OpenMP loops that call BLAS) and restored when the last
    concurrent call returns. Without threadpoolctl or OpenMP, or when
    another thread controls the BLAS thread count, BLAS keeps its own
    threads and the GEMMs are single calls.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._libs = None  # None: not looked up yet; []: cannot pin
        self._depth = 0
        self._saved = []
        self._changed = False
        self._pinned = False

    def _lookup(self):
        libs = []
        if _kernels.openmp_enabled():
            try:
                from threadpoolctl import ThreadpoolController
                libs = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
            except Exception:  # not installed, or an unusual BLAS: keep BLAS threading
                libs = []
        self._libs = libs

    def enter(self):
        """Pin BLAS (first concurrent caller); True when the GEMMs may be
        split over OpenMP threads."""
        with self._lock:
            if self._libs is None:
                self._lookup()
            self._depth += 1
            if self._depth == 1 and self._libs:
                try:
                    self._saved = [lib.get_num_threads() for lib in self._libs]
                    self._changed = any(n != 1 for n in self._saved)
                    for lib, n in zip(self._libs, self._saved):
                        if n != 1:
                            lib.set_num_threads(1)
                    # a no-op when another thread controls the BLAS thread count
                    self._pinned = all(lib.get_num_threads() == 1 for lib in self._libs)
                except Exception:
                    self._pinned = False
            return self._pinned

    def exit(self):
        with self._lock:
            self._depth -= 1
            if self._depth == 0 and self._changed:
                self._changed = self._pinned = False
                try:
                    for lib, n in zip(self._libs, self._saved):
                        if n != 1 and n is not None:
                            lib.set_num_threads(n)
                        # threadpoolctl >= 3.7 lets one thread control a
                        # pthreads OpenBLAS; do not keep that control
                        clear = getattr(lib, "clear_controlling_thread", None)
                        if clear is not None:
                            clear()
                except Exception:
                    pass
            elif self._depth == 0:
                self._pinned = False


_POOL = _OnePool()
_BLAS_INT_MAX = 2**31 - 1  # BLAS sizes and leading dimensions are 32-bit ints


def _linear(a, w, c, bias=None, row_start=None, row_stop=None, alpha=1.0, num_threads=1, rope=None):
    """``c[b, r0:r1] = alpha * a[b, r0:r1] @ w (+ bias)`` for every b, with
    ``r0 = row_start[b]`` (default 0) and ``r1 = row_stop[b]`` (default M),
    then RoPE on the first heads of those rows (csrc/linear.c, fa_linear).

    a (B, M, K), w (K, N), c (B, M, N): one dtype (float32 or float64), unit
    last-axis strides, any row and batch strides (column blocks of a wider
    buffer are fine). bias: None or a contiguous (N,) array. row_start,
    row_stop: None or contiguous (B,) int64 arrays within [0, M]; rows
    outside [r0, r1) are left untouched. num_threads: OpenMP threads over
    column blocks (BLAS must be single-threaded then: see _OnePool). rope:
    None or ``(layout, heads, D, index, cos, sin)``: rotate columns
    ``[0, heads * D)`` of the computed rows as ``heads`` heads of dim D, row
    ``(b, h, i)`` by table row ``index[b, h, i]`` (an int64 (B, heads, M)
    view; cos, sin contiguous (n, D/2) tables of c's dtype).
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
    for name, t in (("a", a), ("w", w), ("c", c)):
        rows, cols = t.shape[-2:]
        if t.size and cols > 1 and t.strides[-1] != item:
            raise ValueError(f"linear: {name} needs a unit last-axis stride, got strides {t.strides}")
        if rows > 1 and cols > 0 and t.strides[-2] < cols * item:
            raise ValueError(f"linear: the rows of {name} {t.shape} overlap (strides {t.strides})")
        if rows > 1 and t.strides[-2] // item > _BLAS_INT_MAX:
            raise ValueError(f"linear: the row stride of {name} exceeds the 32-bit BLAS range")
    if max(M, N, K) > _BLAS_INT_MAX:
        raise ValueError(f"linear: a matrix dimension of a {a.shape} @ w {w.shape} exceeds the 32-bit BLAS range")
    if bias is not None and not (isinstance(bias, np.ndarray) and bias.shape == (N,) and bias.dtype == a.dtype
                                 and bias.flags.c_contiguous):
        raise ValueError(f"linear: bias must be a contiguous ({N},) {a.dtype} array")
    _kernels.linear(a, w, c, bias, row_start, row_stop, alpha, num_threads, rope)


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


def _float_dtype(dtype, name="dtype"):
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"{name} must be float32 or float64, got {dt}")
    return dt


def _positive(value, name):
    v = index_value(value, name)
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return v


def _as_input(a, name, dim, dtype):
    """``a`` as a (B, L, dim) array of ``dtype`` whose rows BLAS can read."""
    arr = a if type(a) is np.ndarray else np.asarray(a)
    if arr.dtype != dtype:
        compute_dtype(arr.dtype, name)  # rejects complex, object, ...
    if arr.ndim != 3 or arr.shape[2] != dim:
        raise ValueError(f"{name} must have shape (B, L, {dim}), got {arr.shape}")
    if arr.dtype != dtype:
        arr = arr.astype(dtype)
    item = arr.itemsize
    s0, s1, s2 = arr.strides
    if (dim > 1 and s2 != item) or (arr.shape[1] > 1 and s1 < dim * item) or s0 < 0:
        arr = np.ascontiguousarray(arr)
    return arr


def _head_view(cols, heads, D):
    """(B, L, heads * D) column block -> (B, heads, L, D) view, never a copy."""
    B, L, _ = cols.shape
    v = cols.view()
    v.shape = (B, L, heads, D)  # raises rather than copy
    return v.transpose(0, 2, 1, 3)


def _row_buffer(B, L, N, dtype):
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


class _CacheBook:
    """What the CPU :class:`KVCache` and ``fastattn.cuda.KVCache`` share:
    the checked geometry, the per-sequence lengths, ``reset`` and the
    overflow check of an append. Subclasses allocate ``k`` and ``v``."""

    def _init_geometry(self, batch_size, max_len, num_kv_heads, head_dim, dtype):
        self.batch_size = index_value(batch_size, "batch_size")
        self.max_len = index_value(max_len, "max_len")
        if self.batch_size < 0 or self.max_len < 0:
            raise ValueError(f"batch_size and max_len must be non-negative, got {batch_size} and {max_len}")
        self.num_kv_heads = _positive(num_kv_heads, "num_kv_heads")
        self.head_dim = _positive(head_dim, "head_dim")
        self.dtype = _float_dtype(dtype)
        self._lengths = np.zeros(self.batch_size, dtype=np.int64)

    @property
    def lengths(self):
        """Tokens held per sequence, shape ``(batch_size,)`` (a copy)."""
        return self._lengths.copy()

    def reset(self, lengths=None):
        """Forget the contents (or truncate each sequence to ``lengths``)."""
        if lengths is None:
            self._lengths[:] = 0
            return
        arr = int_array(lengths, "lengths")
        if arr.shape not in ((), (self.batch_size,)):
            raise ValueError(f"lengths must have shape ({self.batch_size},), got {arr.shape}")
        if arr.size and (arr > self._lengths).any():
            raise ValueError(f"reset can only shorten sequences: lengths {arr} exceed the current {self._lengths}")
        self._lengths[:] = arr

    def _append_lengths(self, new_tokens):
        """(old, new) lengths once ``new_tokens[b]`` tokens are appended to
        each sequence b; ValueError, with nothing changed, on overflow."""
        old = self._lengths.copy()
        new = old + new_tokens
        if self.batch_size and (new > self.max_len).any():
            b = int(np.argmax(new > self.max_len))
            raise ValueError(
                f"KV cache overflow: sequence {b} holds {old[b]} of max_len={self.max_len} tokens and "
                f"cannot take {new_tokens[b]} more; nothing was appended")
        return old, new

    def _repr_fields(self):
        return (f"batch_size={self.batch_size}, max_len={self.max_len}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, dtype={self.dtype.name}")

    def __repr__(self):
        return f"{type(self).__name__}({self._repr_fields()}, lengths={self._lengths.tolist()})"


class KVCache(_CacheBook):
    """Preallocated keys and values of a batch of sequences, for decoding.

    Create it with :meth:`MultiHeadAttention.new_cache`. ``k`` and ``v`` have
    shape ``(batch_size, num_kv_heads, max_len, head_dim)`` and are
    allocated once; a layer call with ``cache=`` writes the new keys and
    values (RoPE already applied) at each sequence's current length and
    advances ``lengths``. Entries at or past ``lengths[b]`` are unspecified.
    Sequences may have different lengths (ragged batches).
    """

    def __init__(self, batch_size, max_len, num_kv_heads, head_dim, dtype=np.float32):
        self._init_geometry(batch_size, max_len, num_kv_heads, head_dim, dtype)
        shape = (self.batch_size, self.num_kv_heads, self.max_len, self.head_dim)
        self.k = np.zeros(shape, dtype=self.dtype)
        self.v = np.zeros(shape, dtype=self.dtype)

    # named here so that the API reference lists them on this class
    lengths = _CacheBook.lengths
    reset = _CacheBook.reset


def _query_lengths(values, B, L):
    """``query_lengths`` of a layer call: None or a contiguous int64 (B,)."""
    if values is None:
        return None
    arr = int_array(values, "query_lengths")
    if arr.shape != (B,):
        raise ValueError(f"query_lengths must have shape ({B},) for a batch of {B}, got {arr.shape}")
    if arr.size and arr.max() > L:
        raise ValueError(f"query_lengths must be <= the query length {L}, got max {arr.max()}")
    return np.ascontiguousarray(arr)


def _check_cache_call(layer, cache, cache_type, key, key_lengths, attn_mask, move_hint=""):
    """The arguments a layer call with ``cache=`` refuses (CPU and GPU);
    ``move_hint`` ends the message when ``cache`` is the other path's
    KVCache."""
    if key is not None:
        raise ValueError("cache= is for self-attention decoding: key and value must be None")
    if key_lengths is not None or attn_mask is not None:
        raise ValueError("key_lengths and attn_mask are not accepted with cache=: the cache's "
                         "lengths and causality decide which keys each query sees")
    if not isinstance(cache, cache_type):
        got = type(cache).__name__
        if isinstance(cache, _CacheBook):  # the other path's KVCache
            got = f"{type(cache).__module__}.{got}{move_hint}"
        raise TypeError(f"cache must be a KVCache (from new_cache), got {got}")
    E = layer.embed_dim
    if layer.kdim != E or layer.vdim != E:
        raise ValueError(f"cache= is self-attention and needs kdim == vdim == embed_dim ({E}); this "
                         f"layer has kdim={layer.kdim}, vdim={layer.vdim}")


def _check_cache_fits(cache, num_kv_heads, head_dim, dtype, query_shape):
    """The cache holds this layer's kv heads, head dim and dtype, for the
    query's batch."""
    if (cache.num_kv_heads, cache.head_dim, cache.dtype) != (num_kv_heads, head_dim, dtype):
        raise ValueError(f"cache holds {cache.num_kv_heads} kv heads of dim {cache.head_dim} in "
                         f"{cache.dtype}; this layer needs {num_kv_heads} of dim {head_dim} in {dtype}")
    if cache.batch_size != query_shape[0]:
        raise ValueError(f"cache is for a batch of {cache.batch_size}, got query {tuple(query_shape)}")


class MultiHeadAttention:
    """Multi-head attention: ``softmax(Q Kᵀ / √D + masks) V`` per head, heads
    concatenated and projected, as ``torch.nn.MultiheadAttention``
    (``batch_first=True``), plus grouped-query attention, RoPE and a KV
    cache.

    Parameters
    ----------
    embed_dim : int
        E, the width of ``query`` and of the output.
    num_heads : int
        H; ``head_dim = embed_dim // num_heads`` (must divide).
    num_kv_heads : int, optional
        Hkv, heads of K and V (grouped-query attention; 1 is multi-query).
        Must divide ``num_heads``; defaults to ``num_heads``.
    kdim, vdim : int, optional
        Widths of ``key`` and ``value`` (cross-attention); default E.
    bias : bool, default True
        Biases on the four projections.
    rope : {None, "neox", "gptj"}
        Rotary embedding of Q and K (see :func:`fastattn.apply_rotary`),
        applied right after the projection. Positions are ``0..L-1`` within
        a call, or continue from each sequence's cache length with
        ``cache=``.
    rope_base : float, default 10000.0
    dtype : float32 or float64
        Weights and computation; inputs are converted to it.
    seed : int or numpy.random.Generator, optional
        Initialisation as torch does it: Xavier-uniform input projections
        (over the stacked ``[W_Q; W_K; W_V]`` when ``kdim == vdim ==
        embed_dim``, else each on its own), the output projection
        ``U(-1/√(H·D), 1/√(H·D))`` (torch's ``Linear`` default) and zero
        biases.

    Weights are stored in the ``(in, out)`` layout, so ``x @ w_q`` is the
    query projection; :meth:`state_dict` returns them.

    A call runs on :func:`fastattn.get_num_threads` OpenMP threads: the
    projections split their columns over them, each block a
    single-threaded BLAS call, so scipy's BLAS is held at one thread for
    the duration of a call (through threadpoolctl; restored afterwards).

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> mha = fastattn.MultiHeadAttention(16, 4, seed=0)
    >>> x = np.random.default_rng(0).standard_normal((2, 5, 16), dtype=np.float32)
    >>> y = mha(x, key_lengths=[5, 3], is_causal=True)
    >>> y.shape, y.dtype
    ((2, 5, 16), dtype('float32'))
    """

    def __init__(self, embed_dim, num_heads, *, num_kv_heads=None, kdim=None, vdim=None,
                 bias=True, rope=None, rope_base=10000.0, dtype=np.float32, seed=None):
        E = _positive(embed_dim, "embed_dim")
        H = _positive(num_heads, "num_heads")
        if E % H:
            raise ValueError(f"embed_dim ({E}) must be divisible by num_heads ({H})")
        self._configure(E, H, num_kv_heads, E // H, kdim, vdim, bool(bias), rope, rope_base,
                        _float_dtype(dtype))
        self._init_weights(np.random.default_rng(seed))

    # ---- construction -------------------------------------------------------

    def _configure(self, E, H, Hkv, D, kdim, vdim, bias, rope, rope_base, dtype):
        Hkv = H if Hkv is None else _positive(Hkv, "num_kv_heads")
        if H % Hkv:
            raise ValueError(f"num_kv_heads ({Hkv}) must divide num_heads ({H})")
        self.embed_dim = E
        self.num_heads = H
        self.num_kv_heads = Hkv
        self.head_dim = D
        self.kdim = E if kdim is None else _positive(kdim, "kdim")
        self.vdim = E if vdim is None else _positive(vdim, "vdim")
        self.dtype = dtype
        if rope is not None and rope not in ROPE_LAYOUTS:
            raise ValueError(f"rope must be None or one of {list(ROPE_LAYOUTS)}, got {rope!r}")
        if rope is not None and D % 2:
            raise ValueError(f"rope needs an even head_dim, got {D}")
        self.rope = rope
        self.rope_base = _check_base(rope_base)
        self._rope_cache = None
        self._has_bias = bias
        nq, nk = H * D, Hkv * D
        # Storage: one (E, nq + 2 nk) matrix when self-attention can use a
        # fused QKV GEMM, else Q apart and K|V fused when they share a width.
        if self.kdim == self.vdim == E:
            self._w_in = np.zeros((E, nq + 2 * nk), dtype)
            self._w_q, self._w_kv = self._w_in[:, :nq], self._w_in[:, nq:]
        else:
            self._w_in = None
            self._w_q = np.zeros((E, nq), dtype)
            self._w_kv = np.zeros((self.kdim, 2 * nk), dtype) if self.kdim == self.vdim else None
        if self._w_kv is not None:
            self._w_k, self._w_v = self._w_kv[:, :nk], self._w_kv[:, nk:]
        else:
            self._w_k = np.zeros((self.kdim, nk), dtype)
            self._w_v = np.zeros((self.vdim, nk), dtype)
        self._w_o = np.zeros((nq, E), dtype)
        if bias:
            self._b_in = np.zeros(nq + 2 * nk, dtype)
            self._b_q, self._b_kv = self._b_in[:nq], self._b_in[nq:]
            self._b_k, self._b_v = self._b_in[nq:nq + nk], self._b_in[nq + nk:]
            self._b_o = np.zeros(E, dtype)
        else:
            self._b_in = self._b_q = self._b_kv = self._b_k = self._b_v = self._b_o = None

    def _init_weights(self, rng):
        E, nq, nk = self.embed_dim, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim

        def xavier(fan_in, fan_out, shape):
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            return rng.uniform(-bound, bound, size=shape)

        if self._w_in is not None:
            self._w_in[...] = xavier(E, nq + 2 * nk, self._w_in.shape)
        else:
            self._w_q[...] = xavier(E, nq, self._w_q.shape)
            self._w_k[...] = xavier(self.kdim, nk, self._w_k.shape)
            self._w_v[...] = xavier(self.vdim, nk, self._w_v.shape)
        bound = 1.0 / math.sqrt(nq)
        self._w_o[...] = rng.uniform(-bound, bound, size=self._w_o.shape)

    @classmethod
    def from_weights(cls, w_q, w_k, w_v, w_o, b_q=None, b_k=None, b_v=None, b_o=None, *,
                     num_heads, num_kv_heads=None, rope=None, rope_base=10000.0):
        """A layer with the given weights in the ``(in, out)`` layout.

        ``w_q`` is ``(E, H·D)``, ``w_k`` ``(kdim, Hkv·D)``, ``w_v``
        ``(vdim, Hkv·D)`` and ``w_o`` ``(H·D, E)``; ``head_dim`` is
        ``w_q.shape[1] // num_heads``. Biases are ``(out,)``; when any is
        given the others default to zeros. The dtype is the weights'
        compute dtype (float32 or float64). The arrays are copied.
        """
        ws = {n: float_array(w, n) for n, w in zip(_WEIGHT_NAMES, (w_q, w_k, w_v, w_o))}
        bs = {n: None if b is None else float_array(b, n) for n, b in zip(_BIAS_NAMES, (b_q, b_k, b_v, b_o))}
        dtype = np.result_type(*ws.values(), *(b for b in bs.values() if b is not None))
        for n, w in ws.items():
            if w.ndim != 2:
                raise ValueError(f"{n} must be 2-D (in, out), got shape {w.shape}")
        H = _positive(num_heads, "num_heads")
        E, nq = ws["w_q"].shape
        if nq == 0 or nq % H:
            raise ValueError(f"w_q's output width {nq} (shape {ws['w_q'].shape}) must be a positive multiple of num_heads ({H})")
        D = nq // H
        Hkv = H if num_kv_heads is None else _positive(num_kv_heads, "num_kv_heads")
        self = cls.__new__(cls)
        self._configure(E, H, Hkv, D, ws["w_k"].shape[0], ws["w_v"].shape[0],
                        any(b is not None for b in bs.values()), rope, rope_base, dtype)
        self._load({**ws, **bs}, partial_bias=True)
        return self

    @classmethod
    def from_torch(cls, module):
        """Convert a ``torch.nn.MultiheadAttention`` (with or without bias,
        with or without separate ``kdim``/``vdim``). torch weights are
        ``(out, in)`` and are transposed; float64 modules give a float64
        layer, every other dtype float32. ``add_bias_kv`` and
        ``add_zero_attn`` are not supported; dropout does not apply at
        inference."""
        try:
            import torch
        except ImportError as exc:  # pragma: no cover - exercised without torch
            raise ImportError("MultiHeadAttention.from_torch needs torch (pip install torch)") from exc
        if not isinstance(module, torch.nn.MultiheadAttention):
            raise TypeError(f"from_torch expects a torch.nn.MultiheadAttention, got {type(module).__name__}")
        if module.bias_k is not None or module.bias_v is not None:
            raise ValueError("from_torch: add_bias_kv=True is not supported")
        if module.add_zero_attn:
            raise ValueError("from_torch: add_zero_attn=True is not supported")
        dtype = np.float64 if module.out_proj.weight.dtype == torch.float64 else np.float32

        def arr(t):
            return None if t is None else t.detach().to("cpu", torch.float64).numpy().astype(dtype)

        E = module.embed_dim
        if module._qkv_same_embed_dim:
            w = arr(module.in_proj_weight)
            w_q, w_k, w_v = w[:E].T, w[E:2 * E].T, w[2 * E:].T
        else:
            w_q = arr(module.q_proj_weight).T
            w_k = arr(module.k_proj_weight).T
            w_v = arr(module.v_proj_weight).T
        b = arr(module.in_proj_bias)
        b_q, b_k, b_v = (None, None, None) if b is None else (b[:E], b[E:2 * E], b[2 * E:])
        return cls.from_weights(w_q, w_k, w_v, arr(module.out_proj.weight).T, b_q, b_k, b_v,
                                arr(module.out_proj.bias), num_heads=module.num_heads)

    # ---- state ---------------------------------------------------------------

    def _expected_shapes(self):
        E, nq, nk = self.embed_dim, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"w_q": (E, nq), "w_k": (self.kdim, nk), "w_v": (self.vdim, nk), "w_o": (nq, E),
                "b_q": (nq,), "b_k": (nk,), "b_v": (nk,), "b_o": (E,)}

    def _targets(self):
        return {"w_q": self._w_q, "w_k": self._w_k, "w_v": self._w_v, "w_o": self._w_o,
                "b_q": self._b_q, "b_k": self._b_k, "b_v": self._b_v, "b_o": self._b_o}

    def _load(self, d, partial_bias=False):
        shapes, targets = self._expected_shapes(), self._targets()
        arrays = {}
        for n in _STATE_NAMES:
            a = d.get(n)
            if a is None:
                if n in _WEIGHT_NAMES:
                    raise ValueError(f"state is missing {n}")
                if self._has_bias and not partial_bias:
                    raise ValueError(f"state has no {n}, but the layer has biases (bias=True)")
                continue
            if n in _BIAS_NAMES and not self._has_bias:
                raise ValueError(f"state has {n}, but the layer has no biases (bias=False)")
            a = float_array(a, n)
            if a.shape != shapes[n]:
                raise ValueError(f"{n} must have shape {shapes[n]}, got {a.shape}")
            arrays[n] = a
        for n, a in arrays.items():  # all checked: now copy
            targets[n][...] = a

    def state_dict(self):
        """The weights as NumPy arrays (copies): ``w_q, w_k, w_v, w_o`` in
        the ``(in, out)`` layout and ``b_q, b_k, b_v, b_o`` (None without
        bias)."""
        return {n: None if a is None else a.copy() for n, a in self._targets().items()}

    def load_state_dict(self, d):
        """Copy the weights of ``d`` (as from :meth:`state_dict`) into the
        layer; shapes must match, and biases are required exactly when the
        layer has them. Nothing is changed when a check fails."""
        self._load(d)

    def save(self, path):
        """Write the weights and the configuration to an ``.npz`` file."""
        arrays = {n: a for n, a in self._targets().items() if a is not None}
        np.savez(path, **arrays, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                 rope=np.str_(self.rope or ""), rope_base=self.rope_base)

    @classmethod
    def load(cls, path):
        """A layer from a file written by :meth:`save`."""
        if isinstance(path, (str, os.PathLike)) and not os.path.exists(path) and os.path.exists(f"{os.fspath(path)}.npz"):
            path = f"{os.fspath(path)}.npz"
        with np.load(path, allow_pickle=False) as f:
            d = {n: f[n] if n in f.files else None for n in _STATE_NAMES}
            rope = str(f["rope"]) or None
            return cls.from_weights(*(d[n] for n in _STATE_NAMES), num_heads=int(f["num_heads"]),
                                    num_kv_heads=int(f["num_kv_heads"]), rope=rope,
                                    rope_base=float(f["rope_base"]))

    def new_cache(self, batch_size, max_len):
        """A preallocated :class:`KVCache` for ``batch_size`` sequences of up
        to ``max_len`` tokens each."""
        return KVCache(batch_size, max_len, self.num_kv_heads, self.head_dim, self.dtype)

    def __repr__(self):
        return (f"MultiHeadAttention(embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, kdim={self.kdim}, "
                f"vdim={self.vdim}, bias={self._has_bias}, rope={self.rope!r}, dtype={self.dtype.name})")

    # ---- the call --------------------------------------------------------------

    def _rope_table(self, n):
        """cos/sin tables for positions 0..n-1 (at least), cached and grown
        by doubling."""
        cached = self._rope_cache
        if cached is not None and cached[0].shape[0] >= n:
            return cached
        size = max(n, 256, 2 * cached[0].shape[0] if cached is not None else 0)
        cached = rope_tables(size, self.head_dim // 2, self.rope_base, self.dtype,
                             get_num_threads())
        self._rope_cache = cached
        return cached

    def __call__(self, query, key=None, value=None, *, key_lengths=None, query_lengths=None,
                 attn_mask=None, is_causal=False, return_weights=False, cache=None):
        """Attend from ``query`` to ``key``/``value`` (or to ``query`` itself).

        Parameters
        ----------
        query : array_like, shape ``(B, Lq, embed_dim)``
        key, value : array_like, shapes ``(B, Lk, kdim)`` and ``(B, Lk, vdim)``, optional
            Both None: self-attention (``Lk = Lq``).
        key_lengths : array_like of int, shape ``(B,)`` or ``(B, H)``, optional
            Keys ``j >= key_lengths`` are masked (torch's
            ``key_padding_mask``, as lengths); their K and V are never
            computed.
        query_lengths : array_like of int, shape ``(B,)``, optional
            Output rows ``i >= query_lengths`` are exactly 0 (after the
            output projection and its bias too) and are never computed.
        attn_mask : array_like, optional
            Broadcasts to ``(B, H, Lq, Lk)``. Bool: True = may attend (the
            opposite of torch's bool masks). Real: added to the scores.
        is_causal : bool
            Mask keys ``j > i`` (top-left aligned, as torch).
        return_weights : bool
            Also return the ``(B, H, Lq, Lk)`` attention weights. Rows with
            no key left are 0 (torch gives NaN there), and their output is
            the output bias alone.
        cache : KVCache, optional
            Self-attention decoding: the new tokens' keys and values are
            appended to ``cache`` (at each sequence's length; with
            ``query_lengths``, only that many tokens per sequence) and the
            queries attend, causally and bottom-right aligned, to everything
            the cache holds. ``key``, ``value``, ``key_lengths`` and
            ``attn_mask`` are not accepted then; if a sequence would
            overflow ``max_len``, ValueError is raised and nothing is
            appended.

        Returns
        -------
        out : ndarray ``(B, Lq, embed_dim)`` of the layer's dtype
        weights : ndarray ``(B, H, Lq, Lk)``, only with ``return_weights``
        """
        x = _as_input(query, "query", self.embed_dim, self.dtype)
        if (key is None) != (value is None):
            raise ValueError("pass both key and value (cross-attention) or neither (self-attention)")
        if cache is not None:
            _check_cache_call(self, cache, KVCache, key, key_lengths, attn_mask)
            ql = _query_lengths(query_lengths, x.shape[0], x.shape[1])
            _check_cache_fits(cache, self.num_kv_heads, self.head_dim, self.dtype, x.shape)
            nt = get_num_threads()
            gt = nt if _POOL.enter() else 1
            try:
                return self._call_cached(x, cache, ql, bool(return_weights), nt, gt)
            finally:
                _POOL.exit()
        B, Lq, _ = x.shape
        H = self.num_heads
        if key is None:
            if self._w_in is None:
                raise ValueError(f"self-attention needs kdim == vdim == embed_dim; this layer has "
                                 f"kdim={self.kdim}, vdim={self.vdim}: pass key and value")
            kx = vx = None
            Lk = Lq
        else:
            kx = _as_input(key, "key", self.kdim, self.dtype)
            vx = kx if value is key else _as_input(value, "value", self.vdim, self.dtype)
            if kx.shape[0] != B or vx.shape[0] != B or kx.shape[1] != vx.shape[1]:
                raise ValueError(f"query, key and value must have the same batch size, and key and value "
                                 f"the same length; got query {x.shape}, key {kx.shape}, value {vx.shape}")
            Lk = kx.shape[1]
        ql = _query_lengths(query_lengths, B, Lq)
        kl = lengths_view(key_lengths, "key_lengths", (B, H), B, H, Lk, "key")
        full = (B, H, Lq, Lk)
        kind, mask4 = prepare_mask(attn_mask, full, full, self.dtype)
        nt = get_num_threads()
        gt = nt if _POOL.enter() else 1
        try:
            return self._forward(x, kx, vx, Lk, ql, kl, kind, mask4, bool(is_causal),
                                 bool(return_weights), nt, gt)
        finally:
            _POOL.exit()

    def _forward(self, x, kx, vx, Lk, ql, kl, kind, mask4, is_causal, return_weights, nt, gt):
        """The uncached call, arguments validated; nt threads for the
        kernels, gt for the GEMMs (1: BLAS threads itself)."""
        B, Lq, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        nq, nk = H * D, Hkv * D
        full = (B, H, Lq, Lk)
        mm = _linear
        # rows that need projecting: queries up to their length, keys and
        # values up to the longest key length of any head
        q_need = ql
        kv_need = None if kl is None else np.ascontiguousarray(kl.max(axis=1))
        dt = self.dtype
        # RoPE is the GEMMs' epilogue: each thread rotates the Q/K heads of
        # the column block it has just computed (Q and K lead their buffers)
        rope = self._rope_spec
        if kx is None:
            buf = _row_buffer(B, Lq, nq + 2 * nk, dt)
            if q_need is None and kv_need is None:
                mm(x, self._w_in, buf, self._b_in, None, None, 1.0, gt, rope(B, H + Hkv, Lq))
            else:
                qn = np.full(B, Lq, np.int64) if q_need is None else q_need
                kn = np.full(B, Lk, np.int64) if kv_need is None else kv_need
                both = np.minimum(qn, kn)
                mm(x, self._w_in, buf, self._b_in, None, both, 1.0, gt, rope(B, H + Hkv, Lq))
                if (qn > both).any():
                    mm(x, self._w_q, buf[:, :, :nq], self._b_q, both, qn, 1.0, gt, rope(B, H, Lq))
                if (kn > both).any():
                    mm(x, self._w_kv, buf[:, :, nq:], self._b_kv, both, kn, 1.0, gt, rope(B, Hkv, Lk))
            qcols, kcols, vcols = buf[:, :, :nq], buf[:, :, nq:nq + nk], buf[:, :, nq + nk:]
        else:
            qcols = _row_buffer(B, Lq, nq, dt)
            mm(x, self._w_q, qcols, self._b_q, None, q_need, 1.0, gt, rope(B, H, Lq))
            if kx is vx and self._w_kv is not None:
                kvbuf = _row_buffer(B, Lk, 2 * nk, dt)
                mm(kx, self._w_kv, kvbuf, self._b_kv, None, kv_need, 1.0, gt, rope(B, Hkv, Lk))
                kcols, vcols = kvbuf[:, :, :nk], kvbuf[:, :, nk:]
            else:
                kcols = _row_buffer(B, Lk, nk, dt)
                vcols = _row_buffer(B, Lk, nk, dt)
                mm(kx, self._w_k, kcols, self._b_k, None, kv_need, 1.0, gt, rope(B, Hkv, Lk))
                mm(vx, self._w_v, vcols, self._b_v, None, kv_need, 1.0, gt)

        attn = _row_buffer(B, Lq, nq, dt)
        weights = np.empty(full, dtype=dt) if return_weights else None
        qlv = None if ql is None else np.broadcast_to(ql[:, None], (B, H))
        _kernels.scaled_dot_product_attention(
            _head_view(qcols, H, D), _head_view(kcols, Hkv, D), _head_view(vcols, Hkv, D),
            _head_view(attn, H, D), weights, 1.0 / math.sqrt(D), mask4, kind, kl, qlv,
            is_causal, _TOP_LEFT, None, nt)
        out = self._project_out(attn, ql, gt)
        return (out, weights) if return_weights else out

    def _rope_spec(self, B, heads, L, positions=None):
        """The RoPE epilogue of a projection (None without rope): its first
        ``heads`` heads, row i of batch b at ``positions[b, i]`` (default
        i), rotated by the layer's cached table."""
        if self.rope is None:
            return None
        if positions is None:
            cos, sin = self._rope_table(L)
            index = np.broadcast_to(np.arange(L, dtype=np.int64), (B, heads, L))
        else:
            cos, sin = self._rope_table(int(positions.max()) + 1 if positions.size else 0)
            index = np.broadcast_to(positions[:, None, :], (B, heads, L))
        return (ROPE_LAYOUTS[self.rope], heads, self.head_dim, index, cos, sin)

    def _project_out(self, attn, ql, gt):
        """attn (B, Lq, H*D) @ W_O + b_O; rows past query_lengths are 0."""
        B, Lq, _ = attn.shape
        alloc = np.empty if ql is None else np.zeros
        out = alloc((B, Lq, self.embed_dim), dtype=self.dtype)
        _linear(attn, self._w_o, out, self._b_o, None, ql, 1.0, gt)
        return out

    def _call_cached(self, x, cache, ql, return_weights, nt, gt):
        B, L, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        nq, nk = H * D, Hkv * D
        new_tokens = np.full(B, L, np.int64) if ql is None else ql
        old, new = cache._append_lengths(new_tokens)
        dt = self.dtype
        buf = _row_buffer(B, L, nq + 2 * nk, dt)
        rope = None
        if self.rope is not None:
            # positions continue each sequence; padded rows are never rotated
            pos = np.minimum(old[:, None] + np.arange(L, dtype=np.int64), max(cache.max_len - 1, 0))
            rope = self._rope_spec(B, H + Hkv, L, pos)
        _linear(x, self._w_in, buf, self._b_in, None, ql, 1.0, gt, rope)
        q4 = _head_view(buf[:, :, :nq], H, D)
        k4 = _head_view(buf[:, :, nq:nq + nk], Hkv, D)
        v4 = _head_view(buf[:, :, nq + nk:], Hkv, D)
        # append: row i of sequence b goes to cache row old[b] + i, i < new_tokens[b]
        _kernels.rope_apply(k4, cache.k, None, None, None, ROPE_NONE, old, new_tokens, nt)
        _kernels.rope_apply(v4, cache.v, None, None, None, ROPE_NONE, old, new_tokens, nt)
        cache._lengths[:] = new

        Lk = int(new.max()) if B else 0
        attn = _row_buffer(B, L, nq, dt)
        out4 = _head_view(attn, H, D)
        weights = np.zeros((B, H, L, Lk), dtype=dt) if return_weights else None
        scale = 1.0 / math.sqrt(D)
        ck, cv = cache.k[:, :, :Lk], cache.v[:, :, :Lk]
        if B == 0 or L == 1 or (ql is None and (old == old[0]).all()):
            # one call: a single new token sees every key its sequence holds
            # (key_lengths), and equal lengths align bottom-right for all
            kl = np.broadcast_to(new[:, None], (B, H)) if L == 1 else None
            qlv = None if ql is None else np.broadcast_to(ql[:, None], (B, H))
            _kernels.scaled_dot_product_attention(q4, ck, cv, out4, weights, scale, None, 0, kl, qlv,
                                                  L > 1, _BOTTOM_RIGHT, None, nt)
        else:
            # ragged: bottom-right alignment differs per sequence
            for b in range(B):
                n, t = int(new[b]), int(new_tokens[b])
                if t == 0:
                    continue
                _kernels.scaled_dot_product_attention(
                    q4[b:b + 1, :, :t], ck[b:b + 1, :, :n], cv[b:b + 1, :, :n], out4[b:b + 1, :, :t],
                    None if weights is None else weights[b:b + 1, :, :t, :n], scale, None, 0, None, None,
                    True, _BOTTOM_RIGHT, None, nt)
        out = self._project_out(attn, ql, gt)
        return (out, weights) if return_weights else out
