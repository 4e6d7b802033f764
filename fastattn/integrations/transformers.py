"""fastattn as a Hugging Face transformers attention backend.

Two levels (see docs/transformers.md):

- :func:`register` adds fastattn under a name to transformers' attention
  and mask interfaces; a model built or switched to that name
  (``attn_implementation="fastattn"``) runs every attention through
  fastattn's kernel, projections and the rest staying in torch.
- :func:`optimize` replaces whole attention modules (BERT-family encoders)
  with a fastattn :class:`~fastattn.MultiHeadAttention` that owns the
  projections and skips padded rows in all of them, and runs each such
  encoder's whole layer stack on the real tokens only.

Needs torch and transformers (``pip install fastattn[transformers]``);
importing this module imports both, ``import fastattn`` imports neither.
"""

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from fastattn.integrations import _torch_bridge
from fastattn.integrations._hf_encoder import FastattnBertAttention, optimize
from fastattn.integrations._hf_masks import FastattnMask, fastattn_mask, mask_arguments
from fastattn.integrations._torch_bridge import bf16_view

__all__ = ["FastattnBertAttention", "FastattnMask", "attention_forward", "bf16_view", "fastattn_mask", "optimize",
           "register"]

# transformers' keyword arguments that change what attention computes and
# that the kernel does not implement: refusing them beats a silently wrong
# answer
_UNSUPPORTED = {
    "position_bias": "an additive position bias (T5-style)",
}


def feature_arguments(sliding_window, softcap, s_aux, dtype):
    """The kernel's ``window``, ``softcap`` and ``sinks`` for transformers'
    ``sliding_window``, ``softcap`` and ``s_aux``.

    transformers' sliding window of size W lets query position i see keys
    j > i - W (``masking_utils.sliding_window_overlay``), and its flash
    backend passes ``window_size=(W - 1, W - 1)``: the same pair here, whose
    right side the causal mask makes moot in decoders. ``s_aux`` is one
    logit per query head (gpt-oss), exactly the kernel's sinks.
    """
    args = {}
    if sliding_window is not None:
        w = int(sliding_window)
        if w < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window!r}")
        args["window"] = (w - 1, w - 1)
    if softcap is not None:
        args["softcap"] = float(softcap)
    if s_aux is not None:
        args["sinks"] = s_aux.detach().to(dtype).numpy()
    return args


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      sliding_window=None, softcap=None, s_aux=None, **kwargs):
    """transformers attention interface: fastattn's kernel for one layer.

    query (B, H, Lq, D), key/value (B, Hkv, Lk, D) (grouped-query heads are
    not repeated: the kernel reads kv head ``h // (H // Hkv)``). Returns
    ``(out (B, Lq, H, D), weights (B, H, Lq, Lk) or None)``; the weights
    only with ``output_attentions=True``.

    Right padding runs as key/query lengths (padded keys and query rows are
    skipped; a padded query row's output is 0, where sdpa attends from it
    anyway: those rows are padding for every pooling and loss). Raises
    ``sliding_window``, ``softcap`` and ``s_aux`` run as the kernel's
    ``window``, ``softcap`` and ``sinks``. Raises ValueError for
    ``dropout > 0`` (this is an inference kernel) and NotImplementedError
    for a T5-style ``position_bias``.
    """
    if dropout:
        raise ValueError(f"fastattn attention is inference-only: dropout must be 0, got {dropout} "
                         f"(call model.eval())")
    for name, feature in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"fastattn attention does not support {name} ({feature}) yet; use "
                f"attn_implementation='sdpa' for this model")
    args = mask_arguments(module, attention_mask, query.shape[2], key.shape[2], query.dtype,
                          kwargs.get("is_causal"))
    args.update(feature_arguments(sliding_window, softcap, s_aux,
                                  _torch_bridge.kernel_dtype(query.dtype)))
    want_weights = bool(kwargs.get("output_attentions", False))
    if torch.compiler.is_compiling():
        if want_weights:
            raise NotImplementedError("fastattn attention: output_attentions under torch.compile")
        out = torch.ops.fastattn.sdpa(
            query, key, value,
            attn_mask=_torch_bridge.from_numpy_or_none(args.get("attn_mask")),
            key_lengths=_torch_bridge.from_numpy_or_none(args.get("key_lengths")),
            query_lengths=_torch_bridge.from_numpy_or_none(args.get("query_lengths")),
            key_starts=_torch_bridge.from_numpy_or_none(args.get("key_starts")),
            sinks=_torch_bridge.from_numpy_or_none(args.get("sinks")),
            window=args.get("window"), softcap=args.get("softcap"),
            is_causal=args.get("is_causal", False), scale=scaling)
        return out, None
    return _torch_bridge.attention(query, key, value, scale=scaling, return_weights=want_weights, **args)


def register(name="fastattn"):
    """Register fastattn with transformers under ``name``; returns ``name``.

    Afterwards any of these runs attention through fastattn::

        AutoModel.from_pretrained(path, attn_implementation="fastattn")
        model.set_attn_implementation("fastattn")
        SentenceTransformer(path, model_kwargs={"attn_implementation": "fastattn"})

    Both interfaces are registered: the attention function
    (:func:`attention_forward`) and the mask function
    (:func:`fastattn_mask`), which hands every layer the padding as
    lengths. (An attention function registered without a mask function
    gets no mask at all from transformers and attends to padding.)
    Registering again is harmless.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, fastattn_mask)
    return name
