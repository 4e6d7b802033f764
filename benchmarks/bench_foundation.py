"""The foundation kernels against the NumPy oracle and same-run copies:
masked softmax (share of a copy of the scores), split and merge heads
(against NumPy's transpose and a plain copy), the position-encoding table.

    python benchmarks/bench_foundation.py [--threads 2] [--quick] [--out DIR]

With fastattn installed (pip install -e .), or with PYTHONPATH=. after an
in-place build. A case list on the benchmark suite; the same as
``python -m fastattn.bench --cases softmax,heads,pe``.
"""

import sys

from fastattn.bench import main

if __name__ == "__main__":
    sys.exit(main(["--cases", "softmax,heads,pe"] + sys.argv[1:]))
