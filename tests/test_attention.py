"""scaled_dot_product_attention against the oracle: every mask kind and
combination, GQA, ALiBi, decode and split-KV shapes, awkward sizes, every
ISA level, 1 and N threads, float32 and float64, strided inputs."""

import numpy as np
import pytest

import fastattn
from fastattn import reference as ref
from conftest import LAYOUTS, N_THREADS, assert_close, random_qkv, strided_copy

# (B, H, Hkv, Lq, Lk, D, Dv): sizes around the 96-query / 48-key tiles, the
# 6- and 12-row register tiles and the vector widths; decode rows (Lq < 4)
# with and without the split-KV path (Lk >= 1024 and few heads).
SHAPES = [
    (1, 1, 1, 1, 1, 1, 1),
    (2, 3, 3, 5, 7, 8, 8),
    (1, 2, 1, 97, 49, 5, 7),
    (2, 4, 2, 130, 200, 64, 64),
    (1, 3, 3, 37, 60, 40, 24),  # 16-row query blocks packed in registers, D past them
    (1, 2, 2, 3, 333, 33, 17),
    (1, 1, 1, 2, 1100, 16, 24),
    (1, 4, 1, 1, 2051, 128, 128),
]


def _mask_kwargs(rng, shape, kind):
    B, H, Hkv, Lq, Lk, D, Dv = shape
    if kind == "none":
        return {}
    if kind == "causal":
        return dict(is_causal=True)
    if kind == "causal_br":
        return dict(is_causal=True, causal_alignment="bottom_right")
    if kind == "lengths":
        return dict(key_lengths=rng.integers(0, Lk + 1, size=B),
                    query_lengths=rng.integers(0, Lq + 1, size=(B, H)))
    if kind == "bool":
        return dict(attn_mask=rng.random((B, 1, Lq, Lk)) > 0.3)
    if kind == "additive":
        add = rng.standard_normal((Lq, Lk))
        add[rng.random((Lq, Lk)) < 0.2] = -np.inf
        return dict(attn_mask=add)
    if kind == "alibi":
        return dict(alibi_slopes=rng.random(H), is_causal=True, causal_alignment="bottom_right")
    if kind == "everything":
        return dict(attn_mask=rng.random((Lq, Lk)) > 0.2, key_lengths=rng.integers(1, Lk + 1, size=(B, H)),
                    query_lengths=rng.integers(0, Lq + 1, size=B), is_causal=True,
                    causal_alignment="bottom_right", alibi_slopes=rng.random(H), scale=0.3)
    raise ValueError(kind)


MASKS = ["none", "causal", "causal_br", "lengths", "bool", "additive", "alibi", "everything"]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("masks", MASKS)
def test_against_oracle(isa, threads, dtype, rng, shape, masks):
    q, k, v = random_qkv(rng, shape, dtype)
    kw = _mask_kwargs(rng, shape, masks)
    if "attn_mask" in kw and kw["attn_mask"].dtype != bool:
        kw["attn_mask"] = kw["attn_mask"].astype(dtype)
    got = fastattn.scaled_dot_product_attention(q, k, v, num_threads=threads, **kw)
    assert_close(got, ref.scaled_dot_product_attention(q, k, v, **kw))
    assert not np.isnan(got).any()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 4, 2, 11, 50, 16, 8), (2, 4, 2, 35, 50, 24, 8)], ids=str)
def test_strided_inputs(isa, threads, dtype, rng, layout, shape):
    q, k, v = random_qkv(rng, shape, dtype)
    qs, ks, vs = (strided_copy(x, layout) for x in (q, k, v))
    kw = dict(key_lengths=[50, 20], is_causal=True)
    assert_close(fastattn.scaled_dot_product_attention(qs, ks, vs, num_threads=threads, **kw),
                 ref.scaled_dot_product_attention(q, k, v, **kw))


def test_three_d_inputs_are_one_head(rng, dtype):
    q, k, v = (rng.standard_normal((2, 9, 8)).astype(dtype) for _ in range(3))
    m = rng.random((9, 9)) > 0.3
    got = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=m, key_lengths=[9, 4])
    assert got.shape == (2, 9, 8)
    assert_close(got, ref.scaled_dot_product_attention(q, k, v, attn_mask=m, key_lengths=[9, 4]))


@pytest.mark.parametrize("shape", [(2, 4, 2, 100, 70, 16, 16), (1, 2, 1, 2, 1500, 8, 8)], ids=str)
def test_return_weights(isa, dtype, rng, shape):
    q, k, v = random_qkv(rng, shape, dtype)
    kw = dict(key_lengths=[shape[4] - 3] * shape[0], is_causal=True, causal_alignment="bottom_right",
              alibi_slopes=rng.random(shape[1]))
    out, w = fastattn.scaled_dot_product_attention(q, k, v, return_weights=True, **kw)
    ref_out, ref_w = ref.scaled_dot_product_attention(q, k, v, return_weights=True, **kw)
    assert_close(out, ref_out)
    assert_close(w, ref_w)
    # the weights are the softmax that produced out
    vv = np.repeat(v, shape[1] // shape[2], axis=1).astype(np.float64)
    assert_close(out, (w.astype(np.float64) @ vv).astype(dtype))


def test_fully_masked_rows_are_zero_in_out_and_weights(dtype):
    rng = np.random.default_rng(3)
    q, k, v = random_qkv(rng, (2, 2, 2, 6, 5, 4, 4), dtype)
    mask = np.ones((6, 5), bool)
    mask[2] = False
    out, w = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, key_lengths=[5, 0],
                                                   query_lengths=[4, 6], return_weights=True)
    assert (out[:, :, 2] == 0).all() and (w[:, :, 2] == 0).all()
    assert (out[1] == 0).all() and (w[1] == 0).all()  # no keys at all
    assert (out[0, :, 4:] == 0).all()  # padded queries
    assert not np.isnan(out).any() and not np.isnan(w).any()


@pytest.mark.parametrize("shape", [(2, 8, 4, 200, 300, 64, 64), (1, 2, 1, 1, 4000, 64, 64)], ids=str)
def test_bitwise_identical_across_threads_and_runs(shape):
    rng = np.random.default_rng(7)
    q, k, v = random_qkv(rng, shape, np.float32)
    kw = dict(key_lengths=[shape[4] - 7] * shape[0], is_causal=True, causal_alignment="bottom_right")
    first = fastattn.scaled_dot_product_attention(q, k, v, num_threads=1, **kw)
    for n in range(1, N_THREADS + 3):
        for _ in range(2):
            again = fastattn.scaled_dot_product_attention(q, k, v, num_threads=n, **kw)
            assert np.array_equal(first, again), f"num_threads={n} changed the result"


def test_out_argument_and_scale(rng):
    q, k, v = random_qkv(rng, (1, 2, 2, 7, 9, 8, 8), np.float32)
    out = np.empty((1, 2, 7, 8), np.float32)
    assert fastattn.scaled_dot_product_attention(q, k, v, out=out, scale=0.25) is out
    assert_close(out, ref.scaled_dot_product_attention(q, k, v, scale=0.25))
    big = np.zeros((1, 2, 7, 16), np.float32)
    fastattn.scaled_dot_product_attention(q, k, v, out=big[..., ::2])
    assert_close(big[..., ::2], ref.scaled_dot_product_attention(q, k, v))


def test_out_in_merged_head_layout_is_written_in_place(rng):
    """out may be any view with a unit last-axis stride: a (B, Lq, H, Dv)
    buffer seen as (B, H, Lq, Dv) receives the merged-head layout directly."""
    q, k, v = random_qkv(rng, (2, 4, 2, 9, 11, 8, 8), np.float32)
    buf = np.zeros((2, 9, 4, 8), np.float32)
    view = buf.transpose(0, 2, 1, 3)
    got = fastattn.scaled_dot_product_attention(q, k, v, out=view)
    assert got is view and np.shares_memory(got, buf)
    assert_close(buf, ref.scaled_dot_product_attention(q, k, v).transpose(0, 2, 1, 3))


@pytest.mark.parametrize("per_head", [False, True], ids=["lengths_b", "lengths_bh"])
@pytest.mark.parametrize("io", ["f32", "f64", "bf16", "f16"])
def test_padded_queries_zeroed_in_merged_head_layout(isa, threads, rng, io, per_head):
    """Padded query rows of a (B, Lq, H, Dv) output are exactly 0 for every
    head (zeroed a token row at a time when the lengths are per sequence),
    the valid rows are the oracle's, and nothing outside the view is
    written: the buffer holds one spare head slot per token, left as NaN."""
    B, H, Hkv, Lq, Lk, D, Dv = 3, 5, 1, 130, 61, 9, 7  # two query blocks, odd sizes
    if io == "bf16":
        dt = np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    else:
        dt = np.dtype({"f32": np.float32, "f64": np.float64, "f16": np.float16}[io])
    q, k, v = (x.astype(dt) for x in random_qkv(rng, (B, H, Hkv, Lq, Lk, D, Dv), np.float32))
    ql = np.array([0, 97, 41]) if not per_head else np.array([[0] * H, [97, 96, 130, 1, 5], [41] * H])
    kl = np.array([61, 13, 1])
    buf = np.full((B, Lq, H + 1, Dv), np.nan, dtype=dt)
    view = buf[:, :, :H].transpose(0, 2, 1, 3)
    got = fastattn.scaled_dot_product_attention(q, k, v, key_lengths=kl, query_lengths=ql, out=view,
                                                num_threads=threads)
    assert got is view
    assert np.isnan(buf[:, :, H].astype(np.float64)).all()
    qlh = np.broadcast_to(ql.reshape(B, -1), (B, H))
    padded = np.arange(Lq)[None, None, :] >= qlh[:, :, None]
    assert (got.astype(np.float64)[padded] == 0).all()
    want = ref.scaled_dot_product_attention(q.astype(np.float64), k.astype(np.float64),
                                            v.astype(np.float64), key_lengths=kl, query_lengths=ql)
    if io in ("f32", "f64"):
        assert_close(got, want.astype(dt))
    else:  # 16-bit output: one rounding of a float32 result (bf16 P.V: 2^-9 max|v| more)
        err = np.abs(got.astype(np.float64) - want)
        assert (err <= 2.0 ** -6 * np.abs(want) + 2.0 ** -8 * np.abs(v.astype(np.float64)).max()).all()


def test_dtype_promotion(rng):
    q = rng.standard_normal((1, 1, 3, 4)).astype(np.float32)
    assert fastattn.scaled_dot_product_attention(q, q, q).dtype == np.float32
    assert fastattn.scaled_dot_product_attention(q, q, q.astype(np.float64)).dtype == np.float64
    assert fastattn.scaled_dot_product_attention(q.astype(np.float16), q, q).dtype == np.float32


def test_bad_input_messages():
    q = np.zeros((2, 4, 5, 8), np.float32)
    k = np.zeros((2, 2, 6, 8), np.float32)
    v = np.zeros((2, 2, 6, 3), np.float32)
    sdpa = fastattn.scaled_dot_product_attention
    with pytest.raises(ValueError, match=r"head dim.*q \(2, 4, 5, 8\), k \(2, 2, 6, 7\)"):
        sdpa(q, np.zeros((2, 2, 6, 7), np.float32), v)
    with pytest.raises(ValueError, match=r"multiple of the kv heads"):
        sdpa(q, np.zeros((2, 3, 6, 8)), np.zeros((2, 3, 6, 3)))
    with pytest.raises(ValueError, match=r"k and v must have the same heads and length"):
        sdpa(q, k, np.zeros((2, 2, 7, 3)))
    with pytest.raises(ValueError, match=r"same batch size"):
        sdpa(q, k[:1], v[:1])
    with pytest.raises(ValueError, match=r"all be 4-D.*or all 3-D"):
        sdpa(q[0], k, v)
    with pytest.raises(ValueError, match=r"attn_mask of shape \(3, 3\) does not broadcast"):
        sdpa(q, k, v, attn_mask=np.ones((3, 3), bool))
    with pytest.raises(ValueError, match=r"key_lengths must be <= the key length 6"):
        sdpa(q, k, v, key_lengths=[7, 1])
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \(4,\)"):
        sdpa(q, k, v, alibi_slopes=np.ones(2))
    with pytest.raises(TypeError, match=r"q has unsupported dtype complex64"):
        sdpa(q.astype(np.complex64), k, v)
    with pytest.raises(TypeError, match=r"scale must be a real number"):
        sdpa(q, k, v, scale="big")
    with pytest.raises(ValueError, match=r"causal_alignment must be one of"):
        sdpa(q, k, v, is_causal=True, causal_alignment="center")
