"""Decode at memory bandwidth: one query row against a KV cache stored in
float32, bfloat16, float16 or int8, and a greedy decode through a small
stack of layers with each narrow cache against the float32 one.

    python benchmarks/bench_decode.py [--threads N] [--quick] [--out DIR]
    python benchmarks/bench_decode.py --cases decode_lengths --plot docs/figures/kv_decode.png

With fastattn installed (pip install -e .), or with PYTHONPATH=. after an
in-place build. A case list on the benchmark suite, on 2 threads unless
--threads says otherwise; the same as
``python -m fastattn.bench --cases decode,greedy --threads 2``. Options
given here come after these, so that --cases and --threads override them.
"""

import sys

from fastattn.bench import main

if __name__ == "__main__":
    sys.exit(main(["--cases", "decode,greedy", "--threads", "2"] + sys.argv[1:]))
