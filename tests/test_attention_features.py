"""Sliding window, logit soft-capping, attention sinks and key start
offsets in scaled_dot_product_attention, against the float64 oracle: each
feature alone and combined with causality, lengths, ALiBi, GQA, masks and
decode (split-KV) shapes, at every ISA level, 1 and N threads, both dtypes;
plus the weights path, determinism, skipping and argument checks."""

import numpy as np
import pytest

import fastattn
from fastattn import reference as ref
from conftest import LAYOUTS, N_THREADS, assert_close, strided_copy

# (B, H, Hkv, Lq, Lk, D, Dv): odd sizes around the 96-query / 48-key tiles
# and vector widths; decode rows with the split-KV path (Lk >= 1024, few heads).
SHAPES = [
    (1, 1, 1, 1, 1, 1, 1),
    (2, 4, 2, 5, 7, 8, 9),
    (1, 2, 1, 97, 130, 5, 7),
    (2, 2, 2, 130, 211, 33, 17),
    (1, 2, 2, 3, 333, 16, 24),
    (1, 4, 2, 1, 2051, 64, 40),
    (1, 2, 1, 2, 1100, 17, 8),
]


def _qkv(rng, shape, dtype):
    B, H, Hkv, Lq, Lk, D, Dv = shape
    q = rng.standard_normal((B, H, Lq, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, Lk, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, Lk, Dv)).astype(dtype)
    return q, k, v


def _features(rng, shape, kind):
    B, H, Hkv, Lq, Lk, D, Dv = shape
    if kind == "window":
        return dict(window=(int(rng.integers(0, 60)), int(rng.integers(0, 9))))
    if kind == "window_left_causal":
        return dict(window=(int(rng.integers(0, 70)), None), is_causal=True,
                    causal_alignment="bottom_right")
    if kind == "window_right_only":
        return dict(window=(None, int(rng.integers(0, 40))))
    if kind == "softcap":
        return dict(softcap=float(rng.uniform(0.3, 4.0)), scale=1.0)
    if kind == "sinks":
        return dict(sinks=rng.standard_normal(H) * 2)
    if kind == "key_starts":
        kl = rng.integers(0, Lk + 1, size=(B, H))
        return dict(key_starts=rng.integers(0, Lk + 1, size=(B, H)) // 2, key_lengths=kl)
    if kind == "left_padded_causal":
        return dict(key_starts=rng.integers(0, Lk + 1, size=B), is_causal=True,
                    causal_alignment="bottom_right")
    if kind == "everything":
        return dict(window=(int(rng.integers(0, 80)), int(rng.integers(0, 5))), is_causal=True,
                    causal_alignment="bottom_right", key_lengths=rng.integers(1, Lk + 1, size=B),
                    key_starts=rng.integers(0, max(Lk // 3, 1), size=(B, H)),
                    query_lengths=rng.integers(0, Lq + 1, size=B),
                    alibi_slopes=rng.standard_normal(H) * 0.1, softcap=3.0,
                    sinks=rng.standard_normal(H), attn_mask=rng.random((Lq, Lk)) > 0.1,
                    scale=0.4)
    if kind == "softcap_additive_sinks":
        add = rng.standard_normal((Lq, Lk))
        add[rng.random((Lq, Lk)) < 0.2] = -np.inf
        return dict(softcap=1.5, attn_mask=add, sinks=rng.standard_normal(H))
    raise ValueError(kind)


KINDS = ["window", "window_left_causal", "window_right_only", "softcap", "sinks", "key_starts",
         "left_padded_causal", "everything", "softcap_additive_sinks"]


def _oracle(q, k, v, **kw):
    return ref.scaled_dot_product_attention(q.astype(np.float64), k.astype(np.float64),
                                            v.astype(np.float64), **kw)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", KINDS)
def test_against_oracle(isa, threads, dtype, rng, shape, kind):
    q, k, v = _qkv(rng, shape, dtype)
    kw = _features(rng, shape, kind)
    got = fastattn.scaled_dot_product_attention(q, k, v, num_threads=threads, **kw)
    assert_close(got, _oracle(q, k, v, **kw).astype(dtype), dtype)


@pytest.mark.parametrize("shape", [(2, 4, 2, 5, 7, 8, 9), (1, 2, 1, 97, 130, 5, 7),
                                   (1, 2, 2, 3, 333, 16, 24)], ids=str)
@pytest.mark.parametrize("kind", ["window", "sinks", "everything", "key_starts"])
def test_weights(isa, dtype, rng, shape, kind):
    q, k, v = _qkv(rng, shape, dtype)
    kw = _features(rng, shape, kind)
    got, w = fastattn.scaled_dot_product_attention(q, k, v, return_weights=True, **kw)
    want, w_want = _oracle(q, k, v, return_weights=True, **kw)
    assert_close(got, want.astype(dtype), dtype)
    assert_close(w, w_want.astype(dtype), dtype)
    if "sinks" in kw:  # the sink takes its share: real keys sum to < 1
        sums = w.astype(np.float64).sum(-1)
        assert np.all(sums < 1 + 1e-6)


def test_sinks_take_their_share_exactly(dtype):
    # one key of score 0, sink 0: the key's weight is exactly 1/2
    q = np.zeros((1, 1, 1, 4), dtype)
    k = np.zeros((1, 1, 1, 4), dtype)
    v = np.full((1, 1, 1, 3), 2.0, dtype)
    out, w = fastattn.scaled_dot_product_attention(q, k, v, sinks=[0.0], return_weights=True)
    np.testing.assert_array_equal(w, np.full((1, 1, 1, 1), 0.5, dtype))
    np.testing.assert_array_equal(out, np.ones((1, 1, 1, 3), dtype))


def test_row_without_keys_is_zero_with_sinks(isa, dtype, rng):
    q, k, v = _qkv(rng, (2, 2, 2, 4, 3000, 16, 8), dtype)  # decode-like split path too
    for Lq in (4, 1):
        out = fastattn.scaled_dot_product_attention(q[:, :, :Lq], k, v, key_lengths=[0, 5],
                                                    key_starts=[0, 5], sinks=[1.0, -2.0])
        assert np.all(out == 0)


@pytest.mark.parametrize("shape", [(1, 2, 1, 1, 4100, 32, 32), (1, 1, 1, 2, 2600, 16, 8)], ids=str)
def test_split_kv_matches_oracle_with_sinks_and_window(isa, dtype, rng, shape):
    """Decode shapes take the split-KV path; the merge adds the sink once."""
    q, k, v = _qkv(rng, shape, dtype)
    H, Lk = shape[1], shape[4]
    for kw in (dict(sinks=rng.standard_normal(H) + 3), dict(window=(1500, 0), is_causal=True,
               causal_alignment="bottom_right", sinks=rng.standard_normal(H),
               alibi_slopes=np.full(H, 0.01), key_starts=[Lk // 3])):
        got = fastattn.scaled_dot_product_attention(q, k, v, **kw)
        assert_close(got, _oracle(q, k, v, **kw).astype(dtype), dtype)


@pytest.mark.parametrize("shape", [(2, 4, 2, 130, 211, 33, 17), (1, 4, 2, 1, 2051, 64, 40)],
                         ids=str)
def test_deterministic_across_threads(isa, dtype, rng, shape):
    q, k, v = _qkv(rng, shape, dtype)
    kw = _features(rng, shape, "everything")
    one = fastattn.scaled_dot_product_attention(q, k, v, num_threads=1, **kw)
    many = fastattn.scaled_dot_product_attention(q, k, v, num_threads=N_THREADS, **kw)
    np.testing.assert_array_equal(one, many)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_inputs(isa, dtype, rng, layout):
    shape = (2, 4, 2, 37, 61, 24, 16)
    q, k, v = _qkv(rng, shape, dtype)
    kw = _features(rng, shape, "everything")
    got = fastattn.scaled_dot_product_attention(*(strided_copy(x, layout) for x in (q, k, v)), **kw)
    assert_close(got, _oracle(q, k, v, **kw).astype(dtype), dtype)


def test_window_beyond_every_key_changes_nothing(dtype, rng):
    q, k, v = _qkv(rng, (1, 2, 2, 9, 11, 8, 8), dtype)
    plain = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    wide = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                 window=(10**15, 10**15))
    np.testing.assert_array_equal(plain, wide)


def test_three_d_inputs(dtype, rng):
    q = rng.standard_normal((2, 7, 8)).astype(dtype)
    k = rng.standard_normal((2, 9, 8)).astype(dtype)
    v = rng.standard_normal((2, 9, 5)).astype(dtype)
    kw = dict(window=(2, 1), softcap=2.0, sinks=[0.5], key_starts=[1, 2])
    got = fastattn.scaled_dot_product_attention(q, k, v, **kw)
    assert_close(got, _oracle(q, k, v, **kw).astype(dtype), dtype)


def test_window_skips_keys_outside():
    """Keys outside the window are never computed: a NaN there cannot leak,
    which it would if the key were scored and then masked."""
    rng = np.random.default_rng(1)
    q, k, v = _qkv(rng, (1, 1, 1, 200, 200, 16, 8), np.float32)
    k[0, 0, :50] = np.nan
    v[0, 0, :50] = np.nan
    out = fastattn.scaled_dot_product_attention(q[:, :, 150:], k, v, window=(90, 0), is_causal=True,
                                                causal_alignment="bottom_right")
    assert np.isfinite(out).all()


# ---- argument checks ----------------------------------------------------------

def _small(rng):
    return _qkv(rng, (1, 2, 2, 3, 4, 8, 8), np.float32)


@pytest.mark.parametrize("window, exc", [
    (5, TypeError), ((1, 2, 3), TypeError), ("ab", TypeError), ((1.5, 0), TypeError),
    ((True, 0), TypeError), ((-1, 0), ValueError), ((0, -3), ValueError)])
def test_bad_window(rng, window, exc):
    with pytest.raises(exc, match="window"):
        fastattn.scaled_dot_product_attention(*_small(rng), window=window)


@pytest.mark.parametrize("softcap, exc", [
    (0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
    ("1", TypeError), (True, TypeError)])
def test_bad_softcap(rng, softcap, exc):
    with pytest.raises(exc, match="softcap"):
        fastattn.scaled_dot_product_attention(*_small(rng), softcap=softcap)


@pytest.mark.parametrize("sinks, exc", [
    ([1.0], ValueError), ([[1.0, 2.0]], ValueError), ([np.nan, 0.0], ValueError),
    ([np.inf, 0.0], ValueError), (["a", "b"], TypeError)])
def test_bad_sinks(rng, sinks, exc):
    with pytest.raises(exc, match="sinks"):
        fastattn.scaled_dot_product_attention(*_small(rng), sinks=sinks)


@pytest.mark.parametrize("starts, exc", [([1, 2], ValueError), ([-1], ValueError),
                                         ([1.5], TypeError), ([9], ValueError)])
def test_bad_key_starts(rng, starts, exc):
    with pytest.raises(exc, match="key_starts"):
        fastattn.scaled_dot_product_attention(*_small(rng), key_starts=starts)
