"""Runtime configuration: ISA selection, thread counts and show_config()."""

import os
import platform
import sys
import threading
import warnings

import numpy as np

from fastattn import _kernels

ISA_NAMES = ("scalar", "avx2", "avx512", "avx512bf16", "amx")

_lock = threading.Lock()
_num_threads = None  # None: follow OpenMP (OMP_NUM_THREADS, threadpoolctl, affinity)


def available_isas():
    """ISA levels this CPU and this build can run, lowest first."""
    return list(ISA_NAMES[: _kernels.cpu_best_isa() + 1])


def get_isa():
    """Name of the ISA level the kernels currently use."""
    return ISA_NAMES[_kernels.get_isa()]


def set_isa(name):
    """Select the kernel ISA level: one of :func:`available_isas`.

    Selecting a lower level is how the tests exercise every kernel variant.
    Call it between kernel calls, not while another thread is inside one.
    """
    if name not in ISA_NAMES:
        raise ValueError(f"isa must be one of {ISA_NAMES}, got {name!r}")
    if name not in available_isas():
        raise ValueError(
            f"isa {name!r} is not supported on this CPU/build; available: {available_isas()}"
        )
    _kernels.set_isa(ISA_NAMES.index(name))


def _apply_isa_env():
    requested = os.environ.get("FASTATTN_ISA", "").strip().lower()
    if not requested:
        return
    try:
        set_isa(requested)
    except ValueError as exc:
        warnings.warn(f"FASTATTN_ISA ignored: {exc}", RuntimeWarning, stacklevel=2)


def set_num_threads(n):
    """Set the default thread count for calls that do not pass ``num_threads``.

    ``None`` restores the OpenMP default, which follows ``OMP_NUM_THREADS``,
    ``threadpoolctl.threadpool_limits`` and the process's CPU affinity.
    """
    global _num_threads
    with _lock:
        _num_threads = None if n is None else _positive_int(n, "n")


def get_num_threads():
    """Thread count a call without ``num_threads`` uses.

    1 in the thread that called ``fork()`` in a child process, whatever was
    set: GNU OpenMP cannot run parallel regions there (docs/reliability.md).
    """
    if _kernels.fork_child_serial():
        return 1
    n = _num_threads
    return n if n is not None else _kernels.default_num_threads()


def resolve_num_threads(num_threads):
    """The value passed to C: a positive count, or 0 for the OpenMP default."""
    if num_threads is None:
        n = _num_threads
        return 0 if n is None else n
    return _positive_int(num_threads, "num_threads")


# Upper bound on a thread count. OpenMP starts every thread it is asked for:
# num_threads=200000 exhausted the process's memory maps and crashed the
# interpreter (segfault) instead of raising. No CPU kernel gains from more
# threads than this.
MAX_THREADS = 4096


def _positive_int(value, name):
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a positive integer, got {value!r}")
    try:
        n = int(value.__index__())
    except (AttributeError, TypeError):
        raise TypeError(f"{name} must be a positive integer, got {value!r}") from None
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    if n > MAX_THREADS:
        raise ValueError(f"{name} must be <= {MAX_THREADS}, got {n}")
    return n


def show_config(print_output=True):
    """Report the build and runtime configuration.

    Returns a dict with the version, the selected and available ISA levels,
    whether OpenMP is built in, the default thread count, the compiler and
    the flags of each source group; prints it too unless ``print_output`` is
    false.
    """
    from fastattn import __version__

    info = {
        "version": __version__,
        "isa_selected": get_isa(),
        "isa_available": available_isas(),
        "isa_compiled": list(ISA_NAMES[: _kernels.compiled_max_isa() + 1]),
        "openmp": _kernels.openmp_enabled(),
        "num_threads": get_num_threads(),
        "compiler": _kernels.build_compiler(),
        "flags": _kernels.build_flags(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "machine": platform.machine(),
    }
    if print_output:
        width = max(len(k) for k in info)
        for key, value in info.items():
            if isinstance(value, list):
                value = ", ".join(value)
            print(f"{key:<{width}} : {value}")
    return info
