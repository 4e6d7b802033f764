"""The CUDA backend: fastattn's CUDA kernels and cuBLAS on CUDA arrays.

The public functions of :mod:`fastattn` validate their arguments once and
then call the kernels of the backend their arrays live on (see
:mod:`fastattn._backend`). This module is that backend for CUDA arrays: the
same kernel table as :mod:`fastattn._backend.cpu` (``KERNELS``, identical
signatures; tests/test_cuda.py compares them) and the same array helpers
(``asarray``, ``host``, ``operand``, ``kernel_input``, ``attention_mask``,
``output``, ...). Arrays come in as CuPy arrays or any object exposing
``__cuda_array_interface__`` or CUDA ``__dlpack__`` (for example torch CUDA
tensors); results are CuPy arrays on the current CuPy device and stream.
Small per-call data (lengths, masks, slopes, positions) may be host or device
arrays.

What is CUDA-specific lives here and nowhere else: the device-array adapter
(:class:`_Array`: pointer, shape, element strides), the per-call runtime
(:class:`_Runtime`: device, stream, cuBLAS handle, allocation), the kernels,
and :class:`DeviceLayer`, the weights of a
:class:`fastattn.MultiHeadAttention` moved to the GPU.

The work is done by fastattn's own CUDA kernels and cuBLAS (built only with
``FASTATTN_CUDA=1``, see docs/gpu.md); CuPy is only the array type and the
allocator: no result is computed by a CuPy kernel. Importing this module
imports neither CuPy nor the extension; both are loaded on first use.
"""

import importlib
import math
import sys
import threading

import numpy as np

from fastattn._backend import CudaUnavailableError, is_device_array
from fastattn._kernels import MASK_NONE as _MASK_NONE
from fastattn._validation import (
    as_array,
    broadcast_source,
    compute_dtype,
    lengths_view,
)
from fastattn.layer import (
    _check_cache_call,
    _check_cache_fits,
    _query_lengths,
    check_key_value,
    check_key_value_shapes,
    check_self_attention,
)
from fastattn.masks import _MASK_BOOL, CAUSAL_ALIGNMENTS, mask_kind
from fastattn.projections import check_input_shape
from fastattn.rotary import ROPE_LAYOUTS


class _DtypeCodes(dict):
    """fa_cuda_dtype codes by NumPy dtype, read from the CUDA extension on
    first use (so that importing this module never loads it)."""

    def __missing__(self, dtype):
        code = self[dtype] = _extension().DTYPE_CODES[np.dtype(dtype).name]
        return code


_DTYPE_CODES = _DtypeCodes()

# The (chunk, H, Lq, Lk) score workspace of attention is capped at this many
# bytes when the weights are not returned: the batch then runs in chunks.
# 1 GiB still hands cuBLAS hundreds of (Lq x Lk) products per call (enough to
# fill the GPU) while bounding the temporary memory of long sequences.
SCORES_WORKSPACE_BYTES = 1 << 30

_TOP_LEFT = CAUSAL_ALIGNMENTS["top_left"]


# ---- availability ----------------------------------------------------------------

_probe_lock = threading.Lock()
_probe_result = None


def _extension():
    """The compiled binding fastattn._cuda (ImportError when not built)."""
    from fastattn import _cuda

    return _cuda


def _probe():
    try:
        _cuda = _extension()
    except ImportError as exc:
        return False, (
            "fastattn was built without its CUDA extension fastattn._cuda "
            f"(rebuild with FASTATTN_CUDA=1, see docs/gpu.md): {exc}"
        )
    try:
        importlib.import_module("cupy")
    except ImportError as exc:
        return False, f"CuPy is not installed (pip install 'fastattn[cuda]'): {exc}"
    try:
        count = _cuda.device_count()
    except Exception as exc:  # CudaError, or a broken driver install
        return False, f"no usable CUDA device: {exc}"
    if count == 0:
        return False, "no CUDA device is visible"
    return True, None


def _availability():
    global _probe_result
    with _probe_lock:
        if _probe_result is None:
            _probe_result = _probe()
        return _probe_result


def is_available():
    """True when the GPU path can run: fastattn was built with its CUDA
    extension, CuPy imports and a CUDA device is visible. Never raises."""
    return _availability()[0]


def unavailable_reason():
    """Why :func:`is_available` is False, or None when it is True."""
    return _availability()[1]


# ---- device arrays -------------------------------------------------------------------


class _Array:
    """A device array as the kernels see it: base pointer (int), shape,
    strides in elements, dtype; ``obj`` keeps the owner alive and is what
    an ``out=`` call returns."""

    __slots__ = ("ptr", "shape", "strides", "dtype", "obj", "readonly", "stream", "on_cupy")

    def __init__(self, ptr, shape, strides, dtype, obj, readonly=False, stream=None, on_cupy=False):
        self.ptr = int(ptr)
        self.shape = tuple(int(n) for n in shape)
        self.strides = tuple(int(s) for s in strides)
        self.dtype = np.dtype(dtype)
        self.obj = obj
        self.readonly = readonly
        self.stream = stream
        self.on_cupy = on_cupy

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        return math.prod(self.shape)

    @property
    def itemsize(self):
        return self.dtype.itemsize

    def is_c_contiguous(self):
        return self.size <= 1 or _same_walk(self.shape, self.strides, _c_strides(self.shape))

    def at(self, element_offset, shape, strides):
        """A view of the same memory from ``element_offset`` elements on."""
        return _Array(self.ptr + element_offset * self.itemsize, shape, strides, self.dtype,
                      self.obj, self.readonly, self.stream, self.on_cupy)

    def reshaped(self, shape):
        """This memory viewed with ``shape`` without a copy, or None."""
        strides = _reshape_strides(self.shape, self.strides, tuple(shape))
        if strides is None:
            return None
        return _Array(self.ptr, shape, strides, self.dtype, self.obj, self.readonly, self.stream,
                      self.on_cupy)

    def byte_extent(self):
        """[low, high) bytes this view can touch; empty views touch nothing."""
        if self.size == 0:
            return self.ptr, self.ptr
        lo = hi = 0
        for n, s in zip(self.shape, self.strides):
            if s < 0:
                lo += s * (n - 1)
            else:
                hi += s * (n - 1)
        return self.ptr + lo * self.itemsize, self.ptr + (hi + 1) * self.itemsize


def _c_strides(shape):
    strides = []
    step = 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _same_walk(shape, a, b):
    """True when strides a and b address the same elements in the same order
    (they may differ only on size-1 axes)."""
    return all(n == 1 or sa == sb for n, sa, sb in zip(shape, a, b))


def _reshape_strides(shape, strides, new_shape):
    """Element strides that view (shape, strides) as new_shape without a copy
    (the rule NumPy's reshape follows), or None when a copy is needed."""
    if math.prod(shape) != math.prod(new_shape):
        raise ValueError(f"cannot view shape {shape} as {new_shape}")
    if math.prod(shape) == 0:
        return _c_strides(new_shape)
    old = [(n, s) for n, s in zip(shape, strides) if n != 1]
    new_strides = [0] * len(new_shape)
    oi = ni = 0
    while oi < len(old) and ni < len(new_shape):
        o_end, n_end = oi + 1, ni + 1
        o_prod, n_prod = old[oi][0], new_shape[ni]
        while o_prod != n_prod:
            if n_prod < o_prod:
                n_prod *= new_shape[n_end]
                n_end += 1
            else:
                o_prod *= old[o_end][0]
                o_end += 1
        # the old axes of this group must walk memory as one axis
        for a in range(oi, o_end - 1):
            if old[a][1] != old[a + 1][0] * old[a + 1][1]:
                return None
        step = old[o_end - 1][1]
        for a in range(n_end - 1, ni - 1, -1):
            new_strides[a] = step
            step *= new_shape[a]
        oi, ni = o_end, n_end
    return tuple(new_strides)


def _broadcast_strides(shape, strides, target, name, what):
    """Strides that broadcast (shape, strides) to target (NumPy rules)."""
    if len(shape) > len(target):
        raise ValueError(f"{name} of shape {shape} does not broadcast to the {what} {tuple(target)}")
    pad = len(target) - len(shape)
    out = [0] * pad
    for n, s, t in zip(shape, strides, target[pad:]):
        if n == t:
            out.append(s if t != 1 else 0)
        elif n == 1:
            out.append(0)
        else:
            raise ValueError(f"{name} of shape {shape} does not broadcast to the {what} {tuple(target)}")
    return tuple(out)


def _cupy():
    import cupy

    return cupy


def _device_array(obj, name):
    """``obj`` as an _Array; TypeError for host arrays and other objects."""
    cp = sys.modules.get("cupy")
    if cp is not None and isinstance(obj, cp.ndarray):
        return _Array(obj.data.ptr, obj.shape, _element_strides(obj.strides, obj.dtype, name),
                      obj.dtype, obj, on_cupy=True)
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is not None:
        return _from_cai(cai, obj, name)
    if is_device_array(obj):
        arr = _cupy().from_dlpack(obj)
        return _device_array(arr, name)
    raise TypeError(
        f"{name} must be a CUDA array (a CuPy array, or an object with "
        f"__cuda_array_interface__ or a CUDA __dlpack__), got {type(obj).__name__}; "
        "use cupy.asarray() to move host data to the GPU"
    )


def _element_strides(byte_strides, dtype, name):
    itemsize = np.dtype(dtype).itemsize
    if any(s % itemsize for s in byte_strides):
        raise ValueError(f"{name} has strides {tuple(byte_strides)} that are not a multiple of its itemsize {itemsize}")
    return tuple(s // itemsize for s in byte_strides)


def _from_cai(cai, obj, name):
    try:
        shape = tuple(int(n) for n in cai["shape"])
        dtype = np.dtype(cai["typestr"])
        ptr, readonly = cai["data"]
    except (KeyError, TypeError, ValueError) as exc:
        raise TypeError(f"{name} has a malformed __cuda_array_interface__: {exc}") from None
    if cai.get("mask") is not None:
        raise TypeError(f"{name}: masked __cuda_array_interface__ arrays are not supported")
    if not dtype.isnative:
        raise TypeError(f"{name} has non-native byte order {dtype.str}")
    strides = cai.get("strides")
    if strides is None:
        estrides = _c_strides(shape)
    else:
        estrides = _element_strides(strides, dtype, name)
    return _Array(ptr or 0, shape, estrides, dtype, obj, bool(readonly), cai.get("stream"))


def _host_array(values, name):
    """Host copy of small per-call data (lengths, slopes, positions, masks)
    that may be given on the host or the device."""
    if is_device_array(values):
        _Runtime.require()
        cp = _cupy()
        arr = values if isinstance(values, cp.ndarray) else cp.asarray(values)
        return cp.asnumpy(arr)
    return np.asarray(values)


def _compute_dtype(arr, name):
    return compute_dtype(arr.dtype, name)


# ---- the per-call runtime state ----------------------------------------------------------

_local = threading.local()


class _Runtime:
    """What a call needs once its arguments are valid: the extension, CuPy,
    the current device and stream, and this thread's cuBLAS handle."""

    def __init__(self):
        self.require()
        self.lib = _extension()
        self.cp = _cupy()
        self.device = self.cp.cuda.Device().id
        # CuPy may carry its own copy of the CUDA runtime: make its current
        # device ours too.
        self.lib.set_device(self.device)
        self.stream = self.cp.cuda.get_current_stream().ptr

    @staticmethod
    def require():
        ok, reason = _availability()
        if not ok:
            raise CudaUnavailableError(f"fastattn.cuda is not available: {reason}")

    def blas(self):
        handles = getattr(_local, "blas", None)
        if handles is None:
            handles = _local.blas = {}
        handle = handles.get(self.device)
        if handle is None:
            handle = handles[self.device] = self.lib.BlasHandle()
        return handle

    def attach(self, arr, name):
        """Check that ``arr`` lives on the current device and order this
        call's stream after the producer's (``__cuda_array_interface__``
        v3 ``stream``)."""
        if arr.size == 0:
            return arr
        if arr.on_cupy:
            dev = arr.obj.device.id
        else:
            dev = self.lib.pointer_device(arr.ptr)
        if dev != self.device:
            raise ValueError(f"{name} is on CUDA device {dev} but the current device is {self.device}; "
                             "use `with cupy.cuda.Device(...)`")
        if arr.stream is not None and int(arr.stream) != self.stream:
            self.lib.stream_wait(self.stream, int(arr.stream))
        return arr

    def empty(self, shape, dtype):
        a = self.cp.empty(shape, dtype=dtype)
        return _Array(a.data.ptr, a.shape, _element_strides(a.strides, a.dtype, "buffer"), a.dtype, a,
                      on_cupy=True)

    def upload(self, host, dtype=None):
        """A small host array on the device (a plain host-to-device copy)."""
        a = self.cp.asarray(np.ascontiguousarray(host, dtype=dtype))
        return _Array(a.data.ptr, a.shape, _element_strides(a.strides, a.dtype, "buffer"), a.dtype, a,
                      on_cupy=True)

    # -- kernels on _Arrays --

    def copy(self, src, dst):
        """dst[...] = src (same shape), converting src's dtype to dst's."""
        if src.shape != dst.shape:
            raise AssertionError(f"copy of {src.shape} into {dst.shape}")
        if src.size == 0:
            return
        shape, s_str, d_str = _collapse(src.shape, src.strides, dst.strides)
        while len(shape) < 4:
            shape, s_str, d_str = (1,) + shape, (0,) + s_str, (0,) + d_str
        lead = shape[:-4]
        for index in np.ndindex(*lead) if lead else [()]:
            s_off = sum(i * s for i, s in zip(index, s_str))
            d_off = sum(i * s for i, s in zip(index, d_str))
            self.lib.copy(_DTYPE_CODES[dst.dtype], _DTYPE_CODES[src.dtype],
                          src.ptr + s_off * src.itemsize, s_str[-4:],
                          dst.ptr + d_off * dst.itemsize, d_str[-4:], shape[-4:], self.stream)

    def append_rows(self, src, dst, dst_row, rows):
        """dst[b, m, dst_row[b] + i] = src[b, m, i] for i < rows[b]: src
        (B, M, L, C) and dst (B, M, Ldst, C) views of one dtype, dst_row
        and rows device int64 (B,) views (the KV-cache append)."""
        if src.dtype != dst.dtype or src.shape[:2] + src.shape[3:] != dst.shape[:2] + dst.shape[3:]:
            raise AssertionError(f"append of {src.shape} {src.dtype} rows into {dst.shape} {dst.dtype}")
        self.lib.append_rows(_DTYPE_CODES[dst.dtype], src.ptr, src.strides, dst.ptr, dst.strides,
                             src.shape, dst.shape[2], dst_row.ptr, rows.ptr, self.stream)

    def contiguous(self, arr, dtype):
        """``arr`` as a C-contiguous array of ``dtype`` (itself when it is one)."""
        if arr.dtype == dtype and arr.is_c_contiguous():
            return arr
        out = self.empty(arr.shape, dtype)
        self.copy(arr, out)
        return out

    def kernel_view(self, arr, dtype, shape):
        """``arr`` in ``dtype`` viewed as ``shape``: a view when possible,
        else a converted contiguous copy."""
        if arr.dtype == dtype:
            view = arr.reshaped(shape)
            if view is not None:
                return view
        return self.contiguous(arr, dtype).reshaped(shape)


def _collapse(shape, a, b):
    """Drop size-1 axes and merge neighbours that both views walk as one."""
    dims = [(n, sa, sb) for n, sa, sb in zip(shape, a, b) if n != 1]
    merged = []
    for n, sa, sb in dims:
        if merged:
            pn, psa, psb = merged[-1]
            if psa == sa * n and psb == sb * n:
                merged[-1] = (pn * n, sa, sb)
                continue
        merged.append((n, sa, sb))
    if not merged:
        merged = [(1, 0, 0)]
    return (tuple(m[0] for m in merged), tuple(m[1] for m in merged), tuple(m[2] for m in merged))


def _overlaps(a, b):
    alo, ahi = a.byte_extent()
    blo, bhi = b.byte_extent()
    return alo < bhi and blo < ahi


class _Output:
    """Where a kernel writes: the user's ``out`` when the kernel can write it
    directly, else a fresh buffer copied into ``out`` by :meth:`finish`
    (mirrors fastattn._validation.OutputTarget)."""

    def __init__(self, rt, out, shape, dtype, kernel_shape, inputs=(), inplace_ok=(),
                 contiguous=False, unit_last_stride=False):
        self.rt = rt
        self.copy_back = None
        shape = tuple(shape)
        if out is None:
            self.array = rt.empty(shape, dtype)
            self.result = self.array.obj
            self.kernel = self.array.reshaped(kernel_shape)
            return
        o = _device_array(out, "out")
        if o.shape != shape:
            raise ValueError(f"out must have shape {shape}, got {o.shape}")
        if o.dtype != dtype:
            raise TypeError(f"out must have dtype {dtype}, got {o.dtype}")
        if o.readonly:
            raise ValueError("out is read-only")
        rt.attach(o, "out")
        self.result = out
        view = o.reshaped(kernel_shape)
        overlaps = any(
            _overlaps(o, x) and not (any(x is y for y in inplace_ok)
                                     and x.ptr == view.ptr and x.strides == view.strides)
            for x in inputs if x is not None and view is not None
        )
        bad_layout = view is None or (contiguous and not view.is_c_contiguous()) or (
            unit_last_stride and view.shape[-1] > 1 and view.strides[-1] != 1)
        if bad_layout or overlaps:
            self.array = rt.empty(shape, dtype)
            self.kernel = self.array.reshaped(kernel_shape)
            self.copy_back = o
        else:
            self.kernel = view

    @property
    def kernel_view(self):
        return self.kernel

    def finish(self):
        if self.copy_back is not None:
            self.rt.copy(self.array, self.copy_back)
        return self.result


# ---- shared argument handling ----------------------------------------------------------------


def _contiguous_or_none(view):
    return None if view is None else np.ascontiguousarray(view, dtype=np.int64)


def _lengths(values, name, lead, B, M, axis_len, axis_name):
    """Validated lengths as a host (B, M) int64 array, or None."""
    if values is None:
        return None
    host = _host_array(values, name)
    view = lengths_view(host, name, lead, B, M, axis_len, axis_name)
    return np.ascontiguousarray(view, dtype=np.int64)


class _MaskSpec:
    """A validated ``attn_mask``: host NumPy or device _Array, its kind, and
    whether it must be converted to the compute dtype."""

    def __init__(self, attn_mask, full_shape, dtype):
        self.kind = 0
        self.host = None
        self.device = None
        self.full_shape = tuple(full_shape)
        self.dtype = dtype
        if attn_mask is None:
            return
        if is_device_array(attn_mask):
            self.device = _device_array(attn_mask, "attn_mask")
            mdtype, shape = self.device.dtype, self.device.shape
        else:
            self.host = as_array(attn_mask, "attn_mask")
            mdtype, shape = self.host.dtype, self.host.shape
        self.kind = mask_kind(mdtype, shape, self.full_shape)

    def realize(self, rt, kernel_shape):
        """(pointer, kind, 4 strides, keep-alive) for the kernel."""
        if self.kind == 0:
            return None, 0, (0, 0, 0, 0), None
        elem = np.dtype(np.uint8) if self.kind == _MASK_BOOL else self.dtype
        if self.device is not None:
            arr = rt.attach(self.device, "attn_mask")
            if self.kind == _MASK_BOOL:  # the same bytes, read as 0/1
                arr = _Array(arr.ptr, arr.shape, arr.strides, np.uint8, arr.obj, on_cupy=arr.on_cupy)
            elif arr.dtype != elem:
                arr = rt.contiguous(arr, elem)
        else:
            host = self.host.view(np.uint8) if self.kind == _MASK_BOOL else self.host.astype(elem, copy=False)
            arr = rt.upload(host)
        strides = _broadcast_strides(arr.shape, arr.strides, self.full_shape, "attn_mask", "scores shape")
        full = _Array(arr.ptr, self.full_shape, strides, arr.dtype, arr.obj, stream=None, on_cupy=arr.on_cupy)
        view = full.reshaped(kernel_shape)
        if view is None:
            # broadcast axes that cannot be merged into one: materialise once
            dense = rt.empty(self.full_shape, arr.dtype)
            rt.copy(full, dense)
            view = dense.reshaped(kernel_shape)
        return view.ptr, self.kind, view.strides, view


def _lengths_args(rt, host):
    """(device pointer, (stride_b, stride_m), keep-alive) of host (B, M) lengths."""
    if host is None:
        return None, (0, 0), None
    dev = rt.upload(host, dtype=np.int64)
    return dev.ptr, (host.shape[1], 1), dev


# ---- fused masked softmax ---------------------------------------------------------------------


def masked_softmax(x, y, *, scale, mask=None, mask_kind=_MASK_NONE, key_len=None,
                   query_len=None, causal, num_threads):
    """The CPU backend's ``masked_softmax`` kernel on device arrays: x, y
    (B, M, Lq, Lk) device views; ``num_threads`` is ignored."""
    rt = _Runtime()
    mptr, mkind, mstrides, mkeep = _PreparedMask(mask_kind, mask).realize(rt, x.shape)
    klp, kls, klkeep = _lengths_args(rt, _contiguous_or_none(key_len))
    qlp, qls, qlkeep = _lengths_args(rt, _contiguous_or_none(query_len))
    rt.lib.masked_softmax(_DTYPE_CODES[x.dtype], x.ptr, x.strides, y.ptr, y.strides, x.shape,
                          scale, mptr, mkind, mstrides, klp, kls, qlp, qls, causal, rt.stream)
    del mkeep, klkeep, qlkeep  # the queued kernel is ordered before any reuse


# ---- heads ----------------------------------------------------------------------------------


def split_heads(x, y, *, num_threads):
    """x (B, S, H, D) any strides; y C-contiguous (B, H, S, D): one strided
    copy kernel."""
    B, S, H, D = x.shape
    s0, s1, s2, s3 = x.strides
    _Runtime().copy(x.at(0, (B, H, S, D), (s0, s2, s1, s3)), y)


def merge_heads(x, y, *, num_threads):
    """x (B, H, S, D) any strides; y C-contiguous (B, S, H*D)."""
    B, H, S, D = x.shape
    s0, s1, s2, s3 = x.strides
    _Runtime().copy(x.at(0, (B, S, H, D), (s0, s2, s1, s3)), y.reshaped((B, S, H, D)))


# ---- positional encodings ------------------------------------------------------------------------


def position_table(out, *, layout, min_timescale, max_timescale, start_index, num_threads):
    """out (length, channels) with a unit column stride; angles in double
    precision."""
    rt = _Runtime()
    L, C = out.shape
    rt.lib.position_encoding(_DTYPE_CODES[out.dtype], out.ptr, out.strides[0], L, C, layout,
                             min_timescale, max_timescale, start_index, rt.stream)


def add_position(x, y, *, layout, min_timescale, max_timescale, start_index, num_threads):
    """x, y (B, length, channels) views: ``x + PE`` in one pass."""
    rt = _Runtime()
    rt.lib.add_position_encoding(_DTYPE_CODES[x.dtype], x.ptr, x.strides, y.ptr, y.strides,
                                 x.shape, layout, min_timescale, max_timescale, start_index,
                                 rt.stream)


def rotary(x, y, *, positions, layout, base, num_threads):
    """x, y (N0, N1, L, D) views; positions a host int64 (N0, N1, L) view
    (zero strides where broadcast), uploaded once per distinct element."""
    rt = _Runtime()
    source = rt.upload(broadcast_source(positions), dtype=np.int64)
    strides = _broadcast_strides(source.shape, source.strides, positions.shape, "positions",
                                 "shape")
    rt.lib.apply_rotary(_DTYPE_CODES[x.dtype], x.ptr, x.strides, y.ptr, y.strides, x.shape,
                        source.ptr, strides, layout, base, rt.stream)
    del source  # the queued kernel is ordered before any reuse


def _key_extent(kl, ql, causal, B, Lq, Lk):
    """Per batch item, how many leading keys any of its rows may attend
    (host int64 (B,)), or None when every item needs all Lk keys."""
    if kl is None and ql is None and causal != CAUSAL_ALIGNMENTS["top_left"]:
        return None
    ext = np.full(B, Lk, dtype=np.int64)
    if kl is not None:
        ext = np.minimum(ext, kl.max(axis=1))
    qmax = ql.max(axis=1) if ql is not None else np.full(B, Lq, dtype=np.int64)
    if causal == CAUSAL_ALIGNMENTS["top_left"]:
        limit = qmax  # row i sees keys j <= i < qmax
    elif causal == CAUSAL_ALIGNMENTS["bottom_right"]:
        limit = qmax + (Lk - Lq)
    else:
        limit = np.where(qmax > 0, Lk, 0)
    ext = np.clip(np.minimum(ext, limit), 0, Lk).astype(np.int64)
    return None if np.all(ext == Lk) else np.ascontiguousarray(ext)


def _attention(rt, q, k, v, dtype, *, mask, kl, ql, causal, alignment, scale, alibi,
               weights_target, out_kernel):
    """SDPA on contiguous (B, H, Lq, D) / (B, Hkv, Lk, D) / (B, Hkv, Lk, Dv)
    device arrays of ``dtype``; writes ``out_kernel`` (contiguous
    (B, H, Lq, Dv)) and, when given, ``weights_target`` (B, H, Lq, Lk)."""
    B, H, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    kshape = (B, H, Lq, Lk)
    mptr, mkind, mstrides, mkeep = mask.realize(rt, kshape)
    klp, kls, klkeep = _lengths_args(rt, kl)
    qlp, qls, qlkeep = _lengths_args(rt, ql)
    alibi_dev = rt.upload(alibi, dtype=dtype) if alibi is not None else None
    alibi_offset = 0 if alignment == "top_left" else Lk - Lq
    if weights_target is not None:
        scores, scores_batch = weights_target, max(B, 1)
    else:
        per_item = H * Lq * Lk * dtype.itemsize
        scores_batch = max(1, min(B, SCORES_WORKSPACE_BYTES // max(per_item, 1)))
        scores = rt.empty((scores_batch, H, Lq, Lk), dtype)
    extent = _key_extent(kl, ql, causal, B, Lq, Lk)
    rt.lib.sdpa(rt.blas(), q.ptr, k.ptr, v.ptr, out_kernel.ptr, dtype=_DTYPE_CODES[dtype],
                shape=(B, H, Hkv, Lq, Lk, D, Dv), scale=scale, causal=causal, mask=mptr,
                mask_kind=mkind, mask_strides=mstrides, key_len=klp, key_len_strides=kls,
                query_len=qlp, query_len_strides=qls,
                alibi_slopes=alibi_dev.ptr if alibi_dev is not None else None,
                alibi_offset=alibi_offset, key_extent=extent, scores=scores.ptr,
                scores_batch=scores_batch, stream=rt.stream)
    del mkeep, klkeep, qlkeep, alibi_dev, scores


class _PreparedMask:
    """A mask the neutral code already laid out for the kernel (kind and a
    device view of the kernel's shape), in the form :func:`_attention` takes."""

    def __init__(self, kind, view):
        self.kind, self.view = kind, view

    def realize(self, rt, kernel_shape):
        if self.view is None:
            return None, 0, (0, 0, 0, 0), None
        return self.view.ptr, self.kind, self.view.strides, self.view


def attention(q, k, v, out, *, weights=None, scale, mask=None, mask_kind=_MASK_NONE,
              key_len=None, query_len=None, is_causal=False, alignment=_TOP_LEFT,
              alibi_slopes=None, key_start=None, window_left=None, window_right=None,
              softcap=0.0, sinks=None, kv_dtype=0, k_scale=None, v_scale=None, num_threads):
    """The CPU backend's ``attention`` kernel on device arrays: cuBLAS Q Kᵀ,
    the fused masked softmax, cuBLAS P V. ``num_threads`` is ignored; the
    model-feature arguments and narrow K/V are not implemented here yet."""
    for public, unset in (("key_starts", key_start is None),
                          ("k_scale", kv_dtype == 0 and k_scale is None and v_scale is None),
                          ("window", window_left is None and window_right is None),
                          ("softcap", softcap == 0.0), ("sinks", sinks is None)):
        if not unset:
            raise NotImplementedError(f"{public} is not supported on the CUDA backend yet")
    rt = _Runtime()
    dtype = q.dtype
    q, k, v = (rt.contiguous(a, dtype) for a in (q, k, v))
    target = out if out.is_c_contiguous() else rt.empty(out.shape, dtype)
    _attention(rt, q, k, v, dtype, mask=_PreparedMask(mask_kind, mask),
               kl=_contiguous_or_none(key_len), ql=_contiguous_or_none(query_len),
               causal=alignment if is_causal else 0,
               alignment="top_left" if alignment == _TOP_LEFT else "bottom_right", scale=scale,
               alibi=alibi_slopes, weights_target=weights, out_kernel=target)
    if target is not out:
        rt.copy(target, out)


def cache_append(src, cache, *, start, rows, num_threads):
    """src (B, M, L, C) and cache (B, M, max_len, C) device views of one
    dtype; start, rows host int64 (B,): row i < rows[b] of src[b] becomes
    cache row start[b] + i."""
    rt = _Runtime()
    B = len(start)
    index = rt.upload(np.concatenate([start, rows]), dtype=np.int64)
    rt.append_rows(src, cache, index.at(0, (B,), (1,)), index.at(B, (B,), (1,)))
    del index  # the queued kernel is ordered before any reuse


def linear(a, w, c, *, bias=None, row_start=None, row_stop=None, alpha=1.0, rope=None,
           num_threads, deterministic=True):
    """c = a @ w + bias through cuBLAS: a (B, M, K), w (K, N), c (B, M, N)
    device views of one dtype with unit last strides; bias None or a (N,)
    device view. Row ranges, alpha and the RoPE epilogue are CPU-only for
    now (the device layer rotates with the rotary kernel instead).
    ``deterministic`` is accepted for the shared signature: one cuBLAS call
    with a fixed configuration does not depend on a host thread count."""
    for public, unset in (("row_start", row_start is None), ("row_stop", row_stop is None),
                          ("alpha", alpha == 1.0), ("rope", rope is None)):
        if not unset:
            raise NotImplementedError(f"linear: {public} is not supported on the CUDA backend yet")
    rt = _Runtime()
    B, M, K = a.shape
    N = w.shape[1]
    # one GEMM over all B * M rows when both a and c step through them evenly
    a2, c2 = a.reshaped((B * M, K)), c.reshaped((B * M, N))
    pairs = [(a2, c2)] if a2 is not None and c2 is not None else [
        (a.at(b * a.strides[0], (M, K), a.strides[1:]), c.at(b * c.strides[0], (M, N), c.strides[1:]))
        for b in range(B)]
    for x, y in pairs:
        rt.lib.linear(rt.blas(), _DTYPE_CODES[a.dtype], x.ptr, x.strides[0], w.ptr, w.strides[0],
                      None if bias is None else bias.ptr, y.ptr, y.strides[0], x.shape[0], K, N,
                      rt.stream)


# 16-bit inputs compute in float32 here, with a float32 result (no 16-bit
# CUDA kernels)
HALF_DTYPES = False

KERNELS = ("attention", "masked_softmax", "split_heads", "merge_heads", "position_table",
           "add_position", "rotary", "cache_append", "linear")


# ---- array helpers: what the neutral code needs on device arrays ------------------------------


def asarray(x, name):
    """``x`` as an _Array (TypeError for host arrays and other objects)."""
    return _device_array(x, name)


def host(values, name):
    """Small per-call data (lengths, slopes, sinks) on the host: device
    arrays are copied down, anything else is returned as it is."""
    if values is not None and is_device_array(values):
        return _host_array(values, name)
    return values


def operand(a, name, dtype):
    """``a`` on the current device as a C-contiguous array of ``dtype``."""
    rt = _Runtime()
    rt.attach(a, name)
    return rt.contiguous(a, dtype)


def kernel_input(x, name, dtype, kernel_shape):
    """``(x, its view of kernel_shape in dtype)`` on the current device; a
    converted contiguous copy when the dtype differs or no view exists."""
    rt = _Runtime()
    rt.attach(x, name)
    view = rt.kernel_view(x, dtype, kernel_shape)
    return view, view


def unit_head_axis(a):
    """A 3-D ``(B, L, D)`` array as the ``(B, 1, L, D)`` view of one head."""
    return a.at(0, (a.shape[0], 1) + a.shape[1:], (a.strides[0], 0) + a.strides[1:])


def attention_mask(attn_mask, user_shape, kernel_shape, dtype):
    """``(kind, device view of kernel_shape)`` of a user ``attn_mask`` that
    broadcasts to ``user_shape``; ``(0, None)`` without one."""
    spec = _MaskSpec(attn_mask, user_shape, dtype)
    if spec.kind == 0:
        return 0, None
    _, kind, _, view = spec.realize(_Runtime(), kernel_shape)
    return kind, view


def output(out, shape, kernel_shape, dtype, inputs=(), inplace_ok=(), contiguous=False,
           unit_last_axis=False):
    """Where a kernel writes: ``.kernel_view`` (``kernel_shape``), then
    ``.finish()`` returns ``out`` or a new CuPy array of ``shape``."""
    return _Output(_Runtime(), out, shape, dtype, kernel_shape,
                   inputs=tuple(x for x in inputs if isinstance(x, _Array)),
                   inplace_ok=inplace_ok, contiguous=contiguous, unit_last_stride=unit_last_axis)


def result(a):
    """A buffer made by :func:`empty` as the array returned to the user."""
    return a.obj


# ---- what fastattn.KVCache needs on the device ----------------------------------------------


def empty(shape, dtype):
    """An uninitialised device array (an _Array) on the current device."""
    return _Runtime().empty(shape, dtype)


def upload(host, dtype):
    """A host array copied to the current device (an _Array)."""
    return _Runtime().upload(host, dtype)


def download(arr):
    """A device _Array copied to a host NumPy array (synchronises)."""
    return _cupy().asnumpy(arr.obj)


def host_array(values, name):
    """Host copy of small data given on the host or the device."""
    return _host_array(values, name)


# ---- multi-head attention layer ---------------------------------------------------------------


class DeviceLayer:
    """The weights of a :class:`fastattn.MultiHeadAttention` on the current
    CUDA device, and the layer's call there.

    The projections are cuBLAS GEMMs (one fused QKV GEMM for
    self-attention), heads are split (with RoPE fused in when the layer has
    it) by fastattn kernels, and attention runs as in
    :func:`scaled_dot_product_attention`. With ``cache=`` the new tokens'
    keys and values (RoPE at positions ``lengths[b] + i``) are appended at
    each sequence's length by one kernel, and the queries attend, causally
    and bottom-right aligned per sequence, to everything the cache holds
    (the cache's lengths are the key lengths, so nothing is masked into a
    dense array). The arguments are checked by the layer's own helpers, so
    every message is the CPU layer's.
    """

    def __init__(self, layer, state):
        self.num_heads, self.num_kv_heads = layer.num_heads, layer.num_kv_heads
        self.embed_dim, self.kdim, self.vdim = layer.embed_dim, layer.kdim, layer.vdim
        self.head_dim, self.v_head_dim = layer.head_dim, layer.v_head_dim
        self.rope, self.rope_base, self.dtype = layer.rope, layer.rope_base, layer.dtype
        H, Hkv, E, D, dt = self.num_heads, self.num_kv_heads, self.embed_dim, self.head_dim, self.dtype
        w_q, w_k, w_v, w_o = (state[n] for n in ("w_q", "w_k", "w_v", "w_o"))
        b_q, b_k, b_v, b_o = (state.get(n) for n in ("b_q", "b_k", "b_v", "b_o"))
        rt = _Runtime()
        widths = (H * D, Hkv * D, Hkv * self.v_head_dim)
        self._widths = widths
        # one (E, H*D + 2*Hkv*D) weight: self-attention projects Q, K and V
        # in one GEMM, cross-attention uses its column blocks
        self._fused = self.kdim == E and self.vdim == E
        if self._fused:
            self._w_qkv = rt.upload(np.concatenate([w_q, w_k, w_v], axis=1), dtype=dt)
        else:
            self._w_qkv = None
            self._w_sep = tuple(rt.upload(w, dtype=dt) for w in (w_q, w_k, w_v))
        self._has_bias = b_q is not None
        self._b_qkv = rt.upload(np.concatenate([b_q, b_k, b_v]), dtype=dt) if self._has_bias else None
        self._w_o = rt.upload(w_o, dtype=dt)
        self._b_o = rt.upload(b_o, dtype=dt) if b_o is not None else None

    def state_dict(self):
        """The weights downloaded to NumPy, as the layer's state_dict."""
        nq, nk, _ = self._widths
        if self._fused:
            w = download(self._w_qkv)
            state = {"w_q": w[:, :nq].copy(), "w_k": w[:, nq:nq + nk].copy(), "w_v": w[:, nq + nk:].copy()}
        else:
            state = {n: download(w) for n, w in zip(("w_q", "w_k", "w_v"), self._w_sep)}
        state["w_o"] = download(self._w_o)
        if self._has_bias:
            b = download(self._b_qkv)
            state.update(b_q=b[:nq].copy(), b_k=b[nq:nq + nk].copy(), b_v=b[nq + nk:].copy(),
                         b_o=download(self._b_o))
        else:
            state.update(b_q=None, b_k=None, b_v=None, b_o=None)
        return state

    def _project(self, rt, x, rows, which):
        """(rows, width) = x @ w_which + b_which for which in 0 (q), 1 (k), 2 (v)."""
        dt = self.dtype
        width = self._widths[which]
        col0 = sum(self._widths[:which])
        y = rt.empty((rows, width), dt)
        if self._fused:
            w_ptr = self._w_qkv.ptr + col0 * dt.itemsize
            w_rs = sum(self._widths)
        else:
            w_ptr = self._w_sep[which].ptr
            w_rs = width
        keep = self._w_qkv if self._fused else self._w_sep[which]
        w = _Array(w_ptr, (x.shape[-1], width), (w_rs, 1), dt, keep)
        bias = None if self._b_qkv is None else self._b_qkv.at(col0, (width,), (1,))
        linear(x.reshaped((1, rows, x.shape[-1])), w, y.reshaped((1, rows, width)), bias=bias,
               num_threads=None)
        return y

    def _rotate(self, rt, src, dst, pos):
        """dst = RoPE(src) over (B, heads, L, D) views (dst may be src), row
        i of batch b at position pos[b, 0, i] (pos: an int64 view of
        (B, 1, L) strides)."""
        rt.lib.apply_rotary(_DTYPE_CODES[self.dtype], src.ptr, src.strides, dst.ptr, dst.strides,
                            src.shape, pos.ptr, pos.strides, ROPE_LAYOUTS[self.rope], self.rope_base,
                            rt.stream)

    def _heads(self, rt, src, pos):
        """Contiguous (B, heads, L, d) from a strided (B, heads, L, d) view
        of the projection, rotated at ``pos`` unless that is None."""
        dst = rt.empty(src.shape, self.dtype)
        if pos is None:
            rt.copy(src, dst)
        else:
            self._rotate(rt, src, dst, pos)
        return dst

    @staticmethod
    def _input(x, name, dim):
        """``x`` as a validated (B, L, dim) device _Array."""
        xa = _device_array(x, name)
        compute_dtype(xa.dtype, name)
        check_input_shape(xa.shape, name, dim)
        return xa

    def _project_qkv(self, rt, qa):
        """Self-attention's one GEMM: (B*L, H*D + Hkv*D + Hkv*Dv) = x @ W_qkv + b,
        viewed as the strided (B, heads, L, d) q, k and v sources."""
        H, Hkv, E, D, Dv = self.num_heads, self.num_kv_heads, self.embed_dim, self.head_dim, self.v_head_dim
        dt = self.dtype
        B, L, _ = qa.shape
        x = rt.contiguous(qa, dt).reshaped((B * L, E))
        width = sum(self._widths)
        proj = rt.empty((B * L, width), dt)
        bias = self._b_qkv.ptr if self._b_qkv is not None else None
        rt.lib.linear(rt.blas(), _DTYPE_CODES[dt], x.ptr, E, self._w_qkv.ptr, width, bias, proj.ptr,
                      width, B * L, E, width, rt.stream)
        wq, wk, _ = self._widths
        return (proj.at(0, (B, H, L, D), (L * width, D, width, 1)),
                proj.at(wq, (B, Hkv, L, D), (L * width, D, width, 1)),
                proj.at(wq + wk, (B, Hkv, L, Dv), (L * width, Dv, width, 1)))

    def _project_out(self, rt, attn, row_lengths):
        """Heads merged, @ W_O + b_O: attn (B, H, L, Dv) -> (B, L, E); rows
        l >= row_lengths[b] (host (B,), or None) are exactly 0."""
        B, H, L, Dv = attn.shape
        E, dt = self.embed_dim, self.dtype
        merged = rt.empty((B, L, H, Dv), dt)
        s0, s1, s2, s3 = attn.strides
        rt.copy(attn.at(0, (B, L, H, Dv), (s0, s2, s1, s3)), merged)
        y = rt.empty((B, L, E), dt)
        linear(merged.reshaped((B, L, H * Dv)), self._w_o, y, bias=self._b_o, num_threads=None)
        if row_lengths is not None:
            # padded queries are 0 after the output projection too (not b_o)
            rows = rt.upload(row_lengths, dtype=np.int64)
            rt.lib.zero_padded_rows(_DTYPE_CODES[dt], y.ptr, (B, 1, L, E), rows.ptr, (1, 0), rt.stream)
            del rows
        return y

    def __call__(self, layer, query, key=None, value=None, *, key_lengths=None, query_lengths=None,
                 attn_mask=None, is_causal=False, return_weights=False, cache=None):
        """``layer(...)`` on the device; the checks are the CPU layer's, in its order."""
        H, Hkv, E, D, Dv = self.num_heads, self.num_kv_heads, self.embed_dim, self.head_dim, self.v_head_dim
        dt = self.dtype
        qa = self._input(query, "query", E)
        check_key_value(key, value)
        if cache is not None:
            return self._call_cached(layer, qa, key, key_lengths, query_lengths, attn_mask,
                                     bool(return_weights), cache)
        B, Lq, _ = qa.shape
        self_attn = key is None
        if self_attn:
            check_self_attention(layer)
            Lk = Lq
        else:
            ka = self._input(key, "key", self.kdim)
            va = ka if value is key else self._input(value, "value", self.vdim)
            check_key_value_shapes(qa.shape, ka.shape, va.shape)
            Lk = ka.shape[1]
        causal = CAUSAL_ALIGNMENTS["top_left"] if is_causal else 0
        qv = None if query_lengths is None else _query_lengths(_host_array(query_lengths, "query_lengths"), B, Lq)
        kl = _lengths(key_lengths, "key_lengths", (B, H), B, H, Lk, "key")
        # (B,) as on the CPU layer: padded query rows are rows of the sequence
        ql = None if qv is None else np.ascontiguousarray(np.broadcast_to(qv[:, None], (B, H)))
        mask = _MaskSpec(attn_mask, (B, H, Lq, Lk), dt)

        rt = _Runtime()
        rt.attach(qa, "query")
        if self_attn:  # kdim == vdim == E, so the weight is the fused one
            q_src, k_src, v_src = self._project_qkv(rt, qa)
        else:
            wq, wk, wv = self._widths
            x = rt.contiguous(qa, dt).reshaped((B * Lq, E))
            rt.attach(ka, "key")
            rt.attach(va, "value")
            kx = rt.contiguous(ka, dt).reshaped((B * Lk, self.kdim))
            vx = rt.contiguous(va, dt).reshaped((B * Lk, self.vdim))
            qp = self._project(rt, x, B * Lq, 0)
            kp = self._project(rt, kx, B * Lk, 1)
            vp = self._project(rt, vx, B * Lk, 2)
            q_src = qp.at(0, (B, H, Lq, D), (Lq * wq, D, wq, 1))
            k_src = kp.at(0, (B, Hkv, Lk, D), (Lk * wk, D, wk, 1))
            v_src = vp.at(0, (B, Hkv, Lk, Dv), (Lk * wv, Dv, wv, 1))
        q_pos = k_pos = None
        if self.rope is not None:  # positions 0 .. L-1 in every batch item
            q_pos = rt.upload(np.arange(max(Lq, Lk), dtype=np.int64))
            q_pos = k_pos = q_pos.at(0, (B, 1, max(Lq, Lk)), (0, 0, 1))
        q4 = self._heads(rt, q_src, q_pos)
        k4 = self._heads(rt, k_src, k_pos)
        v4 = self._heads(rt, v_src, None)

        attn = rt.empty((B, H, Lq, Dv), dt)
        weights = rt.empty((B, H, Lq, Lk), dt) if return_weights else None
        _attention(rt, q4, k4, v4, dt, mask=mask, kl=kl, ql=ql, causal=causal, alignment="top_left",
                   scale=1.0 / math.sqrt(D) if D else 1.0, alibi=None, weights_target=weights,
                   out_kernel=attn)
        y = self._project_out(rt, attn, qv)
        if return_weights:
            return y.obj, weights.obj
        return y.obj

    def _call_cached(self, layer, qa, key, key_lengths, query_lengths, attn_mask, return_weights, cache):
        """Self-attention decoding with a KVCache: the CPU layer's checks,
        then the device work."""
        _check_cache_call(layer, cache, key, key_lengths, attn_mask)
        H, Hkv, D, Dv = self.num_heads, self.num_kv_heads, self.head_dim, self.v_head_dim
        B, L, _ = qa.shape
        ql = None if query_lengths is None else _query_lengths(_host_array(query_lengths, "query_lengths"), B, L)
        _check_cache_fits(cache, Hkv, D, self.dtype, qa.shape)
        if cache.v_head_dim != Dv:
            raise ValueError(f"cache holds values of dim {cache.v_head_dim}; this layer needs {Dv}")
        new_tokens = np.full(B, L, np.int64) if ql is None else ql
        old, new = cache.append_lengths(new_tokens)

        dt = self.dtype
        rt = _Runtime()
        rt.attach(qa, "query")
        rt.attach(cache._k, "cache.k")
        rt.attach(cache._v, "cache.v")
        q_src, k_src, v_src = self._project_qkv(rt, qa)
        # RoPE positions old[b] + i, one row per sequence shared by its heads
        pos = rt.upload(old[:, None] + np.arange(L, dtype=np.int64)).at(0, (B, 1, L), (L, 0, 1))
        if self.rope is None:
            q4 = self._heads(rt, q_src, None)
        else:
            q4 = self._heads(rt, q_src, pos)
            self._rotate(rt, k_src, k_src, pos)  # in place in the projection
        cache_append(k_src, cache._k, start=old, rows=new_tokens, num_threads=None)
        cache_append(v_src, cache._v, start=old, rows=new_tokens, num_threads=None)
        del pos  # the queued kernels are ordered before any reuse
        cache._lengths[:] = new

        # queries attend to the first new[b] cache rows; query i of sequence b
        # sees keys j <= old[b] + i (bottom-right per sequence)
        Lmax = cache.max_len
        attn = rt.empty((B, H, L, Dv), dt)
        weights = rt.empty((B, H, L, Lmax), dt) if return_weights else None
        kl = np.ascontiguousarray(np.broadcast_to(new[:, None], (B, H)))
        qlh = None if ql is None else np.ascontiguousarray(np.broadcast_to(ql[:, None], (B, H)))
        _attention(rt, q4, cache._k, cache._v, dt, mask=_MaskSpec(None, (B, H, L, Lmax), dt), kl=kl,
                   ql=qlh, causal=rt.lib.CAUSAL_LENGTHS, alignment="bottom_right", scale=1.0 / math.sqrt(D),
                   alibi=None, weights_target=weights, out_kernel=attn)
        y = self._project_out(rt, attn, ql)
        if not return_weights:
            return y.obj
        Lk = int(new.max()) if B else 0
        w = rt.empty((B, H, L, Lk), dt)
        rt.copy(weights.at(0, w.shape, weights.strides), w)
        return y.obj, w.obj
