"""The Schedule protocol: survival probability alpha(t) of a clean token."""

import abc

import jax
import jax.numpy as jnp

from ddiff._capabilities import Capable
from ddiff._typing import AbstractCheckedModule, ScheduleValue, Time


class AbstractSchedule(AbstractCheckedModule, Capable):
    """A noise schedule: alpha(t), the probability that a token is still clean at time t.

    alpha decreases from alpha(0) ~ 1 to alpha(1) ~ 0. It is a scalar, or a vector with one
    entry per token value v for state-dependent processes (GenMD4: alpha_t[v]). A schedule
    may hold learnable array fields; they are trained with the network.

    Derived quantities have concrete defaults computed from ``alpha`` by automatic
    differentiation; built-in schedules override them with closed forms.
    """

    @abc.abstractmethod
    def alpha(self, t: Time) -> ScheduleValue:
        """Survival probability alpha(t).

        Arguments:
            t: time in [0, 1].

        Returns:
            alpha(t), a scalar or a vector over token values.
        """

    def alpha_derivative(self, t: Time) -> ScheduleValue:
        """d alpha / dt at t (non-positive)."""
        _, tangent = jax.jvp(self.alpha, (t,), (jnp.ones_like(t),))
        return tangent

    def elbo_weight(self, t: Time) -> ScheduleValue:
        """The MD4 ELBO weight alpha'(t) / (1 - alpha(t)) (non-positive; paper eq. 5)."""
        return self.alpha_derivative(t) / (1.0 - self.alpha(t))

    def log_mask_probability(self, t: Time) -> ScheduleValue:
        """log(1 - alpha(t)), the log-probability that a clean token is masked by time t.

        The default is log1p(-alpha(t)); a schedule whose alpha(t) rounds to 1 near t = 0
        (GenMD4's 1 - (1 - eps) t^w) overrides it with a closed form that stays accurate
        there (REINFORCE log-likelihoods and reverse steps need it).
        """
        return jnp.log1p(-self.alpha(t))

    def total_noise(self, t: Time) -> ScheduleValue:
        """SEDD's total noise sigma_bar(t) = -log alpha(t)."""
        return -jnp.log(self.alpha(t))

    def noise_rate(self, t: Time) -> ScheduleValue:
        """SEDD's noise rate sigma(t) = d sigma_bar / dt = -alpha'(t) / alpha(t)."""
        return -self.alpha_derivative(t) / self.alpha(t)


def time_of_alpha(schedule: AbstractSchedule, alpha: jax.Array) -> jax.Array:
    """The time t in [0, 1] at which ``schedule`` reaches survival probability ``alpha``,
    elementwise, by 40 bisection steps (alpha is decreasing in t); values outside
    [alpha(1), alpha(0)] map to the end points. A per-value schedule is read through its
    mean over values, mean_v alpha_t[v] (the expected fraction of clean tokens under
    uniformly distributed values)."""

    def bisect(target: jax.Array) -> jax.Array:
        def body(_: int, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            low, high = bounds
            middle = 0.5 * (low + high)
            right = jnp.mean(schedule.alpha(middle)) > target
            return jnp.where(right, middle, low), jnp.where(right, high, middle)

        low, high = jax.lax.fori_loop(0, 40, body, (jnp.zeros(()), jnp.ones(())))
        return 0.5 * (low + high)

    flat = jnp.ravel(alpha)
    return jax.vmap(bisect)(flat).reshape(jnp.shape(alpha))
