"""The sigmoid schedule: closed forms, recipe errors, and MD4's bound on it through the
conformance kit.

Kit sizes are small so that the package's tests take seconds: 2^12 examples per mean,
tolerance z = 4 standard errors (false alarm 6.3e-5 per comparison).
"""

# --8<-- [start:closed-form]
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddiff
from ddiff.testing import Setup, objective_checks
from ddiff_sigmoid_schedule import SigmoidSchedule

TIMES = jnp.linspace(0.0, 1.0, 101)
SETTINGS = [
    {},
    {"start": 0.0, "end": 3.0, "tau": 0.3},
    {"start": -3.0, "end": 3.0, "tau": 1.1, "eps": 0.0},
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_end_points_and_monotone(settings):
    schedule = SigmoidSchedule(**settings)
    alpha = np.asarray(jax.vmap(schedule.alpha)(TIMES))
    eps = schedule.eps
    np.testing.assert_allclose([alpha[0], alpha[-1]], [1.0 - eps, eps], atol=1e-6)
    assert np.all(np.diff(alpha) < 0)


@pytest.mark.parametrize("settings", SETTINGS)
def test_derivative_is_that_of_alpha(settings):
    # The closed form against forward-mode differentiation of alpha itself.
    schedule = SigmoidSchedule(**settings)
    closed = jax.vmap(schedule.alpha_derivative)(TIMES)
    automatic = jax.vmap(lambda t: jax.jvp(schedule.alpha, (t,), (jnp.ones_like(t),))[1])(TIMES)
    np.testing.assert_allclose(closed, automatic, rtol=1e-4, atol=1e-6)


def test_bad_settings_name_the_key():
    with pytest.raises(ddiff.RecipeError, match="tau must be positive"):
        SigmoidSchedule(tau=0.0)
    with pytest.raises(ddiff.RecipeError, match="end must be greater than start"):
        SigmoidSchedule(start=1.0, end=1.0)


# --8<-- [end:closed-form]


# --8<-- [start:registered]
def test_registered_through_the_entry_point():
    entry = ddiff.default_registry().entry("schedule", "sigmoid")
    assert entry.cls is SigmoidSchedule
    assert entry.plugin == "sigmoid_schedule"


# --8<-- [end:registered]


# --8<-- [start:kit]
SIGMOID = Setup(
    process={
        "kind": "masked",
        "schedule": {"kind": "sigmoid", "start": 0.0, "end": 3.0, "tau": 0.3},
    },
    num_examples=2**12,
)
MD4_ELBO = objective_checks("md4_elbo", SIGMOID)


@pytest.mark.parametrize("check", ["tight[markov]", "tight[parity]"])
def test_md4_elbo_is_tight_on_the_sigmoid_schedule(check):
    MD4_ELBO[check]().raise_if_failed()


# --8<-- [end:kit]
