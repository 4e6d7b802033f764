"""Memory behaviour of every kernel.

* RSS and malloc'd bytes stay flat over many calls (``FASTATTN_MEMORY_CALLS``,
  default 100,000 per kernel);
* shapes whose buffers cannot be allocated raise MemoryError;
* size arithmetic: offsets beyond 2**31 elements address correctly, and
  element counts overflowing int64 are rejected before any memory is touched;
* ``out=`` aliasing an input works (or raises clearly);
* read-only, non-native byte order, misaligned, structured-field and
  zero-size inputs work or raise clearly.
"""

import ctypes
import ctypes.util
import gc
import os

import numpy as np
import pytest

import fastattn
from fastattn import reference

import strategies as S
from conftest import assert_close

rng = np.random.default_rng(7)


def f64(*shape):
    return rng.standard_normal(shape)


# ---- layouts the C side cannot address directly --------------------------------

# (name, fastattn call taking one array, oracle call)
ONE_ARRAY_CALLS = [
    ("masked_softmax", lambda a: fastattn.masked_softmax(a, key_lengths=[2, 3], is_causal=True),
     lambda a: reference.masked_softmax(a, key_lengths=[2, 3], is_causal=True)),
    ("masked_softmax-mask",
     lambda a: fastattn.masked_softmax(np.ones(a.shape, a.dtype.newbyteorder("=")), attn_mask=a),
     lambda a: reference.masked_softmax(np.ones(a.shape, a.dtype.newbyteorder("=")), attn_mask=a)),
    ("apply_sequence_mask", lambda a: fastattn.apply_sequence_mask(a, [1, 2], mode="add"),
     lambda a: reference.apply_sequence_mask(a, [1, 2], mode="add")),
    ("split_heads", lambda a: fastattn.split_heads(a, 2), lambda a: reference.split_heads(a, 2)),
    ("merge_heads", lambda a: fastattn.merge_heads(a[:, None]),
     lambda a: reference.merge_heads(a[:, None])),
    ("add_position_encoding", lambda a: fastattn.add_position_encoding(a),
     lambda a: reference.add_position_encoding(a)),
]

ODD_LAYOUTS = ["misaligned", "field", "readonly", "byteswapped", "broadcast", "negative"]


@pytest.mark.parametrize("layout", ODD_LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,call,oracle", ONE_ARRAY_CALLS, ids=[c[0] for c in ONE_ARRAY_CALLS])
def test_odd_input_layouts(name, call, oracle, dtype, layout):
    a = S.relayout(f64(2, 3, 4).astype(dtype), layout, axis=1)
    assert_close(call(a), oracle(np.array(a)), dtype)


def test_structured_field_strides_regression():
    # a float64 field of a packed record has 12-byte strides; the kernels
    # used to divide them by 8 and read (and, for out=, write) other bytes
    rec = np.zeros((3, 5), dtype=[("a", "f4"), ("b", "f8")])
    rec["b"] = f64(3, 5)
    x = rec["b"]
    assert_close(fastattn.masked_softmax(x), reference.masked_softmax(np.array(x)))
    lrec = np.zeros(3, dtype=[("k", "i8"), ("pad", "i4")])
    lrec["k"] = [1, 2, 3]
    s = f64(3, 2, 4)
    assert_close(fastattn.masked_softmax(s, key_lengths=lrec["k"]),
                 reference.masked_softmax(s, key_lengths=[1, 2, 3]))
    out = np.zeros((3, 2, 4), dtype=[("o", "f8"), ("q", "i4")])
    out["q"] = 7
    r = fastattn.masked_softmax(s, out=out["o"])
    assert r.base is out["o"].base or r is not None
    assert_close(out["o"], reference.masked_softmax(s))
    assert (out["q"] == 7).all(), "out= wrote outside its field"


@pytest.mark.parametrize("layout", ["misaligned", "field"])
@pytest.mark.parametrize("name", ["masked_softmax", "apply_sequence_mask", "split_heads",
                                  "merge_heads", "add_position_encoding",
                                  "sinusoidal_position_encoding"])
def test_odd_out_layouts(name, layout):
    x3 = f64(2, 4, 6)
    calls = {
        "masked_softmax": (lambda o: fastattn.masked_softmax(x3, out=o), reference.masked_softmax(x3)),
        "apply_sequence_mask": (lambda o: fastattn.apply_sequence_mask(x3, [1, 3], out=o),
                                reference.apply_sequence_mask(x3, [1, 3])),
        "split_heads": (lambda o: fastattn.split_heads(x3, 2, out=o), reference.split_heads(x3, 2)),
        "merge_heads": (lambda o: fastattn.merge_heads(x3[:, None], out=o),
                        reference.merge_heads(x3[:, None])),
        "add_position_encoding": (lambda o: fastattn.add_position_encoding(x3, out=o),
                                  reference.add_position_encoding(x3)),
        "sinusoidal_position_encoding": (
            lambda o: fastattn.sinusoidal_position_encoding(4, 6, dtype=np.float64, out=o),
            reference.sinusoidal_position_encoding(4, 6, dtype=np.float64)),
    }
    call, expected = calls[name]
    out = S.relayout(np.full(expected.shape, np.nan), layout)
    assert call(out) is out
    assert_close(out, expected)


# ---- zero-size axes ---------------------------------------------------------------


def test_empty_length_lists():
    # [] is float64 to NumPy; an empty list of lengths used to be rejected
    assert fastattn.sequence_mask([], maxlen=3).shape == (0, 3)
    assert fastattn.sequence_mask([]).shape == (0, 0)
    assert fastattn.apply_sequence_mask(np.zeros((0, 4)), []).shape == (0, 4)
    assert fastattn.masked_softmax(np.zeros((0, 2, 3)), key_lengths=[]).shape == (0, 2, 3)
