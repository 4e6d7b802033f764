"""Sinusoidal position encodings against the oracle, including long-range
extrapolation."""

import numpy as np
import pytest

import fastattn
from fastattn import reference as ref
from conftest import (LAYOUTS, angle_atol, assert_close, assert_close_angles, position_angles,
                      strided_copy)


@pytest.mark.parametrize("layout", ["concat", "interleaved"])
@pytest.mark.parametrize("length,channels", [(0, 4), (1, 1), (1, 2), (7, 9), (50, 64), (129, 513)])
def test_table(isa, threads, dtype, layout, length, channels):
    got = fastattn.sinusoidal_position_encoding(length, channels, layout=layout, dtype=dtype,
                                                num_threads=threads)
    want = ref.sinusoidal_position_encoding(length, channels, layout=layout, dtype=np.float64)
    assert_close_angles(got, want.astype(dtype) if dtype == np.float64 else want,
                        position_angles(length, channels, layout), dtype=dtype)


@pytest.mark.parametrize("layout", ["concat", "interleaved"])
def test_large_angles_need_the_angle_bound(layout):
    # positions near 1e5 reach |angle| = 1e5 rad, whose float64 rounding
    # (ulp 1.5e-11) is far above a flat 1e-12, and libm's exp/pow and
    # NumPy's may round the inverse timescales an ulp apart: fastattn and the
    # oracle differ by up to 2 ulp of the angle. The angle bound allows that
    # and no more: an error twice the bound is still caught.
    kw = dict(layout=layout, start_index=100_000)
    got = fastattn.sinusoidal_position_encoding(64, 256, dtype=np.float64, **kw)
    want = ref.sinusoidal_position_encoding(64, 256, dtype=np.float64, **kw)
    theta = position_angles(64, 256, **kw)
    with pytest.raises(AssertionError):
        assert_close(got, want)
    assert_close_angles(got, want, theta)
    worse = got.copy()
    worse[-1, 1] += 2 * angle_atol(theta[-1, 1])
    with pytest.raises(AssertionError, match="beyond the angle bound"):
        assert_close_angles(worse, want, theta)


def test_reversed_timescales_are_refused():
    # min_timescale > max_timescale is almost always two swapped arguments
    msg = "^min_timescale must be <= max_timescale, got min_timescale=3 and max_timescale=1.0$"
    for fn in (fastattn.sinusoidal_position_encoding, ref.sinusoidal_position_encoding):
        with pytest.raises(ValueError, match=msg):
            fn(4, 8, min_timescale=3, max_timescale=1.0)
    for fn in (fastattn.add_position_encoding, ref.add_position_encoding):
        with pytest.raises(ValueError, match=msg):
            fn(np.zeros((4, 8)), min_timescale=3, max_timescale=1.0)
    # equal timescales: one frequency for every column pair
    t = fastattn.sinusoidal_position_encoding(3, 6, min_timescale=2.0, max_timescale=2.0,
                                              dtype=np.float64)
    angle = 2.0 * np.arange(3)[:, None] * np.ones(3)  # tensor2tensor: inv = min_timescale
    assert_close(t, np.concatenate([np.sin(angle), np.cos(angle)], axis=1))


def test_concat_is_tensor2tensor_layout():
    t = fastattn.sinusoidal_position_encoding(3, 6, dtype=np.float64)
    inv = np.exp(-np.arange(3) * np.log(1e4) / 2)
    pos = np.arange(3)[:, None]
    assert_close(t, np.concatenate([np.sin(pos * inv), np.cos(pos * inv)], axis=1))
    odd = fastattn.sinusoidal_position_encoding(3, 7, dtype=np.float64)
    assert (odd[:, -1] == 0).all()


def test_interleaved_is_the_paper():
    d = 8
    t = fastattn.sinusoidal_position_encoding(5, d, layout="interleaved", dtype=np.float64)
    for pos in range(5):
        for i in range(d // 2):
            assert abs(t[pos, 2 * i] - np.sin(pos / 10000 ** (2 * i / d))) < 1e-12
            assert abs(t[pos, 2 * i + 1] - np.cos(pos / 10000 ** (2 * i / d))) < 1e-12


@pytest.mark.parametrize("layout", ["concat", "interleaved"])
def test_extrapolates_to_a_million_positions(isa, layout):
    kw = dict(layout=layout, start_index=999_000)
    got = fastattn.sinusoidal_position_encoding(1001, 512, **kw)
    want = ref.sinusoidal_position_encoding(1001, 512, dtype=np.float64, **kw)
    assert np.abs(got - want).max() <= 1e-5


@pytest.mark.parametrize("layout", LAYOUTS)
def test_add_position_encoding(isa, threads, dtype, rng, layout):
    x = rng.standard_normal((3, 2, 19, 10)).astype(dtype)
    xs = strided_copy(x, layout)
    for pe_layout in ("concat", "interleaved"):
        got = fastattn.add_position_encoding(xs, layout=pe_layout, start_index=5, num_threads=threads)
        assert_close_angles(got, ref.add_position_encoding(x, layout=pe_layout, start_index=5),
                            position_angles(19, 10, pe_layout, start_index=5))


def test_add_in_place_and_timescales(rng):
    x = rng.standard_normal((2, 6, 9)).astype(np.float32)
    want = ref.add_position_encoding(x, min_timescale=2.0, max_timescale=50.0)
    y = x.copy()
    assert fastattn.add_position_encoding(y, min_timescale=2.0, max_timescale=50.0, out=y) is y
    assert_close(y, want)


def test_out_with_strided_columns():
    big = np.zeros((5, 16), np.float32)
    fastattn.sinusoidal_position_encoding(5, 8, out=big[:, ::2])
    assert_close(big[:, ::2], ref.sinusoidal_position_encoding(5, 8))


def test_errors():
    with pytest.raises(ValueError, match="channels must be positive"):
        fastattn.sinusoidal_position_encoding(3, 0)
    with pytest.raises(ValueError, match="length must be non-negative"):
        fastattn.sinusoidal_position_encoding(-1, 4)
    with pytest.raises(ValueError, match="layout must be one of"):
        fastattn.sinusoidal_position_encoding(3, 4, layout="rotary")
    with pytest.raises(TypeError, match="length must be an integer"):
        fastattn.sinusoidal_position_encoding(3.0, 4)
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        fastattn.sinusoidal_position_encoding(3, 4, dtype=np.int32)
    with pytest.raises(ValueError, match="max_timescale must be positive"):
        fastattn.sinusoidal_position_encoding(3, 4, max_timescale=0)
    with pytest.raises(ValueError, match="x must have shape \\(..., length, channels\\)"):
        fastattn.add_position_encoding(np.zeros(4))
