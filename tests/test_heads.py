"""split_heads / merge_heads against the oracle."""

import numpy as np
import pytest

import fastattn
from fastattn import reference as ref
from conftest import LAYOUTS, assert_close, strided_copy


@pytest.mark.parametrize("B,S,H,D", [(1, 1, 1, 1), (2, 7, 3, 5), (3, 17, 12, 64), (1, 129, 4, 33)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_split_and_merge(isa, threads, dtype, rng, B, S, H, D, layout):
    x = rng.standard_normal((B, S, H * D)).astype(dtype)
    xs = strided_copy(x, layout)
    heads = fastattn.split_heads(xs, H, num_threads=threads)
    assert heads.flags.c_contiguous
    assert_close(heads, ref.split_heads(x, H))
    hs = strided_copy(heads, layout)
    merged = fastattn.merge_heads(hs, num_threads=threads)
    assert merged.flags.c_contiguous
    assert np.array_equal(merged, x)  # pure data movement: exact


def test_merge_of_a_transposed_view(rng):
    x = rng.standard_normal((2, 9, 4, 8)).astype(np.float32)  # (B, S, H, D)
    view = x.transpose(0, 2, 1, 3)  # (B, H, S, D), not contiguous
    assert np.array_equal(fastattn.merge_heads(view), x.reshape(2, 9, 32))


def test_out_arguments(rng):
    x = rng.standard_normal((2, 5, 12)).astype(np.float32)
    out = np.empty((2, 3, 5, 4), np.float32)
    assert fastattn.split_heads(x, 3, out=out) is out
    assert np.array_equal(out, ref.split_heads(x, 3))
    big = np.zeros((2, 3, 5, 8), np.float32)
    fastattn.split_heads(x, 3, out=big[..., ::2])
    assert np.array_equal(big[..., ::2], ref.split_heads(x, 3))
    mout = np.empty((2, 5, 12), np.float32)
    assert fastattn.merge_heads(out, out=mout) is mout
    assert np.array_equal(mout, x)


def test_errors():
    x = np.zeros((2, 5, 12), np.float32)
    with pytest.raises(ValueError, match="num_heads=5 does not divide.*\\(2, 5, 12\\)"):
        fastattn.split_heads(x, 5)
    with pytest.raises(ValueError, match="num_heads must be positive"):
        fastattn.split_heads(x, 0)
    with pytest.raises(TypeError, match="num_heads"):
        fastattn.split_heads(x, 2.0)
    with pytest.raises(ValueError, match="x must be 3-D"):
        fastattn.split_heads(x[0], 2)
    with pytest.raises(ValueError, match="x must be 4-D"):
        fastattn.merge_heads(x)
    with pytest.raises(TypeError, match="x has unsupported dtype"):
        fastattn.merge_heads(np.zeros((1, 1, 1, 1), object))
