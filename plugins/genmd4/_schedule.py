"""GenMD4's learnable per-value schedule alpha_t[v] = 1 - (1 - eps) t^{w_v}."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

import ddiff
from ddiff import capabilities as caps

EPS = 1e-4
"""alpha_1[v] = eps: the reference code's value."""

T1 = 1e-3
"""The ELBO integrates over t in [t1, 1]; the reference code's t1."""


def _inverse_softplus(power: jax.Array) -> jax.Array:
    return jnp.log(jnp.expm1(power))


class LearnablePolySchedule(ddiff.AbstractSchedule):
    """The GenMD4 polynomial schedule alpha_t[v] = 1 - (1 - eps) t^{w_v}, with one power
    w_v = softplus(phi_v) per token value, phi learnable (the MD4 paper's GenMD4 and
    its reference code). alpha_0 = 1 and alpha_1 = eps for every value; the ELBO weight has
    the closed form alpha'_t[v] / (1 - alpha_t[v]) = -w_v / t.

    Attributes:
        phi: the learnable parameters, shape (V,).
        vocab_size: V (from the data).
        eps: 1 - alpha_1.

    Arguments:
        initial_power: every w_v at initialisation (the reference's ``power_init``, 1:
            the linear schedule).
        initial_powers: one initial power per value instead (a list of V positive
            numbers), e.g. to start from a learned schedule.
    """

    provides = frozenset({caps.PER_VALUE})
    phi: Float[Array, " vocab"]
    vocab_size: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(
        self, vocab_size: int, initial_power: float = 1.0,
        initial_powers: tuple[float, ...] | None = None, eps: float = EPS
    ):
        if initial_powers is None:
            powers = (initial_power,) * vocab_size
            where = "initial_power"
        else:
            powers = tuple(initial_powers)
            where = "initial_powers"
            if len(powers) != vocab_size:
                raise ddiff.RecipeError(
                    f"give one power per token value: {vocab_size} numbers, got {len(powers)}",
                    path=where,
                )
        if not all(power > 0 for power in powers):
            raise ddiff.RecipeError(f"powers must be positive, got {min(powers)}", path=where)
        self.phi = _inverse_softplus(jnp.asarray(powers, jnp.float32))
        self.vocab_size = vocab_size
        self.eps = eps

    def __check_init__(self):
        if not 0.0 <= self.eps < 1.0:
            raise ddiff.RecipeError(
                f"eps must be in [0, 1), got {self.eps}", path="eps"
            )

    def powers(self) -> Float[Array, " vocab"]:
        """w = softplus(phi), one power per token value."""
        return jax.nn.softplus(self.phi)

    def _log_time(self, t):
        return jnp.log(jnp.where(t > 0, t, 1.0))

    def _time_power(self, t):
        """t^w per value, 0 at t = 0 (with finite gradients there)."""
        return jnp.where(t > 0, jnp.exp(self.powers() * self._log_time(t)), 0.0)

    def alpha(self, t: ddiff.Time) -> ddiff.ScheduleValue:
        return 1.0 - (1.0 - self.eps) * self._time_power(t)

    def alpha_derivative(self, t: ddiff.Time) -> ddiff.ScheduleValue:
        w = self.powers()
        return -(1.0 - self.eps) * w * jnp.power(t, w - 1.0)

    def elbo_weight(self, t: ddiff.Time) -> ddiff.ScheduleValue:
        """The ELBO weight alpha'_t[v] / (1 - alpha_t[v]) in closed form, -w_v / t."""
        return -self.powers() / t

    def log_mask_probability(self, t: ddiff.Time) -> ddiff.ScheduleValue:
        log_time = jnp.where(t > 0, self._log_time(t), -jnp.inf)
        return jnp.log1p(-self.eps) + self.powers() * log_time


# --------------------------------------------------------------------------- objective
