"""varlen_attention against the oracle (each packed sequence attended on its
own): empty sequences, lengths around the 96-row chunks, GQA, causality in
both alignments, windows, soft-capping, sinks, ALiBi; every ISA level, 1 and
N threads, both dtypes; determinism; and cu_seqlens checks."""

import numpy as np
import pytest

import fastattn
from fastattn import reference as ref
from conftest import N_THREADS, assert_close


def _packed(rng, lengths_q, lengths_k, H, Hkv, D, Dv, dtype):
    cu_q = np.concatenate([[0], np.cumsum(lengths_q)]).astype(np.int64)
    cu_k = np.concatenate([[0], np.cumsum(lengths_k)]).astype(np.int64)
    q = rng.standard_normal((cu_q[-1], H, D)).astype(dtype)
    k = rng.standard_normal((cu_k[-1], Hkv, D)).astype(dtype)
    v = rng.standard_normal((cu_k[-1], Hkv, Dv)).astype(dtype)
    return q, k, v, cu_q, cu_k


CASES = {
    "one": ([1], [1], 1, 1, 1, 1),
    "mixed": ([3, 0, 97, 1, 130], [3, 0, 97, 1, 130], 4, 2, 33, 17),
    "cross": ([5, 2, 0, 40], [7, 200, 3, 0], 2, 1, 8, 9),
    "decode": ([1, 1, 1], [300, 1, 57], 4, 4, 16, 24),
}

FEATURES = {
    "plain": {},
    "causal": dict(is_causal=True),
    "causal_br": dict(is_causal=True, causal_alignment="bottom_right"),
    "window": dict(window=(20, 3)),
    "everything": dict(is_causal=True, causal_alignment="bottom_right", window=(50, None),
                       softcap=2.0, sinks=[0.5, -1.0, 2.0, 0.0], scale=0.5,
                       alibi_slopes=[0.1, -0.02, 0.0, 0.3]),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("feat", FEATURES)
def test_against_oracle(isa, threads, dtype, rng, case, feat):
    lq, lk, H, Hkv, D, Dv = CASES[case]
    q, k, v, cu_q, cu_k = _packed(rng, lq, lk, H, Hkv, D, Dv, dtype)
    kw = dict(FEATURES[feat])
    for name in ("sinks", "alibi_slopes"):
        if name in kw:
            kw[name] = np.asarray(kw[name])[:H]
    got = fastattn.varlen_attention(q, k, v, cu_q.astype(np.int32), cu_k, num_threads=threads,
                                    **kw)
    want = ref.varlen_attention(q.astype(np.float64), k.astype(np.float64),
                                v.astype(np.float64), cu_q, cu_k, **kw)
    assert_close(got, want.astype(dtype), dtype)


def test_matches_padded_attention(dtype, rng):
    """The same batch padded and run with key_lengths gives the same rows."""
    lengths = np.array([5, 1, 0, 77, 130])
    q, k, v, cu, _ = _packed(rng, lengths, lengths, 2, 2, 16, 16, dtype)
    got = fastattn.varlen_attention(q, k, v, cu, cu, is_causal=True)
    B, L = len(lengths), lengths.max()
    pads = [np.zeros((B, 2, L, 16), dtype) for _ in range(3)]
    for b in range(B):
        for src, dst in zip((q, k, v), pads):
            dst[b, :, :lengths[b]] = src[cu[b]:cu[b + 1]].transpose(1, 0, 2)
    padded = fastattn.scaled_dot_product_attention(*pads, key_lengths=lengths, is_causal=True)
    for b in range(B):
        assert_close(got[cu[b]:cu[b + 1]], padded[b, :, :lengths[b]].transpose(1, 0, 2), dtype)


def test_deterministic_and_strided(isa, dtype, rng):
    q, k, v, cu_q, cu_k = _packed(rng, [200, 3, 17, 96, 1], [250, 3, 17, 96, 9], 4, 2, 24, 24,
                                  dtype)
    kw = dict(is_causal=True, causal_alignment="bottom_right", sinks=np.ones(4), softcap=5.0)
    one = fastattn.varlen_attention(q, k, v, cu_q, cu_k, num_threads=1, **kw)
    many = fastattn.varlen_attention(q, k, v, cu_q, cu_k, num_threads=N_THREADS, **kw)
    np.testing.assert_array_equal(one, many)
    # strided views (every other head of a wider array) and out=
    wide = np.repeat(q, 2, axis=1)[:, ::2]
    out = np.empty_like(one)
    res = fastattn.varlen_attention(wide, k, v, cu_q, cu_k, out=out, **kw)
    assert res is out
    np.testing.assert_array_equal(out, one)


@pytest.mark.parametrize("cu, exc, pattern", [
    ([1, 4], ValueError, "start at 0"),
    ([0, 3, 2, 4], ValueError, "not decrease"),
    ([0, 3], ValueError, "end at"),
    ([[0, 4]], ValueError, "shape"),
    ([0.0, 4.0], TypeError, "int32 or int64"),
    ([], ValueError, "shape"),
])
def test_bad_cu_seqlens(rng, cu, exc, pattern):
    q, k, v, _, cu_k = _packed(rng, [4], [4], 2, 2, 8, 8, np.float32)
    with pytest.raises(exc, match=f"cu_seqlens_q.*{pattern}|{pattern}.*cu_seqlens_q"):
        fastattn.varlen_attention(q, k, v, cu, cu_k)
    with pytest.raises(exc, match=f"cu_seqlens_k.*{pattern}|{pattern}.*cu_seqlens_k"):
        n = np.size(cu) if np.ndim(cu) == 1 and np.size(cu) >= 2 else 2
        good_q = np.array([0] * (n - 1) + [4])  # the same batch size as cu
        fastattn.varlen_attention(q, k, v, good_q, cu)


def test_bad_shapes(rng):
    q, k, v, cu, _ = _packed(rng, [4], [4], 2, 2, 8, 8, np.float32)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        fastattn.varlen_attention(q, k, v, cu, np.array([0, 2, 4]))
    with pytest.raises(ValueError, match="3-D"):
        fastattn.varlen_attention(q[None], k, v, cu, cu)
    with pytest.raises(ValueError, match="window"):
        fastattn.varlen_attention(q, k, v, cu, cu, window=(-1, 0))
    with pytest.raises(ValueError, match="sinks"):
        fastattn.varlen_attention(q, k, v, cu, cu, sinks=[1.0])
