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

On ``"cuda"`` (after :meth:`MultiHeadAttention.to`) the same checks run, and
the weights and the compute live in :mod:`fastattn._backend.cuda`
(``DeviceLayer``): cuBLAS projections, fastattn's CUDA kernels for RoPE, the
cache append and attention.
"""

import math
import os

import numpy as np

from fastattn import _backend, _kernels
from fastattn._config import get_num_threads
from fastattn._validation import float_array, int_array, lengths_view
from fastattn.kv_cache import KVCache, float_dtype, positive
from fastattn.masks import prepare_mask
from fastattn.projections import BLAS_THREADS, as_input, head_view, linear, row_buffer
from fastattn.rotary import ROPE_LAYOUTS, _check_base, rope_tables

_TOP_LEFT = _kernels.CAUSAL_ALIGNMENTS["top_left"]
_BOTTOM_RIGHT = _kernels.CAUSAL_ALIGNMENTS["bottom_right"]
_WEIGHT_NAMES = ("w_q", "w_k", "w_v", "w_o")
_BIAS_NAMES = ("b_q", "b_k", "b_v", "b_o")
_STATE_NAMES = _WEIGHT_NAMES + _BIAS_NAMES


def _query_lengths(values, B, L):
    """``query_lengths`` of a layer call: None or a contiguous int64 (B,)."""
    if values is None:
        return None
    arr = int_array(values, "query_lengths")
    if arr.shape != (B,):
        raise ValueError(f"query_lengths must have shape ({B},) for a batch of {B}, got {arr.shape}")
    if arr.size and arr.max() > L:
        raise ValueError(f"query_lengths must be <= the query length {L}, got max {arr.max()}")
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


def _check_cache_fits(cache, num_kv_heads, head_dim, dtype, query_shape):
    """The cache holds this layer's kv heads, head dim and dtype, for the
    query's batch."""
    if (cache.num_kv_heads, cache.head_dim, cache.dtype) != (num_kv_heads, head_dim, dtype):
        raise ValueError(f"cache holds {cache.num_kv_heads} kv heads of dim {cache.head_dim} in "
                         f"{cache.dtype}; this layer needs {num_kv_heads} of dim {head_dim} in {dtype}")
    if cache.batch_size != query_shape[0]:
        raise ValueError(f"cache is for a batch of {cache.batch_size}, got query {tuple(query_shape)}")


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
    dtype : float32 or float64
        Weights and computation; inputs are converted to it.
    seed : int or numpy.random.Generator, optional
        Initialisation as torch does it: Xavier-uniform input projections
        (over the stacked ``[W_Q; W_K; W_V]`` when ``kdim == vdim ==
        embed_dim``, else each on its own), the output projection
        ``U(-1/√(H·D), 1/√(H·D))`` (torch's ``Linear`` default) and zero
        biases.

    Weights are stored in the ``(in, out)`` layout, so ``x @ w_q`` is the
    query projection; :meth:`state_dict` returns them.

    A call runs on :func:`fastattn.get_num_threads` OpenMP threads: the
    projections split their columns over them, each block a
    single-threaded BLAS call, so scipy's BLAS is held at one thread for
    the duration of a call (through threadpoolctl; restored afterwards).

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
                 bias=True, rope=None, rope_base=10000.0, dtype=np.float32, seed=None):
        E = positive(embed_dim, "embed_dim")
        H = positive(num_heads, "num_heads")
        if E % H:
            raise ValueError(f"embed_dim ({E}) must be divisible by num_heads ({H})")
        self._configure(E, H, num_kv_heads, E // H, kdim, vdim, bool(bias), rope, rope_base,
                        float_dtype(dtype))
        self._init_weights(np.random.default_rng(seed))

    # ---- construction -------------------------------------------------------

    def _configure(self, E, H, Hkv, D, kdim, vdim, bias, rope, rope_base, dtype):
        Hkv = H if Hkv is None else positive(Hkv, "num_kv_heads")
        if H % Hkv:
            raise ValueError(f"num_kv_heads ({Hkv}) must divide num_heads ({H})")
        self.embed_dim = E
        self.num_heads = H
        self.num_kv_heads = Hkv
        self.head_dim = D
        self.kdim = E if kdim is None else positive(kdim, "kdim")
        self.vdim = E if vdim is None else positive(vdim, "vdim")
        self.dtype = dtype
        if rope is not None and rope not in ROPE_LAYOUTS:
            raise ValueError(f"rope must be None or one of {list(ROPE_LAYOUTS)}, got {rope!r}")
        if rope is not None and D % 2:
            raise ValueError(f"rope needs an even head_dim, got {D}")
        self.rope = rope
        self.rope_base = _check_base(rope_base)
        self._rope_cache = None
        self._has_bias = bias
        self.device = "cpu"
        self._device_layer = None  # the weights on "cuda" (fastattn._backend.cuda.DeviceLayer)
        self._allocate_host()

    def _allocate_host(self):
        """Zeroed host storage for the weights."""
        E, dtype, bias = self.embed_dim, self.dtype, self._has_bias
        nq, nk = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # Storage: one (E, nq + 2 nk) matrix when self-attention can use a
        # fused QKV GEMM, else Q apart and K|V fused when they share a width.
        if self.kdim == self.vdim == E:
            self._w_in = np.zeros((E, nq + 2 * nk), dtype)
            self._w_q, self._w_kv = self._w_in[:, :nq], self._w_in[:, nq:]
        else:
            self._w_in = None
            self._w_q = np.zeros((E, nq), dtype)
            self._w_kv = np.zeros((self.kdim, 2 * nk), dtype) if self.kdim == self.vdim else None
        if self._w_kv is not None:
            self._w_k, self._w_v = self._w_kv[:, :nk], self._w_kv[:, nk:]
        else:
            self._w_k = np.zeros((self.kdim, nk), dtype)
            self._w_v = np.zeros((self.vdim, nk), dtype)
        self._w_o = np.zeros((nq, E), dtype)
        if bias:
            self._b_in = np.zeros(nq + 2 * nk, dtype)
            self._b_q, self._b_kv = self._b_in[:nq], self._b_in[nq:]
            self._b_k, self._b_v = self._b_in[nq:nq + nk], self._b_in[nq + nk:]
            self._b_o = np.zeros(E, dtype)
        else:
            self._b_in = self._b_q = self._b_kv = self._b_k = self._b_v = self._b_o = None

    def _init_weights(self, rng):
        E, nq, nk = self.embed_dim, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim

        def xavier(fan_in, fan_out, shape):
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            return rng.uniform(-bound, bound, size=shape)

        if self._w_in is not None:
            self._w_in[...] = xavier(E, nq + 2 * nk, self._w_in.shape)
        else:
            self._w_q[...] = xavier(E, nq, self._w_q.shape)
            self._w_k[...] = xavier(self.kdim, nk, self._w_k.shape)
            self._w_v[...] = xavier(self.vdim, nk, self._w_v.shape)
        bound = 1.0 / math.sqrt(nq)
        self._w_o[...] = rng.uniform(-bound, bound, size=self._w_o.shape)

    @classmethod
    def from_weights(cls, w_q, w_k, w_v, w_o, b_q=None, b_k=None, b_v=None, b_o=None, *,
                     num_heads, num_kv_heads=None, rope=None, rope_base=10000.0):
        """A layer with the given weights in the ``(in, out)`` layout.

        ``w_q`` is ``(E, H·D)``, ``w_k`` ``(kdim, Hkv·D)``, ``w_v``
        ``(vdim, Hkv·D)`` and ``w_o`` ``(H·D, E)``; ``head_dim`` is
        ``w_q.shape[1] // num_heads``. Biases are ``(out,)``; when any is
        given the others default to zeros. The dtype is the weights'
        compute dtype (float32 or float64). The arrays are copied.
        """
        ws = {n: float_array(w, n) for n, w in zip(_WEIGHT_NAMES, (w_q, w_k, w_v, w_o))}
        bs = {n: None if b is None else float_array(b, n) for n, b in zip(_BIAS_NAMES, (b_q, b_k, b_v, b_o))}
        dtype = np.result_type(*ws.values(), *(b for b in bs.values() if b is not None))
        for n, w in ws.items():
            if w.ndim != 2:
                raise ValueError(f"{n} must be 2-D (in, out), got shape {w.shape}")
        H = positive(num_heads, "num_heads")
        E, nq = ws["w_q"].shape
        if nq == 0 or nq % H:
            raise ValueError(f"w_q's output width {nq} (shape {ws['w_q'].shape}) must be a positive multiple of num_heads ({H})")
        D = nq // H
        Hkv = H if num_kv_heads is None else positive(num_kv_heads, "num_kv_heads")
        self = cls.__new__(cls)
        self._configure(E, H, Hkv, D, ws["w_k"].shape[0], ws["w_v"].shape[0],
                        any(b is not None for b in bs.values()), rope, rope_base, dtype)
        self._load({**ws, **bs}, partial_bias=True)
        return self

    @classmethod
    def from_torch(cls, module):
        """Convert a ``torch.nn.MultiheadAttention`` (with or without bias,
        with or without separate ``kdim``/``vdim``). torch weights are
        ``(out, in)`` and are transposed; float64 modules give a float64
        layer, every other dtype float32. ``add_bias_kv`` and
        ``add_zero_attn`` are not supported; dropout does not apply at
        inference."""
        try:
            import torch
        except ImportError as exc:  # pragma: no cover - exercised without torch
            raise ImportError("MultiHeadAttention.from_torch needs torch (pip install torch)") from exc
        if not isinstance(module, torch.nn.MultiheadAttention):
            raise TypeError(f"from_torch expects a torch.nn.MultiheadAttention, got {type(module).__name__}")
        if module.bias_k is not None or module.bias_v is not None:
            raise ValueError("from_torch: add_bias_kv=True is not supported")
        if module.add_zero_attn:
            raise ValueError("from_torch: add_zero_attn=True is not supported")
        dtype = np.float64 if module.out_proj.weight.dtype == torch.float64 else np.float32

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
        E, nq, nk = self.embed_dim, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"w_q": (E, nq), "w_k": (self.kdim, nk), "w_v": (self.vdim, nk), "w_o": (nq, E),
                "b_q": (nq,), "b_k": (nk,), "b_v": (nk,), "b_o": (E,)}

    def _targets(self):
        return {"w_q": self._w_q, "w_k": self._w_k, "w_v": self._w_v, "w_o": self._w_o,
                "b_q": self._b_q, "b_k": self._b_k, "b_v": self._b_v, "b_o": self._b_o}

    def _load(self, d, partial_bias=False):
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
            a = float_array(a, n)
            if a.shape != shapes[n]:
                raise ValueError(f"{n} must have shape {shapes[n]}, got {a.shape}")
            arrays[n] = a
        if self.device != "cpu":  # all checked: rebuild the device weights
            state = self.state_dict()
            state.update(arrays)
            self._device_layer = _backend.cuda_backend().DeviceLayer(self, state)
            return
        targets = self._targets()
        for n, a in arrays.items():  # all checked: now copy
            targets[n][...] = a

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
        if device == "cuda":
            self._device_layer = _backend.cuda_backend().DeviceLayer(self, self.state_dict())
            self._w_in = self._w_q = self._w_kv = self._w_k = self._w_v = self._w_o = None
            self._b_in = self._b_q = self._b_kv = self._b_k = self._b_v = self._b_o = None
            self.device = device
        else:
            state = self._device_layer.state_dict()
            self._allocate_host()
            self.device, self._device_layer = device, None
            self._load(state)
        return self

    def load_state_dict(self, d):
        """Copy the weights of ``d`` (as from :meth:`state_dict`) into the
        layer; shapes must match, and biases are required exactly when the
        layer has them. Nothing is changed when a check fails."""
        self._load(d)

    def save(self, path):
        """Write the weights and the configuration to an ``.npz`` file."""
        arrays = {n: a for n, a in self.state_dict().items() if a is not None}
        np.savez(path, **arrays, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                 rope=np.str_(self.rope or ""), rope_base=self.rope_base)

    @classmethod
    def load(cls, path):
        """A layer from a file written by :meth:`save`."""
        if isinstance(path, (str, os.PathLike)) and not os.path.exists(path) and os.path.exists(f"{os.fspath(path)}.npz"):
            path = f"{os.fspath(path)}.npz"
        with np.load(path, allow_pickle=False) as f:
            d = {n: f[n] if n in f.files else None for n in _STATE_NAMES}
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
                       device=self.device, kv_dtype=kv_dtype)

    def __repr__(self):
        return (f"MultiHeadAttention(embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, kdim={self.kdim}, "
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
                 attn_mask=None, is_causal=False, return_weights=False, cache=None):
        """Attend from ``query`` to ``key``/``value`` (or to ``query`` itself).

        Parameters
        ----------
        query : array_like, shape ``(B, Lq, embed_dim)``
        key, value : array_like, shapes ``(B, Lk, kdim)`` and ``(B, Lk, vdim)``, optional
            Both None: self-attention (``Lk = Lq``).
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

        Returns
        -------
        out : ndarray ``(B, Lq, embed_dim)`` of the layer's dtype
        weights : ndarray ``(B, H, Lq, Lk)``, only with ``return_weights``
        """
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
            _check_cache_fits(cache, self.num_kv_heads, self.head_dim, self.dtype, x.shape)
            nt = get_num_threads()
            gt = nt if BLAS_THREADS.enter() else 1
            try:
                return self._call_cached(x, cache, ql, bool(return_weights), nt, gt)
            finally:
                BLAS_THREADS.exit()
        B, Lq, _ = x.shape
        H = self.num_heads
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
        kind, mask4 = prepare_mask(attn_mask, full, full, self.dtype)
        nt = get_num_threads()
        gt = nt if BLAS_THREADS.enter() else 1
        try:
            return self._forward(x, kx, vx, Lk, ql, kl, kind, mask4, bool(is_causal),
                                 bool(return_weights), nt, gt)
        finally:
            BLAS_THREADS.exit()

    def _forward(self, x, kx, vx, Lk, ql, kl, kind, mask4, is_causal, return_weights, nt, gt):
        """The uncached call, arguments validated; nt threads for the
        kernels, gt for the GEMMs (1: BLAS threads itself)."""
        B, Lq, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        nq, nk = H * D, Hkv * D
        full = (B, H, Lq, Lk)
        mm = linear
        # rows that need projecting: queries up to their length, keys and
        # values up to the longest key length of any head
        q_need = ql
        kv_need = None if kl is None else np.ascontiguousarray(kl.max(axis=1))
        dt = self.dtype
        # RoPE is the GEMMs' epilogue: each thread rotates the Q/K heads of
        # the column block it has just computed (Q and K lead their buffers)
        rope = self._rope_spec
        if kx is None:
            buf = row_buffer(B, Lq, nq + 2 * nk, dt)
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
                kvbuf = row_buffer(B, Lk, 2 * nk, dt)
                mm(kx, self._w_kv, kvbuf, self._b_kv, None, kv_need, 1.0, gt, rope(B, Hkv, Lk))
                kcols, vcols = kvbuf[:, :, :nk], kvbuf[:, :, nk:]
            else:
                kcols = row_buffer(B, Lk, nk, dt)
                vcols = row_buffer(B, Lk, nk, dt)
                mm(kx, self._w_k, kcols, self._b_k, None, kv_need, 1.0, gt, rope(B, Hkv, Lk))
                mm(vx, self._w_v, vcols, self._b_v, None, kv_need, 1.0, gt)

        attn = row_buffer(B, Lq, nq, dt)
        weights = np.empty(full, dtype=dt) if return_weights else None
        qlv = None if ql is None else np.broadcast_to(ql[:, None], (B, H))
        _kernels.scaled_dot_product_attention(
            head_view(qcols, H, D), head_view(kcols, Hkv, D), head_view(vcols, Hkv, D),
            head_view(attn, H, D), weights=weights, scale=1.0 / math.sqrt(D), mask=mask4,
            mask_kind=kind, key_len=kl, query_len=qlv, is_causal=is_causal, alignment=_TOP_LEFT,
            num_threads=nt)
        out = self._project_out(attn, ql, gt)
        return (out, weights) if return_weights else out

    def _rope_spec(self, B, heads, L, positions=None):
        """The RoPE epilogue of a projection (None without rope): its first
        ``heads`` heads, row i of batch b at ``positions[b, i]`` (default
        i), rotated by the layer's cached table."""
        if self.rope is None:
            return None
        if positions is None:
            cos, sin = self._rope_table(L)
            index = np.broadcast_to(np.arange(L, dtype=np.int64), (B, heads, L))
        else:
            cos, sin = self._rope_table(int(positions.max()) + 1 if positions.size else 0)
            index = np.broadcast_to(positions[:, None, :], (B, heads, L))
        return (ROPE_LAYOUTS[self.rope], heads, self.head_dim, index, cos, sin)

    def _project_out(self, attn, ql, gt):
        """attn (B, Lq, H*D) @ W_O + b_O; rows past query_lengths are 0."""
        B, Lq, _ = attn.shape
        alloc = np.empty if ql is None else np.zeros
        out = alloc((B, Lq, self.embed_dim), dtype=self.dtype)
        linear(attn, self._w_o, out, self._b_o, None, ql, 1.0, gt)
        return out

    def _call_cached(self, x, cache, ql, return_weights, nt, gt):
        B, L, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        nq, nk = H * D, Hkv * D
        new_tokens = np.full(B, L, np.int64) if ql is None else ql
        old, new = cache.append_lengths(new_tokens)
        dt = self.dtype
        buf = row_buffer(B, L, nq + 2 * nk, dt)
        rope = None
        if self.rope is not None:
            # positions continue each sequence; padded rows are never rotated
            pos = np.minimum(old[:, None] + np.arange(L, dtype=np.int64), max(cache.max_len - 1, 0))
            rope = self._rope_spec(B, H + Hkv, L, pos)
        linear(x, self._w_in, buf, self._b_in, None, ql, 1.0, gt, rope)
        q4 = head_view(buf[:, :, :nq], H, D)
        k4 = head_view(buf[:, :, nq:nq + nk], Hkv, D)
        v4 = head_view(buf[:, :, nq + nk:], Hkv, D)
        # append: row i of sequence b goes to cache row old[b] + i, i < new_tokens[b]
        cache._write(k4, v4, old, new_tokens, nt)
        cache._lengths[:] = new

        Lk = int(new.max()) if B else 0
        attn = row_buffer(B, L, nq, dt)
        out4 = head_view(attn, H, D)
        weights = np.zeros((B, H, L, Lk), dtype=dt) if return_weights else None
        scale = 1.0 / math.sqrt(D)
        ck, cv, kv_code, cks, cvs = cache._kernel_kv(Lk)
        if B == 0 or L == 1 or (ql is None and (old == old[0]).all()):
            # one call: a single new token sees every key its sequence holds
            # (key_lengths), and equal lengths align bottom-right for all
            kl = np.broadcast_to(new[:, None], (B, H)) if L == 1 else None
            qlv = None if ql is None else np.broadcast_to(ql[:, None], (B, H))
            _kernels.scaled_dot_product_attention(q4, ck, cv, out4, weights=weights, scale=scale,
                                                  key_len=kl, query_len=qlv, is_causal=L > 1,
                                                  alignment=_BOTTOM_RIGHT, num_threads=nt,
                                                  kv_dtype=kv_code, k_scale=cks, v_scale=cvs)
        else:
            # ragged: bottom-right alignment differs per sequence
            for b in range(B):
                n, t = int(new[b]), int(new_tokens[b])
                if t == 0:
                    continue
                _kernels.scaled_dot_product_attention(
                    q4[b:b + 1, :, :t], ck[b:b + 1, :, :n], cv[b:b + 1, :, :n], out4[b:b + 1, :, :t],
                    weights=None if weights is None else weights[b:b + 1, :, :t, :n], scale=scale,
                    is_causal=True, alignment=_BOTTOM_RIGHT, num_threads=nt, kv_dtype=kv_code,
                    k_scale=None if cks is None else cks[b:b + 1, :, :n],
                    v_scale=None if cvs is None else cvs[b:b + 1, :, :n])
        out = self._project_out(attn, ql, gt)
        return (out, weights) if return_weights else out
