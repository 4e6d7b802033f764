"""Hypothesis strategies for the reliability tests, and a registry of small
fixed calls of every public kernel.

Two things live here:

* strategies that draw whole calls of each public function (``*_calls()``):
  shapes with length-1, vector-width-edge and large axes, dtypes (native and
  promoted), memory layouts (C, F, strided, negative strides, slices,
  transposes, broadcasts, read-only, non-native byte order, misaligned,
  structured-field views), every mask kind and their combinations
  (``mask_kwargs``), lengths including 0 and full, GQA head ratios
  (``gqa_heads``, for attention), ISA levels and thread counts. A drawn ``Call`` is
  run against ``fastattn`` and ``fastattn.reference`` by test_properties.py;
* ``SMALL_CALLS``: one small, fixed, read-only-input call per kernel, used by
  the concurrency, fork and memory tests. A new kernel is one entry there.

Values come from a NumPy generator seeded by hypothesis (fast for large
axes); hypothesis shrinks shapes, options and the seed. Padding around
strided and sliced views is NaN, so a kernel reading outside its view
poisons its result instead of passing by luck.
"""

import math
from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st

import fastattn

# ---- basic ingredients -------------------------------------------------------

FLOAT_DTYPES = [np.dtype(np.float32), np.dtype(np.float64)]
# promoted inputs (see fastattn._validation): computed in float32 or float64
PROMOTED_DTYPES = [np.dtype(np.float16), np.dtype(np.int16), np.dtype(np.int32),
                   np.dtype(np.uint8), np.dtype(np.bool_)]
INT_DTYPES = [np.dtype(np.int64), np.dtype(np.int32), np.dtype(np.uint8), np.dtype(np.int16)]

ISAS = fastattn.available_isas()
isas = st.sampled_from(ISAS)
# None = the default; 3 oversubscribes a 2-core machine on purpose
thread_counts = st.sampled_from([None, 1, 2, 3])

# vector-width edges for 4/8/16-lane kernels, and a few large axes
EDGE_LENGTHS = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65]
LARGE_LENGTHS = [127, 128, 129, 255, 257, 511, 1000, 1023, 1025, 2047, 4099]

float_dtypes = st.sampled_from(FLOAT_DTYPES)
input_dtypes = st.one_of(float_dtypes, float_dtypes, float_dtypes, st.sampled_from(PROMOTED_DTYPES))
# masked_softmax, split/merge_heads and apply_rotary keep float16 (and
# bfloat16) inputs in their dtype, a result held to a bound in ulps of that
# dtype (tests/test_half_dtypes.py) rather than to the float32 rule used
# here; their strategies draw the other promoted dtypes
KEPT_HALF_INPUTS = st.one_of(float_dtypes, float_dtypes, float_dtypes,
                             st.sampled_from([d for d in PROMOTED_DTYPES if d != np.float16]))
seeds = st.integers(0, 2**32 - 1)


@st.composite
def axis_length(draw, budget, zero=False):
    """One axis length <= max(1, budget): mostly small or at a vector edge,
    sometimes large, rarely 0."""
    budget = max(1, int(budget))
    choices = [st.integers(1, min(6, budget)),
               st.sampled_from([n for n in EDGE_LENGTHS if n <= budget] or [1])]
    large = [n for n in LARGE_LENGTHS if n <= budget]
    if large:
        choices.append(st.sampled_from(large))
    if zero and draw(st.integers(0, 24)) == 0:
        return 0
    return draw(st.one_of(*choices))


@st.composite
def lead_shape(draw, ndim, budget, zero=False):
    """``ndim`` small leading axes whose product stays <= budget."""
    dims = []
    for _ in range(ndim):
        d = draw(axis_length(min(budget, 7), zero=zero))
        dims.append(d)
        budget = max(1, budget // max(d, 1))
    return tuple(dims)


# budget of elements per example: small mostly, now and then big enough that
# the kernels really use several OpenMP threads (FA_MIN_PARALLEL_ELEMS = 32768)
budgets = st.sampled_from([64, 600, 4000, 4000, 12000, 40000, 70000])


def random_values(rng, shape, dtype, sigma=1.0):
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        lo = 0 if dtype.kind == "u" else -8
        return rng.integers(lo, 8, size=shape).astype(dtype)
    return (rng.standard_normal(shape) * sigma).astype(dtype)


# ---- memory layouts ----------------------------------------------------------

# every layout keeps the values; "broadcast" replaces them by a broadcast
# slice (read-only, zero stride), which the oracle receives too
WRITABLE_LAYOUTS = ["C", "F", "strided", "negative", "reversed", "sliced", "transposed",
                    "misaligned", "field"]
INPUT_LAYOUTS = WRITABLE_LAYOUTS + ["broadcast", "readonly", "byteswapped"]


def _pad_value(dtype):
    return np.nan if dtype.kind == "f" else (1 if dtype == np.bool_ else 99)


def relayout(a, kind, perm=None, axis=0):
    """The values of ``a`` (except "broadcast") in another memory layout."""
    a = np.asarray(a)
    dt = a.dtype
    nd = a.ndim
    if kind == "C" or nd == 0:
        return np.ascontiguousarray(a)
    if kind == "F":
        return np.asfortranarray(a)
    if kind == "strided":  # every other element of a NaN-padded buffer
        big = np.full(tuple(2 * s + 1 for s in a.shape), _pad_value(dt), dtype=dt)
        view = big[tuple(slice(1, None, 2) for _ in a.shape)]
        view[...] = a
        return view
    if kind == "negative":  # every axis reversed
        rev = (slice(None, None, -1),) * nd
        return np.ascontiguousarray(a[rev])[rev]
    if kind == "reversed":  # last axis reversed
        return np.ascontiguousarray(a[..., ::-1])[..., ::-1]
    if kind == "sliced":  # an interior window of a NaN-padded buffer
        big = np.full(tuple(s + 3 for s in a.shape), _pad_value(dt), dtype=dt)
        view = big[tuple(slice(2, 2 + s) for s in a.shape)]
        view[...] = a
        return view
    if kind == "transposed":  # contiguous in another axis order
        perm = list(perm) if perm is not None else list(range(nd))[::-1]
        return np.ascontiguousarray(a.transpose(perm)).transpose(np.argsort(perm))
    if kind == "misaligned":  # data pointer one byte off the dtype's alignment
        buf = np.zeros(a.nbytes + dt.itemsize + 1, dtype=np.uint8)
        view = np.ndarray(a.shape, dtype=dt, buffer=buf, offset=1)
        view[...] = a
        return view
    if kind == "field":  # a structured-array field: stride not a multiple of itemsize
        rec = np.zeros(a.shape, dtype=[("pad", "u1"), ("v", dt), ("pad2", "u1", (3,))])
        rec["v"] = a
        return rec["v"]
    if kind == "broadcast":  # zero stride along one axis of size > 1
        axes = [i for i, s in enumerate(a.shape) if s > 1]
        if not axes:
            return np.broadcast_to(a, a.shape)
        ax = axes[axis % len(axes)]
        return np.broadcast_to(np.take(a, [0], axis=ax), a.shape)
    if kind == "readonly":
        r = np.array(a)
        r.flags.writeable = False
        return r
    if kind == "byteswapped":  # non-native byte order, same values
        return a.astype(dt.newbyteorder())
    raise ValueError(kind)


@st.composite
def laid_out(draw, a, kinds=INPUT_LAYOUTS):
    """``a`` in a drawn layout."""
    kind = draw(st.sampled_from(kinds))
    perm = draw(st.permutations(range(a.ndim))) if kind == "transposed" else None
    axis = draw(st.integers(0, 7)) if kind == "broadcast" else 0
    return relayout(a, kind, perm=perm, axis=axis)


@st.composite
def float_input(draw, shape, dtypes=input_dtypes, kinds=INPUT_LAYOUTS):
    """A random array of ``shape`` in a drawn dtype and layout."""
    dtype = np.dtype(draw(dtypes))
    rng = np.random.default_rng(draw(seeds))
    sigma = draw(st.sampled_from([1.0, 1.0, 0.05, 4.0]))
    return draw(laid_out(random_values(rng, shape, dtype, sigma), kinds))


@st.composite
def out_array(draw, shape, dtype):
    """None, or a writable ``out`` of ``shape``/``dtype`` in a drawn layout."""
    if draw(st.integers(0, 2)) != 0:
        return None
    base = np.full(shape, np.nan, dtype=dtype)
    return draw(laid_out(base, WRITABLE_LAYOUTS))


@st.composite
def out_kwarg(draw, shape, dtype):
    """{} or {"out": an out_array} for a call's keyword arguments."""
    out = draw(out_array(shape, dtype))
    return {} if out is None else {"out": out}


@st.composite
def lengths_values(draw, shape, full):
    """Integer lengths in [0, full] of ``shape``, favouring 0 and ``full``."""
    n = math.prod(shape)
    one = st.one_of(st.just(0), st.just(full), st.integers(0, full))
    vals = draw(st.lists(one, min_size=n, max_size=n))
    dtype = draw(st.sampled_from(INT_DTYPES))
    if full > np.iinfo(dtype).max:
        dtype = np.dtype(np.int64)
    return np.array(vals, dtype=dtype).reshape(shape)


# ---- one drawn call -------------------------------------------------------------


@dataclass
class Call:
    """A drawn call: ``fn(*args, **kwargs)`` at ISA level ``isa``.

    ``inplace`` is true when ``out`` is one of the inputs, so the oracle must
    see the inputs before the call."""
    args: tuple
    kwargs: dict = field(default_factory=dict)
    isa: str = None
    inplace: bool = False

    def __repr__(self):
        def show(v):
            if isinstance(v, np.ndarray):
                return (f"array(shape={v.shape}, dtype={v.dtype}, strides={v.strides}, "
                        f"writeable={v.flags.writeable}, aligned={v.flags.aligned})")
            return repr(v)
        a = ", ".join(show(v) for v in self.args)
        k = ", ".join(f"{n}={show(v)}" for n, v in self.kwargs.items())
        return f"Call(isa={self.isa!r}, inplace={self.inplace}, args=({a}), kwargs={{{k}}})"


def _maybe_inplace(draw, x, kwargs):
    """Sometimes ask for out=x (in place), when x can be written as is."""
    if (isinstance(x, np.ndarray) and x.flags.writeable and x.dtype in FLOAT_DTYPES
            and x.dtype.isnative and draw(st.integers(0, 5)) == 0):
        kwargs["out"] = x
        return True
    return False


@st.composite
def mask_kwargs(draw, shape):
    """Masks for scores of ``shape`` = (..., Lq, Lk): a bool or additive
    ``attn_mask`` of any broadcastable shape and layout, ``key_lengths`` and
    ``query_lengths`` of either accepted shape, causality with either
    alignment -- each optional, so every combination occurs. Reusable for
    scaled_dot_product_attention (shape = (B, H, Lq, Lk))."""
    lead, (Lq, Lk) = shape[:-2], shape[-2:]
    kw = {}
    mask_kind = draw(st.sampled_from([None, None, "bool", "add"]))
    if mask_kind is not None:
        mshape = [d if draw(st.booleans()) else 1 for d in shape]
        mshape = tuple(mshape[draw(st.integers(0, len(mshape))):])
        rng = np.random.default_rng(draw(seeds))
        if mask_kind == "bool":
            p = draw(st.sampled_from([0.0, 0.3, 0.8, 1.0]))
            m = np.asarray(rng.random(mshape) < p)
        else:
            m = np.asarray(rng.standard_normal(mshape) * draw(st.sampled_from([0.5, 3.0])))
            q = draw(st.sampled_from([0.0, 0.3, 1.0]))
            m[rng.random(mshape) < q] = -np.inf
            m = m.astype(draw(float_dtypes))
        kw["attn_mask"] = draw(laid_out(m))
    for name, full in (("key_lengths", Lk), ("query_lengths", Lq)):
        form = draw(st.sampled_from([None, None, "batch", "full"]))
        if form is None:
            continue
        if not lead:
            kw[name] = np.array(draw(st.integers(0, full)))
        else:
            kw[name] = draw(lengths_values(lead[:1] if form == "batch" else lead, full))
    if draw(st.booleans()):
        kw["is_causal"] = True
        kw["causal_alignment"] = draw(st.sampled_from(["top_left", "bottom_right"]))
    return kw


@st.composite
def gqa_heads(draw, max_heads=16):
    """(query heads, key/value heads) with Hq % Hkv == 0: MHA (ratio 1), GQA
    (2, 4, 8) and MQA (Hkv = 1). For scaled_dot_product_attention."""
    hkv = draw(st.sampled_from([1, 1, 2, 3, 4]))
    ratio = draw(st.sampled_from([r for r in (1, 2, 4, 8) if hkv * r <= max_heads] or [1]))
    return hkv * ratio, hkv


@st.composite
def masked_softmax_calls(draw):
    budget = draw(budgets)
    Lk = draw(axis_length(budget, zero=True))
    Lq = draw(axis_length(budget // max(Lk, 1), zero=True))
    nlead = draw(st.integers(0, 3))
    lead = draw(lead_shape(nlead, max(1, budget // max(Lq * Lk, 1)), zero=True))
    shape = lead + (Lq, Lk)
    x = draw(float_input(shape, dtypes=KEPT_HALF_INPUTS))
    kw = draw(mask_kwargs(shape))
    scale = draw(st.sampled_from([None, 1.0, 0.125, 0.5, 2.0, 0.0, -1.0, np.float32(0.3), 3]))
    if scale is not None:
        kw["scale"] = scale
    kw["num_threads"] = draw(thread_counts)
    inplace = _maybe_inplace(draw, x, kw)
    if not inplace:
        kw.update(draw(out_kwarg(shape, fastattn._validation.compute_dtype(x.dtype, "x"))))
    return Call((x,), kw, draw(isas), inplace)


@st.composite
def scaled_dot_product_attention_calls(draw):
    """q (B, H, Lq, D), k and v (B, Hkv, Lk, D/Dv) (or 3-D), GQA ratios,
    every mask kind, ALiBi, scale, out and thread count; sizes straddle the
    96-query and 48-key tiles and the 4-row decode path."""
    B = draw(st.integers(1, 3))
    H, Hkv = draw(gqa_heads(max_heads=8))
    Lq = draw(st.sampled_from([1, 2, 3, 4, 5, 17, 97]))
    Lk = draw(st.sampled_from([0, 1, 7, 48, 49, 130]))
    D = draw(st.sampled_from([1, 5, 8, 16, 33]))
    Dv = draw(st.sampled_from([1, 3, 8, 17, D]))
    three_d = draw(st.integers(0, 4)) == 0
    if three_d:
        H = Hkv = 1
    shapes = [(B, H, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, Dv)]
    if three_d:
        shapes = [(s[0],) + s[2:] for s in shapes]
    q, k, v = (draw(float_input(sh)) for sh in shapes)
    kw = draw(mask_kwargs((B, Lq, Lk) if three_d else (B, H, Lq, Lk)))
    if draw(st.integers(0, 3)) == 0:
        kw["alibi_slopes"] = np.random.default_rng(draw(seeds)).random(H)
    scale = draw(st.sampled_from([None, None, 0.5, 0.0, -1.0]))
    if scale is not None:
        kw["scale"] = scale
    kw["num_threads"] = draw(thread_counts)
    kw.update(draw(feature_kwargs(H)))
    if draw(st.integers(0, 3)) == 0:
        kw["key_starts"] = np.random.default_rng(draw(seeds)).integers(0, Lk + 1, size=B)
    dtype = attention_result_dtype(q, k, v)
    kw.update(draw(out_kwarg((B, Lq, Dv) if three_d else (B, H, Lq, Dv), dtype)))
    return Call((q, k, v), kw, draw(isas))


def attention_result_dtype(q, k, v):
    """float16 q, k and v (or key and value caches) give a float16 result
    (computed in float32), in every attention entry point; other mixes are
    promoted to their compute dtype."""
    if q.dtype.name == k.dtype.name == v.dtype.name == "float16":  # either byte order
        return np.dtype(np.float16)
    return np.result_type(*(fastattn._validation.compute_dtype(a.dtype, "x") for a in (q, k, v)))


@st.composite
def feature_kwargs(draw, H):
    """Sliding window, soft-capping and sinks, each drawn or left out."""
    kw = {}
    if draw(st.integers(0, 2)) == 0:
        kw["window"] = (draw(st.sampled_from([None, 0, 1, 5, 40])),
                        draw(st.sampled_from([None, 0, 2, 60])))
    if draw(st.integers(0, 3)) == 0:
        kw["softcap"] = draw(st.sampled_from([0.5, 2.0, 30.0]))
    if draw(st.integers(0, 3)) == 0:
        kw["sinks"] = np.random.default_rng(draw(seeds)).standard_normal(H) * 2
    return kw


@st.composite
def varlen_attention_calls(draw):
    """Packed batches: empty and one-token sequences, lengths around the
    96-row chunks, different query and key lengths, GQA, causality in both
    alignments, the model features, int32 or int64 prefix sums."""
    B = draw(st.integers(1, 4))
    H, Hkv = draw(gqa_heads(max_heads=8))
    pick = st.sampled_from([0, 1, 3, 17, 97, 130])
    lens_q = draw(st.lists(pick, min_size=B, max_size=B))
    lens_k = lens_q if draw(st.booleans()) else draw(st.lists(pick, min_size=B, max_size=B))
    D = draw(st.sampled_from([1, 5, 8, 16, 33]))
    Dv = draw(st.sampled_from([1, 3, 8, 17, D]))
    cu_dtype = draw(st.sampled_from([np.int32, np.int64]))
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(cu_dtype)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(cu_dtype)
    q = draw(float_input((int(cu_q[-1]), H, D)))
    k = draw(float_input((int(cu_k[-1]), Hkv, D)))
    v = draw(float_input((int(cu_k[-1]), Hkv, Dv)))
    kw = dict(is_causal=draw(st.booleans()),
              causal_alignment=draw(st.sampled_from(["top_left", "bottom_right"])))
    kw.update(draw(feature_kwargs(H)))
    if draw(st.integers(0, 3)) == 0:
        kw["alibi_slopes"] = np.random.default_rng(draw(seeds)).random(H)
    scale = draw(st.sampled_from([None, None, 0.5, -1.0]))
    if scale is not None:
        kw["scale"] = scale
    kw["num_threads"] = draw(thread_counts)
    kw.update(draw(out_kwarg((int(cu_q[-1]), H, Dv), attention_result_dtype(q, k, v))))
    return Call((q, k, v, cu_q, cu_k), kw, draw(isas))


@st.composite
def paged_attention_calls(draw):
    """A shuffled block pool (spare blocks of junk, -1 past each table's
    last block), block sizes 1 and up, decode and short prefill queries,
    GQA, causality and the model features."""
    B = draw(st.integers(1, 3))
    H, Hkv = draw(gqa_heads(max_heads=8))
    bs = draw(st.sampled_from([1, 2, 5, 16]))
    Lq = draw(st.sampled_from([1, 2, 5]))
    lens = [Lq + draw(st.sampled_from([0, 1, 7, 40, 130])) for _ in range(B)]
    D = draw(st.sampled_from([1, 5, 8, 16, 33]))
    Dv = draw(st.sampled_from([1, 3, 8, 17, D]))
    need = [-(-n // bs) for n in lens]
    rng = np.random.default_rng(draw(seeds))
    total = sum(need) + draw(st.integers(0, 3))
    order = rng.permutation(total)
    width = max(need) + draw(st.integers(0, 2))
    tables = np.full((B, width), -1, dtype=draw(st.sampled_from([np.int32, np.int64])))
    used = 0
    for b, n in enumerate(need):
        tables[b, :n] = order[used:used + n]
        used += n
    q = draw(float_input((B, H, Lq, D)))
    kc = draw(float_input((total, bs, Hkv, D)))
    vc = draw(float_input((total, bs, Hkv, Dv)))
    kw = dict(is_causal=draw(st.booleans()))
    kw.update(draw(feature_kwargs(H)))
    if draw(st.integers(0, 3)) == 0:
        kw["alibi_slopes"] = rng.random(H)
    kw["num_threads"] = draw(thread_counts)
    kw.update(draw(out_kwarg((B, H, Lq, Dv), attention_result_dtype(q, kc, vc))))
    return Call((q, kc, vc, tables, np.array(lens)), kw, draw(isas))


@st.composite
def apply_rotary_calls(draw):
    """x (..., L, D) with even D in any layout and dtype, integer positions
    broadcasting to x.shape[:-1] (including large ones), both layouts."""
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    L = draw(st.sampled_from([1, 2, 7, 33]))
    D = draw(st.sampled_from([2, 4, 6, 16, 34, 64]))
    x = draw(float_input(lead + (L, D), dtypes=KEPT_HALF_INPUTS))
    rng = np.random.default_rng(draw(seeds))
    far = draw(st.sampled_from([1, 1, 100_000]))
    pos = rng.integers(0, L * far, size=draw(st.sampled_from([(L,), lead + (L,)])))
    kw = dict(layout=draw(st.sampled_from(["neox", "gptj"])),
              base=draw(st.sampled_from([10000.0, 500.0, 1e6])))
    if draw(st.booleans()):
        kw["num_threads"] = draw(thread_counts)
    kw.update(draw(out_kwarg(x.shape, fastattn._validation.compute_dtype(x.dtype, "x"))))
    return Call((x, pos), kw, draw(isas))


@st.composite
def alibi_slopes_calls(draw):
    """Head counts that are and are not powers of two."""
    return Call((draw(st.integers(1, 80)),), {}, draw(isas))


@st.composite
def sequence_mask_calls(draw):
    shape = draw(lead_shape(draw(st.integers(0, 3)), 40, zero=True))
    top = draw(st.sampled_from([0, 1, 5, 17, 64]))
    lengths = draw(lengths_values(shape, top))
    kw = {}
    if draw(st.booleans()):
        kw["maxlen"] = draw(st.integers(0, 70))
    elif not lengths.size:
        kw["maxlen"] = draw(st.integers(0, 5))
    if draw(st.booleans()):
        kw["dtype"] = draw(st.sampled_from([bool, np.float32, np.float64, np.int32, np.uint8]))
    as_list = draw(st.integers(0, 4)) == 0
    return Call((lengths.tolist() if as_list else lengths,), kw, draw(isas))


@st.composite
def apply_sequence_mask_calls(draw):
    budget = draw(budgets)
    ndim = draw(st.integers(2, 4))
    shape = draw(lead_shape(ndim - 1, budget, zero=True))
    B = draw(axis_length(min(budget, 9), zero=True))
    shape = (B,) + shape
    x = draw(float_input(shape))
    axis = draw(st.integers(1, ndim - 1))
    L = shape[axis]
    lengths = draw(lengths_values((B,), L))
    if draw(st.booleans()):
        lengths = lengths.reshape(B, 1)
    kw = {"mode": draw(st.sampled_from(["mul", "add"]))}
    if draw(st.booleans()) or axis != 1:
        kw["axis"] = axis - ndim if draw(st.booleans()) else axis
    kw["num_threads"] = draw(thread_counts)
    inplace = _maybe_inplace(draw, x, kw)
    if not inplace:
        kw.update(draw(out_kwarg(shape, fastattn._validation.compute_dtype(x.dtype, "x"))))
    return Call((x, lengths), kw, draw(isas), inplace)


@st.composite
def split_heads_calls(draw):
    budget = draw(budgets)
    H = draw(axis_length(min(budget, 16)))
    D = draw(axis_length(max(1, budget // H), zero=True))
    S = draw(axis_length(max(1, budget // max(H * D, 1)), zero=True))
    B = draw(axis_length(max(1, min(9, budget // max(H * D * S, 1))), zero=True))
    x = draw(float_input((B, S, H * D), dtypes=KEPT_HALF_INPUTS))
    heads = draw(st.sampled_from([H, np.int64(H), np.int32(H)]))
    kw = {"num_threads": draw(thread_counts)}
    kw.update(draw(out_kwarg((B, H, S, D), fastattn._validation.compute_dtype(x.dtype, "x"))))
    return Call((x, heads), kw, draw(isas))


@st.composite
def merge_heads_calls(draw):
    budget = draw(budgets)
    H = draw(axis_length(min(budget, 16), zero=True))
    D = draw(axis_length(max(1, budget // max(H, 1)), zero=True))
    S = draw(axis_length(max(1, budget // max(H * D, 1)), zero=True))
    B = draw(axis_length(max(1, min(9, budget // max(H * D * S, 1))), zero=True))
    x = draw(float_input((B, H, S, D), dtypes=KEPT_HALF_INPUTS))
    kw = {"num_threads": draw(thread_counts)}
    kw.update(draw(out_kwarg((B, S, H * D), fastattn._validation.compute_dtype(x.dtype, "x"))))
    return Call((x,), kw, draw(isas))


@st.composite
def _pe_options(draw, dtype, length):
    kw = {}
    if draw(st.booleans()):
        kw["layout"] = draw(st.sampled_from(["concat", "interleaved"]))
    # positions up to 1e6 in both dtypes: the comparison allows for the
    # rounding of the float64 angle (conftest.assert_close_angles)
    top = 10**6
    start = draw(st.one_of(st.just(0), st.integers(0, 50), st.integers(0, max(0, top - length))))
    if start or draw(st.booleans()):
        kw["start_index"] = start
    if draw(st.booleans()):
        # min_timescale <= max_timescale (a reversed pair is refused),
        # equal included; an int among them
        lo = draw(st.sampled_from([1.0, 0.5, 2.0, 3]))
        kw["min_timescale"] = lo
        kw["max_timescale"] = draw(st.sampled_from([v for v in (1.0e4, 100.0, 1.0, 1.0e5, 5.0, lo)
                                                    if v >= lo]))
    return kw


@st.composite
def sinusoidal_position_encoding_calls(draw):
    budget = draw(budgets)
    channels = draw(axis_length(min(budget, 600)))
    length = draw(axis_length(max(1, budget // channels), zero=True))
    dtype = draw(float_dtypes)
    kw = draw(_pe_options(dtype, length))
    kw["dtype"] = draw(st.sampled_from([dtype, dtype.name, dtype.type]))
    kw["num_threads"] = draw(thread_counts)
    kw.update(draw(out_kwarg((length, channels), dtype)))
    return Call((length, channels), kw, draw(isas))


@st.composite
def add_position_encoding_calls(draw):
    budget = draw(budgets)
    C = draw(axis_length(min(budget, 600)))
    L = draw(axis_length(max(1, budget // C), zero=True))
    lead = draw(lead_shape(draw(st.integers(0, 2)), max(1, budget // max(L * C, 1)), zero=True))
    x = draw(float_input(lead + (L, C)))
    dtype = fastattn._validation.compute_dtype(x.dtype, "x")
    kw = draw(_pe_options(dtype, L))
    kw["num_threads"] = draw(thread_counts)
    inplace = _maybe_inplace(draw, x, kw)
    if not inplace:
        kw.update(draw(out_kwarg(x.shape, dtype)))
    return Call((x,), kw, draw(isas), inplace)


# ---- small fixed calls of every kernel ----------------------------------------


def _small_inputs():
    rng = np.random.default_rng(12345)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    arrays = {
        "scores": f32(2, 3, 5, 7),
        "mask": rng.random((5, 7)) < 0.7,
        "klen": np.array([4, 7]),
        "qlen": np.array([5, 3]),
        "x3": f32(2, 6, 8),
        "x4": f32(2, 2, 6, 4),
        "lengths": np.array([3, 6]),
        "q": f32(2, 4, 5, 8),
        "k": f32(2, 2, 9, 8),
        "v": f32(2, 2, 9, 3),
        "slopes": np.array([0.5, 0.25, 0.125, 0.0625]),
        "positions": np.array([0, 5, 9, 1000, 7, 3]),
    }
    for a in arrays.values():
        a.flags.writeable = False  # shared read-only inputs
    return arrays


SMALL = _small_inputs()

# name -> zero-argument call on SMALL's read-only inputs. A new public kernel
# is one entry here (the concurrency, fork and memory tests pick it up).
SMALL_CALLS = {
    "masked_softmax": lambda **kw: fastattn.masked_softmax(
        SMALL["scores"], attn_mask=SMALL["mask"], key_lengths=SMALL["klen"],
        query_lengths=SMALL["qlen"], is_causal=True, causal_alignment="bottom_right",
        scale=0.5, **kw),
    "sequence_mask": lambda **kw: fastattn.sequence_mask(SMALL["lengths"], 8),
    "apply_sequence_mask": lambda **kw: fastattn.apply_sequence_mask(
        SMALL["x3"], SMALL["lengths"], mode="add", **kw),
    "split_heads": lambda **kw: fastattn.split_heads(SMALL["x3"], 2, **kw),
    "merge_heads": lambda **kw: fastattn.merge_heads(SMALL["x4"], **kw),
    "sinusoidal_position_encoding": lambda **kw: fastattn.sinusoidal_position_encoding(
        6, 10, start_index=3, **kw),
    "add_position_encoding": lambda **kw: fastattn.add_position_encoding(
        SMALL["x3"], layout="interleaved", **kw),
    "scaled_dot_product_attention": lambda **kw: fastattn.scaled_dot_product_attention(
        SMALL["q"], SMALL["k"], SMALL["v"], key_lengths=SMALL["klen"] + 2, query_lengths=SMALL["qlen"], is_causal=True,
        causal_alignment="bottom_right", alibi_slopes=SMALL["slopes"], **kw),
    "apply_rotary": lambda **kw: fastattn.apply_rotary(
        SMALL["x4"], SMALL["positions"], layout="gptj", **kw),
}
# kernels that take num_threads= (sequence_mask is pure NumPy)
THREADED = {name for name in SMALL_CALLS if name != "sequence_mask"}


@st.composite
def quantize_kv_calls(draw):
    """Rows of any length in any layout and real dtype (rounded to float32)."""
    shape = draw(lead_shape(draw(st.integers(0, 3)), 40, zero=True)) + (draw(st.integers(1, 70)),)
    kw = {}
    if draw(st.booleans()):
        kw["num_threads"] = draw(st.integers(1, 3))
    return Call((draw(float_input(shape)),), kw, draw(isas))


@st.composite
def dequantize_kv_calls(draw):
    """int8 values in a drawn layout with float32 scales, zero scales included."""
    shape = draw(lead_shape(draw(st.integers(0, 3)), 40, zero=True)) + (draw(st.integers(1, 70)),)
    rng = np.random.default_rng(draw(seeds))
    values = rng.integers(-127, 128, shape).astype(np.int8)
    scales = (rng.random(shape[:-1]) * draw(st.sampled_from([0.0, 1e-3, 1.0]))).astype(np.float32)
    return Call((draw(laid_out(values)), scales), {}, draw(isas))
