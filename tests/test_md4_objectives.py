"""MD4 objectives beyond the conformance kit: terms, the discrete time grid, and the
one-step discrete bound, whose gap is exactly the data's total correlation."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddiff
import ddiff.testing as kit

V, D = 3, 4


def build(slot, spec):
    return ddiff.build_component(slot, spec, vocab_size=V, seq_len=D)


@eqx.filter_jit
def per_example(objective, model, x0, key):
    return objective.per_example_terms(model, x0, key=key, train=False)


@pytest.fixture(scope="module")
def oracle():
    process = build("process", {"kind": "masked", "schedule": "cosine"})
    toy = kit.markov_toy(V, D)
    return kit.oracle_model(toy, process, build("parameterization", "mean")), toy


def test_discrete_times_are_antithetic_on_the_grid():
    """With B a multiple of T, the antithetic draw visits every step index B/T times."""
    objective = build("objective", {"kind": "md4_discrete_elbo", "steps": 10})
    times = np.asarray(objective.sample_times(jax.random.PRNGKey(0), 1000))
    index = np.rint(times * 10).astype(int)
    np.testing.assert_allclose(times * 10, index, atol=1e-5)
    np.testing.assert_array_equal(np.bincount(index, minlength=11), [0] + [100] * 10)


@pytest.mark.parametrize("name", ["md4_elbo", "md4_discrete_elbo"])
def test_terms_add_up(oracle, name):
    model, toy = oracle
    x0, _ = toy.sample(jax.random.PRNGKey(0), 64)
    terms = per_example(build("objective", name), model, x0, jax.random.PRNGKey(1))
    total = terms.metrics["diffusion"] + terms.metrics["reconstruction"] + terms.metrics["prior"]
    np.testing.assert_allclose(terms.nelbo, total, rtol=1e-6)
    np.testing.assert_allclose(terms.loss, terms.nelbo)
    alpha_0 = float(model.process.schedule.alpha(jnp.zeros(())))
    np.testing.assert_allclose(terms.metrics["reconstruction"], D * (1 - alpha_0) * math.log(V), rtol=1e-3)
    assert np.all(np.asarray(terms.metrics["diffusion"]) >= 0)
    assert np.all(np.asarray(terms.metrics["prior"]) >= 0)


def test_one_step_discrete_elbo_gap_is_the_total_correlation(oracle):
    """With T = 1 every position is unmasked at once from its exact marginal p(x^n), so
    E[nelbo_1] - H(p) = sum_n H(x^n) - H(p) (up to O(eps)): 2^14 draws, 4 standard errors."""
    model, toy = oracle
    objective = build("objective", {"kind": "md4_discrete_elbo", "steps": 1})
    x0, _ = toy.sample(jax.random.PRNGKey(2), 2**14)
    nelbo = np.asarray(per_example(objective, model, x0, jax.random.PRNGKey(3)).nelbo, np.float64)
    gap = nelbo + np.asarray(jax.vmap(toy.log_prob)(x0), np.float64)
    error = gap.std() / math.sqrt(len(gap))
    assert abs(gap.mean() - kit.total_correlation(toy)) <= 4 * error + 2e-3, (gap.mean(), error)
