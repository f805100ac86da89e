"""Every built-in sampler draws sample i from its own key only (the sampler protocol), so
a sample does not depend on the batch it is drawn in: changing the keys of the other
samples leaves it bit for bit the same. (tests/test_mesh.py checks the trainer's samples
on 1 and 8 devices and in batches of 4 and 8.)"""

import equinox as eqx
import jax
import numpy as np
import pytest

import ddiff
from ddiff.testing import Setup

MASKED = Setup()
GENMD4 = Setup(process={"kind": "masked", "schedule": {"kind": "learnable_poly", "initial_powers": [0.7, 1.5, 3.0]}})
UNIFORM = Setup(process={"kind": "uniform", "schedule": {"kind": "geometric"}}, parameterization="x0")

# One sampler per way of drawing (the others share their sampler's loop and draws: top_p,
# cached and ancestral the grid loop of `two_draw`, whose own draw splits each sample's key;
# analytic the score loop of euler; tau_leaping the loop of tau_leaping_pc without its
# correctors). The trainer's ancestral samples are checked on meshes in test_mesh.py.
SAMPLERS = {
    "two_draw": (MASKED, {"steps": 4}),
    "first_hitting": (MASKED, {"tokens_per_call": 2}),
    "genmd4_ancestral": (GENMD4, {"steps": 4}),
    "d3pm_ancestral": (UNIFORM, {"steps": 4}),
    "euler": (UNIFORM, {"steps": 4}),
    "tau_leaping_pc": (MASKED, {"steps": 4, "corrector_entry_time": 1.0}),
}


@eqx.filter_jit
def _tokens(sampler, model, keys):
    return sampler.sample(model, keys=keys, seq_len=4, conditioning=ddiff.Conditioning()).tokens


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_a_sample_depends_on_its_own_key_only(name):
    setup, arguments = SAMPLERS[name]
    model = setup.oracle(setup.toys()["markov"])
    sampler = setup.build("sampler", {"kind": name, **arguments})
    keys = ddiff.sample_keys(jax.random.PRNGKey(0), 0, 8)
    others = keys.at[4:].set(ddiff.sample_keys(jax.random.PRNGKey(1), 4, 4))
    first, second = np.asarray(_tokens(sampler, model, keys)), np.asarray(_tokens(sampler, model, others))
    np.testing.assert_array_equal(first[:4], second[:4])
    assert (first[4:] != second[4:]).any(), "the other keys must change the other samples"
