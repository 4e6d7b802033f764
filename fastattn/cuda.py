"""fastattn.cuda: whether the GPU path can run here.

There is one API for every device: :func:`fastattn.scaled_dot_product_attention`
and the other public functions run on the GPU when their arrays are CuPy (or
other CUDA) arrays, and :class:`fastattn.MultiHeadAttention` and
:class:`fastattn.KVCache` move there with ``.to("cuda")`` (see docs/gpu.md).
This module answers whether that can work (:func:`is_available`,
:func:`unavailable_reason`) and keeps the public names importable from here
too: each is the same object as in :mod:`fastattn`.

Importing it imports neither CuPy nor the CUDA extension.
"""

from fastattn._backend import CudaUnavailableError
# the public API, importable from here as before (the same objects as in fastattn)
from fastattn.attention import scaled_dot_product_attention  # noqa: F401
from fastattn.heads import merge_heads, split_heads  # noqa: F401
from fastattn.kv_cache import KVCache  # noqa: F401
from fastattn.layer import MultiHeadAttention  # noqa: F401
from fastattn.masks import masked_softmax  # noqa: F401
from fastattn.position import add_position_encoding, sinusoidal_position_encoding  # noqa: F401
from fastattn.rotary import apply_rotary  # noqa: F401

# the public functions and classes are documented in fastattn; listed here
# is what only this module has
__all__ = ["CudaUnavailableError", "is_available", "unavailable_reason"]


def is_available():
    """True when the GPU path can run: fastattn was built with its CUDA
    extension, CuPy imports and a CUDA device is visible. Never raises."""
    from fastattn._backend import cuda

    return cuda.is_available()


def unavailable_reason():
    """Why :func:`is_available` is False, or None when it is True."""
    from fastattn._backend import cuda

    return cuda.unavailable_reason()
