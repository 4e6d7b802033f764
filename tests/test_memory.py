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



# ---- size arithmetic -----------------------------------------------------------------

TWO31 = 2**31


@pytest.fixture(scope="module")
def sparse_f32():
    """Two 8 GiB float32 buffers of lazily mapped zero pages: views into them
    reach element offsets beyond 2**31 (byte offsets beyond 2**33) while
    touching only a few pages."""
    try:
        bufs = [np.zeros(TWO31 + 4096, np.float32) for _ in range(2)]
    except MemoryError:
        pytest.skip("cannot map 2 x 8 GiB of virtual memory here")
    yield bufs
    del bufs
    gc.collect()


def _far_view(buf, shape, inner_strides):
    """A view whose first axis steps 2**31 elements (shape[0] == 2)."""
    strides = (TWO31 * 4,) + tuple(s * 4 for s in inner_strides)
    return np.lib.stride_tricks.as_strided(buf, shape=shape, strides=strides)


@pytest.mark.no_sanitizer
def test_offsets_beyond_2_31_elements(sparse_f32):
    src, dst = sparse_f32
    vals = np.arange(1, 17, dtype=np.float32).reshape(2, 8) / 4
    src[:8] = vals[0]
    src[TWO31:TWO31 + 8] = vals[1]
    x = _far_view(src, (2, 1, 8), (8, 1))           # rows at 0 and 2**31
    dense = np.array(x)
    out = _far_view(dst, (2, 1, 8), (8, 1))
    checks = [
        (lambda o: fastattn.masked_softmax(x, key_lengths=[8, 5], out=o),
         reference.masked_softmax(dense, key_lengths=[8, 5])),
        (lambda o: fastattn.apply_sequence_mask(x, [1, 0], axis=2, out=o),
         reference.apply_sequence_mask(dense, [1, 0], axis=2)),
        (lambda o: fastattn.add_position_encoding(x, start_index=3, out=o),
         reference.add_position_encoding(dense, start_index=3)),
    ]
    for call, expected in checks:
        dst[:8] = np.nan
        dst[TWO31:TWO31 + 8] = np.nan
        assert call(out) is out
        assert_close(out, expected)
    assert_close(fastattn.split_heads(x, 2), reference.split_heads(dense, 2))
    x4 = _far_view(src, (2, 1, 2, 4), (8, 4, 1))
    assert_close(fastattn.merge_heads(x4), reference.merge_heads(np.array(x4)))
    table = _far_view(dst, (2, 8), (1,))
    fastattn.sinusoidal_position_encoding(2, 8, out=table)
    assert_close(table, reference.sinusoidal_position_encoding(2, 8))


class View4(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("stride", ctypes.c_int64 * 4)]


def _capi():
    lib = ctypes.CDLL(fastattn._kernels.__file__)
    i64, i32 = ctypes.c_int64, ctypes.c_int
    lib.fa_masked_softmax.argtypes = [i32, View4, View4, i64, i64, i64, i64, ctypes.c_double,
                                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, i32, i32]
    lib.fa_apply_sequence_mask.argtypes = [i32, View4, View4, i64, i64, i64, i64,
                                           ctypes.c_void_p, i32, i32]
    lib.fa_split_heads.argtypes = [i32, View4, ctypes.c_void_p, i64, i64, i64, i64, i32]
    lib.fa_merge_heads.argtypes = [i32, View4, ctypes.c_void_p, i64, i64, i64, i64, i32]
    lib.fa_position_encoding.argtypes = [i32, ctypes.c_void_p, i64, i64, i64, ctypes.c_void_p, i32]
    lib.fa_add_position_encoding.argtypes = [i32, View4, View4, i64, i64, i64, ctypes.c_void_p, i32]
    return lib


class PEParams(ctypes.Structure):
    _fields_ = [("layout", ctypes.c_int), ("min_timescale", ctypes.c_double),
                ("max_timescale", ctypes.c_double), ("start_index", ctypes.c_int64)]


FA_ERR_OVERFLOW = 2


@pytest.mark.parametrize("dims,strides", [
    ((2**32, 2**32, 2**32, 1), (1, 1, 1, 1)),        # element count overflows int64
    ((2**62, 4, 1, 1), (0, 0, 0, 0)),                 # likewise, with zero strides
    ((4, 4, 4, 4), (2**62, 1, 1, 1)),                 # largest offset overflows int64
    ((2, 2, 2, 2), (2**61, 0, 0, 1)),                 # offset * item size overflows
], ids=["count", "count-zero-strides", "offset", "bytes"])
def test_c_entry_points_reject_overflowing_sizes(dims, strides):
    """The C side re-checks sizes instead of trusting Python: counts and
    offsets past int64 return FA_ERR_OVERFLOW without touching memory."""
    lib = _capi()
    buf = np.zeros(64, np.float32)
    v = View4(buf.ctypes.data, (ctypes.c_int64 * 4)(*strides))
    u = View4(buf.ctypes.data, (ctypes.c_int64 * 4)(1, 1, 1, 1))
    lens = np.zeros(max(dims[0], 1) if dims[0] < 2**20 else 1, np.int64)
    pe = PEParams(0, 1.0, 1e4, 0)
    assert lib.fa_masked_softmax(0, v, u, *dims, 1.0, None, None, None, 0, 1) == FA_ERR_OVERFLOW
    assert lib.fa_masked_softmax(0, u, v, *dims, 1.0, None, None, None, 0, 1) == FA_ERR_OVERFLOW
    assert lib.fa_apply_sequence_mask(0, v, u, *dims, lens.ctypes.data, 0, 1) == FA_ERR_OVERFLOW
    assert lib.fa_split_heads(4, v, buf.ctypes.data, *dims, 1) == FA_ERR_OVERFLOW
    assert lib.fa_merge_heads(4, v, buf.ctypes.data, *dims, 1) == FA_ERR_OVERFLOW
    # (B, L, C) = the first three dims; its view uses the first three strides
    assert lib.fa_add_position_encoding(0, v, u, *dims[:3], ctypes.byref(pe), 1) \
        == FA_ERR_OVERFLOW
    assert lib.fa_position_encoding(0, buf.ctypes.data, 2**62, 4, 4, ctypes.byref(pe), 1) \
        == FA_ERR_OVERFLOW
    assert (buf == 0).all()


# ---- RSS and malloc'd bytes flat over many calls -------------------------------------

MEMORY_CALLS = int(os.environ.get("FASTATTN_MEMORY_CALLS", "100000"))


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]


def _malloc_in_use():
    """Bytes the C allocator has handed out and not freed (glibc), or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        f = libc.mallinfo2
    except (OSError, AttributeError, TypeError):
        return None
    f.restype = MallInfo2
    info = f()
    return info.uordblks + info.hblkhd


def _rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.no_sanitizer
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
@pytest.mark.parametrize("name", sorted(S.SMALL_CALLS))
def test_memory_flat_over_many_calls(name):
    """RSS within 4 MiB and malloc'd bytes within 64 KiB over MEMORY_CALLS
    calls (a leak of a few bytes per call shows in the second)."""
    call = S.SMALL_CALLS[name]
    kw = {"num_threads": 2} if name in S.THREADED else {}
    for _ in range(2000):
        call(**kw)
    gc.collect()
    rss0, heap0 = _rss(), _malloc_in_use()
    for _ in range(MEMORY_CALLS):
        call(**kw)
    gc.collect()
    rss1, heap1 = _rss(), _malloc_in_use()
    assert rss1 - rss0 < 4 * 2**20, f"{name}: RSS grew {(rss1 - rss0) / 2**20:.2f} MiB"
    if heap0 is not None:
        assert heap1 - heap0 < 64 * 2**10, f"{name}: malloc'd bytes grew {heap1 - heap0}"
