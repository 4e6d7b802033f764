"""Shared fixtures: every kernel test runs at each ISA level the machine
supports and with 1 and N threads, and compares with fastattn.reference
under one tolerance rule."""

import os
import zlib

import numpy as np
import pytest

import fastattn
from fastattn import reference

# float32 <= 1e-5 and float64 <= 1e-12 relative: elementwise relative error,
# with an absolute floor of the same relative size times the largest |ref|
# (llm.c style tol + |ref| * eps), since outputs near 0 by cancellation have
# no meaningful relative error.
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def _oracle_terms(got, ref, dtype):
    """``(got, ref64, rtol, scale)`` after checking that ``got`` has the
    oracle's shape and the expected dtype: ``ref`` in float64, the dtype's
    relative tolerance and the largest |ref| ignoring NaN (0 when none)."""
    got = np.asarray(got)
    ref = np.asarray(ref)
    dtype = np.dtype(dtype or got.dtype)
    assert got.shape == ref.shape, f"shape {got.shape} != oracle {ref.shape}"
    assert got.dtype == dtype, f"dtype {got.dtype} != expected {dtype}"
    ref64 = ref.astype(np.float64)
    scale = np.nanmax(np.abs(ref64)) if ref64.size and not np.all(np.isnan(ref64)) else 0.0
    return got, ref64, RTOL[dtype], scale


def assert_close(got, ref, dtype=None):
    got, ref64, rtol, scale = _oracle_terms(got, ref, dtype)
    np.testing.assert_allclose(got.astype(np.float64), ref64, rtol=rtol,
                               atol=rtol * max(scale, 1e-30), equal_nan=True)


ISAS = fastattn.available_isas()
N_THREADS = max(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2)


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test with the kernels of one ISA level, then restore."""
    before = fastattn.get_isa()
    fastattn.set_isa(request.param)
    try:
        yield request.param
    finally:
        fastattn.set_isa(before)


@pytest.fixture(params=[1, N_THREADS], ids=lambda n: f"threads{n}")
def threads(request):
    return request.param


@pytest.fixture(params=[np.float32, np.float64], ids=["f32", "f64"])
def dtype(request):
    return np.dtype(request.param)


@pytest.fixture
def rng(request):
    # inputs differ between tests but are the same in every run and process:
    # the seed is a CRC-32 of the test id (Python's hash() of a str is salted
    # per process unless PYTHONHASHSEED is set, so it would not reproduce)
    seed = zlib.crc32(request.node.nodeid.encode("utf-8"))
    return np.random.default_rng(seed)


def strided_copy(a, kind):
    """The same values as `a` in another memory layout."""
    if kind == "C":
        return np.ascontiguousarray(a)
    if kind == "F":
        return np.asfortranarray(a)
    if kind == "strided":
        big = np.zeros(tuple(2 * s for s in a.shape), dtype=a.dtype)
        view = big[tuple(slice(None, None, 2) for _ in a.shape)]
        view[...] = a
        return view
    if kind == "reversed":
        flipped = np.ascontiguousarray(a[..., ::-1])
        return flipped[..., ::-1]
    raise ValueError(kind)


LAYOUTS = ["C", "F", "strided", "reversed"]


def random_qkv(rng, shape, dtype):
    """Standard-normal q ``(B, H, Lq, D)``, k ``(B, Hkv, Lk, D)`` and v
    ``(B, Hkv, Lk, Dv)`` in ``dtype`` for a ``(B, H, Hkv, Lq, Lk, D, Dv)``
    case of the attention tests."""
    B, H, Hkv, Lq, Lk, D, Dv = shape
    q = rng.standard_normal((B, H, Lq, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, Lk, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, Lk, Dv)).astype(dtype)
    return q, k, v


# ---- tolerance of functions of an angle ---------------------------------------
# sinusoidal_position_encoding, add_position_encoding and apply_rotary
# evaluate sin and cos of theta = fl(position * inv_timescale) in float64,
# where inv_timescale comes from exp or pow. fastattn (C libm) and the oracle
# (NumPy) form theta by the same formula, but exp/pow may round each
# inv_timescale differently by an ulp or two, and the product then rounds
# once more, so the two thetas may differ by a few ulp of theta itself:
# |d theta| <= ANGLE_ULPS * eps * |theta|. |d sin|, |d cos| <= |d theta| plus
# an ulp of each result. A flat 1e-12 therefore cannot hold once |theta|
# passes ~1e4 rad (eps * 1e4 = 2.2e-12), which positions of 1e4 and more
# reach; this bound grows with |theta| exactly as the rounding does, and is
# as tight as the flat rule for small angles. Measured: at most 2 ulp of
# theta (|diff| <= 1.9 * eps * (|theta| + 1) over random tables with
# positions to 1e6, <= 1.4 for apply_rotary), so 4 leaves a 2x margin; see
# docs/reliability.md.
EPS64 = float(np.finfo(np.float64).eps)
ANGLE_ULPS = 4


def angle_atol(theta):
    """The absolute error bound of sin/cos of the float64 angle ``theta``."""
    return ANGLE_ULPS * EPS64 * (np.abs(np.asarray(theta, dtype=np.float64)) + 1.0)


def assert_close_angles(got, ref, theta, magnitude=1.0, dtype=None):
    """assert_close, except that an element may also be off by
    ``angle_atol(theta) * magnitude``: the rounding of its angle times the
    size of what the sin/cos multiply (1 for a table, |x_a| + |x_b| for a
    rotated pair). ``theta`` and ``magnitude`` broadcast to ``ref``."""
    got, ref64, rtol, scale = _oracle_terms(got, ref, dtype)
    got64 = got.astype(np.float64)
    bound = rtol * np.abs(ref64) + rtol * max(scale, 1e-30) + angle_atol(theta) * magnitude
    bad = ~((np.abs(got64 - ref64) <= bound) | (np.isnan(got64) & np.isnan(ref64)))
    if bad.any():
        idx = tuple(np.argwhere(bad)[0])
        raise AssertionError(
            f"{int(bad.sum())} of {bad.size} elements differ beyond the angle bound; first at "
            f"{idx}: got {got64[idx]!r}, oracle {ref64[idx]!r}, |diff| "
            f"{abs(got64[idx] - ref64[idx]):.3e} > bound {np.broadcast_to(bound, bad.shape)[idx]:.3e}")


def position_angles(length, channels, layout="concat", min_timescale=1.0, max_timescale=1.0e4,
                    start_index=0):
    """theta of each element of a position-encoding table (0 for the odd
    trailing column), shape (length, channels)."""
    inv = reference._inverse_timescales(channels, layout, min_timescale, max_timescale)
    theta = (start_index + np.arange(length, dtype=np.float64))[:, None] * inv[None, :]
    if layout == "concat":
        n = channels // 2
        out = np.zeros((length, channels))
        out[:, :n] = theta
        out[:, n:2 * n] = theta
        return out
    return np.repeat(theta, 2, axis=1)[:, :channels]


def rotary_bound_terms(x, positions, layout="neox", base=10000.0):
    """(theta, |x_a| + |x_b|) of every element of apply_rotary's result."""
    x = np.asarray(x, dtype=np.float64)
    D = x.shape[-1]
    inv = base ** (-np.arange(0, D, 2, dtype=np.float64) / D)
    theta = np.asarray(positions, dtype=np.float64)[..., None] * inv
    if layout == "neox":
        pair = np.abs(x[..., : D // 2]) + np.abs(x[..., D // 2:])
        theta, pair = np.concatenate([theta, theta], -1), np.concatenate([pair, pair], -1)
    else:
        pair = np.abs(x[..., 0::2]) + np.abs(x[..., 1::2])
        theta, pair = np.repeat(theta, 2, -1), np.repeat(pair, 2, -1)
    return np.broadcast_arrays(theta, pair)


# ---- hypothesis profiles (tests/test_properties.py and friends) ---------------
# ci (the default): derandomized, so every run of the same tree draws the same
# 500 examples per function and CI cannot pass or fail by chance; the examples
# database is off so one machine's stored failures do not change what runs.
# nightly: the long random search, a different 5,000 examples each run, as a
# separate opt-in job; a failure prints its @reproduce_failure blob.
# sanitize: a short derandomized run for the ASan/UBSan build, several times
# slower. dev: a quick random local run.
# Select with HYPOTHESIS_PROFILE=ci|nightly|sanitize|dev.
from hypothesis import HealthCheck, settings  # noqa: E402

_HC = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
_COMMON = dict(deadline=None, suppress_health_check=_HC, print_blob=True)
settings.register_profile("ci", max_examples=500, derandomize=True, database=None, **_COMMON)
settings.register_profile("nightly", max_examples=5000, **_COMMON)
settings.register_profile("sanitize", max_examples=200, derandomize=True, database=None,
                          **_COMMON)
settings.register_profile("dev", max_examples=50, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
