"""The next-token parameterization of the left-to-right process."""

import jax
import jax.numpy as jnp

import ddiff
from ddiff import capabilities as caps
from ddiff_plugins.autoregressive._process import LEFT_TO_RIGHT


class NextTokenParameterization(ddiff.AbstractMeanParameterization):
    """mu at a masked position is the softmax of the network's V outputs there; a visible
    position carries its token over. With the ``left_to_right`` process the first masked
    position n reads p(x_n | x_<n): a causal network's output row n is the next-token
    distribution."""

    provides = frozenset({caps.MEAN})
    requires = {"process": frozenset({LEFT_TO_RIGHT})}

    def output_channels(self, process: ddiff.AbstractForwardProcess) -> int:
        return process.vocab_size

    def log_mean(
        self, output: ddiff.NetworkOutput, x_t: ddiff.Tokens, t: ddiff.Time,
        process: ddiff.AbstractForwardProcess
    ) -> ddiff.LogProbs:
        masked = (x_t == process.vocab_size)[:, None]
        carried = jnp.where(jax.nn.one_hot(x_t, process.vocab_size, dtype=bool), 0.0, -jnp.inf)
        return jnp.where(masked, jax.nn.log_softmax(output, axis=-1), carried)
