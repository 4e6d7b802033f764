"""The KV cache of a multi-head attention layer, for decoding."""

import sys

import numpy as np

from fastattn import _backend
from fastattn._validation import index_value, int_array


def float_dtype(dtype, name="dtype"):
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be float32 or float64, got {dtype!r}") from None
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"{name} must be float32 or float64, got {dt}")
    return dt


def positive(value, name):
    v = index_value(value, name)
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return v


def _check_cache_size(shape, head_dim, v_head_dim, dtype):
    """Refuse, naming the arguments, keys or values that NumPy could not even
    describe (a dimension or a byte size past the address space), before
    anything is allocated; a merely large cache is MemoryError, as for any
    array."""
    dims = shape + (max(head_dim, v_head_dim),)
    count = 1
    for n in dims:
        count *= n
    if max(dims) > sys.maxsize or count * dtype.itemsize > sys.maxsize:
        B, Hkv, L = shape
        raise ValueError(f"batch_size={B}, max_len={L}, num_kv_heads={Hkv}, head_dim={head_dim}, "
                         f"v_head_dim={v_head_dim} give a cache larger than the addressable size")


class KVCache:
    """Preallocated keys and values of a batch of sequences, for decoding.

    Create it with :meth:`MultiHeadAttention.new_cache` (on the layer's
    device). ``k`` has shape ``(batch_size, num_kv_heads, max_len,
    head_dim)`` and ``v`` ``(batch_size, num_kv_heads, max_len,
    v_head_dim)``; both are allocated once, as NumPy arrays on ``"cpu"`` and
    CuPy arrays on ``"cuda"``. A layer call with ``cache=`` writes the new
    keys and values (RoPE already applied) at each sequence's current length
    and advances ``lengths``. Entries at or past ``lengths[b]`` are
    unspecified. Sequences may have different lengths (ragged batches). The
    lengths are kept on the host on every device, so checking a call never
    synchronises with a GPU. :meth:`to` moves the cache between devices.
    """

    def __init__(self, batch_size, max_len, num_kv_heads, head_dim, dtype=np.float32, *,
                 v_head_dim=None, device="cpu"):
        self.batch_size = index_value(batch_size, "batch_size")
        self.max_len = index_value(max_len, "max_len")
        if self.batch_size < 0 or self.max_len < 0:
            raise ValueError(f"batch_size and max_len must be non-negative, got {batch_size} and {max_len}")
        self.num_kv_heads = positive(num_kv_heads, "num_kv_heads")
        self.head_dim = positive(head_dim, "head_dim")
        self.dtype = float_dtype(dtype)
        self.v_head_dim = self.head_dim if v_head_dim is None else positive(v_head_dim, "v_head_dim")
        self.device = _backend.check_device(device)
        shape = (self.batch_size, self.num_kv_heads, self.max_len)
        _check_cache_size(shape, self.head_dim, self.v_head_dim, self.dtype)
        self._lengths = np.zeros(self.batch_size, dtype=np.int64)
        if self.device == "cpu":
            self._k = np.zeros(shape + (self.head_dim,), dtype=self.dtype)
            self._v = np.zeros(shape + (self.v_head_dim,), dtype=self.dtype)
        else:
            cuda = _backend.cuda_backend()
            self._k = cuda.empty(shape + (self.head_dim,), self.dtype)
            self._v = cuda.empty(shape + (self.v_head_dim,), self.dtype)

    @property
    def k(self):
        """The keys, ``(batch_size, num_kv_heads, max_len, head_dim)``."""
        return self._k if self.device == "cpu" else self._k.obj

    @property
    def v(self):
        """The values, ``(batch_size, num_kv_heads, max_len, v_head_dim)``."""
        return self._v if self.device == "cpu" else self._v.obj

    @property
    def lengths(self):
        """Tokens held per sequence, shape ``(batch_size,)`` (a host copy)."""
        return self._lengths.copy()

    def reset(self, lengths=None):
        """Forget the contents (or truncate each sequence to ``lengths``, a
        host or device array)."""
        if lengths is None:
            self._lengths[:] = 0
            return
        if _backend.is_device_array(lengths):
            lengths = _backend.cuda_backend().host_array(lengths, "lengths")
        arr = int_array(lengths, "lengths")
        if arr.shape not in ((), (self.batch_size,)):
            raise ValueError(f"lengths must have shape ({self.batch_size},), got {arr.shape}")
        if arr.size and (arr > self._lengths).any():
            raise ValueError(f"reset can only shorten sequences: lengths {arr} exceed the current {self._lengths}")
        self._lengths[:] = arr

    def to(self, device):
        """Move the keys, values and lengths to ``device`` (``"cpu"`` or
        ``"cuda"``, the current CuPy device) and return the cache itself.
        A copy between host and device (which synchronises); nothing happens
        when the cache is already there."""
        device = _backend.check_device(device)
        if device != self.device:
            cuda = _backend.cuda_backend()
            if device == "cuda":
                self._k, self._v = cuda.upload(self._k, self.dtype), cuda.upload(self._v, self.dtype)
            else:
                self._k, self._v = cuda.download(self._k), cuda.download(self._v)
            self.device = device
        return self

    def append_lengths(self, new_tokens):
        """(old, new) lengths once ``new_tokens[b]`` tokens are appended to
        each sequence b; ValueError, with nothing changed, on overflow."""
        new_tokens = int_array(new_tokens, "new_tokens")
        if new_tokens.shape != (self.batch_size,):
            raise ValueError(f"new_tokens must have shape ({self.batch_size},), got {new_tokens.shape}")
        old = self._lengths.copy()
        new = old + new_tokens
        if self.batch_size and (new > self.max_len).any():
            b = int(np.argmax(new > self.max_len))
            raise ValueError(
                f"KV cache overflow: sequence {b} holds {old[b]} of max_len={self.max_len} tokens and "
                f"cannot take {new_tokens[b]} more; nothing was appended")
        return old, new

    def __repr__(self):
        extra = f", v_head_dim={self.v_head_dim}" if self.v_head_dim != self.head_dim else ""
        extra += f", device={self.device!r}" if self.device != "cpu" else ""
        return (f"KVCache(batch_size={self.batch_size}, max_len={self.max_len}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, dtype={self.dtype.name}"
                f"{extra}, lengths={self._lengths.tolist()})")
