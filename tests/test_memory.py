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
import resource

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


def test_zero_size_axes_everywhere():
    z = np.zeros
    cases = [
        (fastattn.masked_softmax(z((0, 3, 4)), key_lengths=z(0, int)), (0, 3, 4)),
        (fastattn.masked_softmax(z((2, 0, 4)), query_lengths=[0, 0], is_causal=True), (2, 0, 4)),
        (fastattn.masked_softmax(z((2, 3, 0)), key_lengths=[0, 0], attn_mask=z((3, 0), bool)),
         (2, 3, 0)),
        (fastattn.apply_sequence_mask(z((2, 0, 4)), [0, 0]), (2, 0, 4)),
        (fastattn.apply_sequence_mask(z((2, 3, 0)), [1, 3]), (2, 3, 0)),
        (fastattn.split_heads(z((2, 3, 0)), 4), (2, 4, 3, 0)),
        (fastattn.split_heads(z((0, 3, 8)), 4), (0, 4, 3, 2)),
        (fastattn.merge_heads(z((2, 0, 3, 4))), (2, 3, 0)),
        (fastattn.merge_heads(z((2, 2, 0, 4))), (2, 0, 8)),
        (fastattn.sinusoidal_position_encoding(0, 7), (0, 7)),
        (fastattn.add_position_encoding(z((0, 3, 4))), (0, 3, 4)),
        (fastattn.add_position_encoding(z((2, 0, 4))), (2, 0, 4)),
        (fastattn.sequence_mask(z((2, 0), int), 3), (2, 0, 3)),
    ]
    for got, shape in cases:
        assert got.shape == shape
    # no channels: a clear error rather than an empty table
    with pytest.raises(ValueError, match="channels must be positive"):
        fastattn.sinusoidal_position_encoding(3, 0)
    with pytest.raises(ValueError, match="x must have at least one channel"):
        fastattn.add_position_encoding(z((2, 3, 0)))


# ---- out= aliasing an input ------------------------------------------------------


def _alias_cases():
    """(name, run(buf) -> result, expected(buf_copy)) where run passes views
    of one buffer both as input and as out."""
    def sm(view_in, view_out, **kw):
        return (lambda b: fastattn.masked_softmax(view_in(b), out=view_out(b), **kw),
                lambda b: reference.masked_softmax(view_in(b), **kw))
    cases = {
        "softmax-inplace": sm(lambda b: b, lambda b: b, key_lengths=[2, 3]),
        "softmax-reversed": sm(lambda b: b, lambda b: b[..., ::-1]),
        "softmax-transposed": sm(lambda b: b[:, :4, :4], lambda b: b[:, :4, :4].transpose(0, 2, 1)),
        "softmax-shifted": sm(lambda b: b[:, :, :4], lambda b: b[:, :, 1:]),
        "softmax-out-is-mask": (
            lambda b: fastattn.masked_softmax(b[0], attn_mask=b[1], out=b[1]),
            lambda b: reference.masked_softmax(b[0], attn_mask=b[1])),
        "softmax-all-three": (
            lambda b: fastattn.masked_softmax(b, attn_mask=b, out=b),
            lambda b: reference.masked_softmax(b, attn_mask=b)),
        "seqmask-inplace": (lambda b: fastattn.apply_sequence_mask(b, [1, 3], out=b),
                            lambda b: reference.apply_sequence_mask(b, [1, 3])),
        "seqmask-reversed": (lambda b: fastattn.apply_sequence_mask(b, [1, 3], out=b[:, ::-1]),
                             lambda b: reference.apply_sequence_mask(b, [1, 3])),
        "addpe-inplace": (lambda b: fastattn.add_position_encoding(b, out=b),
                          lambda b: reference.add_position_encoding(b)),
        "addpe-shifted": (lambda b: fastattn.add_position_encoding(b[:, :4], out=b[:, 1:]),
                          lambda b: reference.add_position_encoding(b[:, :4])),
        "split-into-input": (
            lambda b: fastattn.split_heads(b[:, :, :4], 2, out=b.reshape(-1)[:40].reshape(2, 2, 5, 2)),
            lambda b: reference.split_heads(b[:, :, :4], 2)),
        "merge-into-input": (
            lambda b: fastattn.merge_heads(b.reshape(2, 5, 5, 1)[:, :2], out=b[:, :5, :2]),
            lambda b: reference.merge_heads(b.reshape(2, 5, 5, 1)[:, :2])),
    }
    return cases


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", sorted(_alias_cases()))
def test_out_aliasing_an_input(name, dtype):
    run, expect = _alias_cases()[name]
    buf = f64(2, 5, 5).astype(dtype)
    expected = expect(buf.copy())
    got = run(buf)
    assert_close(got, expected, dtype)


# ---- unallocatable shapes ------------------------------------------------------------


def test_unallocatable_results_raise_memoryerror():
    with pytest.raises(MemoryError):
        fastattn.sinusoidal_position_encoding(10**7, 10**6)           # 36 TiB
    huge = np.broadcast_to(np.zeros((1, 1, 8), np.float32), (2**40, 1, 8))  # 32 TiB logical
    for call in (lambda: fastattn.masked_softmax(huge),
                 lambda: fastattn.apply_sequence_mask(huge.reshape(1, 2**40, 8), [5]),
                 lambda: fastattn.add_position_encoding(huge),
                 lambda: fastattn.split_heads(huge, 2),
                 lambda: fastattn.merge_heads(huge[:, None])):
        with pytest.raises(MemoryError):
            call()


def test_sequence_mask_fails_before_building_temporaries():
    # used to build and fill np.arange(2**30) (8 GiB) before failing on the
    # 1 PiB result
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, peak so far
    with pytest.raises(MemoryError):
        fastattn.sequence_mask(np.zeros(2**20, int), maxlen=2**30)
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grew < 2**20, f"peak RSS grew by {grew / 2**20:.1f} GiB before the MemoryError"


def test_unallocatable_scratch_raises_memoryerror():
    # A key axis of 2**40 with zero stride fits in any memory, but the strided
    # path needs per-thread row scratch of 12 TiB: the C kernel's allocation
    # fails and FA_ERR_NOMEM becomes MemoryError.
    scores = np.broadcast_to(np.zeros(1, np.float32), (1, 2**40))
    out = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape=(1, 2**40),
                                          strides=(0, 0))
    with pytest.raises(MemoryError, match="kernel scratch"):
        fastattn.masked_softmax(scores, out=out, num_threads=1)

