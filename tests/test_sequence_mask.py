"""sequence_mask and the classic mul/add padding mask."""

import numpy as np
import pytest

import fastattn
from fastattn import reference as ref
from conftest import LAYOUTS, assert_close, strided_copy


def test_sequence_mask_matches_tf_semantics():
    got = fastattn.sequence_mask([[1, 3], [0, 2]], maxlen=4)
    assert got.shape == (2, 2, 4) and got.dtype == bool
    assert got.tolist() == [[[1, 0, 0, 0], [1, 1, 1, 0]], [[0, 0, 0, 0], [1, 1, 0, 0]]]
    assert fastattn.sequence_mask([2, 5]).shape == (2, 5)
    assert fastattn.sequence_mask([1], maxlen=3, dtype=np.float32).dtype == np.float32
    assert fastattn.sequence_mask(np.zeros(0, int)).shape == (0, 0)


@pytest.mark.parametrize("mode", ["mul", "add"])
@pytest.mark.parametrize("axis", [1, 2, -1])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_apply_sequence_mask(isa, threads, dtype, rng, mode, axis, layout):
    x = rng.standard_normal((3, 7, 5)).astype(dtype)
    L = x.shape[axis]
    lengths = rng.integers(0, L + 1, size=3)
    got = fastattn.apply_sequence_mask(strided_copy(x, layout), lengths, mode=mode, axis=axis,
                                       num_threads=threads)
    assert_close(got, ref.apply_sequence_mask(x, lengths, mode=mode, axis=axis))


def test_mul_zeroes_and_add_subtracts():
    x = np.ones((2, 4), np.float64)
    assert fastattn.apply_sequence_mask(x, [[1], [3]]).tolist() == [[1, 0, 0, 0], [1, 1, 1, 0]]
    add = fastattn.apply_sequence_mask(x, [1, 3], mode="add")
    assert add[0, 0] == 1 and add[0, 1] == 1 - 1e12 and add[1, 3] == 1 - 1e12


def test_in_place(rng):
    x = rng.standard_normal((2, 6, 3)).astype(np.float32)
    want = ref.apply_sequence_mask(x, [2, 6])
    assert fastattn.apply_sequence_mask(x, [2, 6], out=x) is x
    assert_close(x, want)


def test_errors():
    x = np.zeros((2, 4, 3))
    with pytest.raises(ValueError, match="mode must be one of"):
        fastattn.apply_sequence_mask(x, [1, 2], mode="mask")
    with pytest.raises(ValueError, match="axis must not be 0"):
        fastattn.apply_sequence_mask(x, [1, 2], axis=0)
    with pytest.raises(ValueError, match="lengths must have shape \\(2,\\) or \\(2, 1\\)"):
        fastattn.apply_sequence_mask(x, [1, 2, 3])
    with pytest.raises(ValueError, match="lengths must be <= x.shape\\[1\\] = 4"):
        fastattn.apply_sequence_mask(x, [1, 5])
    with pytest.raises(ValueError, match="lengths must be non-negative"):
        fastattn.sequence_mask([-1])
    with pytest.raises(TypeError, match="lengths must be integers"):
        fastattn.sequence_mask([1.0])
