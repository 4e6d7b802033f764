"""GPU benchmark: fastattn.cuda SDPA against torch SDPA (math backend and
default backend), side by side in one run, float32.

    python benchmarks/bench_cuda.py [--repeat 20] [--dtype float32]

The math backend (torch.nn.attention.sdpa_kernel(SDPBackend.MATH)) is the
like-for-like peer: it too is cuBLAS GEMMs around a softmax. The default
backend picks flash / memory-efficient kernels and is listed for context.
Target (issue 7): fastattn >= 1.0x the math backend.

Shapes are the fused-attention issue's, scaled up for a GPU. Exits with a
message (status 0) when no GPU path is available.
"""

import argparse
import os
import sys

import numpy as np

# run from a source checkout built in place, as the other benchmarks are
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = [  # (B, H, Lq, Lk, D)
    (8, 12, 512, 512, 64),
    (8, 16, 1024, 1024, 64),
    (8, 16, 2048, 2048, 64),
    (4, 8, 2048, 2048, 128),
    (1, 16, 4096, 4096, 64),
    (32, 32, 1, 2048, 128),  # decode: one query over a 2048-key cache
]


def _time_ms(fn, cupy, repeat):
    """Median of `repeat` timed runs (after 3 warm-ups), CUDA events."""
    for _ in range(3):
        fn()
    cupy.cuda.get_current_stream().synchronize()
    times = []
    for _ in range(repeat):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = parser.parse_args()

    import fastattn.cuda as fcuda

    if not fcuda.is_available():
        print(f"bench_cuda: no GPU path available, nothing to measure: {fcuda.unavailable_reason()}")
        return 0
    import cupy

    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        have_torch = torch.cuda.is_available()
    except ImportError:
        have_torch = False
    if not have_torch:
        print("bench_cuda: torch with CUDA is not installed; timing fastattn only")

    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    print(f"device: {name}, fastattn._cuda runtime/driver: {fcuda._extension().versions()}")
    if have_torch:
        print(f"torch {torch.__version__}, TF32 matmul allowed: {torch.backends.cuda.matmul.allow_tf32}")
    dtype = np.dtype(args.dtype)
    header = (f"{'(B,H,Lq,Lk,D)':<26}{'causal':>7}{'fastattn ms':>13}{'torch math':>12}{'ratio':>8}"
              f"{'torch dflt':>12}{'TFLOP/s':>9}")
    print(header)
    print("-" * len(header))
    rng = cupy.random.default_rng(0)
    for B, H, Lq, Lk, D in SHAPES:
        for causal in (False, True):
            if causal and Lq == 1:
                continue
            q = rng.standard_normal((B, H, Lq, D), dtype=dtype)
            k = rng.standard_normal((B, H, Lk, D), dtype=dtype)
            v = rng.standard_normal((B, H, Lk, D), dtype=dtype)
            out = cupy.empty_like(q)
            fa = _time_ms(lambda: fcuda.scaled_dot_product_attention(
                q, k, v, is_causal=causal, out=out), cupy, args.repeat)
            flops = 4.0 * B * H * Lq * Lk * D
            row = f"{str((B, H, Lq, Lk, D)):<26}{str(causal):>7}{fa:>13.3f}"
            if have_torch:
                tq, tk, tv = (torch.from_dlpack(a) for a in (q, k, v))
                ptr = cupy.cuda.get_current_stream().ptr  # run torch on the timed stream
                stream = torch.cuda.ExternalStream(ptr) if ptr else torch.cuda.default_stream()

                def torch_call(backend=None):
                    with torch.cuda.stream(stream):
                        if backend is None:
                            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
                        with sdpa_kernel(backend):
                            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

                with torch.inference_mode():
                    tm = _time_ms(lambda: torch_call(SDPBackend.MATH), cupy, args.repeat)
                    td = _time_ms(lambda: torch_call(), cupy, args.repeat)
                row += f"{tm:>12.3f}{tm / fa:>8.2f}{td:>12.3f}"
            else:
                row += f"{'-':>12}{'-':>8}{'-':>12}"
            row += f"{flops / fa / 1e9:>9.1f}"
            print(row)
    print("ratio = torch math time / fastattn time (> 1: fastattn faster). "
          "Causal rows: fastattn computes the full GEMMs (like the math backend) and masks in the softmax.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
