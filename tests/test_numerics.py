"""Numerics with explicit expectations (not only "equals the oracle").

Rules checked here, at every ISA level and dtype:

* logits of +-1e30 and tiny logits (1e-30, subnormals) give exact,
  finite probabilities;
* +-Inf or NaN in a score that a bool mask, key_lengths, causality or
  query_lengths masks out never reaches the output: masked keys are exactly
  0 and the row is the softmax of its valid keys;
* NaN in a valid score makes that row's valid keys NaN, its masked keys stay
  exactly 0, and every other row is untouched -- also when the NaN is the
  row's only valid key, or every other valid key is -inf;
* +Inf in a valid score gives a NaN row (inf - inf), as NumPy's softmax;
* an additive float mask is arithmetic: -inf masks a finite score, and
  NaN + -inf is NaN (IEEE, as torch SDPA); use a bool mask or lengths to
  mask scores that may hold NaN;
* rows of length 1 are exactly 1 (or 0 when masked, NaN when NaN);
* scale 0 gives the uniform distribution over the valid keys.
"""

import numpy as np
import pytest

import fastattn
from fastattn import reference

from conftest import assert_close

ALL = pytest.mark.usefixtures("isa")


def softmax(x, **kw):
    return fastattn.masked_softmax(x, **kw)


def check_oracle(x, **kw):
    got = softmax(x, **kw)
    assert_close(got, reference.masked_softmax(x, **kw))
    return got


# key counts hitting the vector body and the scalar tail of every ISA
WIDTHS = [1, 3, 8, 17, 40]


@ALL
@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("scale", [1.0, 0.5, 2.0**-10])
@pytest.mark.parametrize("top", [1e3, 2.0**21, 2.0**22, 2.0**23, 1e20])
def test_large_row_maximum(dtype, n, scale, top):
    """Scores a few float spacings apart just below a large maximum, on
    both sides of the size (|max * scale * log2 e| = 2^22) where the float
    kernels stop forming the exponent as one FMA and subtract the maximum
    first: the rounding of max * scale * log2 e must not reach the
    probabilities. Scales are powers of 2, so that the oracle's own
    x * scale is exact: otherwise its rounding (|x * scale| 2^-53 for
    float64) alone would exceed the tolerance at such magnitudes."""
    top = np.asarray(top / (scale * np.log2(np.e)), dtype)
    x = (top - np.spacing(top) * np.arange(n, dtype=dtype) * 3).reshape(1, 1, n)
    check_oracle(x, scale=scale)
    check_oracle(x, scale=scale, key_lengths=np.array([max(n - 1, 1)]))


@ALL
@pytest.mark.parametrize("n", WIDTHS)
def test_huge_logits(dtype, n):
    x = np.zeros((3, n), dtype)
    x[0, 0] = 1e30      # one huge logit: probability exactly 1
    x[1, :] = -1e30     # all equal huge negative: uniform
    x[2, :] = -1e30
    x[2, -1] = 1e30
    y = check_oracle(x)
    assert np.isfinite(y).all()
    expected0 = np.zeros(n)
    expected0[0] = 1
    np.testing.assert_array_equal(y[0], expected0)
    np.testing.assert_allclose(y[1], np.full(n, 1 / n), rtol=1e-6)
    np.testing.assert_array_equal(y[2], np.eye(n)[-1])


@ALL
@pytest.mark.parametrize("n", WIDTHS)
def test_tiny_logits(dtype, n):
    tiny = np.finfo(dtype).smallest_subnormal
    x = np.full((2, n), 1e-30, dtype)
    x[1, ::2] = tiny
    y = check_oracle(x)
    np.testing.assert_allclose(y, np.full((2, n), 1 / n), rtol=1e-6)


@ALL
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("how", ["bool", "key_lengths", "causal", "query_lengths"])
@pytest.mark.parametrize("n", [2, 9, 33])
def test_masked_inf_and_nan_do_not_leak(dtype, bad, how, n):
    x = np.random.default_rng(n).standard_normal((2, 4, n)).astype(dtype)
    kw = {}
    valid = np.ones(x.shape, bool)
    if how == "bool":
        mask = np.ones((4, n), bool)
        mask[:, -1] = False
        mask[2, :] = False                      # a fully masked row
        x[..., -1] = bad
        x[:, 2, :] = bad
        kw["attn_mask"] = mask
        valid &= mask
    elif how == "key_lengths":
        kw["key_lengths"] = np.array([n - 1, 1])
        x[0, :, n - 1:] = bad
        x[1, :, 1:] = bad
        valid[0, :, n - 1:] = False
        valid[1, :, 1:] = False
    elif how == "causal":
        kw["is_causal"] = True
        i, j = np.indices((4, n))
        x[:, j > i] = bad
        valid &= ~(j > i)
    else:
        kw["query_lengths"] = np.array([2, 0])
        x[0, 2:] = bad
        x[1] = bad
        valid[0, 2:] = False
        valid[1] = False
    y = check_oracle(x, **kw)
    assert not np.isnan(y).any(), "a masked NaN/Inf leaked"
    assert (y[~valid] == 0).all(), "masked keys must be exactly 0"
    rows = valid.any(axis=-1)
    np.testing.assert_allclose(y.sum(axis=-1)[rows], 1, rtol=1e-5)
    assert (y.sum(axis=-1)[~rows] == 0).all()


@ALL
@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("where", [0, -1])
def test_nan_in_valid_score_poisons_its_row_only(dtype, n, where):
    x = np.random.default_rng(n).standard_normal((3, 2, n)).astype(dtype)
    x[1, 0, where] = np.nan
    y = check_oracle(x)
    assert np.isnan(y[1, 0]).all()
    mask = np.ones(x.shape, bool)
    mask[1, 0] = False
    assert not np.isnan(y[mask]).any()


@ALL
@pytest.mark.parametrize("n", WIDTHS)
def test_nan_as_only_valid_key(dtype, n):
    # The NaN used to be skipped by the max; the row then looked empty and
    # was written as zeros.
    x = np.zeros((4, n), dtype)
    x[:, 0] = np.nan
    y = check_oracle(x, key_lengths=np.array(1))
    assert np.isnan(y[:, 0]).all()
    assert (y[:, 1:] == 0).all()
    m = np.zeros((4, n), bool)
    m[:, 0] = True
    y = check_oracle(x, attn_mask=m)
    assert np.isnan(y[:, 0]).all() and (y[:, 1:] == 0).all()
    add = np.full((4, n), -np.inf, dtype)
    add[:, 0] = 0
    y = check_oracle(x, attn_mask=add)      # others are -inf: still a NaN row
    assert np.isnan(y).all()


@ALL
@pytest.mark.parametrize("n", [3, 17, 40])
def test_nan_row_keeps_masked_keys_zero(dtype, n):
    x = np.random.default_rng(n).standard_normal((2, n)).astype(dtype)
    x[:, 1] = np.nan
    mask = np.ones((2, n), bool)
    mask[:, 2] = False
    y = check_oracle(x, attn_mask=mask, key_lengths=np.array(n - 1))
    valid = mask.copy()
    valid[:, n - 1] = False
    assert np.isnan(y[valid]).all()
    assert (y[~valid] == 0).all()


@ALL
@pytest.mark.parametrize("n", WIDTHS)
def test_inf_in_valid_score(dtype, n):
    x = np.zeros((2, n), dtype)
    x[0, 0] = np.inf
    x[1, 0] = -np.inf
    y = check_oracle(x)
    assert np.isnan(y[0]).all()                # inf - inf, as NumPy
    if n > 1:
        assert y[1, 0] == 0
        np.testing.assert_allclose(y[1, 1:], 1 / (n - 1), rtol=1e-6)
    else:
        assert y[1, 0] == 0                    # only key is -inf: empty row


@ALL
def test_additive_mask_is_arithmetic(dtype):
    x = np.array([[1.0, 2.0, np.nan, 3.0]], dtype)
    add = np.array([[0, 0, -np.inf, -np.inf]], dtype)
    y = check_oracle(x, attn_mask=add)
    assert np.isnan(y).all()                   # NaN + -inf is NaN
    x[0, 2] = 5.0
    y = check_oracle(x, attn_mask=add)
    np.testing.assert_allclose(y[0, :2], np.exp([1, 2]) / np.exp([1, 2]).sum(), rtol=1e-6)
    assert (y[0, 2:] == 0).all()


@ALL
def test_rows_of_length_one(dtype):
    x = np.array([[5.0], [-1e30], [0.0], [np.nan], [np.inf], [-np.inf]], dtype)
    y = check_oracle(x)
    np.testing.assert_array_equal(y[:3, 0], [1, 1, 1])
    assert np.isnan(y[3, 0]) and np.isnan(y[4, 0])
    assert y[5, 0] == 0
    y = check_oracle(x[:3], key_lengths=np.array(0))
    assert (y == 0).all()
    y = check_oracle(x[:3], attn_mask=np.array([[True], [False], [True]]))
    np.testing.assert_array_equal(y[:, 0], [1, 0, 1])


@ALL
@pytest.mark.parametrize("n", WIDTHS)
def test_scale_zero_is_uniform_over_valid_keys(dtype, n):
    x = np.random.default_rng(n).standard_normal((3, n)).astype(dtype) * 100
    y = check_oracle(x, scale=0.0)
    np.testing.assert_allclose(y, 1 / n, rtol=1e-6)
    kl = np.array([n, 1, (n + 1) // 2])
    y = check_oracle(x[None], scale=0.0, key_lengths=kl[:1])
    np.testing.assert_allclose(y[0], 1 / n, rtol=1e-6)
    add = np.zeros((3, n), dtype)
    add[:, 0] = np.log(2.0)
    y = check_oracle(x, scale=0.0, attn_mask=add)  # the mask still applies
    np.testing.assert_allclose(y[:, 0], 2 / (n + 1), rtol=1e-6)


@ALL
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_scale_zero_times_inf_is_nan(dtype):
    x = np.array([[np.inf, 0.0, 0.0]], dtype)
    y = check_oracle(x, scale=0.0)
    assert np.isnan(y).all()                   # 0 * inf, as NumPy


@ALL
@pytest.mark.parametrize("top, scale, masked", [
    (0.0, 1.0, False),                  # scale folded, exponent exact
    (3.7, 1 / np.sqrt(80), False),      # scale folded, rounded max * mul
    (3.7, 1 / np.sqrt(80), True),       # a bool mask: scores scaled first
])
def test_float32_exponential_is_within_a_few_ulp(top, scale, masked):
    """The float32 softmax takes e^z (z = (score - max) * scale, never
    positive) as 2^(z log2 e) with a degree-5 polynomial good to 3 ulp;
    each rounding on the way to the exponent (float32's scale, the product
    with log2 e, the FMA; a scaled score when a mask stops the folding)
    adds 2^-24 of |z| (or of the scaled score). Rows [top, -inf, ..., s, ...]
    give p = e^z / (1 + e^z); over 400001 exponents z in [-87, 0], with s in
    the vector body (key 5 of 33) and in the last, partial vector (key 32
    of 33) at every vector width, p must stay within that of float64:
    2e-7 to 3e-7 near the max, so that a coarser polynomial (a degree-4 one
    is off by 2.8e-6) fails here first."""
    z = np.linspace(-87.0, 0.0, 400001)
    scores = (top + z / scale).astype(np.float32)
    z = (scores.astype(np.float64) - np.float32(top)) * scale   # as rounded
    e = np.exp(z)
    want = e / (1.0 + e)
    roundings = 2 if scale == 1.0 else 3
    bound = (3 + roundings * np.abs(z) + 2 * abs(top * scale) * masked) * 2.0**-24
    for key in (5, 32):
        rows = np.full((z.size, 33), -np.inf, np.float32)
        rows[:, 0] = top
        rows[:, key] = scores
        kw = {"attn_mask": np.ones(33, bool)} if masked else {}
        got = softmax(rows, scale=scale, **kw)[:, key].astype(np.float64)
        assert np.max(np.abs(got - want) / want / bound) <= 1
