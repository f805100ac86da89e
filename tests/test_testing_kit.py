"""The conformance kit itself: exact quantities against brute force, and the checks'
power (each check fails a deliberately broken component)."""

import itertools
import math
import re

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
    assert model.network.capabilities() == {"time_independent", "class_conditional", "block_causal"}
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


# --------------------------------------------------------------------------- exact references


def _float64(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, tree)


@pytest.mark.parametrize(
    "process_spec, parameterization",
    [({"kind": "masked", "schedule": "cosine"}, "mean"), ({"kind": "uniform", "schedule": "geometric"}, "x0")],
)
def test_exact_bound_terms_agree_with_the_jax_enumeration(toys, process_spec, parameterization):
    """The per-x_0 diffusion terms of exact_bound_terms (numpy; rates from the time
    derivative of the transitions, ratios written again) averaged over the markov toy equal
    exact_diffusion_nelbo (JAX; the process's own rates and log_score_from_mean), for a
    time-dependent table model, to 1e-7 relative (the same quadrature)."""
    toy = toys["markov"]
    process = ddiff.build_component("process", process_spec, vocab_size=V, seq_len=D)
    model = kit.table_model(process, ddiff.build_component("parameterization", parameterization), D, seed=3)
    terms = kit.exact_bound_terms(ddiff.BoundForm(), model, np.asarray(toy.sequences()))
    with jax.enable_x64(True):
        expected = float(kit.exact_diffusion_nelbo(_float64(model), toy))
    assert float(toy.probabilities() @ terms["diffusion"]) == pytest.approx(expected, rel=1e-7)


def _masked_brute_force(model, x0s, steps, vocab, seq_len):
    """L_T of MD4's T-step chain on the masked process, per x_0, by enumerating every path
    x(0), x(1/T), ..., x(1) with MD4's closed forms (Alg. 2 and the decoder 1/V of a mask):
    E_q[log q(path | x_0) - log p(x_1) - sum_i log p(x_(i-1)/T | x_i/T) - log d(x_0 | x(0))]."""
    mask = vocab
    states = list(itertools.product(range(vocab + 1), repeat=seq_len))
    alpha = [float(model.process.schedule.alpha(jnp.asarray(i / steps))) for i in range(steps + 1)]
    means = {
        (z, i): np.exp(np.asarray(model.log_mean(jnp.asarray(z), jnp.asarray(i / steps)), np.float64))
        for z in states for i in range(1, steps + 1)
    }
    prior = np.asarray(model.process.prior_probs(), np.float64)

    def forward(a_from, a_to, x_from, x_to):  # q(x_to | x_from), one position
        if x_from == mask:
            return float(x_to == mask)
        keep = a_to / a_from
        return keep if x_to == x_from else (1 - keep if x_to == mask else 0.0)

    def backward(z_t, z_s, i):  # MD4 Alg. 2 from i/T to (i-1)/T
        a_s, a_t = alpha[i - 1], alpha[i]
        p = 1.0
        for n in range(seq_len):
            if z_t[n] != mask:
                p *= float(z_s[n] == z_t[n])
            elif z_s[n] == mask:
                p *= (1 - a_s) / (1 - a_t)
            else:
                p *= (a_s - a_t) / (1 - a_t) * means[(z_t, i)][n, z_s[n]]
        return p

    out = []
    for x0 in x0s:
        total = 0.0
        for path in itertools.product(states, repeat=steps + 1):
            q = np.prod([alpha[0] if path[0][n] == x0[n] else (1 - alpha[0]) * (path[0][n] == mask) for n in range(seq_len)])
            for i in range(1, steps + 1):
                q *= np.prod([forward(alpha[i - 1], alpha[i], path[i - 1][n], path[i][n]) for n in range(seq_len)])
            if q == 0:
                continue
            p = np.prod([prior[v] for v in path[-1]])
            for i in range(1, steps + 1):
                p *= backward(path[i], path[i - 1], i)
            decoder = np.prod([1.0 / vocab if path[0][n] == mask else 1.0 for n in range(seq_len)])
            total += q * (math.log(q) - math.log(p) - math.log(decoder))
        out.append(total)
    return np.asarray(out)


def test_discrete_bound_matches_a_path_enumeration():
    """L_T (T = 2) of a time-dependent table model on V = 2, D = 2: exact_bound_terms'
    prior + sum of step KLs + decoder equals the path-space KL computed by enumerating all
    729 paths with MD4's closed forms, to 1e-9."""
    vocab, seq_len = 2, 2
    process = ddiff.build_component("process", {"kind": "masked", "schedule": "cosine"}, vocab_size=vocab, seq_len=seq_len)
    model = kit.table_model(process, ddiff.build_component("parameterization", "mean"), seq_len, seed=5)
    x0s = np.asarray(list(itertools.product(range(vocab), repeat=seq_len)))
    terms = kit.exact_bound_terms(ddiff.BoundForm(steps=2), model, x0s)
    np.testing.assert_allclose(terms["nelbo"], _masked_brute_force(model, x0s, 2, vocab, seq_len), rtol=1e-6)


def test_chain_law_matches_a_path_enumeration():
    """The law of MD4's ancestral chain (T = 2, then masked positions from mu(x, 0)) for a
    table model on V = 2, D = 2 with one given position, by enumerating its paths with
    Alg. 2's closed form, equals chain_law's (float32 model outputs: 1e-6)."""
    vocab, seq_len = 2, 2
    process = ddiff.build_component("process", {"kind": "masked", "schedule": "cosine"}, vocab_size=vocab, seq_len=seq_len)
    model = kit.table_model(process, ddiff.build_component("parameterization", "mean"), seq_len, seed=6)
    chain = ddiff.build_component("sampler", {"kind": "ancestral", "steps": 2}, vocab_size=vocab, seq_len=seq_len).reverse_chain()
    combos = kit.Combos(labels=None, fixed_mask=np.asarray([[False, False], [False, True]]), fixed_tokens=np.asarray([[0, 0], [0, 1]]))
    law, noisy = kit.chain_law(chain, process, kit.model_predictions(model), seq_len=seq_len, combos=combos)
    mask = vocab
    times = [1.0, 0.5, 0.0]
    alpha = [float(process.schedule.alpha(jnp.asarray(t))) for t in times]

    def mean(z, t):
        return np.exp(np.asarray(model.log_mean(jnp.asarray(z), jnp.asarray(t)), np.float64))

    for combo in range(2):
        def fix(z, combo=combo):
            return tuple(combos.fixed_tokens[combo][n] if combos.fixed_mask[combo][n] else z[n] for n in range(seq_len))

        dist = {fix((mask,) * seq_len): 1.0}  # the masked chain starts from all-mask
        for i in range(2):
            a_t, a_s = alpha[i], alpha[i + 1]
            new = {}
            for z, p in dist.items():
                mu = mean(z, times[i])
                options = [[(v, (a_s - a_t) / (1 - a_t) * mu[n, v]) for v in range(vocab)] + [(mask, (1 - a_s) / (1 - a_t))]
                           if z[n] == mask else [(z[n], 1.0)] for n in range(seq_len)]
                for choice in itertools.product(*options):
                    target = fix(tuple(v for v, _ in choice))
                    new[target] = new.get(target, 0.0) + p * np.prod([w for _, w in choice])
            dist = new
        final = np.zeros(vocab**seq_len)
        for z, p in dist.items():
            mu = mean(z, 0.0)
            options = [[(v, mu[n, v]) for v in range(vocab)] if z[n] == mask else [(z[n], 1.0)] for n in range(seq_len)]
            for choice in itertools.product(*options):
                target = fix(tuple(v for v, _ in choice))
                final[target[0] * vocab + target[1]] += p * np.prod([w for _, w in choice])
        np.testing.assert_allclose(law[combo], final, atol=1e-6)
    assert noisy.max() < 1e-12


def test_ratios_of_the_exact_mean_are_the_exact_scores_and_tweedie_inverts_them(toys):
    """score_from_mean of the exact denoiser is the exact score p_t(x^(n<-y)) / p_t(x) of
    the enumeration (kit.exact_log_score) wherever the reverse rate R_t(y -> x^n) is not 0
    (a clean token of the absorbing process keeps only its own value, so the ratios to
    other clean values, which no rate uses, are 0), and every built-in process's Tweedie
    denoiser inverts it at t = 0, 0.25, 0.5, 0.75."""
    from ddiff.testing import _predictions, _process_tables

    toy = toys["markov"]
    for spec in (
        {"kind": "masked", "schedule": "cosine"},
        {"kind": "uniform", "schedule": "geometric"},
        {"kind": "masked", "schedule": {"kind": "learnable_poly", "initial_powers": [0.7, 1.5, 3.0]}},
    ):
        process = ddiff.build_component("process", spec, vocab_size=V, seq_len=D)
        assert kit.tweedie_problem(process, toy) is None, spec
        states = kit.noisy_states(process.num_states, D)[::37]
        with jax.enable_x64(True):
            tables = _process_tables._as_process(process, D)
            log_mean = _predictions._exact_log_mean(toy, tables, states, np.asarray([0.4]), [None])[0, 0]
            score = kit.score_from_mean(log_mean, states, tables.marginals(np.asarray([0.4]))[0])
        for x, s in zip(states, score, strict=True):
            expected = np.exp(np.asarray(exact_log_score(toy, process, jnp.asarray(x), jnp.asarray(0.4)), np.float64))
            used = np.asarray(process.incoming_rates(jnp.asarray(x), jnp.asarray(0.4))) > 0
            np.testing.assert_allclose(s[used], expected[used], rtol=2e-4, atol=1e-7)


def test_continuous_chain_has_converged(monkeypatch):
    """The first-hitting (continuous) chain's law with the default Runge-Kutta steps
    agrees with twice as many to 1e-4 per sequence (table model, cosine schedule, V = 3,
    D = 3; the time t(l) has a square-root singularity at t = 0, so the error falls
    slower than RK4's h^4: 1.4e-5 measured)."""
    from ddiff.testing import _chains

    process = ddiff.build_component("process", {"kind": "masked", "schedule": "cosine"}, vocab_size=V, seq_len=3)
    model = kit.table_model(process, ddiff.build_component("parameterization", "mean"), 3, seed=7)
    chain = ddiff.build_component("sampler", "first_hitting", vocab_size=V, seq_len=3).reverse_chain()
    combos = kit.Combos(labels=None, fixed_mask=np.zeros((1, 3), bool), fixed_tokens=np.zeros((1, 3), np.int64))
    coarse, _ = kit.chain_law(chain, process, kit.model_predictions(model), seq_len=3, combos=combos)
    monkeypatch.setattr(_chains, "CONTINUOUS_STEPS", 2 * _chains.CONTINUOUS_STEPS)
    fine, _ = kit.chain_law(chain, process, kit.model_predictions(model), seq_len=3, combos=combos)
    assert np.abs(coarse - fine).max() < 1e-4
    assert coarse.sum() == pytest.approx(1.0, abs=1e-9)


# --------------------------------------------------------------------------- learnable schedules


class MeanWeightGenMD4ELBO(ddiff.AbstractObjective):
    """GenMD4's ELBO with every value's weight -w_v / t replaced by their mean (MD4's
    integrand on GenMD4's masking): right only when all the powers coincide, as they do
    when ``learnable_poly`` is built with its defaults."""

    provides = frozenset({ddiff.capabilities.CONTINUOUS_TIME})
    requires = {
        "parameterization": frozenset({ddiff.capabilities.MEAN}),
        "process": frozenset({ddiff.capabilities.MASKED, ddiff.capabilities.STATE_DEPENDENT}),
    }
    t1: float = eqx.field(static=True, default=1e-3)

    def bound_form(self):
        return ddiff.BoundForm(t_start=self.t1)

    def example_terms(self, model, x0, t, *, key, label=None, train=True):
        from ddiff_plugins import genmd4

        process = model.process
        time = self.t1 + (1.0 - self.t1) * t
        weight = jnp.full((process.vocab_size,), jnp.mean(genmd4.elbo_weight(process.schedule, time)))

        def draw(draw_key):
            x_t = process.sample_marginal(x0, time, key=draw_key)
            log_mean = model.log_mean(x_t, time, label=label)
            return (1.0 - self.t1) * genmd4.genmd4_integrand(log_mean, x0, x_t == process.mask_id, weight)

        diffusion = jnp.mean(jax.vmap(draw)(jax.random.split(key)))
        reconstruction = genmd4.reconstruction(process.schedule, x0, jnp.asarray(self.t1))
        prior = process.prior_kl(x0)
        nelbo = diffusion + reconstruction + prior
        metrics = {"diffusion": diffusion, "reconstruction": reconstruction, "prior": prior}
        return ddiff.ObjectiveTerms(loss=nelbo, nelbo=nelbo, metrics=metrics)


class LearnableRate(ddiff.AbstractSchedule):
    """alpha_t = 1 - rate t with a trainable rate: a schedule only for rates in (0, 1]."""

    provides = frozenset({ddiff.capabilities.SCALAR})
    rate: jax.Array = eqx.field(default_factory=lambda: jnp.ones(()))

    def alpha(self, t):
        return 1.0 - self.rate * t


@pytest.fixture(scope="module")
def schedule_registry():
    copy = ddiff.Registry()
    for entry in ddiff.default_registry():
        copy.register(entry.slot, entry.name, entry.cls)
    copy.register("objective", "genmd4_mean_weight", MeanWeightGenMD4ELBO)
    copy.register("schedule", "learnable_rate", LearnableRate)
    return copy


LEARNABLE_POLY = {"kind": "masked", "schedule": "learnable_poly"}


def test_the_default_setup_draws_distinct_powers_for_a_learnable_schedule(schedule_registry):
    """learnable_poly's powers start equal (1: the linear schedule); the kit moves them by
    seeded noise, the same draw every time, and keeps powers that already differ."""
    default = kit.Setup(process=LEARNABLE_POLY)
    powers = np.asarray(default.process_with().schedule.powers())
    np.testing.assert_array_equal(powers, np.asarray(default.process_with().schedule.powers()))
    assert np.min(np.abs(np.diff(np.sort(powers)))) > 0.05, powers
    other = np.asarray(kit.Setup(process=LEARNABLE_POLY, seed=1).process_with().schedule.powers())
    assert not np.allclose(other, powers)
    built = kit.Setup(process=LEARNABLE_POLY, schedule_spread=0.0).process_with().schedule.powers()
    np.testing.assert_allclose(built, 1.0, rtol=1e-6)
    given = {"kind": "masked", "schedule": {"kind": "learnable_poly", "initial_powers": [0.7, 1.5, 3.0]}}
    kept = kit.Setup(process=given).process_with().schedule.powers()
    np.testing.assert_allclose(kept, [0.7, 1.5, 3.0], rtol=1e-6)
    broken = kit.Setup(
        process={"kind": "masked", "schedule": "learnable_rate"}, schedule_spread=50.0, registry=schedule_registry
    )
    with pytest.raises(ddiff.DdiffError, match="alpha outside"):
        broken.process_with()


def test_an_objective_right_only_for_equal_weights_passed_before_and_is_caught_now(schedule_registry):
    """A GenMD4 objective that uses the mean of the per-value weights passes every check
    with learnable_poly's equal default powers (the kit before it drew them), and fails the
    exact-term check (g) with the drawn ones, which the built-in passes."""
    before = kit.Setup(process=LEARNABLE_POLY, schedule_spread=0.0, registry=schedule_registry)
    for result in kit.run_objective_conformance("genmd4_mean_weight", before):
        assert result.passed, result
    now = kit.Setup(process=LEARNABLE_POLY, registry=schedule_registry)
    result = kit.objective_checks("genmd4_mean_weight", now)["bound_terms[table]"]()
    print(result)
    assert not result.passed and "OFF: " in result.summary, result
    for check in ("bound_terms[table]", "tight[markov]"):
        result = kit.objective_checks("genmd4_elbo", now)[check]()
        assert result.passed, result
    result = kit.sampler_checks("genmd4_ancestral", now, steps=128)["chain[none]"]()
    assert result.passed, result


# --------------------------------------------------------------------------- false alarms


SEEDS = range(1, 13)


def test_false_alarms_of_the_exact_term_check_over_independent_seeds():
    """md4_elbo with 12 independent table models, x_0 sets and draws (2^12 each): every
    term passes, and the 12 x 5 nelbo and diffusion deviations (in standard errors) are
    consistent with N(0, 1) (Kolmogorov-Smirnov p > 1e-3): the standard errors are not
    underestimated, so the stated false-alarm rate (<= 1.3e-3 per check) holds."""
    from scipy import stats

    scores = []
    for seed in SEEDS:
        setup = kit.Setup(seed=seed, num_examples=2**12)
        result = kit.objective_checks("md4_elbo", setup)["bound_terms[table]"]()
        assert result.passed, result
        scores += [v for k, v in result.numbers.items() if k.startswith(("nelbo_z_", "diffusion_z_"))]
    assert stats.kstest(scores[::2], "norm").pvalue > 1e-3, scores


def test_false_alarms_of_the_chain_check_over_independent_seeds():
    """Ancestral sampling with 12 independent table models and draws (2^11 samples each):
    every check passes and the chi-square p-values are consistent with U(0, 1)
    (Kolmogorov-Smirnov p > 1e-3), so the stated false-alarm rate alpha = 1e-3 holds."""
    from scipy import stats

    values = []
    for seed in SEEDS:
        setup = kit.Setup(seed=seed, num_samples=2**11)
        result = kit.sampler_checks("ancestral", setup, steps=128)["chain[none]"]()
        assert result.passed, result
        values.append(result.numbers["p_value"])
    assert stats.kstest(values, "uniform").pvalue > 1e-3, values


def test_failure_messages_name_the_sequence_the_amount_and_the_exact_value(process, mean_parameterization):
    model = kit.table_model(process, mean_parameterization, D, seed=0)
    x0s = np.asarray([[0, 1, 2, 0], [2, 2, 1, 0]])
    exact = kit.exact_bound_terms(ddiff.BoundForm(), model, x0s)
    result = kit.check_bound_terms(
        ScaledELBO(scale=jnp.asarray(1.2)), model, x0s, key=jax.random.PRNGKey(0), num_examples=2**14, exact=exact
    )
    assert not result.passed
    assert re.search(r"x_0 = \(\d, \d, \d, \d\): (nelbo|diffusion) [\d.]+ ± [\d.]+ vs exact [\d.]+ \(off by \+[\d.]+ nats, \+[\d.]+ se\)", result.summary), result
    sampler = ddiff.build_component("sampler", {"kind": "ancestral", "steps": 1}, vocab_size=V, seq_len=D)
    chain = ddiff.build_component("sampler", {"kind": "ancestral", "steps": 4}, vocab_size=V, seq_len=D).reverse_chain()
    result = kit.check_reverse_chain(
        sampler, model, kit.markov_toy(V, D), key=jax.random.PRNGKey(1), num_samples=2**11, chain=chain
    )
    assert not result.passed and "expected (exact probability" in result.summary, result
