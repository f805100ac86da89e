"""The tempered sampler: the tempering itself, the conformance kit at T = 1, the exact
law of its output at T = 1/2 on a toy whose positions are independent, and the same
sampler written as a step rule on ddiff's driver, bit for bit.

Kit sizes are small so that the package's tests take seconds: 2^11 samples per
chi-square test at false-alarm rate 1e-3.
"""

# --8<-- [start:temper]
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddiff
from ddiff.testing import Setup, chi_square_test, independent_toy, oracle_model, sampler_conformance
from ddiff_tempered_sampler import Tempered, TemperedAncestralSampler, temper

LOG_MEAN = jnp.log(jnp.array([[0.2, 0.5, 0.3], [0.0, 1.0, 0.0]]))


def test_temper_is_a_power_of_the_mean():
    expected = np.array([[0.2, 0.5, 0.3], [0.0, 1.0, 0.0]]) ** 2
    expected /= expected.sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(jnp.exp(temper(LOG_MEAN, 0.5)), expected, rtol=1e-6)
    np.testing.assert_allclose(jnp.exp(temper(LOG_MEAN, 1.0)), jnp.exp(LOG_MEAN), rtol=1e-6)


def test_temperature_zero_is_greedy():
    np.testing.assert_array_equal(jnp.exp(temper(LOG_MEAN, 0.0)), [[0, 1, 0], [0, 1, 0]])


def test_negative_temperature_names_the_key():
    with pytest.raises(ddiff.RecipeError, match="temperature must be >= 0"):
        TemperedAncestralSampler(temperature=-1.0)
    with pytest.raises(
        ddiff.RecipeError, match=r"sampler\.transforms\[0\]\.temperature: temperature must be >= 0"
    ):
        Setup().build(
            "sampler",
            {"kind": "ancestral", "transforms": [{"kind": "tempered", "temperature": -1.0}]},
        )


# --8<-- [end:temper]


# --8<-- [start:kit]
# At T = 1 the sampler is ancestral sampling, exact as the steps grow: 128 steps are below
# the chi-square test's resolution (as for the built-in `ancestral`).
test_tempered_ancestral = sampler_conformance(
    "tempered_ancestral", Setup(num_samples=2**11), steps=128, temperature=1.0
)
# --8<-- [end:kit]


# --8<-- [start:law]
def test_output_law_at_half_temperature():
    # With independent positions, the exact denoiser at a masked position is that
    # position's marginal p_n whatever else is revealed, so every draw comes from
    # p_n^2 / sum_v p_n[v]^2 and the output law is their product, exactly.
    toy = independent_toy(3, 4, seed=0)
    setup = Setup()
    model = oracle_model(toy, setup.process_with(), setup.build("parameterization", "mean"))
    sampler = setup.build(
        "sampler", {"kind": "tempered_ancestral", "steps": 16, "temperature": 0.5}
    )
    keys = ddiff.sample_keys(jax.random.PRNGKey(0), 0, 2**11)
    draw = jax.jit(
        lambda m, k: sampler.sample(m, keys=k, seq_len=4, conditioning=ddiff.Conditioning())
    )
    output = draw(model, keys)
    marginals = np.exp(np.asarray(toy.sequence_log_probs())).reshape(3, 3, 3, 3)
    tempered = [marginals.sum(axis=tuple(a for a in range(4) if a != n)) ** 2 for n in range(4)]
    tempered = [p / p.sum() for p in tempered]
    law = np.einsum("a,b,c,d->abcd", *tempered).ravel()
    counts = np.bincount(np.asarray(jax.vmap(toy.index)(output.tokens)), minlength=81)
    result = chi_square_test(counts, law)
    assert result["p_value"] > 1e-3, result


# --8<-- [end:law]


# --8<-- [start:step]
class HandWrittenTemperedSampler(ddiff.AbstractGridSampler):
    """The tempered sampler written out as a step rule on ddiff's driver: MD4 Alg. 2 from
    t to s, from the tempered mu that the driver's prediction returns."""

    requires = TemperedAncestralSampler.requires
    temperature: float = eqx.field(static=True, default=1.0)

    @property
    def transforms(self):
        return (Tempered(temperature=self.temperature),)

    def step(self, prediction, tokens, carry, t, s, *, keys):
        schedule, mask_id = prediction.model.process.schedule, prediction.model.process.mask_id
        log_mean, calls = prediction.log_mean(tokens, t)  # tempered, guided, labelled
        alpha_s, alpha_t = schedule.alpha(s), schedule.alpha(t)
        log_reveal = jnp.log(jnp.maximum(alpha_s - alpha_t, 0.0)) - jnp.log1p(-alpha_t)
        log_stay = jnp.log1p(-alpha_s) - jnp.log1p(-alpha_t)
        stay = jnp.broadcast_to(log_stay, (*log_mean.shape[:-1], 1))
        drawn = jax.vmap(ddiff.categorical)(
            keys, jnp.concatenate([log_reveal + log_mean, stay], axis=-1)
        )
        return jnp.where(tokens == mask_id, drawn, tokens), carry, calls


def test_the_step_rule_is_the_same_sampler():
    setup = Setup()
    model = setup.oracle(setup.toys()["markov"])
    keys = ddiff.sample_keys(jax.random.PRNGKey(3), 0, 64)
    draw = eqx.filter_jit(
        lambda s, m: s.sample(m, keys=keys, seq_len=4, conditioning=ddiff.Conditioning())
    )
    by_transform = draw(TemperedAncestralSampler(steps=8, temperature=0.5), model)
    by_step = draw(HandWrittenTemperedSampler(steps=8, temperature=0.5), model)
    np.testing.assert_array_equal(by_step.tokens, by_transform.tokens)
    assert int(by_step.num_function_evals) == int(by_transform.num_function_evals)


# --8<-- [end:step]
