"""A tiny language model for end-to-end checks of narrow KV caches.

:class:`TinyDecoder` is a residual stack of :class:`fastattn.MultiHeadAttention`
layers (RoPE, grouped-query kv heads) between a token embedding and an
unembedding, all random with a fixed seed, in NumPy. :meth:`~TinyDecoder.generate`
decodes greedily one token per step through each layer's ``KVCache`` of a
chosen ``kv_dtype``; :meth:`~TinyDecoder.generate_reference` decodes the same
model with :func:`fastattn.reference.multi_head_attention` in float64,
recomputing the whole causal prefix at every step (no cache at all), as the
oracle of the cached decode.

A greedy decode is free-running: once one token differs, every later input
differs, so "the same token at 99% of the positions" means no flip before
the last 1% of the run.

The scale is chosen so that the logits are far from degenerate: with an
embedding and an unembedding of unit variance, a token's logits have a
spread of about ``sqrt(embed_dim)``, and a decode of a few hundred tokens
visits well over a hundred distinct tokens of a 512-token vocabulary (the
tests check this), instead of settling into one token or a short loop.
"""

import numpy as np

import fastattn
from fastattn import reference

ROPE = "neox"


class TinyDecoder:
    """Embedding, ``layers`` residual attention layers, unembedding.

    ``h = embedding[token]``; each layer adds its output, ``h = h + layer(h)``;
    the next token is ``argmax(h @ unembedding)``. The layers have
    ``num_heads`` query heads and ``num_kv_heads`` kv heads of
    ``embed_dim // num_heads`` channels, RoPE (``"neox"``) on Q and K, and
    Xavier-initialised float32 weights drawn from ``seed``.
    """

    def __init__(self, *, vocab_size=512, embed_dim=64, num_heads=8, num_kv_heads=2, layers=3,
                 seed=0):
        rng = np.random.default_rng(seed)
        self.vocab_size, self.embed_dim = vocab_size, embed_dim
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.layers = [fastattn.MultiHeadAttention(embed_dim, num_heads, num_kv_heads=num_kv_heads,
                                                   rope=ROPE, seed=rng)
                       for _ in range(layers)]
        self.embedding = rng.standard_normal((vocab_size, embed_dim), dtype=np.float32)
        self.unembedding = rng.standard_normal((embed_dim, vocab_size), dtype=np.float32)
        self.prompt = [int(t) for t in rng.integers(0, vocab_size, 8)]

    def generate(self, steps, *, kv_dtype=None, num_threads=None, return_logits=False,
                 forced=None):
        """Greedy decode of ``steps`` tokens after :attr:`prompt`, through
        one ``KVCache(kv_dtype=kv_dtype)`` per layer: the tokens, int64
        ``(steps,)`` (and with ``return_logits`` the float32 logits of every
        step, ``(steps, vocab_size)``).

        ``forced`` (``steps`` tokens) feeds those tokens back instead of the
        model's own choices (teacher forcing), so that every step sees the
        same history whatever the cache: the tokens returned are still the
        model's choices at each step."""
        caches = [layer.new_cache(1, len(self.prompt) + steps, kv_dtype=kv_dtype)
                  for layer in self.layers]
        x = self.embedding[self.prompt][None]
        tokens = np.empty(steps, np.int64)
        logits = np.empty((steps, self.vocab_size), np.float32) if return_logits else None
        for i in range(steps):
            h = x
            for layer, cache in zip(self.layers, caches):
                h = h + layer(h, cache=cache, num_threads=num_threads)
            row = h[0, -1] @ self.unembedding
            tokens[i] = int(np.argmax(row))
            if return_logits:
                logits[i] = row
            fed = tokens[i:i + 1] if forced is None else forced[i:i + 1]
            x = self.embedding[fed][None]
        return (tokens, logits) if return_logits else tokens

    def generate_reference(self, steps):
        """The same greedy decode in float64 with the NumPy oracle, without
        a cache: every step runs the stack causally over all the tokens so
        far and takes the last position."""
        params = [{name: None if a is None else np.asarray(a, np.float64)
                   for name, a in layer.state_dict().items()} for layer in self.layers]
        emb = self.embedding.astype(np.float64)
        unemb = self.unembedding.astype(np.float64)
        seq = list(self.prompt)
        tokens = np.empty(steps, np.int64)
        for i in range(steps):
            h = emb[seq][None]
            for p in params:
                h = h + reference.multi_head_attention(
                    p, h, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                    is_causal=True, rope=ROPE)
            tokens[i] = int(np.argmax(h[0, -1] @ unemb))
            seq.append(int(tokens[i]))
        return tokens


def agreement(tokens, reference_tokens):
    """``(fraction of positions with the same token, first differing
    position or None)``."""
    a, b = np.asarray(tokens), np.asarray(reference_tokens)
    same = a == b
    first = None if same.all() else int(np.argmin(same))
    return float(same.mean()), first
