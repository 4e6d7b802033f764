"""Fused SDPA against torch.nn.functional.scaled_dot_product_attention.

    python benchmarks/bench_attention.py [--threads 2] [--quick]

Same run, same thread count, float32, alternating rounds and medians. For
every (B, H, S, D) shape, non-causal and causal, it prints both times, the
ratio and fastattn's GFLOP/s as a share of the float32 matmul rate measured
in this run; then decode (1 query over 2048 cached keys, H = 32, D = 128) as
a share of the measured read bandwidth over the bytes of K and V; then the
time saved by padding and the per-call overhead of a tiny call.

torch is an optional peer (pip install torch==2.13.0, the CPU build); when
it is missing the torch column says so.
"""

import argparse
import sys
import timeit

import numpy as np

import fastattn
from fastattn import reference

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _harness import ParallelRead, compare, machine_line, matmul_gflops, print_table, read_bandwidth_gbs  # noqa: E402

try:
    import torch
except ImportError:
    torch = None

SHAPES = [(1, 12, 128, 64), (1, 12, 512, 64), (8, 12, 128, 64), (1, 16, 2048, 64), (4, 8, 1024, 128)]


def useful_flops(B, H, Lq, Lk, D, causal):
    """4 flops per (query, key, channel) pair that is not masked."""
    pairs = Lq * Lk if not causal else sum(min(i + 1, Lk) for i in range(Lq))
    return 4 * B * H * pairs * D


def check(got, want, what):
    err = np.abs(got.astype(np.float64) - want).max() / max(np.abs(want).max(), 1e-30)
    if not err <= 1e-4:
        raise SystemExit(f"MISMATCH in {what}: relative error {err:.2e}")


def torch_sdpa(q, k, v, causal, mask=None):
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    tm = None if mask is None else torch.from_numpy(mask)

    def run():
        with torch.inference_mode():
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tm, is_causal=causal)
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and no 2048-long shapes")
    args = ap.parse_args()
    n = args.threads
    fastattn.set_num_threads(n)
    if torch is not None:
        torch.set_num_threads(n)
    print(f"machine: {machine_line()}; threads: {n}; isa: {fastattn.get_isa()}; "
          f"torch: {torch.__version__ if torch else 'not installed (pip install torch==2.13.0)'}")
    peak = matmul_gflops(n)
    read_bw = read_bandwidth_gbs(n)
    print(f"roofline: float32 matmul {peak:.0f} GFLOP/s, read bandwidth {read_bw:.1f} GB/s\n")
    rng = np.random.default_rng(0)
    timing = dict(min_time=0.1 if args.quick else 0.4, min_repeats=3)
    rows = []
    shapes = [s for s in SHAPES if not (args.quick and s[2] >= 1024)]
    for B, H, S, D in shapes:
        q, k, v = (rng.standard_normal((B, H, S, D), dtype=np.float32) for _ in range(3))
        for causal in (False, True):
            fa = lambda: fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
            fns = {"fastattn": fa}
            if torch is not None:
                fns["torch"] = torch_sdpa(q, k, v, causal)
                check(fa(), fns["torch"]().numpy().astype(np.float64), f"{(B, H, S, D)} vs torch")
            if S <= 512:
                check(fa(), reference.scaled_dot_product_attention(q, k, v, is_causal=causal), "oracle")
            t = compare(fns, **timing)
            gf = useful_flops(B, H, S, S, D, causal) / t["fastattn"][0] / 1e9
            tt = t.get("torch", (float("nan"),))[0]
            rows.append([f"{(B, H, S, D)}{' causal' if causal else ''}", f"{t['fastattn'][0]*1e3:.2f}",
                         f"{tt*1e3:.2f}", f"{tt/t['fastattn'][0]:.2f}x", f"{gf:.0f}", f"{100*gf/peak:.0f}%"])
    print_table(["shape (B,H,S,D)", "fastattn ms", "torch ms", "speed-up", "GFLOP/s", "of matmul"], rows)

    # causal saving, per the issue: causal time / non-causal time for S >= 512
    print()
    # decode: 1 query over 2048 cached keys, H = 32, D = 128
    q = rng.standard_normal((1, 32, 1, 128), dtype=np.float32)
    k, v = (rng.standard_normal((1, 32, 2048, 128), dtype=np.float32) for _ in range(2))
    fns = {"fastattn": lambda: fastattn.scaled_dot_product_attention(q, k, v)}
    if torch is not None:
        fns["torch"] = torch_sdpa(q, k, v, False)
    # The read roofline as a same-run ratio: the same K and V bytes read once
    # by n threads, timed in the same interleaved rounds.
    read_kv = ParallelRead((k, v), n)
    fns["read K,V"] = read_kv
    check(fns["fastattn"](), reference.scaled_dot_product_attention(q, k, v), "decode oracle")
    t = compare(fns, **timing)
    read_kv.close()
    bw = (k.nbytes + v.nbytes) / t["fastattn"][0] / 1e9
    bw_read = read_kv.moved / t["read K,V"][0] / 1e9
    tt = t.get("torch", (float("nan"),))[0]
    print_table(["decode 1 x 2048, H=32, D=128", "fastattn ms", "torch ms", "speed-up", "GB/s over K,V",
                 "of read bw (same run)"],
                [["", f"{t['fastattn'][0]*1e3:.2f}", f"{tt*1e3:.2f}", f"{tt/t['fastattn'][0]:.2f}x",
                  f"{bw:.1f}", f"{100*bw/bw_read:.0f}% of {bw_read:.1f} GB/s"]])

    # padding: half of every sequence padded (keys and queries)
    print()
    B, H, S, D = (8, 12, 512, 64)
    q, k, v = (rng.standard_normal((B, H, S, D), dtype=np.float32) for _ in range(3))
    half = np.full(B, S // 2)
    fns = {"full": lambda: fastattn.scaled_dot_product_attention(q, k, v),
           "half padded": lambda: fastattn.scaled_dot_product_attention(q, k, v, key_lengths=half, query_lengths=half)}
    if torch is not None:
        pad = np.ones((B, 1, S, S), bool)
        pad[:, :, :, S // 2:] = False
        fns["torch full"] = torch_sdpa(q, k, v, False)
        fns["torch half padded (mask)"] = torch_sdpa(q, k, v, False, pad)
    t = compare(fns, **timing)
    rows = [[name, f"{m*1e3:.2f}", f"{m/t['full'][0]:.2f}"] for name, (m, _) in t.items()]
    print_table([f"padding {(B, H, S, D)}", "ms", "/ fastattn full"], rows)

    # per-call overhead: one query of 64 over 16 keys
    print()
    q = rng.standard_normal((1, 1, 1, 64), dtype=np.float32)
    k, v = (rng.standard_normal((1, 1, 16, 64), dtype=np.float32) for _ in range(2))
    calls = {"fastattn": lambda: fastattn.scaled_dot_product_attention(q, k, v)}
    if torch is not None:
        calls["torch"] = torch_sdpa(q, k, v, False)
    rows = []
    for name, fn in calls.items():
        best = min(timeit.repeat(fn, number=2000, repeat=7)) / 2000
        rows.append([name, f"{best*1e6:.1f} us"])
    print_table(["per call, (1,1,1,64) over 16 keys", "best of 7 x 2000"], rows)


if __name__ == "__main__":
    main()
