"""Position information that attention layers add to Q and K: rotary
position embeddings (RoPE) and ALiBi slopes."""

import math

import numpy as np

from fastattn import _backend, _kernels
from fastattn._config import resolve_num_threads
from fastattn._validation import (
    as_array,
    check_result_size,
    choice,
    is_half_dtype,
    index_value,
    real_number,
)

ROPE_LAYOUTS = _kernels.ROPE_LAYOUTS
ROPE_NONE = _kernels.ROPE_NONE


def _check_base(base, name="base"):
    b = real_number(base, name)
    if not (math.isfinite(b) and b > 0):
        raise ValueError(f"{name} must be positive and finite, got {base!r}")
    return b


def rope_tables(positions, half, base, dtype, num_threads=0):
    """cos and sin tables, each ``(n, half)``, for the int64 ``positions``
    (a 1-D array) or, when ``positions`` is an int ``n``, for 0..n-1.
    bfloat16 and float16 rows are rotated with float32 tables."""
    if is_half_dtype(dtype):
        dtype = np.float32
    if isinstance(positions, (int, np.integer)):
        n, pos = int(positions), None
    else:
        pos = np.ascontiguousarray(positions, dtype=np.int64).reshape(-1)
        n = pos.shape[0]
    cos = np.empty((n, half), dtype=dtype)
    sin = np.empty((n, half), dtype=dtype)
    _kernels.rope_table(cos, sin, pos, 0, base, num_threads)
    return cos, sin


def rotary_args(shape, positions, layout, base):
    """``(layout code, base, int64 positions, kernel shape (N0, N1, L, D))``
    for rotating an ``x`` of ``shape``, with every backend's checks."""
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"x must have shape (..., L, D), got shape {shape}")
    code = ROPE_LAYOUTS[choice(layout, "layout", ROPE_LAYOUTS)]
    b = _check_base(base)
    *lead, L, D = shape
    if D % 2:
        raise ValueError(f"x must have an even last axis (rotated pairs), got shape {shape}")
    pos = positions_array(positions)
    try:
        np.broadcast_shapes(pos.shape, shape[:-1])
    except ValueError:
        raise ValueError(
            f"positions of shape {pos.shape} does not broadcast to x.shape[:-1] = {shape[:-1]} "
            f"(x has shape {shape})") from None
    if np.broadcast_shapes(pos.shape, shape[:-1]) != shape[:-1]:
        raise ValueError(
            f"positions of shape {pos.shape} does not broadcast to x.shape[:-1] = {shape[:-1]} "
            f"(x has shape {shape})")
    N1 = lead[-1] if lead else 1
    N0 = math.prod(lead[:-1]) if len(lead) > 1 else 1
    return code, b, pos, (N0, N1, L, D)


def apply_rotary(x, positions, *, layout="neox", base=10000.0, out=None, num_threads=None):
    """Rotary position embedding (RoPE, Su et al. 2021) of ``x``.

    Each row of ``x`` at position ``p`` is rotated pairwise by the angles
    ``p * base ** (-2j / D)``, ``j < D/2``::

        y_a = x_a * cos - x_b * sin
        y_b = x_b * cos + x_a * sin

    where the pairs ``(a, b)`` are ``(j, j + D/2)`` for ``layout="neox"``
    (GPT-NeoX, LLaMA's ``rotate_half``) and ``(2j, 2j + 1)`` for
    ``layout="gptj"`` (GPT-J, the paper's interleaved form). Angles are
    computed in float64 and each (position, frequency) once, whatever the
    number of heads.

    Parameters
    ----------
    x : array_like, shape ``(..., L, D)``
        ``D`` must be even. Typically ``(B, H, L, D)`` queries or keys.
    positions : array_like of int
        Broadcasts (NumPy rules) to ``x.shape[:-1]``: ``(L,)`` for one
        sequence layout, ``(B, 1, L)`` for per-sequence positions of
        ``(B, H, L, D)`` inputs. Any integers, negative included.
    layout : {"neox", "gptj"}
    base : float, default 10000.0
    out : ndarray, optional
        May be ``x`` itself (in place).
    num_threads : int, optional

    Returns
    -------
    ndarray of ``x``'s shape and compute dtype; bfloat16 and float16 ``x``
    give their own dtype (float32 tables and arithmetic, rounded once).

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> x = np.ones((1, 2, 4))
    >>> fastattn.apply_rotary(x, [0, 1]).round(3)
    array([[[ 1.   ,  1.   ,  1.   ,  1.   ],
            [-0.301,  0.99 ,  1.382,  1.01 ]]])
    """
    backend = _backend.backend_for((x,), ("x",))
    arr = backend.asarray(x, "x")
    dtype = _backend.kernel_dtype(backend, arr.dtype, "x")
    shape = arr.shape
    code, b, pos, kshape = rotary_args(shape, backend.host(positions, "positions"), layout, base)
    arr, x4 = backend.kernel_input(arr, "x", dtype, kshape)
    # one (N0, N1, L) view of the positions; axes they broadcast over keep a
    # zero stride, so each backend computes each distinct position once
    pos = np.broadcast_to(pos, shape[:-1]).reshape(kshape[:3])
    # the kernels write whole rows: an out with a strided last axis gets a
    # buffer that is copied back
    target = backend.output(out, shape, kshape, dtype, inputs=(arr,), inplace_ok=(arr,),
                            unit_last_axis=True)
    backend.rotary(x4, target.kernel_view, positions=pos, layout=code, base=b,
                   num_threads=resolve_num_threads(num_threads))
    return target.finish()


def positions_array(values, name="positions"):
    """Integer positions (negative ones allowed) as int64."""
    arr = as_array(values, name)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} is too large for int64")
    return arr.astype(np.int64, copy=False)


# The largest head count alibi_slopes accepts. For n heads the slopes are
# steps of the geometric sequence 2 ** (-8 k / 2p), p = 2 ** floor(log2 n),
# whose ratio 2 ** (-4 / p) is 1 - 2.77 / p: while p <= 2**24 that exceeds
# float32's largest relative spacing (2**-23), so every head gets its own
# slope; at p = 2**25 millions of them coincide (measured), and ALiBi's point,
# one distance scale per head, is lost. The cap also bounds the work and
# memory (33 M slopes, about 7 s and 270 MB); the Python pow per slope keeps
# the values bit-identical to the paper's reference code.
MAX_ALIBI_HEADS = 2**25 - 1


def alibi_slopes(num_heads, *, dtype=np.float64):
    """The per-head ALiBi slopes of Press et al. (2022), shape ``(num_heads,)``.

    For ``n`` a power of two the slopes are the geometric sequence
    ``2 ** (-8 * (h + 1) / n)``; otherwise the ``2 ** floor(log2 n)`` slopes
    of the nearest lower power of two are followed by every other slope of
    the sequence for twice that power, as in the paper's reference code.
    Pass them to ``scaled_dot_product_attention(alibi_slopes=...)``.
    ``num_heads`` is at most ``2**25 - 1``, the largest count whose slopes
    are all distinct in float32 (see ``MAX_ALIBI_HEADS``).

    Examples
    --------
    >>> import fastattn
    >>> fastattn.alibi_slopes(4).tolist()
    [0.25, 0.0625, 0.015625, 0.00390625]
    >>> fastattn.alibi_slopes(6).tolist()
    [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]
    """
    n = index_value(num_heads, "num_heads")
    if n < 1:
        raise ValueError(f"num_heads must be >= 1, got {n}")
    if n > MAX_ALIBI_HEADS:
        raise ValueError(
            f"num_heads must be <= {MAX_ALIBI_HEADS} (2**25 - 1): beyond it adjacent "
            f"heads' slopes are no longer distinct in float32, got {n}"
        )
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    check_result_size((n,), dt, f"num_heads={n}")
    p = 1 << (n.bit_length() - 1)  # the largest power of two <= n
    slopes = [2.0 ** (-8.0 * (h + 1) / p) for h in range(p)]
    # the remainder: odd-numbered slopes of the 2p sequence, 2 ** (-8 (2i + 1) / 2p)
    slopes += [2.0 ** (-8.0 * (2 * i + 1) / (2 * p)) for i in range(n - p)]
    return np.array(slopes, dtype=dt)
