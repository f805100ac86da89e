"""D3PM's schedules (Austin et al. 2021): alpha(i/T) = prod_{j <= i} (1 - beta_j) on a grid of T steps."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import ddiff
from ddiff import capabilities as caps
from ddiff_plugins.d3pm._grid import _grid_problem

GRID_TOLERANCE = 1e-3
"""A time t with |t T - round(t T)| below this many steps is read as the grid time
round(t T) / T (float32 times i/T are not exact)."""


def log_matmul(log_a: jax.Array, log_b: jax.Array) -> jax.Array:
    """log(exp(log_a) @ exp(log_b)) for log_a (n, k) and log_b (k, m), exact however small
    the terms: for every output a maximum and a sum of exponentials over k (the maximum
    held constant for the gradient), -inf where every term is -inf. Rows of log_a are
    processed in chunks so that at most ~2^22 terms exist at once."""
    size = log_b.shape[0] * log_b.shape[1]

    def one_row(row):
        terms = row[:, None] + log_b  # (k, m)
        peak = jax.lax.stop_gradient(jnp.max(terms, axis=0))
        finite = jnp.isfinite(peak)
        peak = jnp.where(finite, peak, 0.0)
        total = jnp.sum(jnp.exp(terms - peak[None, :]), axis=0)
        return jnp.where(finite, peak + ddiff.safe_log(total), -jnp.inf)

    chunk = max(1, min(log_a.shape[0], (1 << 22) // size))
    return jax.lax.map(one_row, log_a, batch_size=chunk)


def _grid_index(t: jax.Array, steps: int) -> jax.Array:
    """round(t T) as an int32 in 0..T."""
    return jnp.clip(jnp.round(t * steps), 0, steps).astype(jnp.int32)


# --------------------------------------------------------------------------- schedules


class JSDSchedule(ddiff.AbstractSchedule):
    """beta_i = 1 / (T - i + 1) (Sohl-Dickstein et al. 2015; D3PM sec. 3.2 and App. A.6):
    its product telescopes to alpha(i/T) = 1 - i/T for every T, so alpha(t) = 1 - t
    exactly, from alpha(0) = 1 to alpha(1) = 0. For the absorbing process it is the
    mutual-information schedule (D3PM App. A.7), the schedule of D3PM-absorbing.
    """

    provides = frozenset({caps.SCALAR})

    def alpha(self, t: ddiff.Time) -> ddiff.ScheduleValue:
        return 1.0 - t

    def alpha_derivative(self, t: ddiff.Time) -> ddiff.ScheduleValue:
        return -jnp.ones_like(t)


class D3PMCosineSchedule(ddiff.AbstractSchedule):
    """The cosine schedule of D3PM-uniform (Hoogeboom et al. 2021; Nichol & Dhariwal 2021):

        alpha(t) = f(t) / f(0),  f(t) = cos(pi/2 (t + s) / (1 + s))^power,

    so beta_i = 1 - f(i/T) / f((i-1)/T) for any T. D3PM's reference code uses power 1
    (``alpha_bar = cos(...)``), Nichol & Dhariwal power 2. alpha(1) = 0 exactly; D3PM
    clips the last beta at 0.999, leaving alpha(1) ~ 1e-6 (a prior term of ~1e-6 nats).

    Attributes:
        offset: s, which keeps beta_1 from vanishing.
        power: the exponent of the cosine.
    """

    provides = frozenset({caps.SCALAR})
    offset: float = eqx.field(static=True, default=0.008)
    power: float = eqx.field(static=True, default=1.0)

    def __check_init__(self):
        if not self.offset > 0:
            raise ddiff.RecipeError(
                f"offset must be positive, got {self.offset}", path="offset"
            )
        ddiff.check_at_least("power", self.power)

    def _angle(self, t):
        return 0.5 * math.pi * (t + self.offset) / (1.0 + self.offset)

    def alpha(self, t: ddiff.Time) -> ddiff.ScheduleValue:
        # cos(pi/2) is -4e-8 in float32: clamp so that alpha(1) = 0.
        start = math.cos(0.5 * math.pi * self.offset / (1.0 + self.offset)) ** self.power
        return jnp.maximum(jnp.cos(self._angle(t)), 0.0) ** self.power / start

    def alpha_derivative(self, t: ddiff.Time) -> ddiff.ScheduleValue:
        start = math.cos(0.5 * math.pi * self.offset / (1.0 + self.offset)) ** self.power
        cosine = jnp.maximum(jnp.cos(self._angle(t)), 0.0)
        slope = 0.5 * math.pi / (1.0 + self.offset)
        return -self.power * cosine ** (self.power - 1.0) * jnp.sin(self._angle(t)) * slope / start


class D3PMLinearSchedule(ddiff.AbstractSchedule):
    """beta_i rising linearly from ``start`` to ``stop`` over T = ``steps`` steps (Ho et
    al. 2020; D3PM-Gauss: 1e-4 to 0.02, T = 1000, App. B.1).

    alpha(i/T) = prod_{j <= i} (1 - beta_j) is exact at the grid times (tabulated in
    float64 when built); between grid times log alpha is linear in t, so the schedule is
    defined, continuous and decreasing on all of [0, 1]. A discrete-time objective or
    sampler whose steps do not divide T is refused at load time (its times would fall
    between grid points).

    Attributes:
        steps: the number of steps T the betas are spread over.
        start: beta_1.
        stop: beta_T.
    """

    provides = frozenset({caps.SCALAR})
    steps: int = eqx.field(static=True)
    start: float = eqx.field(static=True)
    stop: float = eqx.field(static=True)
    log_alpha: ddiff.Constant

    def __init__(self, steps: int = 1000, start: float = 1e-4, stop: float = 0.02):
        ddiff.check_at_least("steps", steps)
        if not 0.0 < start <= stop < 1.0:
            raise ddiff.RecipeError(f"need 0 < start <= stop < 1, got start={start} and stop={stop}")
        self.steps, self.start, self.stop = steps, start, stop
        betas = np.linspace(start, stop, steps, dtype=np.float64)
        log_alpha = np.concatenate([[0.0], np.cumsum(np.log1p(-betas))])
        self.log_alpha = ddiff.Constant(jnp.asarray(log_alpha, jnp.float32))

    def _position(self, t):
        """t T, snapped to the nearest grid point within :data:`GRID_TOLERANCE`."""
        position = t * self.steps
        nearest = jnp.round(position)
        return jnp.where(jnp.abs(position - nearest) < GRID_TOLERANCE, nearest, position)

    def _interval(self, position):
        left = jnp.clip(jnp.floor(position), 0, self.steps - 1).astype(jnp.int32)
        table = self.log_alpha.value
        return left, table[left], table[left + 1]

    def total_noise(self, t: ddiff.Time) -> ddiff.ScheduleValue:
        """-log alpha(t), interpolated linearly between the tabulated grid times."""
        position = self._position(t)
        left, low, high = self._interval(position)
        return -(low + (position - left) * (high - low))

    def alpha(self, t: ddiff.Time) -> ddiff.ScheduleValue:
        return jnp.exp(-self.total_noise(t))

    def alpha_derivative(self, t: ddiff.Time) -> ddiff.ScheduleValue:
        _, low, high = self._interval(self._position(t))
        return self.alpha(t) * self.steps * (high - low)

    def pairing_problem(self, components):
        return _grid_problem(self.steps, components)
