"""apply_rotary and alibi_slopes against the oracle."""

import numpy as np
import pytest

import fastattn
from fastattn import _kernels
from fastattn import reference as ref
from conftest import (LAYOUTS, angle_atol, assert_close, assert_close_angles, rotary_bound_terms,
                      strided_copy)

# (x shape, positions shape): one table for all heads, per-sequence tables,
# a table per row, 2-D and 5-D inputs, awkward D
CASES = [
    ((5, 8), (5,)),
    ((2, 3, 7, 16), (7,)),
    ((2, 3, 7, 6), (2, 1, 7)),
    ((2, 3, 9, 2), (2, 3, 9)),
    ((2, 2, 3, 4, 10), (4,)),
    ((1, 4, 33, 128), (1, 1, 33)),
]


@pytest.mark.parametrize("shape,pshape", CASES, ids=str)
@pytest.mark.parametrize("layout", ["neox", "gptj"])
def test_against_oracle(isa, threads, dtype, rng, shape, pshape, layout):
    x = rng.standard_normal(shape).astype(dtype)
    pos = rng.integers(-50, 5000, size=pshape)
    got = fastattn.apply_rotary(x, pos, layout=layout, num_threads=threads)
    assert_close_angles(got, ref.apply_rotary(x, pos, layout=layout),
                        *rotary_bound_terms(x, pos, layout))


@pytest.mark.parametrize("layout", ["neox", "gptj"])
def test_long_consecutive_positions(dtype, layout):
    # float tables advance consecutive positions by rotation steps: check a
    # long run and far positions against exact sin/cos
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3000, 64)).astype(dtype)
    for start in (0, 10**6):
        pos = start + np.arange(3000)
        assert_close_angles(fastattn.apply_rotary(x, pos, layout=layout, base=500000.0),
                            ref.apply_rotary(x, pos, layout=layout, base=500000.0),
                            *rotary_bound_terms(x, pos, layout, 500000.0))


def test_far_positions_need_the_angle_bound():
    # at position 3e6 the float64 angle itself carries ~|angle| * eps = 7e-10
    # of rounding, which libm's pow and NumPy's may split differently: a flat
    # 1e-12 fails there while the angle bound holds, and the angle bound
    # still catches an error a few times larger than that rounding
    x = np.ones((1, 64))
    pos = np.array([3_000_000])
    got, want = fastattn.apply_rotary(x, pos), ref.apply_rotary(x, pos)
    theta, pair = rotary_bound_terms(x, pos)
    with pytest.raises(AssertionError):
        assert_close(got, want)
    assert_close_angles(got, want, theta, pair)
    worse = got.copy()
    worse[0, 1] += 2 * (angle_atol(theta) * pair)[0, 1]
    with pytest.raises(AssertionError, match="beyond the angle bound"):
        assert_close_angles(worse, want, theta, pair)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_inputs_and_out(dtype, rng, layout):
    x = rng.standard_normal((2, 3, 11, 12)).astype(dtype)
    pos = np.arange(11)
    want = ref.apply_rotary(x, pos, layout="gptj")
    assert_close(fastattn.apply_rotary(strided_copy(x, layout), pos, layout="gptj"), want)
    out = strided_copy(np.zeros_like(x), layout)
    assert fastattn.apply_rotary(x, pos, layout="gptj", out=out) is out
    assert_close(out, want)


def test_in_place(dtype, rng):
    x = rng.standard_normal((2, 4, 9, 8)).astype(dtype)
    want = ref.apply_rotary(x, np.arange(9))
    y = x.copy()
    assert fastattn.apply_rotary(y, np.arange(9), out=y) is y
    assert_close(y, want)
    # a transposed (B, L, H, D) buffer viewed as (B, H, L, D), in place
    buf = np.ascontiguousarray(x.transpose(0, 2, 1, 3))
    view = buf.transpose(0, 2, 1, 3)
    fastattn.apply_rotary(view, np.arange(9), out=view)
    assert_close(view, want)


def test_rotation_properties(rng):
    # position 0 is the identity; norms are kept; q.k depends on m - n only
    x = rng.standard_normal((3, 16))
    assert np.array_equal(fastattn.apply_rotary(x, [0, 0, 0]), x)
    y = fastattn.apply_rotary(x, [5, 70, 123456])
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-13)
    q, k = rng.standard_normal((2, 1, 16))

    def score(m, n):
        return float(fastattn.apply_rotary(q, [m])[0] @ fastattn.apply_rotary(k, [n])[0])

    assert score(10, 3) == pytest.approx(score(107, 100), rel=1e-12)


def test_dtype_rules():
    x = np.ones((2, 4), np.float16)
    assert fastattn.apply_rotary(x, [0, 1]).dtype == np.float16  # 16-bit kept (test_half_dtypes.py)
    assert fastattn.apply_rotary(x.astype(np.int64), [0, 1]).dtype == np.float64
    assert fastattn.apply_rotary(x.astype(np.int16), np.array([0, 1], np.uint8)).dtype == np.float32


def test_empty():
    assert fastattn.apply_rotary(np.zeros((2, 0, 4)), np.arange(0)).shape == (2, 0, 4)


def test_bad_input():
    x = np.zeros((2, 3, 8), np.float32)
    with pytest.raises(ValueError, match=r"even last axis.*\(2, 3, 7\)"):
        fastattn.apply_rotary(np.zeros((2, 3, 7)), np.arange(3))
    with pytest.raises(ValueError, match=r"positions of shape \(4,\) does not broadcast to x.shape\[:-1\] = \(2, 3\)"):
        fastattn.apply_rotary(x, np.arange(4))
    with pytest.raises(ValueError, match=r"positions of shape \(5, 3\) does not broadcast"):
        fastattn.apply_rotary(x, np.zeros((5, 3), int))
    with pytest.raises(TypeError, match=r"positions must be integers, got dtype float64"):
        fastattn.apply_rotary(x, np.arange(3.0))
    with pytest.raises(ValueError, match=r"layout must be one of \['neox', 'gptj'\]"):
        fastattn.apply_rotary(x, np.arange(3), layout="llama")
    with pytest.raises(ValueError, match=r"base must be positive"):
        fastattn.apply_rotary(x, np.arange(3), base=-1.0)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., L, D\)"):
        fastattn.apply_rotary(np.zeros(4), [0])
    with pytest.raises(ValueError, match=r"out must have shape \(2, 3, 8\)"):
        fastattn.apply_rotary(x, np.arange(3), out=np.zeros((2, 3, 4), np.float32))


def test_kernel_rejects_bad_table_index():
    # the C side checks every index before writing anything
    x = np.ones((1, 1, 2, 4), np.float32)
    y = x.copy()
    cos, sin = np.ones((2, 2), np.float32), np.zeros((2, 2), np.float32)
    index = np.array([0, 2], np.int64).reshape(1, 1, 2)
    with pytest.raises(ValueError, match="rejected its arguments"):
        _kernels.rope_apply(x, y, index, cos, sin, 1, None, None, 1)
    assert np.array_equal(y, x)


@pytest.mark.parametrize("n", list(range(1, 41)) + [64, 96, 100, 128])
def test_alibi_slopes(n):
    got = fastattn.alibi_slopes(n)
    assert got.shape == (n,) and got.dtype == np.float64
    assert_close(got, ref.alibi_slopes(n))
    assert fastattn.alibi_slopes(n, dtype=np.float32).dtype == np.float32


def test_alibi_known_values():
    assert fastattn.alibi_slopes(8).tolist() == [2.0 ** -i for i in range(1, 9)]
    # the paper's 12-head slopes: the 8 of n=8, then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5
    want = [2.0 ** -i for i in range(1, 9)] + [2.0 ** -(i + 0.5) for i in range(4)]
    np.testing.assert_allclose(fastattn.alibi_slopes(12), want, rtol=1e-15)
    with pytest.raises(ValueError, match="num_heads must be >= 1"):
        fastattn.alibi_slopes(0)
    with pytest.raises(TypeError, match="num_heads must be an integer"):
        fastattn.alibi_slopes(2.0)


def test_alibi_slopes_feed_sdpa(rng):
    q, k, v = (rng.standard_normal((1, 6, 5, 8)) for _ in range(3))
    s = fastattn.alibi_slopes(6)
    kw = dict(alibi_slopes=s, is_causal=True)
    assert_close(fastattn.scaled_dot_product_attention(q, k, v, **kw),
                 ref.scaled_dot_product_attention(q, k, v, **kw))


def test_alibi_head_count_bound():
    # above 2**25 - 1 heads adjacent slopes coincide in float32; an absurd
    # count is refused at once instead of building a list of 10**9 floats
    import time
    from fastattn.rotary import MAX_ALIBI_HEADS
    assert MAX_ALIBI_HEADS == 2**25 - 1
    t0 = time.perf_counter()
    for n in (MAX_ALIBI_HEADS + 1, 10**9, 2**63, 10**400):
        with pytest.raises(ValueError, match=f"^num_heads must be <= {MAX_ALIBI_HEADS}"):
            fastattn.alibi_slopes(n)
    assert time.perf_counter() - t0 < 1.0
    # below the bound every head keeps its own float32 slope
    s = fastattn.alibi_slopes(2**20 + 3, dtype=np.float32)
    assert np.unique(s).size == s.size
