"""Model features against their targets, same run, same thread count:

  window   causal window=(63, 0) at 4096 keys vs full causal attention
           (target: at most 0.25x the time);
  varlen   a packed batch (B=32, H=12, D=64, lengths 1..512, mean ~64)
           through varlen_attention vs the same batch padded to 512 with
           key_lengths (target: >= 1.5x faster) and vs torch SDPA on the
           padded batch (target: >= 4x faster);
  paged    decode (Lq=1) over 2048 keys in a paged cache of block_size 16
           with shuffled blocks vs contiguous decode (target: within 10%),
           with the cache hot in the L3 and read from memory.

Usage: python benchmarks/bench_features.py [--threads 2] [--quick]
"""

import argparse

import numpy as np

import fastattn
from fastattn.bench.timing import TimingPolicy, measure, measure_interleaved


def _report(name, base_name, t, t_base, target):
    ratio = t.median / t_base.median
    print(f"  {name:<34} {t.median * 1e3:9.3f} ms  (spread {t.spread:.0%})")
    print(f"  {base_name:<34} {t_base.median * 1e3:9.3f} ms  (spread {t_base.spread:.0%})")
    print(f"  ratio {ratio:.3f}  [{target}]")
    return ratio


def bench_window(threads, policy, rng):
    B, H, L, D = 1, 8, 4096, 64
    q, k, v = (rng.standard_normal((B, H, L, D), dtype=np.float32) for _ in range(3))
    full = measure(lambda: fastattn.scaled_dot_product_attention(
        q, k, v, is_causal=True, num_threads=threads), policy)
    win = measure(lambda: fastattn.scaled_dot_product_attention(
        q, k, v, is_causal=True, window=(63, 0), num_threads=threads), policy)
    print(f"window: B={B} H={H} L={L} D={D} float32, {threads} threads")
    _report("causal window=(63, 0)", "full causal", win, full, "target <= 0.25")


def _varlen_lengths(rng, B=32, lo=1, hi=512, mean=64):
    # a geometric-like spread over [lo, hi] with the requested mean
    lengths = np.clip(rng.exponential(mean - 16, size=B).astype(np.int64) + lo, lo, hi)
    lengths[0] = hi  # the padded batch is padded to the longest (adds ~16 to the mean)
    return lengths


def bench_varlen(threads, policy, rng):
    if not hasattr(fastattn, "varlen_attention"):
        print("varlen: not built")
        return
    B, H, D = 32, 12, 64
    lengths = _varlen_lengths(rng, B)
    total, Lmax = int(lengths.sum()), int(lengths.max())
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    q, k, v = (rng.standard_normal((total, H, D), dtype=np.float32) for _ in range(3))
    padded = [np.zeros((B, H, Lmax, D), np.float32) for _ in range(3)]
    for b in range(B):
        for src, dst in zip((q, k, v), padded):
            dst[b, :, :lengths[b]] = src[cu[b]:cu[b + 1]].transpose(1, 0, 2)
    qp, kp, vp = padded
    packed = measure(lambda: fastattn.varlen_attention(q, k, v, cu, cu, is_causal=True,
                                                       num_threads=threads), policy)
    pad = measure(lambda: fastattn.scaled_dot_product_attention(
        qp, kp, vp, key_lengths=lengths, is_causal=True, num_threads=threads), policy)
    pad_ql = measure(lambda: fastattn.scaled_dot_product_attention(
        qp, kp, vp, key_lengths=lengths, query_lengths=lengths, is_causal=True,
        num_threads=threads), policy)
    print(f"varlen: B={B} H={H} D={D} lengths {lengths.min()}..{lengths.max()} "
          f"(mean {lengths.mean():.0f}), causal float32, {threads} threads")
    _report("varlen_attention (packed)", "padded + key_lengths", packed, pad,
            "target <= 1/1.5 = 0.667")
    _report("varlen_attention (packed)", "padded + key_lengths + query_lengths", packed,
            pad_ql, "information: the padded path skips padded rows too")
    try:
        import torch
    except ImportError:
        print("  torch not installed: SDPA comparison skipped")
        return
    torch.set_num_threads(threads)
    tq, tk, tv = (torch.from_numpy(x) for x in padded)
    keep = torch.from_numpy(np.arange(Lmax)[None, :] < lengths[:, None])
    causal = torch.ones(Lmax, Lmax, dtype=torch.bool).tril()
    mask = (keep[:, None, None, :] & causal[None, None]).contiguous()
    with torch.inference_mode():
        sdpa = measure(lambda: torch.nn.functional.scaled_dot_product_attention(
            tq, tk, tv, attn_mask=mask), policy)
    _report("varlen_attention (packed)", "torch SDPA (padded, bool mask)", packed, sdpa,
            "target <= 1/4 = 0.25")


def _paged_layer(rng, Hkv, L, D, bs):
    """A float32 cache held both ways: contiguous (1, Hkv, L, D) K and V, and
    the same keys in shuffled blocks of ``bs`` with their block table."""
    k = rng.standard_normal((1, Hkv, L, D), dtype=np.float32)
    v = rng.standard_normal((1, Hkv, L, D), dtype=np.float32)
    nblocks = L // bs
    order = rng.permutation(nblocks)
    kc = np.empty((nblocks, bs, Hkv, D), np.float32)
    vc = np.empty_like(kc)
    kc[order] = k[0].reshape(Hkv, nblocks, bs, D).transpose(1, 2, 0, 3)
    vc[order] = v[0].reshape(Hkv, nblocks, bs, D).transpose(1, 2, 0, 3)
    return k, v, kc, vc, order[None, :].astype(np.int32)


def bench_paged(threads, policy, rng, layers=16):
    """Two measurements of one decode shape (16 MiB of float32 cache):
    the same cache called again and again, which stays in a 32 MiB L3, and
    a cycle through ``layers`` caches (256 MiB each way), which a model's
    decode step does: each layer's cache is read once per token, so it
    comes from memory. Paged and contiguous calls alternate in rounds."""
    if not hasattr(fastattn, "paged_attention"):
        print("paged: not built")
        return
    H, Hkv, L, D, bs = 32, 8, 2048, 128, 16
    caches = [_paged_layer(rng, Hkv, L, D, bs) for _ in range(layers)]
    q = rng.standard_normal((1, H, 1, D), dtype=np.float32)
    seq = np.array([L])

    def cycling(call):
        at = [0]

        def step():
            at[0] = (at[0] + 1) % layers
            return call(*caches[at[0]])
        return step

    def paged(k, v, kc, vc, table):
        return fastattn.paged_attention(q, kc, vc, table, seq, num_threads=threads)

    def contiguous(k, v, kc, vc, table):
        return fastattn.scaled_dot_product_attention(q, k, v, num_threads=threads)

    t = measure_interleaved({
        "hot paged": lambda: paged(*caches[0]),
        "hot contiguous": lambda: contiguous(*caches[0]),
        "memory paged": cycling(paged),
        "memory contiguous": cycling(contiguous),
    }, policy, rounds=5)
    print(f"paged decode: H={H} Hkv={Hkv} keys={L} D={D} block_size={bs} shuffled, float32, "
          f"{threads} threads")
    print("  one cache called again (hot in the L3):")
    _report("paged_attention", "contiguous decode", t["hot paged"], t["hot contiguous"],
            "target <= 1.10")
    print(f"  a cycle through {layers} caches, as a model's layers (read from memory):")
    _report("paged_attention", "contiguous decode", t["memory paged"], t["memory contiguous"],
            "target <= 1.10")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="shorter timing runs")
    parser.add_argument("--only", choices=["window", "varlen", "paged"])
    args = parser.parse_args(argv)
    policy = TimingPolicy.quick() if args.quick else TimingPolicy()
    rng = np.random.default_rng(0)
    for name, fn in (("window", bench_window), ("varlen", bench_varlen), ("paged", bench_paged)):
        if args.only in (None, name):
            fn(args.threads, policy, rng)


if __name__ == "__main__":
    main()
