"""Wall-clock timing: warm-up, repeat until a minimum time, median and spread."""

import dataclasses
import gc
import statistics
import time


@dataclasses.dataclass
class Timing:
    """Seconds per call of one implementation on one case."""

    median: float
    q1: float
    q3: float
    best: float
    worst: float
    repeats: int

    @property
    def spread(self):
        """Interquartile range relative to the median (0.05 = ±5% spread)."""
        return (self.q3 - self.q1) / self.median if self.median > 0 else 0.0

    def as_dict(self):
        d = dataclasses.asdict(self)
        d["spread"] = self.spread
        return d


@dataclasses.dataclass
class TimingPolicy:
    """How long to measure each call.

    Calls are repeated until ``min_time`` seconds have passed and at least
    ``min_repeats`` calls were made; a slow call stops at ``max_time`` with
    at least one timed call. ``warmup`` untimed calls come first.
    """

    min_time: float = 0.3
    max_time: float = 2.0
    min_repeats: int = 5
    warmup: int = 1

    @classmethod
    def quick(cls):
        return cls(min_time=0.04, max_time=0.25, min_repeats=3, warmup=1)


def _quantile(sorted_values, q):
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def measure(fn, policy=None, *, first=None):
    """Time ``fn()`` under ``policy`` and return a :class:`Timing`.

    Slow calls (a quarter of ``max_time`` or more) need no warm-up: a
    warm-up call that slow counts as the first sample, and ``first``, the
    duration of a call just made (the check before timing), is then the
    only sample and ``fn`` is not called again. The garbage collector is
    paused while timing, as :mod:`timeit` does.
    """
    policy = policy or TimingPolicy()
    slow = policy.max_time / 4
    if first is not None and first >= slow:
        return _summary([first])
    times = []
    for _ in range(policy.warmup):
        t0 = time.perf_counter()
        fn()
        t = time.perf_counter() - t0
        if t >= slow:
            times.append(t)
            break
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            times.append(t1 - t0)
            elapsed = t1 - start
            if len(times) >= policy.min_repeats and elapsed >= policy.min_time:
                break
            if elapsed >= policy.max_time:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return _summary(times)


def _summary(times):
    times = sorted(times)
    return Timing(
        median=statistics.median(times),
        q1=_quantile(times, 0.25),
        q3=_quantile(times, 0.75),
        best=times[0],
        worst=times[-1],
        repeats=len(times),
    )
