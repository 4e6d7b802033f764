"""The bfloat16 MultiHeadAttention layer against torch's bfloat16 nn.MultiheadAttention.

    python benchmarks/bench_mha_bf16.py [--threads 2] [--rounds 25] [--quick]

At E = 768, H = 12 and S = 128, 512 (one sequence), on the same thread count:

* fastattn bf16: ``MultiHeadAttention.from_torch`` of a bfloat16
  ``nn.MultiheadAttention`` (packed bf16 projections, bf16 attention);
* torch bf16: that module itself;
* fastattn fp32 and torch fp32: the same weights in float32, for reference.

Timed in alternating rounds (fastattn.bench.timing.measure_interleaved) of
short bursts (5 calls of each implementation a round), each after a 50 ms
pause that lets the previous library's worker threads go idle; medians of
the pooled calls and the best call, and the ratios of each.
``python -m fastattn.bench --dtype bfloat16 --cases mha`` times the same
layers inside the suite (with the oracle check).
Accuracy: relative RMS error of each bf16 output against the float64
oracle (fastattn.reference, 16-bit mode) on the same weights and inputs.
"""

import sys
import time

import numpy as np

import fastattn
from fastattn import reference
from fastattn.bench.scripts import blas_limit, machine_line, parse_script_args, print_table
from fastattn.bench.timing import TimingPolicy, measure_interleaved

try:
    import ml_dtypes
    import torch
except ImportError:
    sys.exit("this benchmark needs ml_dtypes and torch (pip install ml_dtypes torch)")

BF16 = np.dtype(ml_dtypes.bfloat16)
E, H = 768, 12
LENGTHS = [128, 512]
QUICK_LENGTHS = [64]


def rel_rms(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref ** 2)))


def settle():
    """Let the previous library's worker threads (torch's OpenMP, BLAS) go
    idle before the next measurement, so that they do not spin on its cores."""
    time.sleep(0.05)


def layers(S, threads, rng):
    """(callables by name, accuracy row) for one sequence of length S."""
    torch.manual_seed(int(rng.integers(1 << 30)))
    module = torch.nn.MultiheadAttention(E, H, batch_first=True).to(torch.bfloat16).eval()
    with torch.no_grad():
        module.in_proj_bias.normal_(0, 0.02)
        module.out_proj.bias.normal_(0, 0.02)
    module32 = torch.nn.MultiheadAttention(E, H, batch_first=True).eval()
    module32.load_state_dict({k: v.float() for k, v in module.state_dict().items()})
    layer = fastattn.MultiHeadAttention.from_torch(module)
    layer32 = fastattn.MultiHeadAttention.from_torch(module32)
    x = torch.randn(1, S, E).to(torch.bfloat16)
    xn = x.view(torch.int16).numpy().view(BF16)
    x32 = x.float()
    x32n = x32.numpy()

    def torch_bf16():
        with torch.inference_mode():
            return module(x, x, x, need_weights=False)[0]

    def torch_fp32():
        with torch.inference_mode():
            return module32(x32, x32, x32, need_weights=False)[0]

    fns = {"fastattn bf16": lambda: layer(xn, num_threads=threads), "torch bf16": torch_bf16,
           "fastattn fp32": lambda: layer32(x32n, num_threads=threads), "torch fp32": torch_fp32}
    ref = reference.multi_head_attention(layer.state_dict(), xn, num_heads=H)
    acc = {"fastattn bf16": rel_rms(layer(xn), ref),
           "torch bf16": rel_rms(torch_bf16().float().numpy(), ref),
           "fastattn vs torch": rel_rms(layer(xn), torch_bf16().float().numpy())}
    return fns, acc


def main():
    args, rounds = parse_script_args(__doc__, rounds=25, quick_help="a short sequence, short timings")
    # short bursts: 5 calls an implementation a round, after a pause. On a
    # shared machine under a CPU quota, second-long loops of 2-thread calls
    # were throttled into 8-24 ms stalls; bursts after a pause were not
    policy = TimingPolicy(min_time=0.0, max_time=0.5 * rounds, min_repeats=5 * rounds, warmup=1)
    torch.set_num_threads(args.threads)
    fastattn.set_num_threads(args.threads)
    print(f"# {machine_line()}; {args.threads} threads; fastattn ISA {fastattn.get_isa()}; "
          f"{rounds} alternating rounds")
    rng = np.random.default_rng(0)
    speed_rows, acc_rows = [], []
    with blas_limit(args.threads):
        for S in QUICK_LENGTHS if args.quick else LENGTHS:
            fns, acc = layers(S, args.threads, rng)
            t = measure_interleaved(fns, policy, rounds=rounds, settle=settle)
            for stat in ("median", "best"):
                v = {n: getattr(t[n], stat) for n in fns}
                speed_rows.append(
                    [f"{S}", stat] + [f"{v[n] * 1e3:.3f}" + (f" ±{t[n].spread:.0%}" if stat == "median" else "")
                                      for n in fns]
                    + [f"{v['torch bf16'] / v['fastattn bf16']:.2f}",
                       f"{v['fastattn fp32'] / v['fastattn bf16']:.2f}",
                       f"{v['torch fp32'] / v['fastattn bf16']:.2f}"])
            acc_rows.append([f"{S}"] + [f"{v:.2e}" for v in acc.values()])
    print("\nms per call: medians ±IQR/median, and the best call (the uncontended time on a "
          "shared machine); ratios: each over fastattn bf16's, same statistic")
    print_table(["S", ""] + [f"{n} ms" for n in fns] + ["torch bf16 / fastattn bf16",
                                                   "fastattn fp32 / bf16", "torch fp32 / bf16"],
                speed_rows)
    print("\nrelative RMS error against the float64 oracle (16-bit mode)")
    print_table(["S"] + list(acc), acc_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
