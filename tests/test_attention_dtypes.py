"""bfloat16 and float16 attention: q, k, v and the output in the 16-bit
dtype, the sums and the softmax in float32.

The oracle is the float64 reference on the same (already rounded) inputs.
Two bounds, derived rather than fitted:

* the widened kernels (every ISA level but avx512bf16's all-bf16 one)
  compute exactly what the float32 kernel computes on the widened inputs,
  then round once: so they are checked *bitwise* against the float32
  kernel's output rounded by ml_dtypes / NumPy, and against the oracle
  within one ulp of the dtype at |ref| plus float32's own error;
* the vdpbf16ps kernel also rounds each probability to bfloat16 for P.V:
  |sum_j (p~_j - p_j) v_j| / l <= 2^-9 max|v| (relative error 2^-9 per
  probability, which sum to 1), so it gets that term on top.
"""

import numpy as np
import pytest

import fastattn
from fastattn import reference

from conftest import random_qkv, strided_copy

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
HALVES = [BF16, F16]
ids = ["bf16", "f16"]

# (B, H, Hkv, Lq, Lk, D, Dv): sizes 1, odd, past a tile (96 queries, 48 keys),
# not multiples of any vector width, GQA, decode (split-KV at 2048+ keys)
SHAPES = [
    (1, 1, 1, 1, 1, 1, 1),
    (1, 2, 1, 5, 7, 3, 5),
    (2, 4, 2, 130, 77, 64, 64),
    (1, 3, 3, 97, 200, 33, 17),
    (2, 4, 4, 1, 2100, 128, 128),
    (1, 8, 2, 2, 1100, 64, 40),
    (1, 2, 2, 100, 49, 2, 31),
]


def ulp(x, dtype):
    """The spacing of ``dtype`` at |x| (its subnormal spacing near 0)."""
    a = np.abs(x)
    if dtype == F16:
        return np.spacing(a.astype(np.float16)).astype(np.float64)
    # bfloat16 has float32's exponent range and 8 significand bits
    tiny = 2.0 ** -133
    e = np.floor(np.log2(np.maximum(a, 2.0 ** -126)))
    return np.maximum(2.0 ** (e - 7), tiny)


def oracle(q, k, v, **kw):
    return reference.scaled_dot_product_attention(
        q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), **kw)


def dp_kernel(dtype):
    """Whether bf16 runs the all-bf16 kernel (P rounded to bf16 for P.V):
    at avx512bf16, and at amx, which adds tiles for Q.K^T."""
    return dtype == BF16 and fastattn.get_isa() in ("avx512bf16", "amx")


def check_against_oracle(got, q, k, v, dtype, **kw):
    ref = oracle(q, k, v, **kw)
    assert got.dtype == dtype and got.shape == ref.shape
    vmax = float(np.abs(v.astype(np.float64)).max()) if v.size else 0.0
    tol = ulp(ref, dtype) + 1e-5 * vmax
    if dp_kernel(dtype):
        tol = tol + 2.0 ** -9 * vmax
    err = np.abs(got.astype(np.float64) - ref)
    bad = err > tol
    assert not bad.any(), (
        f"{bad.sum()} of {bad.size} elements off; worst {err.max():.3g} "
        f"(tolerance there {tol.ravel()[np.argmax(err)]:.3g})")
    return ref


@pytest.mark.parametrize("dtype", HALVES, ids=ids)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_half_attention_against_oracle(isa, threads, rng, dtype, shape):
    q, k, v = random_qkv(rng, shape, dtype)
    for causal in (False, True):
        got = fastattn.scaled_dot_product_attention(
            q, k, v, is_causal=causal, causal_alignment="bottom_right", num_threads=threads)
        check_against_oracle(got, q, k, v, dtype, is_causal=causal,
                             causal_alignment="bottom_right")


@pytest.mark.parametrize("dtype", HALVES, ids=ids)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_widened_kernels_round_the_float32_result(isa, rng, dtype, shape):
    """Below the all-bf16 vdpbf16ps kernel, the 16-bit call is the float32
    kernel on the widened inputs plus one rounding, bit for bit."""
    q, k, v = random_qkv(rng, shape, dtype)
    got = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, num_threads=2)
    f32 = fastattn.scaled_dot_product_attention(
        *(x.astype(np.float32) for x in (q, k, v)), is_causal=True, num_threads=2)
    if not dp_kernel(dtype):
        np.testing.assert_array_equal(got.view(np.uint16), f32.astype(dtype).view(np.uint16))
        return
    # the vdpbf16ps kernel also rounds P: within that term of the float32 result
    diff = np.abs(got.astype(np.float64) - f32.astype(np.float64))
    tol = ulp(f32.astype(np.float64), dtype) + 2.0 ** -9 * np.abs(v.astype(np.float64)).max()
    assert np.all(diff <= tol)


@pytest.mark.parametrize("dtype", HALVES, ids=ids)
def test_half_attention_with_features(isa, rng, dtype):
    B, H, Hkv, Lq, Lk, D = 2, 4, 2, 37, 150, 24
    q, k, v = random_qkv(rng, (B, H, Hkv, Lq, Lk, D, D), dtype)
    mask = rng.random((B, 1, Lq, Lk)) < 0.8
    add = rng.standard_normal((B, H, Lq, Lk)).astype(np.float32)
    cases = [
        dict(attn_mask=mask),
        dict(attn_mask=add),
        dict(key_lengths=[150, 61], query_lengths=[37, 5]),
        dict(key_starts=[3, 40], key_lengths=[150, 120], is_causal=True,
             causal_alignment="bottom_right"),
        dict(window=(17, 3)),
        dict(softcap=2.5, sinks=rng.standard_normal(H).astype(np.float32)),
        dict(alibi_slopes=rng.random(H).astype(np.float32), is_causal=True),
    ]
    for kw in cases:
        got = fastattn.scaled_dot_product_attention(q, k, v, num_threads=2, **kw)
        check_against_oracle(got, q, k, v, dtype, **kw)


@pytest.mark.parametrize("dtype", HALVES, ids=ids)
def test_half_weights_in_the_dtype(rng, dtype):
    q, k, v = random_qkv(rng, (1, 2, 2, 9, 13, 8, 8), dtype)
    out, w = fastattn.scaled_dot_product_attention(q, k, v, return_weights=True, key_lengths=[10])
    _, wref = reference.scaled_dot_product_attention(
        *(x.astype(np.float64) for x in (q, k, v)), return_weights=True, key_lengths=[10])
    assert w.dtype == dtype
    np.testing.assert_array_less(np.abs(w.astype(np.float64) - wref), ulp(wref, dtype) + 1e-6)
    assert np.all(w[..., 10:].astype(np.float64) == 0)


@pytest.mark.parametrize("dtype", HALVES, ids=ids)
@pytest.mark.parametrize("layout", ["F", "strided", "reversed"])
def test_half_attention_strided(isa, rng, dtype, layout):
    q, k, v = random_qkv(rng, (2, 3, 3, 50, 61, 20, 12), dtype)
    qs, ks, vs = (strided_copy(x, layout) for x in (q, k, v))
    got = fastattn.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
    want = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    out = strided_copy(np.zeros_like(want), layout)
    fastattn.scaled_dot_product_attention(qs, ks, vs, is_causal=True, out=out)
    np.testing.assert_array_equal(out.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("dtype", HALVES, ids=ids)
@pytest.mark.parametrize("shape", [(1, 8, 2, 1, 4099, 64, 64), (3, 4, 4, 200, 333, 33, 33),
                                   (2, 2, 1, 3, 2500, 40, 24)])
def test_half_attention_bitwise_across_threads(isa, rng, dtype, shape):
    q, k, v = random_qkv(rng, shape, dtype)
    one = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, num_threads=1)
    for n in (2, 3, 5):
        got = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, num_threads=n)
        np.testing.assert_array_equal(got.view(np.uint16), one.view(np.uint16))


@pytest.mark.parametrize("dtype", HALVES, ids=ids)
def test_half_queries_with_int8_cache(isa, rng, dtype):
    q, k, v = random_qkv(rng, (2, 4, 2, 3, 700, 64, 64), np.float32)
    kq, ks = fastattn.quantize_kv(k)
    vq, vs = fastattn.quantize_kv(v)
    qh = q.astype(dtype)
    got = fastattn.scaled_dot_product_attention(qh, kq, vq, k_scale=ks, v_scale=vs, num_threads=2)
    assert got.dtype == dtype
    kd, vd = fastattn.dequantize_kv(kq, ks), fastattn.dequantize_kv(vq, vs)
    ref = oracle(qh, kd, vd)
    tol = ulp(ref, dtype) + 1e-5 * np.abs(vd).max()
    assert np.all(np.abs(got.astype(np.float64) - ref) <= tol)


def test_half_special_values(rng):
    """NaN in a row's inputs gives NaN in that row only; fully masked rows are
    zeros, never NaN, in both 16-bit dtypes."""
    for dtype in HALVES:
        q, k, v = random_qkv(rng, (1, 2, 2, 4, 9, 8, 8), dtype)
        q[0, 1, 2, 3] = np.nan
        out = fastattn.scaled_dot_product_attention(q, k, v, key_lengths=[9],
                                                    query_lengths=[4])
        bad = np.isnan(out.astype(np.float32))
        assert bad[0, 1, 2].all() and bad.sum() == out.shape[-1]
        mask = np.ones((4, 9), bool)
        mask[1] = False
        out = fastattn.scaled_dot_product_attention(q[:, :1], k[:, :1], v[:, :1], attn_mask=mask)
        assert np.all(out[0, 0, 1].astype(np.float32) == 0)


def test_half_dtype_rules(rng):
    q, k, v = random_qkv(rng, (1, 2, 2, 3, 5, 4, 4), np.float32)
    sdpa = fastattn.scaled_dot_product_attention
    # mixed with a wider dtype: ordinary promotion to float32
    assert sdpa(q.astype(F16), k, v).dtype == np.float32
    # 16-bit K/V of the other format under 16-bit queries: the queries' dtype
    assert sdpa(q.astype(BF16), k.astype(F16), v.astype(F16)).dtype == BF16
    # float32 queries over a 16-bit cache: float32 results, as before
    assert sdpa(q, k.astype(BF16), v.astype(BF16)).dtype == np.float32
    with pytest.raises(TypeError, match="out"):
        sdpa(q.astype(BF16), k.astype(BF16), v.astype(BF16), out=np.empty((1, 2, 3, 4), np.float32))


def test_half_big_endian_storage(rng):
    """Non-native byte order is converted, never read as native bits."""
    q, k, v = random_qkv(rng, (1, 2, 2, 6, 11, 8, 8), np.float16)
    want = fastattn.scaled_dot_product_attention(q, k, v)
    swapped = [x.astype(">f2") for x in (q, k, v)]
    got = fastattn.scaled_dot_product_attention(*swapped)
    np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32))
    q32 = q.astype(np.float32)
    np.testing.assert_array_equal(fastattn.scaled_dot_product_attention(q32, *swapped[1:]),
                                  fastattn.scaled_dot_product_attention(q32, k, v))


def paged_copy(rng, k, v, block_size):
    """(key_cache, value_cache, block_tables) holding the (B, Hkv, L, D) k
    and v in shuffled blocks of block_size rows (L padded to whole blocks)."""
    B, Hkv, L, D = k.shape
    per = -(-L // block_size)
    order = rng.permutation(B * per + 3)[:B * per]  # some blocks stay unused
    kc = np.zeros((B * per + 3, block_size, Hkv, D), k.dtype)
    vc = np.zeros((B * per + 3, block_size, Hkv, v.shape[3]), v.dtype)
    for b in range(B):
        for j in range(per):
            rows = slice(j * block_size, min(L, (j + 1) * block_size))
            n = rows.stop - rows.start
            kc[order[b * per + j], :n] = k[b, :, rows].transpose(1, 0, 2)
            vc[order[b * per + j], :n] = v[b, :, rows].transpose(1, 0, 2)
    return kc, vc, order.reshape(B, per).astype(np.int64)


@pytest.mark.parametrize("dtype", HALVES, ids=ids)
@pytest.mark.parametrize("Lq", [1, 3])
def test_half_paged_attention(isa, threads, rng, dtype, Lq):
    """16-bit queries over a paged cache of their dtype give a result of
    their dtype: within the oracle's bounds, and bit for bit what the
    contiguous call on the same keys gives (the same kernel and tiles)."""
    B, H, Hkv, L, D = 2, 4, 2, 61, 24
    q, k, v = random_qkv(rng, (B, H, Hkv, Lq, L, D, D), dtype)
    lens = np.array([L, 29])
    kc, vc, tables = paged_copy(rng, k, v, 4)
    for causal in (False, True):
        got = fastattn.paged_attention(q, kc, vc, tables, lens, is_causal=causal,
                                       num_threads=threads)
        assert got.dtype == dtype
        for b in range(B):
            n = lens[b]
            qb, kb, vb = q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n]
            check_against_oracle(got[b:b + 1], qb, kb, vb, dtype, is_causal=causal,
                                 causal_alignment="bottom_right")
        one = fastattn.paged_attention(q[:1], kc, vc, tables[:1], lens[:1], is_causal=causal,
                                       num_threads=threads)
        contiguous = fastattn.scaled_dot_product_attention(
            q[:1], k[:1], v[:1], is_causal=causal, causal_alignment="bottom_right",
            num_threads=threads)
        np.testing.assert_array_equal(one.view(np.uint16), contiguous.view(np.uint16))


@pytest.mark.parametrize("dtype", HALVES, ids=ids)
def test_float32_queries_over_a_half_paged_cache(rng, dtype):
    """float32 queries over a 16-bit cache: a float32 result, the cache read
    as its exact values."""
    B, H, Hkv, L, D = 1, 4, 2, 37, 16
    q, k, v = random_qkv(rng, (B, H, Hkv, 2, L, D, D), dtype)
    kc, vc, tables = paged_copy(rng, k, v, 8)
    q32 = q.astype(np.float32)
    got = fastattn.paged_attention(q32, kc, vc, tables, [L])
    assert got.dtype == np.float32
    want = fastattn.scaled_dot_product_attention(q32, k, v, causal_alignment="bottom_right")
    np.testing.assert_array_equal(got, want)


def packed(x, lengths):
    """(B, H, L, D) rows 0..lengths[b] of each sequence as (total, H, D)."""
    return np.concatenate([x[b, :, :n].transpose(1, 0, 2) for b, n in enumerate(lengths)])


@pytest.mark.parametrize("dtype", HALVES, ids=ids)
def test_half_varlen_attention(isa, threads, rng, dtype):
    """Packed 16-bit q, k, v give a result of their dtype, each sequence bit
    for bit what scaled_dot_product_attention gives on it alone; float32 q
    reads 16-bit k, v as they are."""
    B, H, Hkv, L, D = 3, 4, 2, 70, 24
    q, k, v = random_qkv(rng, (B, H, Hkv, L, L, D, D), dtype)
    lq, lk = np.array([70, 0, 9]), np.array([70, 5, 33])
    cu_q, cu_k = np.concatenate([[0], np.cumsum(lq)]), np.concatenate([[0], np.cumsum(lk)])
    qp, kp, vp = packed(q, lq), packed(k, lk), packed(v, lk)
    for q_in, q_full in ((qp, q), (qp.astype(np.float32), q.astype(np.float32))):
        got = fastattn.varlen_attention(q_in, kp, vp, cu_q, cu_k, is_causal=True,
                                        causal_alignment="bottom_right", num_threads=threads)
        assert got.dtype == q_in.dtype
        for b in range(B):
            if lq[b] == 0:
                continue
            one = fastattn.scaled_dot_product_attention(
                q_full[b:b + 1, :, :lq[b]], k[b:b + 1, :, :lk[b]], v[b:b + 1, :, :lk[b]],
                is_causal=True, causal_alignment="bottom_right", num_threads=threads)
            np.testing.assert_array_equal(got[cu_q[b]:cu_q[b + 1]],
                                          one[0].transpose(1, 0, 2))
            if q_in.dtype == dtype:
                check_against_oracle(one, q_full[b:b + 1, :, :lq[b]], k[b:b + 1, :, :lk[b]],
                                     v[b:b + 1, :, :lk[b]], dtype, is_causal=True,
                                     causal_alignment="bottom_right")


def test_varlen_refuses_int8(rng):
    q = rng.standard_normal((5, 2, 8)).astype(np.float32)
    k8 = np.zeros((5, 2, 8), np.int8)
    cu = np.array([0, 5])
    with pytest.raises(TypeError, match="int8"):
        fastattn.varlen_attention(q, k8, k8, cu, cu)


def test_half_nan_payloads_of_an_additive_mask(isa, rng):
    """A float32 NaN of any payload in an additive mask makes its row NaN (and
    only its row) at every level, the vdpbf16ps kernel's rounding of the
    probabilities included."""
    q, k, v = random_qkv(rng, (1, 2, 2, 100, 100, 16, 16), BF16)
    for bits in (0x7FC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001):
        mask = np.zeros((100, 100), np.float32)
        mask[5, 7] = np.array([bits], np.uint32).view(np.float32)[0]
        out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask).astype(np.float32)
        bad = np.isnan(out)
        assert bad[0, :, 5].all() and bad.sum() == 2 * 16, hex(bits)
