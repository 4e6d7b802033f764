"""Embed a text corpus on a Ray cluster with an encoder whose attention is fastattn.

The corpus is a Ray Dataset read from Parquet or JSONL (``--make-corpus``
writes a small one); ``map_batches`` runs a pool of stateful actors, each of
which loads the encoder once and pins fastattn's OpenMP threads and the BLAS
threads to the CPUs Ray gave it; the embeddings go back out as Parquet.
Ray Data's progress display shows each stage as it runs.

    python examples/ray_batch_embeddings.py --smoke
    python examples/ray_batch_embeddings.py --corpus texts.parquet --out emb/ \\
        --actors 2 --cpus-per-actor 1

The encoder is a stand-in: a hashing tokeniser, an embedding table and a
stack of :class:`fastattn.MultiHeadAttention` layers with layer norm, mean
pooled. :func:`save_encoder`, :func:`load_encoder` and
:meth:`Encoder.embed` are the only places that know it; a Hugging Face
encoder optimised by fastattn's transformers integration replaces those
three and nothing else (see docs/scaling.md).
"""

import argparse
import json
import os
import resource
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

import fastattn

# These examples start a one-node Ray cluster on the loopback interface only.
# Ray swaps a loopback node address for the machine's routable one (and then
# listens on every interface) unless multi-node clustering is off; it reads
# that switch when ray is first imported, so it is set here, before anything
# imports ray. On a real cluster, drop it and ray.init(address="auto").
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

LAYER_FILE = "layer{}.npz"
TABLE_FILE = "token_embedding.npy"
CONFIG_FILE = "encoder.json"


# ---- the encoder ------------------------------------------------------------

class Encoder:
    """Texts to L2-normalised float32 vectors of width ``embed_dim``.

    Tokens are words hashed into ``vocab_size`` buckets (CRC32: the same id in
    every process, unlike Python's salted ``hash``), truncated to
    ``max_tokens``; the batch is padded to its longest text and the padding
    is masked through ``key_lengths`` and ``query_lengths``.
    """

    def __init__(self, table, layers, max_tokens):
        self.table = table
        self.layers = layers
        self.max_tokens = max_tokens
        self.embed_dim = table.shape[1]
        self._positions = fastattn.sinusoidal_position_encoding(max_tokens, self.embed_dim)

    def tokenize(self, texts):
        """``(ids (B, L) int64, lengths (B,) int64)``, ``L`` the longest text
        (at least 1 so that an empty batch row still has a shape)."""
        vocab = self.table.shape[0]
        rows = [[zlib.crc32(w.encode()) % vocab for w in t.split()[: self.max_tokens]] for t in texts]
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        ids = np.zeros((len(rows), max(1, int(lengths.max(initial=0)))), dtype=np.int64)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = r
        return ids, lengths

    def embed(self, texts):
        """``(B, embed_dim)`` float32 embeddings of ``texts``."""
        ids, lengths = self.tokenize(texts)
        x = self.table[ids] + self._positions[: ids.shape[1]]
        # an empty text attends to nothing; its embedding is the zero vector
        for layer in self.layers:
            x = _layer_norm(x + layer(x, key_lengths=lengths, query_lengths=lengths))
        valid = np.arange(ids.shape[1]) < lengths[:, None]
        pooled = (x * valid[..., None]).sum(axis=1) / np.maximum(lengths, 1)[:, None].astype(np.float32)
        norm = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norm, 1e-12)).astype(np.float32)


def _layer_norm(x, eps=1e-5):
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return ((x - mean) / np.sqrt(var + eps)).astype(np.float32)


def save_encoder(directory, *, embed_dim=384, num_heads=12, num_layers=4, vocab_size=30522,
                 max_tokens=128, seed=0):
    """Write a randomly initialised encoder to ``directory`` (weights as
    ``.npz``/``.npy``, never pickles) and return the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((vocab_size, embed_dim), dtype=np.float32) * 0.5
    np.save(directory / TABLE_FILE, table)
    for i in range(num_layers):
        fastattn.MultiHeadAttention(embed_dim, num_heads, seed=rng).save(directory / LAYER_FILE.format(i))
    (directory / CONFIG_FILE).write_text(json.dumps({"num_layers": num_layers, "max_tokens": max_tokens}))
    return directory


def load_encoder(directory):
    """The :class:`Encoder` that :func:`save_encoder` wrote."""
    directory = Path(directory)
    config = json.loads((directory / CONFIG_FILE).read_text())
    table = np.load(directory / TABLE_FILE)
    layers = [fastattn.MultiHeadAttention.load(directory / LAYER_FILE.format(i))
              for i in range(config["num_layers"])]
    return Encoder(table, layers, config["max_tokens"])


# ---- the actor ----------------------------------------------------------------

def pin_threads(num_threads):
    """Hold fastattn's OpenMP pool and every BLAS/OpenMP pool threadpoolctl
    knows to ``num_threads``; returns the threadpoolctl limiter (keep it
    alive: the limits last until it is restored)."""
    fastattn.set_num_threads(num_threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # fastattn still pins BLAS to 1 thread inside its own calls
        return None
    return threadpool_limits(limits=num_threads)


class EmbedBatch:
    """The stateful callable that ``map_batches`` runs in each actor: loads
    the encoder once, then embeds batches of ``{"id", "text"}``.

    ``num_threads`` should equal the actor's ``num_cpus``. With
    ``with_stats``, each output row also carries the actor's pid, the wall
    and CPU seconds of its batch and the batch's end (Unix time), for
    measuring throughput and oversubscription.
    """

    def __init__(self, model_dir, num_threads=1, with_stats=False):
        self._limits = pin_threads(num_threads)
        self.encoder = load_encoder(model_dir)
        self.with_stats = with_stats

    def __call__(self, batch):
        wall0, cpu0 = time.perf_counter(), _cpu_seconds()
        vectors = self.encoder.embed([str(t) for t in batch["text"]])
        out = {"id": np.asarray(batch["id"], dtype=np.int64), "embedding": list(vectors)}
        if self.with_stats:
            n = len(vectors)
            out["pid"] = np.full(n, os.getpid(), dtype=np.int64)
            out["batch_wall_s"] = np.full(n, time.perf_counter() - wall0)
            out["batch_cpu_s"] = np.full(n, _cpu_seconds() - cpu0)
            out["batch_end"] = np.full(n, time.time())
        return out


def _cpu_seconds():
    """User + system CPU seconds of this whole process (every thread,
    Ray's own included, so the count errs on the high side)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---- the corpus and the pipeline ------------------------------------------------

WORDS = ("attention softmax kernel vector cache token layer model thread batch query key value "
         "head mask core actor node corpus embed encode scale float memory").split()


def make_corpus(path, num_rows, *, seed=0, max_words=120):
    """Write ``num_rows`` texts of 0..max_words random words with ids
    ``0..num_rows-1``, to Parquet (``.parquet``) or JSON lines (``.jsonl``)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_words + 1, num_rows)
    texts = [" ".join(rng.choice(WORDS, n)) for n in lengths]
    path = Path(path)
    if path.suffix == ".jsonl":
        with open(path, "w") as f:
            for i, t in enumerate(texts):
                f.write(json.dumps({"id": i, "text": t}) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"id": np.arange(num_rows, dtype=np.int64), "text": texts}), path)
    return path


def start_local_cluster(num_cpus):
    """A one-node Ray cluster on the loopback interface only (see the
    switch at the top of this module); returns the ``ray`` module."""
    import ray
    ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=False)
    try:
        check_loopback(ray)
    except RuntimeError:
        ray.shutdown()
        raise
    return ray


def check_loopback(ray):
    """RuntimeError unless every node of the cluster is 127.0.0.1."""
    addresses = {n["NodeManagerAddress"] for n in ray.nodes()}
    if addresses != {"127.0.0.1"}:
        raise RuntimeError(f"the cluster is not on the loopback interface only: {sorted(addresses)} "
                           "(was ray imported before this module?)")


# Writing Parquet is light next to the encoder; at 0 CPUs the write tasks
# never wait for a CPU that the actor pool holds.
IO_TASK_ARGS = {"num_cpus": 0}


def read_corpus(path, *, num_blocks=None):
    """The corpus as a materialised Dataset of ``num_blocks`` blocks (at
    least one per actor, else an actor stays idle: a block goes to one actor
    whole).

    Materialised because the actors here take every CPU of the cluster, and
    Ray Data's file-listing task asks for a CPU whatever ``ray_remote_args``
    say: streamed, it would wait forever behind the actor pool. On a cluster
    that leaves a CPU per node to I/O, drop the ``materialize()`` and the
    corpus streams through (docs/scaling.md).
    """
    import ray.data
    path = os.fspath(path)
    if path.endswith(".jsonl"):
        ds = ray.data.read_json(path, lines=True)
    else:
        ds = ray.data.read_parquet(path)
    return (ds.repartition(num_blocks) if num_blocks else ds).materialize()


def embed_dataset(ds, model_dir, *, actors, cpus_per_actor, batch_size=64, with_stats=False,
                  actor_class=EmbedBatch, **actor_kwargs):
    """The embedding step: ``actors`` actors of ``cpus_per_actor`` CPUs each,
    every one with as many fastattn threads."""
    import ray.data
    return ds.map_batches(
        actor_class,
        fn_constructor_kwargs={"model_dir": os.fspath(model_dir), "num_threads": cpus_per_actor,
                               "with_stats": with_stats, **actor_kwargs},
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=cpus_per_actor,
        compute=ray.data.ActorPoolStrategy(size=actors),
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", help="Parquet or .jsonl file with id and text columns "
                        "(default: a generated one)")
    parser.add_argument("--rows", type=int, default=2000, help="rows of the generated corpus")
    parser.add_argument("--model-dir", help="encoder written by save_encoder (default: a new random one)")
    parser.add_argument("--out", help="output directory for the Parquet embeddings (default: a temporary one)")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--cpus-per-actor", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cluster-cpus", type=int, default=None,
                        help="CPUs of the local cluster (default: actors * cpus-per-actor)")
    parser.add_argument("--smoke", action="store_true", help="a small corpus and encoder (CI)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = args.model_dir
        if model_dir is None:
            dims = dict(embed_dim=64, num_heads=4, num_layers=2, max_tokens=64) if args.smoke else {}
            model_dir = save_encoder(tmp / "encoder", **dims)
        corpus = args.corpus or make_corpus(tmp / "corpus.parquet", 200 if args.smoke else args.rows)
        out = Path(args.out) if args.out else tmp / "embeddings"

        ray = start_local_cluster(args.cluster_cpus or args.actors * args.cpus_per_actor)
        try:
            t0 = time.perf_counter()
            ds = read_corpus(corpus, num_blocks=4 * args.actors)
            embedded = embed_dataset(ds, model_dir, actors=args.actors,
                                     cpus_per_actor=args.cpus_per_actor, batch_size=args.batch_size)
            embedded.write_parquet(os.fspath(out), ray_remote_args=IO_TASK_ARGS)
            seconds = time.perf_counter() - t0
        finally:
            ray.shutdown()
        import pyarrow.parquet as pq
        ids = pq.read_table(out, columns=["id"])["id"].to_numpy()
        expected = corpus_rows(corpus)
        print(f"embedded {len(ids)} rows in {seconds:.1f} s ({len(ids) / seconds:.0f} rows/s) -> {out}")
        if len(ids) != expected or len(np.unique(ids)) != expected:
            raise SystemExit(f"{len(ids)} output rows ({len(np.unique(ids))} distinct ids) "
                             f"for {expected} input rows")


def corpus_rows(path):
    """Rows in a corpus file (without Ray)."""
    path = os.fspath(path)
    if path.endswith(".jsonl"):
        with open(path) as f:
            return sum(1 for line in f if line.strip())
    import pyarrow.parquet as pq
    return pq.ParquetFile(path).metadata.num_rows


if __name__ == "__main__":
    main()
