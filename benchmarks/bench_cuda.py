"""GPU: fastattn's SDPA on CuPy arrays against torch's math backend (the
like-for-like peer: cuBLAS GEMMs around a softmax) and its default backend
(flash or memory-efficient kernels), non-causal and causal. Rows are n/a
with the reason when no GPU path is available.

    python benchmarks/bench_cuda.py [--quick] [--dtype float64] [--out DIR]

With fastattn installed (pip install -e .), or with PYTHONPATH=. after an
in-place build. A case list on the benchmark suite; the same as
``python -m fastattn.bench --cases cuda --peers numpy``.
"""

import sys

from fastattn.bench import main

if __name__ == "__main__":
    sys.exit(main(["--cases", "cuda", "--peers", "numpy"] + sys.argv[1:]))
