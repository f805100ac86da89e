"""The Parameterization protocol: from network output to what objectives and samplers use."""

import abc

from ddiff._capabilities import MEAN, SCORE, Capable
from ddiff._process import AbstractForwardProcess
from ddiff._typing import (
    AbstractCheckedModule,
    LogProbs,
    NetworkOutput,
    StateLogProbs,
    Time,
    Tokens,
)


class AbstractParameterization(AbstractCheckedModule, Capable):
    """Interprets the network's output. Sub-protocols say what it can be read as."""

    @abc.abstractmethod
    def output_channels(self, process: AbstractForwardProcess) -> int:
        """How many output channels per position the network must produce."""


class AbstractMeanParameterization(AbstractParameterization):
    """Provides the mean mu_theta(x_t, t) = p_theta(x_0 | x_t), per position (MD4, D3PM x0)."""

    provides = frozenset({MEAN})

    @abc.abstractmethod
    def log_mean(
        self,
        output: NetworkOutput,
        x_t: Tokens,
        t: Time,
        process: AbstractForwardProcess,
    ) -> LogProbs:
        """log p_theta(x_0^n = v | x_t), shape (seq, vocab).

        Arguments:
            output: the network's output for ``x_t``.
            x_t: the noisy tokens.
            t: the time.
            process: the forward process (for its mask id, schedule, ...).
        """


class AbstractScoreParameterization(AbstractParameterization):
    """Provides concentration ratios s[n, y] ~ p_t(x with x^n = y) / p_t(x) (SEDD)."""

    provides = frozenset({SCORE})

    @abc.abstractmethod
    def log_score(
        self,
        output: NetworkOutput,
        x_t: Tokens,
        t: Time,
        process: AbstractForwardProcess,
    ) -> StateLogProbs:
        """log s_theta(x_t, t)[n, y] for every position n and state y, shape (seq, states)."""
