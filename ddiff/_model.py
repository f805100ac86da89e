"""The model: a network, a parameterization and a forward process, trained together."""

import equinox as eqx
import jax.numpy as jnp

from ddiff._errors import RecipeError
from ddiff._layers import COMPUTE_DTYPES, cast_floating
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

    Mixed precision: with ``compute_dtype`` (``bfloat16``, ``float16``) every call of the
    network casts its floating-point parameters to that dtype at use, so its matrix
    products and activations run in it, while the parameters themselves (and so the
    optimizer state and EMA) stay float32; the network's output is returned as float32,
    so log-probabilities, every bound's terms, schedules and samplers' draws stay float32.
    A network needs nothing for this but to compute in the dtype of its parameters (cast
    float32 inputs it makes itself, such as time features, to it); the built-in networks
    also keep layer-norm statistics and attention softmax in float32.

    Attributes:
        network, parameterization, process: the components.
        compute_dtype: ``None`` (compute in the parameters' dtype) or a name of
            :data:`ddiff.COMPUTE_DTYPES`.
    """

    network: AbstractNetwork
    parameterization: AbstractParameterization
    process: AbstractForwardProcess
    compute_dtype: str | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            raise RecipeError(
                f"unknown compute dtype {self.compute_dtype!r}; use one of {', '.join(COMPUTE_DTYPES)}",
                path="precision.compute",
            )

    def _network_call(
        self, x_t: Tokens, t: Time, label: Label | None, key: Key | None
    ) -> NetworkOutput:
        if self.compute_dtype is None:
            return self.network(x_t, t, label=label, key=key)
        network = cast_floating(self.network, COMPUTE_DTYPES[self.compute_dtype])
        return network(x_t, t, label=label, key=key).astype(jnp.float32)

    def network_output(
        self, x_t: Tokens, t: Time, *, label: Label | None = None, key: Key | None = None
    ) -> NetworkOutput:
        """The raw network output for one example (float32 under mixed precision)."""
        return self._network_call(x_t, t, label, key)

    def log_mean(
        self, x_t: Tokens, t: Time, *, label: Label | None = None, key: Key | None = None
    ) -> LogProbs:
        """log p_theta(x_0 | x_t) per position; needs a mean parameterization."""
        parameterization = self.parameterization
        assert isinstance(parameterization, AbstractMeanParameterization)
        output = self._network_call(x_t, t, label, key)
        return parameterization.log_mean(output, x_t, t, self.process)

    def log_score(
        self, x_t: Tokens, t: Time, *, label: Label | None = None, key: Key | None = None
    ) -> StateLogProbs:
        """log concentration ratios per position and state; needs a score parameterization."""
        parameterization = self.parameterization
        assert isinstance(parameterization, AbstractScoreParameterization)
        output = self._network_call(x_t, t, label, key)
        return parameterization.log_score(output, x_t, t, self.process)
