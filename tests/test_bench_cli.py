"""The benchmark CLI, ``python -m fastattn.bench``: an end-to-end run, usage
errors, checks before timing, peers, timing and the report files."""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

import fastattn
from fastattn.bench import cases, cli, peers, report, runner, timing
from bench_helpers import FAST, ROOF, Recorder

HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def bench(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "fastattn.bench", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_quick_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    proc = bench("--quick", "--cases", "softmax,heads", "--peers", "numpy", "--threads", "1",
                 "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "masked_softmax" in proc.stdout and "split_heads" in proc.stdout
    assert "roofline:" in proc.stdout
    assert "[1/5] roofline" in proc.stderr  # plain progress when stderr is not a terminal

    results = json.loads((out / "results.json").read_text())
    assert results["threads"] == 1 and results["dtype"] == "float32" and results["quick"]
    assert results["config"]["isa_selected"] == fastattn.get_isa()
    assert results["machine"]["cpu"]
    assert results["roofline"]["matmul_gflops"] > 0 and results["roofline"]["read_gbs"] > 0
    assert results["failed"] == []
    assert [r["label"] for r in results["rows"]] == ["masked_softmax", "masked_softmax out=",
                                                     "split_heads", "merge_heads"]
    for row in results["rows"]:
        assert row["status"] == "ok" and row["unit"] == "byte"
        fa, ref = row["impls"]["fastattn"], row["impls"]["numpy"]
        assert fa["status"] == "ok" and fa["error"] <= 1e-5
        assert fa["timing"]["median"] > 0 and fa["timing"]["repeats"] >= 1
        assert fa["rate"] > 0 and fa["share"] > 0
        assert ref["speedup"] == pytest.approx(ref["timing"]["median"] / fa["timing"]["median"])
    assert set(results["peers"]) == {"numpy"}

    md = (out / "results.md").read_text()
    assert "| case | shape | fastattn ±IQR |" in md and "masked_softmax" in md
    assert "python -m fastattn.bench --quick --cases softmax,heads" in md
    assert (out / "results.png").exists() == HAS_MPL


@pytest.mark.parametrize("args, message", [
    (["--cases", "sdpa,nope"], "unknown case 'nope'"),
    (["--peers", "tensorflow"], "unknown peer 'tensorflow'"),
    (["--dtype", "int8"], "invalid choice: 'int8'"),
    (["--threads", "0"], "must be a positive integer"),
    (["--threads", "two"], "must be a positive integer"),
    (["--shapes", "1x2x3"], "expected four positive integers"),
    (["--shapes", ""], "empty shape list"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_options_are_usage_errors(args, message, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "usage: python -m fastattn.bench" in err and message in err


def test_bad_option_exit_status_of_the_process():
    proc = bench("--cases", "nope")
    assert proc.returncode == 2
    assert "unknown case 'nope'" in proc.stderr and "usage:" in proc.stderr
    assert proc.stdout == ""


def test_help_and_console_script_entry_point(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--cases", "--peers", "--shapes", "--dtype", "--threads", "--quick", "--out"):
        assert option in text
    from fastattn.bench.__main__ import main  # the fastattn-bench script's target

    assert main is cli.main


def test_option_parsing():
    args = cli.build_parser().parse_args(
        ["--cases", "SDPA, decode,sdpa", "--peers", "ort,np", "--shapes", "1x2x3x4;5,6,7,8"])
    assert args.cases == ["sdpa", "decode"]
    assert args.peers == ["onnxruntime", "numpy"]
    assert args.shapes == [cases.Shape(1, 2, 3, 4), cases.Shape(5, 6, 7, 8)]


def test_plan_uses_given_shapes_for_every_case():
    shape = cases.Shape(1, 2, 8, 4)
    assert cases.plan(["sdpa", "pe"], [shape]) == [("sdpa", shape), ("pe", shape)]
    assert cases.plan(["decode"], quick=True) == [("decode", s) for s in cases.QUICK_SHAPES["decode"]]
    assert set(cases.DEFAULT_SHAPES) == set(cases.QUICK_SHAPES) == set(cases.CASES)


def test_compare():
    ref = np.array([1.0, -2.0, 0.0])
    assert runner.compare(ref + 1e-7, ref, 1e-5)[0]
    ok, err = runner.compare(ref + [0, 1e-3, 0], ref, 1e-5)
    assert not ok and err == pytest.approx(5e-4)
    ok, err = runner.compare(np.array([1.0, np.nan, 0.0]), ref, 1e-5)
    assert not ok and np.isnan(err)
    assert not runner.compare(ref[:2], ref, 1e-5)[0]


def small_attention(case="sdpa", dtype=np.float32, **kw):
    return cases.AttentionProblem(case, case, cases.Shape(2, 3, 17, 8), dtype,
                                  np.random.default_rng(0), **kw)


def only(*names):
    return {n: peers.PEERS[n] for n in names}


@pytest.mark.parametrize("kw", [{}, {"is_causal": True}, {"padded": True}, {"decode": True}])
def test_fastattn_row_checks_then_times(kw):
    rec = Recorder()
    row = runner.run_row(small_attention(**kw), only("numpy"), ROOF, FAST, rec)
    assert row.status == "ok" and rec.alarms == []
    fa = row.impls["fastattn"]
    assert fa.status == "ok" and fa.error < 1e-5 and fa.timing.repeats >= 2
    assert row.impls["numpy"].speedup > 0
    assert row.unit == ("byte" if kw.get("decode") else "flop")


def test_useful_work_counts_unmasked_pairs():
    full = small_attention()
    causal = small_attention(is_causal=True)
    padded = small_attention(padded=True)
    B, H, S, D = 2, 3, 17, 8
    assert full.work == 4 * D * B * H * S * S
    assert causal.work == 4 * D * B * H * S * (S + 1) // 2
    assert padded.work == 4 * D * B * H * S * (S // 2)


def test_a_fastattn_mismatch_fails_the_row_and_is_not_timed():
    problem = small_attention()
    good = problem.fastattn_fn()
    problem.fastattn_fn = lambda: (lambda: good() * 1.001)
    rec = Recorder()
    row = runner.run_row(problem, only("numpy"), ROOF, FAST, rec)
    assert row.status == "failed"
    assert row.impls["fastattn"].status == "mismatch"
    assert row.impls["fastattn"].timing is None
    assert len(rec.alarms) == 1 and "fastattn MISMATCH" in rec.alarms[0]
    header, rows = report.table({"peers": {"numpy": {"available": True}},
                                 "rows": [row.as_dict()]})
    assert rows[0][2] == "MISMATCH" and rows[0][-1] == "FAILED: fastattn"


class WrongPeer(peers.Peer):
    name = "wrong"

    def prepare(self, problem):
        return (lambda: problem.oracle() + 1.0), (lambda x: x)


class BrokenPeer(peers.Peer):
    name = "broken"

    def prepare(self, problem):
        def run():
            raise RuntimeError("kaboom")
        return run, (lambda x: x)


def test_peer_failures_are_reported_as_such():
    rec = Recorder()
    row = runner.run_row(small_attention(), {"wrong": WrongPeer(), "broken": BrokenPeer(),
                                             "numpy": peers.PEERS["numpy"]}, ROOF, FAST, rec)
    assert row.status == "failed"
    assert row.impls["fastattn"].status == "ok" and row.impls["fastattn"].timing is not None
    assert row.impls["wrong"].status == "mismatch" and row.impls["wrong"].timing is None
    assert row.impls["broken"].status == "error" and "kaboom" in row.impls["broken"].note
    assert len(rec.alarms) == 2


def test_missing_peer_is_skipped_with_the_pip_command(monkeypatch):
    monkeypatch.setattr(peers.OnnxruntimePeer, "modules", ("no_such_module_fastattn",))
    active, status = runner.probe_peers(["numpy", "onnxruntime"])
    assert active["onnxruntime"] is None and active["numpy"] is not None
    st = status["onnxruntime"]
    assert not st["available"]
    assert "pip install onnxruntime onnx" in st["reason"]


def test_not_applicable_peer():
    problem = cases.PEProblem("pe", "pe table", cases.Shape(1, 2, 16, 4), np.float32, None)
    with pytest.raises(peers.NotApplicable):
        peers.PEERS["onnxruntime"].prepare(problem)


def test_every_case_builds_and_checks_at_a_tiny_shape():
    shape = cases.Shape(2, 2, 9, 4)
    rng = np.random.default_rng(0)
    for case in cases.CASES:
        for problem in cases.problems_for(case, shape, np.float64, rng):
            if problem.unavailable:
                if case == "cuda":
                    assert "no GPU path" in problem.unavailable
                    continue
                if case in ("decode", "decode_lengths", "greedy"):
                    # narrow K/V caches take float32 queries and layers only
                    assert "(--dtype float32)" in problem.unavailable
                    assert case == "greedy" or problem.kv_dtype != "float64"
                    continue
                assert case == "mha" and not hasattr(fastattn, "MultiHeadAttention")
                assert "not available in this build" in problem.unavailable
                continue
            got = problem.to_numpy(problem.fastattn_fn()())
            ok, err = runner.compare(got, problem.oracle(), runner.FASTATTN_RTOL["float64"])
            assert ok, (problem.label, err)
            problem.release()


def test_mha_row_is_reported_not_available_or_checked():
    problem = cases.MHAProblem("mha", "mha", cases.Shape(1, 2, 6, 4), np.float32,
                               np.random.default_rng(0), padded=True)
    row = runner.run_row(problem, only("numpy"), ROOF, FAST, Recorder())
    if hasattr(fastattn, "MultiHeadAttention"):
        assert row.status == "ok" and row.impls["fastattn"].status == "ok"
    else:
        assert row.status == "n/a"
        assert row.note == "fastattn.MultiHeadAttention is not available in this build"


def test_mha_oracle_matches_torch():
    torch = pytest.importorskip("torch", reason="torch not installed (pip install torch)")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 8))
    w = cases.make_mha_weights(8, np.float64, rng)
    module = peers.torch_mha_module(w, 2, np.float64)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.inference_mode():
        expected = module(*(torch.from_numpy(x),) * 3, key_padding_mask=pad,
                          need_weights=False)[0].numpy()
    np.testing.assert_allclose(cases.mha_oracle(x, w, 2, key_lengths=[5, 3]), expected,
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
@pytest.mark.parametrize("kw", [{}, {"is_causal": True}, {"padded": True}, {"decode": True}])
def test_peer_matches_the_oracle(name, kw):
    peer = peers.PEERS[name]
    available, _, reason = peer.probe()
    if not available:
        pytest.skip(f"{name} peer unavailable: {reason}")
    before = None
    if name == "torch":
        import torch

        before = torch.get_num_threads()
    peer.start(1)
    try:
        rec = Recorder()
        row = runner.run_row(small_attention(**kw), {name: peer}, ROOF, FAST, rec)
    finally:
        peer.stop()
    assert rec.alarms == [] and row.status == "ok", rec.alarms
    assert row.impls[name].status == "ok" and row.impls[name].speedup > 0
    if before is not None:
        assert torch.get_num_threads() == before  # the peer restores torch's thread count


def test_onnxruntime_peer_declines_float64():
    problem = small_attention(dtype=np.float64)
    with pytest.raises(peers.NotApplicable, match="float32 only"):
        peers.PEERS["onnxruntime"].prepare(problem)


def test_measure_repeats_until_min_time_and_reports_spread():
    calls = []
    t = timing.measure(lambda: calls.append(1),
                       timing.TimingPolicy(min_time=0.01, max_time=1.0, min_repeats=3, warmup=2))
    assert t.repeats >= 3 and len(calls) == t.repeats + 2
    assert t.best <= t.q1 <= t.median <= t.q3 <= t.worst and t.spread >= 0
    assert set(t.as_dict()) >= {"median", "q1", "q3", "best", "worst", "repeats", "spread"}


def test_measure_takes_a_slow_first_call_as_the_only_sample():
    calls = []
    t = timing.measure(lambda: calls.append(1), timing.TimingPolicy(max_time=0.4), first=0.3)
    assert calls == [] and t.repeats == 1 and t.median == 0.3


def test_markdown_and_plain_table_from_a_run(tmp_path):
    config = runner.Config(cases=["pe"], peers=["numpy"], threads=1, quick=True,
                           shapes=[cases.Shape(1, 2, 32, 8)])
    rec = Recorder()
    rec.progress = report.Reporter(stream=open(tmp_path / "log", "w"), fancy=False).progress
    results = runner.run_suite(config, rec)
    assert fastattn.get_num_threads() == fastattn._kernels.default_num_threads()
    header, rows = report.table(results)
    text = report.plain_table(header, rows)
    assert text.splitlines()[0].split()[:3] == ["case", "shape", "fastattn"]
    assert "pe table" in text and "1x2x32x8" in text
    md = report.markdown(results)
    assert md.startswith("# fastattn benchmark") and "| pe table | 1x2x32x8 |" in md
    written = report.write_outputs(results, tmp_path / "o", rec)
    assert written[:2] == ["results.json", "results.md"]
    data = json.loads((tmp_path / "o" / "results.json").read_text())
    assert data["rows"][0]["impls"]["fastattn"]["status"] == "ok"
    if not HAS_MPL:
        assert any("matplotlib" in n for n in rec.notes)


class FakeLayer:
    """Stands in for fastattn.MultiHeadAttention (its constructors and call) to exercise
    the suite's layer rows in a build that lacks the layer."""

    def __init__(self, weights, num_heads):
        self.weights, self.num_heads = weights, num_heads

    def __call__(self, query, key=None, value=None, *, key_lengths=None, **kwargs):
        return cases.mha_oracle(query, self.weights, self.num_heads, key_lengths)


class FakeMHA(FakeLayer):
    @classmethod
    def from_weights(cls, w_q, w_k, w_v, w_o, b_q=None, b_k=None, b_v=None, b_o=None, *,
                     num_heads, num_kv_heads=None):
        return cls(dict(w_q=w_q, w_k=w_k, w_v=w_v, w_o=w_o, b_q=b_q, b_k=b_k, b_v=b_v, b_o=b_o),
                   num_heads)


class FakeMHAFromTorch(FakeLayer):
    @classmethod
    def from_torch(cls, module):
        E = module.embed_dim
        w = module.in_proj_weight.detach().numpy()
        b = module.in_proj_bias.detach().numpy()
        weights = {f"w_{p}": w[i * E:(i + 1) * E].T for i, p in enumerate("qkv")}
        weights.update({f"b_{p}": b[i * E:(i + 1) * E] for i, p in enumerate("qkv")})
        weights["w_o"] = module.out_proj.weight.detach().numpy().T
        weights["b_o"] = module.out_proj.bias.detach().numpy()
        return cls(weights, module.num_heads)


@pytest.mark.parametrize("fake", [FakeMHA, FakeMHAFromTorch])
@pytest.mark.parametrize("padded", [False, True])
def test_layer_rows_run_through_the_layer_api(monkeypatch, fake, padded):
    names = ["numpy"]
    if importlib.util.find_spec("torch") is not None:
        names.append("torch")
    elif fake is FakeMHAFromTorch:
        pytest.skip("from_torch needs torch (pip install torch)")
    monkeypatch.setattr(fastattn, "MultiHeadAttention", fake, raising=False)
    problem = cases.MHAProblem("mha", "mha", cases.Shape(2, 2, 6, 4), np.float32,
                               np.random.default_rng(0), padded=padded)
    active = only(*names)
    for peer in active.values():
        peer.start(1)
    try:
        rec = Recorder()
        row = runner.run_row(problem, active, ROOF, FAST, rec)
    finally:
        for peer in active.values():
            peer.stop()
    assert rec.alarms == [] and row.status == "ok"
    assert all(row.impls[n].status == "ok" for n in ["fastattn"] + names)


def test_decode_and_greedy_cases_end_to_end(tmp_path):
    # one GQA shape for both cases: the decode rows read a cache of 64 keys
    # over 2 kv heads, the greedy rows decode 64 tokens through layers of
    # 4 heads (2 kv heads) of 16
    out, plot = tmp_path / "out", tmp_path / "decode.png"
    proc = bench("--quick", "--cases", "decode,greedy", "--shapes", "1x4/2x64x16", "--peers",
                 "numpy", "--threads", "2", "--out", str(out), "--plot", str(plot))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = " ".join(proc.stdout.split())  # rich wraps long lines
    assert "decode (1 query; the same q, K and V in every kv_dtype)" in text
    assert "targets: float32 >= 85% of the read; bfloat16 <= 0.55x, int8 <= 0.30x" in text
    assert "greedy int8 (64 tokens, 3 layers E=64 H=4 Hkv=2 RoPE): " \
           "tokens as the float32 cache 64/64" in text
    assert "; tokens as the float32 cache, teacher-forced 64/64" in text
    results = json.loads((out / "results.json").read_text())
    rows = {r["label"]: r for r in results["rows"]}
    assert list(rows) == ["decode float32", "decode bfloat16", "decode float16", "decode int8",
                          "greedy bfloat16", "greedy float16", "greedy int8"]
    assert all(r["status"] == "ok" and r["shape"] == "1x4/2x64x16" for r in rows.values())
    elements = 2 * 1 * 2 * 64 * 16  # K and V, B=1, Hkv=2, S=64, D=16
    scales = 2 * 1 * 2 * 64 * 4
    for kv, nbytes in (("float32", 4 * elements), ("bfloat16", 2 * elements),
                       ("float16", 2 * elements), ("int8", elements + scales)):
        row = rows[f"decode {kv}"]
        assert row["params"]["cache_bytes"] == row["work"] == nbytes
        assert row["baselines"]["read K,V"]["share"] > 0
        if kv != "float32":
            (name, metric), = row["metrics"].items()
            assert name == "cosine to the float32-cache output" and 0.999 < metric["value"] <= 1
    assert "| shape | kv_dtype | fastattn | MiB |" in (out / "results.md").read_text()
    assert plot.exists() == HAS_MPL


def test_shapes_with_kv_heads():
    s = cases.Shape.parse("1x32/8x8192x128")
    assert (s.B, s.H, s.Hkv, s.kv_heads, s.S, s.D) == (1, 32, 8, 8, 8192, 128)
    assert str(s) == "1x32/8x8192x128" and cases.Shape.parse(str(s)) == s
    assert cases.Shape.parse("2x8/8x16x4") == cases.Shape(2, 8, 16, 4)  # as many kv heads as H
    assert cases.Shape(2, 8, 16, 4).kv_heads == 8
    for bad in ("1x32/5x16x8", "1x32/0x16x8", "1x32/8/2x16x8", "1x/8x16x8"):
        with pytest.raises(ValueError, match="bad shape"):
            cases.Shape.parse(bad)


@pytest.mark.parametrize("args, message", [
    (["--cases", "sdpa,decode", "--shapes", "1x4/2x8x8"],
     "kv heads (H/Hkv) are read only by the decode, decode_lengths and greedy cases, not by sdpa"),
    (["--cases", "sdpa", "--plot", "x.png"], "--plot draws the decode rows"),
])
def test_decode_option_combinations_are_usage_errors(args, message, capsys):
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err


def test_help_lists_the_decode_cases(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "--plot FILE" in text
    for name in ("decode ", "decode_lengths*", "greedy "):
        assert f"\n  {name}" in text
    assert "decode" in cases.default_cases() and "greedy" in cases.default_cases()
    assert "decode_lengths" not in cases.default_cases()
