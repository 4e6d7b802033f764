"""The multi-head attention layer, on every device.

Data flow of one self-attention call on the CPU, batch first, ``x`` of
shape (B, L, E)::

    x @ [W_Q | W_K | W_V] (+ b)   one GEMM into buf (B, L, (H + 2 Hkv) D),
                                  its columns split over the OpenMP threads;
                                  buf's rows are padded to an odd number of
                                  cache lines (see projections.row_buffer)
      epilogue: RoPE              each thread rotates the Q and K heads of
                                  its own column block, from a cached table
    SDPA                          reads Q, K, V as strided (B, heads, L, D)
                                  views of buf and writes its output as a
                                  (B, H, L, D) view of attn (B, L, H D)
    attn @ W_O (+ b_O)            one GEMM into y (B, L, E)

So the head split is the projection's output layout (no transpose pass)
and the head merge is the attention kernel's output layout (no merge pass).
Padded work is skipped: rows past ``query_lengths`` are neither projected
nor attended, and K/V rows past ``key_lengths`` are never projected.

A bfloat16 or float16 layer (``dtype=``, :meth:`MultiHeadAttention.astype`,
``from_torch`` of such a module) runs the same steps on 16-bit buffers:
the projections are fastattn.bf16_gemm's packed GEMM (weights packed once,
when they are set; float32 sums, results rounded to the dtype), RoPE
rotates the 16-bit Q and K rows in place (float32 inside), and attention
reads 16-bit Q, K, V and writes its output in the dtype. Every row is
projected there (the GEMM has no row ranges); rows past ``query_lengths``
are still zero in the result.

On ``"cuda"`` (after :meth:`MultiHeadAttention.to`) the same checks run, and
the weights and the compute live in :mod:`fastattn._backend.cuda`
(``DeviceLayer``): cuBLAS projections, fastattn's CUDA kernels for RoPE, the
cache append and attention.
"""

import functools
import math
import os
import sys
from collections.abc import Mapping

import numpy as np

from fastattn import _backend, _kernels
from fastattn._config import get_num_threads, resolve_num_threads
from fastattn._validation import (as_array, bool_flag, float_array, int_array_max, int_extremes,
                                  is_half_dtype, kernel_addressable, lengths_view, real_number,
                                  repeat_axis, storage_dtype)
from fastattn.kv_cache import KVCache, layer_dtype, positive
from fastattn.masks import prepare_mask
from fastattn.projections import BLAS_THREADS, as_input, head_view, linear_checked, row_buffer
from fastattn.rotary import ROPE_LAYOUTS, rope_tables

_TOP_LEFT = _kernels.CAUSAL_ALIGNMENTS["top_left"]
_BOTTOM_RIGHT = _kernels.CAUSAL_ALIGNMENTS["bottom_right"]
_WEIGHT_NAMES = ("w_q", "w_k", "w_v", "w_o")
_BIAS_NAMES = ("b_q", "b_k", "b_v", "b_o")
_STATE_NAMES = _WEIGHT_NAMES + _BIAS_NAMES


def _query_lengths(values, B, L):
    """``query_lengths`` of a layer call: None or a contiguous int64 (B,)."""
    if values is None:
        return None
    arr, hi = int_array_max(values, "query_lengths")
    if arr.shape != (B,):
        raise ValueError(f"query_lengths must have shape ({B},) for a batch of {B}, got {arr.shape}")
    if hi > L:
        raise ValueError(f"query_lengths must be <= the query length {L}, got max {hi}")
    return np.ascontiguousarray(arr)


def check_key_value(key, value):
    if (key is None) != (value is None):
        raise ValueError("pass both key and value (cross-attention) or neither (self-attention)")


def check_self_attention(layer):
    if layer.kdim != layer.embed_dim or layer.vdim != layer.embed_dim:
        raise ValueError(f"self-attention needs kdim == vdim == embed_dim; this layer has "
                         f"kdim={layer.kdim}, vdim={layer.vdim}: pass key and value")


def check_key_value_shapes(query_shape, key_shape, value_shape):
    if (key_shape[0] != query_shape[0] or value_shape[0] != query_shape[0]
            or key_shape[1] != value_shape[1]):
        raise ValueError(f"query, key and value must have the same batch size, and key and value "
                         f"the same length; got query {tuple(query_shape)}, key {tuple(key_shape)}, "
                         f"value {tuple(value_shape)}")


def _check_cache_call(layer, cache, key, key_lengths, attn_mask):
    """The arguments a layer call with ``cache=`` refuses (every device)."""
    if key is not None:
        raise ValueError("cache= is for self-attention decoding: key and value must be None")
    if key_lengths is not None or attn_mask is not None:
        raise ValueError("key_lengths and attn_mask are not accepted with cache=: the cache's "
                         "lengths and causality decide which keys each query sees")
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache (from new_cache), got {type(cache).__name__}")
    if cache.device != layer.device:
        raise ValueError(f"cache is on {cache.device!r} but the layer on {layer.device!r}; move one "
                         f"with .to({layer.device!r})")
    E = layer.embed_dim
    if layer.kdim != E or layer.vdim != E:
        raise ValueError(f"cache= is self-attention and needs kdim == vdim == embed_dim ({E}); this "
                         f"layer has kdim={layer.kdim}, vdim={layer.vdim}")


def _check_cache_fits(cache, num_kv_heads, head_dim, dtype, query_shape, v_head_dim=None):
    """The cache holds this layer's kv heads, head dims and dtype, for the
    query's batch."""
    if (cache.num_kv_heads, cache.head_dim, cache.dtype) != (num_kv_heads, head_dim, dtype):
        raise ValueError(f"cache holds {cache.num_kv_heads} kv heads of dim {cache.head_dim} in "
                         f"{cache.dtype}; this layer needs {num_kv_heads} of dim {head_dim} in {dtype}")
    if v_head_dim is not None and cache.v_head_dim != v_head_dim:
        raise ValueError(f"cache holds values of dim {cache.v_head_dim}; this layer needs {v_head_dim}")
    if cache.batch_size != query_shape[0]:
        raise ValueError(f"cache is for a batch of {cache.batch_size}, got query {tuple(query_shape)}")


def _call_threads(num_threads):
    """The OpenMP threads of one layer call (``num_threads=None``: the
    default); 1 in the thread of a forked child, as get_num_threads."""
    if num_threads is None:
        return get_num_threads()
    n = resolve_num_threads(num_threads)
    return 1 if _kernels.fork_child_serial() else n


def _check_weight_sizes(E, H, Hkv, D, Dv, kdim, vdim, dtype):
    """Refuse, naming the arguments, a configuration whose weights NumPy
    could not even describe (more bytes than the address space), before
    anything is allocated; a merely large one is MemoryError, as for any
    array."""
    nq, nk, nv = H * D, Hkv * D, Hkv * Dv
    counts = (E * (nq + nk + nv), kdim * (nk + nv), vdim * nv, H * Dv * E, nq + nk + nv)
    if max(counts) * np.dtype(dtype).itemsize > sys.maxsize or sum(counts) > sys.maxsize:
        raise ValueError(f"embed_dim={E}, num_heads={H}, num_kv_heads={Hkv}, kdim={kdim}, vdim={vdim} "
                         f"(head_dim={D}) give weights larger than the addressable size")


def _attention16(q, k, v, out, *, weights=None, kv_dtype=None, **kwargs):
    """Attention of a 16-bit layer: q, k, v the 16-bit (B, heads, L, D)
    views of its buffers (or of its cache), out the 16-bit (B, H, Lq, Dv)
    view it writes. The kernel reads them as they are (sums and softmax in
    float32, each output element rounded once); the weights come out in
    float32 and are rounded into ``weights``, as
    scaled_dot_product_attention returns them."""
    w32 = None if weights is None else np.empty(weights.shape, np.float32)
    _kernels.scaled_dot_product_attention(q, k, v, out, weights=w32,
                                          kv_dtype=_kernels.KV_DTYPE_CODES[q.dtype.name], **kwargs)
    if weights is not None:
        weights[...] = w32


def _weight_arrays(weights, biases):
    """``(weights, biases, dtype)`` of :meth:`MultiHeadAttention.from_weights`:
    all bfloat16 or all float16 arrays keep that dtype; otherwise each is
    converted to its compute dtype and the layer takes their promotion. A
    16-bit array beside any other dtype is a TypeError naming both."""
    raw = {n: as_array(a, n) for n, a in {**weights, **biases}.items() if a is not None}
    half = [n for n, a in raw.items() if is_half_dtype(a.dtype)]
    if half:
        dt = raw[half[0]].dtype
        for n, a in raw.items():
            if a.dtype != dt:
                raise TypeError(
                    f"{n} has dtype {a.dtype} but {half[0]} is {dt}: the weights and biases of a "
                    f"16-bit layer share one dtype (convert them first, or build the layer in "
                    f"float32 and call layer.astype({dt.name!r}))")
        arrays = {n: a if kernel_addressable(a) and a.dtype.isnative else a.astype(dt.newbyteorder("="))
                  for n, a in raw.items()}
        dtype = dt.newbyteorder("=")
    else:
        arrays = {n: float_array(a, n) for n, a in raw.items()}
    ws = {n: arrays[n] if n in arrays else float_array(weights[n], n) for n in weights}
    bs = {n: arrays.get(n) for n in biases}
    if not half:
        dtype = np.result_type(*ws.values(), *(b for b in bs.values() if b is not None))
    return ws, bs, dtype


def _state_array(a, name):
    """A state array of any real dtype (bfloat16 included), addressable;
    copying it into the layer converts it to the layer's dtype (exactly, or
    rounded to nearest even into a narrower one)."""
    arr = as_array(a, name)
    storage_dtype(arr.dtype, name)  # TypeError for complex, object, ...
    return arr if kernel_addressable(arr) else arr.copy()


class MultiHeadAttention:
    """Multi-head attention: ``softmax(Q Kᵀ / √D + masks) V`` per head, heads
    concatenated and projected, as ``torch.nn.MultiheadAttention``
    (``batch_first=True``), plus grouped-query attention, RoPE and a KV
    cache.

    Parameters
    ----------
    embed_dim : int
        E, the width of ``query`` and of the output.
    num_heads : int
        H; ``head_dim = embed_dim // num_heads`` (must divide).
    num_kv_heads : int, optional
        Hkv, heads of K and V (grouped-query attention; 1 is multi-query).
        Must divide ``num_heads``; defaults to ``num_heads``.
    kdim, vdim : int, optional
        Widths of ``key`` and ``value`` (cross-attention); default E.
    bias : bool, default True
        Biases on the four projections.
    rope : {None, "neox", "gptj"}
        Rotary embedding of Q and K (see :func:`fastattn.apply_rotary`),
        applied right after the projection. Positions are ``0..L-1`` within
        a call, or continue from each sequence's cache length with
        ``cache=``.
    rope_base : float, default 10000.0
    dtype : float32, float64, bfloat16 or float16
        Weights and computation; inputs are converted to float32 and
        float64 layers' dtype. A bfloat16 (``ml_dtypes.bfloat16`` or
        ``"bfloat16"``, the ``fastattn[bf16]`` extra) or float16 layer
        takes inputs of its own dtype only, computes in float32 (packed
        16-bit GEMMs, float32 softmax) and returns its dtype; see
        :meth:`astype` and docs/dtypes.md.
    seed : int or numpy.random.Generator, optional
        Initialisation as torch does it: Xavier-uniform input projections
        (over the stacked ``[W_Q; W_K; W_V]`` when ``kdim == vdim ==
        embed_dim``, else each on its own), the output projection
        ``U(-1/√(H·D), 1/√(H·D))`` (torch's ``Linear`` default) and zero
        biases.
    deterministic : bool, default True
        Bitwise the same result for every thread count: the projections cut
        their columns into blocks fixed by the sizes alone, one BLAS call
        each (a decode step's: blocks along K, summed in a fixed order).
        False gives each thread one block (fewer BLAS calls: a prefill's
        projections 3-8% faster, a decode step's about 4%; the last bits may
        then change with the thread count). An attribute too, settable
        later.

    Weights are stored in the ``(in, out)`` layout, so ``x @ w_q`` is the
    query projection; :meth:`state_dict` returns them.

    A call runs on ``num_threads`` (default :func:`fastattn.get_num_threads`)
    OpenMP threads: the projections split their column blocks over them,
    each block a single-threaded BLAS call, so scipy's BLAS is held at one
    thread for the duration of a call (through threadpoolctl; restored
    afterwards).

    A layer pickles and copies (``copy.deepcopy``) with its weights; the
    copy is independent of the original.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> mha = fastattn.MultiHeadAttention(16, 4, seed=0)
    >>> x = np.random.default_rng(0).standard_normal((2, 5, 16), dtype=np.float32)
    >>> y = mha(x, key_lengths=[5, 3], is_causal=True)
    >>> y.shape, y.dtype
    ((2, 5, 16), dtype('float32'))
    """

    def __init__(self, embed_dim, num_heads, *, num_kv_heads=None, kdim=None, vdim=None,
                 bias=True, rope=None, rope_base=10000.0, dtype=np.float32, seed=None,
                 deterministic=True):
        E = positive(embed_dim, "embed_dim")
        H = positive(num_heads, "num_heads")
        if E % H:
            raise ValueError(f"embed_dim ({E}) must be divisible by num_heads ({H})")
        bias = bool_flag(bias, "bias")
        deterministic = bool_flag(deterministic, "deterministic")
        dtype = layer_dtype(dtype)
        if isinstance(seed, (bool, np.bool_, float, np.floating)):
            raise TypeError(f"seed must be None, an int or a numpy.random.Generator, got {seed!r}")
        try:
            rng = np.random.default_rng(seed)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"seed must be None, an int or a numpy.random.Generator, got "
                            f"{type(seed).__name__} {seed!r}: {exc}") from None
        self._configure(E, H, num_kv_heads, E // H, E // H, kdim, vdim, bias, rope, rope_base, dtype)
        self.deterministic = deterministic
        self._init_weights(rng)
        self._pack16()

    # ---- construction -------------------------------------------------------

    def _configure(self, E, H, Hkv, D, Dv, kdim, vdim, bias, rope, rope_base, dtype):
        """Check the configuration, then set it and allocate zeroed weights;
        nothing is set when a check fails."""
        Hkv = H if Hkv is None else positive(Hkv, "num_kv_heads")
        if H % Hkv:
            raise ValueError(f"num_kv_heads ({Hkv}) must divide num_heads ({H})")
        kdim = E if kdim is None else positive(kdim, "kdim")
        vdim = E if vdim is None else positive(vdim, "vdim")
        if rope is not None:
            if not isinstance(rope, str) or rope not in ROPE_LAYOUTS:  # str first: a list is unhashable
                raise ValueError(f"rope must be None or one of {list(ROPE_LAYOUTS)}, got {rope!r}")
            if D % 2:
                raise ValueError(f"rope needs an even head_dim, got {D}")
        rope_base = real_number(rope_base, "rope_base")
        if not (math.isfinite(rope_base) and rope_base > 0):
            raise ValueError(f"rope_base must be positive and finite, got {rope_base!r}")
        _check_weight_sizes(E, H, Hkv, D, Dv, kdim, vdim, dtype)
        self.embed_dim = E
        self.num_heads = H
        self.num_kv_heads = Hkv
        self.head_dim = D
        self.v_head_dim = Dv
        self.kdim = kdim
        self.vdim = vdim
        self.dtype = dtype
        self._half = is_half_dtype(dtype)  # bfloat16 or float16: 16-bit GEMMs, narrow buffers
        self.rope = rope
        self.rope_base = rope_base
        self._rope_cache = None
        self.deterministic = True
        self._has_bias = bias
        self.device = "cpu"
        self._device_layer = None  # the weights on "cuda" (fastattn._backend.cuda.DeviceLayer)
        self._packed = None  # 16-bit layers: the packed GEMM weights (_pack16)
        self._allocate_host()

    def __setstate__(self, state):
        # the 16-bit flag follows the dtype (a layer pickled without it too)
        self.__dict__.update(state)
        self._half = is_half_dtype(self.dtype)

    def _allocate_host(self):
        """Zeroed host storage for the weights.

        The layer owns only the arrays in ``_storage``; every per-projection
        weight (``_w_q``, ``_w_k``, ...) is a view derived from them on each
        access (``_spans``). So a pickled, copied or moved layer cannot hold
        a view that has come apart from its buffer: NumPy pickles a view as
        an array of its own, and ``load_state_dict`` would then write into
        arrays the layer no longer reads."""
        E, dtype = self.embed_dim, self.dtype
        nq, nk, nv = self._widths()
        storage, spans = {}, {}
        # One (E, nq + nk + nv) matrix when self-attention can use a fused
        # QKV GEMM, else Q apart and K|V fused when they share a width.
        if self.kdim == self.vdim == E:
            storage["w_in"] = np.zeros((E, nq + nk + nv), dtype)
            spans.update(w_in=("w_in", 0, nq + nk + nv), w_q=("w_in", 0, nq),
                         w_kv=("w_in", nq, nq + nk + nv))
            kv_base = ("w_in", nq)
        else:
            storage["w_q"] = np.zeros((E, nq), dtype)
            spans["w_q"] = ("w_q", 0, nq)
            if self.kdim == self.vdim:
                storage["w_kv"] = np.zeros((self.kdim, nk + nv), dtype)
                spans["w_kv"] = ("w_kv", 0, nk + nv)
                kv_base = ("w_kv", 0)
            else:
                kv_base = None
        if kv_base is not None:
            key, c0 = kv_base
            spans.update(w_k=(key, c0, c0 + nk), w_v=(key, c0 + nk, c0 + nk + nv))
        else:
            storage["w_k"] = np.zeros((self.kdim, nk), dtype)
            storage["w_v"] = np.zeros((self.vdim, nv), dtype)
            spans.update(w_k=("w_k", 0, nk), w_v=("w_v", 0, nv))
        storage["w_o"] = np.zeros((nq // self.head_dim * self.v_head_dim, E), dtype)
        spans["w_o"] = ("w_o", 0, E)
        if self._has_bias:
            storage["b_in"] = np.zeros(nq + nk + nv, dtype)
            storage["b_o"] = np.zeros(E, dtype)
            spans.update(b_in=("b_in", 0, nq + nk + nv), b_q=("b_in", 0, nq),
                         b_kv=("b_in", nq, nq + nk + nv), b_k=("b_in", nq, nq + nk),
                         b_v=("b_in", nq + nk, nq + nk + nv), b_o=("b_o", 0, E))
        self._storage, self._spans = storage, spans

    def _part(self, name):
        """The weight ``name`` as a view of the storage that holds it (None
        when the layer has no such array, or its weights are on a device)."""
        span = self._spans.get(name) if self._storage is not None else None
        if span is None:
            return None
        key, c0, c1 = span
        whole = self._storage[key]
        return whole if c0 == 0 and c1 == whole.shape[-1] else whole[..., c0:c1]

    _w_in = property(lambda self: self._part("w_in"))
    _w_q = property(lambda self: self._part("w_q"))
    _w_kv = property(lambda self: self._part("w_kv"))
    _w_k = property(lambda self: self._part("w_k"))
    _w_v = property(lambda self: self._part("w_v"))
    _w_o = property(lambda self: self._part("w_o"))
    _b_in = property(lambda self: self._part("b_in"))
    _b_q = property(lambda self: self._part("b_q"))
    _b_kv = property(lambda self: self._part("b_kv"))
    _b_k = property(lambda self: self._part("b_k"))
    _b_v = property(lambda self: self._part("b_v"))
    _b_o = property(lambda self: self._part("b_o"))

    def _pack16(self):
        """16-bit layers: pack the projection weights for the 16-bit GEMM
        (``(out, in)`` panels, fastattn.bf16_gemm.PackedWeight) and keep the
        biases in float32, once, whenever the weights are set; a call then
        packs only its activations. The fused QKV weight of a self-attention
        layer is packed here; its Q and K|V parts, which only a
        cross-attention call of such a layer uses, on that first call
        (:meth:`_packed_weight`), so that a self-attention layer holds one
        packed copy of its weights."""
        if not self._half or self._storage is None:
            self._packed = None
            return
        packed = {}
        for n in ("b_in", "b_q", "b_kv", "b_k", "b_v", "b_o"):
            b = self._part(n)
            packed[n] = None if b is None else b.astype(np.float32)  # exact from 16 bits
        self._packed = packed
        eager = ("w_in", "w_o") if self._w_in is not None else ("w_q", "w_kv", "w_k", "w_v", "w_o")
        for n in eager:
            self._packed_weight(n)

    def _packed_weight(self, name):
        """The packed form of weight ``name`` (None when the layer has no
        such weight), packed on first use."""
        packed = self._packed
        if name not in packed:
            from fastattn.bf16_gemm import PackedWeight

            w = self._part(name)
            packed[name] = None if w is None else PackedWeight(w.T)  # (in, out) -> (N, K)
        return packed[name]

    def _widths(self):
        """Output widths of the Q, K and V projections."""
        return (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                self.num_kv_heads * self.v_head_dim)

    def _init_weights(self, rng):
        E, nq, nk = self.embed_dim, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim

        def xavier(fan_in, fan_out, shape):
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            return rng.uniform(-bound, bound, size=shape)

        if self._w_in is not None:
            self._w_in[...] = xavier(E, self._w_in.shape[1], self._w_in.shape)
        else:
            self._w_q[...] = xavier(E, nq, self._w_q.shape)
            self._w_k[...] = xavier(self.kdim, nk, self._w_k.shape)
            self._w_v[...] = xavier(self.vdim, self._w_v.shape[1], self._w_v.shape)
        bound = 1.0 / math.sqrt(self._w_o.shape[0])
        self._w_o[...] = rng.uniform(-bound, bound, size=self._w_o.shape)

    @classmethod
    def from_weights(cls, w_q, w_k, w_v, w_o, b_q=None, b_k=None, b_v=None, b_o=None, *,
                     num_heads, num_kv_heads=None, rope=None, rope_base=10000.0):
        """A layer with the given weights in the ``(in, out)`` layout.

        ``w_q`` is ``(E, H·D)``, ``w_k`` ``(kdim, Hkv·D)``, ``w_v``
        ``(vdim, Hkv·Dv)`` and ``w_o`` ``(H·Dv, E)``; ``head_dim`` D is
        ``w_q.shape[1] // num_heads`` and the value head dim Dv (Keras's
        ``value_dim``) is ``w_v.shape[1] // num_kv_heads``, which may differ
        from D. Biases are ``(out,)``; when any is given the others default
        to zeros. The dtype is the weights' compute dtype (float32 or
        float64). The arrays are copied.

        Weights and biases that are all bfloat16 (``ml_dtypes.bfloat16``) or
        all float16 give a layer of that dtype; a 16-bit array beside arrays
        of another dtype is a TypeError naming it.
        """
        ws, bs, dtype = _weight_arrays(dict(zip(_WEIGHT_NAMES, (w_q, w_k, w_v, w_o))),
                                       dict(zip(_BIAS_NAMES, (b_q, b_k, b_v, b_o))))
        for n, w in ws.items():
            if w.ndim != 2:
                raise ValueError(f"{n} must be 2-D (in, out), got shape {w.shape}")
        H = positive(num_heads, "num_heads")
        E, nq = ws["w_q"].shape
        if nq == 0 or nq % H:
            raise ValueError(f"w_q's output width {nq} (shape {ws['w_q'].shape}) must be a positive multiple of num_heads ({H})")
        D = nq // H
        Hkv = H if num_kv_heads is None else positive(num_kv_heads, "num_kv_heads")
        nv = ws["w_v"].shape[1]
        if nv == 0 or nv % Hkv:
            raise ValueError(f"w_v's output width {nv} (shape {ws['w_v'].shape}) must be a positive "
                             f"multiple of num_kv_heads ({Hkv})")
        if E == 0:
            raise ValueError(f"w_q must have at least one input row (embed_dim), got shape {ws['w_q'].shape}")
        self = cls.__new__(cls)
        self._configure(E, H, Hkv, D, nv // Hkv, ws["w_k"].shape[0] or None, ws["w_v"].shape[0] or None,
                        any(b is not None for b in bs.values()), rope, rope_base, dtype)
        self._load({**ws, **bs}, partial_bias=True)
        return self

    @classmethod
    def from_torch(cls, module):
        """Convert a ``torch.nn.MultiheadAttention`` (with or without bias,
        with or without separate ``kdim``/``vdim``). torch weights are
        ``(out, in)`` and are transposed; float64, bfloat16 and float16
        modules give a layer of their dtype (bfloat16 needs ml_dtypes),
        every other dtype float32. ``add_bias_kv`` and
        ``add_zero_attn`` are not supported; dropout does not apply at
        inference."""
        try:
            import torch
        except ImportError as exc:  # pragma: no cover - exercised without torch
            raise ImportError("MultiHeadAttention.from_torch needs torch (pip install torch)") from exc
        if not isinstance(module, torch.nn.MultiheadAttention):
            raise TypeError(f"module must be a torch.nn.MultiheadAttention, got {type(module).__name__}")
        if module.bias_k is not None or module.bias_v is not None:
            raise ValueError("from_torch: add_bias_kv=True is not supported")
        if module.add_zero_attn:
            raise ValueError("from_torch: add_zero_attn=True is not supported")
        dtype = {torch.float64: np.dtype(np.float64), torch.float16: np.dtype(np.float16)}.get(
            module.out_proj.weight.dtype, np.dtype(np.float32))
        if module.out_proj.weight.dtype == torch.bfloat16:
            dtype = layer_dtype("bfloat16", "module (a bfloat16 module)")

        def arr(t):
            return None if t is None else t.detach().to("cpu", torch.float64).numpy().astype(dtype)

        E = module.embed_dim
        if module._qkv_same_embed_dim:
            w = arr(module.in_proj_weight)
            w_q, w_k, w_v = w[:E].T, w[E:2 * E].T, w[2 * E:].T
        else:
            w_q = arr(module.q_proj_weight).T
            w_k = arr(module.k_proj_weight).T
            w_v = arr(module.v_proj_weight).T
        b = arr(module.in_proj_bias)
        b_q, b_k, b_v = (None, None, None) if b is None else (b[:E], b[E:2 * E], b[2 * E:])
        return cls.from_weights(w_q, w_k, w_v, arr(module.out_proj.weight).T, b_q, b_k, b_v,
                                arr(module.out_proj.bias), num_heads=module.num_heads)

    # ---- state ---------------------------------------------------------------

    def _expected_shapes(self):
        E = self.embed_dim
        nq, nk, nv = self._widths()
        no = self.num_heads * self.v_head_dim
        return {"w_q": (E, nq), "w_k": (self.kdim, nk), "w_v": (self.vdim, nv), "w_o": (no, E),
                "b_q": (nq,), "b_k": (nk,), "b_v": (nv,), "b_o": (E,)}

    def _targets(self):
        return {n: self._part(n) for n in _STATE_NAMES}

    def _load(self, d, partial_bias=False, label=str):
        """Check every array of ``d`` (each named by ``label(name)`` in
        messages), then copy them all into the layer."""
        shapes = self._expected_shapes()
        arrays = {}
        for n in _STATE_NAMES:
            a = d.get(n)
            if a is None:
                if n in _WEIGHT_NAMES:
                    raise ValueError(f"state is missing {n}")
                if self._has_bias and not partial_bias:
                    raise ValueError(f"state has no {n}, but the layer has biases (bias=True)")
                continue
            if n in _BIAS_NAMES and not self._has_bias:
                raise ValueError(f"state has {n}, but the layer has no biases (bias=False)")
            a = _state_array(a, label(n))
            if a.shape != shapes[n]:
                raise ValueError(f"{label(n)} must have shape {shapes[n]}, got {a.shape}")
            arrays[n] = a
        if self.device != "cpu":  # all checked: rebuild the device weights
            state = self.state_dict()
            state.update(arrays)
            self._device_layer = _backend.cuda_backend().DeviceLayer(self, state)
            return
        # Storage unpickled zero-copy (Ray's object store, pickle protocol 5
        # out-of-band buffers) is read-only and may be shared with other
        # processes: take a private copy before writing, as copy-on-write
        self._storage = {k: a if a.flags.writeable else a.copy()
                         for k, a in self._storage.items()}
        targets = self._targets()
        for n, a in arrays.items():  # all checked: now copy
            targets[n][...] = a
        self._pack16()

    def state_dict(self):
        """The weights as NumPy arrays (copies, downloaded from the device
        on ``"cuda"``): ``w_q, w_k, w_v, w_o`` in the ``(in, out)`` layout
        and ``b_q, b_k, b_v, b_o`` (None without bias)."""
        if self.device != "cpu":
            return self._device_layer.state_dict()
        return {n: None if a is None else a.copy() for n, a in self._targets().items()}

    def to(self, device):
        """Move the weights to ``device`` (``"cpu"`` or ``"cuda"``, the
        current CuPy device) and return the layer itself, as
        ``torch.nn.Module.to`` does. A layer is created on ``"cpu"``; on
        ``"cuda"`` it takes and returns CuPy (or other CUDA) arrays, and
        :meth:`new_cache` gives caches on the GPU. A copy between host and
        device; nothing happens when the layer is already there."""
        device = _backend.check_device(device)
        if device == self.device:
            return self
        if self._half:
            raise TypeError(f"{self.dtype} layers run on the CPU only, not on device {device!r}: "
                            f"convert the layer with layer.astype('float32') first")
        if device == "cuda":
            self._device_layer = _backend.cuda_backend().DeviceLayer(self, self.state_dict())
            self._storage = None
            self.device = device
        else:
            state = self._device_layer.state_dict()
            self._allocate_host()
            self.device, self._device_layer = device, None
            self._load(state)
        return self

    def astype(self, dtype):
        """A copy of the layer with its weights and biases converted to
        ``dtype`` (float32, float64, bfloat16 or float16; rounded to nearest
        even when narrower), and every other setting kept. The layer
        itself is unchanged, as with ``numpy.ndarray.astype``; the copy is
        on the CPU (16-bit layers run there only). Converting to bfloat16
        needs ml_dtypes (the ``fastattn[bf16]`` extra).

        Examples
        --------
        >>> import numpy as np, fastattn
        >>> mha = fastattn.MultiHeadAttention(16, 4, seed=0).astype(np.float16)
        >>> mha(np.zeros((1, 3, 16), np.float16)).dtype
        dtype('float16')
        """
        dtype = layer_dtype(dtype)
        if self.device != "cpu" and is_half_dtype(dtype):
            raise TypeError(f"astype({dtype.name!r}): 16-bit layers run on the CPU only; this "
                            f"layer is on {self.device!r}: move it with layer.to('cpu') first")
        state = self.state_dict()
        new = type(self).__new__(type(self))
        new._configure(self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim,
                       self.v_head_dim, self.kdim, self.vdim, self._has_bias, self.rope,
                       self.rope_base, dtype)
        new.deterministic = self.deterministic
        new._load({n: a.astype(dtype) for n, a in state.items() if a is not None})
        return new

    def load_state_dict(self, state):
        """Copy the weights of ``d`` (as from :meth:`state_dict`) into the
        layer; shapes must match, and biases are required exactly when the
        layer has them. Nothing is changed when a check fails."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping of names to arrays (as from "
                            f"state_dict()), got {type(state).__name__}")
        unknown = sorted(str(n) for n in state if n not in _STATE_NAMES)
        if unknown:
            raise ValueError(f"state has unknown entries {unknown}; expected {list(_STATE_NAMES)}")
        self._load(state, label=lambda n: f"state: {n}")

    def save(self, path):
        """Write the weights and the configuration to an ``.npz`` file."""
        arrays = {n: a for n, a in self.state_dict().items() if a is not None}
        if self.dtype.name == "bfloat16":  # .npz has no bfloat16: its bits, and the dtype's name
            arrays = {n: a.view(np.uint16) for n, a in arrays.items()}
        np.savez(path, **arrays, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                 rope=np.str_(self.rope or ""), rope_base=self.rope_base,
                 dtype=np.str_(self.dtype.name))

    @classmethod
    def load(cls, path):
        """A layer from a file written by :meth:`save`."""
        if isinstance(path, (str, os.PathLike)) and not os.path.exists(path) and os.path.exists(f"{os.fspath(path)}.npz"):
            path = f"{os.fspath(path)}.npz"
        with np.load(path, allow_pickle=False) as f:
            d = {n: f[n] if n in f.files else None for n in _STATE_NAMES}
            if "dtype" in f.files and str(f["dtype"]) == "bfloat16":
                bf16 = layer_dtype("bfloat16", "path (a bfloat16 layer)")
                d = {n: None if a is None else a.view(bf16) for n, a in d.items()}
            rope = str(f["rope"]) or None
            return cls.from_weights(*(d[n] for n in _STATE_NAMES), num_heads=int(f["num_heads"]),
                                    num_kv_heads=int(f["num_kv_heads"]), rope=rope,
                                    rope_base=float(f["rope_base"]))

    def new_cache(self, batch_size, max_len, *, kv_dtype=None):
        """A preallocated :class:`KVCache` for ``batch_size`` sequences of up
        to ``max_len`` tokens each, on the layer's device. ``kv_dtype``
        (float32 layers on the CPU): ``"float16"``, ``"bfloat16"`` or
        ``"int8"`` storage, see :class:`KVCache`."""
        return KVCache(batch_size, max_len, self.num_kv_heads, self.head_dim, self.dtype,
                       v_head_dim=self.v_head_dim, device=self.device, kv_dtype=kv_dtype)

    def __repr__(self):
        return (f"MultiHeadAttention(embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                + (f"v_head_dim={self.v_head_dim}, " if self.v_head_dim != self.head_dim else "")
                + f"kdim={self.kdim}, "
                f"vdim={self.vdim}, bias={self._has_bias}, rope={self.rope!r}, dtype={self.dtype.name}"
                + (f", device={self.device!r})" if self.device != "cpu" else ")"))

    # ---- the call --------------------------------------------------------------

    def _rope_table(self, n):
        """cos/sin tables for positions 0..n-1 (at least), cached and grown
        by doubling."""
        cached = self._rope_cache
        if cached is not None and cached[0].shape[0] >= n:
            return cached
        size = max(n, 256, 2 * cached[0].shape[0] if cached is not None else 0)
        cached = rope_tables(size, self.head_dim // 2, self.rope_base, self.dtype,
                             get_num_threads())
        self._rope_cache = cached
        return cached

    def __call__(self, query, key=None, value=None, *, key_lengths=None, query_lengths=None,
                 attn_mask=None, is_causal=False, return_weights=False, cache=None,
                 num_threads=None):
        """Attend from ``query`` to ``key``/``value`` (or to ``query`` itself).

        Parameters
        ----------
        query : array_like, shape ``(B, Lq, embed_dim)``
        key, value : array_like, shapes ``(B, Lk, kdim)`` and ``(B, Lk, vdim)``, optional
            Both None, or both ``query`` itself (torch's ``mha(x, x, x)``):
            self-attention (``Lk = Lq``), with one fused QKV projection.
        key_lengths : array_like of int, shape ``(B,)`` or ``(B, H)``, optional
            Keys ``j >= key_lengths`` are masked (torch's
            ``key_padding_mask``, as lengths); their K and V are never
            computed.
        query_lengths : array_like of int, shape ``(B,)``, optional
            Output rows ``i >= query_lengths`` are exactly 0 (after the
            output projection and its bias too) and are never computed.
        attn_mask : array_like, optional
            Broadcasts to ``(B, H, Lq, Lk)``. Bool: True = may attend (the
            opposite of torch's bool masks). Real: added to the scores.
        is_causal : bool
            Mask keys ``j > i`` (top-left aligned, as torch).
        return_weights : bool
            Also return the ``(B, H, Lq, Lk)`` attention weights. Rows with
            no key left are 0 (torch gives NaN there), and their output is
            the output bias alone.
        cache : KVCache, optional
            Self-attention decoding: the new tokens' keys and values are
            appended to ``cache`` (at each sequence's length; with
            ``query_lengths``, only that many tokens per sequence) and the
            queries attend, causally and bottom-right aligned, to everything
            the cache holds. ``key``, ``value``, ``key_lengths`` and
            ``attn_mask`` are not accepted then; if a sequence would
            overflow ``max_len``, ValueError is raised and nothing is
            appended.
        num_threads : int, optional
            Threads for this call (default :func:`fastattn.get_num_threads`).
            The result is bitwise the same for every thread count.

        Returns
        -------
        out : ndarray ``(B, Lq, embed_dim)`` of the layer's dtype
        weights : ndarray ``(B, H, Lq, Lk)``, only with ``return_weights``
        """
        is_causal = bool_flag(is_causal, "is_causal")
        return_weights = bool_flag(return_weights, "return_weights")
        nt = _call_threads(num_threads)
        if self.device != "cpu" or type(query) is not np.ndarray:
            where = _backend.device_of(query, key, value, names=("query", "key", "value"))
            if where != self.device:
                raise TypeError(f"the layer's weights are on {self.device!r} but its inputs on {where!r}: "
                                f"move the layer with layer.to({where!r}) or the inputs to {self.device!r}")
            if where != "cpu":
                return self._device_layer(self, query, key, value, key_lengths=key_lengths,
                                          query_lengths=query_lengths, attn_mask=attn_mask,
                                          is_causal=is_causal, return_weights=return_weights, cache=cache)
        x = as_input(query, "query", self.embed_dim, self.dtype)
        check_key_value(key, value)
        if cache is not None:
            _check_cache_call(self, cache, key, key_lengths, attn_mask)
            ql = _query_lengths(query_lengths, x.shape[0], x.shape[1])
            _check_cache_fits(cache, self.num_kv_heads, self.head_dim, self.dtype, x.shape,
                              self.v_head_dim)
            return self._with_gemm_threads(self._call_cached, x, cache, ql, return_weights, nt)
        B, Lq, _ = x.shape
        H = self.num_heads
        if (key is query and value is query and self.kdim == self.embed_dim
                and self.vdim == self.embed_dim):
            key = value = None  # torch's mha(x, x, x): one fused QKV projection
        if key is None:
            check_self_attention(self)
            kx = vx = None
            Lk = Lq
        else:
            kx = as_input(key, "key", self.kdim, self.dtype)
            vx = kx if value is key else as_input(value, "value", self.vdim, self.dtype)
            check_key_value_shapes(x.shape, kx.shape, vx.shape)
            Lk = kx.shape[1]
        ql = _query_lengths(query_lengths, B, Lq)
        kl = lengths_view(key_lengths, "key_lengths", (B, H), B, H, Lk, "key")
        full = (B, H, Lq, Lk)
        # 16-bit layers take additive masks in float32, as their scores are
        kind, mask4 = prepare_mask(attn_mask, full, full, np.float32 if self._half else self.dtype)
        return self._with_gemm_threads(self._forward, x, kx, vx, Lk, ql, kl, kind, mask4, is_causal,
                                       return_weights, nt)

    def _with_gemm_threads(self, fn, *args):
        """fn(*args, gt): args end with nt, the call's threads; gt is the
        GEMMs'. A float layer's GEMMs are BLAS's: limited to one thread each
        while the call splits them over nt OpenMP threads, or (gt = 1) left
        to thread themselves where BLAS cannot be limited. A 16-bit layer's
        GEMMs are fastattn's own and take the call's threads, with no BLAS
        to limit (looking it up cost 4% of a bf16 layer call at S=128)."""
        if self._half:
            return fn(*args, args[-1])
        gt = args[-1] if BLAS_THREADS.enter() else 1
        try:
            return fn(*args, gt)
        finally:
            BLAS_THREADS.exit()

    def _forward(self, x, kx, vx, Lk, ql, kl, kind, mask4, is_causal, return_weights, nt, gt):
        """The uncached call, arguments validated; nt threads for the
        kernels, gt for the GEMMs (1: BLAS threads itself)."""
        B, Lq, _ = x.shape
        H, Hkv, D, Dv = self.num_heads, self.num_kv_heads, self.head_dim, self.v_head_dim
        nq, nk, nv = self._widths()
        full = (B, H, Lq, Lk)
        mm = functools.partial(linear_checked, deterministic=self.deterministic)
        # rows that need projecting: queries up to their length, keys and
        # values up to the longest key length of any head
        q_need = ql
        kv_need = None if kl is None else np.ascontiguousarray(kl.max(axis=1))
        dt = self.dtype
        # RoPE is the GEMMs' epilogue: each thread rotates the Q/K heads of
        # the column block it has just computed (Q and K lead their buffers)
        rope = self._rope_spec
        if self._half:
            qcols, kcols, vcols = self._project_qkv16(x, kx, vx, nt)
        elif kx is None:
            buf = row_buffer(B, Lq, nq + nk + nv, dt)
            if q_need is None and kv_need is None:
                mm(x, self._w_in, buf, self._b_in, None, None, 1.0, gt, rope(B, H + Hkv, Lq))
            else:
                qn = np.full(B, Lq, np.int64) if q_need is None else q_need
                kn = np.full(B, Lk, np.int64) if kv_need is None else kv_need
                both = np.minimum(qn, kn)
                mm(x, self._w_in, buf, self._b_in, None, both, 1.0, gt, rope(B, H + Hkv, Lq))
                if (qn > both).any():
                    mm(x, self._w_q, buf[:, :, :nq], self._b_q, both, qn, 1.0, gt, rope(B, H, Lq))
                if (kn > both).any():
                    mm(x, self._w_kv, buf[:, :, nq:], self._b_kv, both, kn, 1.0, gt, rope(B, Hkv, Lk))
            qcols, kcols, vcols = buf[:, :, :nq], buf[:, :, nq:nq + nk], buf[:, :, nq + nk:]
        else:
            qcols = row_buffer(B, Lq, nq, dt)
            mm(x, self._w_q, qcols, self._b_q, None, q_need, 1.0, gt, rope(B, H, Lq))
            if kx is vx and self._w_kv is not None:
                kvbuf = row_buffer(B, Lk, nk + nv, dt)
                mm(kx, self._w_kv, kvbuf, self._b_kv, None, kv_need, 1.0, gt, rope(B, Hkv, Lk))
                kcols, vcols = kvbuf[:, :, :nk], kvbuf[:, :, nk:]
            else:
                kcols = row_buffer(B, Lk, nk, dt)
                vcols = row_buffer(B, Lk, nv, dt)
                mm(kx, self._w_k, kcols, self._b_k, None, kv_need, 1.0, gt, rope(B, Hkv, Lk))
                mm(vx, self._w_v, vcols, self._b_v, None, kv_need, 1.0, gt)

        attn = row_buffer(B, Lq, H * Dv, dt)
        weights = np.empty(full, dtype=dt) if return_weights else None
        qlv = None if ql is None else repeat_axis(ql, 1, H)
        attend = _attention16 if self._half else _kernels.scaled_dot_product_attention
        attend(
            head_view(qcols, H, D), head_view(kcols, Hkv, D), head_view(vcols, Hkv, Dv),
            head_view(attn, H, Dv), weights=weights, scale=1.0 / math.sqrt(D), mask=mask4,
            mask_kind=kind, key_len=kl, query_len=qlv, is_causal=is_causal, alignment=_TOP_LEFT,
            num_threads=nt)
        out = self._project_out(attn, ql, nt if self._half else gt)
        return (out, weights) if return_weights else out

    def _rope_spec(self, B, heads, L, positions=None):
        """The RoPE epilogue of a projection (None without rope): its first
        ``heads`` heads, row i of batch b at ``positions[b, i]`` (default
        i), rotated by the layer's cached table."""
        if self.rope is None:
            return None
        if positions is None:
            cos, sin = self._rope_table(L)
            index = repeat_axis(np.arange(L, dtype=np.int64), 0, B, heads)
        else:
            cos, sin = self._rope_table(int_extremes(positions)[1] + 1 if positions.size else 0)
            index = repeat_axis(positions, 1, heads)
        return (ROPE_LAYOUTS[self.rope], heads, self.head_dim, index, cos, sin)

    def _project_out(self, attn, ql, gt):
        """attn (B, Lq, H*D) @ W_O + b_O; rows past query_lengths are 0.
        gt: the GEMM's threads (a 16-bit layer's: the call's threads)."""
        B, Lq, _ = attn.shape
        if self._half:
            out = self._project16(attn, "w_o", "b_o", self.embed_dim, gt)
            if ql is not None:
                out[np.arange(Lq)[None, :] >= ql[:, None]] = 0
            return out
        alloc = np.empty if ql is None else np.zeros
        out = alloc((B, Lq, self.embed_dim), dtype=self.dtype)
        linear_checked(attn, self._w_o, out, self._b_o, None, ql, 1.0, gt, None, self.deterministic)
        return out

    # ---- 16-bit projections ---------------------------------------------------

    def _project16(self, a, w, b, N, num_threads, out=None):
        """a (B, L, K) @ the packed weight ``w`` (+ the float32 bias ``b``)
        into ``out`` or a new (B, L, N) row buffer, float32 sums rounded to
        the layer's dtype. The result is bitwise the same for every thread
        count (fastattn.bf16_gemm)."""
        from fastattn.bf16_gemm import matmul_checked

        B, L, K = a.shape
        if out is None:
            out = row_buffer(1, B * L, N, self.dtype)[0].reshape(B, L, N)
        matmul_checked(a.reshape(B * L, K), self._packed_weight(w), out.reshape(B * L, N),
                       self._packed[b], 1.0, num_threads)
        return out

    def _rope16(self, cols, heads, L, positions, num_threads):
        """RoPE on the first ``heads`` heads of the 16-bit (B, L, >= heads*D)
        columns, in place (float32 inside, rounded once per element)."""
        spec = self._rope_spec(cols.shape[0], heads, L, positions)
        if spec is None:
            return
        layout, _, D, index, cos, sin = spec
        x4 = head_view(cols[:, :, :heads * D], heads, D)
        _kernels.rope_apply(x4, x4, index, cos, sin, layout, None, None, num_threads)

    def _project_qkv16(self, x, kx, vx, nt):
        """The (qcols, kcols, vcols) column blocks of a 16-bit layer's call,
        RoPE applied to Q and K. Every row is projected."""
        H, Hkv = self.num_heads, self.num_kv_heads
        nq, nk, nv = self._widths()
        B, Lq, _ = x.shape
        if kx is None:
            buf = self._project16(x, "w_in", "b_in", nq + nk + nv, nt)
            self._rope16(buf, H + Hkv, Lq, None, nt)  # Q and K lead the buffer
            return buf[:, :, :nq], buf[:, :, nq:nq + nk], buf[:, :, nq + nk:]
        Lk = kx.shape[1]
        qcols = self._project16(x, "w_q", "b_q", nq, nt)
        self._rope16(qcols, H, Lq, None, nt)
        if kx is vx and self._packed_weight("w_kv") is not None:
            kvbuf = self._project16(kx, "w_kv", "b_kv", nk + nv, nt)
            kcols, vcols = kvbuf[:, :, :nk], kvbuf[:, :, nk:]
        else:
            kcols = self._project16(kx, "w_k", "b_k", nk, nt)
            vcols = self._project16(vx, "w_v", "b_v", nv, nt)
        self._rope16(kcols, Hkv, Lk, None, nt)
        return qcols, kcols, vcols

    def _call_cached(self, x, cache, ql, return_weights, nt, gt):
        B, L, _ = x.shape
        H, Hkv, D, Dv = self.num_heads, self.num_kv_heads, self.head_dim, self.v_head_dim
        nq, nk, nv = self._widths()
        new_tokens = np.full(B, L, np.int64) if ql is None else ql
        old, new = cache.append_lengths(new_tokens)
        dt = self.dtype
        pos = None
        if self.rope is not None:
            # positions continue each sequence; padded rows are never rotated
            pos = np.minimum(old[:, None] + np.arange(L, dtype=np.int64), max(cache.max_len - 1, 0))
        if self._half:
            buf = self._project16(x, "w_in", "b_in", nq + nk + nv, nt)
            self._rope16(buf, H + Hkv, L, pos, nt)
        else:
            buf = row_buffer(B, L, nq + nk + nv, dt)
            rope = None if pos is None else self._rope_spec(B, H + Hkv, L, pos)
            linear_checked(x, self._w_in, buf, self._b_in, None, ql, 1.0, gt, rope, self.deterministic)
        q4 = head_view(buf[:, :, :nq], H, D)
        k4 = head_view(buf[:, :, nq:nq + nk], Hkv, D)
        v4 = head_view(buf[:, :, nq + nk:], Hkv, Dv)
        # append: row i of sequence b goes to cache row old[b] + i, i < new_tokens[b]
        cache._write(k4, v4, old, new_tokens, nt)
        cache._lengths[:] = new

        Lk = int_extremes(new)[1]
        attn = row_buffer(B, L, H * Dv, dt)
        out4 = head_view(attn, H, Dv)
        weights = np.zeros((B, H, L, Lk), dtype=dt) if return_weights else None
        scale = 1.0 / math.sqrt(D)
        ck, cv, kv_code, cks, cvs = cache._kernel_kv(Lk)
        attend = _attention16 if self._half else _kernels.scaled_dot_product_attention
        if B == 0 or L == 1 or (ql is None and (old == old[0]).all()):
            # one call: a single new token sees every key its sequence holds
            # (key_lengths), and equal lengths align bottom-right for all
            kl = repeat_axis(new, 1, H) if L == 1 else None
            qlv = None if ql is None else repeat_axis(ql, 1, H)
            attend(q4, ck, cv, out4, weights=weights, scale=scale,
                                                  key_len=kl, query_len=qlv, is_causal=L > 1,
                                                  alignment=_BOTTOM_RIGHT, num_threads=nt,
                                                  kv_dtype=kv_code, k_scale=cks, v_scale=cvs)
        else:
            # ragged: bottom-right alignment differs per sequence
            for b in range(B):
                n, t = int(new[b]), int(new_tokens[b])
                if t == 0:
                    continue
                attend(
                    q4[b:b + 1, :, :t], ck[b:b + 1, :, :n], cv[b:b + 1, :, :n], out4[b:b + 1, :, :t],
                    weights=None if weights is None else weights[b:b + 1, :, :t, :n], scale=scale,
                    is_causal=True, alignment=_BOTTOM_RIGHT, num_threads=nt, kv_dtype=kv_code,
                    k_scale=None if cks is None else cks[b:b + 1, :, :n],
                    v_scale=None if cvs is None else cvs[b:b + 1, :, :n])
        out = self._project_out(attn, ql, nt if self._half else gt)
        return (out, weights) if return_weights else out
