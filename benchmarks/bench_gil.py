"""Is the GIL really released inside the kernels?

For each kernel, with num_threads=1 (one OpenMP thread per call):
  t1 = wall time of ONE Python thread making N calls;
  t2 = wall time of TWO Python threads making N calls EACH, concurrently.
On a machine with >= 2 free cores, t2 / t1 is ~1.0 when the GIL is released
for the whole kernel and ~2.0 when it is held. Target (issue 6): <= 1.3.
Calls take ~0.2-2 ms, so Python's own (GIL-holding) argument checking is a
few percent of a call, and inputs of ~2 MiB stay in the shared L3, so the
ratio measures the GIL rather than DRAM bandwidth. Run it on an otherwise idle machine:

    python benchmarks/bench_gil.py [--seconds 0.5] [--repeat 5]

A new kernel is one entry in KERNELS: a name and a zero-argument callable
(see the commented scaled_dot_product_attention line).
"""

import argparse
import os
import threading
import time

import numpy as np

import fastattn

rng = np.random.default_rng(0)
S4 = rng.standard_normal((4, 8, 128, 128)).astype(np.float32)      # (B, H, Lq, Lk), 2 MiB
X3 = rng.standard_normal((4, 256, 512)).astype(np.float32)          # (B, S, E), 2 MiB
KL = np.array([128, 100, 37, 1])

KERNELS = {
    "masked_softmax": lambda: fastattn.masked_softmax(S4, key_lengths=KL, is_causal=True,
                                                      num_threads=1),
    "apply_sequence_mask": lambda: fastattn.apply_sequence_mask(X3, KL, num_threads=1),
    "split_heads": lambda: fastattn.split_heads(X3, 8, num_threads=1),
    "merge_heads": lambda: fastattn.merge_heads(S4, num_threads=1),
    "sinusoidal_position_encoding": lambda: fastattn.sinusoidal_position_encoding(
        1024, 512, num_threads=1),
    "add_position_encoding": lambda: fastattn.add_position_encoding(X3, num_threads=1),
    # "scaled_dot_product_attention": lambda: fastattn.scaled_dot_product_attention(
    #     Q, K, V, is_causal=True, num_threads=1),
}


def calls_for(fn, seconds):
    """How many calls take about ``seconds`` on one thread."""
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds / 4:
        fn()
        n += 1
    return max(4, int(n * 4))


def wall(fn, n_calls, n_threads):
    barrier = threading.Barrier(n_threads + 1)

    def work():
        barrier.wait()
        for _ in range(n_calls):
            fn()

    threads = [threading.Thread(target=work) for _ in range(n_threads)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=0.5, help="target time of t1")
    ap.add_argument("--repeat", type=int, default=5, help="best of this many runs")
    args = ap.parse_args()
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"fastattn {fastattn.__version__}, isa {fastattn.get_isa()}, {ncpu} CPUs, "
          f"num_threads=1 per call")
    print(f"{'kernel':<30} {'calls':>7} {'t1 (1 thread) ms':>17} {'t2 (2 threads) ms':>18} "
          f"{'t2/t1':>6}  target <= 1.3")
    worst = 0.0
    # NumPy releases the GIL in this ufunc: its ratio is what this machine
    # can do right now (about 1.0 when two cores are free)
    control_out = np.empty_like(X3)
    rows = [("numpy multiply (control)", lambda: np.multiply(X3, 1.5, out=control_out))]
    for name, fn in list(rows) + list(KERNELS.items()):
        n = calls_for(fn, args.seconds)
        t1 = min(wall(fn, n, 1) for _ in range(args.repeat))
        t2 = min(wall(fn, n, 2) for _ in range(args.repeat))
        ratio = t2 / t1
        if name in KERNELS:
            worst = max(worst, ratio)
        flag = "ok" if ratio <= 1.3 else "SLOW"
        print(f"{name:<30} {n:>7} {t1 * 1e3:>17.1f} {t2 * 1e3:>18.1f} {ratio:>6.2f}  {flag}")
    print(f"worst ratio {worst:.2f}")


if __name__ == "__main__":
    main()
