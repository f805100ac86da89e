"""MD4 components against closed forms: schedules, the masked process, the mean
parameterization, the ELBO's terms and the ancestral sampler's bookkeeping."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ddiff_plugins import md4

import ddiff

SCALAR_SCHEDULES = ["linear", "cosine"]


def _schedule(name, registry):
    return ddiff.build_component("schedule", {"kind": name}, registry=registry)


@pytest.mark.parametrize("name", SCALAR_SCHEDULES)
def test_schedule_properties(name, registry):
    schedule = _schedule(name, registry)
    grid = jnp.linspace(0.0, 1.0, 201)
    alpha = jax.vmap(schedule.alpha)(grid)
    # End points: alpha(0) = 1 - eps, alpha(1) = eps (float32 tolerance 1e-6).
    assert abs(float(alpha[0]) - (1 - 1e-4)) < 1e-6
    assert abs(float(alpha[-1]) - 1e-4) < 1e-6
    assert bool(jnp.all(jnp.diff(alpha) < 0)), "alpha must decrease"
    derivative = jax.vmap(schedule.alpha_derivative)(grid[1:-1])
    autodiff = jax.vmap(jax.grad(schedule.alpha))(grid[1:-1])
    np.testing.assert_allclose(derivative, autodiff, rtol=1e-5, atol=1e-6)
    weight = jax.vmap(lambda t: md4.elbo_weight(schedule, t))(grid[1:-1])
    np.testing.assert_allclose(weight, derivative / (1 - alpha[1:-1]), rtol=1e-5)


@pytest.fixture(scope="module")
def process(registry):
    return ddiff.build_component(
        "process", {"kind": "masked", "schedule": "cosine"}, supplied={"vocab_size": 3}, registry=registry
    )


def test_marginals_are_distributions_and_match_closed_form(process):
    x0 = jnp.array([0, 1, 2, 1])
    t = jnp.asarray(0.3)
    probs = process.marginal_probs(x0, t)
    alpha = process.schedule.alpha(t)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(probs[jnp.arange(4), x0], alpha, rtol=1e-6)
    np.testing.assert_allclose(probs[:, 3], 1 - alpha, rtol=1e-6)


def test_sample_marginal_frequency(process):
    # 40,000 positions: masked fraction within 5 standard errors of 1 - alpha_t.
    x0 = jnp.zeros(40_000, jnp.int32)
    t = jnp.asarray(0.6)
    x_t = process.sample_marginal(x0, t, key=jax.random.PRNGKey(0))
    p = 1 - float(process.schedule.alpha(t))
    se = math.sqrt(p * (1 - p) / x0.size)
    assert abs(float(jnp.mean(x_t == 3)) - p) < 5 * se
    assert set(np.unique(np.asarray(x_t))) <= {0, 3}


def test_transitions_compose_marginals(process):
    x0 = jnp.array([0, 1, 2])
    s, t = jnp.asarray(0.2), jnp.asarray(0.7)
    direct = process.marginal_probs(x0, t)
    via = process.propagate(process.marginal_probs(x0, s), s, t)
    np.testing.assert_allclose(via, direct, rtol=1e-5, atol=1e-7)
    x_s = jnp.array([0, 3, 2])
    rows = process.transition_probs(x_s, s, t)
    likelihood = process.transition_likelihood(jnp.array([3, 3, 2]), s, t)
    # q(x_t = m | x_s = 0) from the row equals the likelihood column entry for j = 0.
    np.testing.assert_allclose(rows[0, 3], likelihood[0, 0], rtol=1e-6)
    np.testing.assert_allclose(rows[2, 2], likelihood[2, 2], rtol=1e-6)
    assert float(likelihood[1, 3]) == 1.0


def test_prior_kl_is_exact(process):
    # KL(q(x_1|x_0) || p) = alpha_1 log V per position when the prior matches the mask rate.
    x0 = jnp.array([0, 1, 2, 2])
    expected = 4 * 1e-4 * math.log(3)
    np.testing.assert_allclose(process.prior_kl(x0), expected, rtol=1e-3)


def test_mean_parameterization_carries_unmasked_and_never_predicts_mask(registry, process):
    parameterization = ddiff.build_component("parameterization", "mean", registry=registry)
    x_t = jnp.array([3, 1, 3])
    logits = jax.random.normal(jax.random.PRNGKey(1), (3, 3))
    log_mean = parameterization.log_mean(logits, x_t, jnp.asarray(0.5), process)
    assert log_mean.shape == (3, 3)
    np.testing.assert_allclose(jnp.exp(log_mean).sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(jnp.exp(log_mean[1]), jnp.array([0.0, 1.0, 0.0]))
    np.testing.assert_allclose(log_mean[0], jax.nn.log_softmax(logits[0]), rtol=1e-6)


def test_elbo_terms_and_ancestral_sampler(tiny_recipe, tiny_model):
    tokens = jnp.asarray(tiny_recipe.data.split("train").tokens[:8])
    terms = eqx.filter_jit(
        lambda model, x, key: tiny_recipe.objective.batch_terms(model, x, key=key, train=False)
    )(tiny_model, tokens, jax.random.PRNGKey(0))
    recon = 8 * 1e-4 * math.log(5)
    np.testing.assert_allclose(terms.metrics["reconstruction"], recon, rtol=1e-3)
    assert float(terms.nelbo) > 0 and bool(jnp.isfinite(terms.loss))
    output = eqx.filter_jit(
        lambda model, key: tiny_recipe.sampler.sample(
            model, keys=ddiff.sample_keys(key, 0, 3), seq_len=8, conditioning=ddiff.Conditioning()
        )
    )(tiny_model, jax.random.PRNGKey(2))
    assert output.tokens.shape == (3, 8)
    assert int(output.tokens.max()) < 5, "no mask may remain in a finished sample"
    assert int(output.num_function_evals) in (4, 5)


def test_infilling_keeps_given_positions(tiny_recipe, tiny_model):
    fixed = jnp.tile(jnp.arange(8) % 5, (2, 1))
    mask = jnp.array([[True] * 3 + [False] * 5, [False] * 5 + [True] * 3])
    conditioning = ddiff.Conditioning(fixed_tokens=fixed, fixed_mask=mask)
    output = eqx.filter_jit(
        lambda model, key, c: tiny_recipe.sampler.sample(
            model, keys=ddiff.sample_keys(key, 0, 2), seq_len=8, conditioning=c
        )
    )(tiny_model, jax.random.PRNGKey(3), conditioning)
    np.testing.assert_array_equal(np.where(mask, output.tokens, -1), np.where(mask, fixed, -1))


def test_markov_source_is_structured_and_exact(tiny_recipe):
    source = tiny_recipe.data
    stats = source.reference_stats()
    assert stats["entropy_bits_per_token"] <= 0.75 * stats["unigram_bits_per_token"]
    # The exact entropy equals the mean of -log2 p(x) / D over the data (n = 256 sequences,
    # within 5 standard errors).
    tokens = source.split("train").tokens
    bits = -source.log_prob(tokens) / (math.log(2) * source.seq_len)
    se = bits.std(ddof=1) / math.sqrt(len(bits))
    assert abs(bits.mean() - stats["entropy_bits_per_token"]) < 5 * se
