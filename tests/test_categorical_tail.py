"""Categorical draws keep their tail mass (Zheng et al. 2024: float32 Gumbel noise truncates).

The largest Gumbel noise jax.random.gumbel can produce in float32 is -log(-log(1 - 2^-23))
~ 15.94: its uniform draw has 23 random bits. P(G > 16) = 1 - exp(-e^-16) ~ 1.125e-7, so
among 2^26 exact draws about 7.55 exceed 16 (Poisson); P(none) = e^-7.55 ~ 5.3e-4, the
false-alarm rate of the test below, while the float32 scheme fails it with certainty.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddiff

NUM_DRAWS = 2**26
CHUNK = 2**22
THRESHOLD = 16.0


def _count_above(noise_fn, key) -> int:
    """How many of NUM_DRAWS noise values exceed THRESHOLD (chunked to bound memory),
    compiled with LLVM's optimisation level 2: the suite's level 0 (tests/conftest.py)
    compiles faster but runs these 2^26 draws several times slower."""

    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 2})
    def count(key):
        def body(total, chunk_key):
            return total + jnp.sum(noise_fn(chunk_key, (CHUNK,)) > THRESHOLD), None

        total, _ = jax.lax.scan(body, jnp.int32(0), jax.random.split(key, NUM_DRAWS // CHUNK))
        return total

    return int(count(key))


def test_float32_gumbel_cannot_reach_the_tail():
    largest_uniform = np.float32(1.0) - np.float32(2.0**-23)
    ceiling = -math.log(-math.log(float(largest_uniform)))
    assert ceiling < 15.95 < THRESHOLD
    assert _count_above(jax.random.gumbel, jax.random.PRNGKey(0)) == 0


def test_exact_gumbel_reaches_the_tail():
    expected = NUM_DRAWS * -math.expm1(-math.exp(-THRESHOLD))
    assert expected == pytest.approx(7.55, abs=0.01)
    observed = _count_above(ddiff.gumbel, jax.random.PRNGKey(0))
    # Poisson(7.55): fail on 0 (probability 5.3e-4) or on more than 25 (probability < 1e-6).
    assert 1 <= observed <= 25, observed


def test_rare_category_frequency():
    """A category of probability 1e-4 among 2^20 exact draws: 104.9 expected, +-5 sd."""
    probs = jnp.asarray([1.0 - 1e-4, 1e-4])
    draws = ddiff.categorical_from_probs(jax.random.PRNGKey(1), jnp.broadcast_to(probs, (2**20, 2)))
    observed = int(jnp.sum(draws == 1))
    expected = 2**20 * 1e-4
    assert abs(observed - expected) <= 5 * math.sqrt(expected), observed


def test_exponentials_are_positive_with_mean_one():
    """E[Exp(1)] = 1: 2^20 draws, tolerance 5 standard errors (5/1024)."""
    draws = ddiff.standard_exponential(jax.random.PRNGKey(2), (2**20,))
    assert float(jnp.mean(draws)) == pytest.approx(1.0, abs=5 / 1024)
    assert bool(jnp.all(draws > 0)) and bool(jnp.all(jnp.isfinite(draws)))


VOCAB = 50257
"""GPT-2's vocabulary: the size of the rows a long run of a text model draws from."""


def _zipf_log_probs(exponent: float = 1.1) -> np.ndarray:
    """log p of a Zipf law over VOCAB tokens (rank k has p proportional to k^-exponent), as
    a language model's next-token distribution roughly is."""
    log_weights = -exponent * np.log(np.arange(1, VOCAB + 1, dtype=np.float64))
    return log_weights - np.logaddexp.reduce(log_weights)


def test_draws_are_exact_gumbel_max_in_the_samplers_dtypes():
    """ddiff.categorical is the argmax of the logits (widened to float32) plus
    ddiff.gumbel's noise of the same key: its draws inherit the noise's full tail (checked
    beyond float32's ceiling above), for the logits of an ancestral step of a 1024-step run
    over VOCAB tokens (stay masked with 1 - 1/512, each value with mu / 512) in the
    samplers' float32 and in bfloat16 (mixed precision)."""
    step = np.concatenate([np.log(1 / 512) + _zipf_log_probs(), [np.log1p(-1 / 512)]])
    for dtype in (jnp.float32, jnp.bfloat16):
        logits = jnp.broadcast_to(jnp.asarray(step, dtype), (8, VOCAB + 1))
        key = jax.random.PRNGKey(4)
        expected = jnp.argmax(logits.astype(jnp.float32) + ddiff.gumbel(key, logits.shape), axis=-1)
        np.testing.assert_array_equal(ddiff.categorical(key, logits), expected)


def test_a_long_runs_rows_are_drawn_with_their_tail_mass():
    """512 float32 rows of the Zipf law over VOCAB tokens (a decoding draw from mu): the
    counts in bins of rank 1, 2-10, 11-100, 101-1000, 1001-10000, 10001-30000 and beyond
    (the last 20257 tokens, 11.3 to 11.9 nats below the first, hold 1.7%) match the exact
    probabilities (chi-square, false alarm 1e-3)."""
    from scipy import stats

    log_probs = _zipf_log_probs()
    logits = jnp.broadcast_to(jnp.asarray(log_probs, jnp.float32), (512, VOCAB))
    ranks = np.asarray(jax.jit(ddiff.categorical)(jax.random.PRNGKey(5), logits))
    edges = [0, 1, 10, 100, 1000, 10000, 30000, VOCAB]
    observed = np.histogram(ranks, bins=edges)[0]
    probs = np.exp(log_probs)
    expected = 512 * np.asarray([probs[a:b].sum() for a, b in zip(edges[:-1], edges[1:], strict=True)])
    assert expected.min() > 5, expected
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert stats.chi2.sf(chi2, len(expected) - 1) > 1e-3, (observed, expected)
