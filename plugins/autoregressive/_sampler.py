"""Left-to-right ancestral sampling, one position per network call: a step rule over
:func:`ddiff.run_sampler`."""

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

import ddiff
from ddiff import capabilities as caps
from ddiff_plugins.autoregressive._process import LEFT_TO_RIGHT


class LeftToRightSampler(ddiff.AbstractLoopSampler):
    """Ancestral sampling of an autoregressive model: step n = 0..D-1 of the driver's loop
    (:func:`ddiff.run_sampler`) draws position n from mu_theta(x_t_n, t_n)[n] =
    p_theta(x_n | x_<n) (exactly, :func:`ddiff.categorical`, after the ``transforms``) with
    the earlier positions visible and the later ones masked, t_n = 1 - n/D; one network
    call per position (doubled under guidance), skipped where every sample gives the
    position. Labels and classifier-free guidance go through :class:`ddiff.Prediction`.

    Distribution: exactly the model's. Infilling keeps every given position; a given
    prefix is conditioned on exactly, but a position given after a free one is not seen
    by the draws before it (an autoregressive model cannot look ahead), so such samples
    are not drawn from the conditional given it.

    Attributes:
        transforms: log-probability transforms of the next-token distribution, in order.
    """

    requires = {
        "parameterization": frozenset({caps.MEAN}),
        "process": frozenset({LEFT_TO_RIGHT}),
    }
    transforms: tuple[ddiff.AbstractLogProbTransform, ...] = ()

    def done(
        self, prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, carry: Any,
        index: Int[Array, ""]
    ) -> Bool[Array, ""]:
        return index >= tokens.shape[1]

    def step(
        self, prediction: ddiff.Prediction, tokens: ddiff.TokenBatch, carry: Any,
        index: Int[Array, ""], *, keys: ddiff.KeyBatch
    ) -> tuple[ddiff.TokenBatch, Any, ddiff.Calls]:
        batch, seq_len = tokens.shape
        given, given_tokens = prediction.conditioning.given(batch, seq_len)
        column, given_column = given[:, index], given_tokens[:, index]

        def draw(x):
            time = 1.0 - index.astype(jnp.float32) / seq_len
            log_mean, calls = prediction.log_mean(x, time)
            return jax.vmap(ddiff.categorical)(keys, log_mean[:, index]), jnp.int32(calls)

        drawn, calls = jax.lax.cond(
            jnp.all(column), lambda x: (given_column, jnp.int32(0)), draw, tokens
        )
        return tokens.at[:, index].set(jnp.where(column, given_column, drawn)), carry, calls
