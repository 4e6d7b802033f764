"""Shared fixtures: every kernel test runs at each ISA level the machine
supports and with 1 and N threads, and compares with fastattn.reference
under one tolerance rule."""

import os

import numpy as np
import pytest

import fastattn

# float32 <= 1e-5 and float64 <= 1e-12 relative: elementwise relative error,
# with an absolute floor of the same relative size times the largest |ref|
# (llm.c style tol + |ref| * eps), since outputs near 0 by cancellation have
# no meaningful relative error.
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def assert_close(got, ref, dtype=None):
    got = np.asarray(got)
    ref = np.asarray(ref)
    dtype = np.dtype(dtype or got.dtype)
    assert got.shape == ref.shape, f"shape {got.shape} != oracle {ref.shape}"
    assert got.dtype == dtype, f"dtype {got.dtype} != expected {dtype}"
    rtol = RTOL[dtype]
    ref64 = ref.astype(np.float64)
    scale = np.nanmax(np.abs(ref64)) if ref64.size and not np.all(np.isnan(ref64)) else 0.0
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
    # fresh inputs per test, reproducible from the test id when it fails
    seed = abs(hash(request.node.nodeid)) % (2**32)
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


# ---- hypothesis profiles (tests/test_properties.py and friends) ---------------
# ci (default): >= 500 examples per function, the whole property suite in
# well under 5 minutes on 2 cores; long: a deeper local run; sanitize: a
# short run for the ASan/UBSan build, which is several times slower.
# Select with HYPOTHESIS_PROFILE=ci|long|sanitize|dev.
from hypothesis import HealthCheck, settings  # noqa: E402

_HC = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", max_examples=500, deadline=None, suppress_health_check=_HC,
                          print_blob=True)
settings.register_profile("long", max_examples=5000, deadline=None, suppress_health_check=_HC,
                          print_blob=True)
settings.register_profile("sanitize", max_examples=200, deadline=None,
                          suppress_health_check=_HC, print_blob=True)
settings.register_profile("dev", max_examples=50, deadline=None, suppress_health_check=_HC)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
