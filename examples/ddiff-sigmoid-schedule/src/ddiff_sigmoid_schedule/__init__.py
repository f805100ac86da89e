"""The sigmoid masking schedule (Jabri et al. 2022; Chen 2023, Algorithm 1) as a ddiff plugin."""

# --8<-- [start:imports]
import math

import equinox as eqx
import jax
import jax.numpy as jnp

import ddiff
from ddiff import capabilities as caps

# --8<-- [end:imports]


# --8<-- [start:class]
class SigmoidSchedule(ddiff.AbstractSchedule):
    """alpha_t = (1 - 2 eps) a(t) + eps, with the sigmoid shape (Chen 2023, Algorithm 1)

        a(t) = (sigmoid(end / tau) - sigmoid((start + (end - start) t) / tau))
               / (sigmoid(end / tau) - sigmoid(start / tau)),

    which falls from a(0) = 1 to a(1) = 0 along a stretch of the logistic curve: ``start``
    and ``end`` choose the stretch, ``tau`` its steepness. The clipping by ``eps`` (as
    MD4's schedules) keeps alpha in [eps, 1 - eps], so the ELBO weight
    alpha'_t / (1 - alpha_t) stays finite at t = 0.

    Attributes:
        start: left end of the logistic stretch (before dividing by tau).
        end: right end, greater than ``start``.
        tau: temperature (> 0); a small tau concentrates the masking around the time
            where (start + (end - start) t) crosses 0.
        eps: the clipping, in [0, 0.5).
    """

    provides = frozenset({caps.SCALAR})
    start: float = eqx.field(static=True, default=-3.0)
    end: float = eqx.field(static=True, default=3.0)
    tau: float = eqx.field(static=True, default=1.0)
    eps: float = eqx.field(static=True, default=1e-4)
    # --8<-- [end:class]

    # --8<-- [start:check]
    def __check_init__(self):
        if not self.end > self.start:
            raise ddiff.RecipeError(
                f"end must be greater than start, got start={self.start}, end={self.end}",
                path="end",
            )
        if not self.tau > 0:
            raise ddiff.RecipeError(f"tau must be positive, got {self.tau}", path="tau")
        if not _sigmoid(self.end / self.tau) - _sigmoid(self.start / self.tau) > 1e-6:
            raise ddiff.RecipeError(
                f"the sigmoid is flat between start/tau = {self.start / self.tau} and "
                f"end/tau = {self.end / self.tau}; choose a stretch that crosses 0",
                path="start",
            )
        if not 0 <= self.eps < 0.5:
            raise ddiff.RecipeError(f"eps must be in [0, 0.5), got {self.eps}", path="eps")

    # --8<-- [end:check]

    # --8<-- [start:alpha]
    def alpha(self, t: ddiff.Time) -> ddiff.ScheduleValue:
        top, bottom = self._sigmoid_at(1.0), self._sigmoid_at(0.0)
        shape = (top - self._sigmoid_at(t)) / (top - bottom)
        return (1.0 - 2.0 * self.eps) * shape + self.eps

    def alpha_derivative(self, t: ddiff.Time) -> ddiff.ScheduleValue:
        """Closed form: sigmoid'(x) = sigmoid(x) (1 - sigmoid(x)), times the chain rule's
        (end - start) / tau."""
        top, bottom = self._sigmoid_at(1.0), self._sigmoid_at(0.0)
        s = self._sigmoid_at(t)
        slope = (self.end - self.start) / self.tau
        return -(1.0 - 2.0 * self.eps) * slope * s * (1.0 - s) / (top - bottom)

    def _sigmoid_at(self, t):
        """sigmoid((start + (end - start) t) / tau), computed alike at t and at the end
        points, so that a(0) = 1 and a(1) = 0 hold exactly in floating point."""
        return jax.nn.sigmoid((self.start + (self.end - self.start) * jnp.asarray(t)) / self.tau)

    # --8<-- [end:alpha]


# --8<-- [start:sigmoid]
def _sigmoid(x: float) -> float:
    """The logistic function of a Python float, without overflow for any x."""
    return 0.5 * (1.0 + math.tanh(0.5 * x))


# --8<-- [end:sigmoid]


# --8<-- [start:hook]
@ddiff.hookimpl
def ddiff_register_components(registry: ddiff.Registry) -> None:
    registry.register("schedule", "sigmoid", SigmoidSchedule)


# --8<-- [end:hook]
