"""Validation of the model-feature arguments shared by the attention entry
points (:func:`~fastattn.scaled_dot_product_attention`,
:func:`~fastattn.varlen_attention`, :func:`~fastattn.paged_attention`):
sliding ``window``, logit ``softcap``, attention ``sinks`` and ALiBi
``alibi_slopes``, one by one or all at once with :func:`kernel_features`."""

import math
from typing import NamedTuple

import numpy as np

from fastattn._validation import float_array, index_value, real_number


def window_pair(window, name="window"):
    """``(left, right)``, each an int >= 0 or None, as a tuple; None when the
    window is absent or unbounded on both sides."""
    if window is None:
        return None
    if isinstance(window, (str, bytes)) or not hasattr(window, "__len__") or len(window) != 2:
        raise TypeError(f"{name} must be a pair (left, right) of ints >= 0 or None, got {window!r}")
    sides = []
    for side, value in zip(("left", "right"), window):
        if value is None:
            sides.append(None)
            continue
        value = index_value(value, f"{name} {side}")
        if value < 0:
            raise ValueError(f"{name} {side} must be >= 0 or None, got {value}")
        if value > np.iinfo(np.int64).max:
            raise ValueError(f"{name} {side} must fit in an int64 (None means unbounded), "
                             f"got an integer of {value.bit_length()} bits")
        sides.append(value)
    return None if sides == [None, None] else tuple(sides)


def softcap_value(softcap, name="softcap"):
    """A finite float > 0, or None (0.0 for the kernels means off)."""
    if softcap is None:
        return 0.0
    value = real_number(softcap, name, "a real number > 0 or None")
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {softcap!r}")
    return value


def _per_head_array(values, num_heads, dtype, name):
    """``values`` as a contiguous ``(num_heads,)`` array in ``dtype``, or None."""
    if values is None:
        return None
    arr = np.ascontiguousarray(float_array(values, name, dtype))
    if arr.shape != (num_heads,):
        raise ValueError(
            f"{name} must have shape ({num_heads},) for {num_heads} query heads, got {arr.shape}")
    return arr


def sinks_array(sinks, num_heads, dtype, name="sinks"):
    """``(H,)`` contiguous in ``dtype``; -inf (no sink) allowed, NaN and +inf
    are not."""
    arr = _per_head_array(sinks, num_heads, dtype, name)
    if arr is not None and arr.size and (np.isnan(arr).any() or (arr == np.inf).any()):
        raise ValueError(f"{name} must not contain NaN or +inf")
    return arr


def alibi_slopes_array(alibi_slopes, num_heads, dtype, name="alibi_slopes"):
    """``(H,)`` contiguous in ``dtype``, or None."""
    return _per_head_array(alibi_slopes, num_heads, dtype, name)


class KernelFeatures(NamedTuple):
    """The model-feature arguments checked, in the form the kernels take."""

    window: tuple | None
    softcap: float
    sinks: np.ndarray | None
    alibi_slopes: np.ndarray | None


def kernel_features(window, softcap, sinks, alibi_slopes, num_heads, dtype):
    """``window``, ``softcap``, ``sinks`` and ``alibi_slopes`` checked in
    that order (the first bad one raises), for ``num_heads`` query heads and
    arrays in ``dtype``."""
    return KernelFeatures(window_pair(window), softcap_value(softcap),
                          sinks_array(sinks, num_heads, dtype),
                          alibi_slopes_array(alibi_slopes, num_heads, dtype))
