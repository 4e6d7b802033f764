"""The benchmark suite: which cases run, on which shapes, and how much work
each one is.

Every case is described by attention-style shapes ``(B, H, S, D)`` (batch,
heads, sequence length, head size), and each case reads them its own way:

========  ==============================================================
sdpa      ``scaled_dot_product_attention`` on ``q, k, v`` of ``(B, H, S, D)``
causal    the same with ``is_causal=True``
padded    the same with half of every sequence padded (``key_lengths = S/2``)
decode    1 query over a cache of ``S`` keys: ``q`` is ``(B, H, 1, D)``
mha       the ``MultiHeadAttention`` layer, ``E = H*D``, on ``(B, S, E)``,
          with all keys valid and with half of them padded
softmax   ``masked_softmax`` on scores ``(B, H, S, S)`` with ``key_lengths``
heads     ``split_heads`` of ``(B, S, H*D)`` and ``merge_heads`` back
pe        the position-encoding table ``(S, H*D)``
========  ==============================================================

Work is counted as useful work only: flops of the (query, key) pairs that
are not masked (``2·D`` for ``q·k`` plus ``2·Dv`` for ``p·v`` each), and for
memory-bound cases the bytes that must be read or written. Compute-bound
cases are compared with the measured matmul rate, memory-bound ones with the
measured read bandwidth (:mod:`fastattn.bench.roofline`).

No case has a fully masked row or a padded query: peers legitimately
disagree there (``torch.nn.MultiheadAttention`` gives NaN, onnxruntime the
mean of ``V``, fastattn 0), so such rows would compare conventions rather
than correctness.
"""

import dataclasses
import re

import numpy as np

import fastattn
from fastattn import reference

CASES = {
    "sdpa": "scaled_dot_product_attention, non-causal",
    "causal": "scaled_dot_product_attention, is_causal=True",
    "padded": "scaled_dot_product_attention, half of every sequence padded via key_lengths",
    "decode": "scaled_dot_product_attention, 1 query over a cache of S keys",
    "mha": "the MultiHeadAttention layer (E = H*D), all keys valid and half padded",
    "softmax": "masked_softmax on (B, H, S, S) scores with key_lengths",
    "heads": "split_heads and merge_heads",
    "pe": "sinusoidal_position_encoding table (S, H*D)",
}


@dataclasses.dataclass(frozen=True)
class Shape:
    """Batch, heads, sequence length and head size."""

    B: int
    H: int
    S: int
    D: int

    @classmethod
    def parse(cls, text):
        """``"1x12x512x64"`` (or with commas) as a Shape; ValueError otherwise."""
        parts = re.split(r"[x,×]", text.strip().lower())
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
        if len(values) != 4 or min(values) < 1:
            raise ValueError(
                f"bad shape {text!r}: expected four positive integers BxHxSxD, e.g. 1x12x512x64")
        return cls(*values)

    def __str__(self):
        return f"{self.B}x{self.H}x{self.S}x{self.D}"


def _shapes(*texts):
    return [Shape.parse(t) for t in texts]


DEFAULT_SHAPES = {
    "sdpa": _shapes("1x12x128x64", "1x12x512x64", "4x8x1024x128"),
    "causal": _shapes("1x12x128x64", "1x12x512x64", "4x8x1024x128"),
    "padded": _shapes("1x12x512x64", "4x8x1024x128"),
    "decode": _shapes("1x32x2048x128"),
    "mha": _shapes("1x12x128x64", "1x12x512x64"),
    "softmax": _shapes("8x12x512x64"),
    "heads": _shapes("8x12x1024x64"),
    "pe": _shapes("1x12x2048x64"),
}

QUICK_SHAPES = {
    "sdpa": _shapes("1x12x128x64"),
    "causal": _shapes("1x12x128x64"),
    "padded": _shapes("2x12x128x64"),
    "decode": _shapes("1x32x512x128"),
    "mha": _shapes("1x12x128x64"),
    "softmax": _shapes("2x12x128x64"),
    "heads": _shapes("4x12x256x64"),
    "pe": _shapes("1x12x512x64"),
}


class Problem:
    """One row of the suite: inputs, the fastattn call and the oracle.

    Subclasses set ``kind`` (what peers dispatch on), ``unit`` (``"flop"``
    or ``"byte"``), ``work`` (useful flops or bytes per call), ``dims`` (a
    short description) and ``unavailable`` (a reason, or None).
    """

    kind = ""
    unit = "flop"
    unavailable = None

    def __init__(self, case, label, shape, dtype):
        self.case = case
        self.label = label
        self.shape = shape
        self.dtype = np.dtype(dtype)

    def fastattn_fn(self):
        """A no-argument callable running fastattn on the inputs."""
        raise NotImplementedError

    def oracle(self):
        """The NumPy oracle's output (computed in float64, returned in dtype)."""
        raise NotImplementedError

    def oracle_fn(self):
        return self.oracle

    def release(self):
        """Drop the inputs once the row is done."""
        self.__dict__.update({k: None for k, v in vars(self).items() if isinstance(v, np.ndarray)})


def _attended_pairs(Lq, Lk, key_lengths, is_causal, B):
    """Number of unmasked (query, key) pairs per head, summed over the batch
    (top-left causal alignment)."""
    kl = np.full(B, Lk) if key_lengths is None else np.asarray(key_lengths)
    i = np.arange(Lq)
    per_item = [np.minimum(i + 1, n).sum() if is_causal else Lq * int(n) for n in kl]
    return float(sum(per_item))


class AttentionProblem(Problem):
    kind = "attention"

    def __init__(self, case, label, shape, dtype, rng, *, is_causal=False, padded=False,
                 decode=False):
        super().__init__(case, label, shape, dtype)
        B, H, S, D = shape.B, shape.H, shape.S, shape.D
        Lq = 1 if decode else S
        self.q = rng.standard_normal((B, H, Lq, D)).astype(dtype)
        self.k = rng.standard_normal((B, H, S, D)).astype(dtype)
        self.v = rng.standard_normal((B, H, S, D)).astype(dtype)
        self.is_causal = is_causal
        self.key_lengths = np.full(B, max(1, S // 2), dtype=np.int64) if padded else None
        pairs = _attended_pairs(Lq, S, self.key_lengths, is_causal, B) * H
        if decode:
            self.unit = "byte"
            self.work = float(self.k.nbytes + self.v.nbytes)
        else:
            self.work = 4.0 * D * pairs
        mask = f" keys<={S // 2}" if padded else ""
        self.dims = f"B={B} H={H} Lq={Lq} Lk={S} D={D}{mask}"

    def _kwargs(self):
        return dict(key_lengths=self.key_lengths, is_causal=self.is_causal)

    def fastattn_fn(self):
        q, k, v, kw = self.q, self.k, self.v, self._kwargs()
        return lambda: fastattn.scaled_dot_product_attention(q, k, v, **kw)

    def oracle(self):
        return reference.scaled_dot_product_attention(self.q, self.k, self.v, **self._kwargs())


def mha_oracle(x, weights, num_heads, key_lengths=None):
    """The layer's oracle, :func:`fastattn.reference.multi_head_attention`,
    on ``weights`` in the ``(in, out)`` layout (``w_q ... b_o``)."""
    return reference.multi_head_attention(weights, x, num_heads=num_heads,
                                          key_lengths=key_lengths)


def make_mha_weights(embed_dim, dtype, rng):
    """Random ``(in, out)`` projection weights and small biases."""
    bound = np.sqrt(6.0 / (2 * embed_dim))  # Xavier-uniform, as torch initialises
    weights = {}
    for p in "qkvo":
        weights[f"w_{p}"] = rng.uniform(-bound, bound, (embed_dim, embed_dim)).astype(dtype)
        weights[f"b_{p}"] = (0.02 * rng.standard_normal(embed_dim)).astype(dtype)
    return weights


def build_fastattn_mha(weights, num_heads, dtype, torch_module=None):
    """A ``fastattn.MultiHeadAttention`` holding ``weights``: through
    ``from_weights`` when the layer has it, else ``from_torch``."""
    cls = fastattn.MultiHeadAttention
    if hasattr(cls, "from_weights"):
        w = weights
        return cls.from_weights(w["w_q"], w["w_k"], w["w_v"], w["w_o"], w["b_q"], w["b_k"],
                                w["b_v"], w["b_o"], num_heads=num_heads)
    if torch_module is None:
        from fastattn.bench.peers import torch_mha_module
        torch_module = torch_mha_module(weights, num_heads, dtype)
    return cls.from_torch(torch_module)


class MHAProblem(Problem):
    kind = "mha"

    def __init__(self, case, label, shape, dtype, rng, *, padded=False):
        super().__init__(case, label, shape, dtype)
        B, H, S, D = shape.B, shape.H, shape.S, shape.D
        E = H * D
        self.num_heads = H
        self.x = rng.standard_normal((B, S, E)).astype(dtype)
        self.weights = make_mha_weights(E, dtype, rng)
        self.key_lengths = np.full(B, max(1, S // 2), dtype=np.int64) if padded else None
        pairs = _attended_pairs(S, S, self.key_lengths, False, B) * H
        self.work = 2.0 * B * S * E * E * 4 + 4.0 * D * pairs
        mask = f" keys<={S // 2}" if padded else ""
        self.dims = f"B={B} S={S} E={E} H={H}{mask}"
        if not hasattr(fastattn, "MultiHeadAttention"):
            self.unavailable = "fastattn.MultiHeadAttention is not available in this build"

    def fastattn_fn(self):
        layer = build_fastattn_mha(self.weights, self.num_heads, self.dtype)
        x, kl = self.x, self.key_lengths
        if kl is None:
            return lambda: layer(x)
        return lambda: layer(x, key_lengths=kl)

    def oracle(self):
        return mha_oracle(self.x, self.weights, self.num_heads, self.key_lengths)

    def release(self):
        super().release()
        self.weights = None


class SoftmaxProblem(Problem):
    kind = "softmax"
    unit = "byte"

    def __init__(self, case, label, shape, dtype, rng):
        super().__init__(case, label, shape, dtype)
        B, H, S = shape.B, shape.H, shape.S
        self.scores = rng.standard_normal((B, H, S, S)).astype(dtype)
        # lengths spread from S/2 to S across the batch
        self.key_lengths = np.linspace(max(1, S // 2), S, B).astype(np.int64)
        self.scale = 1.0 / np.sqrt(shape.D)
        itemsize = self.dtype.itemsize
        read = float(H * S * self.key_lengths.sum()) * itemsize
        self.work = read + self.scores.nbytes
        self.dims = f"B={B} H={H} Lq={S} Lk={S} keys {self.key_lengths.min()}..{S}"

    def _kwargs(self):
        return dict(key_lengths=self.key_lengths, scale=self.scale)

    def fastattn_fn(self):
        s, kw = self.scores, self._kwargs()
        return lambda: fastattn.masked_softmax(s, **kw)

    def oracle(self):
        return reference.masked_softmax(self.scores, **self._kwargs())


class HeadsProblem(Problem):
    unit = "byte"

    def __init__(self, case, label, shape, dtype, rng, *, merge=False):
        super().__init__(case, label, shape, dtype)
        B, H, S, D = shape.B, shape.H, shape.S, shape.D
        self.merge = merge
        self.num_heads = H
        self.kind = "merge_heads" if merge else "split_heads"
        in_shape = (B, H, S, D) if merge else (B, S, H * D)
        self.x = rng.standard_normal(in_shape).astype(dtype)
        self.work = 2.0 * self.x.nbytes
        self.dims = f"{in_shape} -> {(B, S, H * D) if merge else (B, H, S, D)}"

    def fastattn_fn(self):
        x, h = self.x, self.num_heads
        if self.merge:
            return lambda: fastattn.merge_heads(x)
        return lambda: fastattn.split_heads(x, h)

    def oracle(self):
        if self.merge:
            return reference.merge_heads(self.x)
        return reference.split_heads(self.x, self.num_heads)


class PEProblem(Problem):
    kind = "pe"
    unit = "byte"

    def __init__(self, case, label, shape, dtype, rng):
        super().__init__(case, label, shape, dtype)
        self.length, self.channels = shape.S, shape.H * shape.D
        self.work = float(self.length * self.channels * self.dtype.itemsize)
        self.dims = f"({self.length}, {self.channels}) concat"

    def fastattn_fn(self):
        L, C, dt = self.length, self.channels, self.dtype
        return lambda: fastattn.sinusoidal_position_encoding(L, C, dtype=dt)

    def oracle(self):
        return reference.sinusoidal_position_encoding(self.length, self.channels,
                                                      dtype=self.dtype)


def problems_for(case, shape, dtype, rng):
    """The rows of one case at one shape, in order."""
    if case == "sdpa":
        return [AttentionProblem(case, "sdpa", shape, dtype, rng)]
    if case == "causal":
        return [AttentionProblem(case, "sdpa causal", shape, dtype, rng, is_causal=True)]
    if case == "padded":
        return [AttentionProblem(case, "sdpa padded", shape, dtype, rng, padded=True)]
    if case == "decode":
        return [AttentionProblem(case, "decode", shape, dtype, rng, decode=True)]
    if case == "mha":
        return [MHAProblem(case, "mha", shape, dtype, rng),
                MHAProblem(case, "mha padded", shape, dtype, rng, padded=True)]
    if case == "softmax":
        return [SoftmaxProblem(case, "masked_softmax", shape, dtype, rng)]
    if case == "heads":
        return [HeadsProblem(case, "split_heads", shape, dtype, rng),
                HeadsProblem(case, "merge_heads", shape, dtype, rng, merge=True)]
    if case == "pe":
        return [PEProblem(case, "pe table", shape, dtype, rng)]
    raise ValueError(f"unknown case {case!r}; choose from {', '.join(CASES)}")


def plan(cases, shapes=None, *, quick=False):
    """``[(case, shape), ...]`` in suite order: ``shapes`` overrides every
    case's default shapes."""
    table = QUICK_SHAPES if quick else DEFAULT_SHAPES
    return [(case, shape) for case in cases for shape in (shapes or table[case])]
