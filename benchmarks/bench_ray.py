"""Thread budgeting on Ray: actors × threads per actor, measured.

A script, not a test. From the repository root, after an in-place build:

    PYTHONPATH=. python benchmarks/bench_ray.py [--rows N] [--quick]

The job is examples/ray_batch_embeddings.py's: a generated Parquet corpus,
read and materialised, then embedded by a pool of actors on one local Ray
cluster (2 CPUs, bound to 127.0.0.1) in three layouts, one after another on
the same cluster and corpus:

  * 1 actor × 1 thread   (the per-core baseline)
  * 1 actor × 2 threads  (one process, fastattn's OpenMP across both cores)
  * 2 actors × 1 thread  (one process per core)

For each: rows/s over the steady part of the job (first batch start to last
batch end, so actor start-up is left out) and over the whole map stage,
p50/p99 of the batch latency, and every actor's CPU use (process CPU seconds
over wall seconds while in a batch; 1.0 is one full core, so a 1-thread
actor above ~1.05 would be oversubscribed). Also the encoder alone in this
process on one thread (timed with fastattn.bench.timing), and the bytes per
row that cross the object store.

Target: 2 actors × 1 thread >= 1.7x the throughput of 1 actor × 1 thread.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import fastattn
from fastattn.bench.timing import TimingPolicy, measure

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
import ray_batch_embeddings as rbe  # noqa: E402

LAYOUTS = ((1, 1), (1, 2), (2, 1))  # (actors, threads per actor)


def encoder_alone(model_dir, texts, batch_size):
    """Rows/s of the encoder, and of its tokeniser alone, in this process
    on one thread."""
    enc = rbe.load_encoder(model_dir)
    batch = texts[:batch_size]
    fastattn.set_num_threads(1)
    limits = rbe.pin_threads(1)
    try:
        t = measure(lambda: enc.embed(batch), TimingPolicy.quick())
        tok = measure(lambda: enc.tokenize(batch), TimingPolicy.quick())
    finally:
        fastattn.set_num_threads(None)
        if limits is not None:
            limits.restore_original_limits()
    return len(batch) / t.median, len(batch) / tok.median


def run_layout(ds, model_dir, actors, threads, batch_size):
    t0 = time.time()
    table = rbe.embed_dataset(ds, model_dir, actors=actors, cpus_per_actor=threads,
                              batch_size=batch_size, with_stats=True).to_arrow_refs()
    import pyarrow as pa
    import ray
    table = pa.concat_tables(ray.get(table))
    whole = time.time() - t0
    rows = table.num_rows
    # one record per batch: its rows carry the same (pid, wall, cpu, end)
    batches = {(p, w, c, e) for p, w, c, e in zip(*(table[n].to_pylist() for n in
               ("pid", "batch_wall_s", "batch_cpu_s", "batch_end")))}
    start = min(e - w for _, w, _, e in batches)
    end = max(e for *_, e in batches)
    walls = np.array([w for _, w, _, _ in batches])
    per_actor = {}
    for pid, w, c, _ in batches:
        cw = per_actor.setdefault(pid, [0.0, 0.0])
        cw[0] += c
        cw[1] += w
    return {"layout": f"{actors} actor{'s' if actors > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}",
            "rows": rows, "steady_rows_s": rows / (end - start), "whole_rows_s": rows / whole,
            "p50_ms": 1e3 * np.percentile(walls, 50), "p99_ms": 1e3 * np.percentile(walls, 99),
            "cores": sorted(round(c / w, 2) for c, w in per_actor.values()), "threads": threads}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1536)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="384 rows, a smaller encoder")
    args = parser.parse_args(argv)
    dims = dict(embed_dim=256, num_heads=8, num_layers=4, max_tokens=64)
    if args.quick:
        args.rows, dims = 384, dict(embed_dim=128, num_heads=4, num_layers=2, max_tokens=64)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = rbe.save_encoder(tmp / "encoder", **dims)
        corpus = rbe.make_corpus(tmp / "corpus.parquet", args.rows, max_words=dims["max_tokens"])
        import pyarrow.parquet as pq
        texts = pq.read_table(corpus)["text"].to_pylist()
        alone, tokenizer = encoder_alone(model_dir, texts, args.batch_size)
        text_bytes = sum(len(t.encode()) for t in texts) / len(texts)

        # the workers import the example module (and fastattn, maybe built in place)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), str(ROOT / "examples")] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        ray = rbe.start_local_cluster(2)
        try:
            ds = rbe.read_corpus(corpus, num_blocks=max(8, args.rows // (4 * args.batch_size)))
            results = [run_layout(ds, model_dir, a, t, args.batch_size) for a, t in LAYOUTS]
        finally:
            ray.shutdown()

    print(f"\nencoder: {dims}; {args.rows} rows, batch {args.batch_size}; "
          f"{os.cpu_count()} CPUs seen, shared machine: compare within this run only")
    print(f"encoder alone, this process, 1 thread: {alone:.1f} rows/s "
          f"(its tokeniser alone: {tokenizer:.0f} rows/s)")
    print(f"bytes per row moved: {text_bytes + 8:.0f} in (text + id), "
          f"{4 * dims['embed_dim'] + 8} out (float32 embedding + id)\n")
    header = ("layout", "steady rows/s", "whole-stage rows/s", "batch p50 ms", "batch p99 ms",
              "CPU cores per actor")
    print(" | ".join(header))
    for r in results:
        print(" | ".join([r["layout"], f"{r['steady_rows_s']:.1f}", f"{r['whole_rows_s']:.1f}",
                          f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", str(r["cores"])]))
    base = results[0]["steady_rows_s"]
    for r in results[1:]:
        print(f"{r['layout']} / 1 actor x 1 thread: {r['steady_rows_s'] / base:.2f}x (steady), "
              f"{r['whole_rows_s'] / results[0]['whole_rows_s']:.2f}x (whole stage)")
    over = [r for r in results if max(r["cores"]) > 1.05 * r["threads"]]
    print("oversubscribed actors: " + (", ".join(r["layout"] for r in over) if over else "none"))


if __name__ == "__main__":
    main()
