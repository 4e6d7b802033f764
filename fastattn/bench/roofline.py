"""The machine's ceilings, measured in the same run as the cases.

* compute: the matrix-multiply rate of NumPy's BLAS on an ``n × n`` product
  (``2 n³`` flops) in the run's dtype;
* memory: the read bandwidth of a matrix-vector product over a matrix much
  larger than the last-level cache (BLAS gemv streams the matrix once).

Both run under the same thread count as every case (threadpoolctl holds the
BLAS pool to it). A ceiling is what the machine can do, not what it does on
average, so each probe keeps its best repeat; and because one probe taken
at a busy moment would understate the ceiling (and overstate every share),
the runner probes again after every row and the ceiling is the best of all
probes in the run (:class:`RooflineProbe`).

A row is marked *busy* when the probes just before and just after it
disagree by more than :data:`BUSY_FRACTION` on either ceiling (something
else took the cores while it ran), or when its share of the final ceiling
exceeds 100% (the probes never saw the machine as free as the row did).
"""

import dataclasses

import numpy as np

from fastattn.bench.timing import TimingPolicy, measure

# Two probes a few hundred milliseconds apart on an idle machine agree
# within about 10% (the best of three short repeats); a quarter apart means
# another process took a share of the cores or the memory bus in between.
BUSY_FRACTION = 0.25


@dataclasses.dataclass
class Roofline:
    matmul_gflops: float
    read_gbs: float
    matmul_size: int
    read_bytes: int
    dtype: str
    probes: int = 1
    matmul_gflops_range: tuple = None
    read_gbs_range: tuple = None

    def as_dict(self):
        return dataclasses.asdict(self)

    def share(self, kind, rate):
        """``rate`` (GFLOP/s for ``kind="flop"``, GB/s for ``"byte"``) as a
        fraction of the matching ceiling; None for other units."""
        if kind not in ("flop", "byte"):
            return None
        ceiling = self.matmul_gflops if kind == "flop" else self.read_gbs
        return rate / ceiling if ceiling > 0 else float("nan")


def disagreement(a, b):
    """How far two probes ``(gflops, gbs)`` are apart: the larger relative
    difference of the two ceilings (0.25 = one is 25% above the other)."""
    return max(max(x, y) / min(x, y) - 1.0 if min(x, y) > 0 else float("inf")
               for x, y in zip(a, b))


class RooflineProbe:
    """Repeated measurements of both ceilings over the same buffers.

    ``probe()`` takes one short measurement, ``(gflops, gbs)``, and keeps
    it; ``roofline()`` is the best of every probe so far. The buffers
    (an ``n × n`` pair and a matrix of ``read_bytes``) are allocated once.
    """

    def __init__(self, dtype=np.float32, *, quick=False):
        self.dtype = np.dtype(dtype)
        rng = np.random.default_rng(0)
        # 1024² is large enough for BLAS to reach its rate on a few cores
        # and short enough (~20 ms at 100 GFLOP/s) to probe between rows.
        self.n = 1024
        self._a = rng.standard_normal((self.n, self.n)).astype(self.dtype)
        self._b = rng.standard_normal((self.n, self.n)).astype(self.dtype)
        # Several times any last-level cache, so that gemv reads memory.
        read_bytes = (128 if quick else 256) << 20
        cols = 2048
        # bfloat16 / float16: NumPy has no BLAS for them (its loops are
        # orders of magnitude slower), so the matmul is fastattn's packed
        # 16-bit GEMM (fastattn.bf16_gemm, the layer's projections) and the
        # read is a float32 gemv over the same bytes
        self._half = self.dtype.itemsize == 2
        read_dtype = np.dtype(np.float32) if self._half else self.dtype
        self._m = np.ones((read_bytes // (cols * read_dtype.itemsize), cols), dtype=read_dtype)
        self._x = np.ones(cols, dtype=read_dtype)
        if self._half:
            from fastattn.bf16_gemm import PackedWeight

            self._b = PackedWeight(self._b)
        self.samples = []

    def probe(self, policy=None):
        """One measurement of both ceilings (best repeat of each)."""
        policy = policy or TimingPolicy(min_time=0.0, max_time=0.5, min_repeats=3, warmup=1)
        a, b, m, x = self._a, self._b, self._m, self._x
        if self._half:
            from fastattn.bf16_gemm import matmul

            mm = measure(lambda: matmul(a, b), policy)
        else:
            mm = measure(lambda: a @ b, policy)
        mv = measure(lambda: m @ x, policy)
        sample = (2.0 * self.n**3 / mm.best / 1e9, m.nbytes / mv.best / 1e9)
        self.samples.append(sample)
        return sample

    def roofline(self):
        gflops = [s[0] for s in self.samples]
        gbs = [s[1] for s in self.samples]
        return Roofline(matmul_gflops=max(gflops), read_gbs=max(gbs), matmul_size=self.n,
                        read_bytes=self._m.nbytes, dtype=self.dtype.name,
                        probes=len(self.samples),
                        matmul_gflops_range=(min(gflops), max(gflops)),
                        read_gbs_range=(min(gbs), max(gbs)))

    def release(self):
        self._a = self._b = self._m = self._x = None


def measure_roofline(dtype=np.float32, *, quick=False, probes=3):
    """Measure the matmul rate and read bandwidth for ``dtype``: the best of
    ``probes`` probes taken back to back."""
    probe = RooflineProbe(dtype, quick=quick)
    for _ in range(probes):
        probe.probe()
    roof = probe.roofline()
    probe.release()
    return roof
