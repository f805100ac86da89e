"""The conformance kit itself: exact quantities against brute force, and the checks'
power (each check fails a deliberately broken component)."""

import itertools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddiff
import ddiff.testing as kit

V, D = 3, 4
SMALL = 2**13  # draws for negative controls, whose effects are many standard errors wide


@pytest.fixture(scope="module")
def toys():
    return {**kit.toy_distributions(V, D), "classes": kit.class_conditional_toy(V, D)}


@pytest.fixture(scope="module")
def process():
    return ddiff.build_component("process", {"kind": "masked", "schedule": "cosine"}, vocab_size=V, seq_len=D)


exact_log_marginal = eqx.filter_jit(kit.exact_log_marginal)
exact_log_denoiser = eqx.filter_jit(kit.exact_log_denoiser)
exact_log_score = eqx.filter_jit(kit.exact_log_score)
exact_reverse_rates = eqx.filter_jit(kit.exact_reverse_rates)


def _brute_marginals(toy, process, t, label=None):
    """p_t(z) for every noisy state z (float64), by summing p(x) prod_n q(z^n | x^n)."""
    probs = toy.probabilities(label)
    sequences = np.asarray(toy.sequences())
    marginal = np.asarray(
        jax.vmap(lambda x: process.marginal_probs(x, jnp.asarray(t)))(jnp.asarray(sequences)), np.float64
    )  # (sequences, D, S)
    states = list(itertools.product(range(process.num_states), repeat=D))
    table = {}
    for z in states:
        likelihood = np.prod(marginal[:, np.arange(D), list(z)], axis=-1)
        table[z] = (probs * likelihood, float((probs * likelihood).sum()))
    return sequences, table


# --------------------------------------------------------------------------- toys


def test_toys_are_normalised_with_the_stated_structure(toys):
    for name, toy in toys.items():
        probs = toy.probabilities()
        assert probs.sum() == pytest.approx(1.0, abs=1e-9), name
        assert toy.entropy() <= D * math.log(V) + 1e-9, name
    parity = toys["parity"].probabilities()
    assert (parity > 0).sum() == V ** (D - 1)
    assert toys["parity"].entropy() == pytest.approx((D - 1) * math.log(V), rel=1e-6)
    assert kit.total_correlation(toys["independent"]) == pytest.approx(0.0, abs=1e-5)
    assert kit.total_correlation(toys["parity"]) == pytest.approx(math.log(V), rel=1e-5)
    classes = toys["classes"]
    mixture = sum(
        math.exp(float(classes.class_log_probs[c])) * classes.probabilities(c) for c in range(2)
    )
    np.testing.assert_allclose(classes.probabilities(None), mixture, atol=1e-6)
    np.testing.assert_allclose(classes.probabilities(2), mixture, atol=1e-6)  # null class


def test_toy_samples_follow_the_toy(toys):
    """2^14 draws of the dense toy: chi-square at false-alarm rate 1e-3."""
    toy = toys["dense"]
    tokens, labels = toy.sample(jax.random.PRNGKey(0), 2**14)
    assert labels is None
    index = np.asarray(tokens) @ (V ** np.arange(D - 1, -1, -1))
    test = kit.chi_square_test(np.bincount(index, minlength=V**D), toy.probabilities())
    assert test["p_value"] > 1e-3, test


def test_toy_refuses_bad_tables():
    with pytest.raises(ddiff.DdiffError, match="sum to"):
        kit.ToyDistribution(
            log_probs=jnp.zeros((1, 9)), class_log_probs=jnp.zeros(1), vocab_size=3, seq_len=2, num_classes=0
        )
    with pytest.raises(ddiff.DdiffError, match="more than"):
        kit.ToyDistribution(
            log_probs=jnp.zeros((1, 2**13)), class_log_probs=jnp.zeros(1), vocab_size=2, seq_len=13, num_classes=0
        )


# --------------------------------------------------------------------------- exact quantities


@pytest.mark.parametrize("toy_name", ["dense", "parity", "classes"])
def test_denoiser_marginal_and_score_match_brute_force(toys, process, toy_name):
    toy, t = toys[toy_name], 0.55
    label = jnp.int32(1) if toy_name == "classes" else None
    sequences, table = _brute_marginals(toy, process, t, None if label is None else 1)
    total = sum(value for _, value in table.values())
    assert total == pytest.approx(1.0, abs=1e-6)
    states = [z for z, (_, value) in table.items() if value > 1e-12]
    rng = np.random.default_rng(0)
    for z in [states[i] for i in rng.choice(len(states), 6, replace=False)]:
        joint, value = table[z]
        x_t = jnp.asarray(z)
        log_marginal = float(exact_log_marginal(toy, process, x_t, jnp.asarray(t), label))
        assert log_marginal == pytest.approx(math.log(value), abs=1e-4)
        posterior = joint / value
        expected = np.stack([np.bincount(sequences[:, n], posterior, V) for n in range(D)])
        mean = np.exp(np.asarray(exact_log_denoiser(toy, process, x_t, jnp.asarray(t), label)))
        np.testing.assert_allclose(mean, expected, atol=1e-5)
        score = np.exp(np.asarray(exact_log_score(toy, process, x_t, jnp.asarray(t), label)))
        for n in range(D):
            for y in range(process.num_states):
                changed = list(z)
                changed[n] = y
                expected_score = table[tuple(changed)][1] / value
                assert score[n, y] == pytest.approx(expected_score, rel=1e-4, abs=1e-9)


def test_masked_score_and_rates_are_the_mean_rescaled(toys, process):
    """Masked process: s[n, v] = alpha/(1-alpha) mu[n, v] at a masked position (SEDD/MD4), the
    reverse rate to v is -alpha'/(1-alpha) mu[n, v], and an unmasked position never moves."""
    toy, t = toys["markov"], jnp.asarray(0.3)
    x_t = jnp.asarray([1, V, 0, V])
    alpha, derivative = process.schedule.alpha(t), process.schedule.alpha_derivative(t)
    mean = np.exp(np.asarray(exact_log_denoiser(toy, process, x_t, t)))
    score = np.exp(np.asarray(exact_log_score(toy, process, x_t, t)))
    rates = np.asarray(exact_reverse_rates(toy, process, x_t, t))
    for n in (1, 3):
        np.testing.assert_allclose(score[n, :V], float(alpha / (1 - alpha)) * mean[n], rtol=1e-4)
        np.testing.assert_allclose(rates[n, :V], float(-derivative / (1 - alpha)) * mean[n], rtol=1e-4)
        assert rates[n, V] == pytest.approx(-rates[n, :V].sum(), rel=1e-5)
    for n in (0, 2):
        np.testing.assert_allclose(rates[n], 0.0, atol=1e-6)


def test_prior_gap(toys):
    """KL(q_1 || p_1) vanishes when alpha_1 = 0 and is O(eps) with the paper's eps = 1e-4."""
    exact = ddiff.build_component(
        "process", {"kind": "masked", "schedule": {"kind": "linear", "eps": 0.0}}, vocab_size=V, seq_len=D
    )
    clipped = ddiff.build_component("process", {"kind": "masked", "schedule": "linear"}, vocab_size=V, seq_len=D)
    assert kit.prior_gap(toys["markov"], exact) == pytest.approx(0.0, abs=1e-7)
    assert 0.0 < kit.prior_gap(toys["markov"], clipped) < D * 1e-4 * math.log(V) + 1e-6


def test_oracle_model_capabilities(toys, process):
    model = kit.oracle_model(toys["classes"], process, ddiff.build_component("parameterization", "mean"))
    assert model.network.capabilities() == {"time_independent", "class_conditional"}
    assert model.network(jnp.full((D,), V), jnp.asarray(0.5)).shape == (D, V)


def test_chi_square_pools_rare_cells_and_counts_impossible_samples():
    """Expected counts 500, 300, 199 and 0.6 + 0.4 (pooled into one cell of 1.0), and 0."""
    probs = np.asarray([0.5, 0.3, 0.199, 0.0006, 0.0004, 0.0])
    test = kit.chi_square_test(np.asarray([500, 300, 199, 1, 0, 0]), probs)
    assert test["dof"] == 3 and test["chi2"] == pytest.approx(0.0, abs=1e-9)
    assert test["p_value"] == pytest.approx(1.0)
    assert kit.chi_square_test(np.asarray([500, 300, 199, 0, 0, 1]), probs)["impossible"] == 1


# --------------------------------------------------------------------------- the checks' power


class ScaledELBO(ddiff.AbstractObjective):
    """A broken objective: MD4's continuous ELBO with its diffusion term scaled (an array,
    so that every scale shares one compiled function)."""

    scale: jax.Array

    def example_terms(self, model, x0, t, *, key, label=None, train=True):
        terms = ddiff.build_component("objective", "md4_elbo").example_terms(
            model, x0, t, key=key, label=label, train=train
        )
        diffusion = self.scale * terms.metrics["diffusion"]
        nelbo = terms.nelbo - terms.metrics["diffusion"] + diffusion
        return ddiff.ObjectiveTerms(loss=nelbo, nelbo=nelbo, metrics={**terms.metrics, "diffusion": diffusion})


class TimeWarpedNetwork(ddiff.AbstractNetwork):
    """A network whose (wrong) prediction depends on t: the oracle of another toy,
    tempered by t. The ELBO of such a model depends on the schedule's shape."""

    oracle: kit.OracleNetwork
    time_conditioned: bool = eqx.field(static=True, default=True)
    num_classes: int = eqx.field(static=True, default=0)

    def __call__(self, x_t, t, *, label=None, key=None):
        return (0.2 + 3.0 * t) * self.oracle(x_t, t, label=label)


@pytest.fixture(scope="module")
def mean_parameterization():
    return ddiff.build_component("parameterization", "mean")


def test_tight_check_accepts_the_oracle_and_rejects_a_scaled_elbo(toys, process, mean_parameterization):
    model = kit.oracle_model(toys["markov"], process, mean_parameterization)
    key = jax.random.PRNGKey(0)
    good = kit.check_tight(ScaledELBO(scale=jnp.asarray(1.0)), model, toys["markov"], key=key, num_examples=SMALL)
    assert good.passed, good
    bad = kit.check_tight(ScaledELBO(scale=jnp.asarray(1.1)), model, toys["markov"], key=key, num_examples=SMALL)
    assert not bad.passed, bad
    with pytest.raises(kit.ConformanceError, match="tight FAILED"):
        bad.raise_if_failed()


def test_entropy_check_rejects_an_objective_below_the_entropy(toys, process, mean_parameterization):
    model = kit.oracle_model(toys["markov"], process, mean_parameterization)
    result = kit.check_entropy_bound(
        ScaledELBO(scale=jnp.asarray(0.7)), model, toys["markov"], key=jax.random.PRNGKey(1), num_examples=SMALL
    )
    assert not result.passed, result


def test_discrete_check_rejects_a_gap_that_does_not_shrink(toys, process, mean_parameterization):
    """The continuous ELBO posing as a discrete one is tight at every T: no shrinking gap."""
    model = kit.oracle_model(toys["parity"], process, mean_parameterization)
    result = kit.check_discrete_bound(
        lambda steps: ScaledELBO(scale=jnp.asarray(1.0)), model, toys["parity"],
        key=jax.random.PRNGKey(2), steps=(1, 32), num_examples=SMALL,
    )
    assert not result.passed and "does not shrink" in result.summary, result


def test_invariance_check_rejects_a_time_dependent_model(toys, process, mean_parameterization):
    schedules = {
        name: ddiff.build_component("schedule", {"kind": name}) for name in ("linear", "poly")
    }

    def make_model(schedule):
        warped = eqx.tree_at(lambda p: p.schedule, process, schedule)
        network = TimeWarpedNetwork(kit.oracle_network(toys["dense"], warped, time_conditioned=True))
        return ddiff.DiffusionModel(network=network, parameterization=mean_parameterization, process=warped)

    result = kit.check_schedule_invariance(
        ScaledELBO(scale=jnp.asarray(1.0)), make_model, schedules, toys["markov"],
        key=jax.random.PRNGKey(3), num_examples=SMALL,
    )
    assert not result.passed, result


def test_sampler_check_rejects_one_step_sampling_and_lost_infill(toys, process, mean_parameterization):
    """One ancestral step unmasks every position at once from its marginal: the joint is
    wrong (chi-square p ~ 0). A sampler that overwrites given positions is caught too."""
    model = kit.oracle_model(toys["markov"], process, mean_parameterization)
    one_step = ddiff.build_component("sampler", {"kind": "ancestral", "steps": 1})
    result = kit.check_sampler(one_step, model, toys["markov"], key=jax.random.PRNGKey(4), num_samples=2**11)
    assert not result.passed and result.numbers["p_value"] < 1e-6, result

    class ForgetsGivenTokens(ddiff.AbstractSampler):
        def sample(self, model, *, keys, seq_len, conditioning):
            return one_step.sample(model, keys=keys, seq_len=seq_len, conditioning=ddiff.Conditioning())

    result = kit.check_sampler(
        ForgetsGivenTokens(), model, toys["markov"], key=jax.random.PRNGKey(5),
        conditioning="infill", num_samples=2**10,
    )
    assert not result.passed and "given positions changed" in result.summary, result
