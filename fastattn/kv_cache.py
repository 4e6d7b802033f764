"""The KV cache of a multi-head attention layer, for decoding."""

import sys

import numpy as np

from fastattn import _backend, _kernels
from fastattn._validation import index_value, int_array, int_extremes


def float_dtype(dtype, name="dtype"):
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be float32 or float64, got {dtype!r}") from None
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"{name} must be float32 or float64, got {dt}")
    return dt


BF16_HINT = "bfloat16 arrays need ml_dtypes: pip install 'fastattn[bf16]' (or ml_dtypes)"


def bfloat16_dtype(name="dtype"):
    """``ml_dtypes.bfloat16`` as a NumPy dtype; ImportError naming the
    ``fastattn[bf16]`` extra (and ``name``) when ml_dtypes is missing."""
    try:
        import ml_dtypes
    except ImportError:
        raise ImportError(f"{name}: {BF16_HINT}") from None
    return np.dtype(ml_dtypes.bfloat16)


def layer_dtype(dtype, name="dtype"):
    """The dtype of a layer or of its KV cache: float32, float64, or the
    16-bit bfloat16 (``ml_dtypes.bfloat16`` or the string ``"bfloat16"``)
    and float16."""
    expected = "float32, float64, bfloat16 or float16"
    if isinstance(dtype, str) and dtype == "bfloat16":
        return bfloat16_dtype(name)
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be {expected}, got {dtype!r}") from None
    if dt in (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)) or (
            dt.name == "bfloat16" and dt.itemsize == 2):
        return dt.newbyteorder("=")
    raise TypeError(f"{name} must be {expected}, got {dt}")


def kv_storage_dtype(kv_dtype, dtype):
    """The K/V storage dtype of a cache computing in ``dtype``: the same for
    None, or float16 / bfloat16 / int8 (float32 caches only)."""
    if kv_dtype is None:
        return dtype
    if isinstance(kv_dtype, str) and kv_dtype == "bfloat16" or (
            isinstance(kv_dtype, np.dtype) and kv_dtype.name == "bfloat16"):
        kd = bfloat16_dtype("kv_dtype")
    else:
        try:
            kd = np.dtype(kv_dtype)
        except TypeError:
            raise TypeError(f"kv_dtype must be float32, float16, bfloat16 or int8, got {kv_dtype!r}") from None
    if kd == dtype:
        return dtype
    if kd.name not in ("float16", "bfloat16", "int8"):
        raise TypeError(f"kv_dtype must be float32, float16, bfloat16 or int8, got {kd}")
    if dtype != np.dtype(np.float32):
        raise TypeError(f"kv_dtype {kd} is for float32 caches, got dtype {dtype}")
    return kd


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

    ``dtype`` is the layer's: float32, float64, or on the CPU bfloat16
    (``ml_dtypes.bfloat16``) or float16, whose caches store keys and values
    in that dtype.

    ``kv_dtype`` (float32 caches on the CPU): the storage of ``k`` and
    ``v``, narrower than ``dtype``: ``"float16"``, ``"bfloat16"`` (rounded
    to nearest even on append) or ``"int8"`` (symmetric, one float32 scale
    per token per head, in :attr:`k_scale` / :attr:`v_scale`, see
    :func:`fastattn.quantize_kv`). Appends convert the new rows straight
    into the storage, after RoPE; attention reads the storage as it is.
    :attr:`nbytes` is the memory the cache holds.
    """

    def __init__(self, batch_size, max_len, num_kv_heads, head_dim, dtype=np.float32, *,
                 v_head_dim=None, device="cpu", kv_dtype=None):
        self.batch_size = index_value(batch_size, "batch_size")
        self.max_len = index_value(max_len, "max_len")
        if self.batch_size < 0 or self.max_len < 0:
            raise ValueError(f"batch_size and max_len must be non-negative, got {batch_size} and {max_len}")
        self.num_kv_heads = positive(num_kv_heads, "num_kv_heads")
        self.head_dim = positive(head_dim, "head_dim")
        self.dtype = layer_dtype(dtype)
        self.v_head_dim = self.head_dim if v_head_dim is None else positive(v_head_dim, "v_head_dim")
        self.device = _backend.check_device(device)
        self.kv_dtype = kv_storage_dtype(kv_dtype, self.dtype)
        if self.dtype.itemsize == 2 and self.device != "cpu":
            raise TypeError(f"{self.dtype} caches are CPU-only; got device {self.device!r}")
        if self.kv_dtype != self.dtype and self.device != "cpu":
            raise TypeError(f"kv_dtype {self.kv_dtype} caches are CPU-only; got device {self.device!r}")
        shape = (self.batch_size, self.num_kv_heads, self.max_len)
        _check_cache_size(shape, self.head_dim, self.v_head_dim, self.dtype)
        self._lengths = np.zeros(self.batch_size, dtype=np.int64)
        self._k_scale = self._v_scale = None
        if self.device == "cpu":
            self._k = np.zeros(shape + (self.head_dim,), dtype=self.kv_dtype)
            self._v = np.zeros(shape + (self.v_head_dim,), dtype=self.kv_dtype)
            if self.kv_dtype == np.dtype(np.int8):
                self._k_scale = np.zeros(shape, dtype=np.float32)
                self._v_scale = np.zeros(shape, dtype=np.float32)
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
    def k_scale(self):
        """int8 caches: the key scales, ``(batch_size, num_kv_heads,
        max_len)`` float32 (key row = values * scale); None otherwise."""
        return self._k_scale

    @property
    def v_scale(self):
        """int8 caches: the value scales, as :attr:`k_scale`; None otherwise."""
        return self._v_scale

    @property
    def nbytes(self):
        """Bytes the cache's keys, values and scales take."""
        total = int(self._k.nbytes) + int(self._v.nbytes)
        if self._k_scale is not None:
            total += self._k_scale.nbytes + self._v_scale.nbytes
        return total

    def _write(self, k4, v4, old, rows, num_threads):
        """Append rows [0, rows[b]) of k4, v4 (B, Hkv, L, D) float views (RoPE
        applied) at row old[b] of each sequence b, converted to the storage:
        copied, rounded to float16 / bfloat16, or quantised to int8 with
        its scales; nothing wider than the new rows is materialised."""
        if self.kv_dtype == self.dtype:
            backend = _backend.cpu_backend()
            backend.cache_append(k4, self._k, start=old, rows=rows, num_threads=num_threads)
            backend.cache_append(v4, self._v, start=old, rows=rows, num_threads=num_threads)
            return
        B, L = k4.shape[0], k4.shape[2]
        # one call when every sequence appends the same rows at the same place
        spans = [(0, B, int(old[0]), L)] if B and (old == old[0]).all() and (rows == L).all() else [
            (b, b + 1, int(old[b]), int(rows[b])) for b in range(B) if rows[b]]
        for b0, b1, o, t in spans:
            for src, dst, scale in ((k4, self._k, self._k_scale), (v4, self._v, self._v_scale)):
                part = src[b0:b1, :, :t]
                if scale is None:
                    dst[b0:b1, :, o:o + t] = part
                else:
                    _kernels.quantize_kv(part, dst[b0:b1, :, o:o + t], scale[b0:b1, :, o:o + t],
                                         num_threads)

    def _kernel_kv(self, Lk):
        """(k, v, kv_code, k_scale, v_scale) of the first Lk keys, as the
        attention kernel takes them."""
        k, v = self._k[:, :, :Lk], self._v[:, :, :Lk]
        if self.kv_dtype == self.dtype:
            return k, v, 0, None, None
        code = _kernels.KV_DTYPE_CODES[self.kv_dtype.name]
        if self._k_scale is None:
            return k, v, code, None, None
        return k, v, code, self._k_scale[:, :, :Lk], self._v_scale[:, :, :Lk]

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
        if device != self.device and self.dtype.itemsize == 2:
            raise TypeError(f"{self.dtype} caches are CPU-only; cannot move to {device!r}")
        if device != self.device and self.kv_dtype != self.dtype:
            raise TypeError(f"kv_dtype {self.kv_dtype} caches are CPU-only; cannot move to {device!r}")
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
        if int_extremes(new)[1] > self.max_len:
            b = int(np.argmax(new > self.max_len))
            raise ValueError(
                f"KV cache overflow: sequence {b} holds {old[b]} of max_len={self.max_len} tokens and "
                f"cannot take {new_tokens[b]} more; nothing was appended")
        return old, new

    def __repr__(self):
        extra = f", v_head_dim={self.v_head_dim}" if self.v_head_dim != self.head_dim else ""
        extra += f", device={self.device!r}" if self.device != "cpu" else ""
        extra += f", kv_dtype={self.kv_dtype.name}" if self.kv_dtype != self.dtype else ""
        return (f"KVCache(batch_size={self.batch_size}, max_len={self.max_len}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, dtype={self.dtype.name}"
                f"{extra}, lengths={self._lengths.tolist()})")
