"""The mask form fastattn's transformers backend receives.

transformers builds one mask per forward pass through the mask function
registered under the backend's name, and hands it unchanged to every
attention layer. fastattn's mask function returns a :class:`FastattnMask`:
the padding analysed once (lengths, not (B, 1, Lq, Lk) arrays) and the
causal alignment worked out from the cache offsets. Only masks that are
neither padding nor causal (packed sequences, overlays, chunked or
sliding patterns, unusual cache offsets) are materialised, as transformers'
own bool mask.
"""

import numpy as np
import torch
from transformers.masking_utils import (
    bidirectional_mask_function,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)

from fastattn.integrations import _torch_bridge


class FastattnMask:
    """One forward pass's mask, as fastattn's kernel arguments.

    Attributes
    ----------
    q_length, kv_length : int
        The query and key lengths the mask was built for.
    is_causal : bool
        Causal, bottom-right aligned (a query at ``i`` sees keys
        ``j <= i + kv_length - q_length``).
    key_lengths : ndarray of int64 (B,) or None
        Right padding: keys ``j >= key_lengths[b]`` are masked.
    query_lengths : ndarray of int64 (B,) or None
        Right padding of a self-attention batch (the queries are the keys):
        rows past it are padding, skipped and returned as zeros.
    key_starts : ndarray of int64 (B,) or None
        Left padding (decoder batches): keys ``j < key_starts[b]`` are masked.
    bool_mask : ndarray of bool (B, 1, q_length, kv_length) or None
        Any other pattern, True = may attend; causality is then inside it.
    """

    __slots__ = ("q_length", "kv_length", "is_causal", "key_lengths", "query_lengths",
                 "key_starts", "bool_mask")

    def __init__(self, q_length, kv_length, is_causal=False, key_lengths=None,
                 query_lengths=None, key_starts=None, bool_mask=None):
        self.q_length = q_length
        self.kv_length = kv_length
        self.is_causal = is_causal
        self.key_lengths = key_lengths
        self.query_lengths = query_lengths
        self.key_starts = key_starts
        self.bool_mask = bool_mask

    def __repr__(self):
        kind = ("bool mask" if self.bool_mask is not None else
                "left padding" if self.key_starts is not None else
                "right padding" if self.key_lengths is not None else "no padding")
        return (f"FastattnMask(q_length={self.q_length}, kv_length={self.kv_length}, "
                f"is_causal={self.is_causal}, {kind})")

    def kernel_arguments(self, with_query_lengths):
        """Keyword arguments of :func:`fastattn.scaled_dot_product_attention`
        (less q, k, v) that apply this mask; ``with_query_lengths`` is False
        for a layer whose queries are not the masked keys."""
        if self.bool_mask is not None:
            return {"attn_mask": self.bool_mask}
        args = {"is_causal": self.is_causal}
        if self.key_lengths is not None:
            args["key_lengths"] = self.key_lengths
            if with_query_lengths and self.query_lengths is not None:
                args["query_lengths"] = self.query_lengths
        if self.key_starts is not None:
            args.update(left_padding_arguments(self.key_starts, self.kv_length))
        return args


def left_padding_arguments(key_starts, kv_length):
    """Kernel arguments that mask keys ``j < key_starts[b]``: the kernel's
    key start offsets, which skip left padding the way ``key_lengths``
    skips right padding (no mask is built)."""
    return {"key_starts": np.ascontiguousarray(key_starts, dtype=np.int64)}


def _causal_alignment_matches(q_length, kv_length, q_offset, kv_offset):
    """True when causal masking at these offsets is bottom-right aligned:
    query i (absolute position q_offset + i) sees key j (kv_offset + j) iff
    j <= i + q_offset - kv_offset, and bottom-right alignment is
    j <= i + kv_length - q_length."""
    return q_offset - kv_offset == kv_length - q_length


def _padding_form(padding):
    """(kind, lengths or starts) of a (B, Lk) bool padding mask: "none",
    "right" (True then False), "left" (False then True) or "other"."""
    B, Lk = padding.shape
    counts = padding.sum(axis=1, dtype=np.int64)
    if B == 0 or (counts == Lk).all():
        return "none", None
    positions = np.arange(Lk, dtype=np.int64)
    if np.array_equal(padding, positions < counts[:, None]):
        return "right", counts
    starts = Lk - counts
    if np.array_equal(padding, positions >= starts[:, None]):
        return "left", starts
    return "other", None


def fastattn_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0,
                  mask_function=causal_mask_function, attention_mask=None, **kwargs):
    """transformers mask interface: a :class:`FastattnMask` for one forward
    pass (the arguments are those of ``transformers.masking_utils.sdpa_mask``)."""
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    simple = mask_function is causal_mask_function or mask_function is bidirectional_mask_function
    is_causal = mask_function is causal_mask_function
    if simple and is_causal and not _causal_alignment_matches(q_length, kv_length, q_offset, kv_offset):
        simple = False
    if simple:
        kind, values = ("none", None) if padding is None else _padding_form(padding.cpu().numpy())
        if kind == "none":
            return FastattnMask(q_length, kv_length, is_causal)
        if kind == "right":
            self_attention = q_length == kv_length and q_offset == kv_offset == 0
            return FastattnMask(q_length, kv_length, is_causal, key_lengths=values,
                                query_lengths=values if self_attention else None)
        if kind == "left":
            return FastattnMask(q_length, kv_length, is_causal, key_starts=values)
    mask = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                     q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                     attention_mask=attention_mask, allow_is_causal_skip=False,
                     allow_is_bidirectional_skip=False, use_vmap=kwargs.get("use_vmap", False),
                     device="cpu")
    return FastattnMask(q_length, kv_length, bool_mask=mask.numpy())


def _is_cross_attention(module):
    return bool(getattr(module, "is_cross_attention", False)) or "CrossAttention" in type(module).__name__


def mask_arguments(module, attention_mask, Lq, Lk, dtype, is_causal=None):
    """Kernel keyword arguments for the mask transformers passed to a layer
    of ``Lq`` queries and ``Lk`` keys computing in torch dtype ``dtype``."""
    if isinstance(attention_mask, FastattnMask):
        if (attention_mask.q_length, attention_mask.kv_length) != (Lq, Lk):
            raise ValueError(
                f"fastattn attention: the mask was built for {attention_mask.q_length} queries and "
                f"{attention_mask.kv_length} keys, but this layer has {Lq} queries and {Lk} keys")
        return attention_mask.kernel_arguments(with_query_lengths=not _is_cross_attention(module))
    if attention_mask is None:
        # no mask built (the model skipped mask creation): causality comes
        # from the call or the module, as for transformers' sdpa backend
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
        return {"is_causal": bool(causal) and Lq > 1}
    if isinstance(attention_mask, torch.Tensor):
        # a prepared mask (the caller passed a 4-D mask): bool True = attend,
        # or additive; keys past this layer's length are cut off as sdpa does
        mask = attention_mask[..., :Lk]
        if mask.dtype == torch.bool:
            return {"attn_mask": _torch_bridge.as_numpy(mask, torch.bool)}
        # additive masks are float32 beside 16-bit scores, as the kernel takes them
        return {"attn_mask": _torch_bridge.as_numpy(
            mask, torch.float64 if dtype == torch.float64 else torch.float32)}
    raise TypeError(f"fastattn attention: unsupported attention_mask of type {type(attention_mask).__name__}")
