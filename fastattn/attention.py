"""Fused scaled-dot-product attention."""

import math

import numpy as np

from fastattn import _backend, _kernels
from fastattn._config import resolve_num_threads
from fastattn._features import alibi_slopes_array, sinks_array, softcap_value, window_pair
from fastattn._validation import (
    bool_flag,
    choice,
    lengths_view,
    real_number,
    unit_last_axis,
)
from fastattn.kv_quant import attention_compute_dtype, kv_scale_array, narrow_kv, native_storage
from fastattn.masks import CAUSAL_ALIGNMENTS


_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_F16 = np.dtype(np.float16)


def attention_geometry(q_shape, k_shape, v_shape):
    """``(three_d, (B, H, Lq, D), (Hkv, Lk, Dv))`` of q, k and v of these
    shapes, with the checks and messages of every backend."""
    ndim = len(q_shape)
    if ndim not in (3, 4) or len(k_shape) != ndim or len(v_shape) != ndim:
        raise ValueError(
            "q, k and v must all be 4-D (B, H, L, D) or all 3-D (B, L, D); got shapes "
            f"q {tuple(q_shape)}, k {tuple(k_shape)}, v {tuple(v_shape)}")
    three_d = ndim == 3
    if three_d:
        q4, k4, v4 = ((s[0], 1) + tuple(s[1:]) for s in (q_shape, k_shape, v_shape))
    else:
        q4, k4, v4 = tuple(q_shape), tuple(k_shape), tuple(v_shape)
    B, H, Lq, D = q4
    Bk, Hkv, Lk, Dk = k4
    Bv, Hv, Lv, Dv = v4
    if Bk != B or Bv != B:
        raise ValueError(f"q, k and v must have the same batch size; got q {tuple(q_shape)}, k {k4}, v {v4}")
    if Dk != D:
        raise ValueError(f"q and k must have the same head dim; got q {tuple(q_shape)}, k {k4}")
    if (Hv, Lv) != (Hkv, Lk):
        raise ValueError(f"k and v must have the same heads and length; got k {k4}, v {v4}")
    if Hkv == 0 and H > 0 or Hkv and H % Hkv:
        raise ValueError(f"the number of query heads ({H}) must be a multiple of the kv heads ({Hkv}); got q {q4}, k {k4}")
    return three_d, (B, H, Lq, D), (Hkv, Lk, Dv)


def attention_scale(scale, D):
    """The score scale as a float: ``1 / sqrt(D)`` by default (1 for D = 0)."""
    if scale is None:
        return 1.0 / math.sqrt(D) if D else 1.0
    return real_number(scale, "scale", "a real number or None")


def scaled_dot_product_attention(q, k, v, *, attn_mask=None, key_lengths=None,
                                 query_lengths=None, is_causal=False,
                                 causal_alignment="top_left", scale=None, alibi_slopes=None,
                                 return_weights=False, out=None, num_threads=None,
                                 key_starts=None, window=None, softcap=None, sinks=None,
                                 k_scale=None, v_scale=None):
    """``softmax(q kᵀ · scale + masks) v`` in one fused, flash-style pass.

    The score matrix is never materialised beyond one tile; keys past
    ``key_lengths`` or the causal diagonal are never computed; padded query
    rows are written as zeros without being computed. Results are bitwise
    identical for every ``num_threads``.

    Parameters
    ----------
    q : array_like, shape ``(B, H, Lq, D)`` or ``(B, Lq, D)``
    k : array_like, shape ``(B, Hkv, Lk, D)`` or ``(B, Lk, D)``
        ``H % Hkv == 0``: query head ``h`` reads kv head ``h // (H // Hkv)``
        (grouped-query / multi-query attention).
    v : array_like, shape ``(B, Hkv, Lk, Dv)`` or ``(B, Lk, Dv)``
    attn_mask : array_like, optional
        Broadcasts to ``(B, H, Lq, Lk)``. Bool: True = may attend. Real:
        added to the scaled scores.
    key_lengths, query_lengths : array_like of int, optional
        Shape ``(B,)`` or ``(B, H)`` (``(B,)`` for 3-D inputs). Keys
        ``j >= key_length`` are masked; rows ``i >= query_length`` are 0.
    is_causal : bool
    causal_alignment : {"top_left", "bottom_right"}
        Where query ``i`` sits: ``i_pos = i`` or ``i + Lk - Lq``. With
        ``is_causal`` keys ``j > i_pos`` are masked; ALiBi uses the same
        ``i_pos``.
    scale : float, optional
        Defaults to ``1 / sqrt(D)``.
    alibi_slopes : array_like, shape ``(H,)``, optional
        Adds ``-slope[h] * (i_pos - j)`` to each score, never materialised.
    return_weights : bool
        Also return the ``(B, H, Lq, Lk)`` softmax weights that produced
        the output (for inspection; this materialises them).
    out : ndarray, optional, shape ``(B, H, Lq, Dv)``
    num_threads : int, optional
    key_starts : array_like of int, optional
        Shape as ``key_lengths``. Keys ``j < key_start`` are masked and
        skipped like right padding (left-padded batches): the valid keys
        are ``[key_start, key_length)``. ``i_pos`` does not change.
    window : (left, right), optional
        Sliding window, each side an int >= 0 or None (unbounded): key
        ``j`` is visible to query ``i`` iff
        ``i_pos - left <= j <= i_pos + right``. Intersects every other
        mask; keys outside it are never computed.
    softcap : float, optional
        ``> 0``: each scaled score ``s`` becomes ``softcap * tanh(s / softcap)``
        before masks and ALiBi.
    sinks : array_like, shape ``(H,)``, optional
        One logit per head added to every row's softmax denominator, with no
        value: ``out_i = Σ_j e^(s_ij - m) v_j / (e^(sink - m) + Σ_j e^(s_ij - m))``,
        ``m`` the max over the row's scores and the sink. The weights then sum
        to less than 1; a row with no visible key is still 0.
    k_scale, v_scale : array_like, shape ``(B, Hkv, Lk)`` (``(B, Lk)`` for 3-D), optional
        With int8 ``k`` and ``v`` (from :func:`quantize_kv`): key ``j`` of a
        kv head is ``k[..., j, :] * k_scale[..., j]``, likewise for v.

    dtypes: float32 and float64 compute in their own precision. bfloat16
    (``ml_dtypes.bfloat16``) and float16 ``q``, ``k``, ``v`` give an output
    (and weights) of that dtype, each element rounded once to nearest even;
    the products are summed and the softmax computed in float32. On CPUs with
    AVX512_BF16 the all-bfloat16 call runs ``vdpbf16ps`` tiles, with the
    probabilities rounded to bfloat16 for the P·V product. Additive masks,
    ``alibi_slopes`` and ``sinks`` are taken in float32 then.

    K/V storage: ``k`` and ``v`` may be narrower than ``q``: bfloat16 or
    float16 (with float32 or 16-bit queries), or int8 with ``k_scale`` and
    ``v_scale``. The kernel widens them in registers; no float32 copy of K/V
    is made.

    Returns
    -------
    out : ndarray ``(B, H, Lq, Dv)`` (``(B, Lq, Dv)`` for 3-D inputs)
    weights : ndarray, only with ``return_weights=True``

    Rows with no key left (fully masked) are 0, never NaN; masked keys get
    weight exactly 0.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 4, 5, 8), dtype=np.float32) for _ in range(3))
    >>> out = fastattn.scaled_dot_product_attention(q, k, v, key_lengths=[5, 3], is_causal=True)
    >>> out.shape, out.dtype
    ((2, 4, 5, 8), dtype('float32'))
    """
    # Lean path for the common call (float arrays of one dtype, 4-D, unit last
    # stride, no masks or out): the same checks as below, without the general
    # machinery, so that tiny decode calls cost a few microseconds.
    if (attn_mask is None and key_lengths is None and query_lengths is None
            and alibi_slopes is None and out is None and return_weights is False
            and key_starts is None and window is None and softcap is None and sinks is None
            and k_scale is None and v_scale is None and type(q) is np.ndarray and type(k) is np.ndarray and type(v) is np.ndarray):
        dt = q.dtype
        if ((dt is _F32 or dt is _F64 or dt is _F16 or dt.name == "bfloat16")
                and k.dtype is dt and v.dtype is dt
                and q.ndim == 4 and k.ndim == 4 and v.ndim == 4
                and q.flags.aligned and k.flags.aligned and v.flags.aligned):
            B, H, Lq, D = q.shape
            Bk, Hkv, Lk, Dk = k.shape
            Bv, Hv, Lv, Dv = v.shape
            item = dt.itemsize
            if (Bk == B and Bv == B and Dk == D and Hv == Hkv and Lv == Lk and Hkv
                    and H % Hkv == 0 and q.strides[3] == item and k.strides[3] == item
                    and v.strides[3] == item and type(causal_alignment) is str
                    and causal_alignment in CAUSAL_ALIGNMENTS
                    and type(is_causal) is bool and (scale is None or type(scale) is float)):
                result = np.empty((B, H, Lq, Dv), dtype=dt)
                _kernels.scaled_dot_product_attention(
                    q, k, v, result,
                    scale=(1.0 / math.sqrt(D) if D else 1.0) if scale is None else scale,
                    is_causal=is_causal, alignment=CAUSAL_ALIGNMENTS[causal_alignment],
                    num_threads=resolve_num_threads(num_threads))
                return result

    backend = _backend.backend_for((q, k, v), ("q", "k", "v"))
    qa, ka, va = backend.asarray(q, "q"), backend.asarray(k, "k"), backend.asarray(v, "v")
    # narrow K/V (bfloat16, float16, int8 + scales) stay as they are on the
    # CPU: the kernel widens them in registers
    storage = None
    if backend is _backend.cpu_backend():
        storage = narrow_kv(qa, ka, va, k_scale, v_scale)
    elif k_scale is not None or v_scale is not None:
        raise TypeError("k_scale and v_scale (int8 k and v) are read on the CPU only; "
                        "got CUDA arrays for q, k, v")
    kv_code = None if storage is None else storage.code
    io16 = None if storage is None else storage.io_dtype  # 16-bit q and output
    dtype = attention_compute_dtype(qa, ka, va, storage)
    three_d, (B, H, Lq, D), (Hkv, Lk, Dv) = attention_geometry(qa.shape, ka.shape, va.shape)
    ksa = vsa = None
    if k_scale is not None:
        ksa = kv_scale_array(k_scale, "k_scale", (B, Hkv, Lk), three_d)
        vsa = kv_scale_array(v_scale, "v_scale", (B, Hkv, Lk), three_d)
    is_causal = bool_flag(is_causal, "is_causal")
    return_weights = bool_flag(return_weights, "return_weights")
    align = CAUSAL_ALIGNMENTS[choice(causal_alignment, "causal_alignment", CAUSAL_ALIGNMENTS)]
    scale = attention_scale(scale, D)
    lead = qa.shape[:-2]
    kl = lengths_view(backend.host(key_lengths, "key_lengths"), "key_lengths", lead, B, H, Lk, "key")
    ks = lengths_view(backend.host(key_starts, "key_starts"), "key_starts", lead, B, H, Lk, "key")
    window = window_pair(window)
    cap = softcap_value(softcap)
    sinks = sinks_array(backend.host(sinks, "sinks"), H, dtype)
    ql = lengths_view(backend.host(query_lengths, "query_lengths"), "query_lengths", lead, B, H,
                      Lq, "query")
    full = (B, H, Lq, Lk)
    user_full = full[:1] + full[2:] if three_d else full
    kind, mask4 = backend.attention_mask(attn_mask, user_full, full, dtype)
    slopes = None if alibi_slopes is None else alibi_slopes_array(
        backend.host(alibi_slopes, "alibi_slopes"), H, dtype)
    if kv_code is None:
        qa, ka, va = (backend.operand(qa, "q", dtype), backend.operand(ka, "k", dtype),
                      backend.operand(va, "v", dtype))
    else:
        qa, ka, va = (unit_last_axis(native_storage(x)) for x in (qa, ka, va))
        if io16 is None:
            qa = backend.operand(qa, "q", dtype)
    if three_d:
        qa, ka, va = (backend.unit_head_axis(x) for x in (qa, ka, va))
    out_shape = (B, Lq, Dv) if three_d else (B, H, Lq, Dv)
    inputs = tuple(x for x in (qa, ka, va, mask4, slopes, sinks, ksa, vsa) if x is not None)
    target = backend.output(out, out_shape, (B, H, Lq, Dv), dtype if io16 is None else io16,
                            inputs=inputs, unit_last_axis=True)
    weights = backend.empty(full, dtype) if return_weights else None
    left, right = (None, None) if window is None else window
    narrow = {} if kv_code is None else {"kv_dtype": kv_code, "k_scale": ksa, "v_scale": vsa}
    backend.attention(
        qa, ka, va, target.kernel_view, weights=weights, scale=float(scale), mask=mask4,
        mask_kind=kind, key_len=kl, query_len=ql, is_causal=is_causal, alignment=align,
        alibi_slopes=slopes, key_start=ks, window_left=left, window_right=right, softcap=cap,
        sinks=sinks, num_threads=resolve_num_threads(num_threads), **narrow)
    result = target.finish()
    if return_weights:
        # 16-bit inputs get their weights in their dtype, rounded once from float32
        weights = backend.result(weights if io16 is None else weights.astype(io16))
        return result, weights[:, 0] if three_d else weights
    return result
