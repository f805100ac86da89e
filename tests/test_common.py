"""The shared components and core helpers against independent computations: the uniform
process (closed forms, Kolmogorov's forward equation, sampling), scores read from a
mean (closed forms against the generic enumeration and against the exact score), rates
into a state, the x0 parameterization, and constants the trainer never trains."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import ddiff
import ddiff.runner
import ddiff.testing as kit
from ddiff.runner.checkpoint import (
    checkpoint_manager,
    finish_saving,
    restore_latest,
    save_checkpoint,
)
from ddiff.runner.mesh import MeshConfig, make_mesh, tree_specs

V, D = 3, 4


class _PerValueSchedule(ddiff.AbstractSchedule):
    """alpha_t[v] = 1 - (1 - 1e-3) t^{w_v}, a fixed per-value schedule for the tests."""

    powers: jax.Array

    provides = frozenset({ddiff.capabilities.PER_VALUE})

    def alpha(self, t):
        return 1.0 - (1.0 - 1e-3) * t**self.powers


def _build(process, schedule="cosine"):
    return ddiff.build_component("process", {"kind": process, "schedule": schedule}, vocab_size=V, seq_len=D)


@pytest.fixture(scope="module")
def processes():
    masked = _build("masked")
    per_value = eqx.tree_at(lambda p: p.schedule, masked, _PerValueSchedule(jnp.array([0.5, 1.0, 3.0])))
    return {"uniform": _build("uniform"), "masked": masked, "masked_per_value": per_value}


def test_uniform_marginals_transitions_and_prior():
    # Closed forms against dense matrices built from the definition (float32, 1e-6).
    process = _build("uniform")
    s, t = jnp.asarray(0.2), jnp.asarray(0.7)
    alpha_s, alpha_t = process.schedule.alpha(s), process.schedule.alpha(t)
    x0 = jnp.array([0, 1, 2, 1])
    dense_t = alpha_t * jnp.eye(V) + (1 - alpha_t) / V
    np.testing.assert_allclose(process.marginal_probs(x0, t), dense_t[x0], rtol=1e-6)
    r = alpha_t / alpha_s
    step = r * jnp.eye(V) + (1 - r) / V
    np.testing.assert_allclose(process.transition_probs(x0, s, t), step[x0], rtol=1e-6)
    np.testing.assert_allclose(process.transition_likelihood(x0, s, t), step[:, x0].T, rtol=1e-6)
    via = process.propagate(process.marginal_probs(x0, s), s, t)
    np.testing.assert_allclose(via, process.marginal_probs(x0, t), rtol=1e-5)
    np.testing.assert_allclose(process.prior_probs(), jnp.full(V, 1 / V))
    # KL(q(x_1|x_0) || uniform) by hand, with a schedule that leaves alpha_1 = e^-1.
    process = _build("uniform", {"kind": "geometric", "sigma_max": 1.0})
    q1 = process.marginal_probs(x0, jnp.ones(()))
    assert float(q1[0, 0]) > 0.5
    expected = float(jnp.sum(q1 * jnp.log(q1 * V)))
    assert float(process.prior_kl(x0)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["uniform", "masked", "masked_per_value"])
def test_rates_satisfy_kolmogorov_and_incoming_rates_match(processes, name):
    # d/dt q_t = q_t R_t by central differences (h = 1e-3, tolerance 1e-3); rows sum to 0;
    # the closed-form incoming rates equal the generic construction from forward_rates.
    process = processes[name]
    x0 = jnp.array([0, 2, 1])
    t, h = 0.4, 1e-3
    derivative = (process.marginal_probs(x0, jnp.asarray(t + h)) - process.marginal_probs(x0, jnp.asarray(t - h))) / (2 * h)
    q = process.marginal_probs(x0, jnp.asarray(t))
    states = jnp.arange(process.num_states)
    rates = jax.vmap(lambda s: process.forward_rates(jnp.array([s]), jnp.asarray(t))[0])(states)
    np.testing.assert_allclose(q @ rates, derivative, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(rates.sum(-1), 0.0, atol=1e-5)
    x = jnp.arange(process.num_states)
    generic = ddiff.AbstractRateProcess.incoming_rates(process, x, jnp.asarray(t))
    np.testing.assert_allclose(process.incoming_rates(x, jnp.asarray(t)), generic, rtol=1e-6)
    np.testing.assert_allclose(generic, rates[:, x].T, rtol=1e-6)


def test_uniform_sampling_frequencies():
    # 60,000 positions from x_0 = 1: every value's frequency within 5 standard errors.
    process = _build("uniform")
    t = jnp.asarray(0.5)
    x_t = process.sample_marginal(jnp.ones(60_000, jnp.int32), t, key=jax.random.PRNGKey(0))
    expected = np.asarray(process.marginal_probs(jnp.array([1]), t))[0]
    observed = np.bincount(np.asarray(x_t), minlength=V) / x_t.size
    se = np.sqrt(expected * (1 - expected) / x_t.size)
    assert np.all(np.abs(observed - expected) < 5 * se), (observed, expected)
    prior = process.sample_prior(60_000, key=jax.random.PRNGKey(1))
    assert np.all(np.abs(np.bincount(np.asarray(prior), minlength=V) / 60_000 - 1 / V) < 5 * math.sqrt(2 / 9 / 60_000))


@pytest.mark.parametrize("name", ["uniform", "masked", "masked_per_value"])
def test_score_from_exact_mean_is_the_exact_score(processes, name):
    """s[n, y] = sum_v p(x_0^n = v | x_t) q(y | v) / q(x_t^n | v) is exact for any data
    wherever every clean value v can produce x_t^n, so there the closed form fed the exact
    denoiser must equal the enumerated score (markov toy, 4 draws, relative tolerance
    1e-4); everywhere, the closed form equals the generic enumeration over clean values for
    an arbitrary (non-exact) mean."""
    process = processes[name]
    toy = kit.markov_toy(V, D)
    t = jnp.asarray(0.75)
    key = jax.random.PRNGKey(3)
    compared = 0
    for i in range(4):
        x0, _ = toy.sample(jax.random.fold_in(key, i), 1)
        x_t = process.sample_marginal(x0[0], t, key=jax.random.fold_in(key, 100 + i))
        log_mean = kit.exact_log_denoiser(toy, process, x_t, t)
        exact = kit.exact_log_score(toy, process, x_t, t)
        closed = process.log_score_from_mean(log_mean, x_t, t)
        # Exact where every clean value can produce x_t^n (all of the uniform process,
        # the masked positions of the masked one).
        every = np.asarray(jnp.all(process.marginal_probs(jnp.arange(V), t)[:, x_t] > 0, axis=0))
        compared += int(every.sum())
        np.testing.assert_allclose(np.exp(closed)[every], np.exp(exact)[every], rtol=1e-4, atol=1e-7)
        arbitrary = jax.nn.log_softmax(jax.random.normal(jax.random.fold_in(key, 200 + i), (D, V)))
        generic = ddiff.AbstractForwardProcess.log_score_from_mean(process, arbitrary, x_t, t)
        closed = process.log_score_from_mean(arbitrary, x_t, t)
        np.testing.assert_allclose(np.exp(closed), np.exp(generic), rtol=1e-4, atol=1e-7)
    assert compared >= 4


def test_x0_parameterization_and_mean_needs_a_masked_process(registry):
    x0 = ddiff.build_component("parameterization", "x0", registry=registry)
    process = _build("uniform")
    output = jnp.arange(D * V, dtype=jnp.float32).reshape(D, V)
    log_mean = x0.log_mean(output, jnp.array([0, 1, 2, 0]), jnp.asarray(0.5), process)
    np.testing.assert_allclose(jnp.exp(log_mean).sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(log_mean, jax.nn.log_softmax(output), rtol=1e-6)
    raw = ddiff.runner.read_recipe_file("recipes/quickstart.yaml")
    raw = ddiff.runner.apply_overrides(raw, ["process.kind=uniform"], "q")
    with pytest.raises(ddiff.IncompatibleComponentsError, match="masked"):
        ddiff.runner.build_recipe(raw, source="q.yaml", registry=registry)


class _WithTable(eqx.Module):
    step: jax.Array
    weight: jax.Array
    table: ddiff.Constant


def test_constants_are_not_trained_sharded_or_checkpointed(tmp_path):
    module = _WithTable(step=jnp.int32(3), weight=jnp.ones((4, 256)), table=ddiff.Constant(jnp.arange(4096.0).reshape(16, 256)))
    params, rest = ddiff.partition_trainable(module)
    assert params.table is None and rest.table is module.table
    assert jax.tree.leaves(ddiff.trainable(module)) == [module.weight]
    assert eqx.tree_equal(eqx.combine(params, rest), module)
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    specs = tree_specs(module, mesh)
    assert specs.weight == P(None, "fsdp") and specs.table.value == P()
    # A checkpoint holds the trainable array only; the constant comes back from the template.
    manager = checkpoint_manager(tmp_path, keep=1)
    save_checkpoint(manager, module, {"position": 0})
    finish_saving(manager)
    template = _WithTable(step=jnp.int32(0), weight=jnp.zeros((4, 256)), table=ddiff.Constant(-jnp.ones((16, 256))))
    restored, data, step = restore_latest(manager, template)
    np.testing.assert_array_equal(restored.weight, module.weight)
    np.testing.assert_array_equal(restored.table.value, template.table.value)
    assert step == 3
