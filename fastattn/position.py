"""Sinusoidal positional encodings: the table, and its fused addition."""

import math

import numpy as np

from fastattn import _backend, _kernels
from fastattn._config import resolve_num_threads
from fastattn._validation import (
    check_result_size,
    choice,
    compute_dtype,
    index_value,
    real_number,
)

LAYOUTS = _kernels.PE_LAYOUTS


def _real(value, name):
    return real_number(value, name)


def _start_index(value, length):
    """start_index as an int such that every position start_index + p,
    0 <= p < length, fits in int64 (the C kernels form them)."""
    start = index_value(value, "start_index")
    lo, hi = -(2**63), 2**63 - 1 - max(length, 0)
    if not lo <= start <= hi:
        raise ValueError(
            f"start_index must be in [{lo}, {hi}] so that start_index + length "
            f"({length}) fits in int64, got {start}"
        )
    return start


def _timescales(min_timescale, max_timescale):
    lo, hi = _real(min_timescale, "min_timescale"), _real(max_timescale, "max_timescale")
    if not (math.isfinite(lo) and lo > 0):
        raise ValueError(f"min_timescale must be positive and finite, got {min_timescale!r}")
    if not (math.isfinite(hi) and hi > 0):
        raise ValueError(f"max_timescale must be positive and finite, got {max_timescale!r}")
    # The names promise an order, and a reversed pair is almost always two
    # swapped arguments: it would give frequencies that grow along the
    # channels instead of falling, a table no reference implementation
    # means. Equal timescales (one frequency) are allowed.
    if lo > hi:
        raise ValueError(
            f"min_timescale must be <= max_timescale, got min_timescale={min_timescale!r} "
            f"and max_timescale={max_timescale!r}"
        )
    return lo, hi


def table_args(length, channels, layout, min_timescale, max_timescale, start_index, dtype):
    """The checked arguments of a position-encoding table, shared by the CPU
    and GPU paths: (length, channels, layout code, min and max timescale,
    start index, dtype)."""
    L = index_value(length, "length")
    C = index_value(channels, "channels")
    if L < 0:
        raise ValueError(f"length must be non-negative, got {L}")
    if C <= 0:
        raise ValueError(f"channels must be positive, got {C}")
    code = LAYOUTS[choice(layout, "layout", LAYOUTS)]
    lo, hi = _timescales(min_timescale, max_timescale)
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    check_result_size((L, C), dt, f"length={L} and channels={C}")
    start = _start_index(start_index, L)
    return L, C, code, lo, hi, start, dt


def sinusoidal_position_encoding(length, channels, *, layout="concat", min_timescale=1.0,
                                 max_timescale=1.0e4, start_index=0, dtype=np.float32,
                                 out=None, num_threads=None, device="cpu"):
    """The sinusoidal position-encoding table, shape ``(length, channels)``.

    ``layout="concat"`` is tensor2tensor's ``get_timing_signal_1d``: with
    ``n = channels // 2`` and
    ``inv[i] = min_timescale * exp(-i * log(max_timescale / min_timescale) / max(n - 1, 1))``,
    row ``pos`` is ``[sin(pos * inv) | cos(pos * inv)]``; an odd ``channels``
    gets a trailing zero column.

    ``layout="interleaved"`` is the paper's (Vaswani et al. 2017, §3.5):
    ``PE[pos, 2i] = sin(pos * inv[i])``, ``PE[pos, 2i + 1] = cos(pos * inv[i])``
    with ``inv[i] = min_timescale * (max_timescale / min_timescale) ** (-2i / channels)``,
    which is ``1 / 10000 ** (2i / channels)`` at the defaults.

    ``0 < min_timescale <= max_timescale`` (a reversed pair raises
    ValueError); equal timescales give one frequency for every column pair.

    Positions are ``start_index + arange(length)``; angles are carried in
    double precision, so the table extrapolates to long sequences (1e6
    positions stay within 1e-5 of the exact value in float32).

    The table is a NumPy array with ``device="cpu"`` and a CuPy array with
    ``device="cuda"`` (or when ``out`` is a CUDA array).

    Examples
    --------
    >>> import fastattn
    >>> fastattn.sinusoidal_position_encoding(2, 4, dtype="float64").round(3)
    array([[0.   , 0.   , 1.   , 1.   ],
           [0.841, 0.   , 0.54 , 1.   ]])
    """
    # "is not str" first: an array compared with "cpu" has no truth value
    on_cuda = (type(device) is not str or device != "cpu") and _backend.check_device(device) == "cuda"
    if out is not None and type(out) is not np.ndarray and _backend.is_device_array(out):
        on_cuda = True
    backend = _backend.cuda_backend() if on_cuda else _backend.cpu_backend()
    L, C, code, lo, hi, start, dt = table_args(length, channels, layout, min_timescale,
                                               max_timescale, start_index, dtype)
    # the kernel writes whole rows, so out needs a unit column stride
    target = backend.output(out, (L, C), (L, C), dt, unit_last_axis=True)
    backend.position_table(target.kernel_view, layout=code, min_timescale=lo, max_timescale=hi,
                           start_index=start, num_threads=resolve_num_threads(num_threads))
    return target.finish()


def add_args(shape, layout, start_index, min_timescale, max_timescale):
    """``(layout code, lo, hi, start, kernel shape (B, L, C))`` for adding
    the encoding to an ``x`` of ``shape``, with every backend's checks."""
    if len(shape) < 2:
        raise ValueError(f"x must have shape (..., length, channels), got shape {tuple(shape)}")
    code = LAYOUTS[choice(layout, "layout", LAYOUTS)]
    lo, hi = _timescales(min_timescale, max_timescale)
    L, C = shape[-2:]
    start = _start_index(start_index, L)
    if C == 0:
        raise ValueError(f"x must have at least one channel, got shape {tuple(shape)}")
    return code, lo, hi, start, (math.prod(shape[:-2]), L, C)


def add_position_encoding(x, *, layout="concat", start_index=0, min_timescale=1.0,
                          max_timescale=1.0e4, out=None, num_threads=None):
    """``x + sinusoidal_position_encoding(...)`` in one pass, without the table.

    Parameters
    ----------
    x : array_like, shape ``(..., length, channels)``
    layout, start_index, min_timescale, max_timescale
        As in :func:`sinusoidal_position_encoding`.
    out : ndarray, optional
        May be ``x`` itself.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> x = np.zeros((2, 3, 8), dtype=np.float32)
    >>> y = fastattn.add_position_encoding(x)
    >>> bool(np.allclose(y[1], fastattn.sinusoidal_position_encoding(3, 8)))
    True
    """
    backend = _backend.backend_for((x,), ("x",))
    arr = backend.asarray(x, "x")
    dtype = compute_dtype(arr.dtype, "x")
    shape = arr.shape
    code, lo, hi, start, kshape = add_args(shape, layout, start_index, min_timescale, max_timescale)
    arr, x3 = backend.kernel_input(arr, "x", dtype, kshape)
    target = backend.output(out, shape, kshape, dtype, inputs=(arr,), inplace_ok=(arr,))
    backend.add_position(x3, target.kernel_view, layout=code, min_timescale=lo, max_timescale=hi,
                         start_index=start, num_threads=resolve_num_threads(num_threads))
    return target.finish()
