"""Argument checking and coercion shared by every public function.

Everything a kernel needs is checked here, before C is entered, and every
message names the argument and the shapes involved.

Dtype rule (documented in the API reference): fastattn computes in float32
or float64. An input of dtype ``t`` is computed in
``numpy.promote_types(t, float32)`` when that is float32 or float64, so
float16, bool, int8/uint8 and int16/uint16 compute in float32, and
int32/int64/uint32/uint64 in float64. Complex, object, string, datetime and
extended-precision inputs raise TypeError.

16-bit rule (:func:`storage_dtype`, for the kernels that keep them:
``masked_softmax``, ``split_heads``/``merge_heads``, ``apply_rotary`` and
the layer): bfloat16 (``ml_dtypes.bfloat16``) and float16 inputs keep their
dtype; they are computed in float32 and the result is rounded to the input
dtype (nearest even) once. See docs/dtypes.md.
"""

import math
import operator
import sys

import numpy as np

_FLOAT_KINDS = (np.dtype(np.float32), np.dtype(np.float64))


def compute_dtype(dtype, name):
    """The float dtype an input of ``dtype`` is computed in (see module doc)."""
    if dtype is _FLOAT_KINDS[0] or dtype is _FLOAT_KINDS[1]:  # the common case, cheaply
        return dtype
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf":
        raise TypeError(f"{name} has unsupported dtype {dtype}; expected a real numeric dtype")
    out = np.promote_types(dtype, np.float32)
    if out not in _FLOAT_KINDS:
        raise TypeError(
            f"{name} has unsupported dtype {dtype}; fastattn computes in float32 or float64"
        )
    return out


HALF_DTYPE_NAMES = ("bfloat16", "float16")


def is_half_dtype(dtype):
    """True for float16 and ml_dtypes.bfloat16 (told by name, so that this
    never imports ml_dtypes: a bfloat16 array cannot exist without it)."""
    dtype = np.dtype(dtype)
    return dtype.itemsize == 2 and dtype.name in HALF_DTYPE_NAMES


def storage_dtype(dtype, name):
    """The dtype a kernel that stores 16-bit results works in: bfloat16 and
    float16 stay (float32 arithmetic, results rounded to them), everything
    else is :func:`compute_dtype`'s."""
    dtype = np.dtype(dtype)
    if is_half_dtype(dtype):
        return dtype.newbyteorder("=")
    return compute_dtype(dtype, name)


def as_array(x, name):
    """``np.asarray(x)``, with NumPy's conversion errors (ragged nesting,
    unconvertible objects) reported against the argument's name."""
    if type(x) is np.ndarray:
        return x
    try:
        return np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{name} could not be converted to an array: {exc}") from None


def kernel_addressable(arr):
    """True when C can address ``arr`` with element strides: the data pointer
    is aligned for the dtype and every stride is a multiple of the item size
    (a structured-array field or a byte-offset view is neither)."""
    flags = arr.flags
    if flags.c_contiguous:  # the common case, without the per-stride loop
        return flags.aligned
    item = arr.dtype.itemsize
    return flags.aligned and all(s % item == 0 for s in arr.strides)


def float_array(x, name, dtype=None):
    """``x`` as an ndarray of its compute dtype (or of ``dtype``), native byte
    order, addressable by the kernels; copies only when the dtype or byte
    order must change or the memory is misaligned."""
    arr = as_array(x, name)
    target = compute_dtype(arr.dtype, name) if dtype is None else dtype
    if arr.dtype is not target and arr.dtype != target:
        if dtype is not None:
            compute_dtype(arr.dtype, name)  # reject complex and friends first
        arr = arr.astype(target)
    if not kernel_addressable(arr):
        arr = arr.copy()
    return arr


def unit_last_axis(a):
    """``a`` with a contiguous last axis (the attention kernels stream whole rows)."""
    if a.shape[-1] > 1 and a.strides[-1] != a.itemsize:
        return np.ascontiguousarray(a)
    return a


def broadcast_source(view):
    """The smallest array that broadcasts to ``view``: its zero-stride axes
    cut to length 1 (a view)."""
    return view[tuple(slice(0, 1) if n > 1 and s == 0 else slice(None)
                      for n, s in zip(view.shape, view.strides))]


def require_ndim(arr, name, ndim, layout):
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {arr.shape}")


def index_value(value, name):
    """``value`` as a Python int (rejecting floats and bools)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None


def real_number(value, name, what="a real number"):
    """``value`` as a Python float: a real number (bools, strings, arrays and
    complex numbers refused) that a float64 can hold, so an int too large
    for a float is a ValueError naming the argument, not an OverflowError."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be {what}, got {value!r}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(
            f"{name} must fit in a float64, got an integer of {int(value).bit_length()} bits"
        ) from None


def check_result_size(shape, dtype, what):
    """Reject a result whose byte size overflows the address space before
    NumPy or C computes it; ``what`` names the arguments that set the shape."""
    n = math.prod(shape)
    if n * np.dtype(dtype).itemsize > sys.maxsize:
        raise ValueError(
            f"{what} give a result of shape {tuple(shape)} ({n} elements), "
            f"which overflows the addressable size"
        )


def bool_flag(value, name):
    """A bool argument (NumPy bools and integers accepted, as in NumPy)."""
    if not isinstance(value, (bool, np.bool_, int, np.integer)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def choice(value, name, options):
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {value!r}")
    return value


def int_array(values, name):
    """Integer lengths as int64, rejecting floats, bools and negatives."""
    return int_array_max(values, name)[0]


def int_array_max(values, name):
    """``(int_array(values, name), its max as a Python int)``."""
    arr = as_array(values, name)
    if arr.size == 0 and not isinstance(values, np.ndarray):
        arr = arr.astype(np.int64)  # [] is float64 to NumPy
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers, got dtype {arr.dtype}")
    lo, hi = int_extremes(arr)
    if lo < 0:
        raise ValueError(f"{name} must be non-negative, got min {lo}")
    if hi > _INT64_MAX:
        raise ValueError(f"{name} is too large for int64")
    arr = arr.astype(np.int64, copy=False)
    return (arr if kernel_addressable(arr) else arr.copy()), hi


_INT64_MAX = int(np.iinfo(np.int64).max)


def int_extremes(arr):
    """``(min, max)`` of an integer array as Python ints, ``(0, 0)`` when
    empty. A per-call array of lengths has a few dozen entries, where two
    NumPy reductions cost more than the list (a microsecond each)."""
    if arr.size == 0:
        return 0, 0
    if arr.size <= 256:
        values = arr.ravel().tolist()
        return min(values), max(values)
    return int(arr.min()), int(arr.max())


def repeat_axis(arr, axis, *n):
    """``arr`` with new axes of lengths ``n`` and stride 0 inserted at
    ``axis``: the read-only view ``np.broadcast_to`` makes, built directly,
    in a sixth of its time (per-call lengths and positions)."""
    src = np.ascontiguousarray(arr)
    shape = src.shape[:axis] + n + src.shape[axis:]
    strides = src.strides[:axis] + (0,) * len(n) + src.strides[axis:]
    view = np.ndarray(shape, src.dtype, src, 0, strides)
    view.flags.writeable = False
    return view


def lengths_view(values, name, lead_shape, B, M, axis_len, axis_name):
    """Lengths of shape ``(B,)`` or exactly ``lead_shape`` as a (B, M) int64
    view (zero stride on M for the per-batch form), checked against the axis.
    ``lead_shape`` is ``x.shape[:-2]``; B and M are its first axis and the
    product of the rest."""
    if values is None:
        return None
    arr, hi = int_array_max(values, name)
    if arr.shape == tuple(lead_shape):
        view = arr.reshape(B, M)
    elif len(lead_shape) >= 1 and arr.shape == (lead_shape[0],):
        view = repeat_axis(arr, 1, M)
    else:
        if not lead_shape:
            expected = "()"
        elif len(lead_shape) == 1:
            expected = f"({lead_shape[0]},)"
        else:
            expected = f"({lead_shape[0]},) or {tuple(lead_shape)}"
        raise ValueError(
            f"{name} must have shape {expected} for scores of leading shape "
            f"{tuple(lead_shape)}, got {arr.shape}"
        )
    if hi > axis_len:
        raise ValueError(f"{name} must be <= the {axis_name} length {axis_len}, got max {hi}")
    return view


def check_out(out, shape, dtype, name="out"):
    """Validate a user ``out=`` array: exact shape and dtype, writeable."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {out.shape}")
    if out.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {out.dtype}")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    return out


def reshaped_view(arr, shape):
    """A view of ``arr`` with ``shape``, or None when that needs a copy."""
    try:
        # NumPy >= 2.1 refuses to copy with ValueError; assigning .shape, the
        # older way, is deprecated from NumPy 2.5
        return arr.reshape(shape, copy=False)
    except ValueError:
        return None
    except TypeError:  # NumPy < 2.1: no copy= argument
        pass
    view = arr.view()
    try:
        view.shape = shape
    except AttributeError:
        return None
    return view


def same_view(a, b):
    """True when a and b address exactly the same elements in the same order."""
    return (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.strides == b.strides
        and a.shape == b.shape
    )


class OutputTarget:
    """Where a kernel writes: the user's ``out`` when the kernel can write it
    directly (a view of the kernel's shape, C-contiguous if ``contiguous``,
    with a unit last-axis stride if ``unit_last_axis``, that does not partly
    overlap an input), else a fresh buffer that :meth:`finish` copies into
    ``out``."""

    __slots__ = ("out", "kernel_view", "result", "_copy_back")

    def __init__(self, out, shape, kernel_shape, dtype, inputs=(), inplace_ok=(),
                 contiguous=False, unit_last_axis=False, name="out"):
        self._copy_back = False
        if out is None:
            self.result = np.empty(shape, dtype=dtype)
            self.kernel_view = self.result.reshape(kernel_shape)
            return
        check_out(out, shape, dtype, name)
        self.result = out
        view = out if out.shape == tuple(kernel_shape) else reshaped_view(out, kernel_shape)
        # Writing straight into out is safe unless it overlaps an input other
        # than as the identical view of an input the kernel may update in place.
        overlaps = False
        for x in inputs:
            if np.may_share_memory(out, x) and not (
                    any(x is y for y in inplace_ok) and same_view(out, x)):
                overlaps = True
                break
        if (view is None or overlaps or (contiguous and not view.flags.c_contiguous)
                or (unit_last_axis and view.shape[-1] > 1 and view.strides[-1] != view.itemsize)
                or not kernel_addressable(view)):
            self.kernel_view = np.empty(kernel_shape, dtype=dtype)
            self._copy_back = True
        else:
            self.kernel_view = view

    def finish(self):
        if self._copy_back:
            self.result[...] = self.kernel_view.reshape(self.result.shape)
        return self.result
