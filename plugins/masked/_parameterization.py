"""The mean parameterization of masked processes (MDLM's SUBS, MD4 sec. 3)."""

import jax
import jax.numpy as jnp

import ddiff
from ddiff import capabilities as caps


class MeanParameterization(ddiff.AbstractMeanParameterization, ddiff.AbstractScoreParameterization):
    """mu_theta = softmax of the network's V logits at masked positions; an unmasked
    position carries its token over (one-hot), and no mass is put on the mask
    (MDLM's "SUBS", MD4 sec. 3). Needs a masked process (use ``x0`` for others).

    The mean also reads as a score (Lou et al. 2024, sec. 3): s = alpha_t / (1 - alpha_t)
    mu at masked positions (:meth:`ddiff.AbstractForwardProcess.log_score_from_mean`), so
    a network trained with the MD4 ELBO can be evaluated under score entropy and sampled
    with SEDD's samplers.
    """

    provides = frozenset({caps.MEAN, caps.SCORE})
    requires = {"process": frozenset({caps.MASKED})}

    def output_channels(self, process: ddiff.AbstractForwardProcess) -> int:
        return process.vocab_size

    def log_mean(
        self, output: ddiff.NetworkOutput, x_t: ddiff.Tokens, t: ddiff.Time,
        process: ddiff.AbstractForwardProcess
    ) -> ddiff.LogProbs:
        masked = (x_t == process.vocab_size)[:, None]
        carried = jnp.where(
            jax.nn.one_hot(x_t, process.vocab_size, dtype=bool), 0.0, -jnp.inf
        )
        return jnp.where(masked, jax.nn.log_softmax(output, axis=-1), carried)

    def log_score(
        self, output: ddiff.NetworkOutput, x_t: ddiff.Tokens, t: ddiff.Time,
        process: ddiff.AbstractForwardProcess
    ) -> ddiff.StateLogProbs:
        return process.log_score_from_mean(self.log_mean(output, x_t, t, process), x_t, t)
