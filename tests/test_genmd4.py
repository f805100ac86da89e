"""GenMD4: the learnable per-value schedule, the ELBO against exact answers, the
leave-one-out REINFORCE gradient against the exact gradient, the reduction to MD4 when
every power is equal, the sampler's reverse step, and the optimizer's schedule group.
(The conformance kit's checks (a), (c), (d) run in test_conformance.py.)"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ddiff_plugins import genmd4

import ddiff
import ddiff.runner
import ddiff.testing as kit
from ddiff.runner.trainer.optimizer import make_optimizer, parameter_groups

V = 3
POWERS = [0.7, 1.5, 3.0]


def build(slot, spec, seq_len=3):
    return ddiff.build_component(slot, spec, vocab_size=V, seq_len=seq_len)


def schedule_spec(powers=POWERS, **extra):
    return {"kind": "learnable_poly", "initial_powers": powers, **extra}


def masked(schedule, seq_len=3):
    return build("process", {"kind": "masked", "schedule": schedule}, seq_len)


def the_schedule(model):
    return model.process.schedule


def transformer_model(process, seq_len):
    """The kit's untrained 1-block width-16 transformer on ``process``."""
    network = build("network", kit.DEFAULT_NETWORK).build(
        num_states=V + 1, num_outputs=V, seq_len=seq_len, num_classes=0, key=jax.random.PRNGKey(0)
    )
    return ddiff.DiffusionModel(network=network, parameterization=build("parameterization", "mean"), process=process)


def float64(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, tree)


class PathwiseOnly(ddiff.AbstractObjective):
    """GenMD4 without its REINFORCE term: differentiates the estimate of the bound only
    through the weights, ignoring that the schedule also shapes the draws of x_t (biased)."""

    objective: ddiff.AbstractObjective

    def example_terms(self, model, x0, t, *, key, label=None, train=True):
        terms = self.objective.example_terms(model, x0, t, key=key, label=label, train=train)
        return ddiff.ObjectiveTerms(loss=terms.nelbo, nelbo=terms.nelbo, metrics=terms.metrics)


# --------------------------------------------------------------------------- the schedule


def test_schedule_closed_forms():
    """alpha_t[v] = 1 - (1 - eps) t^w_v with w = softplus(phi) at its initial powers;
    alpha' against forward-mode autodiff (float32, rtol 1e-5); the ELBO weight -w/t and
    log(1 - alpha) against float64 evaluations of their definitions for t >= 1e-3 (rtol
    1e-5), and log(1 - alpha) = log(1 - eps) + w log t still accurate at t = 1e-4, where
    float32's log1p(-alpha) has lost it (alpha rounds to 1)."""
    schedule = build("schedule", schedule_spec())
    np.testing.assert_allclose(schedule.powers(), POWERS, rtol=1e-6)
    times = jnp.asarray([0.0, 1e-4, 1e-3, 0.1, 0.5, 0.9, 1.0])

    def evaluate(schedule, t):
        return {
            "alpha": schedule.alpha(t),
            "derivative": schedule.alpha_derivative(t),
            "autodiff": jax.jvp(schedule.alpha, (t,), (jnp.ones_like(t),))[1],
            "weight": genmd4.elbo_weight(schedule, t),
            "log_mask": schedule.log_mask_probability(t),
            "log1p": jnp.log1p(-schedule.alpha(t)),
        }

    ours = eqx.filter_jit(jax.vmap(evaluate, in_axes=(None, 0)))(schedule, times)
    with jax.enable_x64(True):
        precise = eqx.filter_jit(jax.vmap(evaluate, in_axes=(None, 0)))(float64(schedule), times.astype(jnp.float64))
        precise = {k: np.asarray(v) for k, v in precise.items()}
    t = np.asarray(times, np.float64)[:, None]
    np.testing.assert_allclose(ours["alpha"], 1.0 - (1.0 - genmd4.EPS) * t ** np.asarray(POWERS), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(ours["alpha"][0], np.ones(V))
    np.testing.assert_allclose(ours["derivative"][3:], ours["autodiff"][3:], rtol=1e-5)
    regular = slice(2, None)  # t >= 1e-3, where float64's 1 - alpha keeps 1e-7 of precision
    np.testing.assert_allclose(
        ours["weight"][regular], precise["autodiff"][regular] / (1.0 - precise["alpha"][regular]), rtol=1e-5
    )
    np.testing.assert_allclose(ours["log_mask"][regular], precise["log1p"][regular], rtol=1e-5)
    np.testing.assert_allclose(
        ours["log_mask"][1], math.log1p(-genmd4.EPS) + np.asarray(POWERS) * math.log(1e-4), rtol=1e-6
    )
    assert not np.isfinite(ours["log1p"][1, 2]) and ours["log_mask"][0, 0] == -np.inf


def test_schedule_from_recipe_and_bad_arguments():
    schedule = build("schedule", {"kind": "learnable_poly"})
    np.testing.assert_allclose(schedule.powers(), np.ones(V), rtol=1e-6)
    assert schedule.capabilities() == {ddiff.capabilities.PER_VALUE}
    assert ddiff.capabilities.STATE_DEPENDENT in masked(schedule_spec()).capabilities()
    for spec, message in (
        (schedule_spec([1.0, 2.0]), "one power per token value: 3 numbers, got 2"),
        (schedule_spec([1.0, 0.0, 2.0]), "powers must be positive"),
        ({"kind": "learnable_poly", "initial_power": -1.0}, "powers must be positive"),
        (schedule_spec(eps=1.0), r"eps must be in \[0, 1\)"),
    ):
        with pytest.raises(ddiff.RecipeError, match=message):
            build("schedule", spec)


# --------------------------------------------------------------------------- the bound


def test_integrand_is_the_reverse_kl_rate():
    """Per sample, deterministically: for every masking pattern of every x_0 of length 3,
    at four times, with the mean of a random network, the GenMD4 integrand equals the KL
    rate between the true and the model's reverse chains that the kit computes from the
    process's rates, marginals and scores alone (float64, rtol 1e-6: the kit's 1 - alpha_t
    keeps 1e-16 / t^w of relative precision)."""
    with jax.enable_x64(True):
        process = float64(masked(schedule_spec()))
        mean = build("parameterization", "mean")
        clean = kit.markov_toy(V, 3).sequences()
        patterns = jnp.asarray(np.indices((2,) * 3).reshape(3, -1).T, bool)
        outputs = jax.random.normal(jax.random.PRNGKey(0), (len(clean), len(patterns), 3, V), jnp.float64)

        def both(x0, pattern, output, t):
            x_t = jnp.where(pattern, process.mask_id, x0)
            log_mean = mean.log_mean(output, x_t, t, process)
            weight = genmd4.elbo_weight(process.schedule, t)
            ours = genmd4.genmd4_integrand(log_mean, x0, pattern, weight)
            return ours, kit.reverse_kl_rate(process, log_mean, x0, x_t, t)

        @jax.jit
        def at(t):
            return jax.vmap(lambda x0, out: jax.vmap(lambda p, o: both(x0, p, o, t))(patterns, out))(
                clean, outputs
            )

        ours, rate = jax.vmap(at)(jnp.asarray([1e-3, 0.05, 0.5, 0.99]))
        np.testing.assert_allclose(ours, rate, rtol=1e-6, atol=1e-12)
        assert np.all(np.asarray(ours) >= 0) and np.count_nonzero(ours) > 4 * len(clean)


def exact_genmd4_nelbo(toy, t1):
    """E_x[nelbo] exactly: the kit's diffusion term over [t1, 1] plus the decoder at t1 and
    the prior term, averaged over the toy's sequences."""
    clean = toy.sequences()
    probs = jnp.exp(toy.sequence_log_probs())

    def nelbo(model):
        schedule = model.process.schedule
        diffusion = kit.exact_diffusion_nelbo(model, toy, t_start=t1)
        decoder = jax.vmap(lambda x0: genmd4.reconstruction(schedule, x0, jnp.asarray(t1)))(clean)
        prior = jax.vmap(model.process.prior_kl)(clean)
        return diffusion + jnp.sum(probs * (decoder + prior))

    return nelbo


def test_bound_is_tight_with_the_oracle_exactly():
    """By enumeration in float64 (no sampling): with the exact denoiser, E_x[nelbo] - H(p)
    lies in [KL(q_1 || p_1), KL(q_1 || p_1) + E[reconstruction]] (up to 1e-7; measured
    4.5e-5 above the prior gap of 5.2e-5, the reconstruction term being 1.8e-4)."""
    t1 = genmd4.T1
    with jax.enable_x64(True):
        toy = float64(kit.markov_toy(V, 3))
        process = float64(masked(schedule_spec()))
        mean = build("parameterization", "mean")
        oracle = float64(kit.oracle_model(toy, process, mean))
        exact = exact_genmd4_nelbo(toy, t1)
        value = float(exact(oracle))
        gap = kit.prior_gap(toy, process)
        decoder = float(jnp.sum(jnp.exp(toy.sequence_log_probs()) * jax.vmap(
            lambda x0: genmd4.reconstruction(process.schedule, x0, jnp.asarray(t1)))(toy.sequences())))
        slack = value - toy.entropy() - gap
        assert -1e-7 <= slack <= decoder + 1e-7, (slack, gap, decoder)


def test_exact_bound_of_md4_with_the_oracle():
    """The kit's exact diffusion term on MD4's linear schedule (t from 0) with the oracle:
    E_x[nelbo] - H(p) - KL(q_1 || p_1) lies in [0, D (1 - alpha_0) log V] (float64)."""
    with jax.enable_x64(True):
        toy = float64(kit.markov_toy(V, 3))
        process = float64(masked({"kind": "linear"}))
        oracle = float64(kit.oracle_model(toy, process, build("parameterization", "mean")))
        diffusion = float(kit.exact_diffusion_nelbo(oracle, toy))
        prior = float(jnp.sum(jnp.exp(toy.sequence_log_probs()) * jax.vmap(process.prior_kl)(toy.sequences())))
        reconstruction = 3 * (1 - float(process.schedule.alpha(jnp.zeros(())))) * math.log(V)
        slack = diffusion + reconstruction + prior - toy.entropy() - kit.prior_gap(toy, process)
        assert -1e-7 <= slack <= reconstruction, slack


def test_equal_powers_give_md4s_elbo_per_sample():
    """With every power equal to k = 2 (eps = 0), on the same x_0, time and key, GenMD4's
    diffusion term is (1 - t1) times the mean of MD4's continuous-time term (schedule
    ``poly`` with power k, eps 0: the identical alpha_t = 1 - t^k) over GenMD4's two
    draws, with a time-dependent network (the oracle of GenMD4's process with powers
    0.7, 1.5, 3): 64 examples, rtol 1e-5. Times are kept
    above 0.2, where MD4's generic weight alpha'/(1 - alpha) is accurate in float32 (its
    1 - alpha cancels to a relative error of 6e-8 / t^k)."""
    seq_len, t1 = 4, genmd4.T1
    toy = kit.markov_toy(V, seq_len)
    general = masked(schedule_spec([2.0] * V, eps=0.0), seq_len)
    power = float(general.schedule.powers()[0])
    assert np.all(np.asarray(general.schedule.powers()) == power)
    scalar = masked({"kind": "poly", "power": power, "eps": 0.0}, seq_len)
    network = kit.oracle_network(toy, masked(schedule_spec(), seq_len))
    assert network.time_conditioned
    mean = build("parameterization", "mean")
    models = [ddiff.DiffusionModel(network=network, parameterization=mean, process=p) for p in (general, scalar)]
    objectives = build("objective", {"kind": "genmd4_elbo", "t1": t1}), build("objective", "md4_elbo")
    x0, _ = toy.sample(jax.random.PRNGKey(1), 64)
    fractions = jnp.linspace(0.2, 0.999, 64)
    keys = jax.random.split(jax.random.PRNGKey(2), 64)

    @eqx.filter_jit
    def compare(objectives, models, x0, fractions, keys):
        def one(x, u, key):
            ours = objectives[0].example_terms(models[0], x, u, key=key, train=False)
            t = t1 + (1.0 - t1) * u
            theirs = jax.vmap(
                lambda k: objectives[1].example_terms(models[1], x, t, key=k, train=False).metrics["diffusion"]
            )(jax.random.split(key))
            return ours.metrics["diffusion"], (1.0 - t1) * jnp.mean(theirs), ours.metrics["prior"]

        return jax.vmap(one)(x0, fractions, keys)

    ours, theirs, prior = compare(objectives, models, x0, fractions, keys)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(prior, 0.0, atol=1e-7)
    assert np.count_nonzero(np.asarray(ours)) > 48


# --------------------------------------------------------------------------- the gradient


def test_reinforce_gradient_is_unbiased():
    """The leave-one-out REINFORCE gradient of GenMD4's loss with respect to phi (powers
    1.5, 2, 3; V = 3, D = 3; a time-independent network that is the oracle of the linear
    scalar process, so the bound is not at its optimum) averaged over 2^14 draws matches
    the exact gradient of the bound (enumeration of x_0 and x_t, 48-node quadrature in t,
    float64) within 4 standard errors + 1e-3 relative per coordinate, and the mean nelbo
    matches the exact bound; measured: (-0.177 ± 0.018, -0.184 ± 0.019, +0.240 ± 0.007)
    vs (-0.176, -0.160, +0.225). The same check rejects the gradient without the REINFORCE
    term (+0.28, +0.36, +0.44: 25 to 100 standard errors off at 2^14 draws; 2^12 here):
    it can fail."""
    toy = kit.markov_toy(V, 3)
    process = masked(schedule_spec([1.5, 2.0, 3.0]))
    mean = build("parameterization", "mean")
    network = kit.oracle_network(toy, masked({"kind": "linear"}))
    model = ddiff.DiffusionModel(network=network, parameterization=mean, process=process)
    objective = build("objective", "genmd4_elbo")
    exact = exact_genmd4_nelbo(toy, objective.t1)

    def check(objective, num_examples):
        return kit.check_gradient(
            objective, model, toy, exact, where=the_schedule,
            key=jax.random.PRNGKey(0), num_examples=num_examples,
        )  # fmt: skip

    result = check(objective, 2**14)
    print(result)
    result.raise_if_failed()
    assert result.numbers["exact_nelbo"] > toy.entropy() + 0.1  # a bound, not at its optimum
    biased = check(PathwiseOnly(objective), 2**12)
    print(biased)
    assert not biased.passed and "FAILED" in biased.summary


def test_terms_powers_and_the_network_gradient():
    """nelbo = diffusion + reconstruction + prior, loss = nelbo + reinforce (non-zero), the
    powers reported as min/mean/max; the REINFORCE term carries no gradient to the network
    (exactly 0 for each of its arrays, non-zero for phi), so the network's gradient is
    that of the nelbo estimate. The network is the oracle of the scalar linear process,
    whose arrays (the toy's log-probabilities) determine its output."""
    toy = kit.markov_toy(V, 4)
    model = ddiff.DiffusionModel(
        network=kit.oracle_network(toy, masked({"kind": "linear"}, 4)),
        parameterization=build("parameterization", "mean"),
        process=masked(schedule_spec(), 4),
    )
    objective = build("objective", "genmd4_elbo", 4)
    x0, _ = toy.sample(jax.random.PRNGKey(0), 16)

    @eqx.filter_jit
    def gradient(model):
        def reinforce(model):
            terms = objective.per_example_terms(model, x0, key=jax.random.PRNGKey(1), train=False)
            return jnp.mean(terms.metrics["reinforce"]), terms

        return eqx.filter_grad(reinforce, has_aux=True)(model)

    grads, terms = gradient(model)
    m = terms.metrics
    np.testing.assert_allclose(terms.nelbo, m["diffusion"] + m["reconstruction"] + m["prior"], rtol=1e-6)
    np.testing.assert_allclose(terms.loss, terms.nelbo + m["reinforce"], rtol=1e-6)
    assert np.count_nonzero(np.asarray(m["reinforce"])) > 0
    np.testing.assert_allclose(m["power_min"], 0.7, rtol=1e-6)
    np.testing.assert_allclose(m["power_mean"], np.mean(POWERS), rtol=1e-6)
    np.testing.assert_allclose(m["power_max"], 3.0, rtol=1e-6)
    assert len(jax.tree.leaves(grads.network)) == 2
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads.network))
    assert np.all(np.asarray(grads.process.schedule.phi) != 0)


# --------------------------------------------------------------------------- the sampler


def test_reverse_step_probabilities():
    """From t to s a masked position becomes v with mu[v] (alpha_s[v] - alpha_t[v]) /
    (1 - alpha_t[v]) and stays masked with the rest, against float64 arithmetic on alpha
    (rtol 1e-5); to s = 0 it always unmasks (alpha_0 = 1)."""
    schedule = build("schedule", schedule_spec())
    log_mean = jnp.log(jnp.asarray([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]]))
    for s, t in ((0.5, 0.6), (0.01, 0.02), (0.0, 0.1)):
        s, t = jnp.asarray(s), jnp.asarray(t)
        probs = np.exp(np.asarray(genmd4.reverse_logits(
            log_mean, schedule.log_mask_probability(s), schedule.log_mask_probability(t)), np.float64))
        alpha_s = 1 - (1 - genmd4.EPS) * float(s) ** np.asarray(POWERS, np.float64)
        alpha_t = 1 - (1 - genmd4.EPS) * float(t) ** np.asarray(POWERS, np.float64)
        unmask = np.exp(np.asarray(log_mean, np.float64)) * (alpha_s - alpha_t) / (1 - alpha_t)
        np.testing.assert_allclose(probs[:, :V], unmask, rtol=1e-5)
        np.testing.assert_allclose(probs[:, V], 1 - unmask.sum(-1), rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- the optimizer


def test_schedule_parameters_get_their_own_optimizer_settings():
    """With optimizer.schedule, the leaves under model.process.schedule follow AdamW with
    the group's settings (here lr 0.05, no weight decay) and every other leaf the
    network's (lr 1e-3, weight decay 0.1); without it, one AdamW for all (unchanged)."""
    base = ddiff.runner.OptimizerConfig(learning_rate=1e-3, weight_decay=0.1, decay="constant")
    grouped = ddiff.runner.OptimizerConfig(
        learning_rate=1e-3, weight_decay=0.1, decay="constant",
        schedule=ddiff.runner.ParameterGroupConfig(learning_rate=0.05, weight_decay=0.0),
    )  # fmt: skip
    model = kit.oracle_model(kit.markov_toy(V, 3), masked(schedule_spec()), build("parameterization", "mean"))
    params = ddiff.trainable(model)
    labels = jax.tree.leaves(parameter_groups(params))
    # The oracle network holds a copy of the process: its phi is a network leaf.
    assert labels.count("schedule") == 1 and labels.count("network") == 3
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)

    def one_step(config):
        optimizer = make_optimizer(config, total_steps=10)
        state = optimizer.init(params)
        updates, _ = optimizer.update(grads, state, params)
        return updates

    def alone(config, tree):
        optimizer = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)
        return optimizer.update(jax.tree.map(lambda p: jnp.full_like(p, 0.5), tree), optimizer.init(tree), tree)[0]

    updates = one_step(grouped)
    phi = params.process.schedule.phi
    np.testing.assert_allclose(
        updates.process.schedule.phi, alone(ddiff.runner.OptimizerConfig(learning_rate=0.05), phi), rtol=1e-5
    )
    network_updates = alone(base, params.network)
    for ours, theirs in zip(jax.tree.leaves(updates.network), jax.tree.leaves(network_updates), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-9)
    plain = one_step(base)
    np.testing.assert_allclose(plain.process.schedule.phi, alone(base, phi), rtol=1e-5)
