"""Attention over packed variable-length batches (flash-attn's varlen layout)."""


import numpy as np

from fastattn import _kernels
from fastattn._config import resolve_num_threads
from fastattn._features import kernel_features
from fastattn._validation import (
    OutputTarget,
    as_array,
    bool_flag,
    choice,
    unit_last_axis,
)
from fastattn.attention import attention_scale
from fastattn.kv_quant import kernel_operands, narrow_kv
from fastattn.masks import CAUSAL_ALIGNMENTS


def _cu_seqlens(values, name, total, batch=None):
    """(B+1,) int64 prefix sums: integers, 1-D, starting at 0, never
    decreasing, ending at ``total``."""
    arr = as_array(values, name)
    if arr.size == 0 and not isinstance(values, np.ndarray):
        arr = arr.astype(np.int64)  # [] is float64 to NumPy
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be int32 or int64 prefix sums, got dtype {arr.dtype}")
    if arr.ndim != 1 or arr.shape[0] < 1:
        raise ValueError(f"{name} must have shape (B + 1,), got {arr.shape}")
    if batch is not None and arr.shape[0] != batch + 1:
        raise ValueError(
            f"{name} must have shape ({batch + 1},) like cu_seqlens_q, got {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if arr[0] != 0:
        raise ValueError(f"{name} must start at 0, got {arr[0]}")
    steps = np.diff(arr)
    if steps.size and steps.min() < 0:
        at = int(np.argmin(steps))
        raise ValueError(f"{name} must not decrease; {name}[{at + 1}] = {arr[at + 1]} < "
                         f"{name}[{at}] = {arr[at]}")
    if arr[-1] != total:
        raise ValueError(f"{name} must end at the total number of rows {total}, got {arr[-1]}")
    return arr


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, is_causal=False,
                     causal_alignment="top_left", window=None, softcap=None, sinks=None,
                     scale=None, alibi_slopes=None, out=None, num_threads=None):
    """Attention over a packed batch of variable-length sequences, with no
    padding anywhere (flash-attn's ``flash_attn_varlen_func`` layout).

    Sequence ``b`` is query rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``
    attending to key rows ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``; each runs
    as ``scaled_dot_product_attention`` would on it alone, with its dtypes:
    bfloat16 or float16 q, k, v give a result of their dtype (float32
    inside), and bfloat16 or float16 k, v are read as they are beside
    float32 q. The work is split
    into (sequence, head, query chunk) items of the same fused kernel and
    balanced across threads by tokens, longest items first. Results are
    bitwise identical for every ``num_threads``.

    Parameters
    ----------
    q : array_like, shape ``(total_q, H, D)``
    k : array_like, shape ``(total_k, Hkv, D)``
        ``H % Hkv == 0`` (grouped-query attention).
    v : array_like, shape ``(total_k, Hkv, Dv)``
    cu_seqlens_q, cu_seqlens_k : array_like of int32 or int64, shape ``(B + 1,)``
        Prefix sums of the sequence lengths: start at 0, never decrease, end
        at ``total_q`` / ``total_k``. Empty sequences are allowed.
    is_causal : bool
    causal_alignment : {"top_left", "bottom_right"}
        Per sequence: query ``i`` sits at ``i_pos = i`` or
        ``i + Lk_b - Lq_b``.
    window, softcap, sinks, scale, alibi_slopes
        As in :func:`fastattn.scaled_dot_product_attention`.
    out : ndarray, optional, shape ``(total_q, H, Dv)``
    num_threads : int, optional

    Returns
    -------
    out : ndarray ``(total_q, H, Dv)``

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> rng = np.random.default_rng(0)
    >>> cu = np.array([0, 3, 3, 8])               # lengths 3, 0 and 5
    >>> q, k, v = (rng.standard_normal((8, 2, 16), dtype=np.float32) for _ in range(3))
    >>> fastattn.varlen_attention(q, k, v, cu, cu, is_causal=True).shape
    (8, 2, 16)
    """
    qa, ka, va = (as_array(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v")))
    # 16-bit q, k, v (a 16-bit result) and narrow k, v beside float32 q, as
    # for scaled_dot_product_attention; int8 takes per-row scales, which
    # packed batches do not
    if ka.dtype == np.int8 or va.dtype == np.int8:
        raise TypeError(f"varlen_attention reads float, bfloat16 and float16 k and v; int8 "
                        f"caches (with their scales) are read by scaled_dot_product_attention "
                        f"and paged_attention; got k {ka.dtype}, v {va.dtype}")
    storage = narrow_kv(qa, ka, va, None, None)
    kv_code = None if storage is None else storage.code
    io16 = None if storage is None else storage.io_dtype
    qa, ka, va, dtype = kernel_operands(qa, ka, va, storage)
    if qa.ndim != 3 or ka.ndim != 3 or va.ndim != 3:
        raise ValueError("q, k and v must be 3-D (total, heads, dim); got shapes "
                         f"q {qa.shape}, k {ka.shape}, v {va.shape}")
    total_q, H, D = qa.shape
    total_k, Hkv, Dk = ka.shape
    if Dk != D:
        raise ValueError(f"q and k must have the same head dim; got q {qa.shape}, k {ka.shape}")
    if va.shape[:2] != (total_k, Hkv):
        raise ValueError(f"k and v must have the same rows and heads; got k {ka.shape}, v {va.shape}")
    Dv = va.shape[2]
    if Hkv == 0 and H > 0 or Hkv and H % Hkv:
        raise ValueError(f"the number of query heads ({H}) must be a multiple of the kv heads "
                         f"({Hkv}); got q {qa.shape}, k {ka.shape}")
    cu_q = _cu_seqlens(cu_seqlens_q, "cu_seqlens_q", total_q)
    cu_k = _cu_seqlens(cu_seqlens_k, "cu_seqlens_k", total_k, batch=cu_q.shape[0] - 1)
    is_causal = bool_flag(is_causal, "is_causal")
    align = CAUSAL_ALIGNMENTS[choice(causal_alignment, "causal_alignment", CAUSAL_ALIGNMENTS)]
    scale = attention_scale(scale, D)
    features = kernel_features(window, softcap, sinks, alibi_slopes, H, dtype)
    qa, ka, va = unit_last_axis(qa), unit_last_axis(ka), unit_last_axis(va)
    inputs = tuple(x for x in (qa, ka, va, features.alibi_slopes, features.sinks)
                   if x is not None)
    target = OutputTarget(out, (total_q, H, Dv), (total_q, H, Dv),
                          dtype if io16 is None else io16, inputs=inputs, unit_last_axis=True)
    left, right = (None, None) if features.window is None else features.window
    _kernels.varlen_attention(qa, ka, va, target.kernel_view, cu_q=cu_q, cu_k=cu_k,
                              scale=float(scale), is_causal=is_causal, alignment=align,
                              alibi_slopes=features.alibi_slopes, window_left=left,
                              window_right=right, softcap=features.softcap, sinks=features.sinks,
                              num_threads=resolve_num_threads(num_threads),
                              kv_dtype=kv_code or 0)
    return target.finish()
