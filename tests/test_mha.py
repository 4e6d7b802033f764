"""MultiHeadAttention, KVCache and the BLAS projections against the oracle
(fastattn.reference.multi_head_attention): self- and cross-attention, every
mask, GQA/MQA, RoPE, padding, return_weights, KV-cache decoding, state, and
validation."""

import io
import subprocess
import sys

import numpy as np
import pytest

import fastattn
from fastattn import _kernels
from fastattn import reference as ref
from fastattn.projections import linear as _linear
from conftest import N_THREADS, assert_close
from test_cuda import backend  # noqa: F401 - the emulated (or real) CUDA backend fixture

# (E, H, Hkv, kdim, vdim, bias, rope): awkward head dims (5, 3, 6), GQA,
# MQA, separate kdim/vdim, no bias, both RoPE layouts
CONFIGS = [
    (20, 4, None, None, None, True, None),
    (24, 6, 2, None, None, True, "neox"),
    (36, 6, 1, None, None, False, "gptj"),
    (32, 4, 2, 12, 7, True, None),
    (30, 5, None, 11, 11, False, "neox"),
    (64, 2, 1, None, None, True, "gptj"),
]

SELF_CONFIGS = [c for c in CONFIGS if c[3] is None and c[4] is None]


@pytest.fixture
def layer_threads(threads):
    """Run the layer's kernels with `threads` threads, then restore."""
    before = fastattn._config._num_threads
    fastattn.set_num_threads(threads)
    try:
        yield threads
    finally:
        fastattn.set_num_threads(before)


def _layer(cfg, dtype, seed=0):
    E, H, Hkv, kdim, vdim, bias, rope = cfg
    m = fastattn.MultiHeadAttention(E, H, num_kv_heads=Hkv, kdim=kdim, vdim=vdim, bias=bias,
                                    rope=rope, dtype=dtype, seed=seed)
    if bias:  # non-zero biases, so that they are exercised
        rng = np.random.default_rng(seed + 1)
        d = m.state_dict()
        m.load_state_dict({n: a + rng.standard_normal(a.shape) * 0.1 if n.startswith("b") else a
                           for n, a in d.items()})
    return m


def _oracle(m, x, key=None, value=None, **kw):
    return ref.multi_head_attention(m.state_dict(), x, key, value, num_heads=m.num_heads,
                                    num_kv_heads=m.num_kv_heads, rope=m.rope,
                                    rope_base=m.rope_base, **kw)


def _mask_kwargs(rng, B, H, Lq, Lk, kind):
    if kind == "none":
        return {}
    if kind == "causal":
        return dict(is_causal=True)
    if kind == "lengths":
        return dict(key_lengths=rng.integers(0, Lk + 1, size=B), query_lengths=rng.integers(0, Lq + 1, size=B))
    if kind == "head_lengths":
        return dict(key_lengths=rng.integers(1, Lk + 1, size=(B, H)))
    if kind == "bool":
        return dict(attn_mask=rng.random((B, 1, Lq, Lk)) > 0.3)
    if kind == "additive":
        add = rng.standard_normal((Lq, Lk))
        add[rng.random((Lq, Lk)) < 0.2] = -np.inf
        return dict(attn_mask=add)
    if kind == "everything":
        return dict(attn_mask=rng.random((H, Lq, Lk)) > 0.2, key_lengths=rng.integers(1, Lk + 1, size=B),
                    query_lengths=rng.integers(0, Lq + 1, size=B), is_causal=True)
    raise ValueError(kind)


MASKS = ["none", "causal", "lengths", "head_lengths", "bool", "additive", "everything"]


@pytest.mark.parametrize("cfg", SELF_CONFIGS, ids=str)
@pytest.mark.parametrize("masks", MASKS)
def test_self_attention_against_oracle(isa, layer_threads, dtype, rng, cfg, masks):
    m = _layer(cfg, dtype)
    B, L = 3, 13
    x = rng.standard_normal((B, L, m.embed_dim)).astype(dtype)
    kw = _mask_kwargs(rng, B, m.num_heads, L, L, masks)
    got = m(x, **kw)
    assert_close(got, _oracle(m, x, **kw))
    assert not np.isnan(got).any()


@pytest.mark.parametrize("cfg", SELF_CONFIGS, ids=str)
@pytest.mark.parametrize("masks", ["none", "everything"])
def test_query_passed_as_key_and_value_is_self_attention(dtype, rng, cfg, masks):
    """m(x, x, x), torch's spelling of self-attention, takes the fused QKV
    projection: the same bits as m(x), and the oracle's cross-attention."""
    m = _layer(cfg, dtype)
    B, L = 2, 11
    x = rng.standard_normal((B, L, m.embed_dim)).astype(dtype)
    kw = _mask_kwargs(rng, B, m.num_heads, L, L, masks)
    got = m(x, x, x, **kw)
    np.testing.assert_array_equal(got, m(x, **kw))
    assert_close(got, _oracle(m, x, x, x, **kw))


@pytest.mark.parametrize("cfg,same_kv", [(c, s) for c in CONFIGS for s in (True, False)
                                         if not (s and c[3] != c[4])], ids=str)
@pytest.mark.parametrize("masks", ["none", "causal", "lengths", "everything"])
def test_cross_attention_against_oracle(isa, layer_threads, dtype, rng, cfg, masks, same_kv):
    m = _layer(cfg, dtype)
    B, Lq, Lk = 2, 7, 19
    x = rng.standard_normal((B, Lq, m.embed_dim)).astype(dtype)
    key = rng.standard_normal((B, Lk, m.kdim)).astype(dtype)
    value = key if same_kv else rng.standard_normal((B, Lk, m.vdim)).astype(dtype)
    kw = _mask_kwargs(rng, B, m.num_heads, Lq, Lk, masks)
    assert_close(m(x, key, value, **kw), _oracle(m, x, key, value, **kw))


@pytest.mark.parametrize("L", [1, 2, 6, 7, 64, 130])
def test_sizes_around_gemv_and_tiles(dtype, rng, L):
    # up to 12 rows (B * L) go through GEMV, more through GEMM; 130 crosses
    # the SDPA tiles
    m = _layer((48, 3, None, None, None, True, "neox"), dtype)
    x = rng.standard_normal((2, L, 48)).astype(dtype)
    kw = dict(is_causal=True, key_lengths=[L, max(L // 2, 1)])
    assert_close(m(x, **kw), _oracle(m, x, **kw))


def test_padded_query_rows_are_exactly_zero_and_never_read(dtype, rng):
    m = _layer(CONFIGS[1], dtype)
    B, L = 3, 10
    x = rng.standard_normal((B, L, m.embed_dim)).astype(dtype)
    lengths = np.array([10, 4, 0])
    want = _oracle(m, x, key_lengths=lengths, query_lengths=lengths)
    # rows past the lengths are padding: garbage there must not leak anywhere
    x_bad = x.copy()
    for b, n in enumerate(lengths):
        x_bad[b, n:] = np.nan
    got = m(x_bad, key_lengths=lengths, query_lengths=lengths)
    assert_close(got, want)
    assert (got[1, 4:] == 0).all() and (got[2] == 0).all()  # the output bias is not added there
    assert m._b_o is not None and np.abs(m._b_o).max() > 0


def test_return_weights(dtype, rng):
    m = _layer(CONFIGS[1], dtype)
    B, L = 2, 9
    x = rng.standard_normal((B, L, m.embed_dim)).astype(dtype)
    mask = np.ones((L, L), bool)
    mask[3] = False  # a fully masked row
    kw = dict(attn_mask=mask, key_lengths=[9, 5], query_lengths=[9, 7], is_causal=True)
    out, w = m(x, return_weights=True, **kw)
    ref_out, ref_w = _oracle(m, x, return_weights=True, **kw)
    assert w.shape == (B, m.num_heads, L, L)
    assert_close(out, ref_out)
    assert_close(w, ref_w)
    assert (w[:, :, 3] == 0).all() and not np.isnan(w).any() and not np.isnan(out).any()
    # a fully masked row outputs the output bias alone
    np.testing.assert_allclose(out[:, 3], np.broadcast_to(m.state_dict()["b_o"], (B, m.embed_dim)),
                               rtol=1e-6)


def test_gqa_equals_repeated_kv_heads(rng):
    # GQA with Hkv heads == MHA whose K/V weights repeat each kv head's columns
    E, H, Hkv = 24, 6, 2
    D = E // H
    g = fastattn.MultiHeadAttention(E, H, num_kv_heads=Hkv, seed=3)
    d = g.state_dict()
    rep = lambda w: np.repeat(w.reshape(w.shape[0], Hkv, D), H // Hkv, axis=1).reshape(w.shape[0], H * D)
    full = fastattn.MultiHeadAttention.from_weights(d["w_q"], rep(d["w_k"]), rep(d["w_v"]), d["w_o"],
                                                    d["b_q"], rep(d["b_k"][None])[0], rep(d["b_v"][None])[0],
                                                    d["b_o"], num_heads=H)
    x = rng.standard_normal((2, 5, E)).astype(np.float32)
    assert_close(g(x, is_causal=True), full(x, is_causal=True))


# ---- KV cache -------------------------------------------------------------

CACHE_CONFIGS = [CONFIGS[0], CONFIGS[1], CONFIGS[2], CONFIGS[5]]


@pytest.mark.parametrize("cfg", CACHE_CONFIGS, ids=str)
def test_decode_token_by_token_equals_full_causal_call(isa, layer_threads, dtype, rng, cfg):
    m = _layer(cfg, dtype)
    B, T = 2, 11
    x = rng.standard_normal((B, T, m.embed_dim)).astype(dtype)
    full = m(x, is_causal=True)
    assert_close(full, _oracle(m, x, is_causal=True))
    cache = m.new_cache(B, T)
    k_buf, v_buf = cache.k, cache.v
    steps = [m(x[:, t:t + 1], cache=cache) for t in range(T)]
    assert cache.k is k_buf and cache.v is v_buf  # appended in place, never reallocated
    assert cache.lengths.tolist() == [T, T]
    assert_close(np.concatenate(steps, axis=1), full)


@pytest.mark.parametrize("cfg", CACHE_CONFIGS, ids=str)
def test_prefill_then_chunks(dtype, rng, cfg):
    m = _layer(cfg, dtype)
    B, T = 2, 16
    x = rng.standard_normal((B, T, m.embed_dim)).astype(dtype)
    full = _oracle(m, x, is_causal=True)
    cache = m.new_cache(B, 20)
    parts = [m(x[:, :7], cache=cache), m(x[:, 7:8], cache=cache), m(x[:, 8:13], cache=cache),
             m(x[:, 13:], cache=cache)]
    assert_close(np.concatenate(parts, axis=1), full)


@pytest.mark.parametrize("cfg", CACHE_CONFIGS, ids=str)
def test_ragged_cache(dtype, rng, cfg):
    # three sequences of different lengths decoded together: each step
    # appends query_lengths[b] tokens to sequence b
    m = _layer(cfg, dtype)
    E = m.embed_dim
    seqs = [rng.standard_normal((n, E)).astype(dtype) for n in (9, 4, 12)]
    cache = m.new_cache(3, 12)
    prompt = np.array([5, 1, 3])
    chunks = [prompt, [2, 0, 4], [1, 1, 1], [0, 2, 3], [1, 0, 1]]
    pos = np.zeros(3, int)
    outs = [[] for _ in seqs]
    for chunk in chunks:
        chunk = np.asarray(chunk)
        L = int(chunk.max())
        xb = np.zeros((3, L, E), dtype)
        for b, s in enumerate(seqs):
            xb[b, :chunk[b]] = s[pos[b]:pos[b] + chunk[b]]
        y, w = m(xb, cache=cache, query_lengths=chunk, return_weights=True)
        for b in range(3):
            assert (y[b, chunk[b]:] == 0).all()
            outs[b].append(y[b, :chunk[b]])
            # weights over the keys the sequence holds, 0 past them
            assert (w[b, :, :, pos[b] + chunk[b]:] == 0).all()
        pos += chunk
    assert cache.lengths.tolist() == pos.tolist()
    for b, s in enumerate(seqs):
        n = pos[b]
        want = _oracle(m, s[None, :n], is_causal=True)[0]
        assert_close(np.concatenate(outs[b], axis=0), want)


def test_cache_weights_match_full_call(dtype, rng):
    m = _layer(CONFIGS[1], dtype)
    x = rng.standard_normal((2, 6, m.embed_dim)).astype(dtype)
    _, w_full = m(x, is_causal=True, return_weights=True)
    cache = m.new_cache(2, 8)
    m(x[:, :4], cache=cache)
    _, w = m(x[:, 4:], cache=cache, return_weights=True)
    assert w.shape == (2, m.num_heads, 2, 6)
    assert_close(w, w_full[:, :, 4:])


def test_cache_overflow_raises_and_leaves_cache_unchanged(rng):
    m = _layer(CONFIGS[1], np.float32)
    cache = m.new_cache(2, 5)
    x = rng.standard_normal((2, 4, m.embed_dim)).astype(np.float32)
    m(x, cache=cache, query_lengths=[4, 2])
    k, v, lengths = cache.k.copy(), cache.v.copy(), cache.lengths
    with pytest.raises(ValueError, match=r"KV cache overflow: sequence 0 holds 4 of max_len=5 tokens and cannot take 2 more; nothing was appended"):
        m(x[:, :2], cache=cache)
    assert np.array_equal(cache.k, k) and np.array_equal(cache.v, v)
    assert cache.lengths.tolist() == lengths.tolist()
    m(x[:, :1], cache=cache)  # one more still fits
    assert cache.lengths.tolist() == [5, 3]


def test_cache_validation(rng):
    m = _layer(CONFIGS[1], np.float32)
    x = rng.standard_normal((2, 3, m.embed_dim)).astype(np.float32)
    with pytest.raises(ValueError, match=r"cache is for a batch of 3, got query \(2, 3, 24\)"):
        m(x, cache=m.new_cache(3, 8))
    other = fastattn.MultiHeadAttention(24, 6, seed=0)  # 6 kv heads, not 2
    with pytest.raises(ValueError, match=r"cache holds 6 kv heads of dim 4 in float32; this layer needs 2"):
        m(x, cache=other.new_cache(2, 8))
    with pytest.raises(ValueError, match=r"key and value must be None"):
        m(x, x, x, cache=m.new_cache(2, 8))
    with pytest.raises(ValueError, match=r"not accepted with cache="):
        m(x, key_lengths=[1, 2], cache=m.new_cache(2, 8))
    with pytest.raises(TypeError, match=r"cache must be a KVCache"):
        m(x, cache={})
    cross = fastattn.MultiHeadAttention(24, 6, kdim=8, vdim=8, seed=0)
    with pytest.raises(ValueError, match=r"cache= is self-attention and needs kdim == vdim == embed_dim \(24\)"):
        cross(x, cache=cross.new_cache(2, 8))
    c = m.new_cache(2, 8)
    m(x, cache=c)
    c.reset(lengths=[1, 2])
    assert c.lengths.tolist() == [1, 2]
    with pytest.raises(ValueError, match=r"reset can only shorten"):
        c.reset(lengths=[3, 3])
    c.reset()
    assert c.lengths.tolist() == [0, 0]
    assert "KVCache(batch_size=2, max_len=8, num_kv_heads=2, head_dim=4" in repr(c)


# ---- construction and state -------------------------------------------------

def test_init_like_torch():
    E, H = 64, 4
    m = fastattn.MultiHeadAttention(E, H, seed=0)
    d = m.state_dict()
    bound = np.sqrt(6.0 / (E + 3 * E))  # Xavier over the stacked (3E, E) in_proj_weight
    w_in = np.concatenate([d["w_q"], d["w_k"], d["w_v"]], axis=1)
    assert np.abs(w_in).max() <= bound and np.abs(w_in).max() > 0.95 * bound
    assert np.abs(d["w_o"]).max() <= 1 / np.sqrt(E)
    assert all((d[n] == 0).all() for n in ("b_q", "b_k", "b_v", "b_o"))
    assert d["w_q"].dtype == np.float32 and d["w_q"].shape == (E, E)
    again = fastattn.MultiHeadAttention(E, H, seed=0).state_dict()
    assert all(np.array_equal(d[n], again[n]) for n in ("w_q", "w_o"))
    sep = fastattn.MultiHeadAttention(E, H, kdim=10, vdim=20, bias=False, seed=0).state_dict()
    assert sep["w_k"].shape == (10, E) and sep["w_v"].shape == (20, E)
    assert np.abs(sep["w_k"]).max() <= np.sqrt(6.0 / (10 + E))
    assert sep["b_q"] is None and sep["b_o"] is None


def test_attributes_for_other_backends():
    m = fastattn.MultiHeadAttention(48, 6, num_kv_heads=2, kdim=40, vdim=40, rope="gptj", rope_base=5e5)
    assert (m.embed_dim, m.num_heads, m.num_kv_heads, m.head_dim, m.kdim, m.vdim) == (48, 6, 2, 8, 40, 40)
    assert (m.rope, m.rope_base) == ("gptj", 5e5)
    d = m.state_dict()
    assert set(d) == {"w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o"}
    assert d["w_k"].shape == (40, 16) and d["w_o"].shape == (48, 48) and d["b_k"].shape == (16,)
    d["w_q"][...] = 0  # a copy: the layer is untouched
    assert np.abs(m.state_dict()["w_q"]).max() > 0


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_state_roundtrips(tmp_path, dtype, rng, cfg):
    m = _layer(cfg, dtype, seed=5)
    x = rng.standard_normal((2, 4, m.embed_dim)).astype(dtype)
    kv = rng.standard_normal((2, 6, m.kdim)).astype(dtype)
    vv = rng.standard_normal((2, 6, m.vdim)).astype(dtype)
    want = m(x, kv, vv)
    d = m.state_dict()
    fw = fastattn.MultiHeadAttention.from_weights(*(d[n] for n in ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o")),
                                                  num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
                                                  rope=m.rope)
    assert np.array_equal(fw(x, kv, vv), want)
    E, H, Hkv, kdim, vdim, bias, rope = cfg
    fresh = fastattn.MultiHeadAttention(E, H, num_kv_heads=Hkv, kdim=kdim, vdim=vdim, bias=bias, rope=rope,
                                        dtype=dtype, seed=99)
    fresh.load_state_dict(d)
    assert np.array_equal(fresh(x, kv, vv), want)
    m.save(tmp_path / "layer")
    loaded = fastattn.MultiHeadAttention.load(tmp_path / "layer")  # .npz added as numpy does
    assert loaded.dtype == dtype and (loaded.rope, loaded.num_kv_heads) == (m.rope, m.num_kv_heads)
    assert np.array_equal(loaded(x, kv, vv), want)


def test_from_weights_rules(rng):
    E = 8
    w = lambda *s: rng.standard_normal(s)
    m = fastattn.MultiHeadAttention.from_weights(w(E, E), w(E, E), w(E, E), w(E, E), b_o=w(E), num_heads=2)
    assert m.dtype == np.float64  # the weights' dtype
    d = m.state_dict()
    assert (d["b_q"] == 0).all() and d["b_o"].shape == (E,)  # missing biases are zeros
    m32 = fastattn.MultiHeadAttention.from_weights(*(w(E, E).astype(np.float32) for _ in range(4)), num_heads=4)
    assert m32.dtype == np.float32 and m32.state_dict()["b_q"] is None and m32.head_dim == 2
    # H*D need not equal E; K/V of another width
    m2 = fastattn.MultiHeadAttention.from_weights(w(8, 12), w(5, 6), w(5, 6), w(12, 8), num_heads=4, num_kv_heads=2)
    assert (m2.head_dim, m2.kdim, m2.num_kv_heads) == (3, 5, 2)
    with pytest.raises(ValueError, match=r"w_k must have shape \(5, 6\), got \(5, 7\)"):
        fastattn.MultiHeadAttention.from_weights(w(8, 12), w(5, 7), w(5, 6), w(12, 8), num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match=r"w_o must have shape \(12, 8\), got \(8, 12\)"):
        fastattn.MultiHeadAttention.from_weights(w(8, 12), w(5, 6), w(5, 6), w(8, 12), num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match=r"multiple of num_heads \(5\)"):
        fastattn.MultiHeadAttention.from_weights(w(8, 12), w(5, 6), w(5, 6), w(12, 8), num_heads=5)
    with pytest.raises(ValueError, match=r"b_q must have shape \(12,\), got \(8,\)"):
        fastattn.MultiHeadAttention.from_weights(w(8, 12), w(5, 6), w(5, 6), w(12, 8), w(8), num_heads=4,
                                                 num_kv_heads=2)


def test_load_state_dict_is_strict_and_atomic():
    m = fastattn.MultiHeadAttention(8, 2, seed=0)
    before = m.state_dict()
    bad = dict(before, w_q=np.ones((8, 8)), b_o=np.ones(7))
    with pytest.raises(ValueError, match=r"b_o must have shape \(8,\), got \(7,\)"):
        m.load_state_dict(bad)
    assert np.array_equal(m.state_dict()["w_q"], before["w_q"])  # nothing was copied
    with pytest.raises(ValueError, match=r"state has no b_q, but the layer has biases"):
        m.load_state_dict(dict(before, b_q=None))
    nb = fastattn.MultiHeadAttention(8, 2, bias=False)
    with pytest.raises(ValueError, match=r"state has b_q, but the layer has no biases"):
        nb.load_state_dict(before)
    with pytest.raises(ValueError, match=r"state is missing w_v"):
        m.load_state_dict({n: a for n, a in before.items() if n != "w_v"})


def test_constructor_validation():
    MHA = fastattn.MultiHeadAttention
    with pytest.raises(ValueError, match=r"embed_dim \(10\) must be divisible by num_heads \(4\)"):
        MHA(10, 4)
    with pytest.raises(ValueError, match=r"num_kv_heads \(3\) must divide num_heads \(4\)"):
        MHA(8, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match=r"rope must be None or one of \['neox', 'gptj'\]"):
        MHA(8, 2, rope="llama")
    with pytest.raises(ValueError, match=r"rope needs an even head_dim, got 3"):
        MHA(9, 3, rope="neox")
    with pytest.raises(TypeError, match=r"dtype must be float32, float64, bfloat16 or float16"):
        MHA(8, 2, dtype=np.int16)
    with pytest.raises(ValueError, match=r"num_heads must be >= 1"):
        MHA(8, 0)


def test_call_validation(rng):
    m = fastattn.MultiHeadAttention(8, 2, seed=0)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=r"query must have shape \(B, L, 8\), got \(2, 3, 7\)"):
        m(x[..., :7])
    with pytest.raises(ValueError, match=r"query must have shape \(B, L, 8\), got \(3, 8\)"):
        m(x[0])
    with pytest.raises(ValueError, match=r"pass both key and value"):
        m(x, x)
    with pytest.raises(ValueError, match=r"same batch size.*query \(2, 3, 8\), key \(1, 3, 8\)"):
        m(x, x[:1], x[:1])
    with pytest.raises(ValueError, match=r"key \(2, 3, 8\), value \(2, 2, 8\)"):
        m(x, x, x[:, :2])
    with pytest.raises(ValueError, match=r"attn_mask of shape \(4, 4\) does not broadcast to the scores shape \(2, 2, 3, 3\)"):
        m(x, attn_mask=np.ones((4, 4), bool))
    with pytest.raises(ValueError, match=r"key_lengths must be <= the key length 3"):
        m(x, key_lengths=[4, 1])
    with pytest.raises(ValueError, match=r"query_lengths must have shape \(2,\) for a batch of 2, got \(2, 2\)"):
        m(x, query_lengths=[[1, 1], [1, 1]])
    with pytest.raises(ValueError, match=r"query_lengths must be <= the query length 3"):
        m(x, query_lengths=[4, 1])
    with pytest.raises(TypeError, match=r"query has unsupported dtype complex64"):
        m(x.astype(np.complex64))
    sep = fastattn.MultiHeadAttention(8, 2, kdim=4, vdim=4)
    with pytest.raises(ValueError, match=r"self-attention needs kdim == vdim == embed_dim"):
        sep(x)


def test_inputs_are_converted(rng):
    m = fastattn.MultiHeadAttention(8, 2, seed=0)
    x = rng.standard_normal((2, 3, 8))
    want = m(x.astype(np.float32))
    assert m(x).dtype == np.float32
    assert_close(m(x), want)
    assert_close(m(np.asfortranarray(x)), want)
    assert_close(m(x.tolist()), want)
    big = np.zeros((2, 3, 16))
    big[..., ::2] = x
    assert_close(m(big[..., ::2]), want)


def test_empty_shapes():
    m = fastattn.MultiHeadAttention(8, 2, seed=0)
    assert m(np.zeros((0, 3, 8))).shape == (0, 3, 8)
    assert m(np.zeros((2, 0, 8))).shape == (2, 0, 8)
    out = m(np.ones((2, 3, 8)), np.zeros((2, 0, 8)), np.zeros((2, 0, 8)))
    assert out.shape == (2, 3, 8) and not np.isnan(out).any()
    cache = m.new_cache(2, 4)
    assert m(np.zeros((2, 0, 8)), cache=cache).shape == (2, 0, 8)
    assert cache.lengths.tolist() == [0, 0]


def test_import_does_not_import_torch():
    code = "import sys, fastattn; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(fastattn.__file__).parents[1]))


# ---- the pieces: BLAS projections and the strided head layouts --------------

@pytest.mark.parametrize("M", [0, 1, 2, 12, 13, 40])
def test_blas_matmul(dtype, rng, M):
    B, K, N = 3, 9, 11
    a = rng.standard_normal((B, M, K)).astype(dtype)
    wide = rng.standard_normal((K, N + 5)).astype(dtype)
    w = wide[:, 2:2 + N]  # a column block: ld = N + 5
    bias = rng.standard_normal(N).astype(dtype)
    want = a.astype(np.float64) @ w.astype(np.float64) + bias
    c = np.full((B, M, N + 4), np.nan, dtype)[:, :, 1:1 + N]
    _linear(a, w, c, bias)
    assert_close(c, want.astype(dtype))
    c2 = np.zeros((B, M, N), dtype)
    start, stop = np.array([0, min(1, M), M], np.int64), np.array([M, M, M], np.int64)
    _linear(a, w, c2, None, start, stop, 2.0)
    for b, (r0, r1) in enumerate(zip(start, stop)):
        assert_close(c2[b, r0:r1], (2 * a[b, r0:r1].astype(np.float64) @ w).astype(dtype))
        assert (c2[b, :r0] == 0).all() and (c2[b, r1:] == 0).all()


def test_blas_matmul_k0_and_errors(rng):
    a = np.zeros((1, 2, 0), np.float32)
    c = np.full((1, 2, 3), np.nan, np.float32)
    _linear(a, np.zeros((0, 3), np.float32), c, np.arange(3, dtype=np.float32))
    assert (c == np.arange(3)).all()
    x = np.zeros((1, 2, 3), np.float32)
    with pytest.raises(TypeError, match="share one dtype"):
        _linear(x, np.zeros((3, 2)), np.zeros((1, 2, 2), np.float32))
    with pytest.raises(ValueError, match="unit last-axis stride"):
        _linear(np.zeros((1, 2, 6), np.float32)[..., ::2], np.zeros((3, 2), np.float32),
                     np.zeros((1, 2, 2), np.float32))
    # a weight with no unit stride on either axis, and a transposed one
    # whose (N, K) rows overlap
    with pytest.raises(ValueError, match="w needs a unit stride on its last or first axis"):
        _linear(x, np.zeros((6, 4), np.float32)[::2, ::2], np.zeros((1, 2, 2), np.float32))
    overlapping = np.lib.stride_tricks.as_strided(np.zeros(8, np.float32), (3, 2), (4, 8))
    with pytest.raises(ValueError, match=r"the rows of w \(2, 3\) overlap"):
        _linear(x, overlapping, np.zeros((1, 2, 2), np.float32))
    with pytest.raises(ValueError, match=r"w has shape \(4, 2\), expected \(3, 2\)"):
        _linear(x, np.zeros((4, 2), np.float32), np.zeros((1, 2, 2), np.float32))
    with pytest.raises(ValueError, match="row_stop out of range"):
        _linear(x, np.zeros((3, 2), np.float32), np.zeros((1, 2, 2), np.float32), None,
                     None, np.array([3], np.int64))


def _weight(rng, K, N, dtype, layout):
    """A (K, N) weight: row-major, or the transpose of a (N, K) matrix with
    padded rows (torch's nn.Linear layout, read in place)."""
    if layout == "rows":
        return rng.standard_normal((K, N)).astype(dtype)
    return rng.standard_normal((N, K + 3)).astype(dtype)[:, 1:1 + K].T


@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("w_layout", ["rows", "transposed"])
def test_linear_edge_cases(dtype, rng, nthreads, with_bias, w_layout):
    # csrc/linear.c against NumPy in float64: rows 1..13 cross the GEMV/GEMM
    # switch (GEMV_MAX_ROWS = 12), N = 77 is not a multiple of a 64-byte line,
    # K = 300 makes rows >= 12 large enough to split over 2 threads; a and c
    # are column blocks of wider buffers, once evenly spaced (one BLAS call
    # over all batches) and once with padded batches (one call per batch),
    # and per-batch row ranges leave every other row untouched
    B, K, N = 3, 300, 77
    w = _weight(rng, K, N, dtype, w_layout)
    bias = rng.standard_normal(N).astype(dtype) if with_bias else None
    for M in list(range(1, 14)) + [40]:
        a = rng.standard_normal((B, M + 1, K + 7)).astype(dtype)[:, :M, 3:3 + K]
        want = a.astype(np.float64) @ w.astype(np.float64) + (0.0 if bias is None else bias)
        for pad in (0, 2):
            wide = np.full((B, M + pad, N + 20), np.nan, dtype)
            c = wide[:, :M, 5:5 + N]
            _linear(a, w, c, bias, None, None, 1.0, nthreads)
            assert_close(c, want.astype(dtype))
            if pad == 0:  # one block per thread (fewer BLAS calls)
                c[...] = np.nan
                _linear(a, w, c, bias, None, None, 1.0, nthreads, deterministic=False)
                assert_close(c, want.astype(dtype))
            untouched = np.ones(wide.shape, bool)
            untouched[:, :M, 5:5 + N] = False
            assert np.isnan(wide[untouched]).all()
        start = np.array([0, min(2, M), M // 2 + 1], np.int64).clip(0, M)
        stop = np.array([M, M, M // 2], np.int64)  # the last batch: an empty range
        wide = np.full((B, M + 2, N + 20), np.nan, dtype)
        c = wide[:, :M, 5:5 + N]
        _linear(a, w, c, bias, start, stop, 1.0, nthreads)
        for b in range(B):
            r0, r1 = start[b], max(stop[b], start[b])
            assert_close(c[b, r0:r1], want[b, r0:r1].astype(dtype))
            assert np.isnan(c[b, :r0]).all() and np.isnan(c[b, r1:]).all()
        assert np.isnan(wide[:, M:]).all() and np.isnan(wide[..., :5]).all() and np.isnan(wide[..., 5 + N:]).all()


def test_head_views_are_views_and_sdpa_writes_the_merged_layout(rng):
    # the layer's two layout tricks: Q/K/V as strided (B, H, L, D) views of
    # the projection buffer, and the attention output written straight into
    # (B, L, H*D) through a transposed view (no split or merge copy)
    from fastattn.projections import head_view as _head_view
    B, L, H, D = 2, 5, 3, 4
    buf = rng.standard_normal((B, L, 3 * H * D)).astype(np.float32)
    q, k, v = (_head_view(buf[:, :, i * H * D:(i + 1) * H * D], H, D) for i in range(3))
    assert all(np.shares_memory(t, buf) for t in (q, k, v))
    attn = np.zeros((B, L, H * D), np.float32)
    out4 = _head_view(attn, H, D)
    assert np.shares_memory(out4, attn) and not out4.flags.c_contiguous
    _kernels.scaled_dot_product_attention(q, k, v, out4, scale=0.5, is_causal=True,
                                          alignment=_kernels.CAUSAL_ALIGNMENTS["top_left"], num_threads=1)
    want = ref.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5)
    assert_close(attn, want.transpose(0, 2, 1, 3).reshape(B, L, H * D))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N", [1, 15, 63, 64, 200, 768, 2304])
@pytest.mark.parametrize("L", [1, 8, 9, 130])
def test_row_buffer_geometry(dtype, N, L):
    # the layer's scratch rows: with more than 8 rows of 256 bytes or more,
    # aligned and an odd number of 64-byte lines apart (a head's rows then
    # spread over every L1 set), with less than two lines of padding;
    # otherwise a plain array
    from fastattn.projections import row_buffer as _row_buffer
    a = _row_buffer(3, L, N, dtype)
    item = np.dtype(dtype).itemsize
    assert a.shape == (3, L, N) and a.dtype == dtype
    row = a.strides[1]
    assert a.strides == (L * row, row, item)
    if L > 8 and N * item >= 256:
        assert a.ctypes.data % 64 == 0
        assert row % 64 == 0 and (row // 64) % 2 == 1 and N * item <= row < N * item + 128
    else:
        assert row == N * item
    a[...] = np.arange(a.size).reshape(a.shape)  # every element its own memory
    assert (a.ravel() == np.arange(a.size)).all()
    assert _row_buffer(0, L, N, dtype).shape == (0, L, N)


def test_sdpa_never_reads_keys_past_key_lengths(rng):
    # the layer leaves K/V rows past key_lengths unprojected (uninitialised)
    q = rng.standard_normal((1, 2, 4, 8)).astype(np.float32)
    k = rng.standard_normal((1, 2, 10, 8)).astype(np.float32)
    v = rng.standard_normal((1, 2, 10, 8)).astype(np.float32)
    want = fastattn.scaled_dot_product_attention(q, k[:, :, :6], v[:, :, :6])
    k[:, :, 6:] = np.nan
    v[:, :, 6:] = np.inf
    for n in (1, N_THREADS):
        got = fastattn.scaled_dot_product_attention(q, k, v, key_lengths=[6], num_threads=n)
        assert np.array_equal(got, want)


# ---- one thread pool: BLAS pinned to 1 thread during calls, restored after ---

def test_blas_threads_are_restored_after_calls(rng):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from fastattn.projections import BLAS_THREADS as _POOL
    m = _layer(CONFIGS[1], np.float32)
    x = rng.standard_normal((2, 40, m.embed_dim)).astype(np.float32)
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        before = [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]
        m(x)
        with pytest.raises(ValueError):
            m(x, key_lengths=[99, 1])  # fails validation, before pinning
        cache = m.new_cache(2, 3)
        with pytest.raises(ValueError, match="overflow"):
            m(x, cache=cache)
        after = [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]
    assert before == after
    assert _POOL._depth == 0


def test_same_results_with_blas_threading(rng, monkeypatch):
    # without threadpoolctl (or OpenMP) the GEMMs are single BLAS calls that
    # BLAS threads itself: same results
    from fastattn.projections import BLAS_THREADS as _POOL
    m = _layer(CONFIGS[1], np.float64)
    x = rng.standard_normal((2, 70, m.embed_dim))
    kw = dict(key_lengths=[70, 33], query_lengths=[60, 70], is_causal=True)
    pinned = m(x, **kw)
    monkeypatch.setattr(_POOL, "_controller", False)
    assert _POOL.enter() is False
    _POOL.exit()
    assert_close(m(x, **kw), pinned)
    assert_close(pinned, _oracle(m, x, **kw))


def test_layer_works_without_threadpoolctl():
    # threadpoolctl is optional: without it BLAS keeps its own threads and
    # the layer gives the same results
    code = ("import sys; sys.modules['threadpoolctl'] = None\n"
            "import numpy as np, fastattn\n"
            "from fastattn.projections import BLAS_THREADS\n"
            "m = fastattn.MultiHeadAttention(24, 4, dtype=np.float64, seed=0)\n"
            "x = np.random.default_rng(0).standard_normal((2, 30, 24))\n"
            "y = m(x, is_causal=True)\n"
            "np.save(sys.stdout.buffer, y)\n"
            "sys.stdout.buffer.write(repr(BLAS_THREADS._controller).encode())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    got = np.load(io.BytesIO(out))
    assert out.endswith(b"False")  # no controller: BLAS threads itself
    m = fastattn.MultiHeadAttention(24, 4, dtype=np.float64, seed=0)
    x = np.random.default_rng(0).standard_normal((2, 30, 24))
    assert_close(got, m(x, is_causal=True))


def test_concurrent_calls_from_threads(rng):
    from concurrent.futures import ThreadPoolExecutor
    m = _layer(CONFIGS[1], np.float32)
    xs = [rng.standard_normal((2, 30, m.embed_dim)).astype(np.float32) for _ in range(6)]
    want = [m(x, is_causal=True) for x in xs]
    with ThreadPoolExecutor(3) as ex:
        got = list(ex.map(lambda x: m(x, is_causal=True), xs))
    for g, w in zip(got, want):
        assert_close(g, w)


@pytest.mark.parametrize("rope", [None, "neox", "gptj"])
@pytest.mark.parametrize("lengths", [False, True], ids=["all_rows", "row_ranges"])
def test_threaded_gemm_blocks_and_rope_epilogue(isa, layer_threads, dtype, rng, rope, lengths):
    # big enough for the GEMMs to split their columns over the threads, with
    # head boundaries (Q|K|V, GQA) inside the blocks
    m = fastattn.MultiHeadAttention(192, 6, num_kv_heads=2, rope=rope, dtype=dtype, seed=1)
    d = m.state_dict()
    m.load_state_dict({n: a + 0.1 if n.startswith("b") else a for n, a in d.items()})
    B, L = 3, 70
    x = rng.standard_normal((B, L, 192)).astype(dtype)
    kw = dict(key_lengths=[70, 41, 5], query_lengths=[70, 69, 50], is_causal=True) if lengths else {}
    assert_close(m(x, **kw), _oracle(m, x, **kw))
    cache = m.new_cache(B, L)
    steps = [m(x[:, :50], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in range(50, L)]
    assert_close(np.concatenate(steps, axis=1), _oracle(m, x, is_causal=True))


@pytest.mark.parametrize("nthreads", [1, 2, 3])
def test_blas_matmul_rope_epilogue(dtype, rng, nthreads):
    from fastattn.rotary import rope_tables
    B, M, K, D, heads, extra = 2, 40, 64, 16, 7, 24  # rotary heads, then unrotated columns
    N = heads * D + extra
    a = rng.standard_normal((B, M, K)).astype(dtype)
    w = rng.standard_normal((K, N)).astype(dtype)
    pos = rng.integers(0, 100, size=(B, M))
    cos, sin = rope_tables(100, D // 2, 10000.0, dtype)
    index = np.broadcast_to(pos[:, None, :], (B, heads, M))
    start, stop = np.array([0, 5], np.int64), np.array([40, 33], np.int64)
    c = np.zeros((B, M, N), dtype)
    _linear(a, w, c, None, start, stop, 1.0, nthreads, (2, heads, D, index, cos, sin))
    plain = (a.astype(np.float64) @ w.astype(np.float64))
    heads4 = plain[:, :, :heads * D].reshape(B, M, heads, D).transpose(0, 2, 1, 3)
    rot = ref.apply_rotary(heads4, pos[:, None, :], layout="gptj").transpose(0, 2, 1, 3).reshape(B, M, heads * D)
    want = np.concatenate([rot, plain[:, :, heads * D:]], axis=-1)
    for b in range(B):
        assert_close(c[b, start[b]:stop[b]], want[b, start[b]:stop[b]].astype(dtype))
        assert (c[b, :start[b]] == 0).all() and (c[b, stop[b]:] == 0).all()
    with pytest.raises(ValueError, match="rejected its arguments"):
        _linear(a, w, c, None, None, None, 1.0, nthreads,
                     (2, heads, D, np.broadcast_to(np.int64(100), (B, heads, M)), cos, sin))


# ---- copies of a layer: the views and their buffer stay one object ----------

def _pickled(m):
    import pickle
    return pickle.loads(pickle.dumps(m))


def _deep(m):
    import copy
    return copy.deepcopy(m)


def _pickled_read_only(m):
    """Unpickled as Ray's object store hands it out: protocol 5 with the
    arrays' buffers out of band and read-only (zero-copy)."""
    import pickle
    buffers = []
    data = pickle.dumps(m, protocol=5, buffer_callback=buffers.append)
    return pickle.loads(data, buffers=[memoryview(bytes(b.raw())) for b in buffers])


def _shallow(m):
    import copy
    return copy.copy(m)


def _computes_with_its_state(m, x, key=None, value=None):
    """The layer computes with the weights its state_dict reports: bitwise
    what a fresh layer built from that state gives."""
    fresh = fastattn.MultiHeadAttention.from_weights(
        **m.state_dict(), num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, rope=m.rope,
        rope_base=m.rope_base)
    np.testing.assert_array_equal(m(x, key, value), fresh(x, key, value))


@pytest.mark.parametrize("copier", [_pickled, _pickled_read_only, _deep, _shallow],
                         ids=["pickle", "pickle-read-only", "deepcopy", "copy"])
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[1], CONFIGS[2], CONFIGS[3], CONFIGS[4]],
                         ids=["fused", "gqa_rope", "no_bias", "k_v_apart", "kv_fused"])
def test_copied_layer_loads_new_weights(copier, cfg, rng):
    # unpickling and deep copies used to turn the per-projection views of the
    # fused weight buffer into arrays of their own: load_state_dict wrote
    # into those, and the layer kept computing with the old weights
    E, H, Hkv, kdim, vdim, bias, rope = cfg
    a, b = _layer(cfg, np.float32, seed=0), _layer(cfg, np.float32, seed=7)
    x = rng.standard_normal((2, 5, E)).astype(np.float32)
    kv = None if kdim is None else (rng.standard_normal((2, 4, kdim)).astype(np.float32),
                                    rng.standard_normal((2, 4, vdim)).astype(np.float32))
    args = (x,) if kv is None else (x, *kv)
    before = a(*args)
    # load into the copy
    c = copier(a)
    np.testing.assert_array_equal(c(*args), before)
    c.load_state_dict(b.state_dict())
    np.testing.assert_array_equal(c(*args), b(*args))
    _computes_with_its_state(c, *args)
    _computes_with_its_state(a, *args)
    if copier is not _shallow:  # a shallow copy shares the weights, as a torch module's does
        np.testing.assert_array_equal(a(*args), before)
    # load into the original after copying
    a2 = _layer(cfg, np.float32, seed=0)
    c2 = copier(a2)
    a2.load_state_dict(b.state_dict())
    np.testing.assert_array_equal(a2(*args), b(*args))
    _computes_with_its_state(a2, *args)
    _computes_with_its_state(c2, *args)
    if copier is not _shallow:
        np.testing.assert_array_equal(c2(*args), before)


def test_copied_layer_weights_are_views_of_its_own_buffers():
    for copier in (_pickled, _deep, _shallow):
        m = copier(fastattn.MultiHeadAttention(16, 4, seed=0))
        buf = m._storage["w_in"]
        for part in (m._w_q, m._w_k, m._w_v, m._w_kv):
            assert part.base is buf or part is buf
        assert m._b_q.base is m._storage["b_in"]


@pytest.mark.parametrize("copier", [_pickled, _deep], ids=["pickle", "deepcopy"])
def test_copied_cache_and_moved_layer(copier, rng):
    # the cache holds no views: a copy keeps decoding where the original was
    m = _layer(CONFIGS[1], np.float64)
    x = rng.standard_normal((2, 6, m.embed_dim))
    cache = m.new_cache(2, 8)
    m(x[:, :4], cache=cache)
    c_layer, c_cache = copier(m), copier(cache)
    want = m(x[:, 4:], cache=cache)
    np.testing.assert_array_equal(c_layer(x[:, 4:], cache=c_cache), want)
    np.testing.assert_array_equal(c_cache.lengths, cache.lengths)
    np.testing.assert_array_equal(c_cache.k, cache.k)
    # a layer moved back from another device reallocates its buffers; the
    # views follow (to("cpu") on a cpu layer is a no-op, so rebuild by hand)
    m._allocate_host()
    m.load_state_dict(c_layer.state_dict())
    np.testing.assert_array_equal(m(x[:, 4:]), c_layer(x[:, 4:]))


# ---- bitwise identical for every thread count ---------------------------------

DETERMINISM_CONFIGS = [
    # (E, H, Hkv, kdim, vdim, bias, rope): sizes above the GEMMs' parallel
    # threshold, with column counts that are not multiples of the blocks
    (96, 6, None, None, None, True, None),
    (120, 6, 2, None, None, True, "neox"),
    (112, 4, 1, None, None, False, "gptj"),
    (96, 4, 2, 70, 53, True, None),
    (100, 5, None, 77, 77, False, "neox"),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cfg", DETERMINISM_CONFIGS, ids=["mha", "gqa_neox", "mqa_gptj", "kvdim", "kv_fused"])
def test_layer_is_bitwise_identical_for_every_thread_count(cfg, dtype, rng):
    # the projections used to split their columns into one BLAS call per
    # thread, and a BLAS sums a column in an order that depends on where it
    # falls in the call: outputs changed by a few ulps with the thread count
    E, H, Hkv, kdim, vdim, bias, rope = cfg
    m = _layer(cfg, dtype)
    B, Lq, Lk = 3, 45, 38
    x = rng.standard_normal((B, Lq, E)).astype(dtype)
    calls = []
    if kdim is None:
        calls.append(((x,), dict(is_causal=True)))
        calls.append(((x,), dict(key_lengths=[45, 20, 3], query_lengths=[45, 44, 30])))
    else:
        k = rng.standard_normal((B, Lk, kdim)).astype(dtype)
        v = rng.standard_normal((B, Lk, vdim)).astype(dtype)
        calls.append(((x, k, v), dict(key_lengths=[38, 17, 1])))
        calls.append(((x, k, v), dict(query_lengths=[45, 12, 0], return_weights=True)))

    def run(threads):
        outs = [m(*a, num_threads=threads, **kw) for a, kw in calls]
        if kdim is None or kdim == vdim == E:
            cache = m.new_cache(B, Lq + 2)
            outs.append(m(x[:, :40], cache=cache, num_threads=threads))
            outs.append(m(x[:, 40:41], cache=cache, num_threads=threads))
            outs.append(m(x[:, 41:], cache=cache, query_lengths=[4, 2, 0], num_threads=threads))
        return outs

    first = run(1)
    for threads in (2, 3, 4):
        for got, want in zip(run(threads), first):
            for g, w in zip(*(o if isinstance(o, tuple) else (o,) for o in (got, want))):
                np.testing.assert_array_equal(g, w, err_msg=f"{threads} threads")
    fastattn.set_num_threads(2)
    try:  # the default thread count too
        np.testing.assert_array_equal(m(*calls[0][0], **calls[0][1]), first[0])
    finally:
        fastattn.set_num_threads(None)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("M,K,N", [(1, 768, 2304), (5, 64, 1000), (37, 100, 301), (128, 256, 768),
                                   (300, 40, 2100)])
@pytest.mark.parametrize("w_layout", ["rows", "transposed"])
def test_linear_is_bitwise_identical_for_every_thread_count(dtype, rng, M, K, N, w_layout):
    from fastattn.projections import BLAS_THREADS
    a = rng.standard_normal((2, M, K)).astype(dtype)
    w = _weight(rng, K, N, dtype, w_layout)
    bias = rng.standard_normal(N).astype(dtype)
    outs = []
    BLAS_THREADS.enter()
    try:
        for threads in (1, 2, 3, 4, 7):
            c = np.empty((2, M, N), dtype)
            _linear(a, w, c, bias, None, None, 1.0, threads)
            outs.append(c)
    finally:
        BLAS_THREADS.exit()
    for c in outs[1:]:
        np.testing.assert_array_equal(c, outs[0])
    assert_close(outs[0], (a.astype(np.float64) @ w + bias).astype(dtype))


def test_non_deterministic_switch_still_matches_the_oracle(rng):
    m = _layer(CONFIGS[1], np.float32)
    fast = fastattn.MultiHeadAttention.from_weights(**m.state_dict(), num_heads=m.num_heads,
                                                    num_kv_heads=m.num_kv_heads, rope=m.rope)
    fast.deterministic = False
    x = rng.standard_normal((2, 70, m.embed_dim)).astype(np.float32)
    for threads in (1, 2, 3):
        assert_close(fast(x, is_causal=True, num_threads=threads), _oracle(m, x, is_causal=True))
    assert fastattn.MultiHeadAttention(8, 2, deterministic=False).deterministic is False
    with pytest.raises(TypeError, match="^deterministic must be a bool"):
        fastattn.MultiHeadAttention(8, 2, deterministic="no")


# ---- a value head dim apart from the key head dim ----------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("H,Hkv,D,Dv,kdim,vdim,bias,rope", [
    (4, 4, 6, 10, None, None, True, None),
    (6, 2, 8, 3, None, None, False, "neox"),
    (4, 1, 4, 9, 11, 11, True, "gptj"),
    (3, 3, 5, 7, 13, 6, True, None),
])
def test_value_head_dim_differs_from_key_head_dim(dtype, rng, H, Hkv, D, Dv, kdim, vdim, bias, rope):
    E = 18
    kdim, vdim = kdim or E, vdim or E
    w = dict(w_q=rng.standard_normal((E, H * D)), w_k=rng.standard_normal((kdim, Hkv * D)),
             w_v=rng.standard_normal((vdim, Hkv * Dv)), w_o=rng.standard_normal((H * Dv, E)))
    if bias:
        w.update(b_q=rng.standard_normal(H * D), b_k=rng.standard_normal(Hkv * D),
                 b_v=rng.standard_normal(Hkv * Dv), b_o=rng.standard_normal(E))
    w = {n: a.astype(dtype) * 0.3 for n, a in w.items()}
    m = fastattn.MultiHeadAttention.from_weights(**w, num_heads=H, num_kv_heads=Hkv, rope=rope)
    assert (m.head_dim, m.v_head_dim) == (D, Dv)
    assert "v_head_dim" in repr(m)
    x = rng.standard_normal((2, 7, E)).astype(dtype)
    if kdim == vdim == E:
        kw = dict(key_lengths=[7, 4], query_lengths=[7, 5], is_causal=True)
        y, wts = m(x, return_weights=True, **kw)
        want, want_w = ref.multi_head_attention(w, x, num_heads=H, num_kv_heads=Hkv, rope=rope,
                                                return_weights=True, **kw)
        assert_close(y, want)
        assert_close(wts, want_w)
        # decoding: the cache holds values of the value head dim
        cache = m.new_cache(2, 7)
        assert cache.v.shape == (2, Hkv, 7, Dv)
        steps = [m(x[:, :3], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in range(3, 7)]
        assert_close(np.concatenate(steps, axis=1),
                     ref.multi_head_attention(w, x, num_heads=H, num_kv_heads=Hkv, rope=rope,
                                              is_causal=True))
        with pytest.raises(ValueError, match=f"cache holds values of dim {D}; this layer needs {Dv}"):
            m(x, cache=fastattn.KVCache(2, 7, Hkv, D, dtype))
    else:
        k = rng.standard_normal((2, 5, kdim)).astype(dtype)
        v = rng.standard_normal((2, 5, vdim)).astype(dtype)
        assert_close(m(x, k, v, key_lengths=[5, 2]),
                     ref.multi_head_attention(w, x, k, v, num_heads=H, num_kv_heads=Hkv, rope=rope,
                                              key_lengths=[5, 2]))
    # state, save and load keep the value head dim
    m2 = fastattn.MultiHeadAttention.from_weights(**m.state_dict(), num_heads=H, num_kv_heads=Hkv,
                                                  rope=rope)
    assert m2.v_head_dim == Dv


def test_value_head_dim_keras_semantics(rng):
    # Keras's MultiHeadAttention(num_heads, key_dim, value_dim), written out
    # with its einsums and its (in, heads, dim) / (heads, dim, out) kernels:
    # scores scale by 1/sqrt(key_dim), and the output projection reads
    # heads x value_dim
    B, L, S, E, H, D, Dv = 2, 5, 6, 12, 3, 4, 7
    wq, wk = rng.standard_normal((E, H, D)), rng.standard_normal((E, H, D))
    wv, wo = rng.standard_normal((E, H, Dv)), rng.standard_normal((H, Dv, E))
    bq, bk, bv, bo = (rng.standard_normal(s) for s in ((H, D), (H, D), (H, Dv), (E,)))
    x, ctx = rng.standard_normal((B, L, E)), rng.standard_normal((B, S, E))
    q = np.einsum("abc,cde->abde", x, wq) + bq
    k = np.einsum("abc,cde->abde", ctx, wk) + bk
    v = np.einsum("abc,cde->abde", ctx, wv) + bv
    scores = np.einsum("aecd,abcd->acbe", k, q / np.sqrt(D))
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("acbe,aecd->abcd", p, v)
    want = np.einsum("abcd,cde->abe", o, wo) + bo
    m = fastattn.MultiHeadAttention.from_weights(
        wq.reshape(E, H * D), wk.reshape(E, H * D), wv.reshape(E, H * Dv), wo.reshape(H * Dv, E),
        bq.reshape(-1), bk.reshape(-1), bv.reshape(-1), bo, num_heads=H)
    assert_close(m(x, ctx, ctx), want)


def test_from_weights_value_head_dim_rules(rng):
    f = fastattn.MultiHeadAttention.from_weights
    w_q, w_k, w_o = np.zeros((8, 8)), np.zeros((8, 8)), np.zeros((12, 8))
    with pytest.raises(ValueError, match=r"^w_v's output width 10 \(shape \(8, 10\)\) must be a positive multiple of num_kv_heads \(4\)"):
        f(w_q, w_k, np.zeros((8, 10)), w_o, num_heads=4)
    with pytest.raises(ValueError, match=r"^w_o must have shape \(12, 8\), got \(8, 8\)"):
        f(w_q, w_k, np.zeros((8, 12)), np.zeros((8, 8)), num_heads=4)
    assert f(w_q, w_k, np.zeros((8, 12)), w_o, num_heads=4).v_head_dim == 3


# ---- threads per call --------------------------------------------------------

def test_num_threads_per_call(rng):
    m = _layer(CONFIGS[1], np.float64)
    x = rng.standard_normal((2, 9, m.embed_dim))
    want = _oracle(m, x, is_causal=True)
    before = fastattn._config._num_threads
    for n in (1, 2, 3):
        assert_close(m(x, is_causal=True, num_threads=n), want)
    assert fastattn._config._num_threads == before  # the default is untouched
    cache = m.new_cache(2, 9)
    assert_close(m(x, cache=cache, num_threads=2), want)
    for bad, exc in ((0, ValueError), (10**6, ValueError), (2.5, TypeError), ("2", TypeError)):
        with pytest.raises(exc, match="num_threads"):
            m(x, num_threads=bad)


def test_value_head_dim_on_the_device_layer(rng, backend):
    # the CUDA layer (emulated without a GPU, on the GPU where there is one)
    # takes the value head dim from the layer it moves
    import copy

    from test_cuda import _rand
    dt = np.dtype(np.float32)
    H, Hkv, D, Dv, E = 4, 2, 6, 5, 16
    w = dict(w_q=rng.standard_normal((E, H * D)), w_k=rng.standard_normal((E, Hkv * D)),
             w_v=rng.standard_normal((E, Hkv * Dv)), w_o=rng.standard_normal((H * Dv, E)),
             b_q=rng.standard_normal(H * D), b_k=rng.standard_normal(Hkv * D),
             b_v=rng.standard_normal(Hkv * Dv), b_o=rng.standard_normal(E))
    w = {n: (a * 0.3).astype(dt) for n, a in w.items()}
    cpu = fastattn.MultiHeadAttention.from_weights(**w, num_heads=H, num_kv_heads=Hkv, rope="neox")
    x = _rand(rng, (2, 5, E), dt)
    want = ref.multi_head_attention(w, x, num_heads=H, num_kv_heads=Hkv, rope="neox", is_causal=True)
    gpu = copy.deepcopy(cpu).to("cuda")
    assert_close(backend.to_host(gpu(backend.to_device(x), is_causal=True)), want)
    cache = gpu.new_cache(2, 5)
    steps = [gpu(backend.to_device(x[:, :3]), cache=cache)]
    steps += [gpu(backend.to_device(x[:, t:t + 1]), cache=cache) for t in (3, 4)]
    assert_close(np.concatenate([backend.to_host(s) for s in steps], axis=1), want)
    back = gpu.to("cpu")
    assert back.v_head_dim == Dv
    assert_close(back(x, is_causal=True), want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bias,rope", [(True, "neox"), (False, None), (True, "gptj")])
def test_decode_step_is_bitwise_identical_for_every_thread_count(dtype, rng, bias, rope):
    # decode-sized projections (a few rows, K large enough) are cut along K
    # into GEMVs whose partial sums are added in block order: the RoPE
    # epilogue and the bias run after that sum
    m = _layer((256, 4, 2, None, None, bias, rope), dtype)
    x = rng.standard_normal((2, 9, 256)).astype(dtype)
    want = _oracle(m, x, is_causal=True)
    outs = []
    for threads in (1, 2, 3, 4):
        cache = m.new_cache(2, 9)
        steps = [m(x[:, :6], cache=cache, num_threads=threads)]
        steps += [m(x[:, t:t + 1], cache=cache, num_threads=threads) for t in range(6, 9)]
        outs.append(np.concatenate(steps, axis=1))
    assert_close(outs[0], want)
    for got in outs[1:]:
        np.testing.assert_array_equal(got, outs[0])
