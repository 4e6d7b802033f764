"""The CPU backend: the kernel table over fastattn._kernels on NumPy arrays.

Every backend module exposes the same kernels with the same signatures
(tests/test_cuda.py compares them); the public functions validate their
arguments once, in backend-neutral code, and then call these. A kernel here
receives arrays that are already checked and laid out as it needs them
(see each docstring) and only hands them to C.

The array helpers below (``asarray``, ``operand``, ``empty``, ``output``,
...) are what the neutral code needs to bring user arrays into that form on
this backend.
"""

import numpy as np

from fastattn import _kernels
from fastattn._validation import (
    OutputTarget,
    as_array,
    broadcast_source,
    float_array,
    unit_last_axis,
)
from fastattn.masks import prepare_mask
from fastattn.rotary import rope_tables

# bfloat16 and float16 stay 16-bit in masked_softmax, split/merge_heads and
# apply_rotary (float32 arithmetic, results rounded to the dtype)
HALF_DTYPES = True

# ---- kernels ------------------------------------------------------------------------

# q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), out (B, H, Lq, Dv) with
# unit last-axis strides; the keywords are the fields of fa_attention_args.
attention = _kernels.scaled_dot_product_attention


def masked_softmax(x, y, *, scale, mask=None, mask_kind=_kernels.MASK_NONE, key_len=None,
                   query_len=None, causal, num_threads):
    """x, y (B, M, Lq, Lk); mask a (B, M, Lq, Lk) broadcast view of kind
    ``mask_kind``; key_len, query_len host (B, M) int64 views; causal the
    C causal code (0: none)."""
    _kernels.masked_softmax(x, y, scale, mask, mask_kind, key_len, query_len, causal, num_threads)


def split_heads(x, y, *, num_threads):
    """x (B, S, H, D) any strides; y C-contiguous (B, H, S, D)."""
    _kernels.split_heads(x, y, num_threads)


def merge_heads(x, y, *, num_threads):
    """x (B, H, S, D) any strides; y C-contiguous (B, S, H*D)."""
    _kernels.merge_heads(x, y, num_threads)


def position_table(out, *, layout, min_timescale, max_timescale, start_index, num_threads):
    """out (length, channels) with a unit column stride; layout a PE code."""
    _kernels.position_encoding(out, layout, min_timescale, max_timescale, start_index, num_threads)


def add_position(x, y, *, layout, min_timescale, max_timescale, start_index, num_threads):
    """x, y (B, length, channels) views."""
    _kernels.add_position_encoding(x, y, layout, min_timescale, max_timescale, start_index,
                                   num_threads)


def rotary(x, y, *, positions, layout, base, num_threads):
    """x, y (N0, N1, L, D) views, y with a unit last stride; positions a host
    int64 (N0, N1, L) view, zero strides where broadcast; layout a RoPE code."""
    if y.size == 0:
        return
    if x.shape[-1] > 1 and x.strides[-1] != x.itemsize:
        x = np.ascontiguousarray(x)
    # one table row per distinct position; elements that share a position
    # share its row through zero strides in the index
    source = broadcast_source(positions)
    cos, sin = rope_tables(source, x.shape[-1] // 2, base, x.dtype, num_threads)
    index = np.arange(source.size, dtype=np.int64).reshape(source.shape)
    _kernels.rope_apply(x, y, np.broadcast_to(index, positions.shape), cos, sin, layout, None,
                        None, num_threads)


def cache_append(src, cache, *, start, rows, num_threads):
    """src (B, M, L, C) with a unit last stride; cache (B, M, max_len, C) of
    its dtype; start, rows contiguous host int64 (B,): row i < rows[b] of
    src[b] becomes cache row start[b] + i (rows past max_len are dropped
    by the caller's checks)."""
    _kernels.rope_apply(src, cache, None, None, None, _kernels.ROPE_NONE, start, rows, num_threads)


def linear(a, w, c, *, bias=None, row_start=None, row_stop=None, alpha=1.0, rope=None,
           num_threads, deterministic=True):
    """c = alpha * a @ w + bias: a (B, M, K), w (K, N), c (B, M, N) of one
    dtype with unit last strides; bias None or (N,); row_start, row_stop
    None or contiguous host int64 (B,) (rows outside them are not written);
    rope None or the RoPE epilogue (layout, heads, D, index, cos, sin);
    deterministic: blocks fixed by the shapes, so every thread count gives
    the same bits."""
    _kernels.linear(a, w, c, bias, row_start, row_stop, alpha, num_threads, rope, deterministic)


KERNELS = ("attention", "masked_softmax", "split_heads", "merge_heads", "position_table",
           "add_position", "rotary", "cache_append", "linear")

# ---- array helpers ------------------------------------------------------------------


def asarray(x, name):
    """``x`` as this backend's array (no copy when it already is one)."""
    return as_array(x, name)


def host(values, name):
    """Small per-call data (lengths, slopes, sinks) as the host sees it."""
    return values


def operand(a, name, dtype):
    """``a`` in ``dtype`` with a contiguous last axis, as the attention
    kernel reads it."""
    return unit_last_axis(float_array(a, name, dtype))


def kernel_input(x, name, dtype, kernel_shape):
    """``(x in dtype, its view of kernel_shape)``; copies only when the dtype
    changes or the view needs one."""
    x = float_array(x, name, dtype)
    return x, x.reshape(kernel_shape)


def unit_head_axis(a):
    """A 3-D ``(B, L, D)`` array as the ``(B, 1, L, D)`` view of one head."""
    return a[:, None]


def attention_mask(attn_mask, user_shape, kernel_shape, dtype):
    """``(kind, view)`` of a user ``attn_mask`` broadcast to ``user_shape``
    and viewed as ``kernel_shape``: ``(0, None)`` without one."""
    return prepare_mask(attn_mask, user_shape, kernel_shape, dtype)


def empty(shape, dtype):
    return np.empty(shape, dtype=dtype)


def output(out, shape, kernel_shape, dtype, inputs=(), inplace_ok=(), contiguous=False,
           unit_last_axis=False):
    """Where a kernel writes: ``.kernel_view`` (``kernel_shape``, C-contiguous
    or with a unit last stride when asked), then ``.finish()`` returns
    ``out`` or a new array of ``shape``."""
    return OutputTarget(out, shape, kernel_shape, dtype, inputs=inputs, inplace_ok=inplace_ok,
                        contiguous=contiguous, unit_last_axis=unit_last_axis)


def result(a):
    """A buffer made by :func:`empty` as the array returned to the user."""
    return a
