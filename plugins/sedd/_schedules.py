"""SEDD's noise schedules, written as total noise sigma_bar(t) with alpha_t = exp(-sigma_bar(t))."""

import abc
import math

import equinox as eqx
import jax.numpy as jnp

import ddiff
from ddiff import capabilities as caps


class AbstractNoiseSchedule(ddiff.AbstractSchedule):
    """A schedule written in SEDD's terms (Lou et al. 2024): the total noise
    sigma_bar(t), with alpha_t = exp(-sigma_bar(t)), and the noise rate
    sigma(t) = d sigma_bar / dt = -alpha'_t / alpha_t, both in closed form.

    Any schedule has them (:func:`total_noise` and :func:`noise_rate` compute them from
    alpha); a schedule defined by its noise subclasses this to give them exactly where
    alpha rounds (sigma_bar near 0, where alpha is within float32 of 1).
    """

    @abc.abstractmethod
    def total_noise(self, t: ddiff.Time) -> ddiff.ScheduleValue:
        """sigma_bar(t) = -log alpha(t)."""

    @abc.abstractmethod
    def noise_rate(self, t: ddiff.Time) -> ddiff.ScheduleValue:
        """sigma(t) = d sigma_bar / dt = -alpha'(t) / alpha(t)."""


def total_noise(schedule: ddiff.AbstractSchedule, t: ddiff.Time) -> ddiff.ScheduleValue:
    """SEDD's total noise sigma_bar(t) = -log alpha(t) of any schedule (the closed form of
    an :class:`AbstractNoiseSchedule`)."""
    if isinstance(schedule, AbstractNoiseSchedule):
        return schedule.total_noise(t)
    return -jnp.log(schedule.alpha(t))


def noise_rate(schedule: ddiff.AbstractSchedule, t: ddiff.Time) -> ddiff.ScheduleValue:
    """SEDD's noise rate sigma(t) = -alpha'(t) / alpha(t) of any schedule (the closed form
    of an :class:`AbstractNoiseSchedule`)."""
    if isinstance(schedule, AbstractNoiseSchedule):
        return schedule.noise_rate(t)
    return -schedule.alpha_derivative(t) / schedule.alpha(t)


def _check_unit_interval(value: float, name: str) -> None:
    if not 0.0 < value < 1.0:
        raise ddiff.RecipeError(f"{name} must be in (0, 1), got {value}", path=name)


class GeometricSchedule(AbstractNoiseSchedule):
    """SEDD's geometric noise (Lou et al. 2024, sec. 5 and their noise_lib; MD4 Table 1,
    geometric): total noise sigma_bar(t) = sigma_min^(1-t) sigma_max^t and
    alpha_t = exp(-sigma_bar(t)), with no further clipping: sigma_min > 0 keeps
    alpha_0 = exp(-sigma_min) below 1 and sigma_max keeps alpha_1 = exp(-sigma_max) above 0.
    The noise rate is sigma(t) = sigma_bar(t) log(sigma_max / sigma_min).

    Attributes:
        sigma_min: total noise at t = 0 (SEDD's 1e-4).
        sigma_max: total noise at t = 1 (SEDD's 20).
    """

    provides = frozenset({caps.SCALAR})
    sigma_min: float = eqx.field(static=True, default=1e-4)
    sigma_max: float = eqx.field(static=True, default=20.0)

    def __check_init__(self):
        if not 0.0 < self.sigma_min < self.sigma_max:
            raise ddiff.RecipeError(
                f"need 0 < sigma_min < sigma_max, got {self.sigma_min} and {self.sigma_max}"
            )

    def alpha(self, t: ddiff.Time) -> ddiff.ScheduleValue:
        return jnp.exp(-self.total_noise(t))

    def alpha_derivative(self, t: ddiff.Time) -> ddiff.ScheduleValue:
        return -self.alpha(t) * self.noise_rate(t)

    def total_noise(self, t: ddiff.Time) -> ddiff.ScheduleValue:
        return jnp.exp((1.0 - t) * math.log(self.sigma_min) + t * math.log(self.sigma_max))

    def noise_rate(self, t: ddiff.Time) -> ddiff.ScheduleValue:
        return self.total_noise(t) * math.log(self.sigma_max / self.sigma_min)


class LogLinearSchedule(AbstractNoiseSchedule):
    """SEDD's log-linear noise, the schedule of its absorbing graph (Lou et al. 2024,
    their noise_lib): total noise sigma_bar(tau) = -log(1 - (1 - eps) tau), so
    alpha = 1 - (1 - eps) tau falls linearly from 1 to eps. At tau = 0 alpha is 1 and the
    score r = alpha / (1 - alpha) is infinite, so SEDD trains on tau in [t_min, 1] (their
    ``sampling_eps``); ddiff's time runs over that interval, tau = t_min + (1 - t_min) t,
    which leaves alpha_0 = 1 - (1 - eps) t_min < 1 and a finite reconstruction term.
    The noise rate is sigma(t) = (1 - t_min)(1 - eps) / (1 - (1 - eps) tau).

    Attributes:
        eps: alpha at t = 1 (SEDD's 1e-3).
        t_min: SEDD's smallest training time, where ddiff's t = 0 lies (SEDD's 1e-3).
    """

    provides = frozenset({caps.SCALAR})
    eps: float = eqx.field(static=True, default=1e-3)
    t_min: float = eqx.field(static=True, default=1e-3)

    def __check_init__(self):
        _check_unit_interval(self.eps, "eps")
        _check_unit_interval(self.t_min, "t_min")

    def _tau(self, t):
        return self.t_min + (1.0 - self.t_min) * t

    def alpha(self, t: ddiff.Time) -> ddiff.ScheduleValue:
        # 1 - (1 - eps) tau, written without the cancellation near tau = 1.
        return self.eps + (1.0 - self.eps) * (1.0 - self.t_min) * (1.0 - t)

    def alpha_derivative(self, t: ddiff.Time) -> ddiff.ScheduleValue:
        return -(1.0 - self.eps) * (1.0 - self.t_min) * jnp.ones_like(t)

    def total_noise(self, t: ddiff.Time) -> ddiff.ScheduleValue:
        return -jnp.log1p(-(1.0 - self.eps) * self._tau(t))

    def noise_rate(self, t: ddiff.Time) -> ddiff.ScheduleValue:
        return (1.0 - self.t_min) * (1.0 - self.eps) / self.alpha(t)


# --------------------------------------------------------------------------- parameterization
