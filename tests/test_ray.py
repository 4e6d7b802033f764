"""fastattn on Ray: pickling, threads in actors, weight reloads, a Ray Data
job that survives a dying actor, the Serve app, and both examples end to end.

Everything runs on one local cluster bound to 127.0.0.1 (module-scoped, to
keep start-up costs down); the examples start their own in a subprocess.
Run only these with ``pytest -m ray``; they skip when ray is not installed.
"""

import os
import pickle
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import fastattn

# Ray swaps a loopback node address for the machine's routable one unless
# multi-node clustering is off; must be set before ray is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pytest.importorskip("pyarrow")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))
import ray_batch_embeddings as rbe  # noqa: E402
import ray_serve_attention as rsa  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.no_sanitizer]

WEIGHT_NAMES = ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o")


def _worker_pythonpath():
    """fastattn (built in place, maybe not installed), the examples and
    these tests, for the worker processes to import."""
    old = os.environ.get("PYTHONPATH")
    return os.pathsep.join([str(ROOT), str(EXAMPLES), str(ROOT / "tests")] + ([old] if old else []))


# ---- without a cluster: pickling (the examples run first, before the module's cluster starts)

@pytest.mark.parametrize("script", ["ray_batch_embeddings.py", "ray_serve_attention.py"])
def test_example_smoke_run(script):
    env = dict(os.environ, PYTHONPATH=_worker_pythonpath())
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--smoke"], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert time.perf_counter() - t0 < 120
    assert "rows/s" in proc.stdout or "req/s" in proc.stdout


def test_layer_pickles_weights_and_configuration():
    layer = fastattn.MultiHeadAttention(48, 6, num_kv_heads=2, rope="neox", seed=3)
    copy = pickle.loads(pickle.dumps(layer, protocol=5))
    x = np.random.default_rng(4).standard_normal((3, 7, 48), dtype=np.float32)
    np.testing.assert_array_equal(copy(x, key_lengths=[7, 1, 4], is_causal=True),
                                  layer(x, key_lengths=[7, 1, 4], is_causal=True))
    assert repr(copy) == repr(layer)
    weights = sum(a.nbytes for a in layer.state_dict().values() if a is not None)
    # weights only (no kernel handles, no scratch buffers); the fused
    # projection buffer and its views may each be written, hence 3x at most
    assert weights < len(pickle.dumps(layer, protocol=5)) < 3 * weights + 4096


def test_kv_cache_crosses_a_process_boundary_and_decoding_continues():
    layer = fastattn.MultiHeadAttention(32, 4, rope="neox", seed=5)
    rng = np.random.default_rng(6)
    prompt = rng.standard_normal((2, 5, 32), dtype=np.float32)
    step = rng.standard_normal((2, 1, 32), dtype=np.float32)
    cache = layer.new_cache(2, 16)
    layer(prompt, cache=cache, query_lengths=[5, 3])
    moved = pickle.loads(pickle.dumps(cache, protocol=5))
    np.testing.assert_array_equal(moved.lengths, [5, 3])
    here = layer(step, cache=cache)
    there = layer(step, cache=moved)
    np.testing.assert_array_equal(there, here)
    np.testing.assert_array_equal(moved.lengths, cache.lengths)
    # the copy is independent: decoding into it left the original alone
    np.testing.assert_array_equal(cache.lengths, [6, 4])


# ---- on the module's cluster ---------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = _worker_pythonpath()
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False)
    try:
        yield ray
    finally:
        try:
            from ray import serve
            serve.shutdown()
        finally:
            ray.shutdown()
            if old is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = old


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return rbe.save_encoder(tmp_path_factory.mktemp("encoder"), embed_dim=48, num_heads=4,
                            num_layers=2, max_tokens=40, vocab_size=997, seed=7)


def test_cluster_is_loopback_only(cluster):
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}


class _HoldsALayer:

    def threads(self):
        from threadpoolctl import threadpool_info
        rbe.pin_threads(1)
        return (os.environ.get("OMP_NUM_THREADS"), fastattn.get_num_threads(),
                sorted({p["num_threads"] for p in threadpool_info()}))

    def attend(self, x, key_lengths):
        return self.layer(x, key_lengths=key_lengths)

    def load_state_dict(self, state):
        self.layer.load_state_dict(state)


@ray.remote(num_cpus=1)
class LayerActor(_HoldsALayer):
    """Given a layer: it arrives pickled."""

    def __init__(self, layer):
        self.layer = layer


@ray.remote(num_cpus=1)
class FileLayerActor(_HoldsALayer):
    """Loads its layer from a file, as the examples' actors do."""

    def __init__(self, path):
        self.layer = fastattn.MultiHeadAttention.load(path)


def _reference(state, num_heads):
    return fastattn.MultiHeadAttention.from_weights(*(state[n] for n in WEIGHT_NAMES), num_heads=num_heads)


def test_actor_threads_follow_num_cpus(cluster):
    actor = LayerActor.remote(fastattn.MultiHeadAttention(16, 2, seed=0))
    omp, threads, blas = ray.get(actor.threads.remote())
    assert omp == "1" and threads == 1
    assert blas in ([1], [])
    ray.kill(actor)


@pytest.fixture
def one_thread():
    """The driver on one thread, as the 1-CPU actors: MultiHeadAttention's
    results may differ in the last bit between thread counts (its
    projections split rows over the threads), never between processes."""
    fastattn.set_num_threads(1)
    yield
    fastattn.set_num_threads(None)


def test_actor_results_are_bit_identical_to_the_driver(cluster, model_dir, one_thread):
    layer = fastattn.MultiHeadAttention(64, 8, num_kv_heads=2, seed=8)
    x = np.random.default_rng(9).standard_normal((3, 11, 64), dtype=np.float32)
    actor = LayerActor.remote(layer)
    np.testing.assert_array_equal(ray.get(actor.attend.remote(x, [11, 2, 7])), layer(x, key_lengths=[11, 2, 7]))
    ray.kill(actor)
    # the example's encoder, in its Ray Data actor class, on one batch
    texts = ["", "attention", "a b c d e f g", " ".join(["token"] * 60)]
    batch = {"id": np.arange(4), "text": np.array(texts, dtype=object)}
    remote = ray.remote(num_cpus=1)(rbe.EmbedBatch).remote(str(model_dir), 1)
    got = ray.get(remote.__call__.remote(batch))
    want = rbe.load_encoder(model_dir).embed(texts)
    np.testing.assert_array_equal(np.stack(got["embedding"]), want)
    ray.kill(remote)


def test_reloaded_state_dict_takes_effect_in_an_actor_built_from_a_file(cluster, tmp_path):
    old = fastattn.MultiHeadAttention(32, 4, seed=10)
    old.save(tmp_path / "layer.npz")
    new_state = fastattn.MultiHeadAttention(32, 4, seed=11).state_dict()
    x = np.random.default_rng(12).standard_normal((2, 6, 32), dtype=np.float32)
    actor = FileLayerActor.remote(str(tmp_path / "layer.npz"))
    np.testing.assert_array_equal(ray.get(actor.attend.remote(x, [6, 3])), old(x, key_lengths=[6, 3]))
    ray.get(actor.load_state_dict.remote(new_state))
    np.testing.assert_array_equal(ray.get(actor.attend.remote(x, [6, 3])),
                                  _reference(new_state, 4)(x, key_lengths=[6, 3]))
    ray.kill(actor)


def test_reloaded_state_dict_takes_effect_in_an_actor_given_a_pickled_layer(cluster):
    old = fastattn.MultiHeadAttention(32, 4, seed=10)
    new_state = fastattn.MultiHeadAttention(32, 4, seed=11).state_dict()
    x = np.random.default_rng(12).standard_normal((2, 6, 32), dtype=np.float32)
    actor = LayerActor.remote(old)
    try:
        ray.get(actor.load_state_dict.remote(new_state))
        np.testing.assert_array_equal(ray.get(actor.attend.remote(x, [6, 3])),
                                      _reference(new_state, 4)(x, key_lengths=[6, 3]))
    finally:
        ray.kill(actor)


class EmbedBatchThatDiesOnce(rbe.EmbedBatch):
    """Kills its own worker process (as an OOM kill or a lost node would) the
    first time it sees ``die_at_id``; the marker file makes it once per test."""

    def __init__(self, model_dir, num_threads=1, with_stats=False, marker=None, die_at_id=None):
        super().__init__(model_dir, num_threads, with_stats)
        self.marker, self.die_at_id = marker, die_at_id

    def __call__(self, batch):
        if self.die_at_id in batch["id"] and not os.path.exists(self.marker):
            with open(self.marker, "w") as f:
                f.write(str(os.getpid()))
            os._exit(1)
        return super().__call__(batch)


def test_a_dying_actor_is_retried_without_losing_or_duplicating_rows(cluster, model_dir, tmp_path):
    import pyarrow.parquet as pq
    corpus = rbe.make_corpus(tmp_path / "corpus.jsonl", 240, seed=13, max_words=30)
    marker = tmp_path / "died"
    ds = rbe.read_corpus(corpus, num_blocks=8)
    out = rbe.embed_dataset(ds, model_dir, actors=2, cpus_per_actor=1, batch_size=16, with_stats=True,
                            actor_class=EmbedBatchThatDiesOnce, marker=str(marker), die_at_id=150)
    out.write_parquet(str(tmp_path / "out"), ray_remote_args=rbe.IO_TASK_ARGS)
    table = pq.read_table(tmp_path / "out")
    assert marker.exists(), "the actor never died: the test tested nothing"
    ids = np.sort(table["id"].to_numpy())
    np.testing.assert_array_equal(ids, np.arange(240))
    # rows that the dead actor finished before it died are kept; the batch
    # it died in was redone by another worker process
    pids = dict(zip(table["id"].to_pylist(), table["pid"].to_pylist()))
    assert pids[150] != int(marker.read_text())
    # and the rows are right: the driver's encoder agrees
    emb = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    order = np.argsort(table["id"].to_numpy())
    texts = [t for _, t in sorted(zip(*_corpus_columns(corpus)))]
    np.testing.assert_allclose(emb[order], rbe.load_encoder(model_dir).embed(texts), rtol=1e-4, atol=1e-5)


def _corpus_columns(path):
    import json
    rows = [json.loads(line) for line in open(path)]
    return [r["id"] for r in rows], [r["text"] for r in rows]


def test_serve_answers_concurrent_requests_like_direct_calls(cluster):
    from ray import serve
    url = rsa.start(rsa.build_app(embed_dim=32, num_heads=4, seed=14, max_batch_size=8),
                    port=rsa.free_port())
    try:
        layer = rsa.make_layer(32, 4, seed=14)
        rng = np.random.default_rng(15)
        inputs = [rng.standard_normal((int(n), 32), dtype=np.float32) for n in rng.integers(1, 20, 24)]
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda x: rsa.post(url, x), inputs))
        for x, y in zip(inputs, answers):
            assert y.shape == x.shape
            np.testing.assert_allclose(y, layer(x[None])[0], rtol=1e-5, atol=1e-6)
    finally:
        serve.shutdown()
