"""D3PM's discretized logistic x0-parameterization for ordinal data."""

import math

import jax
import jax.numpy as jnp

import ddiff


class DiscretizedLogisticParameterization(ddiff.AbstractMeanParameterization):
    """D3PM's truncated discretized logistic for p(x_0 | x_t) over ordinal values (App. A.8
    and B.1; "D3PM Gauss + logistic"). The network gives two channels per position, a log
    scale log s and a shift m'; the location is mu = tanh(x_t / (V-1) * 2 - 1 + m') in
    [-1, 1], where the values v sit at c_v = 2v/(V-1) - 1, and

        p(x_0 = v | x_t) proportional to sigma((c_v - mu + w) / s') - sigma((c_v - mu - w) / s'),

    with half-width w = 1/(V-1) and 1/s' = exp(2 - log s) (D3PM's offset, so that log s = 0
    is a moderate width), renormalised over the V values (the truncation). Each bin is
    computed in log space as log sigma(u) + log sigma(-l) + log(1 - e^{-(u-l)}), which has
    no cancellation at either tail.
    """

    def output_channels(self, process: ddiff.AbstractForwardProcess) -> int:
        return 2

    def log_mean(
        self, output: ddiff.NetworkOutput, x_t: ddiff.Tokens, t: ddiff.Time,
        process: ddiff.AbstractForwardProcess
    ) -> ddiff.LogProbs:
        size = process.vocab_size
        log_scale, shift = output[:, 0], output[:, 1]
        location = jnp.tanh(2.0 * x_t / (size - 1) - 1.0 + shift)
        half_width = 1.0 / (size - 1)
        log_inverse_scale = 2.0 - log_scale
        inverse_scale = jnp.exp(log_inverse_scale)[:, None]
        offset = jnp.linspace(-1.0, 1.0, size)[None, :] - location[:, None]
        upper = inverse_scale * (offset + half_width)
        lower = inverse_scale * (offset - half_width)
        width = inverse_scale * 2.0 * half_width
        log_width = (log_inverse_scale + math.log(2.0 * half_width))[:, None]
        # log(1 - e^{-w}); for w < 1e-6 its expansion log w - w/2, which stays finite
        # where w itself underflows.
        tiny = width < 1e-6
        log_mass = jnp.where(
            tiny, log_width - 0.5 * width, jnp.log(-jnp.expm1(-jnp.where(tiny, 1.0, width)))
        )
        log_bins = jax.nn.log_sigmoid(upper) + jax.nn.log_sigmoid(-lower) + log_mass
        return jax.nn.log_softmax(log_bins, axis=-1)


# --------------------------------------------------------------------------- the bound
