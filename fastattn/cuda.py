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


# the public API, importable from here as before: the same objects as in fastattn
_PUBLIC = ("KVCache", "MultiHeadAttention", "add_position_encoding", "apply_rotary", "masked_softmax",
           "merge_heads", "scaled_dot_product_attention", "sinusoidal_position_encoding", "split_heads")


def __getattr__(name):
    if name in _PUBLIC:
        import fastattn

        return getattr(fastattn, name)
    raise AttributeError(f"module 'fastattn.cuda' has no attribute {name!r}")
