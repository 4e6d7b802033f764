"""Make every figure of the documentation with fastattn's own plotting helpers.

    python docs/make_figures.py            # the concept figures, and the performance
                                           # table and chart from docs/performance/results.json
    python docs/make_figures.py --bench    # first rerun the benchmark into docs/performance/

Needs fastattn (built) and matplotlib. The PNGs are committed; rerun this
script after changing a figure or the library, then rebuild the docs.
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository's fastattn first

import fastattn  # noqa: E402
from fastattn.plotting import (  # noqa: E402
    attention_heatmap,
    position_encoding_heatmap,
    speedup_chart,
)

SENTENCE = "The animal didn't cross the street because it was too tired"
DPI = 80


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_dir, name):
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    _pyplot().close(fig)
    print(f"wrote {path} ({os.path.getsize(path) // 1024} KiB)")
    return path


def position_encodings(out_dir):
    """The concat and interleaved tables side by side: 20 x 512 as in the
    classic picture, and 64 x 64 to see the columns."""
    fig, axes = _pyplot().subplots(2, 2, figsize=(11, 6.5),
                             gridspec_kw={"height_ratios": [1, 2.2]})
    for col, layout in enumerate(("concat", "interleaved")):
        for row, (length, channels) in enumerate(((20, 512), (64, 64))):
            table = fastattn.sinusoidal_position_encoding(length, channels, layout=layout)
            ax = position_encoding_heatmap(table, ax=axes[row, col])
            ax.set_title(f'layout="{layout}", {length} x {channels}', fontsize=10)
    fig.tight_layout()
    return _save(fig, out_dir, "position_encodings.png")


def sentence_attention():
    """Attention weights of a 4-head layer on SENTENCE, with hand-set weights.

    Each token gets a one-hot embedding, so ``q_i · k_j`` can be chosen
    freely: with ``W_K`` the identity on the token axis and ``W_Q = A · sqrt(d)``,
    head ``h`` has the attention logits ``A_h``:

    * head 0 ("coreference"): "it" -> "animal" (and a little "street"),
      every other token -> itself;
    * head 1 ("previous token"): each token -> the one before it;
    * head 2 ("predicate"): "it" -> "tired", every other token -> the next one;
    * head 3: random logits (standard normal, seed 0).

    The weights come from fastattn: ``x @ W`` is split into heads with
    :func:`fastattn.split_heads` and :func:`fastattn.scaled_dot_product_attention`
    returns them (``return_weights=True``), which is what the multi-head
    layer computes before ``W_O``.
    """
    tokens = SENTENCE.split()
    T, H = len(tokens), 4
    d = T
    pos = {t: i for i, t in reversed(list(enumerate(tokens)))}
    it, animal, street, tired = pos["it"], pos["animal"], pos["street"], pos["tired"]
    logits = np.zeros((H, T, T))
    logits[0] = 4.0 * np.eye(T)
    logits[0, it] = 0.0
    logits[0, it, animal], logits[0, it, street] = 5.0, 2.5
    for i in range(T):
        logits[1, i, max(i - 1, 0)] = 5.0
        logits[2, i, min(i + 1, T - 1)] = 5.0
    logits[2, it] = 0.0
    logits[2, it, tired] = 5.0
    logits[3] = np.random.default_rng(0).standard_normal((T, T))

    x = np.eye(T)[None]                                  # (1, T, E = T), one-hot
    w_q = np.concatenate([logits[h] * np.sqrt(d) for h in range(H)], axis=1)  # (T, H*d)
    w_k = np.tile(np.eye(T), (1, H))                       # (T, H*d): identity per head
    w_v = w_k
    q, k, v = (fastattn.split_heads(x @ w, H) for w in (w_q, w_k, w_v))
    _, weights = fastattn.scaled_dot_product_attention(q, k, v, return_weights=True)
    return tokens, weights[0]                              # (H, T, T)


def attention_figures(out_dir):
    plt = _pyplot()
    tokens, weights = sentence_attention()
    H = weights.shape[0]
    names = ["head 0: coreference (hand-set)", "head 1: previous token (hand-set)",
             "head 2: predicate (hand-set)", "head 3: random"]

    fig, axes = plt.subplots(2, 2, figsize=(12, 11))
    for h, ax in enumerate(axes.flat):
        attention_heatmap(weights, tokens, tokens, head=h, ax=ax)
        ax.set_title(names[h], fontsize=11)
    fig.tight_layout()
    heads_png = _save(fig, out_dir, "attention_heads.png")

    it = tokens.index("it")
    fig, axes = plt.subplots(H, 1, figsize=(8, 1.45 * H + 0.6))
    for h, ax in enumerate(axes):
        attention_heatmap(weights[h, it:it + 1], ["it"], tokens, ax=ax)
        ax.set_title(names[h], fontsize=10)
        if h < H - 1:
            ax.set_xticklabels([])
            ax.set_xlabel("")
    fig.tight_layout()
    it_png = _save(fig, out_dir, "attention_it.png")
    return heads_png, it_png


def performance_page(out_dir, results_json):
    """results.md and results.png again from results.json (so that a change
    of the report's layout needs no new benchmark run)."""
    from fastattn.bench.report import markdown

    with open(results_json) as f:
        results = json.load(f)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(results))
    rows = max(1, len(results["rows"]))
    fig, ax = _pyplot().subplots(figsize=(8, 0.9 + 0.38 * rows))
    speedup_chart(results, ax=ax)
    return _save(fig, out_dir, "results.png")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "figures"),
                        help="folder for the concept figures (default: docs/figures)")
    parser.add_argument("--performance", default=os.path.join(HERE, "performance"),
                        help="folder holding results.json (default: docs/performance)")
    parser.add_argument("--bench", action="store_true",
                        help="rerun python -m fastattn.bench --out PERFORMANCE first")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.bench:
        subprocess.run([sys.executable, "-m", "fastattn.bench", "--out", args.performance],
                       check=False)
    position_encodings(args.out)
    attention_figures(args.out)
    results_json = os.path.join(args.performance, "results.json")
    if os.path.exists(results_json):
        performance_page(args.performance, results_json)
    else:
        print(f"no {results_json}: run with --bench to make the performance chart")


if __name__ == "__main__":
    main()
