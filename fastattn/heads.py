"""Splitting the model dimension into attention heads and merging them back."""

from fastattn import _backend
from fastattn._config import resolve_num_threads
from fastattn._validation import index_value, require_ndim


def _split_dims(x, num_heads):
    """(B, S, H, D) for splitting ``x`` (B, S, H*D) into ``num_heads`` heads,
    with the checks and messages of :func:`split_heads` (CPU and GPU)."""
    require_ndim(x, "x", 3, "(batch, seq, embed)")
    H = index_value(num_heads, "num_heads")
    B, S, E = x.shape
    if H <= 0:
        raise ValueError(f"num_heads must be positive, got {H}")
    if E % H:
        raise ValueError(f"num_heads={H} does not divide the last axis of x (shape {x.shape}, E={E})")
    return B, S, H, E // H


def split_heads(x, num_heads, *, out=None, num_threads=None):
    """Split ``(B, S, H*D)`` into a C-contiguous ``(B, H, S, D)``.

    Parameters
    ----------
    x : array_like, shape ``(B, S, E)``
        Any strides. ``E`` must be divisible by ``num_heads``. bfloat16 and
        float16 stay 16-bit (the elements are moved, not converted).
    num_heads : int
    out : ndarray, optional, shape ``(B, H, S, D)``
    num_threads : int, optional

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> fastattn.split_heads(np.arange(8.0).reshape(1, 2, 4), 2)[0]
    array([[[0., 1.],
            [4., 5.]],
    <BLANKLINE>
           [[2., 3.],
            [6., 7.]]])
    """
    backend = _backend.backend_for((x,), ("x",))
    arr = backend.asarray(x, "x")
    dtype = _backend.kernel_dtype(backend, arr.dtype, "x")
    B, S, H, D = _split_dims(arr, num_heads)
    arr, x4 = backend.kernel_input(arr, "x", dtype, (B, S, H, D))  # splitting an axis is a view
    target = backend.output(out, (B, H, S, D), (B, H, S, D), dtype, inputs=(arr,), contiguous=True)
    backend.split_heads(x4, target.kernel_view, num_threads=resolve_num_threads(num_threads))
    return target.finish()


def merge_heads(x, *, out=None, num_threads=None):
    """Merge ``(B, H, S, D)`` into a C-contiguous ``(B, S, H*D)``.

    The inverse of :func:`split_heads`: ``merge_heads(split_heads(x, h))``
    equals ``x``.

    Parameters
    ----------
    x : array_like, shape ``(B, H, S, D)``
        Any strides.
    out : ndarray, optional, shape ``(B, S, H*D)``
    num_threads : int, optional

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> x = np.random.default_rng(0).standard_normal((2, 5, 12))
    >>> bool((fastattn.merge_heads(fastattn.split_heads(x, 3)) == x).all())
    True
    """
    backend = _backend.backend_for((x,), ("x",))
    arr = backend.asarray(x, "x")
    dtype = _backend.kernel_dtype(backend, arr.dtype, "x")
    require_ndim(arr, "x", 4, "(batch, heads, seq, head_dim)")
    B, H, S, D = arr.shape
    arr, _ = backend.kernel_input(arr, "x", dtype, arr.shape)
    shape = (B, S, H * D)
    target = backend.output(out, shape, shape, dtype, inputs=(arr,), contiguous=True)
    backend.merge_heads(arr, target.kernel_view, num_threads=resolve_num_threads(num_threads))
    return target.finish()
