"""torch CPU tensors <-> NumPy arrays without copies, and the one kernel call
that every torch-facing path of fastattn goes through.

A torch CPU tensor and the array from ``Tensor.numpy()`` share memory, with
the tensor's strides, so the (B, H, L, D) query/key/value views that
transformers passes (transposes of its (B, L, H, D) projections) reach the
kernel as strided arrays; the kernel writes its output through ``out=``
straight into a torch tensor allocated in transformers' (B, Lq, H, Dv)
layout, seen as a (B, H, Lq, Dv) strided view.

Low precision: bfloat16 and float16 tensors cross as they are (bfloat16 as
its int16 bit pattern reinterpreted as ``ml_dtypes.bfloat16``, no copy) and
the kernel writes a 16-bit output, computing in float32 inside.
"""

import numpy as np
import torch

import fastattn

_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def kernel_dtype(dtype):
    """The torch dtype the kernel reads a tensor of ``dtype`` in."""
    return dtype if dtype in _KERNEL_DTYPES else torch.float32


def as_numpy(t, dtype):
    """``t`` as a NumPy array of torch dtype ``dtype``: a view of the same
    memory when ``t`` already has that dtype, else one conversion."""
    if not t.is_cpu:
        raise ValueError(f"fastattn's CPU kernels need CPU tensors, got a tensor on {t.device}")
    if t.requires_grad:  # .numpy() refuses it; detach() would cost 0.4 us a tensor otherwise
        t = t.detach()
    if t.dtype != dtype:
        t = t.to(dtype)
    return bf16_view(t) if dtype == torch.bfloat16 else t.numpy()


def to_torch(a):
    """A NumPy array (bfloat16 included) as a torch tensor sharing its memory."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def bf16_view(t):
    """A bfloat16 CPU tensor as an ``ml_dtypes.bfloat16`` NumPy array sharing
    its memory: torch cannot export bfloat16 to NumPy, so it crosses as its
    int16 bit pattern and is reinterpreted on the NumPy side."""
    import ml_dtypes

    if t.dtype != torch.bfloat16:
        raise TypeError(f"bf16_view needs a bfloat16 tensor, got {t.dtype}")
    return t.detach().view(torch.int16).numpy().view(ml_dtypes.bfloat16)


def attention(query, key, value, *, attn_mask=None, key_lengths=None, query_lengths=None,
              key_starts=None, window=None, softcap=None, sinks=None, is_causal=False,
              scale=None, return_weights=False):
    """fastattn's SDPA on torch tensors, the output in transformers' layout.

    query (B, H, Lq, D), key (B, Hkv, Lk, D), value (B, Hkv, Lk, Dv): any
    strides. ``attn_mask``, ``key_lengths``, ``query_lengths``, ``key_starts``: NumPy arrays
    (or None) as :func:`fastattn.scaled_dot_product_attention` takes them.
    Causal masking is bottom-right aligned (query i sits at ``i + Lk - Lq``,
    so a decode step's query sees the whole cache).

    Returns ``(out (B, Lq, H, Dv), weights (B, H, Lq, Lk) or None)`` in
    ``query``'s dtype.
    """
    dtype = query.dtype
    compute = kernel_dtype(dtype)
    q, k, v = (as_numpy(t, compute) for t in (query, key, value))
    B, H, Lq, _ = q.shape
    Dv = v.shape[3]
    # NumPy allocates the output: torch's CPU allocator returns each large
    # block to the system and faults its pages in again on the next call (a
    # tenth of the kernel time at BERT shapes), where malloc keeps reusing
    # the freed heap
    out_np = np.empty((B, Lq, H, Dv), dtype=q.dtype)
    result = fastattn.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, key_lengths=key_lengths, query_lengths=query_lengths,
        key_starts=key_starts, window=window, softcap=softcap, sinks=sinks,
        is_causal=is_causal, causal_alignment="bottom_right",
        scale=None if scale is None else float(scale), return_weights=return_weights,
        out=out_np.transpose(0, 2, 1, 3))
    out = to_torch(out_np)
    weights = to_torch(result[1]) if return_weights else None
    if compute != dtype:
        out = out.to(dtype)
        weights = None if weights is None else weights.to(dtype)
    return out, weights


def _optional_numpy(t):
    return None if t is None else t.detach().numpy()


@torch.library.custom_op("fastattn::sdpa", mutates_args=())
def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
         attn_mask: torch.Tensor | None = None, key_lengths: torch.Tensor | None = None,
         query_lengths: torch.Tensor | None = None, key_starts: torch.Tensor | None = None,
         sinks: torch.Tensor | None = None, window: list[int] | None = None,
         softcap: float | None = None, is_causal: bool = False,
         scale: float | None = None) -> torch.Tensor:
    """``torch.ops.fastattn.sdpa``: fastattn's attention as one opaque torch
    op, so that ``torch.compile`` keeps it whole instead of breaking the
    graph at the NumPy crossing.

    query (B, H, Lq, D), key/value (B, Hkv, Lk, D|Dv); ``attn_mask`` bool
    (True = attend) or additive, broadcasting to (B, H, Lq, Lk);
    ``key_lengths``/``query_lengths``/``key_starts`` int64 (B,); causal masking is
    bottom-right aligned. Returns (B, Lq, H, Dv), transformers' layout, in
    ``query``'s dtype.
    """
    out, _ = attention(query, key, value, attn_mask=_optional_numpy(attn_mask),
                       key_lengths=_optional_numpy(key_lengths),
                       query_lengths=_optional_numpy(query_lengths),
                       key_starts=_optional_numpy(key_starts), sinks=_optional_numpy(sinks),
                       window=None if window is None else tuple(window), softcap=softcap,
                       is_causal=is_causal, scale=scale)
    return out


@sdpa.register_fake
def _sdpa_fake(query, key, value, attn_mask=None, key_lengths=None, query_lengths=None,
               key_starts=None, sinks=None, window=None, softcap=None, is_causal=False,
               scale=None):
    B, H, Lq, _ = query.shape
    return query.new_empty((B, Lq, H, value.shape[3]))


def from_numpy_or_none(a):
    """A NumPy array (possibly a broadcast view) as a torch tensor for the
    custom op, or None."""
    if a is None:
        return None
    return torch.from_numpy(np.ascontiguousarray(a))
