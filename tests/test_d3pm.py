"""D3PM (Austin et al. 2021) against independent computations: the beta schedules, the
closed forms of the three families against enumeration, the discretized Gaussian and
the logistic against D3PM's formulas in float64, the bound against MD4's discrete-time
terms (per sample) and its continuous-time ELBO (exactly, as T grows), the Gaussian
family's exact bound, terms without padded logarithms, the step-count checks, and
several hundred training steps without a NaN. Each test compiles as few programs as it
can: the suite's time goes to XLA compilations."""

import itertools
import json
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ddiff_plugins import d3pm

import ddiff
import ddiff.runner
import ddiff.testing as kit

V, D = 3, 4


def build(slot, spec, vocab_size=V):
    return ddiff.build_component(slot, spec, vocab_size=vocab_size, seq_len=D)


# --------------------------------------------------------------------------- schedules


def _grid_values(function, steps):
    return np.asarray(
        jax.vmap(function)(jnp.arange(steps + 1, dtype=jnp.float32) / steps), np.float64
    )


def test_jsd_and_cosine_schedules_give_d3pm_betas():
    """jsd: beta_i = 1/(T - i + 1) (abs 1e-6, T = 10). Cosine: alpha(i/T) equals the
    product of D3PM's betas 1 - f(i/T)/f((i-1)/T), f = cos(pi/2 (t + 0.008)/1.008), computed
    in float64 (rel 1e-5, abs 1e-6, T = 1000), alpha(1) = 0; its derivative matches
    autodiff (rel 1e-5)."""
    alpha = _grid_values(build("schedule", "jsd").alpha, 10)
    np.testing.assert_allclose(
        1 - alpha[1:] / alpha[:-1], 1 / (10 - np.arange(1, 11) + 1), atol=1e-6
    )
    cosine = build("schedule", "d3pm_cosine")
    steps = np.arange(1001) / 1000
    f = np.cos((steps + 0.008) / 1.008 * np.pi / 2)
    betas = 1 - f[1:] / f[:-1]
    expected = np.concatenate([[1.0], np.cumprod(1 - betas[:-1]), [0.0]])
    np.testing.assert_allclose(_grid_values(cosine.alpha, 1000), expected, rtol=1e-5, atol=1e-6)
    inner = jnp.linspace(0.01, 0.99, 50)
    np.testing.assert_allclose(
        jax.vmap(cosine.alpha_derivative)(inner), jax.vmap(jax.grad(cosine.alpha))(inner), rtol=1e-5
    )


def test_linear_schedule_is_exact_on_its_grid_and_log_linear_between():
    """alpha(i/T) = prod (1 - beta_j), beta linear from 1e-4 to 0.02 over T = 1000 (float64
    reference, rel 1e-5); the betas recovered from total_noise (rel 1e-3, float32 noise
    differences); between grid points log alpha is the linear interpolation (abs 1e-5)
    and the derivative its slope (rel 1e-4)."""
    schedule = build("schedule", "d3pm_linear")
    betas = np.linspace(1e-4, 0.02, 1000)
    log_grid = np.concatenate([[0.0], np.cumsum(np.log1p(-betas))])
    np.testing.assert_allclose(_grid_values(schedule.alpha, 1000), np.exp(log_grid), rtol=1e-5)
    noise = _grid_values(schedule.total_noise, 1000)
    np.testing.assert_allclose(-np.expm1(-np.diff(noise)), betas, rtol=1e-3)
    t = jnp.asarray([0.1234, 0.5006, 0.9999])
    position = np.asarray(t, np.float64) * 1000
    left = np.floor(position).astype(int)
    expected = log_grid[left] + (position - left) * (log_grid[left + 1] - log_grid[left])
    np.testing.assert_allclose(np.log(np.asarray(jax.vmap(schedule.alpha)(t))), expected, atol=1e-5)
    slope = (log_grid[left + 1] - log_grid[left]) * 1000 * np.exp(expected)
    np.testing.assert_allclose(jax.vmap(schedule.alpha_derivative)(t), slope, rtol=1e-4)


def _information_fraction(keep, probs):
    """I(x_t; x_0) / H(x_0) for uniform transitions, from the joint table in float64."""
    size = len(probs)
    joint = probs[:, None] * (keep * np.eye(size) + (1 - keep) / size)
    outer = probs[:, None] * joint.sum(0)[None, :]
    positive = joint > 0
    information = np.sum(joint[positive] * np.log(joint[positive] / outer[positive]))
    return information / -np.sum(probs[probs > 0] * np.log(probs[probs > 0]))


@pytest.mark.parametrize("marginal", [None, (0.5, 0.3, 0.15, 0.05, 0.0)])
def test_mutual_information_schedule_loses_information_linearly(marginal):
    """D3PM App. A.7: I(x_t; x_0) / H(x_0) = 1 - t, checked against the mutual information
    of the joint table in float64 (abs 1e-4) at 7 times, V = 5, for the uniform marginal
    and a unigram with a zero; its derivative (implicit differentiation) against a
    central difference (rel 2e-2, h = 1e-3). For absorbing transitions alpha = 1 - t."""
    spec = {"kind": "mutual_information"}
    if marginal is not None:
        spec["marginal"] = list(marginal)
    schedule = build("schedule", spec, vocab_size=5)
    probs = np.full(5, 0.2) if marginal is None else np.asarray(marginal)
    times = np.array([0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 0.399, 0.401, 0.4])
    keep, slope = jax.jit(jax.vmap(jax.value_and_grad(schedule.alpha)))(
        jnp.asarray(times, jnp.float32)
    )
    for t, a in zip(times[:7], np.asarray(keep, np.float64)[:7], strict=True):
        assert _information_fraction(a, probs) == pytest.approx(1 - t, abs=1e-4)
    assert float(slope[9]) == pytest.approx((float(keep[8]) - float(keep[7])) / 2e-3, rel=2e-2)
    absorbing = build("schedule", {**spec, "transitions": "absorbing"}, vocab_size=5)
    np.testing.assert_allclose(
        jax.vmap(absorbing.alpha)(jnp.linspace(0, 1, 11)), 1 - np.linspace(0, 1, 11), atol=1e-7
    )


# --------------------------------------------------------------------------- families


def _gaussian(steps=8, vocab_size=V, start=0.05, stop=0.9):
    schedule = {"kind": "d3pm_linear", "steps": steps, "start": start, "stop": stop}
    return build(
        "process", {"kind": "discretized_gaussian", "schedule": schedule}, vocab_size=vocab_size
    )


def _d3pm_gaussian_matrix(beta, size):
    """D3PM eq. 8 written out entry by entry."""
    normaliser = sum(
        math.exp(-4 * n * n / ((size - 1) ** 2 * beta)) for n in range(-(size - 1), size)
    )
    matrix = np.zeros((size, size))
    for i in range(size):
        for j in range(size):
            if i != j:
                matrix[i, j] = math.exp(-4 * (i - j) ** 2 / ((size - 1) ** 2 * beta)) / normaliser
        matrix[i, i] = 1 - matrix[i].sum()
    return matrix


def test_gaussian_process_tables_follow_d3pm():
    """One-step matrices equal D3PM eq. 8 (abs 1e-6; V = 5, T = 8), are symmetric and
    doubly stochastic; marginals are their products, and multi-step transitions,
    likelihoods and propagation agree with dense products (abs 1e-5)."""
    process = _gaussian(vocab_size=5)
    one_step = np.exp(np.asarray(process.log_steps.value, np.float64))
    for index, beta in enumerate(np.linspace(0.05, 0.9, 8)):
        np.testing.assert_allclose(one_step[index], _d3pm_gaussian_matrix(beta, 5), atol=1e-6)
    np.testing.assert_allclose(one_step, np.swapaxes(one_step, 1, 2), atol=1e-7)
    np.testing.assert_allclose(one_step.sum(1), 1.0, atol=1e-6)
    cumulative = [np.eye(5)]
    for matrix in one_step:
        cumulative.append(cumulative[-1] @ matrix)
    x = jnp.array([0, 4, 2, 3])
    s, t = jnp.asarray(2 / 8), jnp.asarray(6 / 8)

    @jax.jit
    def computed(x):
        marginals = jax.vmap(lambda t: process.marginal_probs(x, t))(jnp.arange(9) / 8)
        return (
            marginals,
            process.transition_probs(x, s, t),
            process.transition_likelihood(x, s, t),
            process.propagate(process.marginal_probs(x, s), s, t),
        )

    marginals, forward, likelihood, propagated = computed(x)
    rows = np.asarray(x)
    np.testing.assert_allclose(marginals, np.stack([c[rows] for c in cumulative]), atol=1e-5)
    between = one_step[2] @ one_step[3] @ one_step[4] @ one_step[5]
    np.testing.assert_allclose(forward, between[rows], atol=1e-5)
    np.testing.assert_allclose(likelihood, between[:, rows].T, atol=1e-5)
    np.testing.assert_allclose(propagated, cumulative[6][rows], atol=1e-5)


def _true_posterior(process, x_t, x0, s, t):
    """q(x_s | x_t, x_0), proportional to q(x_t | x_s) q(x_s | x_0) (D3PM eq. 3), from the
    probability-space protocol methods."""
    joint = process.transition_likelihood(x_t, s, t) * process.marginal_probs(x0, s)
    return joint / jnp.sum(joint, axis=-1, keepdims=True)


@pytest.mark.parametrize("family", ["masked", "masked_per_value", "uniform", "gaussian"])
def test_closed_forms_match_enumeration(family):
    """log_marginal_from_mean (for unnormalised weights with zeros) and
    log_marginal_likelihood of each family against the core's enumeration over values
    (abs 1e-5) at t = 0.25, 0.625, 1, and the reverse step with a one-hot mu against the
    true posterior q(x_s | x_t, x_0) (abs 1e-5). ``masked_per_value`` is GenMD4's
    state-dependent masking (powers 0.5, 1, 3)."""
    if family == "gaussian":
        process = _gaussian()
    elif family == "masked_per_value":
        schedule = {"kind": "learnable_poly", "initial_powers": [0.5, 1.0, 3.0]}
        process = build("process", {"kind": "masked", "schedule": schedule})
    else:
        process = build("process", {"kind": family, "schedule": "jsd"})
    weights = jnp.log(
        jnp.array([[0.2, 0.0, 0.5], [1.0, 2.0, 3.0], [0.0, 0.0, 1.0], [0.1, 0.1, 0.1]])
    )
    last = process.num_states - 1
    x_t = jnp.array([0, last, 1, 2])
    x0 = jnp.array([0, 1, 1, 2])
    moved = jnp.array([0, 1, last, last])

    @jax.jit
    def compared(t):
        generic = ddiff.AbstractForwardProcess
        return (
            process.log_marginal_from_mean(weights, t)
            - generic.log_marginal_from_mean(process, weights, t),
            process.log_marginal_likelihood(x_t, t)
            - generic.log_marginal_likelihood(process, x_t, t),
        )

    for mixed, likelihood in zip(*jax.vmap(compared)(jnp.array([0.25, 0.625, 1.0])), strict=True):
        np.testing.assert_allclose(jnp.where(jnp.isnan(mixed), 0.0, mixed), 0.0, atol=1e-5)
        np.testing.assert_allclose(
            jnp.where(jnp.isnan(likelihood), 0.0, likelihood), 0.0, atol=1e-5
        )
    one_hot = jnp.where(jax.nn.one_hot(x0, V, dtype=bool), 0.0, -jnp.inf)
    s, t = jnp.asarray(0.25), jnp.asarray(0.625)
    np.testing.assert_allclose(
        jnp.exp(process.log_posterior_from_mean(moved, one_hot, s, t)),
        _true_posterior(process, moved, x0, s, t),
        atol=1e-5,
    )


def test_gaussian_reverse_step_is_exact():
    """The Gaussian process's reverse step (one scaled matrix product in float32) against
    sum_v mu[v] q(x_s | x_t, v) in float64 from D3PM's matrices (abs 1e-5 in probability;
    V = 16, T = 8, every step, random mu with logits of scale 3), including positions
    where mu puts mass on values that x_t all but rules out; a mu sure of such values
    (log mu = -200 near x_t) still gives finite, normalised probabilities."""
    process = _gaussian(steps=8, vocab_size=16, start=1e-3, stop=0.3)
    x_t = jnp.array([0, 15, 7, 3])
    log_mean = jax.nn.log_softmax(3.0 * jax.random.normal(jax.random.PRNGKey(0), (D, 16)))
    extreme = jnp.where(jnp.abs(jnp.arange(16)[None, :] - x_t[:, None]) > 10, 0.0, -200.0)

    @jax.jit
    @jax.vmap
    def computed(i):
        s, t = (i - 1) / 8, i / 8
        return process.log_posterior_from_mean(
            x_t, log_mean, s, t
        ), process.log_posterior_from_mean(x_t, extreme, s, t)

    ours, wild = computed(jnp.arange(2, 9, dtype=jnp.float32))
    noise = _grid_values(process.schedule.total_noise, 8)
    one_step = [d3pm.gaussian_transition_matrix(beta, 16) for beta in -np.expm1(-np.diff(noise))]
    cumulative = [np.eye(16)]
    for matrix in one_step:
        cumulative.append(cumulative[-1] @ matrix)
    mean = np.exp(np.asarray(log_mean, np.float64))
    for i in range(2, 9):
        for n, u in enumerate(np.asarray(x_t)):
            posteriors = one_step[i - 1][:, u][None, :] * cumulative[i - 1]  # (v, j)
            expected = mean[n] @ (posteriors / posteriors.sum(1, keepdims=True))
            np.testing.assert_allclose(
                np.exp(ours[i - 2, n]), expected, atol=1e-5, err_msg=f"step {i}, position {n}"
            )
    assert bool(jnp.all(jnp.isfinite(jnp.max(wild, -1))))
    np.testing.assert_allclose(jnp.sum(jnp.exp(wild), -1), 1.0, atol=1e-5)


def test_logistic_parameterization_is_d3pm_truncated_logistic():
    """Against the CDF differences of the truncated discretized logistic in float64
    (abs 1e-5 in log-probability, V = 8), and finite, normalised log-probabilities with
    a finite gradient for extreme scales (log s = -12 and 40) and locations."""
    parameterization = build("parameterization", "discretized_logistic")
    process = build("process", {"kind": "uniform", "schedule": "jsd"}, vocab_size=8)
    x_t = jnp.array([0, 7, 3, 5])
    moderate = jnp.array([[0.3, -0.4], [-1.0, 2.0], [1.5, 0.1], [0.0, -3.0]])
    extreme = jnp.array([[-12.0, 5.0], [40.0, 0.0], [-12.0, -5.0], [0.0, 30.0]])

    def log_probs(output):
        return parameterization.log_mean(output, x_t, jnp.asarray(0.5), process)

    @jax.jit
    def computed(moderate, extreme):
        gradient = jax.grad(lambda out: jnp.sum(log_probs(out)[:, 0]))(extreme)
        return log_probs(moderate), log_probs(extreme), gradient

    ours, wild, gradient = computed(moderate, extreme)
    centres = np.linspace(-1, 1, 8)
    for n in range(4):
        location = np.tanh(2 * float(x_t[n]) / 7 - 1 + float(moderate[n, 1]))
        inverse = np.exp(2 - float(moderate[n, 0]))
        cdf = 1 / (1 + np.exp(-inverse * (centres[:, None] - location + np.array([-1, 1]) / 7)))
        mass = cdf[:, 1] - cdf[:, 0]
        np.testing.assert_allclose(ours[n], np.log(mass / mass.sum()), atol=1e-5)
    assert bool(jnp.all(jnp.isfinite(wild))) and bool(jnp.all(jnp.isfinite(gradient)))
    np.testing.assert_allclose(jnp.sum(jnp.exp(wild), -1), 1.0, atol=1e-5)


# --------------------------------------------------------------------------- the bound


def test_absorbing_terms_equal_md4_discrete_terms():
    """For the absorbing process (alpha_t = 1 - t, so alpha(0) = 1) each sampled term of
    L_vb equals MD4's discrete-time term for the same key, hence the same x_t, per example
    (rel 1e-5, abs 1e-5; 256 examples, T = 16, a time-independent model: the exact
    denoiser of another toy, read through MD4's mean)."""
    process = build("process", {"kind": "masked", "schedule": "jsd"})
    model = kit.oracle_model(
        kit.toy_distributions(V, D)["dense"], process, build("parameterization", "mean")
    )
    x0 = jax.random.randint(jax.random.PRNGKey(0), (256, D), 0, V)
    ours = build("objective", {"kind": "d3pm_vb", "steps": 16})
    md4 = build("objective", {"kind": "md4_discrete_elbo", "steps": 16})

    @eqx.filter_jit
    def both(model, x0, key):
        first = ours.per_example_terms(model, x0, key=key, train=False)
        second = md4.per_example_terms(model, x0, key=key, train=False)
        return first.nelbo, second.nelbo, first.metrics["reconstruction"]

    nelbo, reference, first_step = both(model, x0, jax.random.PRNGKey(1))
    assert int(jnp.sum(first_step > 0)) > 0  # first-step terms were among the draws
    np.testing.assert_allclose(nelbo, reference, rtol=1e-5, atol=1e-5)


def _exact_expectation(process, model, toy, states, s, t, objective):
    """E_{x_0 ~ p} E_{x_t ~ q(x_t | x_0)} step_term(x_0, x_t, mu(x_t, t), s, t) for every
    pair (s[k], t[k]), by enumerating clean sequences and the noisy ``states``."""
    sequences = jnp.asarray(list(itertools.product(range(V), repeat=D)))
    probs = toy.probabilities()

    def one(s, t):
        log_mean = jax.vmap(lambda x: model.log_mean(x, t))(states)

        def given(x0):
            q = process.marginal_probs(x0, t)
            weight = jnp.prod(q[jnp.arange(D)[None, :], states], axis=-1)
            terms = jax.vmap(lambda x, lm: objective.step_term(process, x0, x, lm, s, t))(
                states, log_mean
            )
            return jnp.sum(jnp.where(weight > 0, weight * terms, 0.0))

        return jnp.sum(jnp.where(probs > 0, probs * jax.vmap(given)(sequences), 0.0))

    return np.asarray(jax.jit(jax.vmap(one))(s, t), np.float64)


def _pairs(step_counts):
    """(s, t, T) of every step of every T."""
    s, t, owner = [], [], []
    for steps in step_counts:
        for i in range(1, steps + 1):
            s.append((i - 1) / steps)
            t.append(i / steps)
            owner.append(steps)
    return jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), np.asarray(owner)


def test_bound_approaches_md4_continuous_elbo_as_steps_grow():
    """Exact expectations by enumeration (81 sequences x 16 mask patterns, V = 3, D = 4)
    for the absorbing process with alpha_t = 1 - t and a fixed time-independent model
    (the exact denoiser of a different toy, so the bound is not H(p)): MD4's continuous
    ELBO is L_inf = E sum_M CE(x_0, M) B(|M|, D - |M| + 1); D3PM's L_T sums the
    objective's own step terms weighted by q(M | i/T). Its error is first order,
    |L_T - L_inf| <= 1.2 / T nats for T = 4, 16, 64, 256 (measured 0.88/T .. 0.975/T),
    decreasing, with |L_256 - L_inf| < 0.005. MD4's own continuous objective agrees with
    L_inf within 4 standard errors over 2^13 examples."""
    toys = kit.toy_distributions(V, D, seed=0)
    data = toys["markov"]
    process = build("process", {"kind": "masked", "schedule": "jsd"})
    model = kit.oracle_model(toys["dense"], process, build("parameterization", "mean"))
    objective = build("objective", "d3pm_vb")
    sequences = jnp.asarray(list(itertools.product(range(V), repeat=D)))
    masks = jnp.asarray(list(itertools.product([False, True], repeat=D)))
    x0 = jnp.broadcast_to(sequences[:, None], (len(sequences), len(masks), D))
    x_t = jnp.where(masks[None], V, x0)
    s, t, owner = _pairs((4, 16, 64, 256))

    @jax.jit
    def computed(s, t):
        log_mean = jax.vmap(jax.vmap(lambda x: model.log_mean(x, jnp.asarray(0.5))))(x_t)
        picked = jnp.take_along_axis(log_mean, x0[..., None], -1)[..., 0]
        cross_entropy = -jnp.sum(jnp.where(masks[None], picked, 0.0), -1)

        def at(s, t):
            return jax.vmap(jax.vmap(lambda a, b, c: objective.step_term(process, a, b, c, s, t)))(
                x0, x_t, log_mean
            )

        return cross_entropy, jax.lax.map(lambda st: at(*st), (s, t))

    cross_entropy, values = computed(s, t)
    probs = np.asarray(data.probabilities(), np.float64)
    count = np.asarray(masks.sum(-1))
    beta = np.array(
        [math.gamma(k) * math.gamma(D - k + 1) / math.gamma(D + 1) if k else 0.0 for k in count]
    )
    exact = float(np.sum(probs[:, None] * np.asarray(cross_entropy, np.float64) * beta[None]))
    grid = np.asarray(t, np.float64)[:, None]
    weights = grid ** count[None] * (1 - grid) ** (D - count[None])
    per_step = np.sum(
        probs[None, :, None] * weights[:, None, :] * np.asarray(values, np.float64), axis=(1, 2)
    )
    errors = []
    for steps in (4, 16, 64, 256):
        bound = float(per_step[owner == steps].sum())
        errors.append(abs(bound - exact))
        assert errors[-1] <= 1.2 / steps, (steps, bound, exact)
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)) and errors[-1] < 0.005

    samples, _ = data.sample(jax.random.PRNGKey(0), 2**13)
    terms = eqx.filter_jit(
        lambda m, x: build("objective", "md4_elbo").per_example_terms(
            m, x, key=jax.random.PRNGKey(1), train=False
        )
    )(model, samples)
    values = np.asarray(terms.nelbo, np.float64)
    error = values.std(ddof=1) / math.sqrt(len(values))
    assert abs(values.mean() - exact) < 4 * error, (values.mean(), exact, error)


def test_gaussian_bound_is_exact_for_independent_data_and_shrinks_otherwise():
    """Exact expectations by enumeration (81 x 81 sequences) for the discretized Gaussian
    process tabulated for 8 steps, with the exact denoiser, at T = 1, 2, 4, 8: on the
    independent toy every factorized reverse step is exact, so L_T = H(p) + KL(q_1 || p_1)
    for every T (abs 1e-4); on the parity toy L_T - H(p) - KL(q_1 || p_1) is >= 0 and
    falls strictly as T grows."""
    process = _gaussian(steps=8)
    parameterization = build("parameterization", "x0")
    objective = build("objective", "d3pm_vb")
    states = jnp.asarray(list(itertools.product(range(V), repeat=D)))
    s, t, owner = _pairs((1, 2, 4, 8))
    toys = kit.toy_distributions(V, D, seed=0)
    for name in ("independent", "parity"):
        toy = toys[name]
        model = kit.oracle_model(toy, process, parameterization)
        per_step = _exact_expectation(process, model, toy, states, s, t, objective)
        prior_term = float(
            jnp.sum(
                jnp.where(
                    toy.probabilities() > 0,
                    toy.probabilities() * jax.vmap(process.prior_kl)(states),
                    0.0,
                )
            )
        )
        prior = kit.prior_gap(toy, process)
        bounds = [per_step[owner == steps].sum() + prior_term for steps in (1, 2, 4, 8)]
        gaps = [bound - toy.conditional_entropy() for bound in bounds]
        if name == "independent":
            np.testing.assert_allclose(gaps, prior, atol=1e-4)
        else:
            assert gaps[-1] - prior >= -1e-5 and all(
                a > b + 1e-3 for a, b in zip(gaps, gaps[1:], strict=False)
            ), gaps


def test_terms_need_no_padded_logarithm():
    """A model that gives the true token log-probability -300 at a masked position: the
    KL term is (alpha_s - alpha_t)/(1 - alpha_t) (300 + log 2 + 2 log 3) exactly (rel 1e-5)
    where a log(p + 1e-6) implementation caps the first part near 13.8; the first step
    (alpha_s = 1) and the last (alpha_t = 0) give finite terms and gradients."""
    process = build("process", {"kind": "masked", "schedule": "jsd"})
    objective = build("objective", {"kind": "d3pm_vb", "steps": 10})
    x0 = jnp.array([0, 1, 2, 0])
    x_t = jnp.array([3, 1, 3, 3])
    logits = jnp.zeros((D, V)).at[0, 0].set(-300.0)

    @jax.jit
    @jax.vmap
    def term_and_gradient(s, t):
        def term(logits):
            return objective.step_term(process, x0, x_t, jax.nn.log_softmax(logits), s, t)

        return jax.value_and_grad(term)(logits)

    values, gradients = term_and_gradient(jnp.array([0.4, 0.0, 0.9]), jnp.array([0.5, 0.1, 1.0]))
    # alpha_s = 0.6, alpha_t = 0.5; -log mu[x_0] is 300 + log 2 at position 0 and log 3 at
    # the two other masked positions.
    assert float(values[0]) == pytest.approx(
        0.2 * (300.0 + math.log(2.0) + 2 * math.log(3.0)), rel=1e-5
    )
    assert bool(jnp.all(jnp.isfinite(values))) and bool(jnp.all(jnp.isfinite(gradients)))


# --------------------------------------------------------------------------- load-time checks

SMALL = (
    "data.num_symbols=5", "data.length=8", "network.dim=16", "network.depth=1", "network.heads=2",
    "parameterization.kind=x0", "mesh.data=1",
)  # fmt: skip


def _load(*overrides):
    return ddiff.runner.load_recipe("recipes/quickstart.yaml", (*SMALL, *overrides))


def test_step_counts_must_agree_at_load_time():
    """A process or schedule tabulated for T steps refuses an objective or sampler whose
    steps do not divide T, in one line naming both; divisors are accepted. The mutual-
    information schedule refuses a process other than the one its transitions name."""
    linear = "process.schedule={kind: d3pm_linear, steps: 1000}"
    _load(
        linear,
        "objective={kind: d3pm_vb, steps: 250}",
        "sampler={kind: d3pm_ancestral, steps: 1000}",
    )
    with pytest.raises(
        ddiff.IncompatibleComponentsError,
        match=r"grid of 1000 steps.*steps=300, which does not divide",
    ):
        _load(
            linear,
            "objective={kind: d3pm_vb, steps: 300}",
            "sampler={kind: d3pm_ancestral, steps: 1000}",
        )
    gaussian = "process={kind: discretized_gaussian, steps: 8, schedule: {kind: d3pm_cosine}}"
    with pytest.raises(
        ddiff.IncompatibleComponentsError, match=r"sampler 'd3pm_ancestral' takes steps=3"
    ):
        _load(
            gaussian,
            "objective={kind: d3pm_vb, steps: 8}",
            "sampler={kind: d3pm_ancestral, steps: 3}",
        )
    with pytest.raises(
        ddiff.RecipeError, match=r"process.steps: steps=16 does not divide the schedule's 8 steps"
    ):
        _load(
            "process={kind: discretized_gaussian, steps: 16, schedule: {kind: d3pm_linear, steps: 8}}"
        )
    with pytest.raises(ddiff.RecipeError, match=r"process.steps: give the number of steps"):
        _load("process={kind: discretized_gaussian, schedule: {kind: jsd}}")
    with pytest.raises(
        ddiff.IncompatibleComponentsError,
        match=r"transitions: uniform do not match process 'masked'",
    ):
        _load("process.schedule={kind: mutual_information}")


# --------------------------------------------------------------------------- training and sampling


def test_hundreds_of_absorbing_steps_stay_finite(tmp_path):
    """300 training steps of the absorbing family with the hybrid loss (T = 1000, lambda
    0.01, alpha_t = 1 - t so that alpha(0) = 1 and alpha(1) = 0 exactly, x0 predictions
    at every position, learning rate 1e-2) on the tiny Markov fixture: the trainer
    halts on any non-finite loss or gradient, so finishing with no skipped step and
    finite logged terms is the check; the bound falls below its first logged value. The
    logged means obey loss = nelbo + lambda T CE and nelbo = diffusion + reconstruction +
    prior (rel 1e-5)."""
    recipe = _load(
        "process.schedule={kind: jsd}",
        "objective={kind: d3pm_vb, steps: 1000, hybrid_weight: 0.01}",
        "sampler={kind: d3pm_ancestral, steps: 4}",
        "data.num_train=256", "data.num_eval=32", "network.mlp_ratio=2",
        "trainer.steps=300", "trainer.batch_size=8", "trainer.log_every=50", "trainer.eval_every=0",
        "trainer.checkpoint_every=300", "trainer.num_samples=0", "trainer.final_eval=false",
        "optimizer.warmup_steps=0", "optimizer.learning_rate=1e-2",
    )  # fmt: skip
    state = ddiff.runner.Trainer(recipe, tmp_path, show_progress=False).run()
    assert int(state.step) == 300 and int(state.skipped_steps) == 0
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if line["split"] == "train"]
    assert len(train) == 6
    for line in train:
        assert all(np.isfinite(value) for value in line.values() if isinstance(value, float)), line
        expected = line["nelbo"] + 0.01 * 1000 * line["terms/cross_entropy"]
        assert line["loss"] == pytest.approx(expected, rel=1e-5)
        parts = line["terms/diffusion"] + line["terms/reconstruction"] + line["terms/prior"]
        assert parts == pytest.approx(line["nelbo"], rel=1e-5)
    assert min(line["nelbo"] for line in train[1:]) < train[0]["nelbo"]


def test_sampler_keeps_given_positions_and_counts_evaluations():
    """Given positions are never changed and the count of network evaluations is the
    number of steps, doubled under guidance (16 samples, 5 steps, uniform process)."""
    process = build("process", {"kind": "uniform", "schedule": "d3pm_cosine"})
    model = kit.oracle_model(
        kit.class_conditional_toy(V, D), process, build("parameterization", "x0")
    )
    fixed = jnp.tile(jnp.array([[2, 0, 1, 1]]), (16, 1))
    mask = jnp.tile(jnp.array([[True, False, True, False]]), (16, 1))
    conditioning = ddiff.Conditioning(
        labels=jnp.zeros(16, jnp.int32), fixed_tokens=fixed, fixed_mask=mask, guidance=1.5
    )
    sampler = build("sampler", {"kind": "d3pm_ancestral", "steps": 5})
    output = eqx.filter_jit(
        lambda model, key: sampler.sample(
            model, keys=ddiff.sample_keys(key, 0, 16), seq_len=D, conditioning=conditioning
        )
    )(model, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(
        np.asarray(output.tokens)[np.asarray(mask)], np.asarray(fixed)[np.asarray(mask)]
    )
    assert int(output.num_function_evals) == 10
