"""bfloat16 and float16 fused attention against fastattn's float32 and torch's SDPA.

    python benchmarks/bench_bf16_attention.py [--threads 2] [--rounds 5] [--quick]

At each (B, H, S, D), non-causal self-attention, all on the same thread count:

* fastattn bf16 at the best level (amx: AMX tiles, or avx512bf16: vdpbf16ps
  tiles, where the CPU has them), on an AMX CPU also at avx512bf16, and at
  the avx512 level (tiles widened to float32, the fallback on AVX-512 CPUs
  without AVX512_BF16);
* fastattn fp16 (F16C widening) and fastattn fp32;
* torch.nn.functional.scaled_dot_product_attention in bf16 and fp32;
* torch's bf16 matmul at 2048^3, the same-run bf16 GEMM rate every GF/s is
  also given as a share of.

Timed in alternating rounds (fastattn.bench.timing.measure_interleaved),
medians. Accuracy: the RMS error of each bf16 output against the float64
oracle on the same bf16 inputs, relative to the oracle's RMS, for fastattn
and torch side by side.
"""

import statistics
import sys

import numpy as np

import fastattn
from fastattn import reference
from fastattn.bench.scripts import blas_limit, machine_line, parse_script_args, print_table
from fastattn.bench.timing import TimingPolicy, measure_interleaved

try:
    import ml_dtypes
except ImportError:
    sys.exit("this benchmark needs ml_dtypes (pip install ml_dtypes)")
try:
    import torch
except ImportError:
    torch = None

BF16 = np.dtype(ml_dtypes.bfloat16)
SHAPES = [(1, 12, 512, 64), (1, 16, 2048, 64), (4, 8, 1024, 128)]
QUICK_SHAPES = [(1, 12, 256, 64), (1, 4, 512, 128)]


def torch_bf16(x):
    """A bf16 NumPy array as a torch bf16 tensor, no copy."""
    return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)


def rel_rms(got, ref):
    got = np.asarray(got, np.float64)
    return float(np.sqrt(np.mean((got - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))


def at_level(isa, fn):
    def run():
        fastattn.set_isa(isa)
        return fn()
    return run


def peers(shape, threads, rng):
    B, H, S, D = shape
    q, k, v = (rng.standard_normal(shape).astype(BF16) for _ in range(3))
    q32, k32, v32 = (x.astype(np.float32) for x in (q, k, v))
    q16, k16, v16 = (x.astype(np.float16) for x in (q, k, v))
    best = fastattn.available_isas()[-1]
    sdpa = fastattn.scaled_dot_product_attention
    out = {
        f"fastattn bf16 ({best})": at_level(best, lambda: sdpa(q, k, v, num_threads=threads)),
    }
    if best == "amx":  # the tiles against vdpbf16ps on the same CPU
        out["fastattn bf16 (avx512bf16)"] = at_level(
            "avx512bf16", lambda: sdpa(q, k, v, num_threads=threads))
    if best in ("avx512bf16", "amx"):
        out["fastattn bf16 (avx512)"] = at_level(
            "avx512", lambda: sdpa(q, k, v, num_threads=threads))
    out["fastattn fp16"] = at_level(best, lambda: sdpa(q16, k16, v16, num_threads=threads))
    out["fastattn fp32"] = at_level(best, lambda: sdpa(q32, k32, v32, num_threads=threads))
    if torch is not None:
        tq, tk, tv = (torch_bf16(x) for x in (q, k, v))
        fq, fk, fv = (torch.from_numpy(x) for x in (q32, k32, v32))
        F = torch.nn.functional.scaled_dot_product_attention
        out["torch bf16"] = lambda: F(tq, tk, tv)
        out["torch fp32"] = lambda: F(fq, fk, fv)
    return (q, k, v), out


def accuracy(qkv, threads):
    """Relative RMS error against the float64 oracle on the same bf16 inputs."""
    q, k, v = qkv
    ref = reference.scaled_dot_product_attention(*(x.astype(np.float64) for x in (q, k, v)))
    best = fastattn.available_isas()[-1]
    fastattn.set_isa(best)
    row = {"fastattn bf16": rel_rms(fastattn.scaled_dot_product_attention(
        q, k, v, num_threads=threads).astype(np.float64), ref)}
    row["output rounding alone"] = rel_rms(ref.astype(BF16).astype(np.float64), ref)
    if torch is not None:
        got = torch.nn.functional.scaled_dot_product_attention(*(torch_bf16(x) for x in (q, k, v)))
        row["torch bf16"] = rel_rms(got.float().numpy(), ref)
    return row


def bf16_gemm_rate(policy):
    """torch's bf16 matmul at 2048^3 in GF/s (None without torch)."""
    if torch is None:
        return None
    a = torch.randn(2048, 2048).to(torch.bfloat16)
    b = torch.randn(2048, 2048).to(torch.bfloat16)
    t = measure_interleaved({"mm": lambda: a @ b}, policy, rounds=1)["mm"]
    return 2.0 * 2048 ** 3 / t.median / 1e9


def main():
    args, rounds = parse_script_args(__doc__, rounds=5, quick_help="small shapes, short timings")
    policy = TimingPolicy.quick() if args.quick else TimingPolicy(min_time=0.3, max_time=1.5)
    if torch is not None:
        torch.set_num_threads(args.threads)
    isa_before = fastattn.get_isa()
    print(f"# {machine_line()}; {args.threads} threads; fastattn ISA levels "
          f"{fastattn.available_isas()}; {rounds} alternating rounds")
    rng = np.random.default_rng(0)
    speed_rows, acc_rows = [], []
    headers = None
    with blas_limit(args.threads):
        gemm_before = bf16_gemm_rate(policy)
        for shape in QUICK_SHAPES if args.quick else SHAPES:
            B, H, S, D = shape
            qkv, fns = peers(shape, args.threads, rng)
            flops = 4.0 * B * H * S * S * D
            t = measure_interleaved(fns, policy, rounds=rounds)
            fastattn.set_isa(isa_before)
            names = list(fns)
            ours = names[0]
            med = {n: t[n].median for n in names}
            rate = {n: flops / med[n] / 1e9 for n in names}
            row = ["x".join(map(str, shape))] + [f"{rate[n]:.0f}" for n in names]
            row.append(f"{med['fastattn fp32'] / med[ours]:.2f}")
            if "torch bf16" in med:
                row.append(f"{med['torch bf16'] / med[ours]:.2f}")
            speed_rows.append(row)
            headers = (["B x H x S x D"] + [f"{n} GF/s" for n in names]
                       + ["bf16 / own fp32 speed"]
                       + (["bf16 / torch bf16 speed"] if "torch bf16" in med else []))
            acc = accuracy(qkv, args.threads)
            acc_rows.append(["x".join(map(str, shape))] + [f"{acc[n]:.3e}" for n in acc]
                            + ([f"{acc['fastattn bf16'] / acc['torch bf16']:.2f}"]
                               if "torch bf16" in acc else []))
            acc_headers = (["B x H x S x D"] + [f"{n} rel. RMS" for n in acc]
                           + (["fastattn / torch error"] if "torch bf16" in acc else []))
            print("  ".join(row), flush=True)
        gemm_after = bf16_gemm_rate(policy)
    print("\n## speed (median of interleaved rounds)")
    print_table(headers, speed_rows)
    if gemm_before is not None:
        gemm = statistics.median([gemm_before, gemm_after])
        print(f"\nsame-run torch bf16 matmul 2048^3: {gemm_before:.0f} GF/s before, "
              f"{gemm_after:.0f} after; fastattn bf16 at "
              + ", ".join(f"{r[0]}: {float(r[1]) / gemm:.0%}" for r in speed_rows)
              + " of it")
    print("\n## accuracy: RMS error against the float64 oracle on the same bf16 inputs")
    print_table(acc_headers, acc_rows)


if __name__ == "__main__":
    main()
