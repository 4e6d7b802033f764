"""The benchmark suite: which cases run, on which shapes, and how much work
each one is.

Every case is described by attention-style shapes ``(B, H, S, D)`` (batch,
heads, sequence length, head size), and each case reads them its own way:

==============  ============================================================
sdpa            ``scaled_dot_product_attention`` on ``q, k, v`` of ``(B, H, S, D)``
causal          the same with ``is_causal=True``
padded          the same with half of every sequence padded (``key_lengths = S/2``)
decode          1 query over a cache of ``S`` keys (``H/Hkv`` kv heads): ``q``
                is ``(B, H, 1, D)``, the cache float32, bfloat16, float16 and
                int8 (one row each); same-run baseline: reading the row's K and
                V buffers once; metric: the cosine to the float32 output
decode_lengths  (not in the default suite) ``decode`` over a sweep of
                cache lengths, for ``--plot``
greedy          a greedy decode of ``S`` tokens through a small stack of layers
                (``fastattn.bench.greedy``) with each narrow cache; its check
                is the agreement with the float32 cache's tokens
overhead        the per-call cost: 1 query over ``S`` keys at a tiny shape
mha             the ``MultiHeadAttention`` layer, ``E = H*D``, on ``(B, S, E)``,
                with all keys valid and with half of them padded; same-run
                baseline: the four projections alone as NumPy BLAS products
mha_decode      one decode step of the layer: 1 new token after ``S - 1``
                cached in a ``KVCache`` (torch, cacheless, re-projects them all)
softmax         ``masked_softmax`` on scores ``(B, H, S, S)`` with ``key_lengths``,
                with a fresh output per call and into a reused ``out=``;
                same-run baseline: a threaded copy of the scores
heads           ``split_heads`` of ``(B, S, H*D)`` and ``merge_heads`` back;
                same-run baselines: NumPy's transpose and a plain copy
pe              the position-encoding table ``(S, H*D)``
gil             (not in the default suite) each kernel at ``num_threads=1``
                from 1 and from 2 Python threads: the wall-time ratio is about
                1.0 when the GIL is released, 2.0 when it is held
cuda            (not in the default suite) SDPA on CuPy arrays against torch's
                math and default backends on the GPU; n/a without a GPU path
==============  ============================================================

Work is counted as useful work only: flops of the (query, key) pairs that
are not masked (``2·D`` for ``q·k`` plus ``2·Dv`` for ``p·v`` each), and for
memory-bound cases the bytes that must be read or written. Compute-bound
cases are compared with the measured matmul rate, memory-bound ones with the
measured read bandwidth (:mod:`fastattn.bench.roofline`).

No case has a fully masked row or a padded query: peers legitimately
disagree there (``torch.nn.MultiheadAttention`` gives NaN, onnxruntime the
mean of ``V``, fastattn 0), so such rows would compare conventions rather
than correctness.

Adding a case
-------------
A case is one function registered with :func:`case`: it receives a
:class:`Shape`, a dtype and a NumPy ``Generator`` and returns the rows
(:class:`Problem` objects) to run at that shape::

    @case("window", "sdpa with a sliding window of S/4 keys",
          shapes=["1x12x1024x64"], quick=["1x12x128x64"])
    def _window(shape, dtype, rng):
        return [AttentionProblem("window", "sdpa window", shape, dtype, rng,
                                 window=shape.S // 4)]

A :class:`Problem` holds its inputs and gives ``fastattn_fn()`` (the call
to time), ``oracle()`` (the reference output), ``kind`` (what the peers in
:mod:`fastattn.bench.peers` dispatch on: a peer that has no counterpart
raises ``NotApplicable``), ``unit`` and ``work`` (for the rate and the
roofline share) and ``dims``. Optional: ``baselines()`` (same-run
operations timed alongside, e.g. a copy of the same bytes),
``metrics(policy)`` (figures that are not a time per call), ``unavailable``
(why the row cannot run here), ``to_numpy``/``sync`` for arrays that do
not live in host memory, ``peer_rtol`` (a looser check of the peers),
``compare_output``/``mismatch_note`` (a check other than the elementwise
one) and ``params`` (what the report reads beyond the shape). A new dtype needs nothing here: ``--dtype`` reaches
every case through ``dtype``. The CLI, the progress bar, the table and
results.json pick the case up by its name.
"""

import dataclasses
import re
import threading

import numpy as np

import fastattn
from fastattn import reference

@dataclasses.dataclass(frozen=True)
class Shape:
    """Batch, heads, sequence length and head size; ``Hkv``, the kv heads
    of grouped-query attention, is None for as many as ``H`` (written
    ``H/Hkv``: ``1x32/8x8192x128``)."""

    B: int
    H: int
    S: int
    D: int
    Hkv: int = None

    @classmethod
    def parse(cls, text):
        """``"1x12x512x64"`` or ``"1x32/8x8192x128"`` (or with commas) as a
        Shape; ValueError otherwise."""
        parts = re.split(r"[x,×]", text.strip().lower())
        heads = parts[1].split("/") if len(parts) == 4 else []
        try:
            values = [int(p) for p in [parts[0]] + heads[:1] + parts[2:]]
            kv_heads = int(heads[1]) if len(heads) == 2 else None
        except (ValueError, IndexError):
            values, kv_heads = [], None
        if len(values) != 4 or min(values) < 1 or len(heads) > 2:
            raise ValueError(
                f"bad shape {text!r}: expected four positive integers BxHxSxD, e.g. 1x12x512x64 "
                "(or BxH/HkvxSxD with kv heads, e.g. 1x32/8x8192x128)")
        if kv_heads is not None and (kv_heads < 1 or values[1] % kv_heads):
            raise ValueError(f"bad shape {text!r}: the kv heads ({heads[1]}) must be a positive "
                             f"divisor of the heads ({values[1]})")
        return cls(*values, Hkv=None if kv_heads == values[1] else kv_heads)

    @property
    def kv_heads(self):
        return self.H if self.Hkv is None else self.Hkv

    def __str__(self):
        heads = self.H if self.Hkv is None else f"{self.H}/{self.Hkv}"
        return f"{self.B}x{heads}x{self.S}x{self.D}"


def _shapes(*texts):
    return [Shape.parse(t) for t in texts]


@dataclasses.dataclass(frozen=True)
class Case:
    """A registered case: its name, a one-line description, the function
    that builds its rows, its default and ``--quick`` shapes, how many rows
    it gives per shape, and whether ``python -m fastattn.bench`` runs it
    without ``--cases``."""

    name: str
    help: str
    build: object
    shapes: tuple
    quick: tuple
    rows: int = 1
    default: bool = True
    kv_heads: bool = False


REGISTRY = {}
CASES = {}           # name -> description, in suite order
DEFAULT_SHAPES = {}  # name -> [Shape, ...]
QUICK_SHAPES = {}    # name -> [Shape, ...] under --quick


def case(name, help, *, shapes, quick=None, rows=1, default=True, kv_heads=False):
    """Register the decorated ``build(shape, dtype, rng) -> [Problem, ...]``
    as case ``name`` (see "Adding a case" above). ``shapes`` and ``quick``
    are ``"BxHxSxD"`` strings; ``rows`` is the number of problems ``build``
    returns per shape (for the progress bar); ``default=False`` keeps the
    case out of the default suite; ``kv_heads=True`` says that ``build``
    reads ``shape.Hkv`` (other cases refuse shapes with kv heads)."""
    def register(build):
        entry = Case(name, help, build, tuple(_shapes(*shapes)),
                     tuple(_shapes(*(quick or shapes))), rows, default, kv_heads)
        REGISTRY[name] = entry
        CASES[name] = help
        DEFAULT_SHAPES[name] = list(entry.shapes)
        QUICK_SHAPES[name] = list(entry.quick)
        return build
    return register


def default_cases():
    """The cases a plain ``python -m fastattn.bench`` runs."""
    return [name for name, c in REGISTRY.items() if c.default]


# ---------------------------------------------------------------- baselines

class _Threaded:
    """Runs one NumPy operation per slice on ``threads`` Python threads
    (NumPy releases the GIL for copies and reductions): a same-run
    bandwidth baseline on the suite's thread count. A BLAS gemv would do
    the same, but its workers spin after each call and slow the next
    implementation timed."""

    def __init__(self, threads):
        from concurrent.futures import ThreadPoolExecutor

        self.threads = max(1, threads)
        self.pool = ThreadPoolExecutor(self.threads)

    def split(self, flat):
        n = self.threads
        return [flat[flat.size * t // n:flat.size * (t + 1) // n] for t in range(n)]

    def close(self):
        self.pool.shutdown()


class ParallelRead(_Threaded):
    """Reads every byte of ``arrays`` once (a max over each slice)."""

    def __init__(self, arrays, threads):
        super().__init__(threads)
        parts = [self.split(a.reshape(-1)) for a in arrays]
        self.slices = [[p[t] for p in parts] for t in range(self.threads)]
        self.moved = float(sum(a.nbytes for a in arrays))

    @staticmethod
    def _read(parts):
        for p in parts:
            p.max()

    def __call__(self):
        list(self.pool.map(self._read, self.slices))


class ParallelCopy(_Threaded):
    """Copies ``src`` into a new buffer of its size; moves ``2 * src.nbytes``."""

    def __init__(self, src, threads):
        super().__init__(threads)
        flat = src.reshape(-1)
        self.pairs = list(zip(self.split(flat), self.split(np.empty_like(flat))))
        self.moved = 2.0 * src.nbytes

    def __call__(self):
        list(self.pool.map(lambda p: np.copyto(p[1], p[0]), self.pairs))


class Problem:
    """One row of the suite: inputs, the fastattn call and the oracle.

    Subclasses set ``kind`` (what peers dispatch on), ``unit`` (``"flop"``
    or ``"byte"``, a share of the roofline, or ``"call"``, which is not),
    ``work`` (useful flops or bytes per call), ``dims`` (a short
    description) and ``unavailable`` (a reason, or None).
    """

    kind = ""
    unit = "flop"
    unavailable = None
    compare_peers = True  # False: no peer has a counterpart (none is even asked)
    sync = None           # called after each timed call (a GPU stream's synchronize)
    peer_rtol = None      # the peers' tolerance when not the suite's (a peer in bfloat16)
    compare_output = None  # (got, ref, rtol) -> (ok, error) when not the elementwise rule
    params = {}           # what the report needs beyond the shape (the decode case's kv_dtype)

    def __init__(self, case, label, shape, dtype):
        self.case = case
        self.label = label
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self._threaded = []

    def threaded_baseline(self, baseline):
        """``(baseline, bytes it moves)`` for :meth:`baselines`, its thread
        pool shut down by :meth:`release`."""
        self._threaded.append(baseline)
        return baseline, baseline.moved

    def fastattn_fn(self):
        """A no-argument callable running fastattn on the inputs."""
        raise NotImplementedError

    def oracle(self):
        """The NumPy oracle's output (computed in float64, returned in dtype)."""
        raise NotImplementedError

    def oracle_fn(self):
        return self.oracle

    def mismatch_note(self, error, rtol):
        """What the report says when the check fails with ``error``."""
        return f"max error {error:.3g} of max|oracle| exceeds rtol {rtol:g}"

    def to_numpy(self, out):
        """fastattn's output as a host NumPy array, for the check."""
        return out

    def baselines(self):
        """``{name: (callable, work or None)}``: operations timed in the same
        rounds as the implementations (not checked), against which the
        report states fastattn's time, and its rate where ``work`` (in this
        row's unit) is given."""
        return {}

    def metrics(self, policy):
        """``{name: (value, text)}``: figures of this row that are not a time
        per call, measured after the timing."""
        return {}

    def release(self):
        """Drop the inputs (and stop the baselines' threads) once the row is done."""
        for baseline in self._threaded:
            baseline.close()
        self._threaded = []
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

    def baselines(self):
        if self.unit != "byte":
            return {}
        read = ParallelRead((self.k, self.v), fastattn.get_num_threads())
        return {"read K,V": self.threaded_baseline(read)}


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
    ``from_weights`` when the layer has it, else ``from_torch``; a 16-bit
    layer ``from_torch`` of the torch module of that dtype when torch is
    installed (the conversion a user of a bf16 checkpoint makes)."""
    cls = fastattn.MultiHeadAttention
    if np.dtype(dtype).itemsize == 2 and torch_module is None:
        try:
            from fastattn.bench.peers import torch_mha_module

            torch_module = torch_mha_module(weights, num_heads, dtype)
        except ImportError:
            pass
    if torch_module is None and hasattr(cls, "from_weights"):
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

    def baselines(self):
        if self.dtype.itemsize == 2:
            return self._half_baselines()
        B, S, E = self.x.shape
        x2 = self.x.reshape(B * S, E)
        rng = np.random.default_rng(1)
        w_in = rng.standard_normal((E, 3 * E)).astype(self.dtype)
        w_o = rng.standard_normal((E, E)).astype(self.dtype)

        def projections():
            x2 @ w_in
            x2 @ w_o
        return {"projections (BLAS)": (projections, 2.0 * B * S * E * E * 4)}


    def _half_baselines(self):
        """A 16-bit row's same-run references: its projections alone through
        the packed 16-bit GEMM (the layer's GEMM floor), and the float32
        layers of fastattn and torch on the same weights and inputs."""
        from fastattn.bf16_gemm import PackedWeight, matmul

        B, S, E = self.x.shape
        x2 = self.x.reshape(B * S, E)
        w = self.weights
        w_in = PackedWeight(np.concatenate([w["w_q"], w["w_k"], w["w_v"]], axis=1).T)
        w_o = PackedWeight(np.ascontiguousarray(w["w_o"].T))

        def projections():
            matmul(x2, w_in)
            matmul(x2, w_o)
        out = {"projections (16-bit GEMM)": (projections, 2.0 * B * S * E * E * 4)}
        w32 = {n: a.astype(np.float32) for n, a in w.items()}
        x32, kl = self.x.astype(np.float32), self.key_lengths
        layer32 = build_fastattn_mha(w32, self.num_heads, np.float32)
        out["fastattn float32"] = (lambda: layer32(x32, key_lengths=kl), self.work)
        try:
            import torch

            from fastattn.bench.peers import torch_mha_module
        except ImportError:
            return out
        module32 = torch_mha_module(w32, self.num_heads, np.float32)
        t32 = torch.from_numpy(x32)
        pad = None if kl is None else torch.arange(S)[None, :] >= torch.from_numpy(kl)[:, None]

        def torch32():
            with torch.inference_mode():
                return module32(t32, t32, t32, key_padding_mask=pad, need_weights=False)[0]
        out["torch float32"] = (torch32, self.work)
        return out


class SoftmaxProblem(Problem):
    kind = "softmax"
    unit = "byte"

    def __init__(self, case, label, shape, dtype, rng, *, reuse_out=False):
        super().__init__(case, label, shape, dtype)
        B, H, S = shape.B, shape.H, shape.S
        self.reuse_out = reuse_out
        self.scores = rng.standard_normal((B, H, S, S)).astype(dtype)
        # lengths spread from S/2 to S across the batch
        self.key_lengths = np.linspace(max(1, S // 2), S, B).astype(np.int64)
        self.scale = 1.0 / np.sqrt(shape.D)
        itemsize = self.dtype.itemsize
        read = float(H * S * self.key_lengths.sum()) * itemsize
        self.work = read + self.scores.nbytes
        self.dims = f"B={B} H={H} Lq={S} Lk={S} keys {self.key_lengths.min()}..{S}"
        if reuse_out:
            self.dims += ", out= reused"

    def _kwargs(self):
        return dict(key_lengths=self.key_lengths, scale=self.scale)

    def fastattn_fn(self):
        s, kw = self.scores, self._kwargs()
        if self.reuse_out:
            # A fresh output costs the operating system about as much as the
            # kernel (zero-filling each new page); a reused one shows the
            # kernel alone, the figure the copy baseline is comparable with.
            kw["out"] = np.empty_like(s)
        return lambda: fastattn.masked_softmax(s, **kw)

    def oracle(self):
        return reference.masked_softmax(self.scores, **self._kwargs())

    def baselines(self):
        return {"copy": self.threaded_baseline(ParallelCopy(self.scores,
                                                            fastattn.get_num_threads()))}


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

    def baselines(self):
        x = self.x
        flat_src, flat_dst = x.reshape(-1), np.empty(x.size, x.dtype)
        if self.merge:
            B, H, S, D = x.shape

            def transpose():
                return np.ascontiguousarray(x.transpose(0, 2, 1, 3))
        else:
            B, S, E = x.shape
            H = self.num_heads

            def transpose():
                return np.ascontiguousarray(x.reshape(B, S, H, E // H).transpose(0, 2, 1, 3))
        return {"numpy transpose": (transpose, 2.0 * x.nbytes),
                "copy": (lambda: np.copyto(flat_dst, flat_src), 2.0 * x.nbytes)}


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


# ---------------------------------------------------------------- more rows

class OverheadProblem(AttentionProblem):
    """A call so small that its time is the per-call cost of the Python
    checks and the dispatch: 1 query over ``S`` keys."""

    unit = "call"

    def __init__(self, case, label, shape, dtype, rng):
        super().__init__(case, label, shape, dtype, rng, decode=True)
        self.unit = "call"
        self.work = 1.0
        self.dims = f"B={shape.B} H={shape.H} Lq=1 Lk={shape.S} D={shape.D} (per-call cost)"

    def baselines(self):
        return {}


class MHADecodeProblem(MHAProblem):
    """One decode step: 1 new token attends over ``S - 1`` cached tokens
    plus itself. fastattn appends the token's keys and values to a
    ``KVCache``; a cacheless peer attends over all ``S`` tokens."""

    kind = "mha_decode"

    def __init__(self, case, label, shape, dtype, rng):
        super().__init__(case, label, shape, dtype, rng)
        B, H, S, D = shape.B, shape.H, shape.S, shape.D
        E = H * D
        self.cached = S - 1
        self.history = self.x  # (B, S, E): the cached tokens, then the new one
        self.x_new = self.x[:, S - 1:]
        self.work = 2.0 * B * E * E * 4 + 4.0 * D * H * B * S
        self.dims = f"B={B} E={E} H={H}: 1 token after {S - 1} cached"

    def fastattn_fn(self):
        layer = build_fastattn_mha(self.weights, self.num_heads, self.dtype)
        B = self.history.shape[0]
        cache = layer.new_cache(B, self.cached + 1)
        if self.cached:
            layer(self.history[:, :self.cached], cache=cache)
        x_new, lengths = self.x_new, [self.cached] * B

        def step():
            cache.reset(lengths=lengths)
            return layer(x_new, cache=cache)
        return step

    def oracle(self):
        return reference.multi_head_attention(self.weights, self.x_new, self.history,
                                              self.history, num_heads=self.num_heads)

    def baselines(self):
        return {}


_gil_local = threading.local()


def _thread_out(shape, dtype):
    """The calling thread's reusable output buffer of ``shape``: each thread
    writes its own, so that page faults on fresh outputs (which serialise
    on the process's memory-map lock) do not pass for GIL contention."""
    bufs = _gil_local.__dict__.setdefault("bufs", {})
    key = (shape, np.dtype(dtype).str)
    if key not in bufs:
        bufs[key] = np.empty(shape, dtype)
    return bufs[key]


def _gil_kernels(shape, dtype, rng):
    """``[(label, fastattn call taking out(shape), oracle call)]`` for the gil
    case; calls of ~0.2-5 ms, so that Python's own (GIL-holding) argument
    checking is a few percent of a call."""
    B, H, S, D = shape.B, shape.H, shape.S, shape.D
    scores = rng.standard_normal((B, H, S, S)).astype(dtype)
    x = rng.standard_normal((B, S, H * D)).astype(dtype)
    q, k, v = (rng.standard_normal((1, H, 2 * S, D)).astype(dtype) for _ in range(3))
    lengths = np.linspace(1, S, B).astype(np.int64)
    one = dict(num_threads=1)
    return [
        ("numpy multiply (control)", lambda o: np.multiply(x, 1.5, out=o(x.shape, dtype)),
         lambda: x * 1.5),
        ("masked_softmax", lambda o: fastattn.masked_softmax(
            scores, key_lengths=lengths, is_causal=True, out=o(scores.shape, dtype), **one),
         lambda: reference.masked_softmax(scores, key_lengths=lengths, is_causal=True)),
        ("apply_sequence_mask", lambda o: fastattn.apply_sequence_mask(
            x, lengths, out=o(x.shape, dtype), **one),
         lambda: reference.apply_sequence_mask(x, lengths)),
        ("split_heads", lambda o: fastattn.split_heads(x, H, out=o((B, H, S, D), dtype), **one),
         lambda: reference.split_heads(x, H)),
        ("merge_heads", lambda o: fastattn.merge_heads(
            scores, out=o((B, S, H * S), dtype), **one),
         lambda: reference.merge_heads(scores)),
        ("sinusoidal_position_encoding", lambda o: fastattn.sinusoidal_position_encoding(
            4 * S, H * D, dtype=dtype, out=o((4 * S, H * D), dtype), **one),
         lambda: reference.sinusoidal_position_encoding(4 * S, H * D, dtype=dtype)),
        ("add_position_encoding", lambda o: fastattn.add_position_encoding(
            x, out=o(x.shape, dtype), **one),
         lambda: reference.add_position_encoding(x)),
        ("scaled_dot_product_attention", lambda o: fastattn.scaled_dot_product_attention(
            q, k, v, is_causal=True, out=o(q.shape, dtype), **one),
         lambda: reference.scaled_dot_product_attention(q, k, v, is_causal=True)),
    ]


# A kernel that releases the GIL runs two calls at once in about the time
# of one; above 1.3 more than the few percent of Python around the call is
# serialised. (The control row shows what the machine allows right now.)
GIL_TARGET = 1.3


class GilProblem(Problem):
    """One kernel at ``num_threads=1``, called from 1 and from 2 Python
    threads at once (``timing.concurrency_ratio``)."""

    kind = "gil"
    unit = "call"
    compare_peers = False

    def __init__(self, case, label, shape, dtype, call, oracle):
        super().__init__(case, label, shape, dtype)
        self.call, self._oracle = call, oracle
        self.work = 1.0
        self.dims = "num_threads=1; 2 Python threads vs 1"

    def fastattn_fn(self):
        call = self.call
        return lambda: call(_thread_out)

    def oracle(self):
        return np.asarray(self._oracle()).astype(self.dtype)

    def metrics(self, policy):
        from fastattn.bench.timing import concurrency_ratio

        # as long as the policy's time per measurement: --quick stays quick
        seconds = max(0.05, policy.min_time)
        repeat = 2 if policy.min_time < 0.1 else 3
        t1, t2, ratio = concurrency_ratio(self.fastattn_fn(), seconds=seconds, repeat=repeat)
        control = self.label.endswith("(control)")
        verdict = "" if control else (" ok" if ratio <= GIL_TARGET else " SLOW")
        return {"2 threads / 1 thread wall time": (
            ratio, f"{ratio:.2f} (1 thread {t1 * 1e3:.1f} ms, 2 threads {t2 * 1e3:.1f} ms; "
                   f"target <= {GIL_TARGET}){verdict}")}

    def release(self):
        super().release()
        self.call = self._oracle = None
        _gil_local.__dict__.pop("bufs", None)


class CudaProblem(Problem):
    """SDPA on CuPy arrays through fastattn's GPU path, checked against the
    oracle on host copies; torch's math backend (cuBLAS GEMMs around a
    softmax, the like-for-like peer) and its default backend (flash or
    memory-efficient kernels) are the same-run baselines."""

    kind = "cuda"
    compare_peers = False

    def __init__(self, case, label, shape, dtype, rng, *, is_causal=False, decode=False):
        super().__init__(case, label, shape, dtype)
        B, H, S, D = shape.B, shape.H, shape.S, shape.D
        Lq = 1 if decode else S
        self.is_causal = is_causal
        self.q = rng.standard_normal((B, H, Lq, D)).astype(dtype)
        self.k = rng.standard_normal((B, H, S, D)).astype(dtype)
        self.v = rng.standard_normal((B, H, S, D)).astype(dtype)
        self.work = 4.0 * D * _attended_pairs(Lq, S, None, is_causal, B) * H
        self.dims = f"B={B} H={H} Lq={Lq} Lk={S} D={D} on the GPU"
        self.gpu = None
        try:
            gpu = fastattn.cuda
            if not gpu.is_available():
                self.unavailable = f"no GPU path: {gpu.unavailable_reason()}"
        except Exception as exc:
            self.unavailable = f"no GPU path: {type(exc).__name__}: {exc}"
        if self.unavailable is None:
            import cupy

            self.gpu = gpu
            self.cupy = cupy
            self.dq, self.dk, self.dv = (cupy.asarray(a) for a in (self.q, self.k, self.v))
            self.sync = cupy.cuda.get_current_stream().synchronize

    def fastattn_fn(self):
        q, k, v, causal = self.dq, self.dk, self.dv, self.is_causal
        out = self.cupy.empty_like(q)
        return lambda: self.gpu.scaled_dot_product_attention(q, k, v, is_causal=causal, out=out)

    def to_numpy(self, out):
        return self.cupy.asnumpy(out)

    def oracle(self):
        return reference.scaled_dot_product_attention(self.q, self.k, self.v,
                                                      is_causal=self.is_causal)

    def baselines(self):
        try:
            import torch
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError:
            return {}
        if not torch.cuda.is_available():
            return {}
        tq, tk, tv = (torch.from_dlpack(a) for a in (self.dq, self.dk, self.dv))
        ptr = self.cupy.cuda.get_current_stream().ptr  # torch on the timed stream
        stream = torch.cuda.ExternalStream(ptr) if ptr else torch.cuda.default_stream()
        F, causal = torch.nn.functional, self.is_causal

        def call(backend=None):
            with torch.inference_mode(), torch.cuda.stream(stream):
                if backend is None:
                    return F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
        return {"torch math": (lambda: call(SDPBackend.MATH), self.work),
                "torch default": (lambda: call(), self.work)}

    def release(self):
        super().release()
        self.dq = self.dk = self.dv = self.gpu = self.cupy = None


# ---------------------------------------------------------------- narrow KV caches

KV_DTYPES = ("float32", "bfloat16", "float16", "int8")
READ_BASELINE = "read K,V"
# Accuracy targets of a narrow cache against the float32 one (the cosine
# of the decode output), as the narrow-cache design states them.
COSINE_TARGETS = {"bfloat16": 0.99999, "int8": 0.9999}
# Speed targets: the full-precision cache at this share of the read
# bandwidth of its own buffers, and a narrow cache at most this fraction of
# its time (bfloat16 reads half the bytes, int8 a bit over a quarter).
READ_SHARE_TARGET = 0.85
TIME_RATIO_TARGETS = {"bfloat16": 0.55, "int8": 0.30}


class DecodeInputs:
    """q and the full-precision K/V of one decode shape, shared by its
    kv_dtype rows: each row converts them to its storage when it first
    needs it, so that only one narrow copy lives at a time."""

    def __init__(self, shape, dtype, rng):
        B, H, Hkv, S, D = shape.B, shape.H, shape.kv_heads, shape.S, shape.D
        self.q = rng.standard_normal((B, H, 1, D)).astype(dtype)
        self.k = rng.standard_normal((B, Hkv, S, D)).astype(dtype)
        self.v = rng.standard_normal((B, Hkv, S, D)).astype(dtype)
        self._full_out = None

    def full_output(self):
        """fastattn's output on the full-precision cache (the reference of
        the narrow caches' accuracy)."""
        if self._full_out is None:
            self._full_out = fastattn.scaled_dot_product_attention(self.q, self.k, self.v)
        return self._full_out

    def store(self, kv_dtype):
        """``(k, v, {"k_scale", "v_scale"} or {})`` in ``kv_dtype``."""
        if kv_dtype == "int8":
            kq, ks = fastattn.quantize_kv(self.k)
            vq, vs = fastattn.quantize_kv(self.v)
            return kq, vq, {"k_scale": ks, "v_scale": vs}
        if kv_dtype == self.k.dtype.name:
            return self.k, self.v, {}
        import ml_dtypes

        dt = ml_dtypes.bfloat16 if kv_dtype == "bfloat16" else np.dtype(kv_dtype)
        return self.k.astype(dt), self.v.astype(dt), {}


def cosine(a, b):
    """Cosine similarity of two arrays, in float64."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _reducible(a):
    """``a`` as an array NumPy reduces with SIMD at memory speed: the 16-bit
    floats (bfloat16 has no NumPy loops of its own) as uint16, the same bytes."""
    return a.view(np.uint16) if a.dtype.itemsize == 2 and a.dtype.kind != "i" else a


class DecodeProblem(Problem):
    """One decode step, ``q`` of ``(B, H, 1, D)`` over a cache of ``S``
    keys in ``kv_dtype`` (``Hkv`` kv heads): the bytes that must be read
    are the cache's (K, V and the int8 scales), once. Same-run baseline: a
    threaded read of those very buffers; metric: the cosine of the output
    against the full-precision cache's."""

    kind = "decode_cache"
    unit = "byte"
    is_causal = False
    key_lengths = None

    def __init__(self, case, shape, dtype, inputs, kv_dtype):
        super().__init__(case, f"{case} {kv_dtype}", shape, dtype)
        self.inputs, self.kv_dtype = inputs, kv_dtype
        self.num_kv_heads = shape.kv_heads
        B, H, S, D, Hkv = shape.B, shape.H, shape.S, shape.D, shape.kv_heads
        itemsize = {"int8": 1, "bfloat16": 2, "float16": 2}.get(kv_dtype, self.dtype.itemsize)
        scales = 2 * B * Hkv * S * 4 if kv_dtype == "int8" else 0
        self.work = float(2 * B * Hkv * S * D * itemsize + scales)
        self.dims = f"B={B} H={H} Hkv={Hkv} Lq=1 Lk={S} D={D} {kv_dtype}"
        self.params = {"kv_dtype": kv_dtype, "B": B, "H": H, "Hkv": Hkv, "S": S, "D": D,
                       "cache_bytes": self.work}
        if kv_dtype == "bfloat16":
            # a peer runs a bfloat16 cache in bfloat16 throughout: q, the
            # probabilities and the output keep 8 significant bits (2^-9
            # relative each), so its output is within a few 2^-9 of the
            # oracle's, not within the float32 tolerance
            self.peer_rtol = 2.0**-6
        if kv_dtype != self.dtype.name and self.dtype != np.float32:
            self.unavailable = "narrow K/V caches take float32 queries (--dtype float32)"
        self._kv = None

    def kv(self):
        """``(k, v, scale kwargs)`` in this row's storage, made on first use."""
        if self._kv is None:
            self._kv = self.inputs.store(self.kv_dtype)
        return self._kv

    @property
    def q(self):
        return self.inputs.q

    @property
    def k(self):
        return self.kv()[0]

    @property
    def v(self):
        return self.kv()[1]

    def fastattn_fn(self):
        q, (k, v, kw) = self.q, self.kv()
        return lambda: fastattn.scaled_dot_product_attention(q, k, v, **kw)

    def oracle(self):
        k, v, kw = self.kv()
        return reference.scaled_dot_product_attention(self.q, k, v, **kw)

    def baselines(self):
        k, v, kw = self.kv()
        arrays = [_reducible(a) for a in (k, v, *kw.values())]
        read = ParallelRead(arrays, fastattn.get_num_threads())
        return {READ_BASELINE: self.threaded_baseline(read)}

    def metrics(self, policy):
        if self.kv_dtype == self.dtype.name:
            return {}
        got = self.fastattn_fn()()
        cos = cosine(got, self.inputs.full_output())
        floor = COSINE_TARGETS.get(self.kv_dtype)
        verdict = "" if floor is None else (
            f" (target >= {floor:g}) " + ("ok" if cos >= floor else "BELOW TARGET"))
        return {f"cosine to the {self.dtype.name}-cache output": (cos, f"{cos:.8f}{verdict}")}

    def release(self):
        super().release()
        self._kv = self.inputs = None


def decode_rows(case, shape, dtype, rng):
    """The rows of a decode case at ``shape``: the run's dtype first, then
    each narrow kv_dtype, over the same q, K and V."""
    inputs = DecodeInputs(shape, dtype, rng)
    return [DecodeProblem(case, shape, dtype, inputs, kv)
            for kv in (np.dtype(dtype).name,) + KV_DTYPES[1:]]


GREEDY_KV_DTYPES = ("bfloat16", "float16", "int8")
# The end-to-end target: the narrow cache's greedy tokens are the float32
# cache's at 99% of the positions.
GREEDY_TARGET = 0.99
GREEDY_SEED = 0


class GreedyRun:
    """The model of the greedy case and its float32-cache tokens, shared
    by the rows (made on first use)."""

    def __init__(self, shape, dtype):
        self.shape, self.steps = shape, shape.S
        self.unavailable = None
        if np.dtype(dtype) != np.float32:
            self.unavailable = "narrow K/V caches take float32 layers (--dtype float32)"
        elif shape.B != 1:
            self.unavailable = "the greedy decode runs one sequence: B must be 1"
        self._model = self._tokens = None

    def model(self):
        if self._model is None:
            from fastattn.bench.greedy import TinyDecoder

            s = self.shape
            self._model = TinyDecoder(embed_dim=s.H * s.D, num_heads=s.H,
                                      num_kv_heads=s.kv_heads, seed=GREEDY_SEED)
        return self._model

    def float32_tokens(self):
        if self._tokens is None:
            self._tokens = self.model().generate(self.steps)
        return self._tokens


class GreedyProblem(Problem):
    """A greedy decode of ``S`` tokens through
    :class:`fastattn.bench.greedy.TinyDecoder` (3 layers of ``H`` heads,
    ``Hkv`` kv heads of ``D``, RoPE) with ``kv_dtype`` caches. Its check is
    the end-to-end target, not the NumPy oracle: the tokens must be the
    float32 cache's at ``GREEDY_TARGET`` of the positions (the decode is
    free-running, so one early flip fails it). Metric: the agreement under
    teacher forcing (both fed the float32 cache's tokens), which one flip
    does not propagate through."""

    kind = "greedy"
    unit = "call"
    compare_peers = False

    def __init__(self, case, label, shape, dtype, run, kv_dtype):
        super().__init__(case, label, shape, dtype)
        self.run, self.kv_dtype = run, kv_dtype
        self.unavailable = run.unavailable
        self.work = 1.0
        self.dims = (f"{shape.S} tokens, 3 layers E={shape.H * shape.D} H={shape.H} "
                     f"Hkv={shape.kv_heads} RoPE")
        self.params = {"kv_dtype": kv_dtype, "greedy": True, "steps": shape.S}

    def fastattn_fn(self):
        model, steps, kv = self.run.model(), self.run.steps, self.kv_dtype
        return lambda: model.generate(steps, kv_dtype=kv)

    def oracle(self):
        return self.run.float32_tokens()

    def compare_output(self, got, ref, rtol):
        from fastattn.bench.greedy import agreement

        agree, _ = agreement(got, ref)
        return agree >= GREEDY_TARGET, 1.0 - agree

    def mismatch_note(self, error, rtol):
        return (f"the tokens are the float32 cache's at {100 * (1 - error):.1f}% of the "
                f"positions, below the {100 * GREEDY_TARGET:.0f}% target")

    def metrics(self, policy):
        from fastattn.bench.greedy import agreement

        ref = self.run.float32_tokens()
        model, steps = self.run.model(), self.run.steps
        agree, first = agreement(model.generate(steps, kv_dtype=self.kv_dtype), ref)
        forced, _ = agreement(model.generate(steps, kv_dtype=self.kv_dtype, forced=ref), ref)
        where = "none" if first is None else f"step {first}"
        same = int(round(agree * steps))
        return {
            "tokens as the float32 cache": (agree, (
                f"{same}/{steps} ({100 * agree:.1f}%; target >= {100 * GREEDY_TARGET:.0f}%) "
                f"{'ok' if agree >= GREEDY_TARGET else 'BELOW TARGET'}, first difference: "
                f"{where}; {len(set(ref.tolist()))} distinct tokens")),
            "tokens as the float32 cache, teacher-forced": (
                forced, f"{int(round(forced * steps))}/{steps} ({100 * forced:.1f}%)"),
        }

    def release(self):
        super().release()
        self.run = None


# ---------------------------------------------------------------- the registry

@case("sdpa", "scaled_dot_product_attention, non-causal",
      shapes=["1x12x128x64", "1x12x512x64", "4x8x1024x128"], quick=["1x12x128x64"])
def _sdpa(shape, dtype, rng):
    return [AttentionProblem("sdpa", "sdpa", shape, dtype, rng)]


@case("causal", "scaled_dot_product_attention, is_causal=True",
      shapes=["1x12x128x64", "1x12x512x64", "4x8x1024x128"], quick=["1x12x128x64"])
def _causal(shape, dtype, rng):
    return [AttentionProblem("causal", "sdpa causal", shape, dtype, rng, is_causal=True)]


@case("padded", "scaled_dot_product_attention, half of every sequence padded via key_lengths",
      shapes=["1x12x512x64", "4x8x1024x128"], quick=["2x12x128x64"])
def _padded(shape, dtype, rng):
    return [AttentionProblem("padded", "sdpa padded", shape, dtype, rng, padded=True)]


@case("decode", "1 query over a KV cache of S keys in float32, bfloat16, float16 and int8; "
      "shapes BxH/HkvxSxD for GQA",
      shapes=["1x32x2048x128", "1x32/8x8192x128", "1x32x8192x128", "8x32x2048x128",
              "8x32/8x8192x128"],
      quick=["1x32/8x512x128"], rows=len(KV_DTYPES), kv_heads=True)
def _decode(shape, dtype, rng):
    return decode_rows("decode", shape, dtype, rng)


@case("decode_lengths", "decode time against the cache length per kv_dtype (for --plot)",
      shapes=[f"1x32x{S}x128" for S in (256, 512, 1024, 2048, 4096, 8192)],
      quick=["1x32x64x128", "1x32x128x128", "1x32x256x128"], rows=len(KV_DTYPES),
      default=False, kv_heads=True)
def _decode_lengths(shape, dtype, rng):
    return decode_rows("decode_lengths", shape, dtype, rng)


@case("greedy", "end to end: a greedy decode of S tokens through a 3-layer stack (heads H/Hkv "
      "of D), each narrow kv_dtype against the float32 cache",
      shapes=["1x8/2x256x8"], quick=["1x8/2x64x8"], rows=len(GREEDY_KV_DTYPES), kv_heads=True)
def _greedy(shape, dtype, rng):
    run = GreedyRun(shape, dtype)
    return [GreedyProblem("greedy", f"greedy {kv}", shape, dtype, run, kv)
            for kv in GREEDY_KV_DTYPES]


@case("overhead", "per-call cost: scaled_dot_product_attention of 1 query over S keys",
      shapes=["1x1x16x64"])
def _overhead(shape, dtype, rng):
    return [OverheadProblem("overhead", "per-call", shape, dtype, rng)]


@case("mha", "the MultiHeadAttention layer (E = H*D), all keys valid and half padded",
      shapes=["1x12x128x64", "1x12x512x64"], quick=["1x12x128x64"], rows=2)
def _mha(shape, dtype, rng):
    return [MHAProblem("mha", "mha", shape, dtype, rng),
            MHAProblem("mha", "mha padded", shape, dtype, rng, padded=True)]


@case("mha_decode", "the layer's decode step: 1 token after S-1 cached in a KVCache",
      shapes=["1x12x1025x64"], quick=["1x12x257x64"])
def _mha_decode(shape, dtype, rng):
    return [MHADecodeProblem("mha_decode", "mha decode", shape, dtype, rng)]


@case("softmax", "masked_softmax on (B, H, S, S) scores with key_lengths",
      shapes=["8x12x512x64"], quick=["2x12x128x64"], rows=2)
def _softmax(shape, dtype, rng):
    return [SoftmaxProblem("softmax", "masked_softmax", shape, dtype, rng),
            SoftmaxProblem("softmax", "masked_softmax out=", shape, dtype, rng, reuse_out=True)]


@case("heads", "split_heads and merge_heads",
      shapes=["8x12x1024x64"], quick=["4x12x256x64"], rows=2)
def _heads(shape, dtype, rng):
    return [HeadsProblem("heads", "split_heads", shape, dtype, rng),
            HeadsProblem("heads", "merge_heads", shape, dtype, rng, merge=True)]


@case("pe", "sinusoidal_position_encoding table (S, H*D)",
      shapes=["1x12x2048x64"], quick=["1x12x512x64"])
def _pe(shape, dtype, rng):
    return [PEProblem("pe", "pe table", shape, dtype, rng)]


@case("gil", "GIL release: each kernel from 2 Python threads vs 1 (num_threads=1)",
      shapes=["4x8x128x64"], quick=["2x8x64x64"], rows=8,
      default=False)
def _gil(shape, dtype, rng):
    return [GilProblem("gil", f"gil {label}", shape, dtype, call, oracle)
            for label, call, oracle in _gil_kernels(shape, dtype, rng)]


@case("cuda", "GPU: SDPA on CuPy arrays vs torch's math and default backends",
      shapes=["8x12x512x64", "8x16x2048x64", "1x16x4096x64"], quick=["8x12x512x64"],
      rows=2, default=False)
def _cuda(shape, dtype, rng):
    return [CudaProblem("cuda", "cuda sdpa", shape, dtype, rng),
            CudaProblem("cuda", "cuda sdpa causal", shape, dtype, rng, is_causal=True)]


# The cases that have a bfloat16 / float16 path (--dtype bfloat16 or float16);
# the others report n/a there
HALF_CASES = ("sdpa", "causal", "padded", "decode", "overhead", "mha", "mha_decode", "softmax",
              "heads")


def problems_for(case, shape, dtype, rng):
    """The rows of one case at one shape, in order."""
    if case not in REGISTRY:
        raise ValueError(f"unknown case {case!r}; choose from {', '.join(CASES)}")
    problems = REGISTRY[case].build(shape, dtype, rng)
    if np.dtype(dtype).itemsize == 2 and case not in HALF_CASES:
        for p in problems:
            p.unavailable = f"{case} has no {np.dtype(dtype).name} path"
    return problems


def plan(cases, shapes=None, *, quick=False):
    """``[(case, shape), ...]`` in suite order: ``shapes`` overrides every
    case's default shapes."""
    table = QUICK_SHAPES if quick else DEFAULT_SHAPES
    return [(case, shape) for case in cases for shape in (shapes or table[case])]
