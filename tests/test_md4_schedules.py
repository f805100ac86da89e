"""MD4 schedules: monotone, the paper's end points, closed-form derivatives."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ddiff_plugins import masked, md4, sedd

import ddiff
from ddiff import capabilities as caps

EPS = masked.EPS
SPECS = {
    "linear": {"kind": "linear"},
    "cosine": {"kind": "cosine"},
    "poly2": {"kind": "poly", "power": 2},
    "poly3": {"kind": "poly", "power": 3},
    "poly0.5": {"kind": "poly", "power": 0.5},
    "geometric": {"kind": "geometric"},
    "loglinear": {"kind": "loglinear"},
}
# alpha(0) and alpha(1) in exact arithmetic: (1 - 2 eps) a(t) + eps for MD4's shapes;
# SEDD's exp(-sigma_bar) for geometric, 1 - (1 - 1e-3) tau on tau in [1e-3, 1] for loglinear.
END_POINTS = {
    "linear": (1 - EPS, EPS),
    "cosine": (1 - EPS, EPS),
    "poly2": (1 - EPS, EPS),
    "poly3": (1 - EPS, EPS),
    "poly0.5": (1 - EPS, EPS),
    "geometric": (math.exp(-1e-4), math.exp(-20.0)),
    "loglinear": (1 - (1 - 1e-3) * 1e-3, 1e-3),
}
GRID = jnp.linspace(0.0, 1.0, 2001)


@pytest.fixture(scope="module", params=list(SPECS))
def schedule(request):
    return request.param, ddiff.build_component("schedule", SPECS[request.param])


def test_every_registered_scalar_schedule_is_covered():
    """Per-value schedules (GenMD4's ``learnable_poly``) are tested in test_genmd4.py,
    D3PM's beta schedules (alpha(0) = 1 and alpha(1) = 0 exactly) in test_d3pm.py, and
    schedules of other installed packages (examples/) by their own tests."""
    registry = ddiff.default_registry()
    scalar = {
        e.name
        for e in registry
        if e.slot == "schedule" and e.plugin != "d3pm" and e.cls.__module__.startswith("ddiff_plugins.")
        and caps.SCALAR in registry.get("schedule", e.name).provides
    }
    assert scalar <= {s["kind"] for s in SPECS.values()}


def test_alpha_is_decreasing_between_its_end_points(schedule):
    name, schedule = schedule
    alpha = np.asarray(jax.vmap(schedule.alpha)(GRID), np.float64)
    # float32 evaluation: allow one ulp of 1.0 of non-monotonicity.
    assert np.all(np.diff(alpha) <= 1.2e-7), name
    at_zero, at_one = END_POINTS[name]
    assert 0 < at_one and at_zero < 1, name
    assert alpha.min() >= at_one - 1e-7 and alpha.max() <= at_zero + 1e-7, name


def test_end_points(schedule):
    name, schedule = schedule
    at_zero, at_one = END_POINTS[name]
    assert float(schedule.alpha(jnp.zeros(()))) == pytest.approx(at_zero, abs=2e-7)
    assert float(schedule.alpha(jnp.ones(()))) == pytest.approx(at_one, abs=2e-7)


def test_derivative_matches_autodiff(schedule):
    name, schedule = schedule
    inner = GRID[1:-1]  # poly with power < 1 has an infinite slope at t = 0
    closed = jax.vmap(schedule.alpha_derivative)(inner)
    automatic = jax.vmap(jax.grad(schedule.alpha))(inner)
    np.testing.assert_allclose(closed, automatic, rtol=2e-5, atol=2e-5, err_msg=name)
    assert np.all(np.asarray(closed) <= 0.0), name


def test_elbo_weight_and_total_noise(schedule):
    name, schedule = schedule
    t = jnp.asarray(0.37)
    alpha, derivative = schedule.alpha(t), schedule.alpha_derivative(t)
    assert float(md4.elbo_weight(schedule, t)) == pytest.approx(float(derivative / (1 - alpha)), rel=1e-5)
    assert float(sedd.noise_rate(schedule, t)) == pytest.approx(float(-derivative / alpha), rel=1e-5)
    assert float(sedd.total_noise(schedule, t)) == pytest.approx(-math.log(float(alpha)), rel=1e-5)


def test_closed_forms_against_the_papers():
    """Spot values of each schedule (MD4 Table 1; SEDD's noise_lib), float64 reference."""
    t = 0.3
    clip = lambda a: (1 - 2 * EPS) * a + EPS  # noqa: E731
    expected = {
        "linear": clip(1 - t),
        "cosine": clip(1 - math.cos(math.pi / 2 * (1 - t))),
        "poly3": clip(1 - t**3),
        "geometric": math.exp(-(1e-4 ** (1 - t)) * 20.0**t),
        "loglinear": math.exp(math.log1p(-(1 - 1e-3) * (1e-3 + (1 - 1e-3) * t))),
    }
    for name, value in expected.items():
        schedule = ddiff.build_component("schedule", SPECS[name])
        assert float(schedule.alpha(jnp.asarray(t))) == pytest.approx(value, rel=1e-6), name


def test_poly_power_from_recipe_and_bad_arguments():
    schedule = ddiff.build_component("schedule", {"kind": "poly", "power": 4})
    assert schedule.power == 4.0
    with pytest.raises(ddiff.RecipeError, match="power must be positive"):
        ddiff.build_component("schedule", {"kind": "poly", "power": 0})
    with pytest.raises(ddiff.RecipeError, match="sigma_min < sigma_max"):
        ddiff.build_component("schedule", {"kind": "geometric", "sigma_min": 2.0, "sigma_max": 1.0})
    with pytest.raises(ddiff.RecipeError, match=r"eps must be in \[0, 0.5\)"):
        ddiff.build_component("schedule", {"kind": "linear", "eps": 0.7})
