"""Run the suite: check every output against the oracle, then time it.

For each row the oracle's output is computed once; fastattn's output and
each peer's are compared with it before anything is timed. A mismatch (or a
crash) is reported at once and marks the row failed, and the implementation
that mismatched is not timed. Only then are the implementations that passed,
and the row's same-run baselines, timed in alternating rounds
(:func:`~fastattn.bench.timing.measure_interleaved`) with the same thread
count. The roofline is probed before the first row and after every row;
shares are taken against the best probe of the run, and a row whose probes
disagree (or whose share exceeds 100%) is marked busy
(:mod:`fastattn.bench.roofline`).
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
from fastattn.bench.peers import PEERS, NotApplicable
from fastattn.bench.roofline import BUSY_FRACTION, RooflineProbe, disagreement
from fastattn.kv_cache import layer_dtype
from fastattn.bench.timing import TimingPolicy, call_seconds, measure_interleaved

# fastattn is held to its own contract (the test suite's rule); peers, which
# accumulate in their own ways, to a looser sanity bound. Elementwise:
# |got - ref| <= rtol * (|ref| + max|ref|).
# 16-bit rows: an element may differ by its dtype's rounding of the few
# intermediate results a kernel or layer stores in the dtype (projections,
# attention output: 2^-8 relative each in bfloat16, 2^-11 in float16),
# against |ref| + max|ref|; the peers round the same intermediates
FASTATTN_RTOL = {"float32": 1e-5, "float64": 1e-12, "bfloat16": 2e-2, "float16": 4e-3}
PEER_RTOL = {"float32": 1e-4, "float64": 1e-10, "bfloat16": 2e-2, "float16": 4e-3}


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

    def rounds(self):
        """Alternating timing rounds per row."""
        return 2 if self.quick else 3


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
    baselines: dict = dataclasses.field(default_factory=dict)  # name -> Baseline
    metrics: dict = dataclasses.field(default_factory=dict)    # name -> {"value", "text"}
    busy: bool = False
    busy_reason: str = None
    probe_disagreement: float = None
    params: dict = dataclasses.field(default_factory=dict)  # the problem's, for the report

    def as_dict(self):
        d = dataclasses.asdict(self)
        d["impls"] = {k: v.as_dict() for k, v in self.impls.items()}
        d["baselines"] = {k: v.as_dict() for k, v in self.baselines.items()}
        return d


@dataclasses.dataclass
class Baseline:
    """A same-run operation timed with a row: ``ratio`` is fastattn's time
    over its time; ``share`` fastattn's rate over its rate (when it declares
    its work)."""

    timing: object
    work: float = None
    ratio: float = None
    share: float = None

    def as_dict(self):
        return {"timing": self.timing.as_dict(), "work": self.work, "ratio": self.ratio,
                "share": self.share}


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
    result.rate = work / t.median / (1e9 if unit in ("flop", "byte") else 1.0)
    result.share = roof.share(unit, result.rate)
    if base is not None:
        result.speedup = t.median / base


def apply_roofline(row, roof):
    """(Re)compute the row's shares against ``roof``; a share above 100%
    marks the row busy."""
    for name, impl in row.impls.items():
        if impl.timing is not None and impl.rate is not None:
            impl.share = roof.share(row.unit, impl.rate)
    fa = row.impls.get("fastattn")
    if fa is not None and fa.share is not None and fa.share > 1.0:
        reason = (f"{100 * fa.share:.0f}% of the best roofline probe: the probes never saw "
                  "the machine as free as this row did (or the row's data stays in cache)")
        row.busy_reason = f"{row.busy_reason}; {reason}" if row.busy else reason
        row.busy = True


def mark_busy(row, before, after):
    """Mark ``row`` busy when the roofline probes ``(gflops, gbs)`` taken
    just before and just after it disagree by more than BUSY_FRACTION."""
    row.probe_disagreement = disagreement(before, after)
    if row.probe_disagreement > BUSY_FRACTION:
        row.busy = True
        row.busy_reason = (f"the roofline probes around this row differ by "
                           f"{100 * row.probe_disagreement:.0f}% (> {100 * BUSY_FRACTION:.0f}%)")


def run_row(problem, peers, roof, policy, report, rounds=3):
    """Check and time every implementation on one problem."""
    row = Row(problem.case, problem.label, str(problem.shape), problem.dims, problem.unit,
              problem.work, params=dict(problem.params))
    dtype = problem.dtype.name
    if problem.unavailable:
        row.status, row.note = "n/a", problem.unavailable
        return row

    oracle_seconds, ref = call_seconds(problem.oracle)
    runners = {}
    agrees = problem.compare_output or compare

    def check(name, prepare, rtol):
        """Run ``name`` once and compare with the oracle; returns the callable
        to time, or None."""
        try:
            run, convert = prepare()
            ok, err = agrees(convert(run()), ref, rtol)
        except NotApplicable as exc:
            row.impls[name] = ImplResult("n/a", note=str(exc))
            return None
        except Exception as exc:
            status, note, err = "error", f"{type(exc).__name__}: {exc}", None
        else:
            if ok:
                row.impls[name] = ImplResult("ok", error=err)
                return run
            status, note = "mismatch", problem.mismatch_note(err, rtol)
        row.impls[name] = ImplResult(status, note=note, error=err)
        row.status = "failed"
        report.alarm(f"{problem.label} {problem.shape}: {name} {status.upper()}: {note}")
        return None

    candidates = [("fastattn", lambda: (problem.fastattn_fn(), problem.to_numpy),
                   FASTATTN_RTOL[dtype])]
    for name, peer in peers.items():
        if peer is None or not problem.compare_peers:
            continue
        if name == "numpy":  # the oracle itself: nothing to check
            row.impls[name] = ImplResult("ok", note="the oracle", error=0.0)
            runners[name] = peer.prepare(problem)[0]
        else:
            candidates.append((name, lambda peer=peer: peer.prepare(problem),
                               problem.peer_rtol or PEER_RTOL[dtype]))
    for name, prepare, rtol in candidates:
        run = check(name, prepare, rtol)
        if run is not None:
            runners[name] = run
    del ref

    order = sorted(runners, key=lambda n: n != "fastattn")  # fastattn first
    fns = {name: runners[name] for name in order}
    baselines = problem.baselines() if "fastattn" in runners else {}
    for name, (fn, work) in baselines.items():
        fns[f"baseline:{name}"] = fn
    timings = measure_interleaved(fns, policy, rounds=rounds, settle=_settle, sync=problem.sync,
                                  first={"numpy": oracle_seconds} if "numpy" in runners else None)
    base = timings["fastattn"].median if "fastattn" in timings else None
    for name in order:
        res = row.impls[name]
        res.timing = timings[name]
        _finish_timing(res, problem.work, roof, problem.unit, base if name != "fastattn" else None)
    for name, (fn, work) in baselines.items():
        t = timings[f"baseline:{name}"]
        b = row.baselines[name] = Baseline(t, work, ratio=base / t.median)
        if work:
            b.share = (problem.work / base) / (work / t.median)
    if "fastattn" in runners:
        row.metrics = {name: {"value": value, "text": text}
                       for name, (value, text) in problem.metrics(policy).items()}
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
    return sum(_cases.REGISTRY[case].rows
               for case, _ in _cases.plan(config.cases, config.shapes, quick=config.quick))


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
    dtype = layer_dtype(config.dtype, "--dtype")
    saved_threads = fastattn._config._num_threads
    started = []
    rows = []
    load_before = _loadavg()
    t_start = time.monotonic()
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
                probe = RooflineProbe(dtype, quick=config.quick)
                for _ in range(3):
                    before = probe.probe()
                progress.done()
                rng = np.random.default_rng(2024)
                for case, shape in _cases.plan(config.cases, config.shapes, quick=config.quick):
                    for problem in _cases.problems_for(case, shape, dtype, rng):
                        progress.step(f"{problem.label} {shape}")
                        row = run_row(problem, peers, probe.roofline(), config.policy(), report,
                                      rounds=config.rounds())
                        problem.release()
                        gc.collect()
                        if row.status != "n/a":
                            after = probe.probe()
                            mark_busy(row, before, after)
                            before = after
                        rows.append(row)
                        progress.done()
                roof = probe.roofline()
                probe.release()
                for row in rows:
                    apply_roofline(row, roof)
    finally:
        for peer in started:
            peer.stop()
        fastattn.set_num_threads(saved_threads)
    return {
        "fastattn_version": fastattn.__version__,
        "command": config.command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "seconds": round(time.monotonic() - t_start, 2),
        "machine": dict(machine_info(), load_average_before=load_before,
                        load_average_after=_loadavg()),
        "config": fastattn.show_config(print_output=False),
        "threadpools": pools,
        "threads": config.threads,
        "dtype": dtype.name,
        "quick": config.quick,
        "tolerance": {"fastattn_rtol": FASTATTN_RTOL[dtype.name],
                      "peer_rtol": PEER_RTOL[dtype.name]},
        "roofline": dict(roof.as_dict(), busy_fraction=BUSY_FRACTION),
        "peers": peer_status,
        "rows": [r.as_dict() for r in rows],
        "failed": [f"{r.label} {r.shape}" for r in rows if r.status == "failed"],
        "busy": [f"{r.label} {r.shape}" for r in rows if r.busy],
    }
