"""D3PM's mutual-information schedule (Austin et al. 2021, sec. 4): alpha chosen so that
the mutual information between x_t and x_0 falls linearly in t."""

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import ddiff
from ddiff import capabilities as caps
from ddiff_plugins.d3pm._gaussian import DiscretizedGaussianProcess


def _information_fraction(keep: jax.Array, probs: jax.Array) -> jax.Array:
    """I(x_t; x_0) / H(x_0) for uniform transitions with keep probability a (D3PM eq. 17):
    q(x_t = y | x_0 = v) = a [y = v] + c, c = (1 - a)/V, and x_0 ~ probs."""
    size = probs.shape[0]
    fresh = (1.0 - keep) / size

    def entropy_terms(p):
        return jnp.where(p > 0, -p * ddiff.safe_log(p), 0.0)

    marginal = keep * probs + fresh
    entropy_t = jnp.sum(entropy_terms(marginal))
    conditional = entropy_terms(keep + fresh) + (size - 1) * entropy_terms(fresh)
    entropy_0 = jnp.sum(entropy_terms(probs))
    return (entropy_t - conditional) / entropy_0


@jax.custom_jvp
def _keep_for_information(fraction: jax.Array, probs: jax.Array) -> jax.Array:
    """The keep probability a in [0, 1] with I(x_t; x_0) / H(x_0) = ``fraction``, by
    bisection (the fraction increases with a, from 0 at a = 0 to 1 at a = 1)."""

    def body(_, bounds):
        low, high = bounds
        middle = 0.5 * (low + high)
        above = _information_fraction(middle, probs) > fraction
        return jnp.where(above, low, middle), jnp.where(above, middle, high)

    low, high = jax.lax.fori_loop(0, 48, body, (jnp.zeros_like(fraction), jnp.ones_like(fraction)))
    return 0.5 * (low + high)


@_keep_for_information.defjvp
def _keep_for_information_jvp(primals, tangents):
    """Implicit differentiation: da = dfraction / (d fraction / d a)."""
    fraction, probs = primals
    d_fraction, _ = tangents
    keep = _keep_for_information(fraction, probs)
    slope = jax.grad(_information_fraction)(keep, probs)
    return keep, d_fraction / slope


class MutualInformationSchedule(ddiff.AbstractSchedule):
    """D3PM's mutual-information schedule (App. A.7): alpha is chosen so that the
    information x_t keeps about x_0 falls linearly, I(x_t; x_0) = (1 - t) H(x_0), with
    x_0 distributed as the data's marginal over token values.

    - ``transitions: absorbing``: the fraction kept is exactly alpha for any marginal, so
      alpha(t) = 1 - t, the schedule ``jsd`` (App. A.7).
    - ``transitions: uniform``: alpha(t) solves the equation numerically (bisection in
      float32 to its resolution, derivative by implicit differentiation) for the given
      marginal: ``marginal`` (unigram frequencies, as D3PM estimated from its training
      set) or, when omitted, the uniform distribution over the V values.

    alpha is defined for every t, so the schedule works with any number of steps. It is
    refused with a process other than the one its ``transitions`` names (masked for
    absorbing; the discretized Gaussian family, for which D3PM used the linear schedule,
    is not covered).

    Attributes:
        transitions: ``uniform`` or ``absorbing``.
        marginal: V probabilities of the token values, or null for uniform.
    """

    provides = frozenset({caps.SCALAR})
    vocab_size: int = eqx.field(static=True)
    transitions: Literal["uniform", "absorbing"] = eqx.field(static=True, default="uniform")
    marginal: tuple[float, ...] | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.vocab_size < 2:
            raise ddiff.RecipeError(
                f"the mutual-information schedule needs at least 2 token values, got {self.vocab_size}"
            )
        if self.marginal is not None:
            probs = np.asarray(self.marginal, np.float64)
            if (
                probs.shape != (self.vocab_size,)
                or np.any(probs < 0)
                or abs(probs.sum() - 1.0) > 1e-3
            ):
                raise ddiff.RecipeError(
                    f"marginal must hold {self.vocab_size} non-negative probabilities summing to 1 "
                    f"(got {len(self.marginal)} summing to {probs.sum():.6g})",
                    path="marginal",
                )
            if np.count_nonzero(probs) < 2:
                raise ddiff.RecipeError(
                    "marginal must give mass to at least 2 values (else H(x_0) = 0)",
                    path="marginal",
                )

    def _probs(self) -> jax.Array:
        if self.marginal is None:
            return jnp.full((self.vocab_size,), 1.0 / self.vocab_size)
        probs = jnp.asarray(self.marginal, jnp.float32)
        return probs / jnp.sum(probs)

    def alpha(self, t: ddiff.Time) -> ddiff.ScheduleValue:
        if self.transitions == "absorbing":
            return 1.0 - t
        return _keep_for_information(1.0 - t, self._probs())

    def pairing_problem(self, components):
        if "process" not in components:
            return None
        process_name, process = components["process"]
        masked = caps.MASKED in process.capabilities()
        if isinstance(process, DiscretizedGaussianProcess):
            return (
                f"the mutual-information schedule is computed for uniform and absorbing "
                f"transitions, not for process {process_name!r}; use d3pm_linear as D3PM does"
            )
        if masked != (self.transitions == "absorbing"):
            wanted = "absorbing" if masked else "uniform"
            return (
                f"its transitions: {self.transitions} do not match process {process_name!r}; "
                f"set process.schedule.transitions: {wanted}"
            )
        return None


# --------------------------------------------------------------------------- the Gaussian process
