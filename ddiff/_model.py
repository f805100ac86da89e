"""The model: a network, a parameterization and a forward process, trained together."""

import equinox as eqx

from ddiff._network import AbstractNetwork
from ddiff._parameterization import (
    AbstractMeanParameterization,
    AbstractParameterization,
    AbstractScoreParameterization,
)
from ddiff._process import AbstractForwardProcess
from ddiff._typing import Key, Label, LogProbs, NetworkOutput, StateLogProbs, Time, Tokens


class DiffusionModel(eqx.Module):
    """Everything with parameters: the network, and the forward process (whose schedule
    may be learnable), with the parameterization that reads the network's output.

    Objectives and samplers receive this module; its inexact array leaves are what the
    optimizer trains.
    """

    network: AbstractNetwork
    parameterization: AbstractParameterization
    process: AbstractForwardProcess

    def network_output(
        self, x_t: Tokens, t: Time, *, label: Label | None = None, key: Key | None = None
    ) -> NetworkOutput:
        """The raw network output for one example."""
        return self.network(x_t, t, label=label, key=key)

    def log_mean(
        self, x_t: Tokens, t: Time, *, label: Label | None = None, key: Key | None = None
    ) -> LogProbs:
        """log p_theta(x_0 | x_t) per position; needs a mean parameterization."""
        parameterization = self.parameterization
        assert isinstance(parameterization, AbstractMeanParameterization)
        output = self.network(x_t, t, label=label, key=key)
        return parameterization.log_mean(output, x_t, t, self.process)

    def log_score(
        self, x_t: Tokens, t: Time, *, label: Label | None = None, key: Key | None = None
    ) -> StateLogProbs:
        """log concentration ratios per position and state; needs a score parameterization."""
        parameterization = self.parameterization
        assert isinstance(parameterization, AbstractScoreParameterization)
        output = self.network(x_t, t, label=label, key=key)
        return parameterization.log_score(output, x_t, t, self.process)
