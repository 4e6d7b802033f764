"""bfloat16 and float16 in masked_softmax, split/merge_heads and apply_rotary:
the result keeps the input dtype, float32 inside, one rounding to nearest
even at the store; compared with the oracle's 16-bit mode (exact inputs,
float64, one rounding) at every ISA level, 1 and N threads, strided inputs
and odd sizes.

The bound, ``ulp_bound``: the kernel rounds its float32 result and the
oracle rounds the exact one; where those two are closer than half an ulp of
the 16-bit dtype they round to the same value or to two neighbours, so the
results differ by at most one ulp of the dtype at the oracle's value. The
float32 results are within 1e-5 relative of the exact ones (the float32
tolerance of the suite), far below half an ulp of bfloat16 (2^-9) or
float16 (2^-12), except where a rotated element cancels far below its
inputs: there the float32 error is absolute, 2^-22 (|x_a| + |x_b|) at
most (rounded tables and products), and is added to the bound.
"""

import numpy as np
import pytest

import fastattn
from fastattn import reference

from conftest import LAYOUTS, rotary_bound_terms, strided_copy

try:
    import ml_dtypes
except ImportError:  # float16 runs without it
    ml_dtypes = None

HALF = [np.dtype(np.float16)] + ([np.dtype(ml_dtypes.bfloat16)] if ml_dtypes else [])


@pytest.fixture(params=HALF, ids=lambda d: d.name)
def half(request):
    return request.param


def ulp(values, dtype):
    """One ulp of ``dtype`` at each |value| (the subnormal spacing at 0)."""
    info = (ml_dtypes.finfo if dtype.name == "bfloat16" else np.finfo)(dtype)
    mags = np.abs(np.asarray(values, np.float64))
    tiny = float(info.smallest_normal)
    exp = np.floor(np.log2(np.maximum(mags, tiny)))
    return np.maximum(np.exp2(exp) * float(info.eps), float(info.smallest_subnormal))


def assert_within_ulps(got, ref, dtype, ulps=1.0, atol=0.0):
    """|got - ref| <= ulps * ulp(ref) + atol elementwise, dtypes checked."""
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.dtype == dtype, f"dtype {got.dtype} != {dtype}"
    assert ref.dtype == dtype, f"oracle dtype {ref.dtype} != {dtype}"
    assert got.shape == ref.shape
    g, r = got.astype(np.float64), ref.astype(np.float64)
    both_nan = np.isnan(g) & np.isnan(r)
    err = np.where(both_nan, 0.0, np.abs(g - r))
    bound = ulps * ulp(r, dtype) + atol
    bad = ~(err <= bound)
    assert not bad.any(), (f"{int(bad.sum())} of {bad.size} elements beyond the bound; worst "
                           f"got {g[bad][:5]} ref {r[bad][:5]}")


def random_half(rng, shape, dtype, scale=3.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


# ---- masked_softmax ------------------------------------------------------------------

@pytest.mark.parametrize("Lk", [1, 7, 33, 130])
def test_softmax_rows(isa, threads, half, rng, Lk):
    x = random_half(rng, (2, 3, 5, Lk), half)
    got = fastattn.masked_softmax(x, scale=0.7, num_threads=threads)
    assert_within_ulps(got, reference.masked_softmax(x, scale=0.7), half)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_softmax_masks_lengths_and_layouts(isa, threads, half, rng, layout):
    x = strided_copy(random_half(rng, (3, 2, 9, 21), half), layout)
    kl = np.array([21, 5, 0])
    ql = np.array([9, 4, 7])
    mask = rng.random((1, 2, 9, 21)) < 0.8
    add = np.where(rng.random((9, 21)) < 0.1, -np.inf, rng.standard_normal((9, 21))).astype(np.float32)
    for kw in (dict(attn_mask=mask), dict(attn_mask=add), dict(attn_mask=add.astype(half))):
        kw.update(key_lengths=kl, query_lengths=ql, is_causal=True, scale=1.3)
        got = fastattn.masked_softmax(x, num_threads=threads, **kw)
        assert_within_ulps(got, reference.masked_softmax(x, **kw), half)


def test_softmax_out_and_in_place(isa, half, rng):
    x = random_half(rng, (2, 3, 4, 19), half)
    ref = reference.masked_softmax(x, key_lengths=[19, 3])
    out = np.empty_like(x)
    assert fastattn.masked_softmax(x, key_lengths=[19, 3], out=out) is out
    assert_within_ulps(out, ref, half)
    y = x.copy()
    fastattn.masked_softmax(y, key_lengths=[19, 3], out=y)
    assert_within_ulps(y, ref, half)
    strided_out = np.zeros((2, 3, 4, 38), half)[..., ::2]
    fastattn.masked_softmax(x, key_lengths=[19, 3], out=strided_out)
    assert_within_ulps(strided_out, ref, half)


def test_softmax_nan_and_empty_rows(isa, half):
    x = np.zeros((1, 1, 3, 4), half)
    x[0, 0, 0, 1] = np.nan
    got = fastattn.masked_softmax(x, key_lengths=[4], query_lengths=[2])
    assert np.isnan(got[0, 0, 0].astype(np.float32)).all()  # NaN stays NaN through the store
    np.testing.assert_array_equal(got[0, 0, 1].astype(np.float32), 0.25)
    np.testing.assert_array_equal(got[0, 0, 2].astype(np.float32), 0.0)  # padded query row


def test_softmax_threads_agree_bitwise(half, rng):
    x = random_half(rng, (4, 6, 17, 67), half)
    one = fastattn.masked_softmax(x, is_causal=True, num_threads=1)
    many = fastattn.masked_softmax(x, is_causal=True, num_threads=4)
    np.testing.assert_array_equal(one.view(np.uint16), many.view(np.uint16))


# ---- split_heads / merge_heads: 2-byte moves -----------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("D", [1, 5, 32])
def test_split_merge_move_bits(threads, half, rng, layout, D):
    x = strided_copy(random_half(rng, (3, 7, 3 * D), half), layout)
    y = fastattn.split_heads(x, 3, num_threads=threads)
    assert y.dtype == half and y.flags.c_contiguous
    ref = reference.split_heads(x, 3)
    assert ref.dtype == half
    np.testing.assert_array_equal(y.view(np.uint16), ref.view(np.uint16))
    z = fastattn.merge_heads(strided_copy(y, layout), num_threads=threads)
    assert z.dtype == half
    np.testing.assert_array_equal(z.view(np.uint16), np.ascontiguousarray(x).view(np.uint16))


def test_split_heads_keeps_nan_payloads(half):
    bits = np.array([[[0x7FC1, 0xFFFF, 0x0001, 0x8000]]], np.uint16)  # NaNs, a subnormal, -0
    x = bits.view(half)
    np.testing.assert_array_equal(fastattn.split_heads(x, 2).reshape(1, 4).view(np.uint16),
                                  bits.reshape(1, 4))


# ---- apply_rotary ----------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["neox", "gptj"])
@pytest.mark.parametrize("D", [2, 6, 64])
@pytest.mark.parametrize("mem", ["C", "strided"])
def test_rotary(isa, threads, half, rng, layout, D, mem):
    x = strided_copy(random_half(rng, (2, 3, 11, D), half), mem)
    pos = rng.integers(-50, 5000, (2, 1, 11))
    got = fastattn.apply_rotary(x, pos, layout=layout, num_threads=threads)
    _, pair = rotary_bound_terms(x, pos, layout)
    assert_within_ulps(got, reference.apply_rotary(x, pos, layout=layout), half,
                       atol=2.0**-22 * pair)


def test_rotary_in_place_and_out(isa, half, rng):
    x = random_half(rng, (2, 5, 8), half)
    ref = reference.apply_rotary(x, np.arange(5))
    _, pair = rotary_bound_terms(x, np.arange(5))
    y = x.copy()
    assert fastattn.apply_rotary(y, np.arange(5), out=y) is y
    assert_within_ulps(y, ref, half, atol=2.0**-22 * pair)


def test_rotary_threads_agree_bitwise(half, rng):
    x = random_half(rng, (3, 4, 50, 64), half)
    pos = np.arange(50)
    one = fastattn.apply_rotary(x, pos, num_threads=1)
    many = fastattn.apply_rotary(x, pos, num_threads=3)
    np.testing.assert_array_equal(one.view(np.uint16), many.view(np.uint16))


# ---- the rounding itself ---------------------------------------------------------------

def test_rounding_is_nearest_even_once(half):
    """Softmax of two keys whose probabilities are exactly representable
    halfway cases would hide a truncating store; instead take a one-key row
    (p = 1 exactly) and rows whose float32 p sits just above a tie."""
    x = np.zeros((1, 1, 1, 1), half)
    np.testing.assert_array_equal(fastattn.masked_softmax(x).astype(np.float32), 1.0)
    # 3 equal keys: p = 1/3, whose nearest-even value differs from truncation
    x = np.zeros((1, 1, 1, 3), half)
    got = fastattn.masked_softmax(x)[0, 0, 0, 0]
    assert got == np.array(1 / 3).astype(half)
    truncated = (np.array([1 / 3], np.float32).view(np.uint32) >> 16 << 16).view(np.float32)
    if half.name == "bfloat16":
        assert float(got) != float(truncated[0])


@pytest.mark.parametrize("n", [3, 17, 40, 100])
def test_rounded_store_matches_a_single_rounding(isa, half, n):
    """n equal scores: every p is float32's 1/n exactly (e = 1, sum = n),
    stored rounded to nearest even; n covers whole vectors and tails."""
    got = fastattn.masked_softmax(np.zeros((2, 1, 3, n), half))
    want = (np.float32(1) / np.float32(n)).astype(half)
    np.testing.assert_array_equal(got.view(np.uint16), np.full(got.shape, want).view(np.uint16))


def test_every_finite_value_survives_the_float32_round_trip(isa, half):
    """RoPE at position 0 rotates by (cos, sin) = (1, 0): a * 1 - b * 0 = a
    for nonzero finite a and finite b, so every nonzero finite 16-bit value,
    subnormals included, is widened and rounded back to itself."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    with np.errstate(invalid="ignore"):  # the NaN patterns
        vals = bits.view(half).astype(np.float64)
    keep = bits[np.isfinite(vals) & (vals != 0)]
    keep = keep[: keep.size // 2 * 2].reshape(1, -1, 2)  # gptj pairs (a, b)
    x = keep.view(half)
    got = fastattn.apply_rotary(x, np.zeros(x.shape[1], np.int64), layout="gptj")
    np.testing.assert_array_equal(got.view(np.uint16), keep)
