"""Decode at memory bandwidth: one query row against a KV cache stored in
float32, bfloat16, float16 or int8, same run, same thread count.

For each cache shape (H=32 query heads, D=128, 1 query):
  * fastattn with each kv_dtype: time, the bytes it must read (K, V and the
    int8 scales, once), GB/s, share of the read bandwidth measured in the
    same run on a buffer of the float32 cache's size (a BLAS matrix-vector
    product, which streams its matrix once), time relative to the float32
    cache, and the cosine of the output against the float32-cache output;
  * torch SDPA with float32 and bfloat16 K/V (and q) on the same shapes.
Targets: float32 >= 85% of the bandwidth; bfloat16 <= 0.55x and int8
<= 0.30x the float32 time; cosine int8 >= 0.9999, bfloat16 >= 0.99999.

  python benchmarks/bench_decode.py [--threads 2] [--quick] [--plot docs/figures/kv_decode.png]

--plot also times decode against the cache length (H=Hkv=32, S = 256 ..
8192) for each kv_dtype and torch, and saves the figure (matplotlib).
Run from a source tree after `python setup.py build_ext --inplace`.
"""

import argparse

import numpy as np

import fastattn
from fastattn.bench.timing import TimingPolicy, measure

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # only the bandwidth probe's thread count depends on it
    threadpool_limits = None

H, D = 32, 128
CASES = [  # (B, Hkv, S)
    (1, 32, 2048),
    (1, 8, 8192),
    (1, 32, 8192),
    (8, 32, 2048),
    (8, 8, 8192),
]
KV_DTYPES = ["float32", "bfloat16", "float16", "int8"]


def read_bandwidth(nbytes, threads, policy):
    """GB/s of a float32 matrix-vector product over an nbytes matrix (best
    repeat), BLAS held to `threads`."""
    cols = 2048
    m = np.ones((max(1, nbytes // (cols * 4)), cols), np.float32)
    x = np.ones(cols, np.float32)
    if threadpool_limits is None:
        t = measure(lambda: m @ x, policy)
    else:
        with threadpool_limits(limits=threads, user_api="blas"):
            t = measure(lambda: m @ x, policy)
    return m.nbytes / t.best / 1e9


def make_cache(rng, B, Hkv, S):
    """q and the K/V cache in every storage, with the attention kwargs."""
    import ml_dtypes

    q = rng.standard_normal((B, H, 1, D), dtype=np.float32)
    k = rng.standard_normal((B, Hkv, S, D), dtype=np.float32)
    v = rng.standard_normal((B, Hkv, S, D), dtype=np.float32)
    stores = {"float32": (k, v, {})}
    for name, dt in (("bfloat16", ml_dtypes.bfloat16), ("float16", np.float16)):
        stores[name] = (k.astype(dt), v.astype(dt), {})
    kq, ks = fastattn.quantize_kv(k)
    vq, vs = fastattn.quantize_kv(v)
    stores["int8"] = (kq, vq, {"k_scale": ks, "v_scale": vs})
    return q, stores


def cache_bytes(store):
    k, v, kw = store
    return k.nbytes + v.nbytes + sum(a.nbytes for a in kw.values())


def torch_decode(q, k, v, threads, dtype_name):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    dt = getattr(torch, dtype_name)
    tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(a)).to(dt) for a in (q, k, v))
    gqa = k.shape[1] != q.shape[1]

    def run():
        with torch.inference_mode():
            return F.scaled_dot_product_attention(tq, tk, tv, enable_gqa=gqa)
    return run


def cosine(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def bench_case(B, Hkv, S, threads, policy, rng, with_torch):
    q, stores = make_cache(rng, B, Hkv, S)
    bw = read_bandwidth(cache_bytes(stores["float32"]), threads, policy)
    print(f"\ndecode B={B} H={H} Hkv={Hkv} S={S} D={D}, {threads} threads; "
          f"read bandwidth {bw:.1f} GB/s on {cache_bytes(stores['float32']) / 2**20:.0f} MiB")
    print(f"  {'kv_dtype':<16}{'ms':>9}{'MiB':>8}{'GB/s':>8}{'of BW':>8}{'x fp32':>8}{'cosine':>10}")
    ref = fastattn.scaled_dot_product_attention(q, *stores["float32"][:2], num_threads=threads)
    rows = {}
    for name in KV_DTYPES:
        k, v, kw = stores[name]
        t = measure(lambda: fastattn.scaled_dot_product_attention(q, k, v, num_threads=threads,
                                                                  **kw), policy)
        out = fastattn.scaled_dot_product_attention(q, k, v, num_threads=threads, **kw)
        rows[name] = t.median
        nbytes = cache_bytes(stores[name])
        gbs = nbytes / t.median / 1e9
        print(f"  {name:<16}{t.median * 1e3:9.3f}{nbytes / 2**20:8.0f}{gbs:8.1f}{gbs / bw:8.0%}"
              f"{t.median / rows['float32']:8.2f}{cosine(out, ref):10.6f}")
    if with_torch:
        k, v, _ = stores["float32"]
        for name in ("float32", "bfloat16"):
            t = measure(torch_decode(q, k, v, threads, name), policy)
            nbytes = cache_bytes(stores["float32"]) // (1 if name == "float32" else 2)
            gbs = nbytes / t.median / 1e9
            print(f"  {'torch ' + name:<16}{t.median * 1e3:9.3f}{nbytes / 2**20:8.0f}{gbs:8.1f}"
                  f"{gbs / bw:8.0%}{t.median / rows['float32']:8.2f}")
    return rows


def plot(path, threads, policy, rng, with_torch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [256, 512, 1024, 2048, 4096, 8192]
    series = {name: [] for name in KV_DTYPES}
    if with_torch:
        series.update({"torch float32": [], "torch bfloat16": []})
    for S in lengths:
        q, stores = make_cache(rng, 1, 32, S)
        for name in KV_DTYPES:
            k, v, kw = stores[name]
            series[name].append(measure(lambda: fastattn.scaled_dot_product_attention(
                q, k, v, num_threads=threads, **kw), policy).median * 1e3)
        if with_torch:
            k, v, _ = stores["float32"]
            for name in ("float32", "bfloat16"):
                series["torch " + name].append(
                    measure(torch_decode(q, k, v, threads, name), policy).median * 1e3)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, ys in series.items():
        ax.plot(lengths, ys, marker="o", linestyle="--" if name.startswith("torch") else "-",
                label=("fastattn " + name) if not name.startswith("torch") else name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("cache length (keys)")
    ax.set_ylabel("decode time per call (ms)")
    ax.set_title(f"Decode, H=Hkv=32, D=128, 1 query, {threads} threads")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"saved {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="first case only, short timing")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--plot", metavar="PATH", help="also plot time against cache length")
    args = parser.parse_args(argv)
    policy = TimingPolicy.quick() if args.quick else TimingPolicy(min_time=0.5, min_repeats=5)
    rng = np.random.default_rng(0)
    with_torch = not args.no_torch
    if with_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            with_torch = False
    for B, Hkv, S in CASES[:1] if args.quick else CASES:
        bench_case(B, Hkv, S, args.threads, policy, rng, with_torch)
    if args.plot:
        plot(args.plot, args.threads, policy, rng, with_torch)


if __name__ == "__main__":
    main()
