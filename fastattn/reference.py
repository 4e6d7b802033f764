"""The NumPy oracle: plain, readable float64 versions of every public kernel.

This module is the specification. Each function has the same signature as
its fastattn counterpart, computes in float64 and returns the result cast to
the dtype fastattn would return. It builds masks explicitly (which the fast
kernels never do) so that the semantics can be read off directly:

* a bool ``attn_mask`` is True where a query may attend; a real one is added
  to the scaled scores;
* keys at or after ``key_lengths`` and keys after the causal diagonal are
  masked;
* a masked key gets probability exactly 0 (also in a row that a NaN in a
  valid score makes NaN); a row with no key left is all zeros; rows at or
  after ``query_lengths`` are all zeros.

16-bit mode: where fastattn keeps bfloat16 (``ml_dtypes.bfloat16``) or
float16 inputs in their dtype (``masked_softmax``, ``split_heads``,
``merge_heads``, ``apply_rotary``, ``scaled_dot_product_attention`` with
q, k and v of one such dtype, ``multi_head_attention`` with weights and
inputs of one such dtype), the oracle takes the inputs as the exact values
their 16-bit bits hold (inputs of another dtype are rounded to the 16-bit
dtype first, as fastattn's layer rounds them), computes in float64 and
rounds the result to the 16-bit dtype once, to nearest even. So an oracle
result is the correctly rounded exact answer, and a kernel's distance from
it is its own error plus at most half an ulp.
"""

import math

import numpy as np

from fastattn._validation import compute_dtype, is_half_dtype
from fastattn.kv_quant import narrow_kv


def _half_of(*arrays):
    """The 16-bit dtype all ``arrays`` share (None when they do not)."""
    dtypes = {np.dtype(a.dtype) for a in arrays}
    if len(dtypes) == 1:
        (dt,) = dtypes
        if is_half_dtype(dt):
            return dt
    return None


def _result_dtype(x, name):
    """A one-input function's result dtype: 16-bit kept, else compute_dtype."""
    return x.dtype if is_half_dtype(x.dtype) else compute_dtype(x.dtype, name)


def _lengths_grid(lengths, lead_shape):
    """Lengths of shape (B,) or lead_shape, broadcast to lead_shape."""
    arr = np.asarray(lengths, dtype=np.int64)
    if arr.shape == tuple(lead_shape):
        return arr
    return arr.reshape((arr.shape[0],) + (1,) * (len(lead_shape) - 1))


def attention_mask(shape, *, attn_mask=None, key_lengths=None, is_causal=False,
                   causal_alignment="top_left", key_starts=None, window=None):
    """The bool "may attend" mask of shape ``(..., Lq, Lk)`` that the fast
    kernels apply implicitly (an additive float ``attn_mask`` is not part
    of it). Query ``i`` sits at ``i_pos = i`` (top_left) or
    ``i + Lk - Lq`` (bottom_right); ``window = (left, right)`` keeps keys
    ``i_pos - left <= j <= i_pos + right`` (None: that side unbounded);
    ``key_starts`` masks keys ``j < start``."""
    *lead, Lq, Lk = shape
    allowed = np.ones(shape, dtype=bool)
    if attn_mask is not None and np.asarray(attn_mask).dtype == bool:
        allowed &= np.broadcast_to(attn_mask, shape)
    j = np.arange(Lk)
    if key_lengths is not None:
        allowed &= j < _lengths_grid(key_lengths, lead)[..., None, None]
    if key_starts is not None:
        allowed &= j >= _lengths_grid(key_starts, lead)[..., None, None]
    i_pos = np.arange(Lq)[:, None] + (0 if causal_alignment == "top_left" else Lk - Lq)
    if is_causal:
        allowed &= j[None, :] <= i_pos
    if window is not None:
        left, right = window
        if left is not None:
            allowed &= j[None, :] >= i_pos - left
        if right is not None:
            allowed &= j[None, :] <= i_pos + right
    return allowed


def masked_softmax(scores, *, attn_mask=None, key_lengths=None, query_lengths=None,
                   is_causal=False, causal_alignment="top_left", scale=1.0, out=None,
                   num_threads=None):
    """softmax(scale * scores + additive mask) over the last axis, with masked
    keys at exactly 0, empty rows and padded query rows all zero."""
    scores = np.asarray(scores)
    p = _softmax64(scores.astype(np.float64) * scale, attn_mask, key_lengths, query_lengths,
                   is_causal, causal_alignment)
    return _finish(p.astype(_result_dtype(scores, "scores")), out)


def _softmax64(s, attn_mask, key_lengths, query_lengths, is_causal, causal_alignment,
               key_starts=None, window=None, sinks=None):
    """The masked softmax of float64 scaled scores ``s``, in float64.
    ``sinks`` (broadcast against ``s.shape[:-1] + (1,)``) are extra logits in
    each row's denominator, with no value: the max ``m`` covers the row's
    scores and the sink, the denominator adds ``exp(sink - m)``. A row with
    no visible key stays all zero."""
    if attn_mask is not None and np.asarray(attn_mask).dtype != bool:
        s = s + np.asarray(attn_mask, dtype=np.float64)
    allowed = attention_mask(s.shape, attn_mask=attn_mask, key_lengths=key_lengths,
                             is_causal=is_causal, causal_alignment=causal_alignment,
                             key_starts=key_starts, window=window)
    s = np.where(allowed, s, -np.inf)
    row_max = s.max(axis=-1, keepdims=True, initial=-np.inf)  # Lk = 0: every row empty
    empty = row_max == -np.inf
    if sinks is not None:
        sinks = np.broadcast_to(sinks, row_max.shape)
        row_max = np.maximum(row_max, sinks)
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(s - np.where(empty, 0.0, row_max))
        e = np.where(allowed, e, 0.0)
        denominator = e.sum(axis=-1, keepdims=True)
        if sinks is not None:
            denominator = denominator + np.exp(sinks - np.where(empty, 0.0, row_max))
        p = e / denominator
    p = np.where(empty, 0.0, p)
    p = np.where(allowed, p, 0.0)  # masked keys are exactly 0, even in a NaN row
    if query_lengths is not None:
        ql = _lengths_grid(query_lengths, s.shape[:-2])
        padded = np.arange(s.shape[-2])[:, None] >= ql[..., None, None]
        p = np.where(padded, 0.0, p)
    return p


def scaled_dot_product_attention(q, k, v, *, attn_mask=None, key_lengths=None,
                                 query_lengths=None, is_causal=False,
                                 causal_alignment="top_left", scale=None, alibi_slopes=None,
                                 return_weights=False, out=None, num_threads=None,
                                 key_starts=None, window=None, softcap=None, sinks=None,
                                 k_scale=None, v_scale=None):
    """softmax(Q Kᵀ · scale + ALiBi + masks) V, in float64, with the masks
    of :func:`masked_softmax`. Soft-capping replaces each scaled score ``s``
    by ``softcap * tanh(s / softcap)`` first; ``window``, ``key_starts``
    and ``sinks`` as in :func:`attention_mask` and :func:`_softmax64`.
    Narrow K/V (bfloat16, float16 with float32 q, int8 with ``k_scale``,
    ``v_scale``) are read as their exact values (int8: ``values * scale``)
    and give a float32 result."""
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    if _half_of(q, k, v) is not None and k_scale is None and v_scale is None:
        dtype = q.dtype  # 16-bit mode: exact inputs, one rounding of the result
    elif narrow_kv(q, k, v, k_scale, v_scale) is not None:  # fastattn's dtype rule
        dtype = np.dtype(np.float32)
        q = q.astype(np.float32)
        if k_scale is not None:
            k = k.astype(np.float64) * np.asarray(k_scale, np.float64)[..., None]
            v = v.astype(np.float64) * np.asarray(v_scale, np.float64)[..., None]
        k, v = k.astype(np.float64), v.astype(np.float64)
    else:
        dtype = np.result_type(compute_dtype(q.dtype, "q"), compute_dtype(k.dtype, "k"),
                               compute_dtype(v.dtype, "v"))
    three_d = q.ndim == 3
    if three_d:
        if attn_mask is not None:  # broadcast to (B, Lq, Lk), then add the head axis
            attn_mask = np.broadcast_to(attn_mask, (q.shape[0], q.shape[1], k.shape[1]))[:, None]
        q, k, v = q[:, None], k[:, None], v[:, None]
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    H, Hkv = q.shape[1], k.shape[1]
    # grouped-query attention: query head h reads kv head h // (H // Hkv)
    k = np.repeat(k, H // Hkv, axis=1)
    v = np.repeat(v, H // Hkv, axis=1)
    Lq, Lk, D = q.shape[2], k.shape[2], q.shape[3]
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D else 1.0
    scores = (q @ k.swapaxes(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * np.tanh(scores / softcap)
    if attn_mask is not None and np.asarray(attn_mask).dtype != bool:
        scores = scores + np.asarray(attn_mask, dtype=np.float64)
        attn_mask = None
    if alibi_slopes is not None:
        i_pos = np.arange(Lq)[:, None] + (Lk - Lq if causal_alignment == "bottom_right" else 0)
        distance = i_pos - np.arange(Lk)[None, :]
        scores = scores - np.asarray(alibi_slopes, np.float64)[None, :, None, None] * distance
    lead = (q.shape[0], H)
    kl = None if key_lengths is None else np.broadcast_to(_lengths_grid(key_lengths, lead), lead)
    ql = None if query_lengths is None else np.broadcast_to(_lengths_grid(query_lengths, lead), lead)
    ks = None if key_starts is None else np.broadcast_to(_lengths_grid(key_starts, lead), lead)
    sink = None if sinks is None else np.asarray(sinks, np.float64).reshape(1, H, 1, 1)
    weights = _softmax64(scores, attn_mask, kl, ql, is_causal, causal_alignment, ks, window, sink)
    result = weights @ v
    if three_d:
        result, weights = result[:, 0], weights[:, 0]
    result = _finish(result.astype(dtype), out)
    return (result, weights.astype(dtype)) if return_weights else result


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, is_causal=False,
                     causal_alignment="top_left", window=None, softcap=None, sinks=None,
                     scale=None, alibi_slopes=None, out=None, num_threads=None):
    """Each packed sequence through :func:`scaled_dot_product_attention` on
    its own: sequence ``b`` is query rows ``cu_q[b]:cu_q[b+1]`` and key rows
    ``cu_k[b]:cu_k[b+1]`` of the ``(total, heads, dim)`` arrays."""
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    dtype = np.result_type(compute_dtype(q.dtype, "q"), compute_dtype(k.dtype, "k"),
                           compute_dtype(v.dtype, "v"))
    cu_q, cu_k = np.asarray(cu_seqlens_q), np.asarray(cu_seqlens_k)
    result = np.zeros((q.shape[0], q.shape[1], v.shape[2]), np.float64)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[2]) if q.shape[2] else 1.0
    for b in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if qs.stop == qs.start:
            continue
        seq = scaled_dot_product_attention(
            q[qs].transpose(1, 0, 2)[None].astype(np.float64),
            k[ks].transpose(1, 0, 2)[None].astype(np.float64),
            v[ks].transpose(1, 0, 2)[None].astype(np.float64),
            is_causal=is_causal, causal_alignment=causal_alignment, window=window,
            softcap=softcap, sinks=sinks, scale=scale, alibi_slopes=alibi_slopes)
        result[qs] = seq[0].transpose(1, 0, 2)
    return _finish(result.astype(dtype), out)


def paged_attention(q, key_cache, value_cache, block_tables, seq_lens, *, is_causal=False,
                    window=None, softcap=None, sinks=None, scale=None, alibi_slopes=None,
                    out=None, num_threads=None):
    """Each sequence's keys gathered from the paged cache (token ``t`` at
    ``cache[block_tables[b, t // block_size], t % block_size]``) and run
    through :func:`scaled_dot_product_attention` with bottom-right
    alignment: query ``i`` sits at ``seq_lens[b] - Lq + i``."""
    q, kc, vc = np.asarray(q), np.asarray(key_cache), np.asarray(value_cache)
    dtype = np.result_type(compute_dtype(q.dtype, "q"), compute_dtype(kc.dtype, "key_cache"),
                           compute_dtype(vc.dtype, "value_cache"))
    tables, lens = np.asarray(block_tables), np.asarray(seq_lens)
    block_size = kc.shape[1]
    B, H, Lq, _ = q.shape
    result = np.zeros((B, H, Lq, vc.shape[3]), np.float64)
    for b in range(B):
        t = np.arange(lens[b])
        blocks = tables[b, t // block_size]
        k = kc[blocks, t % block_size].transpose(1, 0, 2)[None].astype(np.float64)
        v = vc[blocks, t % block_size].transpose(1, 0, 2)[None].astype(np.float64)
        result[b] = scaled_dot_product_attention(
            q[b:b + 1].astype(np.float64), k, v, is_causal=is_causal,
            causal_alignment="bottom_right", window=window, softcap=softcap, sinks=sinks,
            scale=scale, alibi_slopes=alibi_slopes)[0]
    return _finish(result.astype(dtype), out)


def sequence_mask(lengths, maxlen=None, dtype=bool):
    lengths = np.asarray(lengths)
    if maxlen is None:
        maxlen = int(lengths.max()) if lengths.size else 0
    return (np.arange(maxlen) < lengths[..., None]).astype(dtype)


def apply_sequence_mask(x, lengths, *, mode="mul", axis=1, out=None, num_threads=None):
    x = np.asarray(x)
    dtype = compute_dtype(x.dtype, "x")
    axis %= x.ndim
    lengths = np.asarray(lengths).reshape(-1)
    mask = sequence_mask(lengths, x.shape[axis], dtype=np.float64)  # (B, L)
    mask = mask.reshape(mask.shape[:1] + (1,) * (axis - 1) + mask.shape[1:] + (1,) * (x.ndim - axis - 1))
    x64 = x.astype(np.float64)
    if mode == "mul":
        y = x64 * mask
    else:
        y = x64 - (1.0 - mask) * 1e12
    return _finish(y.astype(dtype), out)


def split_heads(x, num_heads, *, out=None, num_threads=None):
    x = np.asarray(x)
    B, S, E = x.shape
    D = E // num_heads
    y = x.reshape(B, S, num_heads, D).transpose(0, 2, 1, 3)
    return _finish(np.ascontiguousarray(y, dtype=_result_dtype(x, "x")), out)


def merge_heads(x, *, out=None, num_threads=None):
    x = np.asarray(x)
    B, H, S, D = x.shape
    y = x.transpose(0, 2, 1, 3).reshape(B, S, H * D)
    return _finish(np.ascontiguousarray(y, dtype=_result_dtype(x, "x")), out)


def _inverse_timescales(channels, layout, min_timescale, max_timescale):
    if min_timescale > max_timescale:  # as fastattn: a reversed pair is refused
        raise ValueError(
            f"min_timescale must be <= max_timescale, got min_timescale={min_timescale!r} "
            f"and max_timescale={max_timescale!r}"
        )
    if layout == "concat":
        n = channels // 2
        increment = math.log(max_timescale / min_timescale) / max(n - 1, 1)
        return min_timescale * np.exp(-np.arange(n, dtype=np.float64) * increment)
    n = (channels + 1) // 2
    ratio = max_timescale / min_timescale
    return min_timescale * ratio ** (-2.0 * np.arange(n, dtype=np.float64) / channels)


def sinusoidal_position_encoding(length, channels, *, layout="concat", min_timescale=1.0,
                                 max_timescale=1.0e4, start_index=0, dtype=np.float32,
                                 out=None, num_threads=None):
    position = start_index + np.arange(length, dtype=np.float64)
    inv = _inverse_timescales(channels, layout, min_timescale, max_timescale)
    angle = position[:, None] * inv[None, :]
    table = np.zeros((length, channels), dtype=np.float64)
    if layout == "concat":
        n = channels // 2
        table[:, :n] = np.sin(angle)
        table[:, n:2 * n] = np.cos(angle)
    else:
        table[:, 0::2] = np.sin(angle)
        table[:, 1::2] = np.cos(angle[:, : channels // 2])
    return _finish(table.astype(dtype), out)


def add_position_encoding(x, *, layout="concat", start_index=0, min_timescale=1.0,
                          max_timescale=1.0e4, out=None, num_threads=None):
    x = np.asarray(x)
    dtype = compute_dtype(x.dtype, "x")
    L, C = x.shape[-2:]
    table = sinusoidal_position_encoding(L, C, layout=layout, min_timescale=min_timescale,
                                         max_timescale=max_timescale, start_index=start_index,
                                         dtype=np.float64)
    return _finish((x.astype(np.float64) + table).astype(dtype), out)


def _finish(result, out):
    if out is None:
        return result
    out[...] = result
    return out


# ---- the multi-head attention layer (issue 4): RoPE, ALiBi slopes, the layer ----

def apply_rotary(x, positions, *, layout="neox", base=10000.0, out=None, num_threads=None):
    """RoPE: rotate the pairs (j, j + D/2) ("neox") or (2j, 2j + 1) ("gptj")
    of each row by the angles ``position * base ** (-2j / D)``."""
    x = np.asarray(x)
    dtype = _result_dtype(x, "x")
    D = x.shape[-1]
    half = D // 2
    inv = base ** (-np.arange(0, D, 2, dtype=np.float64) / D)
    angle = np.asarray(positions, dtype=np.float64)[..., None] * inv
    c, s = np.cos(angle), np.sin(angle)
    x64 = x.astype(np.float64)
    if layout == "neox":
        a, b = x64[..., :half], x64[..., half:]
        y = np.concatenate(np.broadcast_arrays(a * c - b * s, b * c + a * s), axis=-1)
    else:
        a, b = x64[..., 0::2], x64[..., 1::2]
        y = np.empty(np.broadcast_shapes(x64.shape, angle.shape[:-1] + (D,)))
        y[..., 0::2] = a * c - b * s
        y[..., 1::2] = b * c + a * s
    return _finish(y.astype(dtype), out)


def alibi_slopes(num_heads, *, dtype=np.float64):
    """The ALiBi slopes, as the reference code of Press et al. computes them."""

    def power_of_2(n):
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        return [start * start ** i for i in range(n)]

    def slopes(n):
        if math.log2(n).is_integer():
            return power_of_2(n)
        closest = 2 ** math.floor(math.log2(n))
        return power_of_2(closest) + slopes(2 * closest)[0::2][: n - closest]

    return np.array(slopes(num_heads), dtype=dtype)


def multi_head_attention(params, query, key=None, value=None, *, num_heads, num_kv_heads=None,
                         key_lengths=None, query_lengths=None, attn_mask=None, is_causal=False,
                         rope=None, rope_base=10000.0, return_weights=False):
    """The layer, step by step in float64. ``params`` holds ``w_q, w_k,
    w_v, w_o`` ((in, out) layout) and ``b_q, b_k, b_v, b_o`` (or None), as
    ``MultiHeadAttention.state_dict()`` returns them; the result has the
    weights' dtype.

    x @ w + b per projection, heads split, RoPE on Q and K at positions
    0..L-1, :func:`scaled_dot_product_attention` (with the masks, GQA),
    heads merged, @ w_o + b_o, and rows at or after ``query_lengths`` set
    to 0."""
    names = ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o")
    p = {n: None if params.get(n) is None else np.asarray(params[n]) for n in names}
    half = _half_of(*(a for a in p.values() if a is not None))
    if half is not None:
        dtype = half  # 16-bit mode: inputs rounded to the weights' dtype
        query, key, value = (None if a is None else np.asarray(a).astype(half)
                             for a in (query, key, value))
    else:
        dtype = np.result_type(*(compute_dtype(p[n].dtype, n) for n in names if p[n] is not None))
    p = {n: None if a is None else a.astype(np.float64) for n, a in p.items()}
    x = np.asarray(query).astype(np.float64)
    kx = x if key is None else np.asarray(key).astype(np.float64)
    vx = x if value is None else np.asarray(value).astype(np.float64)
    H = num_heads
    Hkv = H if num_kv_heads is None else num_kv_heads

    def project(a, w, b):
        y = a @ p[w]
        return y if p[b] is None else y + p[b]

    def split(y, heads):
        # each projection's own head dim: the value head dim may differ from D
        B, L, width = y.shape
        return y.reshape(B, L, heads, width // heads).transpose(0, 2, 1, 3)

    q = split(project(x, "w_q", "b_q"), H)
    k = split(project(kx, "w_k", "b_k"), Hkv)
    v = split(project(vx, "w_v", "b_v"), Hkv)
    B, _, Lq, _ = q.shape
    if rope is not None:
        q = apply_rotary(q, np.arange(Lq), layout=rope, base=rope_base)
        k = apply_rotary(k, np.arange(k.shape[2]), layout=rope, base=rope_base)
    o, weights = scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, key_lengths=key_lengths,
                                              query_lengths=query_lengths, is_causal=is_causal,
                                              return_weights=True)
    y = project(o.transpose(0, 2, 1, 3).reshape(B, Lq, H * o.shape[-1]), "w_o", "b_o")
    if query_lengths is not None:
        padded = np.arange(Lq)[None, :] >= np.asarray(query_lengths).reshape(B, 1)
        y[padded] = 0.0
    y = y.astype(dtype)
    return (y, weights.astype(dtype)) if return_weights else y


def quantize_kv(x, *, num_threads=None):
    """Symmetric int8 per row of the last axis, in float32 as fastattn
    computes it: ``scale = max|x| / 127``, ``values = rint(x / scale)``
    (half to even); a zero row gets scale 0 and values 0; a row with NaN a
    NaN scale and values 0, one with inf an inf scale and values 0."""
    x = np.asarray(x)
    x = x.astype(np.float32)
    if x.ndim == 0:
        raise ValueError("x must have at least one axis")
    a = np.abs(x)
    amax = a.max(axis=-1, initial=np.float32(0)) if x.shape[-1] else np.zeros(x.shape[:-1], np.float32)
    amax = np.where(np.isnan(a).any(axis=-1), np.float32(np.nan), amax).astype(np.float32)
    scales = (amax / np.float32(127)).astype(np.float32)
    usable = (scales > 0) & np.isfinite(scales)
    safe = np.where(usable, scales, np.float32(1)).astype(np.float32)
    with np.errstate(invalid="ignore"):
        q = np.rint(x / safe[..., None])
    q = np.where(usable[..., None], np.clip(q, -127, 127), 0)
    return q.astype(np.int8), scales


def dequantize_kv(values, scales, *, num_threads=None):
    """``values * scales[..., None]`` in float32."""
    values = np.asarray(values)
    scales = np.asarray(scales, np.float32)
    return values.astype(np.float32) * scales[..., None]
