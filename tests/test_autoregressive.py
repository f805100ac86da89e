"""The autoregressive family: its likelihood is exact (checked by enumerating all V^D
sequences), its network is causal, and its capabilities keep it apart from masked
diffusion (the kit's lines are in test_conformance.py)."""

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ddiff_plugins import autoregressive

import ddiff
import ddiff.runner
import ddiff.testing as kit

V, D = 3, 4


def build(slot, spec, **context):
    return ddiff.build_component(slot, spec, vocab_size=V, seq_len=D, **context)


@pytest.fixture(scope="module")
def parts():
    process = build("process", "left_to_right")
    parameterization = build("parameterization", "next_token")
    network = build("network", {"kind": "causal_transformer", "dim": 16, "depth": 2, "heads": 2}).build(
        num_states=V + 1, num_outputs=V, seq_len=D, num_classes=0, key=jax.random.PRNGKey(0)
    )
    model = ddiff.DiffusionModel(network=network, parameterization=parameterization, process=process)
    sequences = jnp.asarray(list(itertools.product(range(V), repeat=D)), jnp.int32)
    return process, parameterization, model, sequences


@eqx.filter_jit
def _nll(objective, model, x0):
    return objective.per_example_terms(model, x0, key=jax.random.PRNGKey(0), train=False).nelbo


def test_the_process_reveals_a_prefix():
    process = build("process", "left_to_right")
    x0 = jnp.asarray([2, 0, 1, 2])
    for visible in range(D + 1):
        t = jnp.asarray(1.0 - visible / D, jnp.float32)
        state = jnp.argmax(process.marginal_probs(x0, t), axis=-1)
        assert state.tolist() == [*x0.tolist()[:visible], *[V] * (D - visible)]
    assert float(process.prior_kl(x0)) == 0.0 and float(process.reconstruction_nll(x0)) == 0.0


def test_an_untrained_model_is_a_normalised_distribution_computed_in_one_call(parts):
    """exp(-nll) summed over all 81 sequences is 1 (the likelihood is exact, not a bound),
    and the one-call path of a causal network equals the D-call path that evaluates each
    prefix state with the later positions masked (so no output sees its own or a later
    input), to float32 precision."""
    process, parameterization, model, sequences = parts
    objective = build("objective", "next_token_nll")
    one_call = np.asarray(_nll(objective, model, sequences), np.float64)
    assert abs(np.exp(-one_call).sum() - 1.0) < 1e-5

    @eqx.filter_jit
    def prefix_rows(model, x0):
        def row(n):
            state = autoregressive.prefix_state(x0, n, V)
            return model.log_mean(state, 1.0 - n / D)[n, x0[n]]

        return -jnp.sum(jax.vmap(row)(jnp.arange(D)))

    each = np.asarray(jax.vmap(lambda x: prefix_rows(model, x))(sequences), np.float64)
    np.testing.assert_allclose(one_call, each, atol=1e-5)


def test_the_oracle_likelihood_is_the_data_log_probability(parts):
    """With the exact denoiser of the left-to-right process the objective is -log p(x) for
    every sequence of the markov toy (its D-call path), within 1e-4 nats."""
    process, parameterization, _, sequences = parts
    toy = kit.markov_toy(V, D)
    oracle = kit.oracle_model(toy, process, parameterization)
    nll = np.asarray(_nll(build("objective", "next_token_nll"), oracle, sequences), np.float64)
    np.testing.assert_allclose(nll, -np.asarray(toy.sequence_log_probs(), np.float64), atol=1e-4)


def test_capabilities_refuse_nonsense_pairings():
    base = {
        "data": {"kind": "toy", "toy": "markov", "num_train": 8, "num_eval": 8},
        "process": "left_to_right",
        "parameterization": "next_token",
        "network": {"kind": "causal_transformer", "dim": 8, "depth": 1, "heads": 2},
        "objective": "next_token_nll",
        "sampler": "left_to_right",
    }
    ddiff.runner.build_recipe(base, source="ar.yaml")
    masked = {"kind": "masked", "schedule": "linear"}
    refused = [
        ({"objective": "md4_elbo"}, "objective 'md4_elbo'"),
        ({"sampler": "ancestral"}, "sampler 'ancestral'"),
        ({"sampler": {"kind": "confidence"}}, "sampler 'confidence'"),
        ({"process": masked}, "left_to_right"),
        ({"process": masked, "parameterization": "mean", "objective": "md4_elbo"}, "sampler 'left_to_right'"),
    ]
    for change, named in refused:
        with pytest.raises(ddiff.IncompatibleComponentsError) as error:
            ddiff.runner.build_recipe({**base, **change}, source="ar.yaml")
        assert named in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_sampler_keeps_a_given_prefix_and_skips_its_calls(parts):
    """A given prefix of two positions costs no network call: D - 2 evaluations."""
    _, _, model, _ = parts
    sampler = build("sampler", "left_to_right")
    given = ddiff.Conditioning(
        fixed_tokens=jnp.full((8, D), 2, jnp.int32), fixed_mask=jnp.asarray([[True, True, False, False]] * 8)
    )
    output = eqx.filter_jit(
        lambda model, keys: sampler.sample(model, keys=keys, seq_len=D, conditioning=given)
    )(model, ddiff.sample_keys(jax.random.PRNGKey(0), 0, 8))
    tokens = np.asarray(output.tokens)
    assert np.all(tokens[:, :2] == 2) and tokens.max() < V
    assert int(output.num_function_evals) == D - 2
