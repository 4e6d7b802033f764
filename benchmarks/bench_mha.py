"""The MultiHeadAttention layer against torch.nn.MultiheadAttention: all keys
valid and half padded (with the projections alone as the same-run GEMM
floor), and one decode step over a KVCache.

    python benchmarks/bench_mha.py [--threads 2] [--quick] [--out DIR]

With fastattn installed (pip install -e .), or with PYTHONPATH=. after an
in-place build. A case list on the benchmark suite; the same as
``python -m fastattn.bench --cases mha,mha_decode``.
"""

import sys

from fastattn.bench import main

if __name__ == "__main__":
    sys.exit(main(["--cases", "mha,mha_decode"] + sys.argv[1:]))
