"""Wall-clock timing: the one timing loop of fastattn's benchmarks.

* :func:`measure`: warm-up, repeat until a minimum time, median and spread;
* :func:`measure_interleaved`: several callables measured in alternating
  rounds, so that load from other processes hits each of them alike;
* :func:`call_seconds`: the duration of one call;
* :func:`concurrency_ratio`: wall time of two Python threads making N calls
  each over one thread making N calls (1.0 when the GIL is released).

Every figure the suite prints comes from these functions.
"""

import dataclasses
import gc
import math
import statistics
import threading
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


def call_seconds(fn):
    """``(seconds, result)`` of one call of ``fn()``."""
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def measure(fn, policy=None, *, first=None, sync=None):
    """Time ``fn()`` under ``policy`` and return a :class:`Timing`.

    Slow calls (a quarter of ``max_time`` or more) need no warm-up: a
    warm-up call that slow counts as the first sample, and ``first``, the
    duration of a call just made (the check before timing), is then the
    only sample and ``fn`` is not called again. The garbage collector is
    paused while timing, as :mod:`timeit` does. ``sync``, when given, is
    called after each call inside the timed span (a GPU stream's
    ``synchronize``, so that the time is the kernel's, not its launch's).
    """
    return _summary(_samples(fn, policy or TimingPolicy(), first=first, sync=sync))


def _samples(fn, policy, *, first=None, sync=None):
    """The timed samples of :func:`measure`, unsorted."""
    slow = policy.max_time / 4
    if first is not None and first >= slow:
        return [first]
    sync = sync or _nothing
    times = []
    for _ in range(policy.warmup):
        t0 = time.perf_counter()
        fn()
        sync()
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
            sync()
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
    return times


def _nothing():
    pass


def measure_interleaved(fns, policy=None, *, rounds=3, first=None, sync=None, settle=None):
    """Time several callables in ``rounds`` alternating rounds.

    ``fns`` maps names to callables; each round measures every callable in
    turn under ``policy`` with its times divided by ``rounds`` (and at
    least one timed call), and the samples of all rounds are pooled into
    one :class:`Timing` per name. Noise slower than a round (another
    process coming and going) then lands on every callable alike instead of
    on whichever ran during it. ``first`` maps names to the duration of a
    call just made (see :func:`measure`): a slow one is that name's only
    sample. ``settle()`` runs before each measurement (letting another
    library's worker threads go idle); ``sync`` is as in :func:`measure`.
    """
    policy = policy or TimingPolicy()
    first = first or {}
    rounds = max(1, rounds)
    share = dataclasses.replace(
        policy, min_time=policy.min_time / rounds, max_time=policy.max_time / rounds,
        min_repeats=max(1, math.ceil(policy.min_repeats / rounds)))
    samples = {name: [] for name in fns}
    done = set()
    for _ in range(rounds):
        for name, fn in fns.items():
            if name in done:
                continue
            if settle:
                settle()
            got = _samples(fn, share if name not in first else
                           dataclasses.replace(share, max_time=policy.max_time),
                           first=first.get(name), sync=sync)
            if name in first and len(got) == 1 and got[0] == first[name]:
                done.add(name)  # a slow call: its first run is its only sample
            samples[name] += got
    return {name: _summary(times) for name, times in samples.items()}


def calls_for(fn, seconds):
    """How many calls of ``fn()`` take about ``seconds`` (at least 4)."""
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds / 4:
        fn()
        n += 1
    return max(4, n * 4)


def threads_wall(fn, calls, threads):
    """Wall time of ``threads`` Python threads each making ``calls`` calls
    of ``fn()`` at once (they start together at a barrier)."""
    barrier = threading.Barrier(threads + 1)

    def work():
        barrier.wait()
        for _ in range(calls):
            fn()

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    return time.perf_counter() - t0


def concurrency_ratio(fn, *, seconds=0.3, repeat=3, threads=2):
    """``(t1, tn, tn / t1)``: the wall time of one thread making N calls of
    ``fn()`` and of ``threads`` threads making N calls each, where N calls
    take about ``seconds``. The runs alternate and the best of ``repeat`` is
    kept, so a busy moment inflates neither. With a free core per thread,
    the ratio is about 1.0 when ``fn`` releases the GIL and about
    ``threads`` when it holds it."""
    n = calls_for(fn, seconds)
    t1s, tns = [], []
    for _ in range(repeat):
        t1s.append(threads_wall(fn, n, 1))
        tns.append(threads_wall(fn, n, threads))
    t1, tn = min(t1s), min(tns)
    return t1, tn, tn / t1


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
