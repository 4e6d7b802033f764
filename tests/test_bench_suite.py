"""The benchmark suite's parts beyond the CLI: the case registry, the
interleaved timing, the roofline probes and busy rows, same-run baselines,
the benchmark scripts as case lists, and the message of a source tree
without a build."""

import os
import pathlib
import re
import runpy
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import fastattn
from fastattn.bench import cases, cli, peers, report, roofline, runner, timing
from bench_helpers import FAST, ROOF, Recorder

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def scratch_case():
    """Registers a throw-away case and removes it afterwards."""
    name = "scratch_scaled"

    @cases.case(name, "twice the input", shapes=["1x1x5x3"], quick=["1x1x2x3"], default=False)
    def _build(shape, dtype, rng):
        return [ScaledProblem(name, "scratch", shape, dtype, rng)]
    yield name
    for table in (cases.REGISTRY, cases.CASES, cases.DEFAULT_SHAPES, cases.QUICK_SHAPES):
        table.pop(name)


class ScaledProblem(cases.Problem):
    kind = "scaled"
    unit = "byte"

    def __init__(self, case, label, shape, dtype, rng):
        super().__init__(case, label, shape, dtype)
        self.x = rng.standard_normal((shape.S, shape.D)).astype(dtype)
        self.work = 2.0 * self.x.nbytes
        self.dims = str(self.x.shape)

    def fastattn_fn(self):
        x = self.x
        return lambda: x * 2

    def oracle(self):
        return (self.x.astype(np.float64) * 2).astype(self.dtype)


def test_a_registered_case_reaches_the_cli_and_the_plan(scratch_case):
    assert scratch_case in cases.CASES and scratch_case not in cases.default_cases()
    args = cli.build_parser().parse_args(["--cases", scratch_case])
    assert args.cases == [scratch_case]
    assert scratch_case in cli.build_parser().format_help()
    assert scratch_case not in cli.build_parser().parse_args([]).cases
    assert cases.plan([scratch_case], quick=True) == [(scratch_case, cases.Shape(1, 1, 2, 3))]
    row = runner.run_row(cases.problems_for(scratch_case, cases.Shape(1, 1, 5, 3), np.float32,
                                            np.random.default_rng(0))[0],
                         {}, ROOF, FAST, Recorder())
    assert row.status == "ok" and row.impls["fastattn"].timing.repeats >= 2


def test_default_suite_leaves_out_the_gil_and_gpu_cases():
    assert "gil" not in cases.default_cases() and "cuda" not in cases.default_cases()
    assert {"sdpa", "causal", "padded", "decode", "overhead", "mha", "mha_decode", "softmax",
            "heads", "pe"} <= set(cases.default_cases())


def test_declared_row_counts_match_the_built_rows():
    rng = np.random.default_rng(0)
    for name, entry in cases.REGISTRY.items():
        problems = entry.build(cases.Shape(1, 2, 9, 4), np.float64, rng)
        assert len(problems) == entry.rows, name
        for p in problems:
            p.release()


def test_measure_interleaved_pools_rounds_and_keeps_a_slow_first_call():
    calls = {"a": 0, "b": 0}

    def bump(name):
        def fn():
            calls[name] += 1
        return fn

    order = []
    t = timing.measure_interleaved({"a": bump("a"), "b": bump("b")},
                                   timing.TimingPolicy(min_time=0.0, max_time=1.0,
                                                       min_repeats=6, warmup=0),
                                   rounds=3, first={"b": 5.0},
                                   settle=lambda: order.append(1))
    assert t["a"].repeats == 6 and calls["a"] == 6
    assert t["b"].repeats == 1 and t["b"].median == 5.0 and calls["b"] == 0
    assert len(order) == 4  # a in three rounds, b once


def test_measure_calls_sync_inside_the_timed_span():
    synced = []
    timing.measure(lambda: None, timing.TimingPolicy(min_time=0.0, min_repeats=3, warmup=1),
                   sync=lambda: synced.append(1))
    assert len(synced) == 4


def test_concurrency_ratio_tells_a_serialised_call_from_a_concurrent_one():
    # Sleeping needs no core, so the figures hold on a busy machine too: a
    # call that holds a lock while it sleeps (as a kernel holding the GIL
    # would) takes twice as long from two threads; one that does not, as long.
    lock = threading.Lock()

    def serialised():
        with lock:
            time.sleep(0.002)

    def concurrent():
        time.sleep(0.002)

    t1, t2, ratio = timing.concurrency_ratio(serialised, seconds=0.05, repeat=2)
    assert t1 > 0 and t2 > 0 and ratio == pytest.approx(t2 / t1)
    assert 1.6 < ratio < 2.4
    assert 0.7 < timing.concurrency_ratio(concurrent, seconds=0.05, repeat=2)[2] < 1.4


def test_roofline_is_the_best_probe():
    probe = roofline.RooflineProbe(np.float32, quick=True)
    probe.samples = [(10.0, 5.0), (30.0, 4.0), (20.0, 6.0)]
    roof = probe.roofline()
    assert (roof.matmul_gflops, roof.read_gbs, roof.probes) == (30.0, 6.0, 3)
    assert roof.matmul_gflops_range == (10.0, 30.0) and roof.read_gbs_range == (4.0, 6.0)
    gflops, gbs = probe.probe()
    assert gflops > 0 and gbs > 0 and len(probe.samples) == 4
    probe.release()
    assert roof.share("call", 1.0) is None


def test_disagreeing_probes_mark_a_row_busy():
    row = runner.Row("sdpa", "sdpa", "1x1x1x1", "", "flop", 1.0)
    runner.mark_busy(row, (100.0, 10.0), (110.0, 10.5))
    assert not row.busy and row.probe_disagreement == pytest.approx(0.1)
    runner.mark_busy(row, (100.0, 10.0), (100.0, 7.0))
    assert row.busy and "differ by 43%" in row.busy_reason
    assert roofline.BUSY_FRACTION == 0.25


def test_a_share_above_the_roofline_marks_a_row_busy_in_the_report():
    problem = cases.AttentionProblem("sdpa", "sdpa", cases.Shape(1, 2, 33, 8), np.float32,
                                     np.random.default_rng(0))
    tiny = roofline.Roofline(matmul_gflops=1e-6, read_gbs=1e-6, matmul_size=8, read_bytes=8,
                             dtype="float32", probes=2, matmul_gflops_range=(1e-7, 1e-6),
                             read_gbs_range=(1e-7, 1e-6))
    row = runner.run_row(problem, {}, tiny, FAST, Recorder())
    runner.apply_roofline(row, tiny)
    assert row.busy and row.impls["fastattn"].share > 1 and "% of the best" in row.busy_reason
    results = {"peers": {}, "rows": [row.as_dict()],
               "roofline": dict(tiny.as_dict(), busy_fraction=roofline.BUSY_FRACTION)}
    header, rows = report.table(results)
    assert rows[0][3].endswith(report.BUSY_MARK)
    lines = report.busy_lines(results)
    assert "busy" in lines[0] and "25%" in lines[0] and "sdpa 1x2x33x8" in lines[1]


@pytest.mark.parametrize("make, names", [
    (lambda rng: cases.AttentionProblem("decode", "decode", cases.Shape(1, 2, 64, 8),
                                        np.float32, rng, decode=True), ["read K,V"]),
    (lambda rng: cases.SoftmaxProblem("softmax", "masked_softmax", cases.Shape(2, 2, 16, 8),
                                      np.float32, rng), ["copy"]),
    (lambda rng: cases.HeadsProblem("heads", "merge_heads", cases.Shape(2, 2, 16, 8),
                                    np.float32, rng, merge=True), ["numpy transpose", "copy"]),
    (lambda rng: cases.MHAProblem("mha", "mha", cases.Shape(1, 2, 8, 4), np.float32, rng),
     ["projections (BLAS)"]),
])
def test_same_run_baselines_are_timed_and_reported(make, names):
    row = runner.run_row(make(np.random.default_rng(0)), {}, ROOF, FAST, Recorder())
    assert row.status == "ok" and list(row.baselines) == names
    for b in row.baselines.values():
        assert b.timing.median > 0 and b.ratio > 0 and b.share > 0
    results = {"rows": [row.as_dict()]}
    lines = report.comparison_lines(results)
    assert len(lines) == len(names) and all("fastattn takes" in line for line in lines)


def test_the_baselines_match_what_they_stand_for():
    rng = np.random.default_rng(0)
    heads = cases.HeadsProblem("heads", "split_heads", cases.Shape(2, 3, 5, 4), np.float32, rng)
    transpose = heads.baselines()["numpy transpose"][0]
    np.testing.assert_array_equal(transpose(), fastattn.split_heads(heads.x, 3))
    a = rng.standard_normal((3, 1001)).astype(np.float32)
    copy = cases.ParallelCopy(a, 2)
    copy()
    np.testing.assert_array_equal(np.concatenate([d for _, d in copy.pairs]), a.reshape(-1))
    assert copy.moved == 2 * a.nbytes
    copy.close()


def test_overhead_and_gil_rows():
    rng = np.random.default_rng(0)
    over = cases.problems_for("overhead", cases.Shape(1, 1, 16, 8), np.float32, rng)[0]
    row = runner.run_row(over, {}, ROOF, FAST, Recorder())
    assert row.unit == "call" and row.impls["fastattn"].share is None
    assert report.table({"peers": {}, "rows": [row.as_dict()]})[1][0][3] == ""
    gil = cases.problems_for("gil", cases.Shape(1, 2, 8, 4), np.float32, rng)
    assert gil[0].label == "gil numpy multiply (control)"
    row = runner.run_row(gil[-1], {"numpy": None}, ROOF,
                         timing.TimingPolicy(min_time=0.0, max_time=0.05, min_repeats=1), Recorder())
    assert row.status == "ok" and list(row.impls) == ["fastattn"]
    (name, metric), = row.metrics.items()
    assert "2 threads / 1" in name and metric["value"] > 0 and "target <= 1.3" in metric["text"]


def test_the_gpu_case_is_not_available_without_a_gpu_path():
    if fastattn.cuda.is_available():
        pytest.skip("a GPU path is available here")
    problem = cases.problems_for("cuda", cases.Shape(1, 1, 4, 4), np.float32,
                                 np.random.default_rng(0))[0]
    row = runner.run_row(problem, {}, ROOF, FAST, Recorder())
    assert row.status == "n/a" and "no GPU path" in row.note


@pytest.mark.parametrize("script, expected", [
    ("bench_attention.py", ["--cases", "sdpa,causal,padded,decode,overhead"]),
    ("bench_mha.py", ["--cases", "mha,mha_decode"]),
    ("bench_foundation.py", ["--cases", "softmax,heads,pe"]),
    ("bench_gil.py", ["--cases", "gil", "--peers", "numpy"]),
    ("bench_cuda.py", ["--cases", "cuda", "--peers", "numpy"]),
    ("bench_decode.py", ["--cases", "decode,greedy", "--threads", "2"]),
])
def test_benchmark_scripts_are_case_lists_on_the_suite(monkeypatch, script, expected):
    seen = []
    monkeypatch.setattr("fastattn.bench.main", lambda argv: seen.append(argv) or 0)
    monkeypatch.setattr(sys, "argv", [script, "--quick"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "benchmarks" / script), run_name="__main__")
    assert exit_.value.code == 0
    assert seen == [expected + ["--quick"]]
    cli.build_parser().parse_args(seen[0])  # every case and option it names exists


def test_no_timing_loop_outside_the_suite():
    clock = re.compile(r"perf_counter|timeit|time\.time\(|process_time|cuda\.Event")
    sources = list((ROOT / "benchmarks").glob("*.py")) + [
        p for p in (ROOT / "fastattn").rglob("*.py") if "bench" not in p.parts]
    offenders = [str(p.relative_to(ROOT)) for p in sources if clock.search(p.read_text())]
    assert offenders == []


def test_import_from_an_unbuilt_source_tree_says_how_to_build(tmp_path):
    shutil.copytree(ROOT / "fastattn", tmp_path / "fastattn",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # An editable install (pip install -e ., as CI does) adds an import hook
    # that resolves fastattn's submodules in the real source tree, where the
    # extension is built; the copy must be imported as an unbuilt tree would
    # be, so the subprocess drops that hook before importing
    unhook = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
              "if 'editable' not in getattr(f, '__module__', '').lower()]; ")
    run_bench = "import runpy; sys.argv[1:] = ['--quick']; runpy.run_module('fastattn.bench', run_name='__main__')"
    for command in (["-c", unhook + "import fastattn"], ["-c", unhook + run_bench]):
        proc = subprocess.run([sys.executable, *command], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0
        assert "python setup.py build_ext --inplace" in proc.stderr, proc.stderr
        assert "pip install -e ." in proc.stderr
        assert "circular import" not in proc.stderr


def _decode_rows(shape="1x4/2x40x16", dtype=np.float32):
    return cases.problems_for("decode", cases.Shape.parse(shape), dtype, np.random.default_rng(1))


@pytest.mark.parametrize("name, shape", [("torch", "1x4/2x40x16"), ("onnxruntime", "2x4x33x8")])
def test_decode_rows_check_each_kv_dtype_and_its_peers(name, shape):
    # the rows of one shape share q, K and V; each narrow row is checked
    # against the oracle on its own storage, its cosine is the narrow
    # output's against the float32 one, and a peer runs where it has a
    # counterpart (torch in bfloat16 within bfloat16's precision)
    peer = peers.PEERS[name]
    available, _, reason = peer.probe()
    if not available:
        pytest.skip(f"{name} peer unavailable: {reason}")
    problems = _decode_rows(shape)
    assert [p.kv_dtype for p in problems] == ["float32", "bfloat16", "float16", "int8"]
    assert all(p.inputs is problems[0].inputs for p in problems)
    q, k, v = problems[0].q, problems[0].k, problems[0].v
    full = fastattn.reference.scaled_dot_product_attention(q, k, v)
    narrow = [p.oracle() for p in problems[1:]]
    peer.start(1)
    try:
        rows = [runner.run_row(p, {"numpy": None, name: peer}, ROOF, FAST, Recorder(), rounds=1)
                for p in problems]
    finally:
        peer.stop()
    for row, kv in zip(rows, ["float32", "bfloat16", "float16", "int8"]):
        assert row.status == "ok" and row.impls["fastattn"].status == "ok", row
        assert row.params["kv_dtype"] == kv and list(row.baselines) == ["read K,V"]
        counterpart = kv == "float32" or (name == "torch" and kv == "bfloat16")
        assert row.impls[name].status == ("ok" if counterpart else "n/a"), (kv, row.impls)
    for row, out in zip(rows[1:], narrow):
        want = cases.cosine(out, full)  # the oracles' outputs, not fastattn's
        (metric,) = row.metrics.values()
        assert metric["value"] == pytest.approx(want, abs=1e-6)
        assert metric["value"] < 1 - 1e-9  # the narrow storage did change the output


def test_decode_rows_in_float64_keep_the_full_row_only():
    problems = _decode_rows(dtype=np.float64)
    assert [p.kv_dtype for p in problems] == ["float64", "bfloat16", "float16", "int8"]
    assert problems[0].unavailable is None
    assert all("float32 queries" in p.unavailable for p in problems[1:])


def _timed(t, **extra):
    return {"status": "ok", "timing": {"median": t}, "rate": 1.0, **extra}


def _decode_result(kv, t, share=None, cos=None, torch_t=None):
    impls = {"fastattn": _timed(t)}
    if torch_t:
        impls["torch"] = _timed(torch_t)
    return {"case": "decode", "label": f"decode {kv}", "shape": "1x32x2048x128", "status": "ok",
            "dims": "", "params": {"kv_dtype": kv, "cache_bytes": 2**20},
            "impls": impls, "baselines": {"read K,V": {"share": share}} if share else {},
            "metrics": {"cosine to the float32-cache output": {"value": cos}} if cos else {}}


def test_decode_table_states_the_ratios_and_the_missed_targets():
    results = {"dtype": "float32", "rows": [
        _decode_result("float32", 4e-3, share=0.80, torch_t=8e-3),
        _decode_result("bfloat16", 2.4e-3, share=0.9, cos=0.99998, torch_t=2e-2),
        _decode_result("float16", 2.2e-3, cos=0.99999999),
        _decode_result("int8", 1.0e-3, cos=0.99995),
    ]}
    header, rows = report.decode_table(results)
    table = {r[1]: dict(zip(header, r)) for r in rows}
    assert table["float32"]["shape"] == "1x32x2048x128" and table["int8"]["shape"] == ""
    assert table["float32"]["targets"] == "missed: read 80% < 85%"
    assert table["float32"]["torch"] == "8 ms" and table["float32"]["torch x float32"] == "2.00"
    assert table["bfloat16"]["x float32"] == "0.60"
    assert table["bfloat16"]["targets"] == "missed: time 0.60x > 0.55x; cosine < 0.99999"
    assert table["bfloat16"]["torch x float32"] == "5.00"
    assert table["float16"]["targets"] == "" and table["float16"]["x float32"] == "0.55"
    assert table["int8"]["x float32"] == "0.25" and table["int8"]["targets"] == "met"
    lines = report.decode_lines(results)
    assert lines[0].startswith("decode (1 query") and "bfloat16 <= 0.55x" in lines[-1]
    assert report.decode_table({"rows": []})[1] == [] and report.decode_lines({"rows": []}) == []


def test_greedy_rows_check_the_agreement_target():
    shape = cases.Shape.parse("1x4/2x24x8")
    problems = cases.problems_for("greedy", shape, np.float32, np.random.default_rng(0))
    assert [p.kv_dtype for p in problems] == ["bfloat16", "float16", "int8"]
    row = runner.run_row(problems[2], {"numpy": None}, ROOF, FAST, Recorder())
    assert row.status == "ok" and list(row.impls) == ["fastattn"]
    assert "24/24 (100.0%; target >= 99%) ok" in row.metrics["tokens as the float32 cache"]["text"]
    # a float32 run that differs at one position of 24: below the target
    run = problems[0].run
    run._tokens = run.float32_tokens().copy()
    run._tokens[-1] = (run._tokens[-1] + 1) % run.model().vocab_size
    rec = Recorder()
    row = runner.run_row(problems[0], {"numpy": None}, ROOF, FAST, rec)
    assert row.status == "failed" and row.impls["fastattn"].status == "mismatch"
    assert "at 95.8% of the positions, below the 99% target" in rec.alarms[0]
    assert cases.problems_for("greedy", cases.Shape.parse("2x4/2x8x8"), np.float32,
                              None)[0].unavailable.startswith("the greedy decode runs one")
