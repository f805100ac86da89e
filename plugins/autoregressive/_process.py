"""The left-to-right process: at t_n = 1 - n/D exactly the first n positions are visible."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

import ddiff
from ddiff import capabilities as caps

LEFT_TO_RIGHT = "left_to_right"
"""A process that masks positions in a fixed order, the last first (capability)."""
CAUSAL = "causal"
"""A network whose output at position n depends on its inputs at positions < n only."""
EXACT_LIKELIHOOD = "exact_likelihood"
"""An objective whose ``nelbo`` is exactly -log p_theta(x_0), not a bound."""


class VisibleFraction(ddiff.AbstractSchedule):
    """The schedule of the ``left_to_right`` process: alpha(t) = 1 - t, the fraction of
    visible positions (up to rounding to whole positions)."""

    def alpha(self, t: ddiff.Time) -> ddiff.ScheduleValue:
        return 1.0 - t


def visible_count(t: ddiff.Time, seq_len: int) -> jax.Array:
    """How many leading positions of ``seq_len`` are visible at time t: the positions
    n < (1 - t) D, so exactly n at t = 1 - n/D (a margin of 1e-4 absorbs rounding)."""
    return jnp.ceil((1.0 - t) * seq_len - 1e-4).astype(jnp.int32)


class LeftToRightProcess(ddiff.AbstractForwardProcess):
    """Masking in a fixed order: at time t position n holds x_0^n when n < (1 - t) D and
    the mask state V otherwise, so x_1 is all-mask (the prior) and x_0 is clean. The
    marginals are deterministic and factorize over positions, but depend on the position,
    so the process offers neither discrete-time transitions nor rates, and it is not
    ``masked`` in ddiff's sense (independent masking per position): only the
    autoregressive family pairs with it.

    Attributes:
        vocab_size: V (ddiff sets it from the data).
    """

    vocab_size: int = eqx.field(static=True)

    @property
    def schedule(self) -> ddiff.AbstractSchedule:
        return VisibleFraction()

    @property
    def num_states(self) -> int:
        return self.vocab_size + 1

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    def capabilities(self):
        return frozenset({caps.FACTORIZED, LEFT_TO_RIGHT})

    def marginal_probs(self, x0: ddiff.Tokens, t: ddiff.Time) -> ddiff.StateProbs:
        visible = jnp.arange(x0.shape[0]) < visible_count(t, x0.shape[0])
        return jax.nn.one_hot(jnp.where(visible, x0, self.mask_id), self.num_states)

    def prior_probs(self) -> Float[Array, " states"]:
        return jax.nn.one_hot(self.mask_id, self.num_states)
