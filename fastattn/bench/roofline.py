"""The machine's ceilings, measured in the same run as the cases.

* compute: the matrix-multiply rate of NumPy's BLAS on an ``n × n`` product
  (``2 n³`` flops) in the run's dtype;
* memory: the read bandwidth of a matrix-vector product over a matrix much
  larger than the last-level cache (BLAS gemv streams the matrix once).

Both run under the same thread count as every case (threadpoolctl holds the
BLAS pool to it), and both report the best repeat: a ceiling is what the
machine can do, not what it does on average.
"""

import dataclasses

import numpy as np

from fastattn.bench.timing import TimingPolicy, measure


@dataclasses.dataclass
class Roofline:
    matmul_gflops: float
    read_gbs: float
    matmul_size: int
    read_bytes: int
    dtype: str

    def as_dict(self):
        return dataclasses.asdict(self)

    def share(self, kind, rate):
        """``rate`` (GFLOP/s for ``kind="flop"``, GB/s for ``"byte"``) as a
        fraction of the matching ceiling."""
        ceiling = self.matmul_gflops if kind == "flop" else self.read_gbs
        return rate / ceiling if ceiling > 0 else float("nan")


def measure_roofline(dtype=np.float32, *, quick=False, policy=None):
    """Measure the matmul rate and read bandwidth for ``dtype``."""
    dtype = np.dtype(dtype)
    policy = policy or (TimingPolicy.quick() if quick else TimingPolicy(min_time=0.5, min_repeats=3))
    rng = np.random.default_rng(0)

    n = 1024 if quick else 2048
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    mm = measure(lambda: a @ b, policy)
    del a, b

    read_bytes = (128 if quick else 256) << 20
    cols = 2048
    rows = read_bytes // (cols * dtype.itemsize)
    m = np.ones((rows, cols), dtype=dtype)
    x = np.ones(cols, dtype=dtype)
    mv = measure(lambda: m @ x, policy)
    nbytes = m.nbytes
    del m

    return Roofline(
        matmul_gflops=2.0 * n**3 / mm.best / 1e9,
        read_gbs=nbytes / mv.best / 1e9,
        matmul_size=n,
        read_bytes=nbytes,
        dtype=dtype.name,
    )
