"""SEDD's score parameterization: the network's outputs are log concentration ratios."""

import equinox as eqx
import jax
import jax.numpy as jnp

import ddiff
from ddiff import capabilities as caps
from ddiff_plugins.sedd._schedules import total_noise


class ScoreParameterization(ddiff.AbstractScoreParameterization):
    """SEDD's score network (their model/transformer.py): one output channel per state,
    read as log s, with the current state's entry set to log 1 = 0.

    With ``absorbing_scale`` on a masked process the output is shifted by
    log r_t - log V per clean value (SEDD's ``scale_by_sigma``:
    log s = output - log(e^sigma_bar - 1) - log V), so that an output of zero is the score
    r_t / V of a uniform denoiser and the network learns a time-independent quantity.
    SEDD scales only the absorbing graph; on any other process the output is read as
    log s unchanged, as SEDD reads it on the uniform graph.

    Attributes:
        absorbing_scale: add log r_t - log V on a masked process.
    """

    absorbing_scale: bool = eqx.field(static=True, default=True)

    def output_channels(self, process: ddiff.AbstractForwardProcess) -> int:
        return process.num_states

    def log_score(
        self, output: ddiff.NetworkOutput, x_t: ddiff.Tokens, t: ddiff.Time,
        process: ddiff.AbstractForwardProcess
    ) -> ddiff.StateLogProbs:
        log_score = output
        if self.absorbing_scale and caps.MASKED in process.capabilities():
            noise = jnp.broadcast_to(total_noise(process.schedule, t), (process.vocab_size,))
            shift = -jnp.log(jnp.expm1(noise)) - jnp.log(process.vocab_size)
            padding = jnp.zeros((process.num_states - process.vocab_size,))
            log_score = log_score + jnp.concatenate([shift, padding])[None, :]
        current = jax.nn.one_hot(x_t, process.num_states, dtype=bool)
        return jnp.where(current, 0.0, log_score)


def _has_posterior(
    process: ddiff.AbstractForwardProcess, parameterization: ddiff.AbstractParameterization
) -> bool:
    """Whether the model gives a clean-token posterior with mass on every value: a mean
    parameterization, or scores on the masked process (whose Tweedie mean is a softmax; on
    other processes it clips negative values and can give x_0 no mass)."""
    return caps.MEAN in parameterization.capabilities() or caps.MASKED in process.capabilities()
