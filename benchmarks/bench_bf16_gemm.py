"""The 16-bit GEMM (fastattn.bf16_gemm) against torch's bf16 matmul and NumPy's sgemm.

    python benchmarks/bench_bf16_gemm.py [--threads 2] [--rounds 5] [--quick]

c (M, N) = a (M, K) . w (N, K)^T, the projection of a layer (M tokens, N = 3E
or E, K = E = 768) and 2048^3, all on the same thread count:

* fastattn bf16 at the best level (amx: AMX tiles, or avx512bf16: vdpbf16ps,
  where the CPU has them), bf16 output, the weight packed beforehand as a
  layer packs it once; on an AMX CPU also at avx512bf16, for the ratio;
* fastattn bf16 at the avx512 level (bf16 widened to float32 in registers,
  FMA): the fallback on AVX-512 CPUs without AVX512_BF16;
* fastattn fp16 (F16C widening, FMA);
* torch.nn.functional.linear on bf16 tensors (oneDNN inside torch);
* NumPy float32 matmul (OpenBLAS sgemm), the float32 baseline.

The peers are timed in alternating rounds (fastattn.bench.timing.measure
per peer and round). Two tables: from each round's median call time, and
from each round's fastest call (on a shared machine the one least disturbed
by other load); each gives the median GF/s over rounds and the median of
the same-round ratios.
"""

import statistics
import sys

import numpy as np

import fastattn
from fastattn import bf16_gemm
from fastattn.bench.scripts import blas_limit, machine_line, parse_script_args, print_table
from fastattn.bench.timing import TimingPolicy, measure

try:
    import ml_dtypes
except ImportError:
    sys.exit("this benchmark needs ml_dtypes (pip install ml_dtypes)")
try:
    import torch
except ImportError:
    torch = None

BF16 = np.dtype(ml_dtypes.bfloat16)
LAYER_SHAPES = [(128, 2304, 768), (128, 768, 768), (512, 2304, 768), (512, 768, 768)]
BIG = (2048, 2048, 2048)


def _peers(M, N, K, threads, rng):
    a = rng.standard_normal((M, K)).astype(BF16)
    w = rng.standard_normal((N, K)).astype(BF16)
    packed = bf16_gemm.PackedWeight(w)
    out = np.empty((M, N), BF16)
    a16, w16 = a.astype(np.float16), w.astype(np.float16)
    packed16 = bf16_gemm.PackedWeight(w16)
    out16 = np.empty((M, N), np.float16)
    a32, w32t = a.astype(np.float32), np.ascontiguousarray(w.astype(np.float32)).T
    out32 = np.empty((M, N), np.float32)
    best = fastattn.available_isas()[-1]

    def at_level(isa, fn):
        def run():
            fastattn.set_isa(isa)
            return fn()
        return run

    peers = {
        f"fastattn bf16 ({best})": at_level(
            best, lambda: bf16_gemm.matmul(a, packed, out=out, num_threads=threads)),
    }
    if best == "amx":  # the tiles against vdpbf16ps on the same CPU
        peers["fastattn bf16 (avx512bf16)"] = at_level(
            "avx512bf16", lambda: bf16_gemm.matmul(a, packed, out=out, num_threads=threads))
    if best in ("avx512bf16", "amx"):
        peers["fastattn bf16 (avx512)"] = at_level(
            "avx512", lambda: bf16_gemm.matmul(a, packed, out=out, num_threads=threads))
    peers["fastattn fp16"] = at_level(
        best, lambda: bf16_gemm.matmul(a16, packed16, out=out16, num_threads=threads))
    if torch is not None:
        ta = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        tw = torch.from_numpy(w.view(np.int16)).view(torch.bfloat16)
        peers["torch bf16"] = lambda: torch.nn.functional.linear(ta, tw)
    peers["numpy fp32"] = lambda: np.matmul(a32, w32t, out=out32)
    return peers


def main():
    args, rounds = parse_script_args(__doc__, rounds=5, quick_help="short timings, 2 rounds")
    policy = TimingPolicy.quick() if args.quick else TimingPolicy(min_time=0.2, max_time=1.0)
    if torch is not None:
        torch.set_num_threads(args.threads)
    isa_before = fastattn.get_isa()
    print(f"# {machine_line()}; {args.threads} threads; fastattn ISA levels "
          f"{fastattn.available_isas()}; {rounds} alternating rounds")
    rng = np.random.default_rng(0)
    tables = {"median": [], "best": []}
    headers = None
    with blas_limit(args.threads):
        for M, N, K in LAYER_SHAPES + [BIG]:
            peers = _peers(M, N, K, args.threads, rng)
            flops = 2.0 * M * N * K
            times = {stat: {name: [] for name in peers} for stat in tables}
            for _ in range(rounds):
                for name, fn in peers.items():
                    t = measure(fn, policy)
                    times["median"][name].append(t.median)
                    times["best"][name].append(t.best)
            fastattn.set_isa(isa_before)
            names = list(peers)
            ours = names[0]
            others = [p for p in ("torch bf16", "numpy fp32") if p in peers]
            headers = ["M x N x K"] + [f"{n} GF/s" for n in names]
            headers += [f"{ours.split(' (')[0]} / {p} speed" for p in others]
            for stat, table in tables.items():
                # GF/s: the median over rounds of each round's statistic; the
                # ratio: the median over rounds of the same-round ratios
                row = [f"{M}x{N}x{K}"]
                row += [f"{flops / statistics.median(times[stat][n]) / 1e9:.0f}" for n in names]
                row += [f"{statistics.median(p / o for o, p in zip(times[stat][ours], times[stat][peer])):.2f}"
                        for peer in others]
                table.append(row)
            print("  ".join(tables["median"][-1]), flush=True)
    for stat, table in tables.items():
        print(f"\n## per round: the {stat} call time", "(the fastest call: the least disturbed by other load)"
              if stat == "best" else "")
        print_table(headers, table)

if __name__ == "__main__":
    main()
