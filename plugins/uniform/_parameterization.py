"""The plain x0 parameterization: mu_theta = softmax of the network's V logits."""

import jax

import ddiff
from ddiff import capabilities as caps


class X0Parameterization(ddiff.AbstractMeanParameterization, ddiff.AbstractScoreParameterization):
    """mu_theta(x_t, t) = softmax of the network's V logits at every position (D3PM's
    x0-parameterization, Austin et al. 2021 sec. 3.3). Unlike MD4's ``mean`` (SUBS),
    it assumes nothing of the process: a clean-looking token may still be noise.

    The mean also reads as a score through the process's
    :meth:`ddiff.AbstractForwardProcess.log_score_from_mean` (Lou et al. 2024), so the
    same network can be trained or evaluated under score entropy.
    """

    provides = frozenset({caps.MEAN, caps.SCORE})

    def output_channels(self, process: ddiff.AbstractForwardProcess) -> int:
        return process.vocab_size

    def log_mean(
        self, output: ddiff.NetworkOutput, x_t: ddiff.Tokens, t: ddiff.Time,
        process: ddiff.AbstractForwardProcess
    ) -> ddiff.LogProbs:
        return jax.nn.log_softmax(output, axis=-1)

    def log_score(
        self, output: ddiff.NetworkOutput, x_t: ddiff.Tokens, t: ddiff.Time,
        process: ddiff.AbstractForwardProcess
    ) -> ddiff.StateLogProbs:
        return process.log_score_from_mean(self.log_mean(output, x_t, t, process), x_t, t)
