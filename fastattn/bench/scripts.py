"""What the standalone scripts in ``benchmarks/`` share with the suite: the
machine line they print first and the BLAS thread limit they run under."""

import contextlib

from fastattn.bench.report import plain_table
from fastattn.bench.runner import machine_info

# the instruction-set flags that decide which kernels run
_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
          "avx512_fp16", "amx_bf16", "amx_tile")


def cpu_flags():
    """The flags of :data:`_FLAGS` that /proc/cpuinfo lists (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in _FLAGS if f in have]
    except OSError:
        pass
    return []


def machine_line():
    """One line: CPU model, CPUs in affinity, memory and the ISA flags."""
    m = machine_info()
    return (f"{m['cpu']}, {m['cpus_in_affinity']} CPUs in affinity, {m['memory_gib']} GiB; "
            f"flags: {' '.join(cpu_flags()) or 'n/a'}")


@contextlib.contextmanager
def blas_limit(threads):
    """NumPy's BLAS held to ``threads`` (a no-op without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=threads, user_api="blas"):
        yield


def print_table(headers, rows):
    print(plain_table(headers, rows))


def parse_script_args(doc, *, rounds, quick_help):
    """The options every standalone script takes (``--threads``, ``--rounds``,
    ``--quick``), parsed; ``--quick`` makes the rounds 2. Returns
    ``(args, rounds)``."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    args = parser.parse_args()
    return args, 2 if args.quick else args.rounds
