"""masked_softmax against the oracle: every mask kind, ISA, thread count,
dtype, layout and awkward size."""

import numpy as np
import pytest

import fastattn
from fastattn import reference as ref
from conftest import LAYOUTS, assert_close, strided_copy

# Key counts around the vector widths (8/16 floats, 4/8 doubles) and the
# 2-vector unroll, plus 1 and a long row.
KEY_SIZES = [1, 3, 7, 8, 9, 15, 16, 17, 33, 100, 513]


def _case(rng, shape, dtype):
    return (rng.standard_normal(shape) * 3).astype(dtype)


@pytest.mark.parametrize("Lk", KEY_SIZES)
def test_plain_rows(isa, threads, dtype, rng, Lk):
    x = _case(rng, (2, 3, 5, Lk), dtype)
    got = fastattn.masked_softmax(x, scale=0.7, num_threads=threads)
    assert_close(got, ref.masked_softmax(x, scale=0.7))
    assert_close(got.sum(-1), np.ones((2, 3, 5), dtype))


@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"])
@pytest.mark.parametrize("Lq,Lk", [(1, 1), (5, 5), (7, 19), (19, 7), (16, 33)])
def test_lengths_and_causal(isa, threads, dtype, rng, causal, Lq, Lk):
    B, H = 3, 2
    x = _case(rng, (B, H, Lq, Lk), dtype)
    kl = rng.integers(0, Lk + 1, size=B)
    ql = rng.integers(0, Lq + 1, size=(B, H))
    kw = dict(key_lengths=kl, query_lengths=ql, is_causal=causal is not None,
              causal_alignment=causal or "top_left")
    got = fastattn.masked_softmax(x, num_threads=threads, **kw)
    want = ref.masked_softmax(x, **kw)
    assert_close(got, want)
    assert not np.isnan(got).any()


@pytest.mark.parametrize("mask_shape", [(1, 1, 1, 17), (3, 1, 6, 17), (6, 17), (3, 2, 6, 1)])
def test_bool_mask_broadcasts(isa, threads, dtype, rng, mask_shape):
    x = _case(rng, (3, 2, 6, 17), dtype)
    m = rng.random(mask_shape) > 0.4
    got = fastattn.masked_softmax(x, attn_mask=m, num_threads=threads)
    assert_close(got, ref.masked_softmax(x, attn_mask=m))
    # masked keys get exactly zero
    assert (got[~np.broadcast_to(m, x.shape)] == 0).all()


def test_additive_mask_with_neg_inf(isa, threads, dtype, rng):
    x = _case(rng, (2, 4, 9, 23), dtype)
    add = rng.standard_normal((4, 9, 23)).astype(dtype)
    add[..., ::3] = -np.inf
    add[1, 2, :] = -np.inf  # a fully masked row
    got = fastattn.masked_softmax(x, attn_mask=add, scale=0.5, num_threads=threads)
    assert_close(got, ref.masked_softmax(x, attn_mask=add, scale=0.5))
    assert (got[:, 1, 2] == 0).all()
    assert not np.isnan(got).any()


def test_all_masks_together(isa, threads, dtype, rng):
    B, H, Lq, Lk = 4, 3, 11, 37
    x = _case(rng, (B, H, Lq, Lk), dtype)
    kw = dict(attn_mask=rng.random((B, 1, Lq, Lk)) > 0.2,
              key_lengths=rng.integers(0, Lk + 1, size=(B, H)),
              query_lengths=rng.integers(0, Lq + 1, size=B),
              is_causal=True, causal_alignment="bottom_right", scale=1.3)
    assert_close(fastattn.masked_softmax(x, num_threads=threads, **kw), ref.masked_softmax(x, **kw))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_memory_layouts(isa, threads, dtype, rng, layout):
    x = _case(rng, (2, 3, 7, 21), dtype)
    m = rng.random((2, 3, 7, 21)) > 0.3
    xs, ms = strided_copy(x, layout), strided_copy(m, layout)
    got = fastattn.masked_softmax(xs, attn_mask=ms, key_lengths=[20, 5], num_threads=threads)
    assert_close(got, ref.masked_softmax(x, attn_mask=m, key_lengths=[20, 5]))


def test_scores_of_other_ndims(rng):
    for shape in [(4, 9), (2, 4, 9), (2, 2, 3, 4, 9)]:
        x = rng.standard_normal(shape).astype(np.float32)
        kl = rng.integers(0, 10, size=shape[:-2]) if len(shape) > 2 else np.array(3)
        assert_close(fastattn.masked_softmax(x, key_lengths=kl), ref.masked_softmax(x, key_lengths=kl))


def test_fully_masked_rows_are_zero_not_nan(dtype):
    x = np.zeros((2, 3, 4), dtype)
    got = fastattn.masked_softmax(x, key_lengths=[0, 4], query_lengths=[3, 1])
    assert (got[0] == 0).all()
    assert (got[1, 1:] == 0).all()
    assert_close(got[1, 0], np.full(4, 0.25, dtype))


def test_out_and_in_place(isa, dtype, rng):
    x = _case(rng, (3, 5, 12), dtype)
    want = ref.masked_softmax(x, key_lengths=[12, 4, 7])
    out = np.empty_like(x)
    assert fastattn.masked_softmax(x, key_lengths=[12, 4, 7], out=out) is out
    assert_close(out, want)
    y = x.copy()
    assert fastattn.masked_softmax(y, key_lengths=[12, 4, 7], out=y) is y
    assert_close(y, want)
    # a strided out that the kernel cannot write directly still gets the result
    big = np.zeros((3, 5, 24), dtype)
    fastattn.masked_softmax(x, key_lengths=[12, 4, 7], out=big[..., ::2])
    assert_close(big[..., ::2], want)
    # an out that partially overlaps the input
    buf = np.concatenate([x.ravel(), np.zeros(12, dtype)])
    xin = buf[:x.size].reshape(x.shape)
    shifted = buf[12:12 + x.size].reshape(x.shape)
    fastattn.masked_softmax(xin, key_lengths=[12, 4, 7], out=shifted)
    assert_close(shifted, want)


def test_dtype_promotion():
    x16 = np.zeros((2, 3), np.float16)
    assert fastattn.masked_softmax(x16).dtype == np.float16  # 16-bit kept (test_half_dtypes.py)
    assert fastattn.masked_softmax(np.zeros((2, 3), np.int16)).dtype == np.float32
    assert fastattn.masked_softmax(np.zeros((2, 3), np.int64)).dtype == np.float64
    assert fastattn.masked_softmax([[1, 2, 3]]).dtype == np.float64
    with pytest.raises(TypeError, match="scores"):
        fastattn.masked_softmax(np.zeros((2, 3), np.complex64))


def test_nan_propagates_to_its_row_only():
    x = np.zeros((3, 8), np.float32)
    x[1, 2] = np.nan
    got = fastattn.masked_softmax(x)
    assert np.isnan(got[1]).all()
    assert not np.isnan(got[[0, 2]]).any()


def test_bad_input_messages():
    x = np.zeros((2, 3, 4, 5), np.float32)
    with pytest.raises(ValueError, match="attn_mask.*broadcast.*\\(2, 3, 4, 5\\)"):
        fastattn.masked_softmax(x, attn_mask=np.ones((3, 3), bool))
    with pytest.raises(ValueError, match="key_lengths.*<= .*5"):
        fastattn.masked_softmax(x, key_lengths=[6, 1])
    with pytest.raises(ValueError, match="key_lengths.*non-negative"):
        fastattn.masked_softmax(x, key_lengths=[-1, 1])
    with pytest.raises(TypeError, match="key_lengths.*integers"):
        fastattn.masked_softmax(x, key_lengths=[1.5, 1])
    with pytest.raises(ValueError, match="query_lengths.*shape"):
        fastattn.masked_softmax(x, query_lengths=[1, 2, 3])
    with pytest.raises(ValueError, match="causal_alignment"):
        fastattn.masked_softmax(x, is_causal=True, causal_alignment="diagonal")
    with pytest.raises(ValueError, match="scores.*2 dimensions"):
        fastattn.masked_softmax(np.zeros(3))
    with pytest.raises(ValueError, match="out.*shape"):
        fastattn.masked_softmax(x, out=np.zeros((2, 3, 4), np.float32))
    with pytest.raises(TypeError, match="out.*dtype"):
        fastattn.masked_softmax(x, out=np.zeros(x.shape, np.float64))
    with pytest.raises(ValueError, match="num_threads"):
        fastattn.masked_softmax(x, num_threads=0)


def test_large_outputs_take_the_streaming_path(isa, rng):
    """Outputs >= 16 MiB are written with non-temporal stores; 521 keys make
    most rows start off the vector alignment, exercising the scalar head."""
    x = rng.standard_normal((2, 4, 1024, 521)).astype(np.float32)  # 17 MB
    kl = np.array([521, 300])
    got = fastattn.masked_softmax(x, key_lengths=kl, is_causal=True, causal_alignment="bottom_right")
    assert_close(got[:, :1], ref.masked_softmax(x[:, :1], key_lengths=kl, is_causal=True,
                                                causal_alignment="bottom_right"))
    assert_close(got[:, 3:], ref.masked_softmax(x[:, 3:], key_lengths=kl, is_causal=True,
                                                causal_alignment="bottom_right"))


@pytest.mark.parametrize("dtype_", [np.float32, np.float64])
@pytest.mark.parametrize("Lk", [1, 7, 13, 37])
def test_streaming_rows_of_every_length_and_offset(isa, dtype_, Lk, rng):
    """Short rows start and end anywhere in a 64-byte line: only whole lines
    are streamed, the rest is stored normally, and nothing past a row's end
    is touched. The output is offset by one element from a line boundary,
    a bool mask drops keys and one row holds a NaN."""
    rows = (17 << 20) // (Lk * np.dtype(dtype_).itemsize) // 2 + 3
    x = rng.standard_normal((2, 1, rows, Lk)).astype(dtype_)
    x[1, 0, 5, 0] = np.nan
    kl = np.array([Lk, (Lk + 1) // 2])
    mask = rng.random((1, 1, rows, Lk)) < 0.8
    mask[0, 0, 5, :] = True
    buf = np.full(x.size + 17, 7.0, dtype_)
    out = buf[1:1 + x.size].reshape(x.shape)
    got = fastattn.masked_softmax(x, attn_mask=mask, key_lengths=kl, scale=0.5, out=out)
    assert got is out
    assert buf[0] == 7.0 and (buf[1 + x.size:] == 7.0).all()
    head = (slice(None), slice(None), slice(0, 3000))
    assert_close(got[head], ref.masked_softmax(x[head], attn_mask=mask[head], key_lengths=kl, scale=0.5))
    assert_close(got[:, :, -50:], ref.masked_softmax(x[:, :, -50:], attn_mask=mask[:, :, -50:],
                                                     key_lengths=kl, scale=0.5))
    # the NaN row: NaN where attended, exactly 0 where masked
    nan_row, keep = got[1, 0, 5], mask[0, 0, 5] & (np.arange(Lk) < kl[1])
    assert np.isnan(nan_row[keep]).all() and (nan_row[~keep] == 0).all()
