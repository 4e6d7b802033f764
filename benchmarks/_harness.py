"""Shared measurement helpers for the benchmark scripts.

The machines these run on are shared and noisy, so every figure is a median
of repeats, peers are timed alternately in the same run, and results are
reported as same-run ratios and as a share of rooflines measured in that
same run (float32 matmul rate, memory read and copy bandwidth).
"""

import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # threadpoolctl is in the bench/test extras
    threadpool_limits = None


def blas_limit(n):
    """Context manager pinning NumPy's BLAS to n threads (a no-op without
    threadpoolctl), so every peer runs on the same number of threads."""
    if threadpool_limits is None:
        import contextlib
        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")


def median_time(fn, min_time=0.3, min_repeats=5, max_repeats=200, warmup=2):
    """Median and interquartile spread of fn()'s wall time, in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_repeats or (time.perf_counter() - start < min_time and len(times) < max_repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), 0, max(times)]
    return statistics.median(times), q[2] - q[0]


def compare(fns, **kw):
    """Median times of several callables measured in interleaved rounds, so
    that machine noise hits every peer alike. Returns {name: (median, iqr)}."""
    rounds = {name: [] for name in fns}
    for _ in range(3):
        for name, fn in fns.items():
            rounds[name].append(median_time(fn, **kw))
    return {name: (statistics.median(m for m, _ in r), statistics.median(s for _, s in r))
            for name, r in rounds.items()}


def paired_ratio(fn, peer, rounds=7, **kw):
    """A same-run ratio for a kernel against its roofline peer: each round
    times fn and peer back to back (which goes first alternates), and the
    ratio peer time / fn time is taken per round, so that noise slower than
    a round (other tenants coming and going) cancels. Returns the medians
    of fn's times, of peer's times and of the per-round ratios."""
    tf, tp, ratio = [], [], []
    for r in range(rounds):
        if r % 2:
            tp.append(median_time(peer, **kw)[0])
            tf.append(median_time(fn, **kw)[0])
        else:
            tf.append(median_time(fn, **kw)[0])
            tp.append(median_time(peer, **kw)[0])
        ratio.append(tp[-1] / tf[-1])
    return statistics.median(tf), statistics.median(tp), statistics.median(ratio)


def matmul_gflops(threads, n=2048):
    """The machine's float32 matmul rate through NumPy's BLAS."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.T.copy()
    with blas_limit(threads):
        t, _ = median_time(lambda: a @ b, min_time=1.0)
    return 2 * n**3 / t / 1e9


def read_bandwidth_gbs(threads, mbytes=256):
    """Memory read bandwidth: a matrix-vector product streams the matrix once."""
    rows = mbytes * 2**20 // 4 // 4096
    a = np.ones((rows, 4096), dtype=np.float32)
    x = np.ones(4096, dtype=np.float32)
    with blas_limit(threads):
        t, _ = median_time(lambda: a @ x, min_time=1.0)
    return a.nbytes / t / 1e9


class ParallelCopy:
    """A callable that copies src into dst with `threads` threads, each its
    own slice (NumPy releases the GIL for copies): the copy that a kernel
    moving the same bytes is measured against. Moves 2 * src.nbytes."""

    def __init__(self, src, dst, threads):
        self.src, self.dst = src.reshape(-1), dst.reshape(-1)
        self.bounds = np.linspace(0, self.src.size, threads + 1).astype(int)
        self.pool = ThreadPoolExecutor(threads)
        self.moved = 2 * src.nbytes

    def _slice(self, i):
        lo, hi = self.bounds[i], self.bounds[i + 1]
        np.copyto(self.dst[lo:hi], self.src[lo:hi])

    def __call__(self):
        list(self.pool.map(self._slice, range(len(self.bounds) - 1)))

    def close(self):
        self.pool.shutdown()


class ParallelRead:
    """A callable that reads every byte of some arrays once with `threads`
    threads (a max over each thread's slice of each array; NumPy releases
    the GIL for reductions): the read roofline for a kernel that streams
    the same bytes. A BLAS matrix-vector product would do the same, but its
    worker threads keep spinning after each call and slow the next peer."""

    def __init__(self, arrays, threads):
        flat = [a.reshape(-1) for a in arrays]
        self.slices = [[f[f.size * t // threads:f.size * (t + 1) // threads] for f in flat]
                       for t in range(threads)]
        self.pool = ThreadPoolExecutor(threads)
        self.moved = sum(a.nbytes for a in arrays)

    @staticmethod
    def _read(parts):
        for p in parts:
            p.max()

    def __call__(self):
        list(self.pool.map(self._read, self.slices))

    def close(self):
        self.pool.shutdown()


def copy_bandwidth_gbs(threads, mbytes=256):
    """Copy bandwidth (bytes read + bytes written per second) with `threads`
    threads."""
    n = mbytes * 2**20 // 4
    copy = ParallelCopy(np.ones(n, dtype=np.float32), np.empty(n, dtype=np.float32), threads)
    t, _ = median_time(copy, min_time=1.0)
    copy.close()
    return copy.moved / t / 1e9


def machine_line():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {ncpu} CPUs available"


def print_table(headers, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = " | ".join(f"{h:<{w}}" for h, w in zip(headers, widths))
    print(line)
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(f"{str(c):<{w}}" for c, w in zip(r, widths)))
