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
    """Same keys, same split-KV schedule as contiguous decode (the sums run
    in block-sized tiles, so the bits may differ by rounding)."""
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

def _contiguous(cache, seq):
    tables, lens = cache.tables([seq])
    t = np.arange(lens[0])
    rows = tables[0, t // cache.block_size]
    return cache.key_cache[rows, t % cache.block_size], cache.value_cache[rows, t % cache.block_size]


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
