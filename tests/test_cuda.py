"""Tests of the GPU path: the public API on CUDA arrays (fastattn._backend.cuda).

Every test calls the public functions and classes (``fastattn.cuda.X`` is
``fastattn.X``), so the shared front end (dispatch, validation, output
handling) runs in each. Three layers, so that as much as possible runs
without a GPU:

* CPU-only: importing fastattn.cuda imports neither CuPy nor the extension;
  is_available() answers False cleanly here; bad arguments raise the CPU
  API's errors before anything touches a GPU (inputs are fake
  ``__cuda_array_interface__`` objects that are never dereferenced).
* ``emulated`` backend: the same oracle tests as on the GPU, but with a
  stand-in for CuPy (host memory) and a stand-in for fastattn._cuda that
  implements the C ABI of csrc/cuda/fastattn_cuda.h in NumPy. This checks
  the Python layer (views, strides, broadcasting, GQA layout, key extents,
  out= handling) against the oracle; it does NOT run the CUDA kernels.
* ``gpu`` backend: the real extension on a real device, compared with
  fastattn.reference on the host (float32 <= 1e-5, float64 <= 1e-12
  relative, as for the CPU kernels). Skipped, with the reason, where
  fastattn.cuda.is_available() is False.

fastattn.reference has no scaled_dot_product_attention, apply_rotary or
multi-head layer on this branch yet, so small private float64 oracles for
them live here (_sdpa_oracle, _rope_oracle, _mha_oracle).
"""

import copy
import ctypes
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import fastattn
import fastattn._backend.cuda as fbk
import fastattn.cuda as fcuda
from fastattn import _kernels, reference

from conftest import assert_close

GPU_OK = fcuda.is_available()
GPU_REASON = fcuda.unavailable_reason()


# ---- private float64 oracles -----------------------------------------------------


def _sdpa_oracle(q, k, v, *, attn_mask=None, key_lengths=None, query_lengths=None, is_causal=False,
                 causal_alignment="top_left", scale=None, alibi_slopes=None):
    """Float64 SDPA from reference.masked_softmax; returns (out, weights)."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    three_d = q.ndim == 3
    if three_d:
        q, k, v = q[:, None], k[:, None], v[:, None]
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    group = H // Hkv
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = np.einsum("bhid,bhjd->bhij", q, k) * scale
    mask = attn_mask
    if three_d and mask is not None:
        mask = np.asarray(mask)[..., None, :, :] if np.ndim(mask) >= 3 else mask
    if alibi_slopes is not None:
        offset = 0 if causal_alignment == "top_left" else Lk - Lq
        i = np.arange(Lq)[:, None] + offset
        j = np.arange(Lk)[None, :]
        s = s - np.asarray(alibi_slopes, dtype=np.float64)[:, None, None] * (i - j)
    kl = key_lengths
    ql = query_lengths
    if mask is not None and np.asarray(mask).dtype != bool:
        s = s + np.asarray(mask, dtype=np.float64)
        mask = None
    p = reference.masked_softmax(s, attn_mask=mask, key_lengths=kl, query_lengths=ql, is_causal=is_causal,
                                 causal_alignment=causal_alignment)
    # keys with probability exactly 0 are never read (V may hold NaN there)
    out = np.where(p[..., None] != 0, p[..., None] * v[:, :, None, :, :], 0.0).sum(axis=-2)
    if query_lengths is not None:
        qlg = reference._lengths_grid(query_lengths, (B, H))
        out = np.where(np.arange(Lq)[:, None] >= qlg[..., None, None], 0.0, out)
    if three_d:
        return out[:, 0], p[:, 0]
    return out, p


def _rope_oracle(x, positions, layout="neox", base=10000.0):
    x = np.asarray(x, dtype=np.float64)
    D = x.shape[-1]
    half = D // 2
    inv = base ** (-2.0 * np.arange(half) / D)
    pos = np.broadcast_to(np.asarray(positions), x.shape[:-1]).astype(np.float64)
    angle = pos[..., None] * inv
    c, s = np.cos(angle), np.sin(angle)
    if layout == "neox":
        a, b = x[..., :half], x[..., half:]
        return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)
    a, b = x[..., 0::2], x[..., 1::2]
    y = np.empty_like(x)
    y[..., 0::2] = a * c - b * s
    y[..., 1::2] = b * c + a * s
    return y


def _cpu_layer(rng, E, H, Hkv=None, D=None, kdim=None, vdim=None, bias=True, rope=None, dtype=np.float64):
    """A CPU fastattn.MultiHeadAttention with random weights (and biases)."""
    Hkv = Hkv or H
    D = D or E // H
    kdim, vdim = kdim or E, vdim or E
    mk = lambda *shape: (rng.standard_normal(shape) / math.sqrt(shape[0])).astype(dtype)  # noqa: E731
    ws = (mk(E, H * D), mk(kdim, Hkv * D), mk(vdim, Hkv * D), mk(H * D, E))
    bs = tuple(rng.standard_normal(n).astype(dtype) for n in (H * D, Hkv * D, Hkv * D, E)) if bias else ()
    return fastattn.MultiHeadAttention.from_weights(*ws, *bs, num_heads=H, num_kv_heads=Hkv, rope=rope)


def _twin(cpu):
    """A copy of the CPU layer ``cpu``, moved to the GPU."""
    st = cpu.state_dict()
    return fastattn.MultiHeadAttention.from_weights(
        *(st[n] for n in ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o")),
        num_heads=cpu.num_heads, num_kv_heads=cpu.num_kv_heads, rope=cpu.rope,
        rope_base=cpu.rope_base).to("cuda")


def _mha_oracle(layer, query, key=None, value=None, *, key_lengths=None, query_lengths=None,
                attn_mask=None, is_causal=False):
    st = {n: np.asarray(w, dtype=np.float64) for n, w in layer.state_dict().items() if w is not None}
    H, Hkv = layer.num_heads, layer.num_kv_heads
    query = np.asarray(query, dtype=np.float64)
    key = query if key is None else np.asarray(key, dtype=np.float64)
    value = query if value is None else np.asarray(value, dtype=np.float64)
    B, Lq, _ = query.shape
    Lk = key.shape[1]

    def proj(x, w, b):
        y = x @ st[w]
        return y + st[b] if b in st else y

    q = proj(query, "w_q", "b_q").reshape(B, Lq, H, -1).transpose(0, 2, 1, 3)
    k = proj(key, "w_k", "b_k").reshape(B, Lk, Hkv, -1).transpose(0, 2, 1, 3)
    v = proj(value, "w_v", "b_v").reshape(B, Lk, Hkv, -1).transpose(0, 2, 1, 3)
    if layer.rope:
        q = _rope_oracle(q, np.arange(Lq), layer.rope, layer.rope_base)
        k = _rope_oracle(k, np.arange(Lk), layer.rope, layer.rope_base)
    out, p = _sdpa_oracle(q, k, v, attn_mask=attn_mask, key_lengths=key_lengths, query_lengths=query_lengths,
                          is_causal=is_causal)
    y = proj(out.transpose(0, 2, 1, 3).reshape(B, Lq, -1), "w_o", "b_o")
    if query_lengths is not None:
        ql = np.asarray(query_lengths).reshape(B)
        y = np.where(np.arange(Lq)[None, :, None] >= ql[:, None, None], 0.0, y)
    return y, p


# ---- CPU-only behaviour ------------------------------------------------------------


def test_import_does_not_load_cupy_or_extension():
    code = ("import sys, numpy as np, fastattn, fastattn.cuda; "
            "x = np.ones((1, 1, 2, 4), np.float32); "
            "fastattn.scaled_dot_product_attention(x, x, x, key_lengths=[1]); "
            "fastattn.MultiHeadAttention(8, 2)(np.ones((1, 2, 8))); "
            "print('cupy' in sys.modules, 'fastattn._cuda' in sys.modules, "
            "'fastattn._backend.cuda' in sys.modules, 'array_api_compat' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"] * 4


def test_mixed_devices_name_both_libraries():
    """Host and CUDA arrays in one call: a TypeError naming both libraries,
    from every public function, before any device work."""
    host, dev = np.zeros((1, 2, 3, 4), np.float32), FakeCai((1, 2, 3, 4))
    calls = [
        lambda: fastattn.scaled_dot_product_attention(dev, host, host),
        lambda: fastattn.scaled_dot_product_attention(host, host, dev),
        lambda: fastattn.MultiHeadAttention(8, 2)(FakeCai((1, 3, 8)), np.zeros((1, 3, 8)), np.zeros((1, 3, 8))),
    ]
    for call in calls:
        with pytest.raises(TypeError, match=r"arrays from different devices: \w+ is a (CUDA|host) \w+ array "
                                            r"and \w+ is a (CUDA|host) \w+ array"):
            call()
    with pytest.raises(TypeError, match="q is a CUDA test_cuda array and v is a host numpy array"):
        fastattn.scaled_dot_product_attention(dev, dev, host)
    with pytest.raises(TypeError, match="no CUDA kernel"):
        fastattn.apply_sequence_mask(dev, [1])


def test_mixed_torch_cpu_and_cuda_names_torch():
    torch = pytest.importorskip("torch")
    from fastattn import _backend
    t = torch.zeros(2)
    assert _backend.library_name(t) == "torch"
    assert _backend.library_name(np.zeros(2)) == "numpy"
    assert _backend.device_of(t, np.zeros(2)) == "cpu"  # host arrays of any library run on the CPU


def test_is_available_never_raises():
    ok = fcuda.is_available()
    assert isinstance(ok, bool)
    if ok:
        assert fcuda.unavailable_reason() is None
    else:
        reason = fcuda.unavailable_reason()
        assert isinstance(reason, str) and reason


class FakeCai:
    """A device-array lookalike for validation tests: never dereferenced."""

    def __init__(self, shape, dtype=np.float32, strides=None, ptr=0x7000_0000):
        dtype = np.dtype(dtype)
        self.__cuda_array_interface__ = {
            "shape": tuple(shape), "typestr": dtype.str, "data": (ptr, False), "version": 3,
            "strides": None if strides is None else tuple(s * dtype.itemsize for s in strides),
        }


def _unavailable_or_skip():
    if GPU_OK:
        pytest.skip("a GPU is available: the unavailable path cannot be observed")


def test_unavailable_raises_clear_error_after_validation():
    _unavailable_or_skip()
    with pytest.raises(fcuda.CudaUnavailableError, match="not available"):
        fcuda.masked_softmax(FakeCai((2, 3, 4)))
    with pytest.raises(fcuda.CudaUnavailableError):
        fcuda.sinusoidal_position_encoding(4, 8, device="cuda")
    with pytest.raises(fcuda.CudaUnavailableError):
        fastattn.MultiHeadAttention(8, 2).to("cuda")
    with pytest.raises(fcuda.CudaUnavailableError):
        fastattn.KVCache(2, 4, 2, 8, device="cuda")


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: fastattn.scaled_dot_product_attention(np.zeros((1, 2, 3)), FakeCai((1, 2, 3)), FakeCai((1, 2, 3))),
         TypeError, "q is a host numpy array and k is a CUDA"),
        (lambda: fcuda.masked_softmax(FakeCai((4,))), ValueError, "at least 2 dimensions"),
        (lambda: fcuda.masked_softmax(FakeCai((2, 3), np.complex64)), TypeError, "unsupported dtype"),
        (lambda: fcuda.masked_softmax(FakeCai((2, 3, 4)), key_lengths=[1, 5]), ValueError, "key_lengths must be <="),
        (lambda: fcuda.masked_softmax(FakeCai((2, 3, 4)), key_lengths=[1, 2, 3]), ValueError,
         "key_lengths must have shape"),
        (lambda: fcuda.masked_softmax(FakeCai((2, 3, 4)), query_lengths=[-1, 2]), ValueError, "non-negative"),
        (lambda: fcuda.masked_softmax(FakeCai((2, 3, 4)), key_lengths=[1.0, 2.0]), TypeError, "integers"),
        (lambda: fcuda.masked_softmax(FakeCai((2, 3, 4)), attn_mask=np.ones((5, 4), bool)), ValueError,
         "does not broadcast"),
        (lambda: fcuda.masked_softmax(FakeCai((2, 3, 4)), attn_mask=FakeCai((2, 1, 5), np.bool_)), ValueError,
         "does not broadcast"),
        (lambda: fcuda.masked_softmax(FakeCai((2, 3, 4)), is_causal=True, causal_alignment="diag"), ValueError,
         "causal_alignment"),
        (lambda: fcuda.masked_softmax(FakeCai((2, 3, 4)), scale="2"), TypeError, "scale"),
        (lambda: fcuda.split_heads(FakeCai((2, 3, 10)), 3), ValueError, "does not divide"),
        (lambda: fcuda.split_heads(FakeCai((2, 3, 10)), 0), ValueError, "positive"),
        (lambda: fcuda.split_heads(FakeCai((3, 10)), 2), ValueError, "3-D"),
        (lambda: fcuda.merge_heads(FakeCai((2, 3, 10))), ValueError, "4-D"),
        (lambda: fcuda.sinusoidal_position_encoding(-1, 4, device="cuda"), ValueError, "length"),
        (lambda: fcuda.sinusoidal_position_encoding(3, 0, device="cuda"), ValueError, "channels"),
        (lambda: fcuda.sinusoidal_position_encoding(3, 4, layout="sideways", device="cuda"), ValueError, "layout"),
        (lambda: fcuda.sinusoidal_position_encoding(3, 4, dtype=np.int32, device="cuda"), TypeError, "dtype"),
        (lambda: fcuda.sinusoidal_position_encoding(3, 4, max_timescale=-1.0, device="cuda"), ValueError, "max_timescale"),
        (lambda: fcuda.add_position_encoding(FakeCai((3, 0))), ValueError, "channel"),
        (lambda: fcuda.apply_rotary(FakeCai((2, 4, 5)), np.arange(4)), ValueError, "even"),
        (lambda: fcuda.apply_rotary(FakeCai((2, 4, 6)), np.arange(5)), ValueError, "broadcast"),
        (lambda: fcuda.apply_rotary(FakeCai((2, 4, 6)), np.arange(4.0)), TypeError, "integers"),
        (lambda: fcuda.apply_rotary(FakeCai((2, 4, 6)), np.arange(4), layout="llama"), ValueError, "layout"),
        (lambda: fcuda.scaled_dot_product_attention(FakeCai((2, 4, 3, 8)), FakeCai((2, 3, 5, 8)), FakeCai((2, 3, 5, 8))),
         ValueError, "multiple of the kv heads"),
        (lambda: fcuda.scaled_dot_product_attention(FakeCai((2, 4, 3, 8)), FakeCai((2, 2, 5, 7)), FakeCai((2, 2, 5, 8))),
         ValueError, r"head dim; got q \(2, 4, 3, 8\), k \(2, 2, 5, 7\)"),
        (lambda: fcuda.scaled_dot_product_attention(FakeCai((2, 4, 3, 8)), FakeCai((2, 2, 5, 8)), FakeCai((2, 2, 6, 8))),
         ValueError, "same heads and length"),
        (lambda: fcuda.scaled_dot_product_attention(FakeCai((2, 3, 8)), FakeCai((2, 2, 5, 8)), FakeCai((2, 2, 5, 8))),
         ValueError, "must all be 4-D"),
        (lambda: fcuda.scaled_dot_product_attention(FakeCai((2, 4, 3, 8)), FakeCai((3, 2, 5, 8)), FakeCai((3, 2, 5, 8))),
         ValueError, "same batch size"),
        (lambda: fcuda.scaled_dot_product_attention(FakeCai((2, 4, 3, 8)), FakeCai((2, 2, 5, 8)), FakeCai((2, 2, 5, 8)),
                                                    alibi_slopes=np.ones(3)), ValueError, "alibi_slopes must have shape"),
        (lambda: fcuda.scaled_dot_product_attention(FakeCai((2, 4, 3, 8)), FakeCai((2, 2, 5, 8)), FakeCai((2, 2, 5, 8)),
                                                    key_lengths=[6, 1]), ValueError, "key_lengths must be <="),
        (lambda: fastattn.MultiHeadAttention(8, 2).to("gpu"), ValueError, r"device must be one of \['cpu', 'cuda'\]"),
        (lambda: fastattn.MultiHeadAttention(8, 2)(FakeCai((2, 3, 8))), TypeError,
         r"the layer's weights are on 'cpu' but its inputs on 'cuda': move the layer with layer.to\('cuda'\)"),
        (lambda: fcuda.KVCache(2, 4, 0, 8, device="cuda"), ValueError, "num_kv_heads must be >= 1, got 0"),
        (lambda: fcuda.KVCache(2, -1, 2, 8, device="cuda"), ValueError, "batch_size and max_len must be non-negative"),
        (lambda: fcuda.KVCache(2, 4, 2, 8, dtype=np.int8, device="cuda"), TypeError, "dtype must be float32, float64, bfloat16 or float16"),
        (lambda: fcuda.KVCache(2, 4, 2, 8, v_head_dim=0, device="cuda"), ValueError, "v_head_dim must be >= 1, got 0"),
        (lambda: fcuda.KVCache(2.0, 4, 2, 8, device="cuda"), TypeError, "batch_size must be an integer"),
        (lambda: fcuda.KVCache(2, 4, 2, 8).to("tpu"), ValueError, "device must be one of"),
    ],
)
def test_validation_before_gpu(call, exc, match):
    """The CPU API's checks, run before any device work (no GPU needed)."""
    with pytest.raises(exc, match=match):
        call()


def test_validation_messages_match_cpu_api():
    x = np.zeros((2, 3, 4), np.float32)
    for kwargs in ({"key_lengths": [1, 5]}, {"attn_mask": np.ones((5, 4), bool)}, {"query_lengths": [[1, 2]]}):
        with pytest.raises(ValueError) as cpu:
            fastattn.masked_softmax(x, **kwargs)
        with pytest.raises(ValueError) as gpu:
            fcuda.masked_softmax(FakeCai(x.shape), **kwargs)
        assert str(cpu.value) == str(gpu.value)


def test_non_native_byte_order_rejected():
    with pytest.raises(TypeError, match="byte order"):
        fcuda.masked_softmax(FakeCai((2, 3), np.dtype(">f4")))


# ---- host emulation of CuPy and of the C ABI ------------------------------------------


def _host_view(ptr, dtype, shape, strides):
    """NumPy view of host memory at ptr with element strides (maybe negative)."""
    dtype = np.dtype(dtype)
    shape = tuple(int(n) for n in shape)
    strides = tuple(int(s) for s in strides[: len(shape)])
    if math.prod(shape) == 0:
        return np.empty(shape, dtype)
    lo = sum(s * (n - 1) for n, s in zip(shape, strides) if s < 0)
    hi = sum(s * (n - 1) for n, s in zip(shape, strides) if s > 0)
    nbytes = (hi - lo + 1) * dtype.itemsize
    buf = (ctypes.c_char * nbytes).from_address(ptr + lo * dtype.itemsize)
    return np.ndarray(shape, dtype, buffer=buf, offset=-lo * dtype.itemsize,
                      strides=tuple(s * dtype.itemsize for s in strides))


class FakeNdarray:
    """CuPy stand-in: a host array with CuPy's attributes."""

    def __init__(self, a):
        self.a = a
        self.data = types.SimpleNamespace(ptr=a.__array_interface__["data"][0])
        self.device = types.SimpleNamespace(id=0)

    shape = property(lambda self: self.a.shape)
    strides = property(lambda self: self.a.strides)
    dtype = property(lambda self: self.a.dtype)

    def reshape(self, *shape):
        return FakeNdarray(self.a.reshape(*shape))

    def __getitem__(self, item):
        return FakeNdarray(self.a[item])


def _fake_cupy():
    cp = types.ModuleType("cupy")
    cp.ndarray = FakeNdarray
    cp.empty = lambda shape, dtype=np.float64: FakeNdarray(np.full(shape, np.nan, dtype=dtype)
                                                           if np.dtype(dtype).kind == "f" else np.empty(shape, dtype))
    cp.asarray = lambda x, dtype=None: x if isinstance(x, FakeNdarray) else FakeNdarray(np.array(x, dtype=dtype))
    cp.asnumpy = lambda x: x.a.copy()
    cp.cuda = types.SimpleNamespace(Device=lambda *a: types.SimpleNamespace(id=0),
                                    get_current_stream=lambda: types.SimpleNamespace(ptr=0))
    return cp


class FakeExtension:
    """fastattn._cuda stand-in implementing the ABI contract of
    csrc/cuda/fastattn_cuda.h on host memory with the NumPy oracle."""

    CudaError = RuntimeError
    # fa_cuda_dtype (csrc/cuda/fastattn_cuda.h); the shared values are also
    # checked against the compiled header by tests/test_enums.py
    DTYPE_CODES = {"float32": 0, "float64": 1, "float16": 2, "bool": 3, "int8": 4, "uint8": 5,
                   "int16": 6, "uint16": 7, "int32": 8, "uint32": 9, "int64": 10, "uint64": 11}
    CAUSAL_LENGTHS = 3

    class BlasHandle:
        ptr = 1

    def __init__(self):
        self.calls = []

    def device_count(self):
        return 1

    def set_device(self, device):
        pass

    def pointer_device(self, ptr):
        return 0

    def stream_wait(self, consumer, producer):
        pass

    def copy(self, dst_dtype, src_dtype, src, sstr, dst, dstr, shape, stream):
        self.calls.append("copy")
        s = _host_view(src, _CODE_DTYPES[src_dtype], shape, sstr)
        _host_view(dst, _CODE_DTYPES[dst_dtype], shape, dstr)[...] = s.astype(_CODE_DTYPES[dst_dtype])

    def append_rows(self, dtype, src, sstr, dst, dstr, shape, dst_len, dst_row, rows, stream):
        self.calls.append("append_rows")
        B, M, L, C = shape
        if B * M * L * C == 0 or dst_len == 0:
            return
        dt = _CODE_DTYPES[dtype]
        s = _host_view(src, dt, shape, sstr)
        d = _host_view(dst, dt, (B, M, dst_len, C), dstr)
        to = _host_view(dst_row, np.int64, (B,), (1,))
        n = _host_view(rows, np.int64, (B,), (1,))
        for b in range(B):
            for i in range(min(int(n[b]), L)):
                if 0 <= to[b] + i < dst_len:  # the kernel skips rows outside the cache
                    d[b, :, to[b] + i] = s[b, :, i]

    def zero_padded_rows(self, dtype, y, shape, lengths, lstr, stream):
        B, M, L, C = shape
        yv = _host_view(y, _CODE_DTYPES[dtype], shape, fbk._c_strides(shape))
        lv = _host_view(lengths, np.int64, (B, M), lstr)
        yv[np.arange(L)[None, None, :] >= lv[:, :, None]] = 0.0

    def _mask(self, dtype, shape, mask, kind, mstr):
        if kind == 1:
            return _host_view(mask, np.uint8, shape, mstr) != 0
        if kind == 2:
            return _host_view(mask, _CODE_DTYPES[dtype], shape, mstr)
        return None

    @staticmethod
    def _softmax(s, m, kl_v, ql_v, causal, scale=1.0):
        """reference.masked_softmax with the C causal codes: 1 top-left, 2
        bottom-right, 3 bottom-right per (b, m) aligned to the lengths (key
        j > i + key_len - query_len is masked)."""
        if causal == FakeExtension.CAUSAL_LENGTHS:
            B, M, Lq, Lk = s.shape
            klg = np.full((B, M), Lk) if kl_v is None else kl_v
            qlg = np.full((B, M), Lq) if ql_v is None else ql_v
            keep = (np.arange(Lk)[None, None, None, :]
                    <= np.arange(Lq)[None, None, :, None] + (klg - qlg)[:, :, None, None])
            m = keep if m is None else keep & m
        align = {c: n for n, c in _kernels.CAUSAL_ALIGNMENTS.items()}.get(causal, "top_left")
        return reference.masked_softmax(s, attn_mask=m, key_lengths=kl_v, query_lengths=ql_v,
                                        is_causal=causal in (1, 2), causal_alignment=align, scale=scale)

    def masked_softmax(self, dtype, x, xs, y, ys, shape, scale, mask, kind, mstr, kl, kls, ql, qls, causal, stream):
        self.calls.append("masked_softmax")
        assert causal in (0, 1, 2, 3), causal  # the C side rejects any other code
        dt = _CODE_DTYPES[dtype]
        B, M = shape[:2]
        xv = _host_view(x, dt, shape, xs).copy()
        kl_v = _host_view(kl, np.int64, (B, M), kls) if kl else None
        ql_v = _host_view(ql, np.int64, (B, M), qls) if ql else None
        _host_view(y, dt, shape, ys)[...] = self._softmax(xv, self._mask(dtype, shape, mask, kind, mstr), kl_v, ql_v,
                                                          causal, scale)

    def position_encoding(self, dtype, out, rs, L, C, layout, lo, hi, start, stream):
        dt = _CODE_DTYPES[dtype]
        name = _LAYOUT_NAMES["pe"][layout]
        _host_view(out, dt, (L, C), (rs, 1))[...] = reference.sinusoidal_position_encoding(
            L, C, layout=name, min_timescale=lo, max_timescale=hi, start_index=start, dtype=dt)

    def add_position_encoding(self, dtype, x, xs, y, ys, shape, layout, lo, hi, start, stream):
        dt = _CODE_DTYPES[dtype]
        name = _LAYOUT_NAMES["pe"][layout]
        xv = _host_view(x, dt, shape, xs).copy()
        _host_view(y, dt, shape, ys)[...] = reference.add_position_encoding(
            xv, layout=name, min_timescale=lo, max_timescale=hi, start_index=start)

    def apply_rotary(self, dtype, x, xs, y, ys, shape, pos, ps, layout, base, stream):
        dt = _CODE_DTYPES[dtype]
        xv = _host_view(x, dt, shape, xs).copy()
        pv = _host_view(pos, np.int64, shape[:3], ps)
        _host_view(y, dt, shape, ys)[...] = _rope_oracle(xv, pv, _LAYOUT_NAMES["rope"][layout], base)

    def linear(self, handle, dtype, x, xrs, w, wrs, bias, y, yrs, rows, nin, nout, stream):
        dt = _CODE_DTYPES[dtype]
        xv = _host_view(x, dt, (rows, nin), (xrs, 1)).astype(np.float64)
        wv = _host_view(w, dt, (nin, nout), (wrs, 1)).astype(np.float64)
        r = xv @ wv
        if bias:
            r = r + _host_view(bias, dt, (nout,), (1,))
        _host_view(y, dt, (rows, nout), (yrs, 1))[...] = r

    def sdpa(self, handle, q, k, v, out, *, dtype, shape, scale, causal, mask=None, mask_kind=0,
             mask_strides=(), key_len=None, key_len_strides=(), query_len=None, query_len_strides=(),
             alibi_slopes=None, alibi_offset=0, key_extent=None, scores, scores_batch, stream):
        """The C driver's algorithm: per (b, kv head) one folded GEMM over
        the G query heads, keys limited to key_extent[b]."""
        self.calls.append("sdpa")
        dt = _CODE_DTYPES[dtype]
        B, H, Hkv, Lq, Lk, D, Dv = shape
        G = H // Hkv
        qv = _host_view(q, dt, (B, H, Lq, D), fbk._c_strides((B, H, Lq, D))).astype(np.float64)
        kv = _host_view(k, dt, (B, Hkv, Lk, D), fbk._c_strides((B, Hkv, Lk, D))).astype(np.float64)
        vv = _host_view(v, dt, (B, Hkv, Lk, Dv), fbk._c_strides((B, Hkv, Lk, Dv))).astype(np.float64)
        ov = _host_view(out, dt, (B, H, Lq, Dv), fbk._c_strides((B, H, Lq, Dv)))
        s = np.zeros((B, H, Lq, Lk))
        for b in range(B):
            ext = Lk if key_extent is None else int(key_extent[b])
            for g in range(Hkv):
                qg = qv[b, g * G:(g + 1) * G].reshape(G * Lq, D)
                s[b, g * G:(g + 1) * G, :, :ext] = (qg @ kv[b, g, :ext].T * scale).reshape(G, Lq, ext)
        if alibi_slopes:
            slopes = _host_view(alibi_slopes, dt, (H,), (1,)).astype(np.float64)
            i = np.arange(Lq)[:, None] + alibi_offset
            s = s - slopes[:, None, None] * (i - np.arange(Lk)[None, :])
        m = self._mask(dtype, (B, H, Lq, Lk), mask, mask_kind, mask_strides)
        if m is not None and m.dtype != bool:
            s = s + m
            m = None
        kl_v = _host_view(key_len, np.int64, (B, H), key_len_strides) if key_len else None
        ql_v = _host_view(query_len, np.int64, (B, H), query_len_strides) if query_len else None
        p = self._softmax(s, m, kl_v, ql_v, causal)
        for b in range(B):
            ext = Lk if key_extent is None else int(key_extent[b])
            assert not p[b, ..., ext:].any(), "key_extent cut off attended keys"
            for g in range(Hkv):
                pg = p[b, g * G:(g + 1) * G].reshape(G * Lq, Lk)[:, :ext]
                ov[b, g * G:(g + 1) * G] = (pg @ vv[b, g, :ext]).reshape(G, Lq, Dv)
        if ql_v is not None:
            ov[np.arange(Lq)[None, None, :, None] >= ql_v[:, :, None, None] + np.zeros((1, 1, 1, Dv), int)] = 0
        if scores_batch == B:
            _host_view(scores, dt, (B, H, Lq, Lk), fbk._c_strides((B, H, Lq, Lk)))[...] = p


_CODE_DTYPES = {code: np.dtype(name) for name, code in FakeExtension.DTYPE_CODES.items()}
# the layout codes as compiled from csrc/fastattn.h, by code
_LAYOUT_NAMES = {"pe": {c: n for n, c in _kernels.PE_LAYOUTS.items()},
                 "rope": {c: n for n, c in _kernels.ROPE_LAYOUTS.items()}}


class Backend:
    def __init__(self, name, cp):
        self.name, self.cp = name, cp

    def to_device(self, a):
        return self.cp.asarray(a)

    def to_host(self, a):
        return self.cp.asnumpy(a)


@pytest.fixture(params=["emulated", "gpu"])
def backend(request, monkeypatch):
    if request.param == "gpu":
        if not GPU_OK:
            pytest.skip(f"no GPU path here: {GPU_REASON}")
        import cupy

        return Backend("gpu", cupy)
    cp = _fake_cupy()
    ext = FakeExtension()
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setattr(fbk, "_extension", lambda: ext)
    monkeypatch.setattr(fbk, "_probe_result", (True, None))
    monkeypatch.setattr(fbk, "_local", type(fbk._local)())
    monkeypatch.setattr(fbk, "_DTYPE_CODES", fbk._DtypeCodes())
    b = Backend("emulated", cp)
    b.ext = ext
    return b


@pytest.fixture(params=[np.float32, np.float64], ids=["f32", "f64"])
def dt(request):
    return np.dtype(request.param)


def _rand(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


# ---- oracle comparisons (emulated always; gpu where available) -----------------------------


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 3, 5, 33), (2, 2, 3, 4, 9)])
def test_masked_softmax_plain(backend, dt, rng, shape):
    x = _rand(rng, shape, dt)
    got = fcuda.masked_softmax(backend.to_device(x), scale=0.7)
    assert_close(backend.to_host(got), reference.masked_softmax(x, scale=0.7), dt)


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "bool_device"])
def test_masked_softmax_masks(backend, dt, rng, alignment, mask_kind):
    B, H, Lq, Lk = 3, 2, 5, 7
    x = _rand(rng, (B, H, Lq, Lk), dt)
    mask = None
    if mask_kind in ("bool", "bool_device"):
        mask = rng.random((1, H, Lq, Lk)) > 0.3
        mask[0, 0, 1] = False  # a fully masked row
    elif mask_kind == "float":
        mask = np.where(rng.random((Lq, Lk)) > 0.3, rng.standard_normal((Lq, Lk)), -np.inf).astype(dt)
    kw = dict(attn_mask=mask, key_lengths=np.array([7, 0, 3]), query_lengths=rng.integers(0, Lq + 1, (B, H)),
              is_causal=True, causal_alignment=alignment, scale=1.3)
    ref = reference.masked_softmax(x, **kw)
    if mask_kind == "bool_device":
        kw["attn_mask"] = backend.to_device(mask)
    got = backend.to_host(fcuda.masked_softmax(backend.to_device(x), **kw))
    assert_close(got, ref, dt)
    assert not np.isnan(got).any()


def test_masked_softmax_strided_inplace_and_out(backend, dt, rng):
    base = _rand(rng, (4, 6, 10), dt)
    dev = backend.to_device(base)
    view = dev[:, ::2, ::-1]  # strided, reversed keys
    ref = reference.masked_softmax(base[:, ::2, ::-1], key_lengths=[1, 2, 3, 4])
    got = fcuda.masked_softmax(view, key_lengths=[1, 2, 3, 4])
    assert_close(backend.to_host(got), ref, dt)
    # in place on a contiguous array
    x = backend.to_device(base.copy())
    res = fcuda.masked_softmax(x, out=x, query_lengths=[6, 5, 0, 1])
    assert res is x
    assert_close(backend.to_host(x), reference.masked_softmax(base, query_lengths=[6, 5, 0, 1]), dt)


def test_masked_softmax_nan_and_inf(backend, rng):
    x = rng.standard_normal((3, 6))
    x[0, 2] = np.nan
    x[1, :] = -np.inf
    got = backend.to_host(fcuda.masked_softmax(backend.to_device(x)))
    ref = reference.masked_softmax(x)
    assert np.isnan(got[0]).all() and np.isnan(ref[0]).all()
    assert (got[1] == 0).all()
    assert_close(got[2], ref[2], np.float64)


@pytest.mark.parametrize("src_dtype", [np.float16, np.int32, np.bool_])
def test_masked_softmax_promotes_like_cpu(backend, rng, src_dtype):
    x = (rng.standard_normal((2, 5)) * 3).astype(src_dtype)
    got = backend.to_host(fcuda.masked_softmax(backend.to_device(x)))
    # float16 computes in float32 on the GPU, with a float32 result (there
    # are no 16-bit CUDA kernels; the CPU keeps float16, docs/dtypes.md)
    ref = reference.masked_softmax(x.astype(np.float32) if src_dtype is np.float16 else x)
    assert got.dtype == ref.dtype
    assert_close(got, ref)


def test_split_merge_heads(backend, dt, rng):
    x = _rand(rng, (2, 5, 12), dt)
    d = backend.to_device(x)
    s = fcuda.split_heads(d, 3)
    assert_close(backend.to_host(s), reference.split_heads(x, 3), dt)
    m = fcuda.merge_heads(s)
    assert (backend.to_host(m) == x).all()
    # strided input and an out= array
    xs = x[:, ::-1, :]
    out = backend.to_device(np.zeros((2, 4, 5, 3), dt))
    r = fcuda.split_heads(backend.to_device(x)[:, ::-1, :], 4, out=out)
    assert r is out
    assert (backend.to_host(out) == reference.split_heads(xs, 4)).all()
    h = _rand(rng, (2, 3, 4, 6), dt)
    assert (backend.to_host(fcuda.merge_heads(backend.to_device(h)[:, :, ::2])) ==
            reference.merge_heads(h[:, :, ::2])).all()


@pytest.mark.parametrize("layout", ["concat", "interleaved"])
@pytest.mark.parametrize("channels", [1, 7, 64])
def test_position_encoding(backend, dt, layout, channels):
    got = fcuda.sinusoidal_position_encoding(9, channels, layout=layout, start_index=3, dtype=dt, device="cuda")
    ref = reference.sinusoidal_position_encoding(9, channels, layout=layout, start_index=3, dtype=dt)
    assert_close(backend.to_host(got), ref, dt)


def test_position_encoding_long_positions(backend):
    got = backend.to_host(fcuda.sinusoidal_position_encoding(64, 32, start_index=1_000_000 - 64, device="cuda"))
    ref = reference.sinusoidal_position_encoding(64, 32, start_index=1_000_000 - 64, dtype=np.float64)
    assert np.max(np.abs(got - ref)) <= 1e-5


@pytest.mark.parametrize("layout", ["concat", "interleaved"])
def test_add_position_encoding(backend, dt, rng, layout):
    x = _rand(rng, (2, 3, 6, 11), dt)
    got = fcuda.add_position_encoding(backend.to_device(x), layout=layout, start_index=5)
    assert_close(backend.to_host(got), reference.add_position_encoding(x, layout=layout, start_index=5), dt)
    d = backend.to_device(x)
    assert fcuda.add_position_encoding(d, out=d) is d
    assert_close(backend.to_host(d), reference.add_position_encoding(x), dt)


@pytest.mark.parametrize("layout", ["neox", "gptj"])
def test_apply_rotary(backend, dt, rng, layout):
    x = _rand(rng, (2, 3, 5, 8), dt)
    pos = rng.integers(0, 4096, (2, 1, 5))
    got = fcuda.apply_rotary(backend.to_device(x), pos, layout=layout, base=500.0)
    assert_close(backend.to_host(got), _rope_oracle(x, pos, layout, 500.0).astype(dt), dt)
    d = backend.to_device(x)
    fcuda.apply_rotary(d, np.arange(5), layout=layout, out=d)
    assert_close(backend.to_host(d), _rope_oracle(x, np.arange(5), layout).astype(dt), dt)


SDPA_CASES = {
    "plain": dict(),
    "gqa_causal": dict(H=6, Hkv=2, is_causal=True),
    "mqa_bottom_right": dict(H=4, Hkv=1, Lq=3, is_causal=True, causal_alignment="bottom_right"),
    "lengths": dict(key_lengths=[9, 0], query_lengths=[4, 2]),
    "lengths_per_head": dict(H=2, Hkv=2, key_lengths=[[9, 3], [1, 5]]),
    "bool_mask": dict(mask="bool"),
    "float_mask_dv": dict(mask="float", Dv=5),
    "alibi": dict(alibi=True, causal_alignment="bottom_right", Lq=4),
    "alibi_gqa_lengths": dict(H=4, Hkv=2, alibi=True, is_causal=True, key_lengths=[5, 9]),
    "three_d": dict(ndim=3, key_lengths=[3, 9]),
}


@pytest.mark.parametrize("case", list(SDPA_CASES))
def test_scaled_dot_product_attention(backend, dt, rng, case):
    c = dict(B=2, H=4, Hkv=4, Lq=6, Lk=9, D=8, Dv=None, ndim=4)
    c.update(SDPA_CASES[case])
    B, H, Hkv, Lq, Lk, D = c["B"], c["H"], c["Hkv"], c["Lq"], c["Lk"], c["D"]
    Dv = c["Dv"] or D
    if c["ndim"] == 3:
        q, k, v = _rand(rng, (B, Lq, D), dt), _rand(rng, (B, Lk, D), dt), _rand(rng, (B, Lk, Dv), dt)
        H = 1
    else:
        q, k, v = _rand(rng, (B, H, Lq, D), dt), _rand(rng, (B, Hkv, Lk, D), dt), _rand(rng, (B, Hkv, Lk, Dv), dt)
    kw = {n: c[n] for n in ("is_causal", "causal_alignment", "key_lengths", "query_lengths") if n in c}
    if c.get("mask") == "bool":
        kw["attn_mask"] = rng.random((B, 1, Lq, Lk)) > 0.4
    elif c.get("mask") == "float":
        kw["attn_mask"] = rng.standard_normal((Lq, Lk)).astype(dt)
    if c.get("alibi"):
        kw["alibi_slopes"] = 2.0 ** -np.arange(1, H + 1)
    if "key_lengths" in kw:
        # padded keys hold garbage that must never be read
        kl = np.broadcast_to(np.asarray(kw["key_lengths"]).reshape(B, -1), (B, k.shape[1] if k.ndim == 4 else 1))
        for b in range(B):
            if np.all(kl[b] == kl[b, 0]):
                v[b, ..., kl[b, 0]:, :] = np.nan
    ref_out, ref_w = _sdpa_oracle(q, k, v, **kw)
    got, w = fcuda.scaled_dot_product_attention(backend.to_device(q), backend.to_device(k), backend.to_device(v),
                                                return_weights=True, **kw)
    assert_close(backend.to_host(got), ref_out.astype(dt), dt)
    assert_close(backend.to_host(w), ref_w.astype(dt), dt)
    plain = fcuda.scaled_dot_product_attention(backend.to_device(q), backend.to_device(k), backend.to_device(v), **kw)
    assert_close(backend.to_host(plain), ref_out.astype(dt), dt)


def test_sdpa_chunked_workspace_and_out(backend, rng, monkeypatch):
    monkeypatch.setattr(fbk, "SCORES_WORKSPACE_BYTES", 2 * 3 * 5 * 7 * 4)  # two batch items per chunk
    q, k, v = _rand(rng, (5, 3, 5, 4), np.float32), _rand(rng, (5, 3, 7, 4), np.float32), _rand(rng, (5, 3, 7, 4), np.float32)
    ref, _ = _sdpa_oracle(q, k, v, key_lengths=[7, 1, 0, 3, 5])
    out = backend.to_device(np.zeros((5, 3, 5, 4), np.float32))
    res = fcuda.scaled_dot_product_attention(backend.to_device(q), backend.to_device(k), backend.to_device(v),
                                             key_lengths=[7, 1, 0, 3, 5], out=out)
    assert res is out
    assert_close(backend.to_host(out), ref.astype(np.float32))


@pytest.mark.parametrize("config", ["self", "self_gqa_rope", "cross", "no_bias"])
def test_multi_head_attention(backend, dt, rng, config):
    E, H = 16, 4
    kw = {}
    if config == "self_gqa_rope":
        kw = dict(Hkv=2, rope="neox")
    elif config == "cross":
        kw = dict(kdim=6, vdim=10)
    elif config == "no_bias":
        kw = dict(bias=False, rope="gptj")
    layer = _cpu_layer(rng, E, H, dtype=dt, **kw)
    mha = _twin(layer)
    B, Lq, Lk = 2, 5, 7 if config == "cross" else 5
    query = _rand(rng, (B, Lq, E), dt)
    call = dict(key_lengths=[Lk, 2], query_lengths=[Lq, 3], is_causal=config != "cross")
    if config == "cross":
        key, value = _rand(rng, (B, Lk, 6), dt), _rand(rng, (B, Lk, 10), dt)
        got, w = mha(backend.to_device(query), backend.to_device(key), backend.to_device(value),
                     return_weights=True, **call)
        ref, ref_w = _mha_oracle(layer, query, key, value, **call)
    else:
        got, w = mha(backend.to_device(query), return_weights=True, **call)
        ref, ref_w = _mha_oracle(layer, query, **call)
    assert_close(backend.to_host(got), ref.astype(dt), dt)
    assert_close(backend.to_host(w), ref_w.astype(dt), dt)
    assert (backend.to_host(got)[1, 3:] == 0).all()
    if config == "cross":
        with pytest.raises(ValueError, match="self-attention needs kdim"):
            mha(backend.to_device(query))


# ---- KV-cache decoding: GPU layer vs the CPU layer vs the oracle -------------------------------


CACHE_LAYERS = {
    "mha": dict(num_heads=4),
    "gqa_neox": dict(num_heads=6, num_kv_heads=2, rope="neox"),
    "mqa_gptj_nobias": dict(num_heads=4, num_kv_heads=1, rope="gptj", bias=False),
}


def _cache_layers(name, dt):
    """A CPU layer (random biases when it has them) and its GPU twin."""
    kw = dict(CACHE_LAYERS[name])
    cpu = fastattn.MultiHeadAttention(24, kw.pop("num_heads"), dtype=dt, seed=7, **kw)
    if cpu.state_dict()["b_q"] is not None:
        st = cpu.state_dict()
        brng = np.random.default_rng(3)
        for n in ("b_q", "b_k", "b_v", "b_o"):
            st[n] = brng.standard_normal(st[n].shape).astype(dt)
        cpu.load_state_dict(st)
    return cpu, _twin(cpu)


def _prefix_oracle(cpu, seq, start, stop):
    """The oracle layer on the whole prefix seq[:stop], causal: its rows and
    weights for the tokens start..stop-1 (float64)."""
    y, w = reference.multi_head_attention(
        {n: None if a is None else a.astype(np.float64) for n, a in cpu.state_dict().items()},
        seq[None, :stop].astype(np.float64), num_heads=cpu.num_heads, num_kv_heads=cpu.num_kv_heads,
        is_causal=True, rope=cpu.rope, rope_base=cpu.rope_base, return_weights=True)
    return y[0, start:stop], w[0, :, start:stop]


# (tokens per sequence per call) for three sequences; None: no query_lengths
CACHE_SCHEDULES = {
    "uniform": [None, None, None, None],  # prefill 4, then single tokens
    "ragged": [[5, 1, 3], [2, 0, 4], [1, 1, 1], [0, 2, 3], [1, 0, 1]],
}


@pytest.mark.parametrize("schedule", list(CACHE_SCHEDULES))
@pytest.mark.parametrize("layer", list(CACHE_LAYERS))
def test_mha_cache_decoding(backend, dt, rng, layer, schedule):
    cpu, gpu = _cache_layers(layer, dt)
    B, E, max_len = 3, cpu.embed_dim, 13
    seqs = [_rand(rng, (12, E), dt) for _ in range(B)]
    c_cache, g_cache = cpu.new_cache(B, max_len), gpu.new_cache(B, max_len)
    k_buf = g_cache.k
    pos = np.zeros(B, np.int64)
    for step, chunk in enumerate(CACHE_SCHEDULES[schedule]):
        ql = None if chunk is None else np.asarray(chunk)
        t = np.full(B, 4 if step == 0 else 1) if ql is None else ql
        L = int(t.max())
        xb = np.zeros((B, L, E), dt)
        for b in range(B):
            xb[b, :t[b]] = seqs[b][pos[b]:pos[b] + t[b]]
        want, want_w = cpu(xb, cache=c_cache, query_lengths=ql, return_weights=True)
        got, got_w = gpu(backend.to_device(xb), cache=g_cache, query_lengths=ql, return_weights=True)
        got, got_w = backend.to_host(got), backend.to_host(got_w)
        assert_close(got, want, dt)
        assert_close(got_w, want_w, dt)
        assert got_w.shape == (B, cpu.num_heads, L, int((pos + t).max()))
        for b in range(B):
            assert (got[b, t[b]:] == 0).all()
            assert (got_w[b, :, :, pos[b] + t[b]:] == 0).all()
            ref, ref_w = _prefix_oracle(cpu, seqs[b], pos[b], pos[b] + t[b])
            assert_close(got[b, :t[b]], ref.astype(dt), dt)
            assert_close(got_w[b, :, :t[b], :pos[b] + t[b]], ref_w.astype(dt), dt)
        pos += t
        assert g_cache.lengths.tolist() == c_cache.lengths.tolist() == pos.tolist()
    assert g_cache.k is k_buf  # appended in place
    host = g_cache.to("cpu")
    for b in range(B):  # the cached keys (RoPE applied) and values are the CPU layer's
        assert_close(host.k[b, :, :pos[b]], c_cache.k[b, :, :pos[b]], dt)
        assert_close(host.v[b, :, :pos[b]], c_cache.v[b, :, :pos[b]], dt)


def test_mha_cache_from_cpu_and_edges(backend, dt, rng):
    cpu, gpu = _cache_layers("gqa_neox", dt)
    x = _rand(rng, (2, 6, cpu.embed_dim), dt)
    # prefill on the CPU, continue on the GPU
    c_cache = cpu.new_cache(2, 8)
    cpu(x[:, :4], cache=c_cache, query_lengths=[4, 2])
    g_cache = copy.deepcopy(c_cache).to("cuda")
    assert g_cache.lengths.tolist() == [4, 2]
    assert "KVCache(batch_size=2, max_len=8, num_kv_heads=2, head_dim=4, dtype=" in repr(g_cache)
    assert "device='cuda'" in repr(g_cache)
    want = cpu(x[:, 4:6], cache=c_cache)
    got = gpu(backend.to_device(x[:, 4:6]), cache=g_cache)
    assert_close(backend.to_host(got), want, dt)
    # no new tokens: nothing changes
    empty = gpu(backend.to_device(x[:, :0]), cache=g_cache, return_weights=True)
    assert backend.to_host(empty[0]).shape == (2, 0, cpu.embed_dim)
    assert backend.to_host(empty[1]).shape == (2, cpu.num_heads, 0, 6)
    assert g_cache.lengths.tolist() == [6, 4]
    # reset truncates, as on the CPU; decoding then rewrites the same rows
    g_cache.reset(lengths=[5, 4])
    c_cache.reset(lengths=[5, 4])
    want = cpu(x[:, 5:6], cache=c_cache)
    assert_close(backend.to_host(gpu(backend.to_device(x[:, 5:6]), cache=g_cache)), want, dt)
    with pytest.raises(ValueError, match="reset can only shorten"):
        g_cache.reset(lengths=[8, 8])
    g_cache.reset()
    assert g_cache.lengths.tolist() == [0, 0]


def test_mha_cache_bad_inputs(backend, rng):
    """The CPU layer's checks and messages; a failing call changes nothing."""
    cpu, gpu = _cache_layers("gqa_neox", np.float32)
    x = _rand(rng, (2, 3, cpu.embed_dim), np.float32)
    xd = backend.to_device(x)
    c_cache, g_cache = cpu.new_cache(2, 5), gpu.new_cache(2, 5)
    other_cpu, other_gpu = _cache_layers("mha", np.float32)
    cases = [
        dict(cache={}),
        dict(cache=("other", 2, 5)),
        dict(cache=("own", 3, 5)),
        dict(cache=("own", 2, 5), key=x, value=x),
        dict(cache=("own", 2, 5), key_lengths=[1, 2]),
        dict(cache=("own", 2, 5), attn_mask=np.ones((3, 3), bool)),
        dict(cache=("own", 2, 5), query_lengths=[1, 2, 3]),
        dict(cache=("own", 2, 5), query_lengths=[4, 2]),
        dict(cache=("own", 2, 2)),
    ]
    for case in cases:
        case = dict(case)
        spec = case.pop("cache")
        kw_cpu, kw_gpu = dict(case), dict(case)
        if "key" in case:
            kw_gpu["key"] = kw_gpu["value"] = xd
        if isinstance(spec, tuple):
            owner, bsz, n = spec
            c, g = (cpu, gpu) if owner == "own" else (other_cpu, other_gpu)
            kw_cpu["cache"], kw_gpu["cache"] = c.new_cache(bsz, n), g.new_cache(bsz, n)
        else:
            kw_cpu["cache"] = kw_gpu["cache"] = spec
        with pytest.raises((TypeError, ValueError)) as want:
            cpu(x, **kw_cpu)
        with pytest.raises(want.type) as got:
            gpu(xd, **kw_gpu)
        assert str(got.value) == str(want.value), case
    # a CPU cache given to the GPU layer says how to move it
    with pytest.raises(ValueError, match=r"cache is on 'cpu' but the layer on 'cuda'; move one with "
                                         r"\.to\('cuda'\)"):
        gpu(xd, cache=c_cache)
    # overflow: nothing appended, and the cache still works
    gpu(xd, cache=g_cache, query_lengths=[3, 1])
    k, v = backend.to_host(g_cache.k).copy(), backend.to_host(g_cache.v).copy()
    with pytest.raises(ValueError, match=r"^KV cache overflow: sequence 0 holds 3 of max_len=5 tokens and "
                                         r"cannot take 3 more; nothing was appended$"):
        gpu(xd, cache=g_cache)
    assert g_cache.lengths.tolist() == [3, 1]
    assert np.array_equal(backend.to_host(g_cache.k), k, equal_nan=True)
    assert np.array_equal(backend.to_host(g_cache.v), v, equal_nan=True)
    gpu(xd[:, :2], cache=g_cache)
    assert g_cache.lengths.tolist() == [5, 3]
    # a cross-attention layer cannot decode with a cache
    cross = _twin(_cpu_layer(rng, 16, 4, kdim=6, vdim=10, dtype=np.float32))
    with pytest.raises(ValueError, match=r"cache= is self-attention and needs kdim == vdim == embed_dim \(16\)"):
        cross(backend.to_device(_rand(rng, (2, 3, 16), np.float32)), cache=cross.new_cache(2, 4))
    assert cross.new_cache(2, 4).v.shape == (2, 4, 4, 4)
    # a cache of the wrong value width
    plain = _twin(_cpu_layer(rng, 16, 4, dtype=np.float32))
    with pytest.raises(ValueError, match="cache holds values of dim 3; this layer needs 4"):
        plain(backend.to_device(_rand(rng, (2, 3, 16), np.float32)),
              cache=fastattn.KVCache(2, 4, 4, 4, v_head_dim=3, device="cuda"))


def test_layer_and_cache_move_between_devices(backend, dt, rng):
    """layer.to / cache.to: the weights and the cache contents survive a
    round trip, and a layer moved to the GPU computes what it did on the CPU."""
    cpu = _cpu_layer(rng, 16, 4, Hkv=2, rope="neox", dtype=dt)
    x = _rand(rng, (2, 5, 16), dt)
    want = cpu(x, is_causal=True)
    st = cpu.state_dict()
    layer = copy.deepcopy(cpu)
    assert layer.to("cuda") is layer and layer.device == "cuda"
    assert "device='cuda'" in repr(layer)
    assert_close(backend.to_host(layer(backend.to_device(x), is_causal=True)), want, dt)
    for n, a in layer.state_dict().items():  # downloaded from the device
        assert (a is None and st[n] is None) or np.array_equal(a, st[n]), n
    # loading weights on the device replaces the device weights
    layer.load_state_dict({n: None if a is None else a * 2 for n, a in st.items()})
    assert np.array_equal(layer.state_dict()["w_o"], st["w_o"] * 2)
    layer.load_state_dict(st)
    with pytest.raises(ValueError, match="w_q must have shape"):
        layer.load_state_dict({**st, "w_q": st["w_q"][:, :4]})
    cache = layer.new_cache(2, 5)
    assert cache.device == "cuda"
    layer(backend.to_device(x[:, :3]), cache=cache)
    assert layer.to("cpu") is layer and layer.device == "cpu"
    with pytest.raises(ValueError, match="cache is on 'cuda' but the layer on 'cpu'"):
        layer(x[:, 3:4], cache=cache)
    cache.to("cpu")
    parts = [layer(x[:, t:t + 1], cache=cache) for t in (3, 4)]
    c_cache = cpu.new_cache(2, 5)
    ref = [cpu(x[:, :3], cache=c_cache)] + [cpu(x[:, t:t + 1], cache=c_cache) for t in (3, 4)]
    assert_close(np.concatenate(parts, axis=1), np.concatenate(ref[1:], axis=1), dt)
    with pytest.raises(TypeError, match="inputs on 'cuda'"):
        layer(backend.to_device(x))


def test_gpu_page_cache_example(backend):
    """The KV-cache example of docs/gpu.md runs as written."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "gpu.md").read_text()
    section = page[page.index("### KV-cache decoding"):]
    block = section[section.index("```python\n") + len("```python\n"):]
    ns = {}
    exec(block[:block.index("```")], ns)
    assert ns["cache"].lengths.tolist() == [6, 4]
    assert backend.to_host(ns["step"]).shape == (2, 1, 64)


def test_emulated_calls_go_through_the_abi(backend, rng):
    """Nothing is computed outside the extension: each public call reaches
    the expected C entry point."""
    if backend.name != "emulated":
        pytest.skip("bookkeeping of the emulated extension")
    x = backend.to_device(_rand(rng, (2, 3, 4), np.float32))
    fcuda.masked_softmax(x)
    assert backend.ext.calls[-1] == "masked_softmax"
    fcuda.scaled_dot_product_attention(x, x, x)
    assert backend.ext.calls[-1] == "sdpa"
    cpu, gpu = _cache_layers("gqa_neox", np.float32)
    cache = gpu.new_cache(2, 4)
    del backend.ext.calls[:]
    gpu(backend.to_device(_rand(rng, (2, 3, cpu.embed_dim), np.float32)), cache=cache)
    assert backend.ext.calls.count("append_rows") == 2 and "sdpa" in backend.ext.calls


def test_mha_query_lengths_are_per_sequence(backend, rng):
    """query_lengths of the uncached GPU layer is (B,), as on the CPU layer,
    with the CPU's message for any other shape."""
    cpu, gpu = _cache_layers("mha", np.float32)
    x = _rand(rng, (2, 3, cpu.embed_dim), np.float32)
    xd = backend.to_device(x)
    want = cpu(x, query_lengths=[3, 1])
    assert_close(backend.to_host(gpu(xd, query_lengths=[3, 1])), want)
    for bad in ([[3] * cpu.num_heads, [1] * cpu.num_heads], [1, 2, 3]):
        with pytest.raises(ValueError, match=r"query_lengths must have shape \(2,\) for a batch of 2"):
            cpu(x, query_lengths=bad)
        with pytest.raises(ValueError, match=r"query_lengths must have shape \(2,\) for a batch of 2"):
            gpu(xd, query_lengths=bad)


def test_backends_expose_one_kernel_table():
    """Every backend has the same kernels with identical signatures (names,
    kinds, defaults), so the neutral code calls each the same way."""
    import inspect

    from fastattn._backend import cpu

    assert cpu.KERNELS == fbk.KERNELS
    for name in cpu.KERNELS:
        want = inspect.signature(getattr(cpu, name))
        got = inspect.signature(getattr(fbk, name))
        assert [(p.name, p.kind, p.default) for p in got.parameters.values()] == \
            [(p.name, p.kind, p.default) for p in want.parameters.values()], name
    helpers = ("asarray", "host", "operand", "kernel_input", "unit_head_axis", "attention_mask",
               "empty", "output", "result")
    for name in helpers:
        assert callable(getattr(cpu, name)) and callable(getattr(fbk, name)), name


@pytest.mark.parametrize("arg, value", [("key_starts", [0, 1]), ("window", (2, None)),
                                        ("softcap", 30.0), ("sinks", [0.5, 0.5])])
def test_model_features_are_cpu_only_for_now(backend, rng, arg, value):
    """The CUDA attention kernel names the argument it cannot honour yet,
    after the shared checks passed."""
    if backend.name != "emulated":
        pytest.skip("the message of the emulated backend is the GPU's")
    q = backend.to_device(_rand(rng, (2, 2, 3, 4), np.float32))
    with pytest.raises(NotImplementedError, match=f"{arg} is not supported on the CUDA backend"):
        fastattn.scaled_dot_product_attention(q, q, q, **{arg: value})
