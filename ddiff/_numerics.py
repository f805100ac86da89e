"""Log-space helpers every family needs: logarithms of probabilities that may be 0, and
normalisations over rows that may be impossible, all with gradients that are never NaN.

``jnp.log(p)`` at p = 0 is -inf, but its gradient there is inf and, under a ``where``
that discards it, still NaN (0 * inf); ``jax.nn.logsumexp`` over a row that is -inf
throughout has a NaN gradient. These helpers take the untaken branch through a safe value,
so a zero probability contributes exactly -inf to the value and 0 to the gradient.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def safe_log(probs: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """log p with log 0 = -inf, safe to differentiate (no NaN from the untaken branch)."""
    positive = probs > 0
    return jnp.where(positive, jnp.log(jnp.where(positive, probs, 1.0)), -jnp.inf)


def log_sum_exp(values: Float[Array, "*shape"], axis: int = -1) -> Float[Array, "*shape"]:
    """log sum exp over ``axis`` (kept, size 1), -inf where every entry is -inf, with a
    gradient that is never NaN (``jax.nn.logsumexp``'s is NaN there)."""
    reachable = jnp.any(values > -jnp.inf, axis=axis, keepdims=True)
    total = jax.nn.logsumexp(jnp.where(reachable, values, 0.0), axis=axis, keepdims=True)
    return jnp.where(reachable, total, -jnp.inf)


def log_normalize(log_weights: Float[Array, "*shape"], axis: int = -1) -> Float[Array, "*shape"]:
    """Log-probabilities from unnormalised log-weights, normalised over ``axis``; a row that
    is -inf throughout stays so (an impossible row, not NaN), and the gradient is never
    NaN."""
    total = log_sum_exp(log_weights, axis=axis)
    return log_weights - jnp.where(jnp.isfinite(total), total, 0.0)
