"""End to end through narrow KV caches: a greedy decode through a small
stack of RoPE + GQA layers (fastattn.bench.greedy.TinyDecoder) with each
kv_dtype, against the float32 cache's tokens and, for the float32 cache,
against a float64 NumPy decode without any cache."""

import numpy as np
import pytest

from fastattn.bench.greedy import TinyDecoder, agreement

STEPS = 64
KV_DTYPES = ["float32", "bfloat16", "float16", "int8"]


@pytest.fixture(scope="module")
def model():
    return TinyDecoder(seed=0)


@pytest.fixture(scope="module")
def float32_run(model):
    return model.generate(STEPS, return_logits=True)


def test_the_cached_decode_is_the_uncached_float64_decode(model, float32_run):
    # the oracle recomputes the whole causal prefix in float64 at every step
    tokens, _ = float32_run
    np.testing.assert_array_equal(tokens[:24], model.generate_reference(24))


def test_the_run_is_not_degenerate(model, float32_run):
    # varied tokens, and logits spread well beyond the gaps a narrow cache
    # perturbs: otherwise agreeing tokens would prove nothing
    tokens, logits = float32_run
    assert len(set(tokens.tolist())) >= 16, tokens
    assert np.median(logits.std(axis=1)) > 1.0
    assert len(set(model.prompt)) > 1


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_narrow_cache_agrees_and_is_bitwise_deterministic(model, float32_run, kv_dtype):
    runs = [model.generate(STEPS, kv_dtype=kv_dtype, num_threads=n, return_logits=True)
            for n in (1, 2)]
    for tokens, logits in runs[1:]:
        np.testing.assert_array_equal(tokens, runs[0][0])
        np.testing.assert_array_equal(logits, runs[0][1])
    agree, first = agreement(runs[0][0], float32_run[0])
    assert agree >= 0.99, (kv_dtype, agree, first)
    if kv_dtype == "float32":
        np.testing.assert_array_equal(runs[0][1], float32_run[1])
    else:  # the narrow cache changes the logits, a little
        assert not np.array_equal(runs[0][1], float32_run[1])
        np.testing.assert_allclose(runs[0][1], float32_run[1], rtol=0,
                                   atol=0.05 * np.abs(float32_run[1]).max())


def test_teacher_forcing_feeds_the_given_tokens(model, float32_run):
    tokens, _ = float32_run
    other = np.roll(tokens, 1)
    forced = model.generate(STEPS, forced=other)
    free = model.generate(STEPS)
    np.testing.assert_array_equal(free, tokens)
    assert forced[0] == tokens[0]  # the first step sees the prompt only
    assert not np.array_equal(forced, tokens)


def test_agreement():
    assert agreement([1, 2, 3, 4], [1, 2, 3, 4]) == (1.0, None)
    assert agreement([1, 2, 0, 0], [1, 2, 3, 4]) == (0.5, 2)
