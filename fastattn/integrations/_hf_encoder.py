"""``optimize``: whole attention modules of a transformers model replaced by
fastattn layers built from the model's own weights.

Supported: the self-attention block of BERT-family encoders
(``BertAttention`` and its copies in RoBERTa, XLM-RoBERTa, CamemBERT,
ELECTRA): query/key/value projections, attention and the output dense
layer become one :class:`fastattn.MultiHeadAttention` (one fused QKV GEMM,
padded rows skipped in every projection); the dropout-free residual and
LayerNorm stay transformers' own torch modules.
"""

import warnings

import torch
from torch import nn

import fastattn
from fastattn.integrations import _torch_bridge
from fastattn.integrations._hf_masks import mask_arguments

# model families whose attention block is BERT's: self-attention with
# query/key/value projections and scaling 1/sqrt(D), then
# LayerNorm(dropout(dense(attn)) + input)
_BERT_FAMILIES = ("bert", "roberta", "xlm_roberta", "camembert", "electra")


def _family(module):
    parts = type(module).__module__.split(".")
    return parts[2] if len(parts) > 3 and parts[:2] == ["transformers", "models"] else None


def _is_bert_attention(module):
    """A self-attention (not cross-attention, not causal) block of a BERT
    family encoder, with the expected submodules."""
    if _family(module) not in _BERT_FAMILIES or getattr(module, "is_cross_attention", True):
        return False
    attn, out = getattr(module, "self", None), getattr(module, "output", None)
    if attn is None or out is None or getattr(attn, "is_causal", True):
        return False
    linears = [getattr(attn, n, None) for n in ("query", "key", "value")] + [getattr(out, "dense", None)]
    if not all(isinstance(lin, nn.Linear) for lin in linears):
        return False
    head_dim = getattr(attn, "attention_head_size", None)
    return (isinstance(getattr(out, "LayerNorm", None), nn.LayerNorm) and head_dim
            and abs(getattr(attn, "scaling", 0.0) - head_dim ** -0.5) < 1e-12)


class _FusedSelfAttention(nn.Module):
    """Projections, attention and the output dense layer of a BERT block on
    one :class:`fastattn.MultiHeadAttention`; returns ``(dense output,
    weights or None)``. Instances are of a subclass that also derives from
    the replaced self-attention class (see :func:`_fused_self_attention`),
    so that transformers' ``output_attentions`` hooks, which match that
    class, still record the weights."""

    def __init__(self, attn, dense):
        nn.Module.__init__(self)  # not the transformers class's __init__: no torch weights
        self.num_heads = attn.num_attention_heads
        self.dropout_p = float(attn.dropout.p)
        dtype = _torch_bridge.kernel_dtype(dense.weight.dtype)
        self.compute_dtype = dtype

        def weight(lin):  # torch (out, in) -> fastattn (in, out)
            return _torch_bridge.as_numpy(lin.weight, dtype).T

        def bias(lin):
            return None if lin.bias is None else _torch_bridge.as_numpy(lin.bias, dtype)

        lins = (attn.query, attn.key, attn.value, dense)
        self.mha = fastattn.MultiHeadAttention.from_weights(
            *(weight(lin) for lin in lins), *(bias(lin) for lin in lins), num_heads=self.num_heads)

    def extra_repr(self):
        return repr(self.mha)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        B, L, _ = hidden_states.shape
        args = mask_arguments(self, attention_mask, L, L, self.compute_dtype)
        if args.pop("is_causal", False):
            raise ValueError("fastattn's BERT attention block is bidirectional; got a causal mask")
        want_weights = bool(kwargs.get("output_attentions", False))
        x = _torch_bridge.as_numpy(hidden_states, self.compute_dtype)
        result = self.mha(x, return_weights=want_weights, **args)
        y, weights = result if want_weights else (result, None)
        y = torch.from_numpy(y)
        weights = None if weights is None else torch.from_numpy(weights)
        if y.dtype != hidden_states.dtype:
            y = y.to(hidden_states.dtype)
            weights = None if weights is None else weights.to(hidden_states.dtype)
        return y, weights


_FUSED_CLASSES = {}


def _fused_self_attention(attn, dense):
    """A :class:`_FusedSelfAttention` that is also an instance of
    ``type(attn)`` (for transformers' output hooks only: none of that
    class's methods run)."""
    base = type(attn)
    cls = _FUSED_CLASSES.get(base)
    if cls is None:
        cls = type(f"Fastattn{base.__name__}", (_FusedSelfAttention, base), {"__module__": __name__})
        _FUSED_CLASSES[base] = cls
    return cls(attn, dense)


class FastattnBertAttention(nn.Module):
    """A BERT-family attention block on :class:`fastattn.MultiHeadAttention`.

    Same inputs and outputs as the block it replaces (hidden states (B, L,
    E) in, ``(output, weights or None)`` out). ``self.self`` runs the
    projections, attention and output dense layer as one fastattn layer;
    the residual and transformers' own LayerNorm follow in torch. Padded
    query rows (past the mask's lengths) skip the projections and
    attention and come out as ``LayerNorm(input)``, where transformers
    computes them anyway: those rows are padding for every pooling; the
    valid rows match. Inference only: raises in training mode with dropout.
    """

    def __init__(self, block):
        super().__init__()
        self.self = _fused_self_attention(block.self, block.output.dense)
        self.hidden_dropout = float(block.output.dropout.p)
        self.LayerNorm = block.output.LayerNorm
        self.train(block.training)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, cache=None, **kwargs):
        if self.training and (self.self.dropout_p or self.hidden_dropout):
            raise ValueError("fastattn attention is inference-only: call model.eval() (dropout is not applied)")
        if encoder_hidden_states is not None or cache is not None:
            raise ValueError("fastattn's BERT attention block is encoder self-attention: "
                             "encoder_hidden_states and cache are not supported")
        y, weights = self.self(hidden_states, attention_mask, **kwargs)
        return self.LayerNorm(y + hidden_states), weights


def _attention_like(module):
    return (type(module).__name__.endswith("Attention")
            and not isinstance(module, (FastattnBertAttention, _FusedSelfAttention)))


def optimize(model, name="fastattn"):
    """Replace the supported attention modules of ``model`` by fastattn
    layers built from its own weights; returns ``model`` (changed in place).

    ``model``: a transformers model or any torch module holding one (a
    ``SentenceTransformer``, say). Supported: BERT-family encoder
    self-attention blocks (BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA),
    see :class:`FastattnBertAttention`. Nothing is re-initialised; the
    fastattn layers hold float32 copies of the projection weights (float64
    for a float64 model).

    The model's attention implementation is also switched to fastattn's
    registered backend (:func:`register` with ``name``), which gives the
    replaced blocks the padding as lengths, and runs the attention of every
    module left alone. Those modules are named in one ``UserWarning``
    ("fastattn.optimize left ... alone").
    """
    from fastattn.integrations.transformers import register
    from transformers import PreTrainedModel

    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize expects a torch module (a transformers model), got {type(model).__name__}")
    register(name)
    replaced, left = [], []
    seen = set()
    for qualname, module in list(model.named_modules()):
        if any(qualname.startswith(p + ".") for p in seen):
            continue  # inside a module already handled
        if _is_bert_attention(module):
            parent_name, _, child = qualname.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, FastattnBertAttention(module))
            replaced.append(qualname)
            seen.add(qualname)
        elif _attention_like(module):
            left.append(f"{qualname} ({type(module).__name__})")
            seen.add(qualname)
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.set_attn_implementation(name)
            break  # the outermost model sets its submodels
    if left:
        warnings.warn(
            f"fastattn.optimize left {len(left)} attention module(s) alone (not a supported "
            f"family; they run on the registered {name!r} attention function): " + ", ".join(left),
            UserWarning, stacklevel=2)
    return model
