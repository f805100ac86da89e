"""MD4 samplers beyond the conformance kit: evaluation counts, caching, refusal,
first-hitting variants, top-p, guidance, and a real (time-conditioned) network."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddiff
import ddiff.runner
import ddiff.testing as kit

V, D = 3, 4


def build(slot, spec, **context):
    return ddiff.build_component(slot, spec, vocab_size=V, seq_len=D, **context)


@pytest.fixture(scope="module")
def process():
    return build("process", {"kind": "masked", "schedule": "linear"})


@pytest.fixture(scope="module")
def models(process):
    mean = build("parameterization", "mean")
    toys = {**kit.toy_distributions(V, D), "classes": kit.class_conditional_toy(V, D)}
    return {name: kit.oracle_model(toy, process, mean) for name, toy in toys.items()}, toys


@eqx.filter_jit
def run(sampler, model, key, conditioning, num_samples):
    keys = ddiff.sample_keys(key, 0, num_samples)
    return sampler.sample(model, keys=keys, seq_len=D, conditioning=conditioning)


def test_grid_samplers_count_network_evaluations(models):
    """The grid samplers share one loop (ddiff.run_sampler); ancestral stands for them.
    (Guidance doubles the count: see the transformer test below.)"""
    sampler = build("sampler", {"kind": "ancestral", "steps": 8, "grid": "cosine"})
    output = run(sampler, models[0]["markov"], jax.random.PRNGKey(0), ddiff.Conditioning(), 64)
    # 8 steps, plus one decoding call at t = 0 if a position is still masked.
    assert int(output.num_function_evals) in (8, 9)
    assert not np.any(np.asarray(output.tokens) == V)


def test_cached_sampler_equals_ancestral_with_fewer_calls(models):
    """For a network that ignores t, reusing a prediction changes nothing: the same key gives
    the same tokens. Two sequences can change at most 2 D times: at most 2 D + 1 calls."""
    model = models[0]["markov"]
    ancestral = build("sampler", {"kind": "ancestral", "steps": 256})
    cached = build("sampler", {"kind": "cached", "steps": 256})
    for seed in range(3):
        key = jax.random.PRNGKey(seed)
        reference = run(ancestral, model, key, ddiff.Conditioning(), 2)
        reused = run(cached, model, key, ddiff.Conditioning(), 2)
        np.testing.assert_array_equal(reused.tokens, reference.tokens)
        assert int(reference.num_function_evals) >= 256
        assert 1 <= int(reused.num_function_evals) <= 2 * D + 1


def test_cached_sampler_refuses_a_time_conditioned_network(models, process):
    raw = {
        "data": {"kind": "toy", "toy": "markov", "num_train": 8, "num_eval": 8},
        "process": {"kind": "masked", "schedule": "linear"},
        "parameterization": "mean",
        "network": {"kind": "transformer", "dim": 8, "depth": 1, "heads": 2, "time_conditioned": True},
        "objective": "md4_elbo",
        "sampler": {"kind": "cached", "steps": 4},
    }
    recipe = ddiff.runner.build_recipe(raw, source="cached.yaml")
    with pytest.raises(ddiff.IncompatibleComponentsError, match="time_independent") as error:
        ddiff.runner.build_model(recipe, jax.random.PRNGKey(0))
    assert "sampler 'cached'" in str(error.value) and "\n" not in str(error.value)
    time_independent = ddiff.runner.build_recipe(
        {**raw, "network": {**raw["network"], "time_conditioned": False}}, source="cached.yaml"
    )
    ddiff.runner.build_model(time_independent, jax.random.PRNGKey(0))

    toy = kit.markov_toy(V, D)
    model = ddiff.DiffusionModel(
        network=kit.oracle_network(toy, process, time_conditioned=True),
        parameterization=build("parameterization", "mean"),
        process=process,
    )
    with pytest.raises(ddiff.IncompatibleComponentsError, match="time conditioned"):
        run(build("sampler", "cached"), model, jax.random.PRNGKey(0), ddiff.Conditioning(), 2)


def test_first_hitting_counts_calls_per_row_of_free_positions(models):
    """Rows with 2 or 3 free positions and 2 tokens per call: ceil(3 / 2) = 2 calls (the
    loop runs until every row is done). One token per call: see the parity test below."""
    model = models[0]["markov"]
    fixed_mask = jnp.asarray([[True, False, True, False], [True, False, False, False]] * 32)
    given = ddiff.Conditioning(fixed_tokens=jnp.zeros((64, D), jnp.int32), fixed_mask=fixed_mask)
    sampler = build("sampler", {"kind": "first_hitting", "tokens_per_call": 2})
    output = run(sampler, model, jax.random.PRNGKey(0), given, 64)
    assert int(output.num_function_evals) == 2
    assert np.all(np.asarray(output.tokens)[np.asarray(fixed_mask)] == 0)


def test_first_hitting_with_several_tokens_per_call_is_exact_for_independent_positions(models):
    """Unmasking two positions from one prediction is exact when positions are independent
    (2^13 samples, chi-square false-alarm rate 1e-3), and measurably wrong on parity,
    where the last two positions must agree (samples of probability 0 appear)."""
    sampler = build("sampler", {"kind": "first_hitting", "tokens_per_call": 2})
    result = kit.check_sampler(
        sampler, models[0]["independent"], models[1]["independent"], key=jax.random.PRNGKey(1), num_samples=2**13
    )
    assert result.passed, result
    assert result.numbers["num_function_evals"] == 2
    wrong = kit.check_sampler(
        sampler, models[0]["parity"], models[1]["parity"], key=jax.random.PRNGKey(1), num_samples=2**13
    )
    assert not wrong.passed and wrong.numbers["impossible"] > 0, wrong


def test_first_hitting_is_exact_where_grid_samplers_are_not(models):
    """The parity toy punishes two positions unmasked in one step (the result can have
    probability 0); first-hitting unmasks one at a time (2^13 samples, false alarm 1e-3)."""
    result = kit.check_sampler(
        build("sampler", "first_hitting"), models[0]["parity"], models[1]["parity"],
        key=jax.random.PRNGKey(2), num_samples=2**13,
    )
    assert result.passed and result.numbers["impossible"] == 0, result
    assert result.numbers["num_function_evals"] == D  # one call per token


def test_time_of_alpha_inverts_the_schedule():
    for spec in ("linear", "cosine", {"kind": "poly", "power": 3}, "geometric"):
        schedule = ddiff.build_component("schedule", spec)
        times = jnp.linspace(0.0, 1.0, 11)
        alphas = jax.vmap(schedule.alpha)(times)
        recovered = jax.vmap(schedule.alpha)(ddiff.time_of_alpha(schedule, alphas))
        np.testing.assert_allclose(recovered, alphas, atol=2e-6)


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    log_probs = jnp.log(jnp.asarray([[0.15, 0.5, 0.05, 0.3]]))
    np.testing.assert_allclose(jnp.exp(ddiff.TopP(top_p=0.8)(log_probs)), [[0, 0.625, 0, 0.375]], atol=1e-6)
    np.testing.assert_allclose(
        jnp.exp(ddiff.TopP(top_p=0.81)(log_probs)), [[0.15 / 0.95, 0.5 / 0.95, 0, 0.3 / 0.95]], atol=1e-6
    )
    np.testing.assert_allclose(jnp.exp(ddiff.TopP(top_p=1.0)(log_probs)), jnp.exp(log_probs), atol=1e-6)
    one_hot = jnp.log(jnp.asarray([[0.0, 1.0, 0.0, 0.0]]))
    np.testing.assert_allclose(jnp.exp(ddiff.TopP(top_p=0.5)(one_hot)), [[0, 1, 0, 0]])


def test_top_p_with_a_tiny_nucleus_draws_the_mode(models):
    """Independent positions: mu is each position's marginal, so top_p -> 0 gives its mode."""
    toy = models[1]["independent"]
    probs = toy.probabilities().reshape((V,) * D)
    modes = [int(np.argmax(probs.sum(axis=tuple(a for a in range(D) if a != n)))) for n in range(D)]
    sampler = build("sampler", {"kind": "top_p", "steps": 16, "top_p": 1e-6})
    output = run(sampler, models[0]["independent"], jax.random.PRNGKey(0), ddiff.Conditioning(), 256)
    # From all-mask (no random token from the prior draw) every sample is the modes.
    assert np.all(np.asarray(output.tokens) == modes)


def test_guidance_moves_samples_towards_the_class(models):
    """p(c = 0 | x) under the exact posterior, averaged over 2^11 samples given label 0:
    higher with guidance w = 3 than without, by more than 5 standard errors."""
    model, toy = models[0]["classes"], models[1]["classes"]
    sampler = build("sampler", "first_hitting")
    labels = jnp.zeros((2**11,), jnp.int32)
    log_joint = np.asarray(toy.class_log_probs)[:, None] + np.asarray(toy.log_probs)
    posterior = np.exp(log_joint[0] - np.logaddexp(log_joint[0], log_joint[1]))
    powers = V ** np.arange(D - 1, -1, -1)
    scores = {}
    for weight in (0.0, 3.0):
        output = run(sampler, model, jax.random.PRNGKey(3), ddiff.Conditioning(labels=labels, guidance=weight), 2**11)
        scores[weight] = posterior[np.asarray(output.tokens) @ powers]
        assert int(output.num_function_evals) == D * (2 if weight else 1)
    difference = scores[3.0].mean() - scores[0.0].mean()
    error = math.hypot(scores[3.0].std(), scores[0.0].std()) / math.sqrt(2**11)
    assert difference > 5 * error, (difference, error)


@pytest.mark.parametrize(
    ("spec", "time_conditioned"),
    [
        ({"kind": "ancestral", "steps": 6, "grid": "cosine"}, True),
        ({"kind": "first_hitting", "tokens_per_call": 2}, True),
    ],
)
def test_samplers_with_a_transformer_labels_guidance_and_infill(process, spec, time_conditioned):
    """A time-conditioned network sees per-example times under first-hitting sampling. (The
    cached sampler with a time-independent transformer runs in test_cli_sample.py.)"""
    network = ddiff.build_component(
        "network", {"kind": "transformer", "dim": 16, "depth": 1, "heads": 2, "time_conditioned": time_conditioned}
    ).build(num_states=V + 1, num_outputs=V, seq_len=D, num_classes=2, key=jax.random.PRNGKey(0))
    model = ddiff.DiffusionModel(network=network, parameterization=build("parameterization", "mean"), process=process)
    fixed_mask = jnp.asarray([[True, False, False, True]] * 8)
    conditioning = ddiff.Conditioning(
        labels=jnp.arange(8, dtype=jnp.int32) % 2,
        fixed_tokens=jnp.full((8, D), 2, jnp.int32),
        fixed_mask=fixed_mask,
        guidance=1.5,
    )
    output = run(build("sampler", spec), model, jax.random.PRNGKey(1), conditioning, 8)
    tokens = np.asarray(output.tokens)
    assert tokens.shape == (8, D) and tokens.min() >= 0 and tokens.max() < V
    assert np.all(tokens[:, [0, 3]] == 2)
    assert int(output.num_function_evals) % 2 == 0 and int(output.num_function_evals) > 0
