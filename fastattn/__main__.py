"""``python -m fastattn``: show the configuration, then check every kernel
against the NumPy oracle on a small embedded example and print its speed-up
over the oracle. Exits 1 if any kernel disagrees with the oracle."""

import sys

import numpy as np

import fastattn
from fastattn import reference

TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def _examples(rng):
    """(name, fastattn call, oracle call) on small, awkward shapes."""
    scores = rng.standard_normal((4, 8, 96, 131)).astype(np.float32)
    lengths = np.array([131, 70, 1, 0])
    x = rng.standard_normal((4, 77, 8 * 40)).astype(np.float32)
    heads = rng.standard_normal((4, 8, 77, 40)).astype(np.float32)
    q = rng.standard_normal((2, 8, 200, 64)).astype(np.float32)
    k = rng.standard_normal((2, 2, 300, 64)).astype(np.float32)
    v = rng.standard_normal((2, 2, 300, 64)).astype(np.float32)
    softmax_kw = dict(key_lengths=lengths, is_causal=True, causal_alignment="bottom_right")
    sdpa_kw = dict(key_lengths=[300, 123], query_lengths=[200, 150], is_causal=True,
                   causal_alignment="bottom_right")
    pe_kw = dict(layout="interleaved", start_index=10_000)
    return [
        ("masked_softmax", lambda: fastattn.masked_softmax(scores, **softmax_kw),
         lambda: reference.masked_softmax(scores, **softmax_kw)),
        ("apply_sequence_mask", lambda: fastattn.apply_sequence_mask(x, lengths % 78, mode="add"),
         lambda: reference.apply_sequence_mask(x, lengths % 78, mode="add")),
        ("split_heads", lambda: fastattn.split_heads(x, 8), lambda: reference.split_heads(x, 8)),
        ("merge_heads", lambda: fastattn.merge_heads(heads), lambda: reference.merge_heads(heads)),
        ("sinusoidal_position_encoding", lambda: fastattn.sinusoidal_position_encoding(512, 256, **pe_kw),
         lambda: reference.sinusoidal_position_encoding(512, 256, **pe_kw)),
        ("add_position_encoding", lambda: fastattn.add_position_encoding(x),
         lambda: reference.add_position_encoding(x)),
        ("scaled_dot_product_attention", lambda: fastattn.scaled_dot_product_attention(q, k, v, **sdpa_kw),
         lambda: reference.scaled_dot_product_attention(q, k, v, **sdpa_kw)),
    ]


def _best_time(fn, repeats=5):
    from fastattn.bench.timing import TimingPolicy, measure

    return measure(fn, TimingPolicy(min_time=0.0, min_repeats=repeats, warmup=0)).best


def main():
    fastattn.show_config()
    print()
    rng = np.random.default_rng(2024)
    failed = 0
    width = 30
    print(f"{'kernel':<{width}} {'max rel err':>12} {'fastattn':>11} {'oracle':>11} {'speed-up':>9}")
    for name, fast, oracle in _examples(rng):
        got, want = fast(), oracle()
        err = np.abs(got.astype(np.float64) - want).max() / max(np.abs(want).max(), 1e-30)
        ok = err <= TOLERANCE[got.dtype] and got.shape == want.shape and got.dtype == want.dtype
        failed += not ok
        t_fast, t_ref = _best_time(fast), _best_time(oracle)
        status = "" if ok else "  MISMATCH"
        print(f"{name:<{width}} {err:>12.1e} {t_fast*1e3:>9.2f}ms {t_ref*1e3:>9.2f}ms "
              f"{t_ref/t_fast:>8.1f}x{status}")
    print()
    print("all kernels match the oracle" if not failed else f"{failed} kernel(s) DISAGREE with the oracle")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
