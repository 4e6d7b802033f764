"""The 16-bit GEMM (fastattn.bf16_gemm) against a float64 oracle.

The oracle multiplies the same bfloat16/float16 inputs, widened exactly, in
float64. The kernel's error bound, derived from how it computes:

* each product a_k w_k is exact in float32 (8 x 8 or 11 x 11 significant
  bits: at most 22 < 24), unless it underflows, which these inputs never do;
* the K products are added one at a time to a float32 sum: recursive
  summation errs by at most gamma_K * sum |a_k w_k|, gamma_n = n u / (1 - n u),
  u = 2^-24 (Higham, Accuracy and Stability, eq. 4.4 with exact terms);
* alpha * s and + bias round once each (relative u of the value, bounded by
  |alpha| sum|a w| + |bias|).
So |c - exact| <= gamma_{K+2} (|alpha| sum_k |a_k w_k| + |bias|) for a float32
output; a bfloat16 / float16 output adds one rounding to nearest, half an
ulp: u_out |c| with u_out = 2^-8 / 2^-11. The bound is per element and
scales with K and |a||w|; a wrong index (a neighbour's column, a dropped
pair) errs by O(|a_k w_k|), far beyond it for every K tested.
"""

import numpy as np
import pytest

import fastattn
from fastattn import bf16_gemm

try:
    import ml_dtypes
except ImportError:  # the bf16 extra; the float16 cases still run
    ml_dtypes = None
F16 = np.dtype(np.float16)
if ml_dtypes is not None:
    BF16 = np.dtype(ml_dtypes.bfloat16)
    DTYPES = [BF16, F16]
else:
    BF16 = None
    DTYPES = [F16]
needs_bf16 = pytest.mark.skipif(ml_dtypes is None, reason="ml_dtypes (the bf16 extra) is not installed")
U32 = 2.0 ** -24
U_OUT = {BF16: 2.0 ** -8, F16: 2.0 ** -11, np.dtype(np.float32): 0.0}
SIZES = [1, 3, 17, 33, 65, 127]
# (M, N, K): every size on every axis at least once, odd K for the pair tail,
# N across several 32-column panels and a partial one, M across row tiles of
# every level (4, 5, 12) and two row blocks (> 192); the last two split into
# enough row x column blocks (4 and 15 tasks) that 2 threads share them
SHAPES = [(1, 1, 1), (3, 17, 33), (17, 65, 127), (33, 127, 3), (65, 3, 17), (127, 33, 65),
          (1, 127, 65), (17, 300, 1), (200, 161, 40), (389, 515, 33)]


@pytest.fixture(autouse=True)
def _restore_isa():
    before = fastattn.get_isa()
    yield
    fastattn.set_isa(before)


def _rand(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def _oracle(a, w, bias, alpha):
    """exact (float64) alpha * a @ w.T + bias and the error bound's scale
    |alpha| |a| @ |w|.T + |bias|, on the inputs as the kernel sees them"""
    a64, w64 = a.astype(np.float64), w.astype(np.float64)
    exact = alpha * (a64 @ w64.T)
    scale = abs(alpha) * (np.abs(a64) @ np.abs(w64).T)
    if bias is not None:
        b64 = np.asarray(bias).astype(np.float32).astype(np.float64)
        exact, scale = exact + b64, scale + np.abs(b64)
    return exact, scale


def _check_bound(c, a, w, bias=None, alpha=1.0):
    exact, scale = _oracle(a, w, bias, alpha)
    K = a.shape[1]
    gamma = (K + 2) * U32 / (1 - (K + 2) * U32)
    bound32 = gamma * scale
    bound = bound32 + U_OUT[np.dtype(c.dtype)] * (np.abs(exact) + bound32)
    err = np.abs(c.astype(np.float64) - exact)
    worst = np.unravel_index(np.argmax(err - bound), err.shape) if err.size else None
    assert np.all(err <= bound), (
        f"error {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst} (K={K}, {c.dtype})")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_every_level_and_thread_count_against_the_oracle(M, N, K, dtype):
    """Within the bound at every ISA level; the same bits at every level and
    for 1 and 2 threads (one summation order everywhere, see csrc/gemm_bf16.h),
    but for amx (tiles add each pair in their own order and flush
    denormals): its own bits for 1 and 2 threads, within the same bound."""
    rng = np.random.default_rng(M * 10007 + N * 101 + K)
    a, w = _rand(rng, (M, K), dtype), _rand(rng, (N, K), dtype)
    bias = rng.standard_normal(N).astype(np.float32)
    packed = bf16_gemm.PackedWeight(w)
    results = {}
    for isa in fastattn.available_isas():
        fastattn.set_isa(isa)
        for threads in (1, 2):
            c = bf16_gemm.matmul(a, packed, out_dtype=np.float32, bias=bias, alpha=0.75,
                                 num_threads=threads)
            _check_bound(c, a, w, bias, 0.75)
            results[isa, threads] = c
    first = results["scalar", 1]
    for key, c in results.items():
        same = results["amx", 1] if key[0] == "amx" else first
        assert np.array_equal(c.view(np.uint32), same.view(np.uint32)), key


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_output_in_the_input_dtype_is_the_rounded_float32_result(dtype):
    """A 16-bit output is the float32 result rounded to nearest even (as
    ml_dtypes / NumPy round), and within the bound of the exact value."""
    rng = np.random.default_rng(5)
    a, w = _rand(rng, (37, 61), dtype), _rand(rng, (45, 61), dtype)
    packed = bf16_gemm.PackedWeight(w)
    for isa in fastattn.available_isas():
        fastattn.set_isa(isa)
        c32 = bf16_gemm.matmul(a, packed, out_dtype=np.float32)
        c16 = bf16_gemm.matmul(a, packed)
        assert c16.dtype == dtype
        assert np.array_equal(c16.view(np.uint16), c32.astype(dtype).view(np.uint16)), isa
        _check_bound(c16, a, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_rounding_of_special_and_boundary_values(dtype):
    """With a = 0 the result is 0 * alpha + bias: the float32 bias itself,
    rounded by the epilogue. Ties, the overflow threshold, subnormals of the
    output format, infinities and NaN at every level."""
    info = np.finfo(dtype)
    eps, tiny_sub = float(info.eps), float(info.smallest_subnormal)
    top = float(info.max)
    ulp_top = top - float(np.nextafter(info.max, 0, dtype=dtype))  # the ulp at the top binade
    f32_max = float(np.finfo(np.float32).max)
    values = [1.0, 1 + eps / 2, 1 + 3 * eps / 2, 1 + eps / 4, 1 + 3 * eps / 4, -1 - eps / 2,
              top, top + ulp_top / 2, top + ulp_top / 2 * 0.999, min(2 * top, f32_max),
              -min(top + ulp_top, f32_max),
              tiny_sub, tiny_sub / 2, tiny_sub * 1.5, tiny_sub * 2.5, tiny_sub / 2 * 1.01,
              float(info.smallest_normal) * 0.75, np.inf, -np.inf, np.nan, -3.0e-39, 1.0e-45]
    bias = np.array(values, dtype=np.float32)
    N, K = bias.size, 5
    a = np.zeros((3, K), dtype=dtype)
    packed = bf16_gemm.PackedWeight(np.ones((N, K), dtype=dtype))
    with np.errstate(over="ignore"):  # the overflowing values are the point
        expected = (np.float32(0) * np.float32(1.5) + bias).astype(dtype)
    for isa in fastattn.available_isas():
        fastattn.set_isa(isa)
        c = bf16_gemm.matmul(a, packed, bias=bias, alpha=1.5)
        nan = np.isnan(expected)
        assert np.array_equal(np.isnan(c[0]), nan), isa
        assert np.array_equal(c[:, ~nan].view(np.uint16),
                              np.broadcast_to(expected[~nan], (3, int((~nan).sum()))).view(np.uint16)), isa


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_strided_inputs_and_outputs(dtype):
    """a rows and columns sliced out of wider arrays (row stride > K, an odd
    element offset), a weight given transposed, an out with padded rows."""
    rng = np.random.default_rng(11)
    M, N, K = 29, 70, 45
    big_a = _rand(rng, (2 * M, K + 7), dtype)
    a = big_a[::2, 3:3 + K]
    wt = _rand(rng, (K, N), dtype)
    w = wt.T  # strides (2, 2 N): columns of the weight are contiguous
    packed = bf16_gemm.PackedWeight(w)
    out_big = np.full((M, N + 9), np.nan, dtype=np.float32)
    out = out_big[:, 4:4 + N]
    for isa in fastattn.available_isas():
        fastattn.set_isa(isa)
        got = bf16_gemm.matmul(a, packed, out=out, out_dtype=np.float32, num_threads=2)
        assert got is out
        _check_bound(out, np.ascontiguousarray(a), np.ascontiguousarray(w))
        assert np.isnan(out_big[:, :4]).all() and np.isnan(out_big[:, 4 + N:]).all()
        ref = bf16_gemm.matmul(np.ascontiguousarray(a), bf16_gemm.PackedWeight(np.ascontiguousarray(w)),
                               out_dtype=np.float32)
        assert np.array_equal(out, ref)
    col = _rand(rng, (M, 2 * K), dtype)[:, ::2]  # column stride 2: copied first
    _check_bound(bf16_gemm.matmul(col, packed, out_dtype=np.float32), col, w)


@needs_bf16
def test_bias_in_16_bits_and_k_zero_and_empty():
    rng = np.random.default_rng(2)
    w = _rand(rng, (9, 0), BF16)
    packed = bf16_gemm.PackedWeight(w)
    bias = _rand(rng, 9, BF16)
    c = bf16_gemm.matmul(np.zeros((4, 0), BF16), packed, bias=bias, out_dtype=np.float32)
    assert np.array_equal(c, np.broadcast_to(bias.astype(np.float32), (4, 9)))
    empty = bf16_gemm.matmul(np.zeros((0, 0), BF16), packed)
    assert empty.shape == (0, 9) and empty.dtype == BF16


@needs_bf16
def test_larger_k_stays_within_the_bound():
    """K = 2501 spans three k chunks (512 pairs each) with an odd tail; the
    float32 sums carried between chunks change no bit."""
    rng = np.random.default_rng(3)
    a, w = _rand(rng, (50, 2501), BF16), _rand(rng, (40, 2501), BF16)
    packed = bf16_gemm.PackedWeight(w)
    c = bf16_gemm.matmul(a, packed, out_dtype=np.float32, num_threads=2)
    _check_bound(c, a, w)
    fastattn.set_isa("scalar")
    assert np.array_equal(c, bf16_gemm.matmul(a, packed, out_dtype=np.float32, num_threads=1))


@needs_bf16
def test_validation_names_the_argument():
    rng = np.random.default_rng(4)
    w = _rand(rng, (8, 6), BF16)
    packed = bf16_gemm.PackedWeight(w)
    with pytest.raises(TypeError, match="w must be bfloat16"):
        bf16_gemm.PackedWeight(np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"w must have shape \(N, K\)"):
        bf16_gemm.PackedWeight(np.ones(3, BF16))
    with pytest.raises(TypeError, match="a has dtype float16 but the packed weight is bfloat16"):
        bf16_gemm.matmul(np.ones((2, 6), np.float16), packed)
    with pytest.raises(TypeError, match="a must be bfloat16"):
        bf16_gemm.matmul(np.ones((2, 6), np.float32), packed)
    with pytest.raises(ValueError, match=r"a must have shape \(M, 6\)"):
        bf16_gemm.matmul(np.ones((2, 5), BF16), packed)
    with pytest.raises(TypeError, match="out_dtype must be float32 or bfloat16"):
        bf16_gemm.matmul(np.ones((2, 6), BF16), packed, out_dtype=np.float64)
    with pytest.raises(ValueError, match=r"out must have shape \(2, 8\)"):
        bf16_gemm.matmul(np.ones((2, 6), BF16), packed, out=np.empty((2, 7), BF16))
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        bf16_gemm.matmul(np.ones((2, 6), BF16), packed, bias=np.ones(7, np.float32))
    with pytest.raises(TypeError, match="packed must be a PackedWeight"):
        bf16_gemm.matmul(np.ones((2, 6), BF16), w)
    with pytest.raises(TypeError, match="alpha must be a real number"):
        bf16_gemm.matmul(np.ones((2, 6), BF16), packed, alpha="2")
    with pytest.raises(TypeError, match="bias must be a floating-point array"):
        bf16_gemm.matmul(np.ones((2, 6), BF16), packed, bias=np.ones(8, np.int32))


def test_big_endian_float16_is_accepted():
    rng = np.random.default_rng(6)
    a, w = _rand(rng, (5, 7), F16), _rand(rng, (3, 7), F16)
    want = bf16_gemm.matmul(a, bf16_gemm.PackedWeight(w), out_dtype=np.float32)
    got = bf16_gemm.matmul(a.astype(">f2"), bf16_gemm.PackedWeight(w.astype(">f2")),
                           out_dtype=np.float32)
    assert np.array_equal(got, want)
