"""Is the GIL really released inside the kernels?

For each kernel, with num_threads=1 (one OpenMP thread per call):
  t1 = wall time of ONE Python thread making N calls;
  t2 = wall time of TWO Python threads making N calls EACH, concurrently.
On a machine with >= 2 free cores, t2 / t1 is ~1.0 when the GIL is released
for the whole kernel and ~2.0 when it is held. Target (issue 6): <= 1.3.
Calls take ~0.2-2 ms, so Python's own (GIL-holding) argument checking is a
few percent of a call. Each thread writes into its own preallocated out=,
so that page faults on fresh output buffers (which serialise on the kernel's
memory-map lock) do not pass for GIL contention; --fresh measures with a new
output per call instead. One- and two-thread runs alternate and the best of
--repeat is kept. A NumPy ufunc that releases the GIL is the control row: its
ratio is what the machine can do at that moment (near 1.0 with two free
cores; near 2.0 when something else is using a core, and then no row means
anything). Run it on an otherwise idle machine:

    python benchmarks/bench_gil.py [--seconds 0.5] [--repeat 5] [--fresh]

A new kernel is one entry in KERNELS: a name and a callable taking ``o``,
where ``o(shape)`` is the calling thread's output buffer of that shape, or
None with --fresh.
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
Q, K, V = (rng.standard_normal((1, 8, 256, 64)).astype(np.float32) for _ in range(3))  # ~5 ms

_local = threading.local()
FRESH = False


def o(shape, dtype=np.float32):
    """This thread's reusable output of ``shape`` (None with --fresh)."""
    if FRESH:
        return None
    bufs = _local.__dict__.setdefault("bufs", {})
    if shape not in bufs:
        bufs[shape] = np.empty(shape, dtype)
    return bufs[shape]


KERNELS = {
    "masked_softmax": lambda o: fastattn.masked_softmax(
        S4, key_lengths=KL, is_causal=True, num_threads=1, out=o(S4.shape)),
    "apply_sequence_mask": lambda o: fastattn.apply_sequence_mask(
        X3, KL, num_threads=1, out=o(X3.shape)),
    "split_heads": lambda o: fastattn.split_heads(X3, 8, num_threads=1, out=o((4, 8, 256, 64))),
    "merge_heads": lambda o: fastattn.merge_heads(S4, num_threads=1, out=o((4, 128, 1024))),
    "sinusoidal_position_encoding": lambda o: fastattn.sinusoidal_position_encoding(
        1024, 512, num_threads=1, out=o((1024, 512))),
    "add_position_encoding": lambda o: fastattn.add_position_encoding(
        X3, num_threads=1, out=o(X3.shape)),
    "scaled_dot_product_attention": lambda o: fastattn.scaled_dot_product_attention(
        Q, K, V, is_causal=True, num_threads=1, out=o(Q.shape)),
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
    ap.add_argument("--fresh", action="store_true", help="a new output array per call")
    args = ap.parse_args()
    global FRESH
    FRESH = args.fresh
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"fastattn {fastattn.__version__}, isa {fastattn.get_isa()}, {ncpu} CPUs, "
          f"num_threads=1 per call, {'fresh outputs' if FRESH else 'out= per thread'}")
    print(f"{'kernel':<30} {'calls':>7} {'t1 (1 thread) ms':>17} {'t2 (2 threads) ms':>18} "
          f"{'t2/t1':>6}  target <= 1.3")
    worst = 0.0
    # NumPy releases the GIL in this ufunc: its ratio is what this machine
    # can do right now (about 1.0 when two cores are free)
    rows = [("numpy multiply (control)", lambda o: np.multiply(X3, 1.5, out=o(X3.shape)))]
    for name, kernel in list(rows) + list(KERNELS.items()):
        fn = lambda kernel=kernel: kernel(o)  # noqa: E731
        n = calls_for(fn, args.seconds)
        t1s, t2s = [], []
        for _ in range(args.repeat):
            t1s.append(wall(fn, n, 1))
            t2s.append(wall(fn, n, 2))
        t1, t2 = min(t1s), min(t2s)
        ratio = t2 / t1
        if name in KERNELS:
            worst = max(worst, ratio)
        flag = "ok" if ratio <= 1.3 else "SLOW"
        print(f"{name:<30} {n:>7} {t1 * 1e3:>17.1f} {t2 * 1e3:>18.1f} {ratio:>6.2f}  {flag}")
    print(f"worst ratio {worst:.2f}")


if __name__ == "__main__":
    main()
