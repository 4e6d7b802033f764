"""Masks: sequence masks, the classic padding mask and the fused masked softmax.

Conventions (see docs/masks.md): a bool ``attn_mask`` is True where a query
may attend, as in ``torch.nn.functional.scaled_dot_product_attention`` and
Keras; a float mask is added to the scores. Lengths are first-class
arguments and are never expanded into mask arrays. A row with no key left is
all zeros, never NaN; padded query rows are exactly zero.
"""

import math

import numpy as np

from fastattn import _backend, _kernels
from fastattn._config import resolve_num_threads
from fastattn._validation import (
    OutputTarget,
    bool_flag,
    as_array,
    check_result_size,
    choice,
    is_half_dtype,
    storage_dtype,
    float_array,
    index_value,
    int_array,
    kernel_addressable,
    lengths_view,
    real_number,
)

CAUSAL_ALIGNMENTS = _kernels.CAUSAL_ALIGNMENTS
SEQUENCE_MASK_MODES = _kernels.SEQUENCE_MASK_MODES
_MASK_BOOL = _kernels.MASK_BOOL
_MASK_ADD = _kernels.MASK_ADD


def sequence_mask(lengths, maxlen=None, dtype=bool):
    """Mask of valid positions from sequence lengths, like ``tf.sequence_mask``.

    Parameters
    ----------
    lengths : array_like of int
        Any shape; non-negative.
    maxlen : int, optional
        Length of the new last axis; defaults to ``max(lengths)`` (0 when
        ``lengths`` is empty).
    dtype : dtype, default bool
        Output dtype; True (1) marks a valid position.

    Returns
    -------
    ndarray of shape ``lengths.shape + (maxlen,)``

    Examples
    --------
    >>> import fastattn
    >>> fastattn.sequence_mask([1, 3], maxlen=4).astype(int)
    array([[1, 0, 0, 0],
           [1, 1, 1, 0]])
    """
    arr = int_array(lengths, "lengths")
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be a NumPy dtype, got {dtype!r}") from None
    if maxlen is None:
        maxlen = int(arr.max()) if arr.size else 0
    else:
        maxlen = index_value(maxlen, "maxlen")
        if maxlen < 0:
            raise ValueError(f"maxlen must be non-negative, got {maxlen}")
        if maxlen > np.iinfo(np.int64).max:
            # np.arange(2**63, dtype=int64) is silently empty
            raise ValueError(f"maxlen must be < 2**63, got {maxlen}")
    check_result_size(arr.shape + (maxlen,), dtype, f"lengths of shape {arr.shape} and maxlen={maxlen}")
    # the result first: a shape that cannot be allocated fails before the
    # (maxlen,) index vector is built and filled
    mask = np.empty(arr.shape + (maxlen,), dtype=bool)
    np.less(np.arange(maxlen, dtype=np.int64), arr[..., None], out=mask)
    return mask if dtype == np.bool_ else mask.astype(dtype)


def apply_sequence_mask(x, lengths, *, mode="mul", axis=1, out=None, num_threads=None):
    """Apply the classic padding mask built from ``lengths``.

    Parameters
    ----------
    x : array_like, shape ``(B, ...)``
        Batch is axis 0.
    lengths : array_like of int, shape ``(B,)`` or ``(B, 1)``
        Valid length of each batch item along ``axis``; ``0 <= lengths <=
        x.shape[axis]``.
    mode : {"mul", "add"}
        ``"mul"`` zeroes the positions ``>= length``; ``"add"`` returns
        ``x - (1 - mask) * 1e12``, the additive form applied to scores before
        a softmax.
    axis : int, default 1
        The masked axis; any axis but the batch axis.
    out : ndarray, optional
        Output array of ``x``'s shape and compute dtype; may be ``x`` itself.
    num_threads : int, optional

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> fastattn.apply_sequence_mask(np.ones((2, 3)), [1, 2])
    array([[1., 0., 0.],
           [1., 1., 0.]])
    """
    mode_code = SEQUENCE_MASK_MODES[choice(mode, "mode", SEQUENCE_MASK_MODES)]
    if type(x) is not np.ndarray and _backend.is_device_array(x):
        raise TypeError("apply_sequence_mask runs on the CPU only (there is no CUDA kernel for it); "
                        f"pass a host array, got a CUDA {_backend.library_name(x)} array")
    arr = float_array(x, "x")
    if arr.ndim < 2:
        raise ValueError(f"x must have a batch axis and a masked axis (ndim >= 2), got shape {arr.shape}")
    ax = index_value(axis, "axis")
    if not -arr.ndim <= ax < arr.ndim:
        raise ValueError(f"axis {axis} is out of bounds for x of shape {arr.shape}")
    ax %= arr.ndim
    if ax == 0:
        raise ValueError("axis must not be 0: axis 0 is the batch axis of x")
    lens = int_array(lengths, "lengths")
    B, L = arr.shape[0], arr.shape[ax]
    if lens.shape not in ((B,), (B, 1)):
        raise ValueError(f"lengths must have shape ({B},) or ({B}, 1) for x of shape {arr.shape}, got {lens.shape}")
    lens = np.ascontiguousarray(lens.reshape(B))
    if lens.size and lens.max() > L:
        raise ValueError(f"lengths must be <= x.shape[{ax}] = {L}, got max {lens.max()}")
    P = math.prod(arr.shape[1:ax])
    C = math.prod(arr.shape[ax + 1:])
    kshape = (B, P, L, C)
    x4 = arr.reshape(kshape)
    target = OutputTarget(out, arr.shape, kshape, arr.dtype, inputs=(arr,), inplace_ok=(arr,))
    _kernels.apply_sequence_mask(x4, target.kernel_view, lens, mode_code,
                                 resolve_num_threads(num_threads))
    return target.finish()


def mask_kind(dtype, shape, full_shape):
    """The kernel mask kind of an ``attn_mask`` of ``dtype`` and ``shape``
    for scores of ``full_shape``, with every backend's checks: bool masks
    select, real ones add; it must broadcast (NumPy rules) to the scores."""
    if dtype == np.bool_:
        kind = _MASK_BOOL
    else:
        storage_dtype(dtype, "attn_mask")  # real dtypes, bfloat16 included
        kind = _MASK_ADD
    shape, full_shape = tuple(shape), tuple(full_shape)
    pad = len(full_shape) - len(shape)
    if pad < 0 or any(n not in (1, t) for n, t in zip(shape, full_shape[pad:])):
        raise ValueError(
            f"attn_mask of shape {shape} does not broadcast to the scores shape {full_shape}")
    return kind


def prepare_mask(attn_mask, full_shape, kernel_shape, dtype):
    """A user attn_mask as (kind, 4-D broadcast view of ``kernel_shape``)."""
    if attn_mask is None:
        return 0, None
    m = as_array(attn_mask, "attn_mask")
    kind = mask_kind(m.dtype, m.shape, full_shape)
    if kind == _MASK_BOOL:
        m = m.view(np.uint8)
    else:
        m = m.astype(dtype, copy=False)
        if not kernel_addressable(m):
            m = m.copy()
    return kind, np.broadcast_to(m, full_shape).reshape(kernel_shape)


def scores_geometry(shape):
    """Scores of ``shape`` (..., Lq, Lk) as the kernels see them: the leading
    shape, B (its first axis, 1 if none), M (the product of the rest), Lq,
    Lk and the kernel shape (B, M, Lq, Lk). Shared by the CPU and GPU paths."""
    if len(shape) < 2:
        raise ValueError(f"scores must have at least 2 dimensions (..., Lq, Lk), got shape {tuple(shape)}")
    lead = tuple(shape[:-2])
    Lq, Lk = shape[-2:]
    B = lead[0] if lead else 1
    M = math.prod(lead[1:])
    return lead, B, M, Lq, Lk, (B, M, Lq, Lk)


def softmax_args(shape, key_lengths, query_lengths, is_causal, causal_alignment, scale):
    """``(kernel shape, causal code, scale, key lengths, query lengths)`` of
    a masked softmax over scores of ``shape``, with every backend's checks;
    the lengths are (B, M) int64 views, or None."""
    lead, B, M, Lq, Lk, kshape = scores_geometry(shape)
    is_causal = bool_flag(is_causal, "is_causal")
    alignment = CAUSAL_ALIGNMENTS[choice(causal_alignment, "causal_alignment", CAUSAL_ALIGNMENTS)]
    causal = alignment if is_causal else 0
    scale = _real_scalar(scale, "scale")
    kl = lengths_view(key_lengths, "key_lengths", lead, B, M, Lk, "key (last) axis")
    ql = lengths_view(query_lengths, "query_lengths", lead, B, M, Lq, "query (second-to-last) axis")
    return kshape, causal, scale, kl, ql


def masked_softmax(scores, *, attn_mask=None, key_lengths=None, query_lengths=None,
                   is_causal=False, causal_alignment="top_left", scale=1.0, out=None,
                   num_threads=None):
    """Fused, numerically stable softmax over the last axis with every mask applied.

    One pass per row: scale, apply the masks, normalise. Masked keys get
    probability exactly 0; a row with no key left, and every row at or after
    its ``query_lengths``, is all zeros. Lengths and causality are never
    expanded into mask arrays, and masked work is skipped.

    Parameters
    ----------
    scores : array_like, shape ``(..., Lq, Lk)``
    attn_mask : array_like, optional
        Broadcasts to ``scores.shape``. Bool: True = may attend. Real: added
        to the scaled scores (use ``-inf`` to mask).
    key_lengths : array_like of int, optional
        Shape ``(B,)`` (one per item of axis 0) or ``scores.shape[:-2]``.
        Keys ``j >= length`` are masked.
    query_lengths : array_like of int, optional
        Same shapes; rows ``i >= length`` are padded queries and return 0.
    is_causal : bool
        Mask keys after the query: ``j > i`` (``"top_left"``) or
        ``j > i + Lk - Lq`` (``"bottom_right"``).
    causal_alignment : {"top_left", "bottom_right"}
    scale : float, default 1.0
        Multiplies the scores before masks are added.
    out : ndarray, optional
        May be ``scores`` itself (in place).
    num_threads : int, optional

    Returns
    -------
    ndarray of ``scores``' shape and compute dtype; bfloat16 and float16
    scores give their own dtype (float32 inside, rounded once; an additive
    ``attn_mask`` is used in float32).

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> fastattn.masked_softmax(np.zeros((2, 4)), key_lengths=np.array(2))
    array([[0.5, 0.5, 0. , 0. ],
           [0.5, 0.5, 0. , 0. ]])
    """
    backend = _backend.backend_for((scores,), ("scores",))
    x = backend.asarray(scores, "scores")
    dtype = _backend.kernel_dtype(backend, x.dtype, "scores")
    kshape, causal, scale, kl, ql = softmax_args(
        x.shape, backend.host(key_lengths, "key_lengths"), backend.host(query_lengths, "query_lengths"),
        is_causal, causal_alignment, scale)
    # 16-bit scores take an additive mask in float32 (a 16-bit one widens
    # exactly; -inf and large negative values survive)
    kind, mask4 = backend.attention_mask(attn_mask, x.shape, kshape,
                                         np.float32 if is_half_dtype(dtype) else dtype)
    shape = x.shape
    x, x4 = backend.kernel_input(x, "scores", dtype, kshape)
    inputs = (x,) if mask4 is None else (x, mask4)
    target = backend.output(out, shape, kshape, dtype, inputs=inputs, inplace_ok=(x,))
    backend.masked_softmax(x4, target.kernel_view, scale=scale, mask=mask4, mask_kind=kind,
                           key_len=kl, query_len=ql, causal=causal,
                           num_threads=resolve_num_threads(num_threads))
    return target.finish()


def _real_scalar(value, name):
    return real_number(value, name)
