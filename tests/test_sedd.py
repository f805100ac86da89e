"""SEDD beyond the conformance kit: the schedules against SEDD's definitions, the
per-sample identity with MD4 (docs/sedd.md), score entropy against SEDD's own closed forms for
both graphs, scores and means read into each other, the samplers' steps and bookkeeping,
refusals at load time, and the SEDD recipes run for 2 steps."""

import json
import math
import re
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from data_fixtures import write_text8
from ddiff_plugins import sedd

import ddiff
import ddiff.runner
from ddiff.runner import main

V, D = 3, 4
RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def build(slot, spec, **context):
    return ddiff.build_component(slot, spec, vocab_size=V, seq_len=D, **context)


class _Lookup(ddiff.AbstractNetwork):
    """A fixed network: output[n] = table[x_t^n, n] (1 + t), non-uniform and t-dependent."""

    table: jax.Array
    time_conditioned: bool = eqx.field(static=True, default=True)
    num_classes: int = eqx.field(static=True, default=0)

    def __call__(self, x_t, t, *, label=None, key=None):
        return self.table[x_t, jnp.arange(x_t.shape[0])] * (1.0 + t)


def lookup_model(process, parameterization, seed=0):
    channels = parameterization.output_channels(process)
    table = 2.0 * jax.random.normal(jax.random.PRNGKey(seed), (process.num_states, D, channels))
    return ddiff.DiffusionModel(network=_Lookup(table), parameterization=parameterization, process=process)


class _PerValueSchedule(ddiff.AbstractSchedule):
    """alpha_t[v] = 1 - (1 - 1e-3) t^{w_v}: a per-value schedule for the closed forms."""

    powers: jax.Array
    provides = frozenset({ddiff.capabilities.PER_VALUE})

    def alpha(self, t):
        return 1.0 - (1.0 - 1e-3) * t**self.powers


@pytest.fixture(scope="module")
def processes():
    masked = build("process", {"kind": "masked", "schedule": "loglinear"})
    per_value = eqx.tree_at(lambda p: p.schedule, masked, _PerValueSchedule(jnp.array([0.5, 1.0, 3.0])))
    uniform = build("process", {"kind": "uniform", "schedule": "geometric"})
    return {"masked": masked, "masked_per_value": per_value, "uniform": uniform}


# --------------------------------------------------------------------------- schedules


def test_schedules_follow_sedds_noise_lib():
    """SEDD's noise_lib in float64: geometric sigma_bar = 1e-4^(1-t) 20^t with
    alpha = exp(-sigma_bar); log-linear sigma_bar(tau) = -log(1 - (1 - 1e-3) tau) on
    tau = 1e-3 + (1 - 1e-3) t, its rate d sigma_bar / dt; relative tolerance 1e-5."""
    t = np.linspace(0.0, 1.0, 11)
    times = jnp.asarray(t, jnp.float32)
    geometric = build("schedule", "geometric")
    sigma_bar = 1e-4 ** (1 - t) * 20.0**t
    np.testing.assert_allclose(jax.vmap(geometric.total_noise)(times), sigma_bar, rtol=1e-5)
    np.testing.assert_allclose(jax.vmap(geometric.noise_rate)(times), sigma_bar * math.log(2e5), rtol=1e-5)
    np.testing.assert_allclose(jax.vmap(geometric.alpha)(times), np.exp(-sigma_bar), rtol=1e-5)
    loglinear = build("schedule", "loglinear")
    tau = 1e-3 + (1 - 1e-3) * t
    np.testing.assert_allclose(jax.vmap(loglinear.total_noise)(times), -np.log1p(-(1 - 1e-3) * tau), rtol=1e-5)
    np.testing.assert_allclose(
        jax.vmap(loglinear.noise_rate)(times), (1 - 1e-3) ** 2 / (1 - (1 - 1e-3) * tau), rtol=1e-5
    )
    for schedule in (geometric, loglinear):
        inner = times[1:-1]
        automatic = jax.vmap(jax.grad(schedule.total_noise))(inner)
        np.testing.assert_allclose(jax.vmap(schedule.noise_rate)(inner), automatic, rtol=1e-4)
        np.testing.assert_allclose(
            jax.vmap(schedule.alpha_derivative)(inner), jax.vmap(jax.grad(schedule.alpha))(inner), rtol=1e-4
        )
    with pytest.raises(ddiff.RecipeError, match=r"t_min must be in \(0, 1\)"):
        build("schedule", {"kind": "loglinear", "t_min": 0.0})


# --------------------------------------------------------------------------- objective


@eqx.filter_jit
def _both_objectives(model, x0, times, keys):
    """Score entropy and the MD4 ELBO per example on the same draws, with x_t, log mu,
    alpha_t and sigma(t) for the check by hand."""
    score_entropy, elbo = build("objective", "score_entropy"), build("objective", "md4_elbo")

    def one(x0, t, key):
        ours = score_entropy.example_terms(model, x0, t, key=key, train=False)
        theirs = elbo.example_terms(model, x0, t, key=key, train=False)
        x_t = model.process.sample_marginal(x0, t, key=jax.random.split(key)[0])
        schedule = model.process.schedule
        return ours, theirs, x_t, model.log_mean(x_t, t), schedule.alpha(t), sedd.noise_rate(schedule, t)

    return jax.vmap(one)(x0, times, keys)


@pytest.mark.parametrize("schedule", ["loglinear", "geometric"])
def test_score_entropy_with_score_r_mu_equals_the_md4_integrand(schedule):
    """docs/sedd.md: on the absorbing graph with s = r mu, r = alpha/(1 - alpha), a masked
    position contributes sigma(t) [sum_y s_y - r log s_x0 + r (log r - 1)] = -alpha'/(1 -
    alpha) (-log mu_x0), MD4's integrand, for the same x_t and t. The mean
    parameterization reads its mean as that score; both objectives draw x_t from the same
    key. Checked per sample against MD4ContinuousELBO and against a float64 evaluation of
    the formula, 6 times from 1e-3 to 0.999 with 16 sequences each; relative tolerance 2e-5."""
    process = build("process", {"kind": "masked", "schedule": schedule})
    model = lookup_model(process, build("parameterization", "mean"))
    times = jnp.repeat(jnp.asarray([1e-3, 0.05, 0.3, 0.5, 0.8, 0.999], jnp.float32), 16)
    x0 = jax.random.randint(jax.random.PRNGKey(1), (times.shape[0], D), 0, V)
    keys = jax.random.split(jax.random.PRNGKey(2), times.shape[0])
    ours, theirs, x_t, log_mean, alpha, rate = _both_objectives(model, x0, times, keys)
    np.testing.assert_allclose(ours.metrics["diffusion"], theirs.metrics["diffusion"], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(ours.nelbo, theirs.nelbo, rtol=2e-5, atol=1e-6)
    mu = np.exp(np.asarray(log_mean, np.float64))
    r = np.asarray(alpha, np.float64) / (1 - np.asarray(alpha, np.float64))
    rate = np.asarray(rate, np.float64)
    by_hand = [
        sum(
            rate[i] * (r[i] * mu[i, n].sum() - r[i] * np.log(r[i] * mu[i, n, x0[i, n]]) + r[i] * (np.log(r[i]) - 1))
            for n in range(D)
            if x_t[i, n] == V
        )
        for i in range(times.shape[0])
    ]
    np.testing.assert_allclose(ours.metrics["diffusion"], by_hand, rtol=2e-5, atol=1e-6)
    assert np.mean(np.asarray(x_t) == V) > 0.3


def _sedd_absorbing(log_score, sigma_bar, x_t, x0):
    """Lou et al.'s graph_lib.Absorbing.score_entropy, per position (float64)."""
    ratio = 1.0 / np.expm1(sigma_bar)
    masked = x_t == V
    positive = np.exp(log_score[:, :-1]).sum(-1)
    negative = ratio * log_score[np.arange(D), x0]
    return np.where(masked, positive - negative + ratio * (np.log(ratio) - 1), 0.0)


def _sedd_uniform(log_score, sigma_bar, x_t, x0):
    """Lou et al.'s graph_lib.Uniform.score_entropy, per position (float64)."""
    esigm1 = np.expm1(sigma_bar)
    ratio = 1 - V / (esigm1 + V)
    current = log_score[np.arange(D), x_t]
    negative = log_score.mean(-1) - current / V
    negative = np.where(x_t == x0, ratio * negative, log_score[np.arange(D), x0] / esigm1 + negative)
    const = np.where(
        x_t == x0,
        (V - 1) / V * ratio * (np.log(ratio) - 1),
        ((-np.log(ratio) - 1) / ratio - (V - 2)) / V,
    )
    score = np.exp(log_score)
    positive = score.mean(-1) - score[np.arange(D), x_t] / V
    return positive - negative + const


@eqx.filter_jit
def _integrands(process, key, count):
    """Draws of (x_0, t, x_t), arbitrary log scores (current entry 0), the integrand,
    sigma_bar(t) and sigma(t)."""

    def one(key):
        keys = jax.random.split(key, 4)
        x0 = jax.random.randint(keys[0], (D,), 0, V)
        t = jax.random.uniform(keys[1], (), minval=0.02, maxval=0.98)
        x_t = process.sample_marginal(x0, t, key=keys[2])
        log_score = jax.random.normal(keys[3], (D, process.num_states))
        log_score = jnp.where(jax.nn.one_hot(x_t, process.num_states, dtype=bool), 0.0, log_score)
        integrand = sedd.score_entropy(process, log_score, x0, x_t, t)
        schedule = process.schedule
        return x0, x_t, log_score, integrand, sedd.total_noise(schedule, t), sedd.noise_rate(schedule, t)

    return jax.vmap(one)(jax.random.split(key, count))


@pytest.mark.parametrize("graph", ["masked", "uniform"])
def test_score_entropy_matches_sedds_per_graph_formulas(processes, graph):
    """The generic integrand (incoming rates and marginal ratios of any process) against
    SEDD's own per-graph formulas times sigma(t) (their losses.py), for arbitrary log
    scores with the current entry 0, 64 draws of (x_0, t, x_t); relative tolerance 1e-4."""
    process = processes[graph]
    formula = _sedd_absorbing if graph == "masked" else _sedd_uniform
    x0, x_t, log_score, ours, sigma_bar, rate = map(np.asarray, _integrands(process, jax.random.PRNGKey(0), 64))
    for i in range(64):
        theirs = rate[i] * formula(log_score[i].astype(np.float64), float(sigma_bar[i]), x_t[i], x0[i]).sum()
        np.testing.assert_allclose(ours[i], theirs, rtol=1e-4, atol=1e-6)


@eqx.filter_jit
def _closed_and_generic(process, key):
    """Each closed form beside the protocol's dense default, on arbitrary inputs."""
    x0 = jnp.array([0, 2, 1, 1])
    s, t = jnp.asarray(0.3), jnp.asarray(0.6)
    values = jax.random.uniform(key, (D, process.num_states))
    reconstruction = (process.reconstruction_nll(x0), ddiff.AbstractForwardProcess.reconstruction_nll(process, x0))
    unpropagate = (
        process.unpropagate(values, s, t),
        ddiff.AbstractTransitionProcess.unpropagate(process, values, s, t),
        process.unpropagate(process.propagate(values, s, t), s, t),
        values,
    )

    def round_trip(key):
        x_t = process.sample_marginal(x0, t, key=key)
        mean = jax.nn.log_softmax(jax.random.normal(jax.random.fold_in(key, 1), (D, V)))
        log_score = process.log_score_from_mean(mean, x_t, t)
        every = jnp.all(process.marginal_probs(jnp.arange(V), t)[:, x_t] > 0, axis=0)
        closed = process.log_mean_from_score(log_score, x_t, t)
        generic = ddiff.AbstractForwardProcess.log_mean_from_score(process, log_score, x_t, t)
        return x_t, mean, every, closed, generic

    return reconstruction, unpropagate, jax.vmap(round_trip)(jax.random.split(key, 8))


@pytest.mark.parametrize("name", ["masked", "masked_per_value", "uniform"])
def test_closed_forms_equal_the_generic_defaults(processes, name):
    """Reconstruction term, inverse transition and Tweedie mean: each process's closed form
    against the protocol's dense default (relative tolerance 1e-4); the inverse transition
    undoes propagate; and the mean read back from the score of an arbitrary mean is that
    mean (1e-3) wherever every clean value can produce x_t^n (the positions where the score
    determines it), the carried token elsewhere (8 draws)."""
    reconstruction, unpropagate, (x_t, mean, every, closed, generic) = _closed_and_generic(
        processes[name], jax.random.PRNGKey(5)
    )
    np.testing.assert_allclose(*reconstruction, rtol=1e-4)
    np.testing.assert_allclose(unpropagate[0], unpropagate[1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(unpropagate[2], unpropagate[3], rtol=1e-4, atol=1e-5)
    every = np.asarray(every)
    assert every.any()
    for read in (closed, generic):
        back = np.exp(np.asarray(read))
        np.testing.assert_allclose(back[every], np.exp(mean)[every], rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(back.sum(-1), 1.0, rtol=1e-5)
        np.testing.assert_array_equal(back[~every].argmax(-1), np.asarray(x_t)[~every])


def test_reconstruction_is_md4s_for_a_scalar_masked_schedule():
    """D (1 - alpha_0) log V (MD4's reconstruction loss); relative tolerance 1e-5."""
    process = build("process", {"kind": "masked", "schedule": "cosine"})
    expected = D * (1.0 - process.schedule.alpha(jnp.zeros(()))) * np.log(process.vocab_size)
    np.testing.assert_allclose(process.reconstruction_nll(jnp.array([0, 1, 2, 0])), expected, rtol=1e-5)


# --------------------------------------------------------------------------- parameterizations


def test_mean_reads_as_score_r_mu(processes):
    """MD4's mean: s[n, y] = alpha/(1 - alpha) mu[n, y] at masked positions, 1 at the mask
    itself; x0 on the uniform graph gives the process's closed-form score of its mean.
    Relative tolerance 1e-5."""
    masked = processes["masked"]
    t = jnp.asarray(0.4)
    x_t = jnp.array([V, 1, V, 0])
    model = lookup_model(masked, build("parameterization", "mean"))
    mean = np.exp(model.log_mean(x_t, t))
    score = np.exp(model.log_score(x_t, t))
    alpha = float(masked.schedule.alpha(t))
    np.testing.assert_allclose(score[[0, 2], :V], alpha / (1 - alpha) * mean[[0, 2]], rtol=1e-5)
    np.testing.assert_allclose(score[[0, 2], V], 1.0)
    uniform = processes["uniform"]
    model = lookup_model(uniform, build("parameterization", "x0"))
    x_t = jnp.array([2, 1, 0, 0])
    np.testing.assert_allclose(
        model.log_score(x_t, t), uniform.log_score_from_mean(model.log_mean(x_t, t), x_t, t), rtol=1e-5
    )


def test_score_parameterization_scales_the_absorbing_graph_only(processes):
    """A zero output is SEDD's scaled score r/V on the absorbing graph (log s = output -
    log(e^sigma_bar - 1) - log V), 1 on the uniform graph, and 1 at the current state
    everywhere; with the scaling off, log scores pass through unchanged (relative
    tolerance 1e-5)."""
    t = jnp.asarray(0.7)
    scaled = build("parameterization", "score")
    masked, uniform = processes["masked"], processes["uniform"]
    x_t = jnp.array([V, 1, V, 0])
    log_score = scaled.log_score(jnp.zeros((D, V + 1)), x_t, t, masked)
    alpha = float(masked.schedule.alpha(t))
    np.testing.assert_allclose(np.exp(log_score[[0, 2], :V]), alpha / (1 - alpha) / V, rtol=1e-5)
    np.testing.assert_array_equal(log_score[jnp.arange(D), x_t], 0.0)
    x_u = jnp.array([2, 1, 0, 0])
    np.testing.assert_array_equal(scaled.log_score(jnp.ones((D, V)), x_u, t, uniform)[jnp.arange(D), x_u], 0.0)
    np.testing.assert_allclose(np.exp(scaled.log_score(jnp.zeros((D, V)), x_u, t, uniform)), 1.0)
    output = jax.random.normal(jax.random.PRNGKey(0), (D, V + 1))
    given = jnp.where(jax.nn.one_hot(x_t, V + 1, dtype=bool), 0.0, output)
    plain = build("parameterization", {"kind": "score", "absorbing_scale": False})
    np.testing.assert_allclose(plain.log_score(output, x_t, t, masked), given)


# --------------------------------------------------------------------------- samplers


@eqx.filter_jit
def run(sampler, model, key, conditioning, num_samples):
    keys = ddiff.sample_keys(key, 0, num_samples)
    return sampler.sample(model, keys=keys, seq_len=D, conditioning=conditioning)


def test_analytic_step_on_the_absorbing_graph_is_md4s_ancestral_step(processes):
    """With the exact score s = r_t mu the Tweedie step from t to s unmasks to v with
    (alpha_s - alpha_t)/(1 - alpha_t) mu[v] and stays masked with (1 - alpha_s)/(1 -
    alpha_t) (MD4 Alg. 2); Euler's first-order step moves with (t - s) sigma(t) s_v.
    Relative tolerance 1e-5."""
    process = processes["masked"]
    model = lookup_model(process, build("parameterization", "mean"))
    x_t = jnp.array([V, 1, V, V])
    t, s = jnp.asarray(0.6), jnp.asarray(0.45)
    log_score = model.log_score(x_t, t)
    mean = np.exp(model.log_mean(x_t, t))
    alpha_s, alpha_t = float(process.schedule.alpha(s)), float(process.schedule.alpha(t))
    analytic = np.asarray(build("sampler", "analytic").step_probs(process, x_t, log_score, s, t))
    masked = np.asarray(x_t) == V
    np.testing.assert_allclose(analytic[masked, :V], (alpha_s - alpha_t) / (1 - alpha_t) * mean[masked], rtol=1e-5)
    np.testing.assert_allclose(analytic[masked, V], (1 - alpha_s) / (1 - alpha_t), rtol=1e-5)
    np.testing.assert_allclose(analytic[1], np.eye(V + 1)[1], atol=1e-6)
    euler = np.asarray(build("sampler", "euler").step_probs(process, x_t, log_score, s, t))
    rate = float(sedd.noise_rate(process.schedule, t))
    np.testing.assert_allclose(euler[masked, :V], 0.15 * rate * np.exp(log_score)[masked, :V], rtol=1e-5)
    np.testing.assert_allclose(euler.sum(-1), 1.0, rtol=1e-5)


@eqx.filter_jit
def _guided_scores(model, x_t, t, labels, null):
    guided = ddiff.batched_log_score(model, x_t, t, ddiff.Conditioning(labels=labels, guidance=1.5))
    conditional, _ = ddiff.batched_log_score(model, x_t, t, ddiff.Conditioning(labels=labels))
    unconditional, _ = ddiff.batched_log_score(model, x_t, t, ddiff.Conditioning(labels=null))
    return guided, conditional, unconditional


class _Labelled(ddiff.AbstractNetwork):
    """A fixed class-conditional network: output[n] = table[label, x_t^n, n] (1 + t)."""

    table: jax.Array
    time_conditioned: bool = eqx.field(static=True, default=True)
    num_classes: int = eqx.field(static=True, default=2)

    def __call__(self, x_t, t, *, label=None, key=None):
        return self.table[label, x_t, jnp.arange(x_t.shape[0])] * (1.0 + t)


def test_samplers_count_evaluations_keep_given_positions_and_guide():
    """Under guidance 2 (steps + 1) network evaluations (the final denoising step
    included; the loop is shared by both samplers); given positions never change; the
    guided scores are (1 + w) log s_c - w log s_u (relative tolerance 1e-5)."""
    process = build("process", {"kind": "uniform", "schedule": "geometric"})
    table = jax.random.normal(jax.random.PRNGKey(1), (3, V, D, V))
    model = ddiff.DiffusionModel(network=_Labelled(table), parameterization=build("parameterization", "score"), process=process)
    labels = jnp.arange(16) % 2
    fixed = jnp.zeros((16, D), bool).at[:, 1].set(True)
    guided = ddiff.Conditioning(labels=labels, fixed_tokens=jnp.full((16, D), 2), fixed_mask=fixed, guidance=1.5)
    output = run(build("sampler", {"kind": "euler", "steps": 6}), model, jax.random.PRNGKey(0), guided, 16)
    assert int(output.num_function_evals) == 14
    assert np.all(np.asarray(output.tokens)[:, 1] == 2)
    x_t = jax.random.randint(jax.random.PRNGKey(3), (16, D), 0, V)
    (mixed, calls), conditional, unconditional = _guided_scores(model, x_t, jnp.asarray(0.5), labels, jnp.full_like(labels, 2))
    assert calls == 2
    np.testing.assert_allclose(mixed, 2.5 * conditional - 1.5 * unconditional, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- refusals


class _MeanOnly(ddiff.AbstractMeanParameterization):
    """A mean parameterization that cannot be read as a score."""

    def output_channels(self, process):
        return process.vocab_size

    def log_mean(self, output, x_t, t, process):
        return jax.nn.log_softmax(output, axis=-1)


class _Plugin:
    @ddiff.hookimpl
    def ddiff_register_components(self, registry):
        registry.register("parameterization", "mean_only", _MeanOnly)


def test_score_objective_and_samplers_refuse_a_parameterization_without_scores(capsys):
    """Refused when the recipe is loaded, naming both pieces and the missing capability;
    on the command line as one line."""
    registry = ddiff.build_registry(ddiff.make_plugin_manager(plugins=[_Plugin()]))
    raw = ddiff.runner.read_recipe_file(RECIPES / "sedd_text8.yaml")
    cases = {
        "objective 'score_entropy' cannot be used with parameterization 'mean_only': it needs "
        "capability score which 'mean_only' does not provide": ["parameterization={kind: mean_only}"],
        "sampler 'analytic' cannot be used with parameterization 'mean_only'": [
            "parameterization={kind: mean_only}", "objective.kind=md4_elbo", "process.schedule={kind: linear}",
        ],
        "eval.objectives[0] 'score_entropy' cannot be used with parameterization 'mean_only'": [
            "parameterization={kind: mean_only}", "objective.kind=md4_elbo", "sampler.kind=ancestral",
            "process.schedule={kind: linear}", "eval.objectives=[{kind: score_entropy}]",
        ],
        "objective 'score_entropy' is listed twice": ["eval.objectives=[{kind: score_entropy}, {kind: score_entropy}]"],
    }
    for message, overrides in cases.items():
        with pytest.raises(ddiff.RecipeError if "twice" in message else ddiff.IncompatibleComponentsError, match=re.escape(message)):
            ddiff.runner.build_recipe(ddiff.runner.apply_overrides(raw, overrides, "sedd.yaml"), source="sedd.yaml", registry=registry)
    assert main(["recipe", "show", str(RECIPES / "sedd_text8.yaml"), "objective.kind=md4_elbo"]) == 2
    err = capsys.readouterr().err
    assert "objective 'md4_elbo' cannot be used with parameterization 'score': it needs capability mean" in err
    assert err.count("\n") == 1


# --------------------------------------------------------------------------- recipes

SHRINK = (
    "trainer.steps=2", "trainer.batch_size=2", "trainer.log_every=1", "trainer.checkpoint_every=2",
    "trainer.num_samples=2", "sampler.steps=2", "eval.batch_size=4", "eval.time_draws=1", "mesh.data=1",
    "data.length=32", "network.dim=16", "network.depth=1", "network.heads=2", "network.cond_dim=16",
)  # fmt: skip


SEDD_RECIPES = ("sedd_text8", "sedd_uniform_text8", "sedd_mean_text8")


@pytest.mark.parametrize("name", SEDD_RECIPES)
def test_sedd_recipe_opens_with_the_paper_result_and_loads(name):
    """The header quotes the paper and SEDD's text8 number; the recipe loads unchanged."""
    text = (RECIPES / f"{name}.yaml").read_text()
    assert "Lou et al., ICML 2024" in text.split("\n\n")[0] and "1.39" in text.split("\n\n")[0]
    recipe = ddiff.runner.load_recipe(RECIPES / f"{name}.yaml")
    assert recipe.data.seq_len == 256 and recipe.names["data"] == "text8"


def _run(tmp_path, capsys, name, *overrides):
    write_text8(tmp_path / "data", characters=4000)
    workdir = tmp_path / "run"
    arguments = [*SHRINK, *overrides, f"data.root={tmp_path / 'data'}", "--workdir", str(workdir)]
    code = main(["run", str(RECIPES / f"{name}.yaml"), *arguments])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "(V=27, D=32)" in out
    return workdir, out


@pytest.mark.slow
def test_sedd_text8_recipe_trains_and_samples(tmp_path, capsys):
    """Two steps and two samples with the analytic sampler (the trainer's held-out score
    entropy is run by the mean recipe's test)."""
    workdir, _ = _run(tmp_path, capsys, "sedd_text8", "trainer.final_eval=false")
    samples = (workdir / "samples" / "step_00000002.txt").read_text().splitlines()
    assert len(samples) == 2 and all(len(s) == 32 and set(s) <= set("abcdefghijklmnopqrstuvwxyz ") for s in samples)


@pytest.mark.slow
def test_sedd_uniform_text8_recipe_trains(tmp_path, capsys):
    """Two training steps; its score entropy on a real network is evaluated by the
    conformance kit's untrained-network check, its sampler by the oracle (compile time)."""
    workdir, out = _run(tmp_path, capsys, "sedd_uniform_text8", "trainer.num_samples=0", "trainer.final_eval=false")
    assert "score_entropy with uniform process" in out
    assert (workdir / "checkpoints").is_dir()


@pytest.mark.slow
def test_mean_network_evaluated_under_score_entropy_agrees_with_its_elbo(tmp_path, capsys):
    """sedd_mean_text8: the MD4 ELBO and score entropy of one mean network on the same
    sequences and draws agree to 1e-5 relative (the per-sample identity on real data).
    Shrunk exactly as test_paper_recipes.py shrinks md4_text8, whose network, objective
    and optimizer it shares, so the suite compiles their training step once."""
    from test_paper_recipes import SHRINK as PAPER_SHRINK
    from test_paper_recipes import SMALL_TRANSFORMER

    paper = (*PAPER_SHRINK, "data.length=32", *SMALL_TRANSFORMER, "optimizer.warmup_steps=0",
             "optimizer.learning_rate=0.01", "optimizer.ema_decay=0.0", "trainer.num_samples=0")  # fmt: skip
    workdir, _ = _run(tmp_path, capsys, "sedd_mean_text8", *paper)
    result = json.loads((workdir / "eval.json").read_text())
    assert 3.0 < result["bits_per_char"] < 9.0
    assert result["score_entropy_bits_per_char"] == pytest.approx(result["bits_per_char"], rel=1e-5)
    assert result["score_entropy_bits_per_token_stderr"] > 0
