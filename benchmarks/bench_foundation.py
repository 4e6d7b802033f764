"""Foundation kernels against the NumPy oracle and against plain copies.

    python benchmarks/bench_foundation.py [--threads 2]

Measures, in one run:
* the fused masked softmax on (8, 12, 512, 512) float32 with key_lengths,
  as a speed-up over the oracle and as a share of the copy bandwidth
  measured in the same run (bytes: the valid scores read plus the whole
  output written; the median of per-round ratios to a copy timed right
  after it);
* split and merge heads against np.ascontiguousarray(x.transpose(...)) and
  against a plain copy of the same bytes;
* the position-encoding table against the oracle.
"""

import argparse
import sys

import numpy as np

import fastattn
from fastattn import reference

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _harness import (ParallelCopy, blas_limit, compare, copy_bandwidth_gbs, machine_line,  # noqa: E402
                      median_time, paired_ratio, print_table)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    n = args.threads
    fastattn.set_num_threads(n)
    print(f"machine: {machine_line()}; threads: {n}; isa: {fastattn.get_isa()}")
    copy_bw = copy_bandwidth_gbs(n)
    print(f"copy bandwidth (read + write, {n} threads): {copy_bw:.1f} GB/s\n")
    rng = np.random.default_rng(0)
    rows = []

    # masked softmax
    # The share of copy bandwidth is a same-run ratio: a threaded copy of the
    # same 100 MB is timed right after the kernel in each of several rounds
    # (paired_ratio), apart from the oracle, whose seconds of float64 work
    # would otherwise sit between the two.
    x = rng.standard_normal((8, 12, 512, 512), dtype=np.float32)
    out = np.empty_like(x)
    copy = ParallelCopy(x, np.empty_like(x), n)
    for label, lengths in (("key_lengths U[256,512]", rng.integers(256, 513, size=8)),
                           ("key_lengths = 512", np.full(8, 512))):
        def kernel():
            fastattn.masked_softmax(x, key_lengths=lengths, out=out)

        t_kernel, t_copy, copy_over_kernel = paired_ratio(kernel, copy, min_time=0.3)
        t_oracle = median_time(lambda: reference.masked_softmax(x, key_lengths=lengths),
                               min_time=1.0, min_repeats=3, warmup=1)[0]
        moved = x.nbytes * (lengths.sum() / (8 * 512)) + out.nbytes
        share = moved / copy.moved * copy_over_kernel
        copy_now = copy.moved / t_copy / 1e9
        rows.append([f"masked_softmax (8,12,512,512) {label}", f"{t_kernel*1e3:.2f} ms",
                     f"oracle {t_oracle*1e3:.1f} ms", f"{t_oracle/t_kernel:.1f}x",
                     f"{moved / t_kernel / 1e9:.1f} GB/s = {100*share:.0f}% of copy ({copy_now:.1f} GB/s alongside)"])
    copy.close()

    # heads
    for B, S, H, D in ((8, 512, 12, 64), (4, 1024, 16, 128)):
        xs = rng.standard_normal((B, S, H * D), dtype=np.float32)
        xh = fastattn.split_heads(xs, H)
        ys = np.empty((B, H, S, D), np.float32)
        ym = np.empty((B, S, H * D), np.float32)
        flat_src, flat_dst = xs.reshape(-1), np.empty(xs.size, np.float32)
        with blas_limit(n):
            t = compare({
                "split": lambda: fastattn.split_heads(xs, H, out=ys),
                "merge": lambda: fastattn.merge_heads(xh, out=ym),
                "transpose": lambda: np.ascontiguousarray(xs.reshape(B, S, H, D).transpose(0, 2, 1, 3)),
                "copy": lambda: np.copyto(flat_dst, flat_src),
            }, min_time=0.3)
        copy_t = t["copy"][0]
        for name in ("split", "merge"):
            bw = 2 * xs.nbytes / t[name][0] / 1e9
            rows.append([f"{name}_heads {(B, S, H, D)}", f"{t[name][0]*1e3:.2f} ms",
                         f"transpose {t['transpose'][0]*1e3:.2f} ms, copy {copy_t*1e3:.2f} ms",
                         f"{t[name][0]/copy_t:.2f}x copy time",
                         f"{bw:.1f} GB/s = {100*bw/copy_bw:.0f}% of copy"])

    # position encodings
    for L, C in ((2048, 512), (16384, 1024)):
        t = compare({
            "fastattn": lambda: fastattn.sinusoidal_position_encoding(L, C),
            "oracle": lambda: reference.sinusoidal_position_encoding(L, C),
        }, min_time=0.3)
        rows.append([f"position table ({L}, {C}) float32", f"{t['fastattn'][0]*1e3:.2f} ms",
                     f"oracle {t_oracle*1e3:.1f} ms", f"{t_oracle/t_kernel:.1f}x", ""])

    print_table(["case", "fastattn", "peer", "ratio", "share of peak"], rows)


if __name__ == "__main__":
    main()
