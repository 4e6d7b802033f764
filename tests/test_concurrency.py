"""Concurrency: many Python threads calling every kernel on shared read-only
inputs get bitwise the serial results, without deadlock; and the GIL is
released inside the kernels.

Kernels come from strategies.SMALL_CALLS (one entry per public kernel), so
a new kernel is covered by adding it there. The timing side of GIL release
(two threads vs one doing half the calls, target <= 1.3x) is measured by
benchmarks/bench_gil.py; test_gil_is_released below is a loose guard that
does not depend on the machine being idle.
"""

import os
import sys
import threading
import time

import numpy as np
import pytest

import fastattn

import strategies as S

N_THREADS = 8
N_CALLS = int(os.environ.get("FASTATTN_CONCURRENCY_CALLS", "1000"))
JOIN_TIMEOUT = 300  # a deadlock fails the test instead of hanging CI


def run_threads(worker, n):
    """Start n threads on worker(i) together; fail on deadlock or error."""
    barrier = threading.Barrier(n)
    errors = []

    def wrapped(i):
        try:
            barrier.wait()
            worker(i)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=wrapped, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + JOIN_TIMEOUT
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = sum(t.is_alive() for t in threads)
    assert not alive, f"{alive} threads still running after {JOIN_TIMEOUT} s: deadlock?"
    if errors:
        raise errors[0]


def test_every_kernel_from_8_threads_is_bitwise_serial():
    """8 threads x N_CALLS calls of every kernel, interleaved, on shared
    read-only inputs; each thread uses its own thread count."""
    serial = {name: call(**({"num_threads": 1} if name in S.THREADED else {}))
              for name, call in S.SMALL_CALLS.items()}
    mismatches = []

    def worker(i):
        kw = {"num_threads": 1 + i % 3}
        for _ in range(N_CALLS):
            for name, call in S.SMALL_CALLS.items():
                got = call(**(kw if name in S.THREADED else {}))
                if not (got.dtype == serial[name].dtype and np.array_equal(got, serial[name])):
                    mismatches.append(name)

    run_threads(worker, N_THREADS)
    assert not mismatches, f"results differ from serial: {sorted(set(mismatches))}"
    for a in S.SMALL.values():
        assert not a.flags.writeable


# inputs big enough that each call starts a multi-thread OpenMP team, so that
# several Python threads run OpenMP teams at once
_rng = np.random.default_rng(3)
_BIG = _rng.standard_normal((16, 64, 64)).astype(np.float32)
_BIG.flags.writeable = False
_KL = np.arange(16) * 4
_KL.flags.writeable = False
TEAM_CALLS = {
    "masked_softmax": lambda n: fastattn.masked_softmax(_BIG, key_lengths=_KL, is_causal=True,
                                                        num_threads=n),
    "apply_sequence_mask": lambda n: fastattn.apply_sequence_mask(_BIG, _KL, num_threads=n),
    "split_heads": lambda n: fastattn.split_heads(_BIG, 4, num_threads=n),
    "merge_heads": lambda n: fastattn.merge_heads(_BIG.reshape(16, 4, 64, 16), num_threads=n),
    "sinusoidal_position_encoding": lambda n: fastattn.sinusoidal_position_encoding(
        1024, 64, start_index=5, num_threads=n),
    "add_position_encoding": lambda n: fastattn.add_position_encoding(_BIG, num_threads=n),
    "scaled_dot_product_attention": lambda n: fastattn.scaled_dot_product_attention(
        _BIG.reshape(4, 4, 64, 64), _BIG.reshape(4, 4, 64, 64)[:, :2], _BIG.reshape(4, 4, 64, 64)[:, 2:],
        key_lengths=_KL[:4], is_causal=True, num_threads=n),
}


def test_concurrent_openmp_teams_are_bitwise_serial():
    serial = {name: call(1) for name, call in TEAM_CALLS.items()}
    mismatches = []

    def worker(i):
        for _ in range(max(1, N_CALLS // 50)):
            for name, call in TEAM_CALLS.items():
                if not np.array_equal(call(2 + i % 2), serial[name]):
                    mismatches.append(name)

    run_threads(worker, N_THREADS)
    assert not mismatches, f"results differ from serial: {sorted(set(mismatches))}"


def test_set_num_threads_from_threads():
    # the default thread count is process state guarded by a lock
    before = fastattn.get_num_threads()

    def worker(i):
        for j in range(200):
            fastattn.set_num_threads(1 + (i + j) % 4)
            assert 1 <= fastattn.get_num_threads() <= 4
            S.SMALL_CALLS["masked_softmax"]()

    try:
        run_threads(worker, N_THREADS)
    finally:
        fastattn.set_num_threads(None)
    assert fastattn.get_num_threads() == before


# ---- GIL release ------------------------------------------------------------------

# name -> a call of about 5-20 ms at num_threads=1
_G = np.random.default_rng(4).standard_normal((64, 128, 256))
GIL_CALLS = {
    "masked_softmax": lambda: fastattn.masked_softmax(_G, num_threads=1),
    "apply_sequence_mask": lambda: fastattn.apply_sequence_mask(
        _G, np.arange(64) * 2, axis=1, num_threads=1),
    "split_heads": lambda: fastattn.split_heads(_G, 8, num_threads=1),
    "merge_heads": lambda: fastattn.merge_heads(_G.reshape(64, 8, 16, 256), num_threads=1),
    "sinusoidal_position_encoding": lambda: fastattn.sinusoidal_position_encoding(
        2048, 512, dtype=np.float64, num_threads=1),
    "add_position_encoding": lambda: fastattn.add_position_encoding(_G, num_threads=1),
    "scaled_dot_product_attention": lambda: fastattn.scaled_dot_product_attention(
        _G.reshape(16, 8, 256, 64)[:4], _G.reshape(16, 8, 256, 64)[4:8],
        _G.reshape(16, 8, 256, 64)[8:12], num_threads=1),
}
_G_OUT = np.empty_like(_G)


def _numpy_control():
    # a NumPy copy of the same size: NumPy releases the GIL for it
    np.copyto(_G_OUT, _G)
    np.multiply(_G_OUT, 1.0000001, out=_G_OUT)


def _main_thread_progress(call, seconds=0.25):
    """Iterations of a pure-Python loop in this thread per second while
    another thread keeps calling ``call``."""
    stop = threading.Event()

    def background():
        while not stop.is_set():
            call()

    t = threading.Thread(target=background, daemon=True)
    t.start()
    time.sleep(0.02)
    n = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while True:
        n += 1
        if (n & 255) == 0 and time.perf_counter() >= end:
            break
    rate = n / (time.perf_counter() - t0)
    stop.set()
    t.join(30)
    return rate


@pytest.mark.no_sanitizer
@pytest.mark.parametrize("name", sorted(GIL_CALLS))
def test_gil_is_released(name):
    """While another thread runs kernel calls back to back, this thread's
    pure-Python loop keeps at least half the progress it keeps beside an
    equal-sized NumPy operation that releases the GIL. A kernel holding the
    GIL starves the loop (it then runs only between calls). Comparing with
    the NumPy control rather than with an absolute rate keeps the test
    meaningful on a loaded machine."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    try:
        GIL_CALLS[name]()
        ratios = []
        for _ in range(3):
            control = _main_thread_progress(_numpy_control)
            kernel = _main_thread_progress(GIL_CALLS[name])
            ratios.append(kernel / control)
            if ratios[-1] >= 0.5:
                break
    finally:
        sys.setswitchinterval(old)
    assert max(ratios) >= 0.5, f"{name}: main-thread progress ratios {ratios}: GIL held?"
