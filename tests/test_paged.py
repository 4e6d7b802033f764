"""paged_attention against the oracle (keys gathered from the blocks) and
against contiguous attention, for block sizes 1 and up, shuffled blocks,
decode with split-KV, GQA and the model features; every ISA level, 1 and N
threads, both dtypes. PagedKVCache: appends across blocks, fork
copy-on-write, free, a full pool, RoPE on append. Bad block indices and
lengths are refused before C runs."""

import numpy as np
import pytest

import fastattn
from fastattn import reference as ref
from conftest import N_THREADS, assert_close


def _paged(rng, lens, block_size, Hkv, D, Dv, dtype, spare=3):
    """A shuffled pool holding each sequence's keys; returns the contiguous
    keys too."""
    nblocks = [-(-n // block_size) for n in lens]
    total = sum(nblocks) + spare
    order = rng.permutation(total)
    kc = rng.standard_normal((total, block_size, Hkv, D)).astype(dtype)  # junk in spare blocks
    vc = rng.standard_normal((total, block_size, Hkv, Dv)).astype(dtype)
    width = max(nblocks) + 1
    tables = np.full((len(lens), width), -1, np.int64)  # -1 past each sequence's blocks
    used = 0
    for b, nb in enumerate(nblocks):
        tables[b, :nb] = order[used:used + nb]
        used += nb
    return kc, vc, tables, np.asarray(lens)


CASES = {  # (seq_lens, Lq, block_size, H, Hkv, D, Dv)
    "bs1": ([5, 1, 9], 1, 1, 2, 1, 8, 8),
    "bs3_prefill": ([7, 30], 7, 3, 4, 2, 17, 9),
    "bs16_chunk": ([130, 200], 100, 16, 2, 2, 33, 33),
    "bs16_decode_split": ([2100], 1, 16, 2, 1, 64, 40),
    "bs5_decode_batch": ([11, 63, 5], 2, 5, 4, 4, 16, 24),
}
FEATURES = {
    "plain": {},
    "causal": dict(is_causal=True),
    "everything": dict(is_causal=True, window=(40, None), softcap=3.0, scale=0.4),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("feat", FEATURES)
def test_against_oracle(isa, threads, dtype, rng, case, feat):
    lens, Lq, bs, H, Hkv, D, Dv = CASES[case]
    kc, vc, tables, lens = _paged(rng, lens, bs, Hkv, D, Dv, dtype)
    q = rng.standard_normal((len(lens), H, Lq, D)).astype(dtype)
    kw = dict(FEATURES[feat])
    if feat == "everything":
        kw.update(sinks=rng.standard_normal(H), alibi_slopes=rng.random(H) * 0.1)
    got = fastattn.paged_attention(q, kc, vc, tables.astype(np.int32), lens, num_threads=threads,
                                   **kw)
    want = ref.paged_attention(q, kc, vc, tables, lens, **kw)
    assert_close(got, want.astype(dtype), dtype)


def test_equals_contiguous_decode(isa, dtype, rng):
    """Same keys, same split-KV schedule and key tiles as contiguous decode."""
    B, H, Hkv, L, D, bs = 1, 4, 2, 2048, 32, 16
    k = rng.standard_normal((B, Hkv, L, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, L, D)).astype(dtype)
    q = rng.standard_normal((B, H, 1, D)).astype(dtype)
    n = L // bs
    order = rng.permutation(n)
    kc = np.empty((n, bs, Hkv, D), dtype)
    vc = np.empty_like(kc)
    kc[order] = k[0].reshape(Hkv, n, bs, D).transpose(1, 2, 0, 3)
    vc[order] = v[0].reshape(Hkv, n, bs, D).transpose(1, 2, 0, 3)
    got = fastattn.paged_attention(q, kc, vc, order[None], [L])
    assert_close(got, fastattn.scaled_dot_product_attention(q, k, v), dtype)
    assert_close(got, ref.scaled_dot_product_attention(q, k, v).astype(dtype), dtype)


def test_deterministic(isa, dtype, rng):
    kc, vc, tables, lens = _paged(rng, [1500, 3, 700], 7, 2, 16, 16, dtype)
    q = rng.standard_normal((3, 4, 2, 16)).astype(dtype)
    one = fastattn.paged_attention(q, kc, vc, tables, lens, is_causal=True, num_threads=1)
    many = fastattn.paged_attention(q, kc, vc, tables, lens, is_causal=True, num_threads=N_THREADS)
    np.testing.assert_array_equal(one, many)


def test_bad_tables_and_lengths(rng):
    kc, vc, tables, lens = _paged(rng, [10, 4], 4, 2, 8, 8, np.float32, spare=0)
    q = rng.standard_normal((2, 2, 1, 8)).astype(np.float32)
    bad = tables.copy()
    bad[1, 0] = kc.shape[0]
    with pytest.raises(ValueError, match=r"block_tables\[1, 0\]"):
        fastattn.paged_attention(q, kc, vc, bad, lens)
    bad[1, 0] = -1
    with pytest.raises(ValueError, match=r"block_tables\[1, 0\]"):
        fastattn.paged_attention(q, kc, vc, bad, lens)
    with pytest.raises(ValueError, match="seq_lens"):
        fastattn.paged_attention(q, kc, vc, tables, [10, tables.shape[1] * 4 + 1])
    with pytest.raises(ValueError, match="seq_lens"):
        fastattn.paged_attention(q, kc, vc, tables, [10, 0])  # fewer keys than queries
    with pytest.raises(TypeError, match="block_tables"):
        fastattn.paged_attention(q, kc, vc, tables.astype(float), lens)
    with pytest.raises(ValueError, match="block_tables"):
        fastattn.paged_attention(q, kc, vc, tables[:1], lens)
    with pytest.raises(ValueError, match="value_cache"):
        fastattn.paged_attention(q, kc, vc[:, :2], tables, lens)
    with pytest.raises(ValueError, match="window"):
        fastattn.paged_attention(q, kc, vc, tables, lens, window=(0, -1))


# ---- PagedKVCache ---------------------------------------------------------------

def _contiguous(cache, seq, pools=("key_cache", "value_cache")):
    """The rows of sequence seq in the cache's pools, in token order."""
    tables, lens = cache.tables([seq])
    t = np.arange(lens[0])
    rows = tables[0, t // cache.block_size]
    return tuple(getattr(cache, name)[rows, t % cache.block_size] for name in pools)


def test_cache_append_fork_free(rng):
    cache = fastattn.PagedKVCache(num_blocks=12, block_size=4, num_kv_heads=2, head_dim=8,
                                  dtype=np.float64)
    a = cache.add_sequence()
    ka, va = rng.standard_normal((10, 2, 8)), rng.standard_normal((10, 2, 8))
    cache.append(a, ka[:6], va[:6])
    cache.append(a, ka[6:], va[6:])
    np.testing.assert_array_equal(_contiguous(cache, a)[0], ka)
    # fork shares the prefix; both then append different tokens into the
    # shared, partly filled last block: copy-on-write keeps both intact
    b = cache.fork(a)
    free_before = cache.num_free_blocks
    kb, vb = rng.standard_normal((3, 2, 8)), rng.standard_normal((3, 2, 8))
    kx, vx = rng.standard_normal((1, 2, 8)), rng.standard_normal((1, 2, 8))
    cache.append(b, kb, vb)
    cache.append(a, kx, vx)
    # b: a copy of the shared, partly filled block and one new block (13
    # tokens); a then writes into the block it no longer shares
    assert cache.num_free_blocks == free_before - 2
    np.testing.assert_array_equal(_contiguous(cache, a)[0], np.concatenate([ka, kx]))
    np.testing.assert_array_equal(_contiguous(cache, b)[0], np.concatenate([ka, kb]))
    np.testing.assert_array_equal(_contiguous(cache, b)[1], np.concatenate([va, vb]))
    ta, tb = cache.tables([a])[0][0], cache.tables([b])[0][0]
    assert list(ta[:2]) == list(tb[:2])  # full prefix blocks still shared
    # attention over the forked sequence matches contiguous attention
    q = rng.standard_normal((2, 4, 1, 8))
    tables, lens = cache.tables([a, b])
    got = fastattn.paged_attention(q, cache.key_cache, cache.value_cache, tables, lens)
    for i, s in enumerate((a, b)):
        k, v = _contiguous(cache, s)
        want = ref.scaled_dot_product_attention(q[i:i + 1], k.transpose(1, 0, 2)[None],
                                                v.transpose(1, 0, 2)[None])
        assert_close(got[i:i + 1], want, np.float64)
    before = cache.num_free_blocks
    cache.free(a)
    assert cache.num_free_blocks == before + 1  # a's own last block; the prefix is b's too
    np.testing.assert_array_equal(_contiguous(cache, b)[0], np.concatenate([ka, kb]))
    cache.free(b)
    assert cache.num_free_blocks == 12
    with pytest.raises(ValueError, match="no sequence"):
        cache.append(b, kb, vb)


def test_cache_full_raises_and_changes_nothing(rng):
    cache = fastattn.PagedKVCache(num_blocks=3, block_size=2, num_kv_heads=1, head_dim=4)
    a = cache.add_sequence()
    cache.append(a, rng.standard_normal((5, 1, 4)), rng.standard_normal((5, 1, 4)))
    keys = cache.key_cache.copy()
    b = cache.add_sequence()
    with pytest.raises(RuntimeError, match="full"):
        cache.append(b, rng.standard_normal((2, 1, 4)), rng.standard_normal((2, 1, 4)))
    assert cache.seq_len(b) == 0 and cache.num_free_blocks == 0
    np.testing.assert_array_equal(cache.key_cache, keys)


def test_cache_rope_on_append(rng):
    cache = fastattn.PagedKVCache(num_blocks=4, block_size=3, num_kv_heads=2, head_dim=8,
                                  dtype=np.float64, rope="neox")
    a = cache.add_sequence()
    k = rng.standard_normal((7, 2, 8))
    cache.append(a, k[:4], k[:4])
    cache.append(a, k[4:], k[4:])
    want = ref.apply_rotary(k.transpose(1, 0, 2), np.arange(7), layout="neox")
    assert_close(_contiguous(cache, a)[0], want.transpose(1, 0, 2), np.float64)


def test_cache_bad_arguments():
    with pytest.raises(ValueError, match="block_size"):
        fastattn.PagedKVCache(4, 0, 1, 8)
    with pytest.raises(ValueError, match="rope"):
        fastattn.PagedKVCache(4, 2, 1, 7, rope="neox")
    cache = fastattn.PagedKVCache(4, 2, 1, 8)
    a = cache.add_sequence()
    with pytest.raises(ValueError, match="key"):
        cache.append(a, np.zeros((2, 2, 8)), np.zeros((2, 2, 8)))


# ---- paged decode = contiguous decode, bit for bit --------------------------------

def _blocks_of(rng, k, v, block_size):
    """k, v (1, Hkv, L, dim) scattered over shuffled blocks (plus two spare
    blocks of junk), with the table that gathers them back."""
    _, Hkv, L, D = k.shape
    n = -(-L // block_size)
    total = n + 2
    order = rng.permutation(total)[:n]
    kc = rng.standard_normal((total, block_size, Hkv, D)).astype(k.dtype)
    vc = rng.standard_normal((total, block_size, Hkv, v.shape[3])).astype(v.dtype)
    t = np.arange(L)
    kc[order[t // block_size], t % block_size] = k[0].transpose(1, 0, 2)
    vc[order[t // block_size], t % block_size] = v[0].transpose(1, 0, 2)
    return kc, vc, order[None].astype(np.int32)


@pytest.mark.parametrize("block_size", [1, 16, 50])
@pytest.mark.parametrize("Lq", [1, 5])
def test_head_major_pool_as_a_view(threads, rng, block_size, Lq):
    """A pool laid out (num_blocks, Hkv, block_size, D), as vLLM keeps it,
    passed as its (num_blocks, block_size, Hkv, D) view: the same results
    as the token-major pool, decode and prefill."""
    H, Hkv, L, D, Dv = 8, 4, 700, 24, 20
    k = rng.standard_normal((1, Hkv, L, D)).astype(np.float32)
    v = rng.standard_normal((1, Hkv, L, Dv)).astype(np.float32)
    q = rng.standard_normal((1, H, Lq, D)).astype(np.float32)
    kc, vc, table = _blocks_of(rng, k, v, block_size)
    head_major = [np.ascontiguousarray(c.transpose(0, 2, 1, 3)) for c in (kc, vc)]
    kw = dict(is_causal=True, num_threads=threads)
    want = fastattn.paged_attention(q, kc, vc, table, [L], **kw)
    got = fastattn.paged_attention(q, *(c.transpose(0, 2, 1, 3) for c in head_major), table, [L],
                                   **kw)
    np.testing.assert_array_equal(got, want)
    assert_close(got, ref.scaled_dot_product_attention(
        q, k, v, is_causal=True, causal_alignment="bottom_right"), np.float32)


@pytest.mark.parametrize("block_size", [1, 3, 7, 16, 50, 128])
@pytest.mark.parametrize("shape", [(4, 2, 1200, 33, 17), (3, 3, 97, 16, 16), (8, 2, 2100, 64, 40)],
                         ids=lambda s: "H{}_Hkv{}_L{}_D{}_Dv{}".format(*s))
@pytest.mark.parametrize("feat", ["plain", "causal_window"])
def test_decode_bitwise_contiguous(isa, threads, dtype, rng, block_size, shape, feat):
    """Decode tiles span the blocks, so a paged sequence runs exactly the
    arithmetic of the same keys held contiguously (same split-KV chunks,
    same key tiles): every ISA level, 1 and N threads, odd block sizes."""
    H, Hkv, L, D, Dv = shape
    k = rng.standard_normal((1, Hkv, L, D)).astype(dtype)
    v = rng.standard_normal((1, Hkv, L, Dv)).astype(dtype)
    q = rng.standard_normal((1, H, 1, D)).astype(dtype)
    kw = {} if feat == "plain" else dict(is_causal=True, window=(L // 3, None), softcap=5.0)
    kc, vc, table = _blocks_of(rng, k, v, block_size)
    got = fastattn.paged_attention(q, kc, vc, table, [L], num_threads=threads, **kw)
    want = fastattn.scaled_dot_product_attention(q, k, v, causal_alignment="bottom_right",
                                                 num_threads=threads, **kw)
    np.testing.assert_array_equal(got, want)
    assert_close(got, ref.scaled_dot_product_attention(
        q, k, v, causal_alignment="bottom_right", **kw).astype(dtype), dtype)


# ---- narrow caches: bfloat16, float16, int8 with per-row scales ----------------------

NARROW = ["bfloat16", "float16", "int8"]


def _narrow(kc, vc, kv_dtype):
    """float32 caches in the storage kv_dtype: (key_cache, value_cache,
    scale keyword arguments, the exact float64 values the kernel reads)."""
    if kv_dtype == "int8":
        kq, ks = fastattn.quantize_kv(kc)
        vq, vs = fastattn.quantize_kv(vc)
        exact = (ref.dequantize_kv(kq, ks), ref.dequantize_kv(vq, vs))
        return kq, vq, {"k_scale": ks, "v_scale": vs}, exact
    import ml_dtypes
    dt = np.dtype(ml_dtypes.bfloat16) if kv_dtype == "bfloat16" else np.dtype(np.float16)
    kn, vn = kc.astype(dt), vc.astype(dt)
    return kn, vn, {}, (kn.astype(np.float64), vn.astype(np.float64))


NARROW_CASES = {  # (seq_lens, Lq, block_size, H, Hkv, D, Dv)
    "bs1_decode": ([5, 1, 9], 1, 1, 2, 1, 8, 8),
    "bs16_decode_split_gqa": ([2100, 700], 1, 16, 8, 2, 64, 40),
    "bs5_decode3": ([11, 63, 5], 3, 5, 4, 4, 16, 24),
    "bs3_prefill": ([7, 30], 7, 3, 4, 2, 17, 9),
    "bs16_chunk": ([130, 200], 100, 16, 2, 2, 33, 33),
}


@pytest.mark.parametrize("kv_dtype", NARROW)
@pytest.mark.parametrize("case", NARROW_CASES)
@pytest.mark.parametrize("feat", ["plain", "everything"])
def test_narrow_against_oracle(isa, threads, rng, kv_dtype, case, feat):
    lens, Lq, bs, H, Hkv, D, Dv = NARROW_CASES[case]
    kc, vc, tables, lens = _paged(rng, lens, bs, Hkv, D, Dv, np.float32)
    kn, vn, scales, (kx, vx) = _narrow(kc, vc, kv_dtype)
    q = rng.standard_normal((len(lens), H, Lq, D)).astype(np.float32)
    kw = dict(FEATURES[feat])
    if feat == "everything":
        kw.update(sinks=rng.standard_normal(H), alibi_slopes=rng.random(H) * 0.1)
    got = fastattn.paged_attention(q, kn, vn, tables, lens, num_threads=threads, **scales, **kw)
    want = ref.paged_attention(q.astype(np.float64), kx, vx, tables, lens, **kw)
    assert_close(got, want.astype(np.float32), np.float32)


@pytest.mark.parametrize("kv_dtype", NARROW)
@pytest.mark.parametrize("block_size", [1, 7, 16])
def test_narrow_decode_bitwise_contiguous(isa, threads, rng, kv_dtype, block_size):
    """A narrow paged cache decodes exactly as the same narrow keys held
    contiguously (scales gathered alike)."""
    H, Hkv, L, D = 8, 2, 1500, 40
    k = rng.standard_normal((1, Hkv, L, D)).astype(np.float32)
    v = rng.standard_normal((1, Hkv, L, D)).astype(np.float32)
    q = rng.standard_normal((1, H, 1, D)).astype(np.float32)
    kc, vc, table = _blocks_of(rng, k, v, block_size)
    kn, vn, scales, _ = _narrow(kc, vc, kv_dtype)
    got = fastattn.paged_attention(q, kn, vn, table, [L], num_threads=threads, **scales)
    t = np.arange(L)
    rows, slots = table[0, t // block_size], t % block_size

    def gathered(a):  # (blocks, block_size, Hkv, ...) -> (1, Hkv, L, ...)
        return a[rows, slots].swapaxes(0, 1)[None]

    want = fastattn.scaled_dot_product_attention(
        q, gathered(kn), gathered(vn), num_threads=threads,
        **{n: gathered(a) for n, a in scales.items()})
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kv_dtype", NARROW)
def test_narrow_cache_append_fork(rng, kv_dtype):
    """PagedKVCache(kv_dtype=): appends round or quantise (after RoPE), a
    fork copies the scales with its shared block, attention matches the
    oracle on the stored values, nbytes counts the scales."""
    cache = fastattn.PagedKVCache(num_blocks=10, block_size=3, num_kv_heads=2, head_dim=8,
                                  kv_dtype=kv_dtype, rope="neox")
    full = fastattn.PagedKVCache(num_blocks=10, block_size=3, num_kv_heads=2, head_dim=8,
                                 rope="neox")
    assert cache.key_cache.dtype.name == kv_dtype
    a, fa = cache.add_sequence(), full.add_sequence()
    k, v = rng.standard_normal((7, 2, 8)), rng.standard_normal((7, 2, 8))
    for c, s in ((cache, a), (full, fa)):
        c.append(s, k[:4], v[:4])
    b = cache.fork(a)
    kx, vx = rng.standard_normal((2, 2, 8)), rng.standard_normal((2, 2, 8))
    cache.append(b, kx, vx)
    cache.append(a, k[4:], v[4:])
    full.append(fa, k[4:], v[4:])
    # the stored rows are the float32 cache's rows in the narrow storage
    fk, fv = _contiguous(full, fa)
    if kv_dtype == "int8":
        sk = _contiguous(cache, a, ("key_scale", "value_scale"))
        np.testing.assert_array_equal(_contiguous(cache, a)[0], fastattn.quantize_kv(fk)[0])
        np.testing.assert_array_equal(sk[0], fastattn.quantize_kv(fk)[1])
        np.testing.assert_array_equal(sk[1], fastattn.quantize_kv(fv)[1])
        assert cache.nbytes == (cache.key_cache.nbytes * 2 + cache.key_scale.nbytes * 2)
    else:
        np.testing.assert_array_equal(_contiguous(cache, a)[0], fk.astype(cache.kv_dtype))
        assert cache.nbytes == cache.key_cache.nbytes * 2
    tables, lens = cache.tables([a, b])
    q = rng.standard_normal((2, 4, 1, 8)).astype(np.float32)
    got = fastattn.paged_attention(q, block_tables=tables, seq_lens=lens,
                                   **cache.attention_kwargs())
    kc, vc = cache.key_cache.astype(np.float64), cache.value_cache.astype(np.float64)
    if kv_dtype == "int8":
        kc = ref.dequantize_kv(cache.key_cache, cache.key_scale)
        vc = ref.dequantize_kv(cache.value_cache, cache.value_scale)
    assert_close(got, ref.paged_attention(q, kc, vc, tables, lens).astype(np.float32), np.float32)


def test_narrow_bad_arguments(rng):
    kc, vc, tables, lens = _paged(rng, [10, 4], 4, 2, 8, 8, np.float32, spare=0)
    q = rng.standard_normal((2, 2, 1, 8)).astype(np.float32)
    kq, ks = fastattn.quantize_kv(kc)
    vq, vs = fastattn.quantize_kv(vc)
    with pytest.raises(ValueError, match="int8 key_cache and value_cache need k_scale"):
        fastattn.paged_attention(q, kq, vq, tables, lens)
    with pytest.raises(ValueError, match="v_scale is required"):
        fastattn.paged_attention(q, kq, vq, tables, lens, k_scale=ks)
    with pytest.raises(ValueError, match="k_scale must have shape"):
        fastattn.paged_attention(q, kq, vq, tables, lens, k_scale=ks[:, :2], v_scale=vs)
    with pytest.raises(ValueError, match="k_scale is only for int8"):
        fastattn.paged_attention(q, kc, vc, tables, lens, k_scale=ks, v_scale=vs)
    with pytest.raises(TypeError, match="key_cache and value_cache must share"):
        fastattn.paged_attention(q, kq, vc.astype(np.float16), tables, lens, k_scale=ks,
                                 v_scale=vs)
    with pytest.raises(TypeError, match="bfloat16 or float16 queries"):
        fastattn.paged_attention(q.astype(np.float64), kq, vq, tables, lens, k_scale=ks,
                                 v_scale=vs)
    with pytest.raises(TypeError, match="kv_dtype"):
        fastattn.PagedKVCache(4, 2, 1, 8, dtype=np.float64, kv_dtype="int8")


@pytest.mark.parametrize("L", [5, 100, 1100])
def test_decode_nan_key_poisons_its_group_only(isa, threads, dtype, rng, L):
    """A NaN in one cached key makes the rows that read it NaN, and no other
    row, in paged and contiguous decode alike."""
    H, Hkv, D, bs = 4, 2, 24, 7
    k = rng.standard_normal((1, Hkv, L, D)).astype(dtype)
    v = rng.standard_normal((1, Hkv, L, D)).astype(dtype)
    q = rng.standard_normal((1, H, 1, D)).astype(dtype)
    k[0, 1, L // 2, 3] = np.nan
    kc, vc, table = _blocks_of(rng, k, v, bs)
    for got in (fastattn.paged_attention(q, kc, vc, table, [L], num_threads=threads),
                fastattn.scaled_dot_product_attention(q, k, v, num_threads=threads)):
        assert np.isnan(got[0, 2:]).all()
        assert_close(got[:, :2], ref.scaled_dot_product_attention(q, k, v)[:, :2].astype(dtype),
                     dtype)
