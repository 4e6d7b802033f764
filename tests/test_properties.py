"""Property tests: every public kernel against the NumPy oracle.

Each entry of ``CASES`` names a public function (the same name in
``fastattn`` and ``fastattn.reference``) and a strategy from strategies.py
that draws whole calls: shapes, dtypes, layouts, masks, lengths, ``out=``,
ISA level and thread count. The test runs the call on fastattn and on the
oracle and compares within the foundation tolerances (float32 1e-5,
float64 1e-12, see conftest.assert_close), widened for functions of an angle
by the rounding of that angle (conftest.assert_close_angles) and for
attention by the rounding of its scores (scores_close); integer and
bool outputs must be equal. It also checks that ``out=`` is returned and that inputs are left
untouched unless written in place.

A new public function is one entry in ``CASES``. Example counts come from
the hypothesis profile (conftest.py): ``ci`` (the default: 500 per
function, derandomized), ``nightly`` (5,000, random) or ``sanitize`` (200),
chosen with ``HYPOTHESIS_PROFILE``.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastattn
from fastattn import reference

import strategies as S
from conftest import (RTOL, assert_close, assert_close_angles, position_angles,
                      rotary_bound_terms)


def assert_exact(got, ref):
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.dtype == ref.dtype, f"dtype {got.dtype} != oracle {ref.dtype}"
    np.testing.assert_array_equal(got, ref)


def close(got, ref, args, kwargs):
    assert_close(got, ref)


def exact(got, ref, args, kwargs):
    assert_exact(got, ref)


def exact_each(got, ref, args, kwargs):
    """A tuple of results, each exactly the oracle's."""
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert_exact(g, r)


_PE_KEYS = ("layout", "min_timescale", "max_timescale", "start_index")


def table_angles_close(got, ref, args, kwargs):
    """A position-encoding table: the rounding of each angle allowed for."""
    length, channels = args
    kw = {k: v for k, v in kwargs.items() if k in _PE_KEYS}
    assert_close_angles(got, ref, position_angles(length, channels, **kw))


def added_angles_close(got, ref, args, kwargs):
    """x + table: the table's angle bound, broadcast over x's leading axes."""
    length, channels = np.shape(args[0])[-2:]
    kw = {k: v for k, v in kwargs.items() if k in _PE_KEYS}
    assert_close_angles(got, ref, position_angles(length, channels, **kw))


def scores_close(got, ref, args, kwargs):
    """Attention output: the foundation tolerance, plus the rounding of the
    scores the kernel forms in the compute dtype. A score s rounded by
    eps * |s| moves each weight by that much relative, so the output by up
    to 2 * eps * max|s| * max|v| (the same first-order argument as the
    angle bound; ALiBi's bias is rounded alike). Large draws (|x| ~ 8,
    D = 33, scale = -1) give |s| in the hundreds, where float32 itself
    cannot do better than a few 1e-5."""
    q, k, v = (np.asarray(a) for a in args[:3])
    got = np.asarray(got)
    half = got.dtype == np.float16
    # a float16 result is computed in float32 and rounded once: float32's
    # bound plus half an ulp of float16 (one ulp, for a float32 result that
    # lies within float32's error of a rounding midpoint)
    eps = np.finfo(np.float32 if half else got.dtype).eps
    D = q.shape[-1]
    scale = kwargs.get("scale")
    scale = (1.0 / np.sqrt(D) if D else 1.0) if scale is None else abs(float(scale))
    # every query row against every key row (other heads' pairs included):
    # an upper bound on the scores the kernel forms, far tighter than
    # D * max|q| * max|k|
    q2 = q.reshape(-1, D).astype(np.float64)
    k2 = k.reshape(-1, D).astype(np.float64)
    smax = float(np.max(np.abs(q2 @ k2.T), initial=0.0)) * scale if D else 0.0
    if kwargs.get("softcap") is not None:
        smax = min(smax, float(kwargs["softcap"]))
    slopes = kwargs.get("alibi_slopes")
    if slopes is not None:
        # the bias grows with the query-key distance, at most the key rows
        smax += float(np.max(np.abs(slopes), initial=0.0)) * (k.size // max(D, 1))
    vmax = float(np.max(np.abs(v), initial=0.0))
    ref64 = np.asarray(ref, np.float64)
    # the foundation check first where the scores are small, so that the
    # widening only ever applies to large-score draws
    bound = 4 * eps * smax * vmax
    rtol = RTOL[np.dtype(np.float32) if half else got.dtype]
    atol = rtol * max(np.nanmax(np.abs(ref64), initial=0.0), 1e-30) + bound
    if half:
        tol = atol + rtol * np.abs(ref64) + np.spacing(np.abs(ref64).astype(np.float16)).astype(np.float64)
        g = got.astype(np.float64)
        ok = (np.abs(g - ref64) <= tol) | (np.isnan(g) & np.isnan(ref64))
        assert ok.all(), f"{(~ok).sum()} float16 elements off; worst {np.nanmax(np.abs(g - ref64)):.3g}"
        return
    np.testing.assert_allclose(got.astype(np.float64), ref64, rtol=rtol, atol=atol, equal_nan=True)


def rotary_angles_close(got, ref, args, kwargs):
    """A rotated pair: the angle bound times |x_a| + |x_b|."""
    kw = {k: v for k, v in kwargs.items() if k in ("layout", "base")}
    theta, pair = rotary_bound_terms(*args, **kw)
    assert_close_angles(got, ref, theta, pair)


class Case:
    def __init__(self, name, strategy, compare=close):
        self.name = name
        self.strategy = strategy
        self.compare = compare

    def __repr__(self):
        return self.name


CASES = [
    Case("masked_softmax", S.masked_softmax_calls()),
    Case("sequence_mask", S.sequence_mask_calls(), compare=exact),
    Case("apply_sequence_mask", S.apply_sequence_mask_calls()),
    Case("split_heads", S.split_heads_calls()),
    Case("merge_heads", S.merge_heads_calls()),
    Case("sinusoidal_position_encoding", S.sinusoidal_position_encoding_calls(),
         compare=table_angles_close),
    Case("add_position_encoding", S.add_position_encoding_calls(), compare=added_angles_close),
    Case("scaled_dot_product_attention", S.scaled_dot_product_attention_calls(),
         compare=scores_close),
    Case("apply_rotary", S.apply_rotary_calls(), compare=rotary_angles_close),
    Case("alibi_slopes", S.alibi_slopes_calls()),
    Case("quantize_kv", S.quantize_kv_calls(), compare=exact_each),
    Case("dequantize_kv", S.dequantize_kv_calls(), compare=exact),
    Case("varlen_attention", S.varlen_attention_calls(), compare=scores_close),
    Case("paged_attention", S.paged_attention_calls(), compare=scores_close),
]


def test_every_public_function_has_a_case():
    kernels = {"masked_softmax", "sequence_mask", "apply_sequence_mask", "split_heads",
               "merge_heads", "sinusoidal_position_encoding", "add_position_encoding"}
    public = {n for n in fastattn.__all__ if hasattr(reference, n)}
    assert kernels <= public
    assert public <= {c.name for c in CASES}, "a public kernel has no property case"


def _snapshot(value):
    return np.array(value, copy=True) if isinstance(value, np.ndarray) else value


def run_call(case, call):
    fn = getattr(fastattn, case.name)
    oracle = getattr(reference, case.name)
    ref_kwargs = {k: _snapshot(v) for k, v in call.kwargs.items() if k not in ("out", "num_threads")}
    ref_args = tuple(_snapshot(a) for a in call.args)
    expected = oracle(*ref_args, **ref_kwargs)
    before = [_snapshot(a) for a in call.args]
    saved = fastattn.get_isa()
    fastattn.set_isa(call.isa)
    try:
        got = fn(*call.args, **call.kwargs)
    finally:
        fastattn.set_isa(saved)
    out = call.kwargs.get("out")
    if out is not None:
        assert got is out, "out= was given but another array was returned"
    if not call.inplace:
        for a, b in zip(call.args, before):
            if isinstance(a, np.ndarray):
                np.testing.assert_array_equal(a, b, err_msg="an input was modified")
    # the inputs as they were before the call (an in-place call overwrites x)
    case.compare(got, expected, ref_args, ref_kwargs)


@pytest.mark.parametrize("case", CASES, ids=repr)
@given(data=st.data())
def test_matches_oracle(case, data):
    call = data.draw(case.strategy, label="call")
    run_call(case, call)
