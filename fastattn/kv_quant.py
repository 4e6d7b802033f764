"""Narrow K/V storage: symmetric int8 quantisation per token per head, and
the dtype rule for K/V that the attention kernel reads without widening a
copy (bfloat16, float16, int8 with scales, against float32 queries)."""

from typing import NamedTuple, Optional

import numpy as np

from fastattn import _backend, _kernels
from fastattn._config import resolve_num_threads
from fastattn._validation import as_array, compute_dtype, float_array, kernel_addressable

_F32 = np.dtype(np.float32)
_I8 = np.dtype(np.int8)
_F64 = np.dtype(np.float64)

#: K/V storage dtypes the kernel reads directly, by dtype name.
NARROW_KV_DTYPES = ("bfloat16", "float16", "int8")
# 16-bit float dtypes whose q, k, v and output the attention kernel reads
# and writes as they are (computing in float32)
HALF_DTYPES = ("bfloat16", "float16")


def _cpu_only(arrays, names, func):
    if _backend.device_of(*arrays, names=names) == "cuda":
        raise TypeError(f"{func} runs on the CPU only; got CUDA arrays for {', '.join(names)}")


def _float32_rows(x, name):
    """``x`` as float32 (bfloat16 included), with at least one axis."""
    arr = as_array(x, name)
    if arr.dtype.name != "bfloat16":
        compute_dtype(arr.dtype, name)  # TypeError for complex, object, ...
    if arr.ndim == 0:
        raise ValueError(f"{name} must have at least one axis (the head dim), got a scalar")
    arr = np.ascontiguousarray(arr, dtype=_F32)
    # a misaligned buffer stays misaligned through ascontiguousarray
    return arr if kernel_addressable(arr) else arr.copy()


def quantize_kv(x, *, num_threads=None):
    """Symmetric int8 quantisation with one scale per token per head.

    Over the last (head) axis, ``scale = max|x| / 127`` and
    ``values = rint(x / scale)``, both in float32 (round half to even, so
    ``|values| <= 127``). A row of zeros gets scale 0 and values 0, never
    NaN; a row holding NaN gets a NaN scale (inf: an inf scale) and values 0.

    Parameters
    ----------
    x : array_like, shape ``(..., D)``
        Real values (float64, float16 and bfloat16 are rounded to float32
        first).
    num_threads : int, optional

    Returns
    -------
    values : ndarray of int8, shape ``x.shape``
    scales : ndarray of float32, shape ``x.shape[:-1]``

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> values, scales = fastattn.quantize_kv(np.array([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]]))
    >>> values.tolist(), scales.tolist()
    ([[64, -127, 32], [0, 0, 0]], [0.015748031437397003, 0.0])
    """
    _cpu_only((x,), ("x",), "quantize_kv")
    xa = _float32_rows(x, "x")
    nt = resolve_num_threads(num_threads)
    values = np.empty(xa.shape, dtype=_I8)
    scales = np.empty(xa.shape[:-1], dtype=_F32)
    rows, D = scales.size, xa.shape[-1]
    _kernels.quantize_kv(xa.reshape(1, 1, rows, D), values.reshape(1, 1, rows, D),
                         scales.reshape(1, 1, rows), nt)
    return values, scales


def dequantize_kv(values, scales, *, num_threads=None):
    """``values * scales[..., None]`` in float32: the inverse of
    :func:`quantize_kv` (up to its rounding, at most ``scale / 2`` per
    element).

    Parameters
    ----------
    values : ndarray of int8, shape ``(..., D)``
    scales : array_like, shape ``values.shape[:-1]``
    num_threads : int, optional

    Returns
    -------
    ndarray of float32, shape ``values.shape``
    """
    _cpu_only((values, scales), ("values", "scales"), "dequantize_kv")
    va = as_array(values, "values")
    if va.dtype != _I8:
        raise TypeError(f"values must be int8 (from quantize_kv), got dtype {va.dtype}")
    if va.ndim == 0:
        raise ValueError("values must have at least one axis (the head dim), got a scalar")
    sa = float_array(scales, "scales", _F32)
    if sa.shape != va.shape[:-1]:
        raise ValueError(f"scales must have shape values.shape[:-1] = {va.shape[:-1]}, "
                         f"got {sa.shape}")
    va = np.ascontiguousarray(va)
    sa = np.ascontiguousarray(sa)
    if not kernel_addressable(sa):
        sa = sa.copy()
    out = np.empty(va.shape, dtype=_F32)
    rows, D = sa.size, va.shape[-1]
    _kernels.dequantize_kv(va.reshape(1, 1, rows, D), sa.reshape(1, 1, rows),
                           out.reshape(1, 1, rows, D), resolve_num_threads(num_threads))
    return out


class KVStorage(NamedTuple):
    """How the kernel reads a call's q, k and v when they are not one float
    dtype (:func:`narrow_kv`)."""

    code: int  #: the K/V storage, a ``_kernels.KV_DTYPE_CODES`` value
    io_dtype: Optional[np.dtype]  #: 16-bit dtype of q and the result; None: float32


def narrow_kv(q, k, v, k_scale, v_scale, names=("k", "v")):
    """The :class:`KVStorage` of q, k and v when q is 16-bit or k and v are
    narrower than q; None for the ordinary path, every input promoted to
    one compute dtype. Raises the TypeError / ValueError of a bad mix;
    ``q``, ``k``, ``v`` are arrays, ``names`` the caller's names for ``k``
    and ``v``. Every attention entry point (padded, packed, paged) reads
    its dtypes through this one rule."""
    kd, vd, qd = k.dtype, v.dtype, q.dtype
    if (k_scale is None and v_scale is None and kd is qd and vd is qd
            and (qd is _F32 or qd is _F64)):
        return None  # one ordinary float dtype: decided without the name lookups below
    kn, vn = names
    pair = f"{kn} and {vn}"
    q16 = qd.name in HALF_DTYPES
    narrow = kd.name in NARROW_KV_DTYPES or vd.name in NARROW_KV_DTYPES
    int8 = kd == _I8 or vd == _I8
    io_dtype = qd.newbyteorder("=") if q16 else None
    if k_scale is None and v_scale is None and not int8:
        if q16 and kd == qd and vd == qd:
            return KVStorage(_kernels.KV_DTYPE_CODES[kd.name], io_dtype)
        if not narrow:
            return None
        # float16 beside another dtype, or with queries other than float32 or
        # 16-bit: promoted to one compute dtype, as any mix of real dtypes is
        if "bfloat16" not in (kd.name, vd.name) and (kd != vd or not (qd == _F32 or q16)):
            return None
    if k_scale is not None or v_scale is not None:
        if not int8:
            name = "k_scale" if k_scale is not None else "v_scale"
            raise ValueError(f"{name} is only for int8 {pair}; got {kn} {kd}, {vn} {vd}")
        if k_scale is None or v_scale is None:
            name = "k_scale" if k_scale is None else "v_scale"
            raise ValueError(f"{name} is required with int8 {pair} (both scales or neither)")
    elif int8:
        raise ValueError(f"int8 {pair} need k_scale and v_scale (see quantize_kv); "
                         f"got {kn} {kd}, {vn} {vd}")
    if kd != vd:
        raise TypeError(f"{pair} must share their narrow storage dtype; got {kn} {kd}, {vn} {vd}")
    if not (qd == _F32 or q16):
        raise TypeError(f"{kd} {pair} are read with float32, bfloat16 or float16 queries; "
                        f"got q of dtype {qd}")
    return KVStorage(_kernels.KV_DTYPE_CODES[kd.name], io_dtype)


def native_storage(x):
    """``x`` as C reads it: native byte order, element-aligned strides (a
    copy only when it is not already)."""
    if not x.dtype.isnative:
        return x.astype(x.dtype.newbyteorder("="))
    return x if kernel_addressable(x) else x.copy()


def attention_compute_dtype(q, k, v, storage, names=("q", "k", "v")):
    """The dtype the attention kernels compute in for arrays q, k, v and
    their :func:`narrow_kv` result ``storage``: float32 beside narrow or
    16-bit storage, else the promotion of the three inputs' compute dtypes
    (``names`` for the messages)."""
    if storage is not None:
        return _F32
    return np.promote_types(np.promote_types(compute_dtype(q.dtype, names[0]),
                                             compute_dtype(k.dtype, names[1])),
                            compute_dtype(v.dtype, names[2]))


def kernel_operands(q, k, v, storage, names=("q", "k", "v")):
    """``(q, k, v, dtype)`` as the CPU attention kernel reads them: without
    narrow storage, each converted to the compute dtype; with it, k and v
    (and a 16-bit q) as they are, in native byte order, and any other q in
    float32."""
    dtype = attention_compute_dtype(q, k, v, storage, names)
    if storage is None:
        return (*(float_array(x, n, dtype) for x, n in zip((q, k, v), names)), dtype)
    q = native_storage(q) if storage.io_dtype is not None else float_array(q, names[0], dtype)
    return q, native_storage(k), native_storage(v), dtype


def kv_scale_array(scale, name, shape, three_d):
    """``scale`` as float32 of ``shape`` ((B, Hkv, Lk), given as (B, Lk) for
    3-D inputs), 3-D, with a unit last stride."""
    arr = float_array(scale, name, _F32)
    want = (shape[0], shape[2]) if three_d else shape
    if arr.shape != want:
        raise ValueError(f"{name} must have shape {want} (one scale per key per kv head), "
                         f"got {arr.shape}")
    if three_d:
        arr = arr[:, None]
    if arr.shape[-1] > 1 and arr.strides[-1] != 4 or not kernel_addressable(arr):
        arr = np.ascontiguousarray(arr)
    return arr
