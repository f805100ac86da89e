"""Ancestral sampling for per-value (state-dependent) masking schedules."""

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

import ddiff
from ddiff import capabilities as caps


def reverse_logits(
    log_mean: Float[Array, "*batch seq vocab"], log_mask_s: Float[Array, " vocab"],
    log_mask_t: Float[Array, " vocab"]
) -> Float[Array, "*batch seq states"]:
    """Log-probabilities over V+1 outcomes of a masked position from t to s < t under a
    per-value schedule: value v with mu[v] (alpha_s[v] - alpha_t[v]) / (1 - alpha_t[v]),
    the mask (index V) with sum_v mu[v] (1 - alpha_s[v]) / (1 - alpha_t[v]). The ratios
    come from log(1 - alpha) so they stay accurate where alpha rounds to 1."""
    log_stay = log_mask_s - log_mask_t
    log_unmask = jnp.log(-jnp.expm1(jnp.minimum(log_stay, 0.0)))
    stay = jax.nn.logsumexp(log_mean + log_stay, axis=-1, keepdims=True)
    return jnp.concatenate([log_mean + log_unmask, stay], axis=-1)


class StateDependentAncestralSampler(ddiff.AbstractGridSampler):
    """Ancestral sampling of a masked process whose schedule may depend on the token value
    (GenMD4; the reference code ships no sampler). On the grid 1 = t_0 > ... > t_T = 0
    of :class:`ddiff.AbstractGridSampler`, a masked position becomes v with probability
    mu_theta(x_t, t)[v] (alpha_s[v] - alpha_t[v]) / (1 - alpha_t[v]) and stays masked
    otherwise: the posterior q(x_s | x_t, x_0) averaged over x_0 ~ mu_theta (after the
    ``transforms``). With a scalar schedule it is MD4's Alg. 2. Draws are exact
    (:func:`ddiff.categorical`); positions still masked at t = 0 are drawn from
    mu_theta(x_0, 0) (the grid samplers' finish). The driver (:func:`ddiff.run_sampler`)
    handles labels, guidance and the given positions.

    Attributes:
        steps: number of reverse steps T (network evaluations: T, or T+1 when a
            position is still masked at t = 0; doubled under guidance).
        grid: ``uniform`` or ``cosine`` time grid.
        transforms: log-probability transforms of mu, in order.
    """

    requires = {"parameterization": frozenset({caps.MEAN}), "process": frozenset({caps.MASKED})}
    transforms: tuple[ddiff.AbstractLogProbTransform, ...] = ()

    def reverse_chain(self) -> ddiff.ReverseChain | None:
        top_p = ddiff.chain(*self.transforms).as_top_p()
        if top_p is None:
            return None
        return ddiff.ReverseChain(
            step="posterior", reads="mean", times=self.times(), final="masked_mean", top_p=top_p
        )

    def step(
        self, prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, carry: Any, t: ddiff.Time,
        s: ddiff.Time, *, keys: ddiff.KeyBatch
    ) -> tuple[ddiff.TokenBatch, Any, ddiff.Calls]:
        process = prediction.model.process

        def log_mask(time):
            return jnp.broadcast_to(
                process.schedule.log_mask_probability(time), (process.vocab_size,)
            )

        log_mean, calls = prediction.log_mean(tokens, t)
        drawn = jax.vmap(ddiff.categorical)(
            keys, reverse_logits(log_mean, log_mask(s), log_mask(t))
        )
        return jnp.where(tokens == process.mask_id, drawn, tokens), carry, calls
