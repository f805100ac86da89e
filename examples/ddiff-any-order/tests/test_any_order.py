"""The any-order bound: its weights against quadrature, the conformance kit's tightness
checks, and the same expectation as md4_elbo for a model that is not exact.

Kit sizes are small so that the package's tests take seconds: 2^12 examples per mean,
tolerance z = 4 standard errors (false alarm 6.3e-5 per comparison).
"""

# --8<-- [start:weights]
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

import ddiff
from ddiff.testing import Setup, dense_toy, markov_toy, objective_checks, oracle_model
from ddiff_any_order import mask_count_weight


def quadrature_weight(alpha_0: float, alpha_1: float, k: int, seq_len: int) -> float:
    """C(D, k) int_{alpha_1}^{alpha_0} (1 - a)^(k - 1) a^(D - k) da, by adaptive quadrature."""

    def integrand(a):
        return (1.0 - a) ** (k - 1) * a ** (seq_len - k)

    integral, _ = integrate.quad(integrand, alpha_1, alpha_0, epsabs=0, epsrel=1e-10)
    return math.comb(seq_len, k) * integral


@pytest.mark.parametrize("eps", [1e-4, 0.05])
def test_weights_match_quadrature(eps):
    seq_len = 16
    built = ddiff.build_component(
        "schedule", {"kind": "linear", "eps": eps}, vocab_size=3, seq_len=seq_len, num_classes=0
    )
    alpha_0, alpha_1 = float(built.alpha(jnp.zeros(()))), float(built.alpha(jnp.ones(())))
    ks = jnp.arange(1, seq_len + 1)
    weights = jax.vmap(lambda k: mask_count_weight(built, k, seq_len))(ks)
    expected = [quadrature_weight(alpha_0, alpha_1, int(k), seq_len) for k in ks]
    np.testing.assert_allclose(weights, expected, rtol=2e-4)


def test_weights_are_one_over_k_without_clipping():
    schedule = ddiff.build_component(
        "schedule", {"kind": "linear", "eps": 0.0}, vocab_size=3, seq_len=8, num_classes=0
    )
    weights = jax.vmap(lambda k: mask_count_weight(schedule, k, 8))(jnp.arange(1, 9))
    np.testing.assert_allclose(weights, 1.0 / np.arange(1, 9), rtol=1e-5)


# --8<-- [end:weights]


# --8<-- [start:kit]
# The kit's models follow the objective's requirements: here, networks that ignore t.
TIME_INDEPENDENT = Setup(num_examples=2**12)
CHECKS = objective_checks("any_order_elbo", TIME_INDEPENDENT)


@pytest.mark.parametrize("check", ["tight[markov]", "tight[parity]"])
def test_tight_with_the_exact_denoiser(check):
    CHECKS[check]().raise_if_failed()


# --8<-- [end:kit]


# --8<-- [start:same-bound]
def per_example_nelbo(name, model, x0, key):
    """Each example's nelbo under the objective registered as ``name``."""
    objective = TIME_INDEPENDENT.build("objective", name)
    nelbo = jax.jit(lambda m, x, k: objective.per_example_terms(m, x, key=k, train=False).nelbo)
    return np.asarray(nelbo(model, x0, key), np.float64)


def test_same_expectation_as_md4_elbo_for_an_inexact_model():
    # The exact denoiser of another distribution (dense), evaluated on markov data: a model
    # that ignores t but is far from exact, so a wrong weight would show. 2^12 examples,
    # the difference of the two means within z = 4 standard errors.
    data, wrong = markov_toy(3, 4, seed=0), dense_toy(3, 4, seed=0)
    process = TIME_INDEPENDENT.process_with()
    model = oracle_model(wrong, process, TIME_INDEPENDENT.build("parameterization", "mean"))
    x0, _ = data.sample(jax.random.PRNGKey(1), 2**12)
    any_order = per_example_nelbo("any_order_elbo", model, x0, jax.random.PRNGKey(2))
    md4 = per_example_nelbo("md4_elbo", model, x0, jax.random.PRNGKey(3))
    difference = any_order.mean() - md4.mean()
    error = math.sqrt(any_order.var(ddof=1) / len(any_order) + md4.var(ddof=1) / len(md4))
    assert abs(difference) < 4 * error, (difference, error, any_order.mean(), md4.mean())
    # Measured on 2^16 examples: standard deviations 3.16 (any order) and 20.5 (md4_elbo).
    assert any_order.std() < md4.std() / 2


# --8<-- [end:same-bound]
