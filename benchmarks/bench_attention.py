"""Fused SDPA against torch SDPA and onnxruntime: non-causal and causal, half
padded, decode (share of the read bandwidth) and the per-call cost.

    python benchmarks/bench_attention.py [--threads 2] [--quick] [--out DIR]

With fastattn installed (pip install -e .), or with PYTHONPATH=. after an
in-place build. A case list on the benchmark suite; the same as
``python -m fastattn.bench --cases sdpa,causal,padded,decode,overhead``.
"""

import sys

from fastattn.bench import main

if __name__ == "__main__":
    sys.exit(main(["--cases", "sdpa,causal,padded,decode,overhead"] + sys.argv[1:]))
