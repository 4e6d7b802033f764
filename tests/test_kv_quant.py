"""Narrow K/V caches: quantize_kv / dequantize_kv against the oracle, and
attention reading bfloat16, float16 and int8 K/V directly, against the
float64 oracle on the exact (rounded or dequantized) K/V values."""

import ml_dtypes
import numpy as np
import pytest

import fastattn
from fastattn import reference
from conftest import assert_close, strided_copy

BF16 = np.dtype(ml_dtypes.bfloat16)
KV_DTYPES = ["bfloat16", "float16", "int8"]


def _store(k, v, kv_dtype):
    """k, v in the storage kv_dtype, plus the attention keyword arguments."""
    if kv_dtype == "int8":
        kq, ks = fastattn.quantize_kv(k)
        vq, vs = fastattn.quantize_kv(v)
        return kq, vq, {"k_scale": ks, "v_scale": vs}
    dt = BF16 if kv_dtype == "bfloat16" else np.dtype(np.float16)
    return k.astype(dt), v.astype(dt), {}


def _qkv(rng, B, H, Hkv, Lq, Lk, D, Dv):
    q = rng.standard_normal((B, H, Lq, D), dtype=np.float32)
    k = rng.standard_normal((B, Hkv, Lk, D), dtype=np.float32)
    v = rng.standard_normal((B, Hkv, Lk, Dv), dtype=np.float32)
    return q, k, v


# ---- quantize_kv / dequantize_kv ---------------------------------------------------

@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 33), (2, 3, 4, 128), (4, 0), (0, 8)])
def test_quantize_matches_oracle(rng, threads, shape):
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 100)).astype(np.float32)
    values, scales = fastattn.quantize_kv(x, num_threads=threads)
    rv, rs = reference.quantize_kv(x)
    assert values.dtype == np.int8 and scales.dtype == np.float32
    assert values.shape == x.shape and scales.shape == x.shape[:-1]
    np.testing.assert_array_equal(values, rv)
    np.testing.assert_array_equal(scales, rs)
    back = fastattn.dequantize_kv(values, scales, num_threads=threads)
    np.testing.assert_array_equal(back, reference.dequantize_kv(rv, rs))
    # rounding error at most half a step, the largest element exact in magnitude
    assert np.all(np.abs(back - x) <= scales[..., None] * 0.5000001 + 1e-30)
    if x.size:
        assert np.abs(values).max() == 127


def test_quantize_independent_of_the_oracle():
    values, scales = fastattn.quantize_kv(np.array([[1.0, -2.0, 0.5, 0.25], [0, 0, 0, 0]]))
    s = np.float32(2.0) / np.float32(127)
    assert scales[0] == s and scales[1] == 0
    assert values.tolist() == [[64, -127, 32, 16], [0, 0, 0, 0]]  # 31.75 -> 32, 15.875 -> 16


def test_quantize_special_rows():
    x = np.array([[0.0, 0.0], [np.nan, 1.0], [np.inf, 1.0], [-0.0, 3.0]], np.float32)
    values, scales = fastattn.quantize_kv(x)
    assert scales[0] == 0 and np.isnan(scales[1]) and np.isinf(scales[2])
    assert values[:3].tolist() == [[0, 0], [0, 0], [0, 0]]
    assert values[3].tolist() == [0, 127]
    np.testing.assert_array_equal(values, reference.quantize_kv(x)[0])
    np.testing.assert_array_equal(fastattn.dequantize_kv(values, scales)[0], [0, 0])


@pytest.mark.parametrize("layout", ["F", "strided", "reversed"])
def test_quantize_strided_and_other_dtypes(rng, layout):
    x = rng.standard_normal((3, 4, 19))
    for src in (x, x.astype(np.float16), x.astype(BF16)):
        got = fastattn.quantize_kv(strided_copy(src, layout))
        ref = reference.quantize_kv(src)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])


# ---- attention on narrow K/V ------------------------------------------------------

SHAPES = [
    # B, H, Hkv, Lq, Lk, D, Dv
    (1, 1, 1, 1, 1, 1, 1),
    (2, 4, 2, 1, 1100, 37, 29),  # decode with split-KV and GQA, odd sizes
    (1, 8, 1, 1, 300, 128, 128),  # multi-query decode
    (2, 3, 3, 3, 77, 16, 17),    # row path, several queries
    (1, 4, 2, 37, 130, 40, 24),  # tiled path
    (1, 2, 1, 100, 101, 9, 33),  # two query blocks
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_narrow_kv_against_oracle(isa, threads, rng, shape, kv_dtype):
    B, H, Hkv, Lq, Lk, D, Dv = shape
    q, k, v = _qkv(rng, *shape)
    ks, vs, kw = _store(k, v, kv_dtype)
    got = fastattn.scaled_dot_product_attention(q, ks, vs, num_threads=threads, **kw)
    assert_close(got, reference.scaled_dot_product_attention(q, ks, vs, **kw), np.float32)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_narrow_kv_with_features(isa, rng, kv_dtype):
    B, H, Hkv, Lq, Lk, D, Dv = 2, 4, 2, 6, 90, 24, 24
    q, k, v = _qkv(rng, B, H, Hkv, Lq, Lk, D, Dv)
    ks, vs, kw = _store(k, v, kv_dtype)
    feats = dict(key_lengths=[90, 41], is_causal=True, causal_alignment="bottom_right",
                 alibi_slopes=np.array([0.5, 0.25, 0.1, 0.05], np.float32), softcap=20.0,
                 window=(30, None), sinks=np.array([0.1, -1, 2, 0], np.float32))
    got, w = fastattn.scaled_dot_product_attention(q, ks, vs, return_weights=True, **feats, **kw)
    ref, rw = reference.scaled_dot_product_attention(q, ks, vs, return_weights=True, **feats, **kw)
    assert_close(got, ref, np.float32)
    assert_close(w, rw, np.float32)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("layout", ["strided", "reversed"])
def test_narrow_kv_strided(rng, kv_dtype, layout):
    q, k, v = _qkv(rng, 2, 4, 2, 1, 1100, 20, 20)
    ks, vs, kw = _store(k, v, kv_dtype)
    ref = reference.scaled_dot_product_attention(q, ks, vs, **kw)
    kw2 = {n: strided_copy(a, layout) for n, a in kw.items()}
    got = fastattn.scaled_dot_product_attention(strided_copy(q, layout), strided_copy(ks, layout),
                                                strided_copy(vs, layout), **kw2)
    assert_close(got, ref, np.float32)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_narrow_kv_three_d(rng, kv_dtype):
    q, k, v = _qkv(rng, 2, 1, 1, 2, 600, 16, 8)
    ks, vs, kw = _store(k[:, 0], v[:, 0], kv_dtype)
    got = fastattn.scaled_dot_product_attention(q[:, 0], ks, vs, **kw)
    assert got.shape == (2, 2, 8)
    assert_close(got, reference.scaled_dot_product_attention(q[:, 0], ks, vs, **kw), np.float32)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("shape", [(1, 8, 2, 1, 4099, 64, 64), (3, 4, 4, 2, 1500, 33, 33),
                                   (1, 2, 2, 40, 700, 32, 32)])
def test_narrow_kv_bitwise_across_threads(isa, rng, kv_dtype, shape):
    q, k, v = _qkv(rng, *shape)
    ks, vs, kw = _store(k, v, kv_dtype)
    outs = [fastattn.scaled_dot_product_attention(q, ks, vs, num_threads=n, **kw) for n in (1, 2, 3)]
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


@pytest.mark.parametrize("kv_dtype,floor", [("bfloat16", 0.99999), ("int8", 0.9999),
                                            ("float16", 0.999999)])
def test_cosine_against_the_fp32_cache(rng, kv_dtype, floor):
    # the target accuracy of a narrow cache against the float32 one, at
    # the decode shape of a 7B model's layer (keys of unit variance)
    q, k, v = _qkv(rng, 1, 32, 8, 1, 2048, 128, 128)
    full = fastattn.scaled_dot_product_attention(q, k, v).ravel().astype(np.float64)
    ks, vs, kw = _store(k, v, kv_dtype)
    got = fastattn.scaled_dot_product_attention(q, ks, vs, **kw).ravel().astype(np.float64)
    cos = got @ full / np.linalg.norm(got) / np.linalg.norm(full)
    assert cos >= floor, cos


def test_half_conversion_is_exact_on_every_isa(isa):
    # every finite half and bfloat16 bit pattern, read as one key row of
    # length 1 against q = 1 and a single value: the output is the value
    bits = np.arange(0, 1 << 16, dtype=np.uint16)
    for dt in (np.dtype(np.float16), BF16):
        vals = bits.view(dt)
        finite = np.isfinite(vals.astype(np.float32))
        vals = vals[finite][:4096 * 3]
        n = vals.size
        v = vals.reshape(1, n, 1, 1)
        k = np.zeros((1, n, 1, 1), dt)
        q = np.ones((1, n, 1, 1), np.float32)
        got = fastattn.scaled_dot_product_attention(q, k, v)
        np.testing.assert_array_equal(got.ravel(), vals.astype(np.float32))


# ---- bad mixes -----------------------------------------------------------------------

def test_bad_kv_mixes(rng):
    q, k, v = _qkv(rng, 1, 2, 2, 1, 5, 4, 4)
    kq, ks = fastattn.quantize_kv(k)
    vq, vs = fastattn.quantize_kv(v)
    sdpa = fastattn.scaled_dot_product_attention
    with pytest.raises(ValueError, match="k_scale and v_scale"):
        sdpa(q, kq, vq)
    with pytest.raises(ValueError, match="v_scale is required"):
        sdpa(q, kq, vq, k_scale=ks)
    with pytest.raises(ValueError, match="k_scale is only for int8"):
        sdpa(q, k, v, k_scale=ks, v_scale=vs)
    with pytest.raises(TypeError, match="share"):
        sdpa(q, k.astype(BF16), v)
    with pytest.raises(TypeError, match="share"):
        sdpa(q, kq, v.astype(np.float16), k_scale=ks, v_scale=vs)
    with pytest.raises(TypeError, match="bfloat16 or float16 queries"):
        sdpa(q.astype(np.float64), k.astype(BF16), v.astype(BF16))
    with pytest.raises(ValueError, match=r"k_scale must have shape \(1, 2, 5\)"):
        sdpa(q, kq, vq, k_scale=ks[:, :, :4], v_scale=vs)
    with pytest.raises(TypeError, match="values must be int8"):
        fastattn.dequantize_kv(k, ks)
    with pytest.raises(ValueError, match="scales must have shape"):
        fastattn.dequantize_kv(kq, ks[..., :2])


# ---- KVCache(kv_dtype=) and the layer ------------------------------------------------

def _layer(E=64, H=8, Hkv=2, rope="neox", seed=0):
    return fastattn.MultiHeadAttention(E, H, num_kv_heads=Hkv, rope=rope, seed=seed)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_cache_append_converts_after_rope(rng, kv_dtype):
    # the narrow cache holds exactly the float32 cache's (RoPE'd) rows,
    # rounded or quantised; ragged appends (query_lengths) included
    layer = _layer()
    full, narrow = layer.new_cache(3, 40), layer.new_cache(3, 40, kv_dtype=kv_dtype)
    for L, ql in ((5, None), (4, [4, 2, 0]), (1, None)):
        x = rng.standard_normal((3, L, 64), dtype=np.float32)
        a = layer(x, cache=full, query_lengths=ql)
        b = layer(x, cache=narrow, query_lengths=ql)
        assert b.dtype == np.float32
        cos = (a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b)
        assert cos > 0.9999
    np.testing.assert_array_equal(full.lengths, narrow.lengths)
    for b, n in enumerate(full.lengths):
        kf, vf = full.k[b, :, :n], full.v[b, :, :n]
        if kv_dtype == "int8":
            for f, q, s in ((kf, narrow.k, narrow.k_scale), (vf, narrow.v, narrow.v_scale)):
                rv, rs = reference.quantize_kv(f)
                np.testing.assert_array_equal(q[b, :, :n], rv)
                np.testing.assert_array_equal(s[b, :, :n], rs)
        else:
            dt = narrow.kv_dtype
            np.testing.assert_array_equal(narrow.k[b, :, :n], kf.astype(dt))
            np.testing.assert_array_equal(narrow.v[b, :, :n], vf.astype(dt))


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_cached_decode_step_against_oracle(rng, kv_dtype):
    # the attention of a decode step reads the narrow cache: the same as the
    # oracle on the cache's exact contents
    layer = _layer(rope=None)
    cache = layer.new_cache(2, 16, kv_dtype=kv_dtype)
    layer(rng.standard_normal((2, 7, 64), dtype=np.float32), cache=cache)
    x = rng.standard_normal((2, 1, 64), dtype=np.float32)
    got = layer(x, cache=cache)
    n = 8
    p = layer.state_dict()
    p = {name: np.asarray(a, np.float64) for name, a in p.items()}
    q = (x.astype(np.float64) @ p["w_q"] + p["b_q"]).reshape(2, 1, 8, 8).transpose(0, 2, 1, 3)
    kw = {} if kv_dtype != "int8" else {"k_scale": cache.k_scale[:, :, :n],
                                        "v_scale": cache.v_scale[:, :, :n]}
    o = reference.scaled_dot_product_attention(q.astype(np.float32), cache.k[:, :, :n],
                                               cache.v[:, :, :n], **kw)
    want = o.astype(np.float64).transpose(0, 2, 1, 3).reshape(2, 1, 64) @ p["w_o"] + p["b_o"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_cache_nbytes_and_refusals():
    E, H, Hkv, S = 64, 8, 2, 100
    layer = _layer(E, H, Hkv)
    per = 2 * 3 * Hkv * S * (E // H)  # elements of k and v
    assert layer.new_cache(3, S).nbytes == per * 4
    assert layer.new_cache(3, S, kv_dtype="bfloat16").nbytes == per * 2
    assert layer.new_cache(3, S, kv_dtype=np.float16).nbytes == per * 2
    c8 = layer.new_cache(3, S, kv_dtype="int8")
    assert c8.nbytes == per + 2 * 3 * Hkv * S * 4
    assert c8.k.dtype == np.int8 and c8.k_scale.shape == (3, Hkv, S)
    assert "kv_dtype=int8" in repr(c8)
    assert layer.new_cache(1, 4, kv_dtype="float32").kv_dtype == np.float32
    with pytest.raises(TypeError, match="kv_dtype"):
        layer.new_cache(1, 4, kv_dtype="int16")
    with pytest.raises(TypeError, match="kv_dtype"):
        fastattn.KVCache(1, 4, 2, 8, np.float64, kv_dtype=np.float16)


def _greedy(layers, emb, unemb, prompt, steps, kv_dtype):
    """Greedy decode through a residual stack of layers, one token per
    step through each layer's cache: the tokens produced."""
    caches = [layer.new_cache(1, len(prompt) + steps, kv_dtype=kv_dtype) for layer in layers]
    x = emb[prompt][None]
    out = []
    for _ in range(steps):
        h = x
        for layer, cache in zip(layers, caches):
            h = h + layer(h, cache=cache)
        tok = int(np.argmax(h[0, -1] @ unemb))
        out.append(tok)
        x = emb[[tok]][None]
    return out


def test_greedy_decode_int8_cache_agrees_with_fp32():
    # 256 tokens through a small stack: the int8 cache's tokens match the
    # float32 cache's on at least 99% of the positions (the run must be
    # varied for that to mean anything: well over 50 distinct tokens)
    rng = np.random.default_rng(7)
    E, V = 64, 512
    layers = [_layer(E, 8, 2, seed=i) for i in range(3)]
    emb = rng.standard_normal((V, E), dtype=np.float32)
    unemb = rng.standard_normal((E, V), dtype=np.float32)
    prompt = list(rng.integers(0, V, 8))
    ref = _greedy(layers, emb, unemb, prompt, 256, None)
    got = _greedy(layers, emb, unemb, prompt, 256, "int8")
    assert len(set(ref)) > 50
    agree = np.mean(np.array(ref) == np.array(got))
    assert agree >= 0.99, agree


@pytest.mark.parametrize("kv_dtype", ["float32"] + KV_DTYPES)
@pytest.mark.parametrize("Lq", [1, 3])
def test_gqa_decode_with_lengths(isa, threads, rng, kv_dtype, Lq):
    # GQA decode reads a kv head once for its group; per-batch lengths keep
    # that path, per-head (B, H) lengths take the per-head one: both match
    B, H, Hkv, Lk, D = 3, 8, 2, 1500, 40
    q, k, v = _qkv(rng, B, H, Hkv, Lq, Lk, D, D)
    ks, vs, kw = (k, v, {}) if kv_dtype == "float32" else _store(k, v, kv_dtype)
    kl, ql = np.array([1500, 700, 3]), np.array([Lq, 0, 1])
    kl_h = np.repeat(kl[:, None], H, axis=1).copy()
    ref = reference.scaled_dot_product_attention(q, ks, vs, key_lengths=kl, query_lengths=ql,
                                                 is_causal=True, causal_alignment="bottom_right",
                                                 **kw)
    for lengths in (kl, kl_h):
        got = fastattn.scaled_dot_product_attention(
            q, ks, vs, key_lengths=lengths, query_lengths=ql, is_causal=True,
            causal_alignment="bottom_right", num_threads=threads, **kw)
        assert_close(got, ref, np.float32)


@pytest.mark.parametrize("kv_dtype", ["float32"] + KV_DTYPES)
@pytest.mark.parametrize("Lq", [1, 2])
def test_long_decode_in_runs_of_tiles(isa, threads, rng, kv_dtype, Lq):
    """Sixteen heads over 1,901 keys (no split-KV): the row path takes a
    run of key tiles' scores, then their P.V, several runs per row; the
    window starts mid-tile and ends a run short. Checked against the oracle
    and bit for bit against one thread."""
    B, H, Hkv, Lk, D, Dv = 1, 16, 16, 1901, 24, 19
    q, k, v = _qkv(rng, B, H, Hkv, Lq, Lk, D, Dv)
    ks, vs, kw = (k, v, {}) if kv_dtype == "float32" else _store(k, v, kv_dtype)
    for extra in ({}, dict(window=(1000 + 7, 0), is_causal=True, causal_alignment="bottom_right")):
        ref = reference.scaled_dot_product_attention(q, ks, vs, **extra, **kw)
        got = fastattn.scaled_dot_product_attention(q, ks, vs, num_threads=threads, **extra, **kw)
        assert_close(got, ref, np.float32)
        one = fastattn.scaled_dot_product_attention(q, ks, vs, num_threads=1, **extra, **kw)
        np.testing.assert_array_equal(got, one)


def test_quantize_misaligned_input(rng):
    # a float32 view at an odd byte offset: copied to an aligned buffer first
    buf = np.zeros(4 * 21 + 1, np.uint8)
    x = buf[1:].view(np.float32).reshape(3, 7)
    x[...] = rng.standard_normal((3, 7))
    assert not x.flags.aligned
    got, ref = fastattn.quantize_kv(x), reference.quantize_kv(x)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("Lq", [1, 5], ids=["rows", "tiled"])
def test_every_narrow_value_is_read_exactly(isa, rng, kv_dtype, Lq):
    """One key: every output row is 1 * v exactly, so V holding every bit
    pattern of the storage (subnormals, infinities and NaNs of the 16-bit
    formats; -128..127 of int8 with unit scales) checks the kernel's
    in-register and per-tile widening against NumPy's conversion. Lq = 1
    takes the row (decode) path, 5 queries the tiled one."""
    if kv_dtype == "int8":
        bits = np.arange(-128, 128, dtype=np.int16).astype(np.int8)
        B, Dv = 4, 64
    else:
        bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
        B, Dv = 16, 4096
    v = bits.reshape(B, 1, 1, Dv)
    if kv_dtype != "int8":
        v = v.view(BF16 if kv_dtype == "bfloat16" else np.float16)
    q = rng.standard_normal((B, 2, Lq, 8), dtype=np.float32)
    k = rng.standard_normal((B, 1, 1, 8), dtype=np.float32)
    if kv_dtype == "int8":
        k, ks = fastattn.quantize_kv(k)
        kw = {"k_scale": ks, "v_scale": np.ones(v.shape[:-1], np.float32)}
    else:
        k, kw = k.astype(v.dtype), {}
    out = fastattn.scaled_dot_product_attention(q, k, v, **kw)
    with np.errstate(invalid="ignore"):
        want = np.broadcast_to(v.astype(np.float32), out.shape)
    np.testing.assert_array_equal(out, want)  # NaN matches NaN; -0 becomes +0


@pytest.mark.parametrize("kv_dtype", ["float32"] + KV_DTYPES)
@pytest.mark.parametrize("shape", [(2, 8, 4, 1, 1333, 40, 24), (1, 12, 3, 2, 700, 17, 33),
                                   (3, 6, 6, 1, 900, 64, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_interleaved_heads_cache_decodes_alike(isa, threads, rng, kv_dtype, shape):
    """A cache laid out (B, Lk, Hkv, D), as flash-attn's kvcache keeps it,
    decodes several kv heads per work item a few token rows at a time: the
    same arithmetic per row as the (B, Hkv, Lk, D) layout, so the same bits,
    with and without per-batch key lengths and a window."""
    B, H, Hkv, Lq, Lk, D, Dv = shape
    q, k, v = _qkv(rng, *shape)
    ks, vs, kw = (k, v, {}) if kv_dtype == "float32" else _store(k, v, kv_dtype)

    def interleaved(a):  # same values, heads side by side in each token row
        return np.ascontiguousarray(a.swapaxes(1, 2)).swapaxes(1, 2)

    lengths = rng.integers(1, Lk + 1, B)
    for extra in ({}, dict(key_lengths=lengths, is_causal=True, causal_alignment="bottom_right",
                           window=(Lk // 3, None))):
        want = fastattn.scaled_dot_product_attention(q, ks, vs, num_threads=threads, **extra, **kw)
        got = fastattn.scaled_dot_product_attention(q, interleaved(ks), interleaved(vs),
                                                    num_threads=threads, **extra, **kw)
        np.testing.assert_array_equal(got, want)
        assert_close(got, reference.scaled_dot_product_attention(q, ks, vs, **extra, **kw),
                     np.float32)
