"""MultiHeadAttention in bfloat16 and float16: weights, inputs, outputs and KV
cache in the dtype, packed 16-bit projections with float32 sums.

Accuracy bounds, as relative RMS over the output (``rel_rms``):

* against the oracle's 16-bit mode (exact 16-bit weights and inputs,
  float64, one rounding): the layer rounds three intermediate results to
  the dtype (the Q/K/V projections, RoPE when on, the attention output)
  besides the final one, each a relative error of at most half an ulp
  (2^-9 in bfloat16, 2^-12 in float16) and about a third of that in RMS;
  propagated through attention and the output projection that is a few
  times 2^-9 RMS, measured 3e-3 in bfloat16. Bounds: 1e-2 (bfloat16),
  2e-3 (float16).
* against torch's own 16-bit ``nn.MultiheadAttention`` on the same weights:
  both layers carry errors of that size, 2e-2 relative RMS (bfloat16), the
  bound the layer is specified to.
"""

import pickle
import subprocess
import sys

import numpy as np
import pytest

import fastattn
from fastattn import reference

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
REF_RMS = {BF16: 1e-2, F16: 2e-3}


@pytest.fixture(params=[BF16, F16], ids=["bf16", "f16"])
def half(request):
    return request.param


def rel_rms(got, ref):
    g, r = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.sqrt(np.mean((g - r) ** 2) / np.mean(r ** 2)))


def layer_and_input(half, rng, *, E=64, H=4, L=19, B=2, **kw):
    layer = fastattn.MultiHeadAttention(E, H, seed=int(rng.integers(1 << 30)), **kw)
    state = layer.state_dict()
    for n in ("b_q", "b_k", "b_v", "b_o"):  # non-zero biases, so that they are tested
        if state[n] is not None:
            state[n] = 0.1 * rng.standard_normal(state[n].shape)
    layer.load_state_dict(state)
    return layer.astype(half), rng.standard_normal((B, L, E)).astype(half)


def test_dtype_everywhere(half, rng):
    layer, x = layer_and_input(half, rng)
    assert layer.dtype == half and "dtype=" + half.name in repr(layer)
    assert all(a.dtype == half for a in layer.state_dict().values() if a is not None)
    y = layer(x)
    assert y.dtype == half and y.shape == x.shape
    cache = layer.new_cache(2, 8)
    assert cache.dtype == half and cache.k.dtype == half


@pytest.mark.parametrize("kw", [dict(), dict(rope="neox"), dict(rope="gptj", num_kv_heads=2),
                                dict(bias=False)], ids=["plain", "rope", "rope-gqa", "nobias"])
def test_against_the_oracle(isa, threads, half, rng, kw):
    layer, x = layer_and_input(half, rng, **kw)
    got = layer(x, num_threads=threads)
    ref = reference.multi_head_attention(layer.state_dict(), x, num_heads=4,
                                         num_kv_heads=layer.num_kv_heads, rope=layer.rope)
    assert ref.dtype == half
    assert rel_rms(got, ref) < REF_RMS[half]


def test_masks_lengths_and_weights(half, rng):
    layer, x = layer_and_input(half, rng, L=13)
    mask = rng.random((2, 4, 13, 13)) < 0.8
    kl, ql = np.array([13, 6]), np.array([13, 9])
    for kw in (dict(attn_mask=mask), dict(attn_mask=np.where(mask, 0.0, -np.inf).astype(np.float32)),
               dict(key_lengths=kl, query_lengths=ql), dict(is_causal=True)):
        got, w = layer(x, return_weights=True, **kw)
        ref, rw = reference.multi_head_attention(layer.state_dict(), x, num_heads=4,
                                                 return_weights=True, **kw)
        assert got.dtype == half and w.dtype == half
        assert rel_rms(got, ref) < REF_RMS[half]
        assert np.abs(w.astype(np.float64) - rw.astype(np.float64)).max() < 4 * float(
            (ml_dtypes.finfo if half == BF16 else np.finfo)(half).eps)
    got = layer(x, key_lengths=kl, query_lengths=ql)
    assert (got[1, 9:].astype(np.float32) == 0).all()  # padded query rows: exactly 0


def test_cross_attention(half, rng):
    E = 32
    layer = fastattn.MultiHeadAttention(E, 4, kdim=24, vdim=40, seed=3).astype(half)
    q = rng.standard_normal((2, 5, E)).astype(half)
    k = rng.standard_normal((2, 9, 24)).astype(half)
    v = rng.standard_normal((2, 9, 40)).astype(half)
    ref = reference.multi_head_attention(layer.state_dict(), q, k, v, num_heads=4)
    assert rel_rms(layer(q, k, v), ref) < REF_RMS[half]
    same = fastattn.MultiHeadAttention(E, 4, seed=4).astype(half)
    kv = rng.standard_normal((2, 9, E)).astype(half)
    ref = reference.multi_head_attention(same.state_dict(), q, kv, kv, num_heads=4)
    assert rel_rms(same(q, kv, kv), ref) < REF_RMS[half]


def test_threads_agree_bitwise(half, rng):
    layer, x = layer_and_input(half, rng, L=40, rope="neox")
    want = layer(x, num_threads=1).view(np.uint16)
    np.testing.assert_array_equal(layer(x, num_threads=3).view(np.uint16), want)


@pytest.mark.parametrize("rope", [None, "neox"])
def test_decode_with_a_cache_matches_the_full_call(half, rng, rope):
    layer, x = layer_and_input(half, rng, L=7, rope=rope)
    full = layer(x, is_causal=True)
    cache = layer.new_cache(2, 10)
    first = layer(x[:, :4], cache=cache)
    steps = [layer(x[:, i:i + 1], cache=cache) for i in range(4, 7)]
    got = np.concatenate([first] + steps, axis=1)
    assert got.dtype == half and cache.k.dtype == half
    assert cache.lengths.tolist() == [7, 7]
    # the same rows, projected and rounded the same way: equal up to the
    # attention's float32 sums over different key tiles
    assert rel_rms(got, full) < REF_RMS[half] / 4


def test_ragged_cache(half, rng):
    layer, x = layer_and_input(half, rng, L=6)
    cache = layer.new_cache(2, 8)
    out = layer(x, cache=cache, query_lengths=[6, 3])
    assert cache.lengths.tolist() == [6, 3]
    assert (out[1, 3:].astype(np.float32) == 0).all()
    ref = reference.multi_head_attention(layer.state_dict(), x[1:, :3], num_heads=4, is_causal=True)
    assert rel_rms(out[1:, :3], ref) < REF_RMS[half]


def test_astype(rng):
    layer = fastattn.MultiHeadAttention(16, 2, rope="neox", seed=0, deterministic=False)
    for name in ("bfloat16", BF16, np.float16, "float16"):
        half = layer.astype(name)
        assert half is not layer and layer.dtype == np.float32  # a copy; the original unchanged
        assert (half.rope, half.deterministic) == ("neox", False)
        for n, a in layer.state_dict().items():
            if a is not None:
                np.testing.assert_array_equal(half.state_dict()[n], a.astype(half.dtype))
    bf = layer.astype("bfloat16")
    back = bf.astype(np.float32)  # exact: bfloat16 widens into float32
    for n, a in bf.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[n], a.astype(np.float32))
    assert layer.astype(np.float64).dtype == np.float64
    with pytest.raises(TypeError, match="dtype"):
        layer.astype(np.int8)
    with pytest.raises(TypeError, match="dtype"):
        layer.astype("float8")


def test_load_state_dict_repacks(half, rng):
    layer, x = layer_and_input(half, rng)
    other = fastattn.MultiHeadAttention(64, 4, seed=99).astype(half)
    other.load_state_dict(layer.state_dict())
    np.testing.assert_array_equal(other(x).view(np.uint16), layer(x).view(np.uint16))


def test_save_load_and_pickle(half, rng, tmp_path):
    layer, x = layer_and_input(half, rng, rope="gptj")
    want = layer(x).view(np.uint16)
    layer.save(tmp_path / "layer")
    loaded = fastattn.MultiHeadAttention.load(tmp_path / "layer.npz")
    assert loaded.dtype == half and loaded.rope == "gptj"
    np.testing.assert_array_equal(loaded(x).view(np.uint16), want)
    clone = pickle.loads(pickle.dumps(layer))
    np.testing.assert_array_equal(clone(x).view(np.uint16), want)
    # a layer pickled before the 16-bit flag was part of its state still
    # runs its 16-bit GEMMs once unpickled
    state = dict(layer.__dict__)
    del state["_half"]
    older = fastattn.MultiHeadAttention.__new__(fastattn.MultiHeadAttention)
    older.__setstate__(state)
    np.testing.assert_array_equal(older(x).view(np.uint16), want)


def test_from_weights_keeps_a_shared_16_bit_dtype(half, rng):
    w = {n: (0.1 * rng.standard_normal((16, 16))).astype(half) for n in ("w_q", "w_k", "w_v", "w_o")}
    layer = fastattn.MultiHeadAttention.from_weights(**w, num_heads=2)
    assert layer.dtype == half
    with pytest.raises(TypeError, match="w_o"):
        fastattn.MultiHeadAttention.from_weights(**dict(w, w_o=w["w_o"].astype(np.float32)),
                                                 num_heads=2)
    with pytest.raises(TypeError, match="b_q"):
        fastattn.MultiHeadAttention.from_weights(**w, b_q=np.zeros(16, np.float32), num_heads=2)


def test_bad_inputs_name_the_argument(rng):
    layer = fastattn.MultiHeadAttention(16, 2, seed=0).astype("bfloat16")
    x32 = np.zeros((1, 3, 16), np.float32)
    with pytest.raises(TypeError, match="query has dtype float32.*bfloat16.*astype"):
        layer(x32)
    with pytest.raises(TypeError, match="key has dtype float16"):
        layer(x32.astype(BF16), x32.astype(np.float16), x32.astype(BF16))
    with pytest.raises(TypeError, match="query has dtype bfloat16.*float32"):
        fastattn.MultiHeadAttention(16, 2, seed=0)(x32.astype(BF16))
    with pytest.raises(TypeError, match="CPU only"):
        layer.to("cuda")
    with pytest.raises(TypeError, match="kv_dtype"):
        layer.new_cache(1, 4, kv_dtype="int8")
    with pytest.raises(ValueError, match="cache holds"):
        layer(x32.astype(BF16), cache=fastattn.MultiHeadAttention(16, 2).new_cache(1, 4))


@pytest.mark.parametrize("tdtype", ["bfloat16", "float16"])
def test_from_torch_keeps_the_dtype_and_matches_torch(rng, tdtype):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    td = getattr(torch, tdtype)
    module = torch.nn.MultiheadAttention(96, 6, batch_first=True).to(td).eval()
    with torch.no_grad():
        module.in_proj_bias.normal_(0, 0.1)
        module.out_proj.bias.normal_(0, 0.1)
    layer = fastattn.MultiHeadAttention.from_torch(module)
    half = BF16 if tdtype == "bfloat16" else F16
    assert layer.dtype == half
    x = torch.randn(2, 33, 96).to(td)
    xn = x.view(torch.int16).numpy().view(half)
    got = layer(xn)
    with torch.no_grad():
        want = module(x, x, x, need_weights=False)[0].float().numpy()
    assert got.dtype == half
    assert rel_rms(got, want) < 2e-2
    ref = reference.multi_head_attention(layer.state_dict(), xn, num_heads=6)
    assert rel_rms(got, ref) < REF_RMS[half]


def test_bfloat16_without_ml_dtypes_is_a_clear_error():
    code = (
        "import sys; sys.modules['ml_dtypes'] = None\n"
        "import numpy as np, fastattn\n"
        "y = fastattn.masked_softmax(np.zeros((2, 3), np.float16))\n"
        "assert y.dtype == np.float16\n"
        "layer = fastattn.MultiHeadAttention(8, 2, seed=0)\n"
        "for call in (lambda: layer.astype('bfloat16'),\n"
        "             lambda: fastattn.MultiHeadAttention(8, 2, dtype='bfloat16')):\n"
        "    try:\n"
        "        call()\n"
        "    except ImportError as exc:\n"
        "        assert 'fastattn[bf16]' in str(exc), exc\n"
        "    else:\n"
        "        raise AssertionError('no error')\n"
        "assert layer.astype('float16')(np.zeros((1, 2, 8), np.float16)).dtype == np.float16\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
