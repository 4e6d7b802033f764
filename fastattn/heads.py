"""Splitting the model dimension into attention heads and merging them back."""

import numpy as np

from fastattn import _backend, _kernels
from fastattn._config import resolve_num_threads
from fastattn._validation import OutputTarget, float_array, index_value, require_ndim


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
        Any strides. ``E`` must be divisible by ``num_heads``.
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
    if type(x) is not np.ndarray:
        backend = _backend.cuda_for((x,), ("x",))
        if backend is not None:
            return backend.split_heads(x, num_heads, out=out)
    arr = float_array(x, "x")
    B, S, H, D = _split_dims(arr, num_heads)
    x4 = arr.reshape(B, S, H, D)  # splitting an axis is always a view
    target = OutputTarget(out, (B, H, S, D), (B, H, S, D), arr.dtype, inputs=(arr,),
                          contiguous=True)
    _kernels.split_heads(x4, target.kernel_view, resolve_num_threads(num_threads))
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
    if type(x) is not np.ndarray:
        backend = _backend.cuda_for((x,), ("x",))
        if backend is not None:
            return backend.merge_heads(x, out=out)
    arr = float_array(x, "x")
    require_ndim(arr, "x", 4, "(batch, heads, seq, head_dim)")
    B, H, S, D = arr.shape
    shape = (B, S, H * D)
    target = OutputTarget(out, shape, shape, arr.dtype, inputs=(arr,), contiguous=True)
    _kernels.merge_heads(arr, target.kernel_view, resolve_num_threads(num_threads))
    return target.finish()
