"""The tempered sampler: the tempering itself, the conformance kit at T = 1, and the exact
law of its output at T = 1/2 on a toy whose positions are independent.

Kit sizes are small so that the package's tests take seconds: 2^11 samples per
chi-square test at false-alarm rate 1e-3.
"""

# --8<-- [start:temper]
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddiff
from ddiff.testing import Setup, chi_square_test, independent_toy, oracle_model, sampler_conformance
from ddiff_tempered_sampler import TemperedAncestralSampler, temper

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
