"""Is the GIL released inside the kernels? Each kernel at num_threads=1 from
two Python threads against one: the wall-time ratio is about 1.0 when the
GIL is released for the whole call and about 2.0 when it is held (target
<= 1.3). A NumPy ufunc that releases the GIL is the control row: its ratio
is what the machine allows at that moment. Run it on an otherwise idle
machine with two free cores.

    python benchmarks/bench_gil.py [--quick] [--out DIR]

With fastattn installed (pip install -e .), or with PYTHONPATH=. after an
in-place build. A case list on the benchmark suite; the same as
``python -m fastattn.bench --cases gil --peers numpy``. A new kernel is one
entry in ``fastattn.bench.cases._gil_kernels``.
"""

import sys

from fastattn.bench import main

if __name__ == "__main__":
    sys.exit(main(["--cases", "gil", "--peers", "numpy"] + sys.argv[1:]))
