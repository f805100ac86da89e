"""Reverse rates of a factorized CTMC from a denoiser (Campbell et al. 2022, Prop. 3)."""

import jax
import jax.numpy as jnp

import ddiff
from ddiff import capabilities as caps

_REQUIRES = {
    "parameterization": frozenset({caps.MEAN}),
    "process": frozenset({caps.RATES, caps.FACTORIZED, caps.SCALAR_SCHEDULE}),
}
"""The rates are read from alpha_t, and float32 keeps 1 - alpha_t only while alpha_t < 1:
a per-value schedule such as GenMD4's (alpha_0 = 1, alpha_t[v] = 1 - t^{w_v} rounding to
1 at small t while its rate does not vanish) would overflow the reverse rates, so a scalar
schedule is required (MD4's keep alpha <= 1 - eps)."""


def reverse_rates(
    process: ddiff.AbstractRateProcess, log_mean: ddiff.LogProbs, x: ddiff.Tokens, t: ddiff.Time
) -> ddiff.StateProbs:
    """R̂_t(x -> x^{n<-y}) for every position n and state y (0 at y = x^n), from the mean:
    R_t(y -> x^n) s[n, y] with s = exp(log_score_from_mean). O(S) per position."""
    score = jnp.exp(process.log_score_from_mean(log_mean, x, t))
    rates = process.incoming_rates(x, t) * score
    return jnp.where(jax.nn.one_hot(x, process.num_states, dtype=bool), 0.0, rates)


def _picked(log_probs: jax.Array, tokens: jax.Array) -> jax.Array:
    return jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]


def _draw_jump(
    process: ddiff.AbstractRateProcess, x: ddiff.Tokens, t: ddiff.Time, key: ddiff.Key
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One forward jump from x: position n with probability exit_n / Z_t(x), then its new
    state y with probability R_t(x^n -> y) / exit_n (y != x^n). Returns (n, y, Z_t(x))."""
    position_key, state_key = jax.random.split(key)
    exits = process.exit_rates(x, t)
    position = ddiff.categorical_from_probs(position_key, exits)
    row = process.forward_rates(x[position][None], t)[0]
    row = jnp.where(jnp.arange(process.num_states) == x[position], 0.0, row)
    return position, ddiff.categorical_from_probs(state_key, row), jnp.sum(exits)


def reversal_rates(
    process: ddiff.AbstractRateProcess, x0: ddiff.Tokens, x: ddiff.Tokens, t: ddiff.Time
) -> tuple[ddiff.StateProbs, ddiff.StateProbs]:
    """The rates of the time reversal of the forward process given x_0 (Campbell et al.
    Prop. 1 conditioned on x_0), A_t(x -> x^{n<-y}) = R_t(y -> x^n) q_t(y | x_0^n) /
    q_t(x^n | x_0^n) for every position n and state y, with log(q_t(y | x_0^n) /
    q_t(x^n | x_0^n)). Both are 0 at y = x^n and wherever A is 0. O(S) per position."""
    marginal = process.marginal_probs(x0, t)
    current = jnp.take_along_axis(marginal, x[:, None], axis=-1)
    other = ~jax.nn.one_hot(x, process.num_states, dtype=bool)
    possible = current > 0
    rates = jnp.where(other, process.incoming_rates(x, t), 0.0)
    rates = jnp.where(possible, rates * marginal / jnp.where(possible, current, 1.0), 0.0)
    active = rates > 0
    log_current = jnp.log(jnp.where(possible, current, 1.0))
    log_ratio = jnp.log(jnp.where(active, marginal, 1.0)) - log_current
    return rates, jnp.where(active, log_ratio, 0.0)
