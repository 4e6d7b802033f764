"""Run the suite: check every output against the oracle, then time it.

For each row the oracle's output is computed once; fastattn's output and
each peer's are compared with it before anything is timed. A mismatch (or a
crash) is reported at once and marks the row failed, and the implementation
that mismatched is not timed. Only then are the implementations that passed
timed, one after the other, with the same thread count.
"""

import contextlib
import dataclasses
import gc
import os
import platform
import sys
import time

import numpy as np

import fastattn
from fastattn.bench import cases as _cases
from fastattn.bench.peers import PEERS, NotApplicable, identity
from fastattn.bench.roofline import measure_roofline
from fastattn.bench.timing import TimingPolicy, measure

# fastattn is held to its own contract (the test suite's rule); peers, which
# accumulate in their own ways, to a looser sanity bound. Elementwise:
# |got - ref| <= rtol * (|ref| + max|ref|).
FASTATTN_RTOL = {"float32": 1e-5, "float64": 1e-12}
PEER_RTOL = {"float32": 1e-4, "float64": 1e-10}


@dataclasses.dataclass
class Config:
    cases: list
    peers: list
    dtype: str = "float32"
    threads: int = 1
    quick: bool = False
    shapes: list = None  # None: each case's defaults
    command: str = "python -m fastattn.bench"

    def policy(self):
        return TimingPolicy.quick() if self.quick else TimingPolicy()


@dataclasses.dataclass
class ImplResult:
    """One implementation on one row.

    ``status`` is ``ok``, ``mismatch``, ``error``, ``n/a`` (no counterpart)
    or ``skipped`` (peer not installed); ``speedup`` is this
    implementation's median time over fastattn's (how many times faster
    fastattn is).
    """

    status: str
    note: str = None
    error: float = None
    timing: object = None
    rate: float = None
    share: float = None
    speedup: float = None

    def as_dict(self):
        d = dataclasses.asdict(self)
        d["timing"] = self.timing.as_dict() if self.timing else None
        return d


@dataclasses.dataclass
class Row:
    case: str
    label: str
    shape: str
    dims: str
    unit: str
    work: float
    status: str = "ok"  # ok | failed | n/a
    note: str = None
    impls: dict = dataclasses.field(default_factory=dict)

    def as_dict(self):
        d = dataclasses.asdict(self)
        d["impls"] = {k: v.as_dict() for k, v in self.impls.items()}
        return d


def compare(got, ref, rtol):
    """``(ok, error)``: the elementwise rule above, and the largest
    difference relative to ``max|ref|``."""
    got = np.asarray(got)
    if got.shape != ref.shape:
        return False, float("inf")
    g = got.astype(np.float64)
    r = ref.astype(np.float64)
    finite = np.isfinite(r)
    scale = float(np.max(np.abs(r[finite]))) if finite.any() else 0.0
    diff = np.abs(g - r)
    same_nan = np.isnan(g) & np.isnan(r)
    bad = ~((diff <= rtol * (np.abs(r) + scale)) | same_nan)
    finite_diff = diff[np.isfinite(diff)]
    err = float(finite_diff.max()) / scale if finite_diff.size and scale > 0 else 0.0
    if bad.any() and np.isnan(g).any() and not np.isnan(r).any():
        err = float("nan")
    return not bad.any(), err


def machine_info():
    """What the run happened on."""
    cpu = platform.processor() or platform.machine()
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip():
                    break
    except OSError:
        pass
    if "model name" in fields:
        cpu = fields["model name"]
        if "cpu family" in fields:
            cpu += f" (family {fields['cpu family']} model {fields.get('model', '?')})"
    mem = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem = round(int(line.split()[1]) / 2**20, 1)
                    break
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "cpus_in_affinity": affinity,
        "memory_gib": mem,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
    }


def _loadavg():
    """The 1-minute load average (other work competing for the cores), or None."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _settle():
    """Let helper threads of the previous call (BLAS, OpenMP pools) go idle,
    so that they do not spin on the cores the next measurement uses."""
    time.sleep(0.05)


def _finish_timing(result, work, roof, unit, base):
    t = result.timing
    result.rate = work / t.median / 1e9
    result.share = roof.share(unit, result.rate)
    if base is not None:
        result.speedup = t.median / base


def run_row(problem, peers, roof, policy, report):
    """Check and time every implementation on one problem."""
    row = Row(problem.case, problem.label, str(problem.shape), problem.dims, problem.unit,
              problem.work)
    dtype = problem.dtype.name
    if problem.unavailable:
        row.status, row.note = "n/a", problem.unavailable
        return row

    t0 = time.perf_counter()
    ref = problem.oracle()
    oracle_seconds = time.perf_counter() - t0
    runners = {}

    def check(name, prepare, rtol):
        """Run ``name`` once and compare with the oracle; returns the callable
        to time, or None."""
        try:
            run, convert = prepare()
            ok, err = compare(convert(run()), ref, rtol)
        except NotApplicable as exc:
            row.impls[name] = ImplResult("n/a", note=str(exc))
            return None
        except Exception as exc:
            status, note, err = "error", f"{type(exc).__name__}: {exc}", None
        else:
            if ok:
                row.impls[name] = ImplResult("ok", error=err)
                return run
            status, note = "mismatch", f"max error {err:.3g} of max|oracle| exceeds rtol {rtol:g}"
        row.impls[name] = ImplResult(status, note=note, error=err)
        row.status = "failed"
        report.alarm(f"{problem.label} {problem.shape}: {name} {status.upper()}: {note}")
        return None

    candidates = [("fastattn", lambda: (problem.fastattn_fn(), identity), FASTATTN_RTOL[dtype])]
    for name, peer in peers.items():
        if peer is None:
            continue
        if name == "numpy":  # the oracle itself: nothing to check
            row.impls[name] = ImplResult("ok", note="the oracle", error=0.0)
            runners[name] = peer.prepare(problem)[0]
        else:
            candidates.append((name, lambda peer=peer: peer.prepare(problem), PEER_RTOL[dtype]))
    for name, prepare, rtol in candidates:
        run = check(name, prepare, rtol)
        if run is not None:
            runners[name] = run
    del ref

    base = None
    order = sorted(runners, key=lambda n: n != "fastattn")  # fastattn first
    for name in order:
        fn = runners[name]
        _settle()
        res = row.impls[name]
        res.timing = measure(fn, policy, first=oracle_seconds if name == "numpy" else None)
        if name == "fastattn":
            base = res.timing.median
        _finish_timing(res, problem.work, roof, problem.unit, base if name != "fastattn" else None)
    return row


@contextlib.contextmanager
def _no_limits(**kwargs):
    yield


def probe_peers(names):
    """``({name: Peer or None}, {name: status dict})`` for the requested peers."""
    active, status = {}, {}
    for name in names:
        peer = PEERS[name]
        available, version, reason = peer.probe()
        status[name] = {"available": available, "version": version, "reason": reason,
                        "install": peer.install, "description": peer.description}
        active[name] = peer if available else None
    return active, status


def count_rows(config):
    per_case = {"mha": 2, "heads": 2}
    return sum(per_case.get(case, 1) for case, _ in _cases.plan(config.cases, config.shapes,
                                                                  quick=config.quick))


def run_suite(config, report):
    """Run ``config`` and return the results as a dict (see results.json)."""
    import scipy.linalg  # noqa: F401  (load scipy's BLAS so that its pool is limited too)

    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        report.note("threadpoolctl is not installed, so the BLAS thread count is not held to "
                    "--threads: pip install threadpoolctl")
        threadpool_info, threadpool_limits = list, _no_limits

    peers, peer_status = probe_peers(config.peers)
    for name, st in peer_status.items():
        if not st["available"]:
            report.note(f"peer {name} skipped: {st['reason']}")
    dtype = np.dtype(config.dtype)
    saved_threads = fastattn._config._num_threads
    started = []
    rows = []
    load_before = _loadavg()
    t_start = time.perf_counter()
    try:
        fastattn.set_num_threads(config.threads)
        for peer in peers.values():
            if peer is not None:
                peer.start(config.threads)
                started.append(peer)
        with threadpool_limits(limits=config.threads, user_api="blas"):
            pools = threadpool_info()
            with report.progress(count_rows(config) + 1) as progress:
                progress.step("roofline: matmul rate and read bandwidth")
                roof = measure_roofline(dtype, quick=config.quick)
                progress.done()
                rng = np.random.default_rng(2024)
                for case, shape in _cases.plan(config.cases, config.shapes, quick=config.quick):
                    for problem in _cases.problems_for(case, shape, dtype, rng):
                        progress.step(f"{problem.label} {shape}")
                        rows.append(run_row(problem, peers, roof, config.policy(), report))
                        problem.release()
                        gc.collect()
                        progress.done()
    finally:
        for peer in started:
            peer.stop()
        fastattn.set_num_threads(saved_threads)
    return {
        "fastattn_version": fastattn.__version__,
        "command": config.command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "seconds": round(time.perf_counter() - t_start, 2),
        "machine": dict(machine_info(), load_average_before=load_before,
                        load_average_after=_loadavg()),
        "config": fastattn.show_config(print_output=False),
        "threadpools": pools,
        "threads": config.threads,
        "dtype": dtype.name,
        "quick": config.quick,
        "tolerance": {"fastattn_rtol": FASTATTN_RTOL[dtype.name],
                      "peer_rtol": PEER_RTOL[dtype.name]},
        "roofline": roof.as_dict(),
        "peers": peer_status,
        "rows": [r.as_dict() for r in rows],
        "failed": [f"{r.label} {r.shape}" for r in rows if r.status == "failed"],
    }
