"""Validation of the model-feature arguments shared by the attention entry
points (:func:`~fastattn.scaled_dot_product_attention`,
:func:`~fastattn.varlen_attention`, :func:`~fastattn.paged_attention`):
sliding ``window``, logit ``softcap`` and attention ``sinks``."""

import math

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


def sinks_array(sinks, num_heads, dtype, name="sinks"):
    """``(H,)`` contiguous in ``dtype``; -inf (no sink) allowed, NaN and +inf
    are not."""
    if sinks is None:
        return None
    arr = np.ascontiguousarray(float_array(sinks, name, dtype))
    if arr.shape != (num_heads,):
        raise ValueError(
            f"{name} must have shape ({num_heads},) for {num_heads} query heads, got {arr.shape}")
    if arr.size and (np.isnan(arr).any() or (arr == np.inf).any()):
        raise ValueError(f"{name} must not contain NaN or +inf")
    return arr
