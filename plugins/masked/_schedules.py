"""Scalar masking schedules of MD4 (Shi et al., NeurIPS 2024, Table 1): alpha_t = (1 - 2 eps) a(t) + eps."""

import abc
import math

import equinox as eqx
import jax.numpy as jnp

import ddiff
from ddiff import capabilities as caps

EPS = 1e-4
"""The paper's clipping: alpha_t = (1 - 2 eps) a(t) + eps keeps alpha in [eps, 1 - eps]."""


class AbstractClippedSchedule(ddiff.AbstractSchedule):
    """A schedule alpha_t = (1 - 2 eps) a(t) + eps built from a shape a(t) that falls from
    a(0) ~ 1 to a(1) ~ 0 (MD4 sec. 4 and its reference code): the clipping keeps alpha in
    [eps, 1 - eps], so the ELBO weight alpha'_t / (1 - alpha_t) stays finite at t = 0 and
    the reconstruction term D (1 - alpha_0) log V is O(D eps log V).
    """

    provides = frozenset({caps.SCALAR})
    eps: eqx.AbstractVar[float]

    @abc.abstractmethod
    def shape(self, t: ddiff.Time) -> ddiff.Scalar:
        """The unclipped shape a(t)."""

    @abc.abstractmethod
    def shape_derivative(self, t: ddiff.Time) -> ddiff.Scalar:
        """d a / dt (non-positive)."""

    def alpha(self, t: ddiff.Time) -> ddiff.ScheduleValue:
        return (1.0 - 2.0 * self.eps) * self.shape(t) + self.eps

    def alpha_derivative(self, t: ddiff.Time) -> ddiff.ScheduleValue:
        return (1.0 - 2.0 * self.eps) * self.shape_derivative(t)


def _check_eps(eps: float) -> None:
    if not 0.0 <= eps < 0.5:
        raise ddiff.RecipeError(f"eps must be in [0, 0.5), got {eps}", path="eps")


class LinearSchedule(AbstractClippedSchedule):
    """a(t) = 1 - t, so alpha_t = (1 - 2 eps)(1 - t) + eps (MD4 Table 1, linear)."""

    eps: float = eqx.field(static=True, default=EPS)

    def __check_init__(self):
        _check_eps(self.eps)

    def shape(self, t: ddiff.Time) -> ddiff.Scalar:
        return 1.0 - t

    def shape_derivative(self, t: ddiff.Time) -> ddiff.Scalar:
        return -jnp.ones_like(t)


class CosineSchedule(AbstractClippedSchedule):
    """a(t) = 1 - cos(pi/2 (1 - t)) (MD4 Table 1, cosine): slow masking near t = 0."""

    eps: float = eqx.field(static=True, default=EPS)

    def __check_init__(self):
        _check_eps(self.eps)

    def shape(self, t: ddiff.Time) -> ddiff.Scalar:
        return 1.0 - jnp.cos(0.5 * math.pi * (1.0 - t))

    def shape_derivative(self, t: ddiff.Time) -> ddiff.Scalar:
        return -0.5 * math.pi * jnp.sin(0.5 * math.pi * (1.0 - t))


class PolySchedule(AbstractClippedSchedule):
    """a(t) = 1 - t^k (MD4 Table 1, polynomial; "poly3" in the reference code is k = 3).

    Attributes:
        power: the exponent k > 0 (k = 1 is the linear schedule).
        eps: the clipping.
    """

    power: float = eqx.field(static=True, default=3.0)
    eps: float = eqx.field(static=True, default=EPS)

    def __check_init__(self):
        _check_eps(self.eps)
        if not self.power > 0:
            raise ddiff.RecipeError(
                f"power must be positive, got {self.power}", path="power"
            )

    def shape(self, t: ddiff.Time) -> ddiff.Scalar:
        return 1.0 - t**self.power

    def shape_derivative(self, t: ddiff.Time) -> ddiff.Scalar:
        return -self.power * t ** (self.power - 1.0)
