"""What the benchmark tests (test_bench_cli.py, test_bench_suite.py) share:
a Reporter stand-in, a timing policy short enough for tests, and a fixed
roofline so that no test measures the machine."""

from fastattn.bench import timing
from fastattn.bench.roofline import Roofline

FAST = timing.TimingPolicy(min_time=0.0, max_time=0.05, min_repeats=2, warmup=1)
ROOF = Roofline(matmul_gflops=100.0, read_gbs=10.0, matmul_size=8, read_bytes=8, dtype="float32")


class Recorder:
    """A Reporter stand-in that keeps what it was told."""

    def __init__(self):
        self.notes, self.alarms = [], []

    def note(self, text):
        self.notes.append(text)

    def alarm(self, text):
        self.alarms.append(text)
