"""Attention over a paged KV cache, and a small block manager for it.

The cache is a pool of fixed-size blocks, ``(num_blocks, block_size, Hkv,
D)`` for keys and ``(..., Dv)`` for values, shared by all sequences; each
sequence lists its blocks in a block table, as in vLLM's paged attention
and flash-attn's ``flash_attn_with_kvcache(block_table=...)``.
"""

import numpy as np

from fastattn import _kernels
from fastattn._config import resolve_num_threads
from fastattn._features import kernel_features
from fastattn._validation import (
    OutputTarget,
    as_array,
    bool_flag,
    check_result_size,
    choice,
    float_array,
    index_value,
    unit_last_axis,
)
from fastattn.attention import attention_scale
from fastattn.kv_cache import float_dtype, kv_storage_dtype
from fastattn.kv_quant import kernel_operands, narrow_kv
from fastattn.rotary import ROPE_LAYOUTS, _check_base


def _int_table(values, name, ndim):
    arr = as_array(values, name)
    if arr.size == 0 and not isinstance(values, np.ndarray):
        arr = arr.astype(np.int64)  # [] is float64 to NumPy
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be int32 or int64, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def paged_attention(q, key_cache, value_cache, block_tables, seq_lens, *, is_causal=False,
                    window=None, softcap=None, sinks=None, scale=None, alibi_slopes=None,
                    out=None, num_threads=None, k_scale=None, v_scale=None):
    """Attention of the newest tokens of each sequence over its keys in a
    paged cache.

    Token ``t`` of sequence ``b`` lives at
    ``cache[block_tables[b, t // block_size], t % block_size]``. ``q`` holds
    the ``Lq`` newest tokens of each sequence, already in the cache: query
    ``i`` sits at position ``seq_lens[b] - Lq + i`` (bottom-right
    alignment), and ``is_causal`` hides the keys after it. Decode
    (``Lq = 1``) uses the same split-KV schedule as contiguous decode.
    Every block index a sequence reads is checked against ``num_blocks``
    before any key is read; table entries past a sequence's last block are not read
    (any value, e.g. -1 padding, is fine there). The caches may be narrower
    than ``q``, as ``k`` and ``v`` of
    :func:`fastattn.scaled_dot_product_attention`: bfloat16 or float16
    (with float32 queries), or int8 with ``k_scale`` and ``v_scale``; the
    kernel widens them in registers. bfloat16 or float16 queries give a
    result of their dtype, computed in float32 and rounded once, as
    :func:`fastattn.scaled_dot_product_attention` does.

    Parameters
    ----------
    q : array_like, shape ``(B, H, Lq, D)``
    key_cache : array_like, shape ``(num_blocks, block_size, Hkv, D)``
    value_cache : array_like, shape ``(num_blocks, block_size, Hkv, Dv)``
    block_tables : array_like of int32 or int64, shape ``(B, max_blocks)``
    seq_lens : array_like of int, shape ``(B,)``
        ``Lq <= seq_lens[b] <= max_blocks * block_size``.
    is_causal, window, softcap, sinks, scale, alibi_slopes
        As in :func:`fastattn.scaled_dot_product_attention` (``i_pos`` as
        above).
    out : ndarray, optional, shape ``(B, H, Lq, Dv)``
    num_threads : int, optional
    k_scale, v_scale : array_like, shape ``(num_blocks, block_size, Hkv)``, optional
        For int8 caches: cached key row ``key_cache[n, t, h]`` stands for
        ``key_cache[n, t, h] * k_scale[n, t, h]`` (see
        :func:`fastattn.quantize_kv`), likewise for values.

    Returns
    -------
    out : ndarray ``(B, H, Lq, Dv)``

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> cache = fastattn.PagedKVCache(num_blocks=8, block_size=4, num_kv_heads=2, head_dim=16)
    >>> rng = np.random.default_rng(0)
    >>> seq = cache.add_sequence()
    >>> cache.append(seq, rng.standard_normal((6, 2, 16)), rng.standard_normal((6, 2, 16)))
    >>> tables, lens = cache.tables([seq])
    >>> q = rng.standard_normal((1, 4, 1, 16), dtype=np.float32)
    >>> fastattn.paged_attention(q, cache.key_cache, cache.value_cache, tables, lens).shape
    (1, 4, 1, 16)
    """
    qa, ka, va = (as_array(x, n) for x, n in ((q, "q"), (key_cache, "key_cache"),
                                              (value_cache, "value_cache")))
    # narrow caches (bfloat16, float16, int8 + scales) stay as they are
    storage = narrow_kv(qa, ka, va, k_scale, v_scale, names=("key_cache", "value_cache"))
    kv_code = None if storage is None else storage.code
    io16 = None if storage is None else storage.io_dtype  # 16-bit q and output
    qa, ka, va, dtype = kernel_operands(qa, ka, va, storage, ("q", "key_cache", "value_cache"))
    if qa.ndim != 4:
        raise ValueError(f"q must be 4-D (B, H, Lq, D), got shape {qa.shape}")
    if ka.ndim != 4 or va.ndim != 4:
        raise ValueError("key_cache and value_cache must be 4-D (num_blocks, block_size, Hkv, "
                         f"dim); got {ka.shape} and {va.shape}")
    B, H, Lq, D = qa.shape
    num_blocks, block_size, Hkv, Dk = ka.shape
    if Dk != D:
        raise ValueError(f"q and key_cache must have the same head dim; got q {qa.shape}, "
                         f"key_cache {ka.shape}")
    if va.shape[:3] != ka.shape[:3]:
        raise ValueError(f"key_cache and value_cache must have the same blocks, block size and "
                         f"heads; got {ka.shape} and {va.shape}")
    Dv = va.shape[3]
    if block_size < 1:
        raise ValueError(f"key_cache must have a block size >= 1, got shape {ka.shape}")
    if Hkv == 0 and H > 0 or Hkv and H % Hkv:
        raise ValueError(f"the number of query heads ({H}) must be a multiple of the kv heads "
                         f"({Hkv}); got q {qa.shape}, key_cache {ka.shape}")
    tables = _int_table(block_tables, "block_tables", 2)
    lens = _int_table(seq_lens, "seq_lens", 1)
    if tables.shape[0] != B:
        raise ValueError(f"block_tables must have shape ({B}, max_blocks) for a batch of {B}, "
                         f"got {tables.shape}")
    if lens.shape != (B,):
        raise ValueError(f"seq_lens must have shape ({B},), got {lens.shape}")
    ksa = vsa = None
    if k_scale is not None:
        ksa, vsa = (_scale_cache(s, n, ka.shape[:3]) for s, n in ((k_scale, "k_scale"),
                                                                    (v_scale, "v_scale")))
    is_causal = bool_flag(is_causal, "is_causal")
    scale = attention_scale(scale, D)
    features = kernel_features(window, softcap, sinks, alibi_slopes, H, dtype)
    qa, ka, va = unit_last_axis(qa), unit_last_axis(ka), unit_last_axis(va)
    inputs = tuple(x for x in (qa, ka, va, features.alibi_slopes, features.sinks, ksa, vsa)
                   if x is not None)
    target = OutputTarget(out, (B, H, Lq, Dv), (B, H, Lq, Dv), dtype if io16 is None else io16,
                          inputs=inputs, unit_last_axis=True)
    # The kernel checks seq_lens and every block index a sequence reads
    # before it reads a key; the NumPy checks that name the bad entry run
    # only when it refuses, as they cost more than a short decode step.
    try:
        _kernels.paged_attention(qa, ka, va, target.kernel_view, tables, lens, float(scale),
                                 is_causal, features.alibi_slopes, features.window,
                                 features.softcap, features.sinks, resolve_num_threads(num_threads),
                                 kv_dtype=kv_code or 0, k_scale=ksa, v_scale=vsa)
    except ValueError:
        _check_tables(tables, lens, Lq, block_size, num_blocks)
        raise
    return target.finish()


def _check_tables(tables, lens, Lq, block_size, num_blocks):
    """Raises the ValueError that names the first seq_lens or block_tables
    entry the kernel cannot read."""
    capacity = tables.shape[1] * block_size
    if lens.size and (lens.min() < Lq or lens.max() > capacity):
        raise ValueError(
            f"seq_lens must be between the query length {Lq} and the table's capacity "
            f"{tables.shape[1]} blocks x {block_size} = {capacity}; got "
            f"min {lens.min()}, max {lens.max()}")
    used = np.arange(tables.shape[1])[None, :] < ((lens + block_size - 1) // block_size)[:, None]
    bad = used & ((tables < 0) | (tables >= num_blocks))
    if bad.any():
        b, j = map(int, np.argwhere(bad)[0])
        raise ValueError(f"block_tables[{b}, {j}] = {tables[b, j]} is not a block of the cache "
                         f"(num_blocks = {num_blocks})")


def _scale_cache(scale, name, shape):
    """An int8 cache's scales as float32 of ``shape`` (num_blocks,
    block_size, Hkv)."""
    arr = float_array(as_array(scale, name), name, np.dtype(np.float32))
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (one scale per cached row "
                         f"per kv head), got {arr.shape}")
    return arr


class PagedKVCache:
    """A pool of fixed-size key/value blocks shared by many sequences.

    ``key_cache`` ``(num_blocks, block_size, num_kv_heads, head_dim)`` and
    ``value_cache`` (last axis ``value_dim``) are allocated once.
    :meth:`add_sequence` starts a sequence, :meth:`append` writes its new
    tokens (rotating the keys by RoPE at their positions when ``rope`` is
    set), :meth:`fork` starts a sequence sharing another's blocks
    copy-on-write (beam search, prefix caching), :meth:`free` returns a
    sequence's blocks, and :meth:`tables` gives the ``block_tables`` and
    ``seq_lens`` that :func:`paged_attention` takes.

    No sequence's data is ever overwritten: a block shared by several
    sequences is copied before one of them writes into it. When the pool
    has too few free blocks, :meth:`append` raises before changing anything.

    ``kv_dtype`` (float32 caches): the storage of the blocks, ``"float16"``,
    ``"bfloat16"`` or ``"int8"``; appends round the new rows (after RoPE),
    or quantise them with one scale per row per kv head into ``key_scale``
    and ``value_scale`` ``(num_blocks, block_size, num_kv_heads)`` (see
    :func:`fastattn.quantize_kv`). :meth:`attention_kwargs` gives the
    caches and scales as :func:`paged_attention` takes them, and
    :attr:`nbytes` the memory they hold.
    """

    def __init__(self, num_blocks, block_size, num_kv_heads, head_dim, *, value_dim=None,
                 dtype=np.float32, rope=None, rope_base=10000.0, kv_dtype=None):
        num_blocks = index_value(num_blocks, "num_blocks")
        block_size = index_value(block_size, "block_size")
        num_kv_heads = index_value(num_kv_heads, "num_kv_heads")
        head_dim = index_value(head_dim, "head_dim")
        value_dim = head_dim if value_dim is None else index_value(value_dim, "value_dim")
        for name, value, low in (("num_blocks", num_blocks, 0), ("block_size", block_size, 1),
                                 ("num_kv_heads", num_kv_heads, 1), ("head_dim", head_dim, 1),
                                 ("value_dim", value_dim, 1)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        self.dtype = float_dtype(dtype)
        self.kv_dtype = kv_storage_dtype(kv_dtype, self.dtype)
        if rope is not None:
            rope = choice(rope, "rope", ROPE_LAYOUTS)
            if head_dim % 2:
                raise ValueError(f"rope needs an even head_dim, got {head_dim}")
        rope_base = _check_base(rope_base, "rope_base")
        # sized before allocating, so that absurd sizes name their arguments
        # instead of surfacing as NumPy's own messages
        what = (f"num_blocks={num_blocks}, block_size={block_size}, "
                f"num_kv_heads={num_kv_heads}, head_dim={head_dim}, value_dim={value_dim}")
        dims = (num_blocks, block_size, num_kv_heads, max(head_dim, value_dim))
        if max(dims) > np.iinfo(np.intp).max:
            raise ValueError(f"{what} give a cache larger than the addressable size")
        check_result_size(dims, self.dtype, what)
        self.block_size = block_size
        self.rope, self.rope_base = rope, rope_base
        self.key_cache = np.zeros((num_blocks, block_size, num_kv_heads, head_dim), self.kv_dtype)
        self.value_cache = np.zeros((num_blocks, block_size, num_kv_heads, value_dim),
                                    self.kv_dtype)
        self.key_scale = self.value_scale = None
        if self.kv_dtype == np.dtype(np.int8):
            self.key_scale = np.zeros((num_blocks, block_size, num_kv_heads), np.float32)
            self.value_scale = np.zeros_like(self.key_scale)
        self._refs = np.zeros(num_blocks, np.int64)  # sequences holding each block
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() gives the lowest
        self._blocks = {}  # seq id -> list of block indices
        self._lens = {}  # seq id -> tokens
        self._next_id = 0

    @property
    def nbytes(self):
        """Bytes of the block pool: caches and, for int8, their scales."""
        arrays = (self.key_cache, self.value_cache, self.key_scale, self.value_scale)
        return sum(int(a.nbytes) for a in arrays if a is not None)

    def attention_kwargs(self):
        """``key_cache``, ``value_cache`` and, for int8 storage, ``k_scale``
        and ``v_scale``, as keyword arguments of :func:`paged_attention`."""
        kw = {"key_cache": self.key_cache, "value_cache": self.value_cache}
        if self.key_scale is not None:
            kw.update(k_scale=self.key_scale, v_scale=self.value_scale)
        return kw

    @property
    def num_free_blocks(self):
        return len(self._free)

    def _seq(self, seq, name="seq"):
        seq = index_value(seq, name)
        if seq not in self._blocks:
            raise ValueError(f"{name}: no sequence {seq} in this cache")
        return self._blocks[seq]

    def add_sequence(self):
        """A new, empty sequence; returns its id."""
        seq = self._next_id
        self._next_id += 1
        self._blocks[seq], self._lens[seq] = [], 0
        return seq

    def seq_len(self, seq):
        self._seq(seq)
        return self._lens[seq]

    def append(self, seq, key, value):
        """Write ``n`` new tokens of ``seq``: ``key`` ``(n, Hkv, D)``,
        ``value`` ``(n, Hkv, Dv)``, at positions ``seq_len .. seq_len + n``."""
        blocks = self._seq(seq)
        _, bs, Hkv, D = self.key_cache.shape
        Dv = self.value_cache.shape[3]
        key = float_array(as_array(key, "key"), "key", self.dtype)
        value = float_array(as_array(value, "value"), "value", self.dtype)
        if key.ndim != 3 or key.shape[1:] != (Hkv, D):
            raise ValueError(f"key must have shape (n, {Hkv}, {D}), got {key.shape}")
        if value.shape != (key.shape[0], Hkv, Dv):
            raise ValueError(f"value must have shape ({key.shape[0]}, {Hkv}, {Dv}), got {value.shape}")
        n, start = key.shape[0], self._lens[seq]
        if n == 0:
            return
        end = start + n
        # blocks needed: new ones past the table, plus a copy of a shared,
        # partly filled last block that this append writes into
        new_blocks = -(-end // bs) - len(blocks)
        cow = start % bs != 0 and self._refs[blocks[-1]] > 1
        needed = new_blocks + int(cow)
        if needed > len(self._free):
            raise RuntimeError(
                f"PagedKVCache is full: appending {n} tokens to sequence {seq} needs {needed} "
                f"free blocks, {len(self._free)} are left of {self.key_cache.shape[0]}; free "
                f"sequences or create a larger cache")
        if cow:
            old = blocks[-1]
            fresh = self._free.pop()
            for arr in (self.key_cache, self.value_cache, self.key_scale, self.value_scale):
                if arr is not None:
                    arr[fresh] = arr[old]
            self._refs[old] -= 1
            self._refs[fresh] = 1
            blocks[-1] = fresh
        for _ in range(new_blocks):
            fresh = self._free.pop()
            self._refs[fresh] = 1
            blocks.append(fresh)
        if self.rope is not None:
            from fastattn.rotary import apply_rotary
            positions = np.arange(start, end)[:, None]  # (n, 1) over (n, Hkv)
            key = apply_rotary(key, positions, layout=self.rope, base=self.rope_base)
        t = np.arange(start, end)
        rows = np.asarray(blocks, np.int64)[t // bs]
        if self.key_scale is not None:
            from fastattn.kv_quant import quantize_kv
            key, k_scale = quantize_kv(key)
            value, v_scale = quantize_kv(value)
            self.key_scale[rows, t % bs] = k_scale
            self.value_scale[rows, t % bs] = v_scale
        self.key_cache[rows, t % bs] = key  # rounded to a narrow storage dtype
        self.value_cache[rows, t % bs] = value
        self._lens[seq] = end

    def fork(self, seq):
        """A new sequence sharing all of ``seq``'s tokens copy-on-write;
        returns its id."""
        blocks = self._seq(seq)
        child = self.add_sequence()
        self._blocks[child] = list(blocks)
        self._lens[child] = self._lens[seq]
        for blk in blocks:
            self._refs[blk] += 1
        return child

    def free(self, seq):
        """Forget ``seq``; blocks no other sequence holds become free."""
        blocks = self._seq(seq)
        for blk in reversed(blocks):
            self._refs[blk] -= 1
            if self._refs[blk] == 0:
                self._free.append(blk)
        del self._blocks[seq], self._lens[seq]

    def tables(self, seqs):
        """``(block_tables (len(seqs), max_blocks) int64, seq_lens (len(seqs),)
        int64)`` for :func:`paged_attention`; unused table entries are 0."""
        if isinstance(seqs, (str, bytes)) or not hasattr(seqs, "__iter__"):
            raise TypeError(f"seqs must be an iterable of sequence ids, got {seqs!r}")
        seqs = [index_value(s, "seqs") for s in seqs]
        rows = [self._seq(s, "seqs") for s in seqs]
        width = max((len(r) for r in rows), default=0)
        tables = np.zeros((len(seqs), width), np.int64)
        for i, r in enumerate(rows):
            tables[i, :len(r)] = r
        return tables, np.array([self._lens[s] for s in seqs], np.int64)
