"""``optimize``: whole attention modules and encoders of a transformers
model replaced by fastattn layers built from the model's own weights.

Supported: BERT-family encoders (BERT, RoBERTa, XLM-RoBERTa, CamemBERT,
ELECTRA). Each self-attention block (``BertAttention`` and its copies)
becomes a :class:`FastattnBertAttention`: query/key/value projections,
attention and the output dense layer on one
:class:`fastattn.MultiHeadAttention` (one fused QKV GEMM, padded rows
skipped in every projection); the dropout-free residual and LayerNorm stay
transformers' own torch modules. Each encoder whose layers all hold such
blocks then runs its whole stack on the real tokens only (``_FusedEncoder``),
in the model's dtype (float32, float64, bfloat16 or float16: the attention
is fastattn's kernel of that dtype; the GEMMs fastattn's on scipy's BLAS in
float32 and float64, torch's in 16 bits), falling back to those blocks
layer by layer when its fast path does not apply.
"""

import warnings

import numpy as np
import torch
from torch import nn

import fastattn
from fastattn.integrations import _torch_bridge
from fastattn.integrations._hf_masks import FastattnMask, mask_arguments
from fastattn.projections import BLAS_THREADS, linear

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
        self.scaling = float(attn.scaling)
        self.dropout_p = float(attn.dropout.p)
        # the layer computes in float32 or float64; 16-bit models cross in float32
        wd = dense.weight.dtype
        dtype = wd if wd in (torch.float32, torch.float64) else torch.float32
        self.compute_dtype = dtype

        def weight(lin):  # torch (out, in) -> fastattn (in, out)
            return _torch_bridge.as_numpy(lin.weight, dtype).T

        def bias(lin):
            return None if lin.bias is None else _torch_bridge.as_numpy(lin.bias, dtype)

        lins = (attn.query, attn.key, attn.value, dense)
        self.mha = fastattn.MultiHeadAttention.from_weights(
            *(weight(lin) for lin in lins), *(bias(lin) for lin in lins), num_heads=self.num_heads)
        # the same projections as torch tensors, for the whole-encoder path
        # (FastattnBertEncoder): Q, K and V as one (3E, E) GEMM operand, and
        # the model's own output dense layer
        self.register_buffer("qkv_weight", torch.cat([lin.weight.detach() for lin in lins[:3]]),
                             persistent=False)
        self.register_buffer("qkv_bias", None if any(lin.bias is None for lin in lins[:3]) else
                             torch.cat([lin.bias.detach() for lin in lins[:3]]), persistent=False)
        self.dense = dense

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


def _is_bert_layer(layer):
    """A BERT-family encoder layer whose self-attention block was replaced,
    with no cross-attention: attention block, then intermediate (dense +
    activation) and output (dense, residual, LayerNorm). The dense layers
    must be plain nn.Linear (not a subclass with its own forward, such as
    an adapter), because the encoder's fast path reads their weights."""
    attention = getattr(layer, "attention", None)
    if (_family(layer) not in _BERT_FAMILIES or not isinstance(attention, FastattnBertAttention)
            or getattr(layer, "add_cross_attention", False)):
        return False
    dense = (attention.self.dense, getattr(getattr(layer, "intermediate", None), "dense", None),
             getattr(getattr(layer, "output", None), "dense", None))
    return (all(type(lin) is nn.Linear for lin in dense)
            and type(getattr(layer.output, "LayerNorm", None)) is nn.LayerNorm)


def _is_bert_encoder(module):
    layers = getattr(module, "layer", None)
    return (_family(module) in _BERT_FAMILIES and type(module).__name__.endswith("Encoder")
            and isinstance(layers, nn.ModuleList) and len(layers) > 0 and all(map(_is_bert_layer, layers)))


class _FusedEncoder(nn.Module):
    """The whole stack of a BERT-family encoder on its real tokens.

    Instances are of a subclass that also derives from the replaced
    encoder's class and share its attributes and layers (see
    :func:`_fused_encoder`), so module names, ``isinstance`` checks and
    the layer-by-layer path stay the model's.

    The fast path (inference, float32/float64, right padding or none, no
    recorded hidden states or attentions, no hooks on the layers) takes
    the valid token rows out of the padded batch once, runs every layer on
    those ``N`` rows only, and puts them back at the end:

    - Q/K/V as one ``(N, E) x (E, 3E)`` GEMM (torch's, on the model's own
      weights concatenated once);
    - attention as :func:`fastattn.varlen_attention` on zero-copy views of
      that GEMM's output (each sequence attends to its own rows), written
      into a NumPy-allocated tensor;
    - the output dense layer, residual and LayerNorm, then the feed-forward
      (dense, the model's activation, dense, residual, LayerNorm), with the
      layer's own modules and weights, all on ``N`` rows, the GEMMs writing
      into one :class:`_Workspace` per forward.

    Padded rows of the returned hidden states are 0 (transformers computes
    them anyway; every pooling masks them). Anything else runs the
    encoder's own layer-by-layer forward, through :class:`FastattnBertAttention`.
    """

    def __init__(self, encoder):
        nn.Module.__init__(self)
        self.__dict__.update(encoder.__dict__)  # the same layers, config and flags

    def _fast_path_applies(self, hidden_states, attention_mask, encoder_hidden_states, cache, kwargs):
        if (self.training or encoder_hidden_states is not None or cache is not None
                or kwargs.get("output_attentions") or kwargs.get("output_hidden_states")
                or not isinstance(attention_mask, FastattnMask) or attention_mask.bool_mask is not None
                or attention_mask.is_causal or attention_mask.key_starts is not None
                or hidden_states.dim() != 3 or hidden_states.device.type != "cpu"):
            return False
        B, L, _ = hidden_states.shape
        if (attention_mask.q_length, attention_mask.kv_length) != (L, L):
            return False
        for layer in self.layer:
            if layer._forward_hooks or layer._forward_pre_hooks:
                return False
            blk = layer.attention.self
            if hidden_states.dtype not in _NUMPY_DTYPES or any(
                    t.dtype != hidden_states.dtype for t in (blk.qkv_weight, layer.intermediate.dense.weight,
                                                             layer.output.dense.weight)):
                return False
        return True

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, cache=None, use_cache=None, **kwargs):
        if not self._fast_path_applies(hidden_states, attention_mask, encoder_hidden_states, cache, kwargs):
            return super().forward(hidden_states, attention_mask, encoder_hidden_states=encoder_hidden_states,
                                   encoder_attention_mask=encoder_attention_mask, cache=cache,
                                   use_cache=use_cache, **kwargs)
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        B, L, E = hidden_states.shape
        lengths = attention_mask.key_lengths
        flat = hidden_states.reshape(B * L, E)
        if lengths is None:
            rows, cu = None, np.arange(0, (B + 1) * L, L, dtype=np.int64)
            x = flat
        else:
            lengths = np.minimum(np.asarray(lengths, dtype=np.int64), L)
            cu = np.zeros(B + 1, dtype=np.int64)
            np.cumsum(lengths, out=cu[1:])
            rows = torch.from_numpy(np.flatnonzero(np.arange(L) < lengths[:, None]))
            x = flat.index_select(0, rows)
        ws = _Workspace(x.shape[0], E, self.layer[0].intermediate.dense.out_features, x.dtype)
        # scipy's BLAS held at one thread while the GEMMs' column blocks run
        # on fastattn's threads (see fastattn.projections.BlasThreads)
        threads = fastattn.get_num_threads() if BLAS_THREADS.enter() else 1
        try:
            with torch.no_grad():  # inference only, like the attention kernel
                for layer in self.layer:
                    x = _encoder_layer(layer, x, cu, ws, threads)
        finally:
            BLAS_THREADS.exit()
        if rows is None:
            out = x.reshape(B, L, E)
        else:
            out = hidden_states.new_zeros((B * L, E)).index_copy_(0, rows, x).reshape(B, L, E)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=out, cache=None)


def _bfloat16():
    import ml_dtypes

    return ml_dtypes.bfloat16


# the NumPy dtype of each torch dtype the real-token path runs in (bfloat16
# from ml_dtypes, imported only for a bfloat16 model)
_NUMPY_DTYPES = {torch.float32: lambda: np.float32, torch.float64: lambda: np.float64,
                 torch.float16: lambda: np.float16, torch.bfloat16: _bfloat16}


class _Workspace:
    """The buffers of one encoder forward, shared by all its layers: NumPy
    allocations seen as torch tensors. torch's CPU allocator hands large
    blocks back to the system when freed, so fresh (N, 3E) and (N, 4E)
    outputs per layer faulted their pages in again every time (~30 000
    minor faults per batch of 32 long texts, against ~1 000 with these
    buffers); allocated once per forward, they are faulted in once."""

    def __init__(self, N, E, intermediate, dtype):
        np_dtype = _NUMPY_DTYPES[dtype]()

        def buffer(cols):
            return _torch_bridge.to_torch(np.empty((N, cols), dtype=np_dtype))

        self.qkv = buffer(3 * E)
        self.context = buffer(E)
        self.dense = buffer(E)
        self.intermediate = buffer(intermediate)


def _linear_into(out, x, weight, bias, threads):
    """out = x weightᵀ + bias, written into out (all 2-D but bias).

    float32 and float64 go through fastattn's GEMM (scipy's BLAS, its
    columns split over fastattn's OpenMP threads, ``threads`` of them),
    which reads torch's (out, in) weight in place: at the encoder's shapes
    (a few thousand rows by 384..1536) it ran 7-15% faster than torch's
    addmm on a 2-core Zen 5 (and it leaves torch's own thread pool idle,
    as the attention kernel does). The column blocks follow the thread
    count, like torch's GEMM does (``deterministic=False``). 16-bit models
    keep torch's GEMM."""
    if out.dtype in (torch.float32, torch.float64):
        b = None if bias is None else bias.detach().numpy()
        linear(x.detach().numpy()[None], weight.detach().numpy().T, out.numpy()[None], bias=b,
               num_threads=threads, deterministic=False)
        return out
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def _activation_in_place(act, x):
    """x = act(x), in place for transformers' exact (erf) GELU, which BERT
    models use; any other activation allocates its result."""
    if type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is torch.nn.functional.gelu:
        return torch.ops.aten.gelu_(x)
    return act(x)


def _encoder_layer(layer, x, cu, ws, threads):
    """One BERT layer on the packed valid rows x (N, E) (what BertLayer's
    forward computes for them, dropout off); cu: the (B + 1,) row offsets
    of the sequences; ws: the forward's :class:`_Workspace`; threads: the
    GEMMs' OpenMP threads."""
    block = layer.attention
    fused = block.self
    N, E = x.shape
    H = fused.num_heads
    D = E // H
    _linear_into(ws.qkv, x, fused.qkv_weight, fused.qkv_bias, threads)
    qkv = _torch_bridge.as_numpy(ws.qkv, ws.qkv.dtype).reshape(N, 3, H, D)
    context = _torch_bridge.as_numpy(ws.context, ws.context.dtype).reshape(N, H, D)
    fastattn.varlen_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, scale=fused.scaling,
                              out=context)
    _linear_into(ws.dense, ws.context, fused.dense.weight, fused.dense.bias, threads).add_(x)
    attended = block.LayerNorm(ws.dense)
    dense = layer.intermediate.dense
    _linear_into(ws.intermediate, attended, dense.weight, dense.bias, threads)
    inner = _activation_in_place(layer.intermediate.intermediate_act_fn, ws.intermediate)
    dense = layer.output.dense
    _linear_into(ws.dense, inner, dense.weight, dense.bias, threads).add_(attended)
    return layer.output.LayerNorm(ws.dense)


_FUSED_ENCODERS = {}


def _fused_encoder(encoder):
    """A :class:`_FusedEncoder` that is also an instance of ``type(encoder)``
    (whose forward is the layer-by-layer fallback)."""
    base = type(encoder)
    cls = _FUSED_ENCODERS.get(base)
    if cls is None:
        cls = type(f"Fastattn{base.__name__}", (_FusedEncoder, base), {"__module__": __name__})
        _FUSED_ENCODERS[base] = cls
    return cls(encoder)


def _attention_like(module):
    return (type(module).__name__.endswith("Attention")
            and not isinstance(module, (FastattnBertAttention, _FusedSelfAttention)))


def optimize(model, name="fastattn"):
    """Replace the supported attention modules of ``model`` by fastattn
    layers built from its own weights; returns ``model`` (changed in place).

    ``model``: a transformers model or any torch module holding one (a
    ``SentenceTransformer``, say). Supported: BERT-family encoder
    self-attention blocks (BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA),
    see :class:`FastattnBertAttention`, and the encoders made of them,
    which then run every layer on the real tokens only (see
    ``_FusedEncoder``). Nothing is re-initialised; the fastattn layers hold
    float32 copies of the projection weights (float64 for a float64 model)
    and one concatenated copy of each layer's Q/K/V weights.

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
    # then the encoders all of whose layers now hold fastattn blocks: their
    # whole stack runs on the real tokens (see _FusedEncoder)
    for qualname, module in list(model.named_modules()):
        if _is_bert_encoder(module) and not isinstance(module, _FusedEncoder):
            parent_name, _, child = qualname.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _fused_encoder(module))
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
