"""bfloat16 / float16 matrix products with float32 accumulation (private).

``matmul(a, packed)`` computes ``alpha * a @ w.T (+ bias)`` for a weight
``w`` of shape ``(N, K)`` packed once by :class:`PackedWeight`, the form a
projection layer uses (``nn.Linear`` stores its weight as ``(out, in)``).
The products are summed in float32 in a fixed order, the same at every ISA
level and thread count (csrc/gemm_bf16.c); on CPUs with AVX512_BF16 the
bfloat16 path runs on ``vdpbf16ps``.

bfloat16 arrays are NumPy's ``ml_dtypes.bfloat16`` (the optional
``fastattn[bf16]`` extra); float16 needs nothing beyond NumPy.

>>> import numpy as np
>>> from fastattn import bf16_gemm
>>> w = np.arange(12, dtype=np.float16).reshape(3, 4)   # (N, K)
>>> packed = bf16_gemm.PackedWeight(w)
>>> bf16_gemm.matmul(np.ones((2, 4), np.float16), packed, bias=[0.5, 0, 0])
array([[ 6.5, 22. , 38. ],
       [ 6.5, 22. , 38. ]], dtype=float16)
"""

import numbers

import numpy as np

from fastattn import _kernels
from fastattn._config import resolve_num_threads

__all__ = ["PackedWeight", "matmul"]

_BF16_HINT = "bfloat16 arrays need ml_dtypes: pip install 'fastattn[bf16]' (or ml_dtypes)"


def _bfloat16():
    """ml_dtypes.bfloat16, or None when ml_dtypes is not installed."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


def _dtype_code(dtype, name):
    """The C dtype code of a bfloat16 or float16 dtype; TypeError otherwise."""
    dtype = np.dtype(dtype)
    if dtype == np.float16:
        return _kernels.DTYPE_F16
    bf16 = _bfloat16()
    if bf16 is not None and dtype == bf16:
        return _kernels.DTYPE_BF16
    if bf16 is None and dtype.name == "bfloat16":
        raise TypeError(f"{name}: {_BF16_HINT}")
    raise TypeError(f"{name} must be bfloat16 (ml_dtypes) or float16, got {dtype}")


def _native(x):
    """x in native byte order (a big-endian float16 is converted)."""
    return x if x.dtype.isnative else x.astype(x.dtype.newbyteorder("="))


class PackedWeight:
    """A ``(N, K)`` bfloat16 or float16 weight, packed once for :func:`matmul`.

    Parameters
    ----------
    w : array_like, shape (N, K)
        bfloat16 (``ml_dtypes.bfloat16``) or float16, any strides. It is
        copied into the packed layout; later changes to ``w`` are not seen.
    num_threads : int, optional
        Threads for the packing.

    Attributes
    ----------
    shape : tuple
        ``(N, K)``.
    dtype : numpy.dtype
        The weight's dtype; :func:`matmul` takes activations of this dtype.
    """

    def __init__(self, w, *, num_threads=None):
        w = _native(np.asarray(w))
        self._code = _dtype_code(w.dtype, "w")
        if w.ndim != 2:
            raise ValueError(f"w must have shape (N, K), got shape {w.shape}")
        self.dtype = w.dtype
        self.shape = tuple(int(n) for n in w.shape)
        bits = w.view(np.uint16)  # same item size: a view for any strides
        self._packed = np.empty(_kernels.gemm16_packed_elems(*self.shape), dtype=np.uint16)
        _kernels.gemm16_pack_weight(self._code, bits, self._packed, resolve_num_threads(num_threads))

    @property
    def nbytes(self):
        """Bytes of the packed form (the weight, padded to whole panels)."""
        return self._packed.nbytes

    def __repr__(self):
        return f"PackedWeight(shape={self.shape}, dtype={self.dtype})"


def matmul(a, packed, *, out=None, out_dtype=None, bias=None, alpha=1.0, num_threads=None):
    """``alpha * a @ w.T (+ bias)`` with float32 accumulation.

    Parameters
    ----------
    a : array_like, shape (M, K)
        Activations in the weight's dtype. Rows may be strided; a column
        stride other than one element is copied first.
    packed : PackedWeight
        The weight ``w`` of shape ``(N, K)``.
    out : ndarray, optional
        ``(M, N)`` result buffer of ``out_dtype``, unit column stride.
    out_dtype : dtype, optional
        float32 or the input dtype (the default; the float32 sums are
        rounded to nearest even once, at the end).
    bias : array_like, shape (N,), optional
        Added after the scaling, in float32 (converted exactly from bfloat16
        or float16).
    alpha : float
        Scale of the product, applied in float32.
    num_threads : int, optional
        Threads; the result does not depend on it.

    Returns
    -------
    ndarray, shape (M, N)
    """
    if not isinstance(packed, PackedWeight):
        raise TypeError(f"packed must be a PackedWeight, got {type(packed).__name__}")
    N, K = packed.shape
    a = _native(np.asarray(a))
    if a.dtype != packed.dtype:
        _dtype_code(a.dtype, "a")  # names a missing ml_dtypes or a wrong dtype family
        raise TypeError(f"a has dtype {a.dtype} but the packed weight is {packed.dtype}")
    if a.ndim != 2 or a.shape[1] != K:
        raise ValueError(f"a must have shape (M, {K}) to match the weight of shape {packed.shape}, "
                         f"got shape {a.shape}")
    M = a.shape[0]
    if a.strides[1] != a.itemsize or a.strides[0] < 0 or a.strides[0] % a.itemsize:
        a = np.ascontiguousarray(a)
    out_dtype = packed.dtype if out_dtype is None else np.dtype(out_dtype)
    if out_dtype != np.float32 and out_dtype != packed.dtype:
        raise TypeError(f"out_dtype must be float32 or {packed.dtype}, got {out_dtype}")
    if out is None:
        out = np.empty((M, N), dtype=out_dtype)
    else:
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out must be a numpy array, got {type(out).__name__}")
        if out.shape != (M, N) or out.dtype != out_dtype:
            raise ValueError(f"out must have shape {(M, N)} and dtype {out_dtype}, "
                             f"got shape {out.shape} and dtype {out.dtype}")
        if not out.flags.writeable:
            raise ValueError("out is read-only")
        if M > 1 and (out.strides[1] != out.itemsize or out.strides[0] < out.itemsize * N):
            raise ValueError(f"out must have unit column stride and non-overlapping rows, "
                             f"got strides {out.strides}")
        if M and N and np.shares_memory(out, a):
            raise ValueError("out must not overlap a")
    if bias is not None:
        bias = np.asarray(bias)
        if bias.shape != (N,):
            raise ValueError(f"bias must have shape ({N},), got shape {bias.shape}")
        if bias.dtype != np.float32:
            if not (np.issubdtype(bias.dtype, np.floating) or bias.dtype.name == "bfloat16"):
                raise TypeError(f"bias must be a floating-point array, got {bias.dtype}")
            bias = bias.astype(np.float32)  # exact from 16 bits; float64 rounds once
        bias = np.ascontiguousarray(bias)
    if isinstance(alpha, (bool, np.bool_)) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a real number, got {alpha!r}")
    alpha = float(alpha)
    return matmul_checked(a, packed, out, bias, alpha, resolve_num_threads(num_threads))


def matmul_checked(a, packed, out, bias, alpha, num_threads):
    """:func:`matmul` on arguments already checked (a layer's own buffers):
    a (M, K) of the packed dtype with a unit column stride, out (M, N) of
    float32 or that dtype, bias None or a contiguous float32 (N,), alpha a
    float, num_threads resolved."""
    if a.shape[0] and packed.shape[0]:
        _kernels.gemm16(packed._code, a.view(np.uint16), packed._packed, packed.shape[0],
                        out if out.dtype == np.float32 else out.view(np.uint16), bias, alpha,
                        num_threads)
    return out
