"""The model: a network, a parameterization and a forward process, trained together."""

from typing import Any, TypedDict, Unpack

import equinox as eqx
import jax.numpy as jnp

from ddiff._capabilities import BLOCK_CAUSAL
from ddiff._errors import IncompatibleComponentsError, RecipeError
from ddiff._layers import COMPUTE_DTYPES, cast_floating
from ddiff._network import AbstractBlockCausalNetwork, AbstractNetwork
from ddiff._parameterization import (
    AbstractMeanParameterization,
    AbstractParameterization,
    AbstractScoreParameterization,
)
from ddiff._process import AbstractForwardProcess
from ddiff._typing import Key, Label, LogProbs, NetworkOutput, StateLogProbs, Time, Tokens


class NetworkInputs(TypedDict, total=False):
    """What a network call of :class:`DiffusionModel` reads besides x_t and t, each
    optional: the class label (None: the null class), the dropout key (None:
    deterministic) and a prefix of clean blocks (None: no prefix)."""

    label: Label | None
    key: Key | None
    prefix: Any


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

    def _computing_network(self) -> AbstractNetwork:
        """The network with its parameters in the compute dtype (itself without one)."""
        if self.compute_dtype is None:
            return self.network
        return cast_floating(self.network, COMPUTE_DTYPES[self.compute_dtype])

    def _block_network(self) -> AbstractBlockCausalNetwork:
        network = self._computing_network()
        if not isinstance(network, AbstractBlockCausalNetwork) or BLOCK_CAUSAL not in network.capabilities():
            raise IncompatibleComponentsError(
                f"network {type(self.network).__name__} has no block-causal pass (capability "
                f"{BLOCK_CAUSAL}: a network that ignores t and conditions blocks on clean earlier "
                f"blocks, e.g. md4_transformer with time_conditioned: false)",
                path="network",
            )
        return network

    def _float32(self, output: NetworkOutput) -> NetworkOutput:
        return output if self.compute_dtype is None else output.astype(jnp.float32)

    def _network_call(
        self,
        x_t: Tokens,
        t: Time,
        *,
        label: Label | None = None,
        key: Key | None = None,
        prefix: Any = None,
    ) -> NetworkOutput:
        if prefix is None:
            return self._float32(self._computing_network()(x_t, t, label=label, key=key))
        return self._float32(self._block_network().prefix_output(x_t, prefix, label=label))

    def network_output(self, x_t: Tokens, t: Time, **inputs: Unpack[NetworkInputs]) -> NetworkOutput:
        """The raw network output for one example (float32 under mixed precision); with a
        ``prefix`` of clean blocks (:meth:`init_prefix`), ``x_t`` is the noisy block
        that follows them (:meth:`ddiff.AbstractBlockCausalNetwork.prefix_output`)."""
        return self._network_call(x_t, t, **inputs)

    def log_mean(self, x_t: Tokens, t: Time, **inputs: Unpack[NetworkInputs]) -> LogProbs:
        """log p_theta(x_0 | x_t) per position; needs a mean parameterization. With a
        ``prefix``, of the block ``x_t`` after its clean blocks."""
        parameterization = self.parameterization
        assert isinstance(parameterization, AbstractMeanParameterization)
        return parameterization.log_mean(self._network_call(x_t, t, **inputs), x_t, t, self.process)

    def log_score(self, x_t: Tokens, t: Time, **inputs: Unpack[NetworkInputs]) -> StateLogProbs:
        """log concentration ratios per position and state; needs a score parameterization.
        With a ``prefix``, of the block ``x_t`` after its clean blocks."""
        parameterization = self.parameterization
        assert isinstance(parameterization, AbstractScoreParameterization)
        return parameterization.log_score(self._network_call(x_t, t, **inputs), x_t, t, self.process)

    def block_causal_log_mean(
        self,
        x_t: Tokens,
        x0: Tokens,
        *,
        block_size: int,
        label: Label | None = None,
        key: Key | None = None,
    ) -> LogProbs:
        """log p_theta(x_0^n | x_t^b, x_0^{<b}) at every position n of every block b, in
        one pass (:meth:`ddiff.AbstractBlockCausalNetwork.block_causal_output`); needs a
        mean parameterization and a block-causal network (which ignores t: the
        parameterization reads the output at t = 0)."""
        parameterization = self.parameterization
        assert isinstance(parameterization, AbstractMeanParameterization)
        output = self._block_network().block_causal_output(x_t, x0, block_size=block_size, label=label, key=key)
        return parameterization.log_mean(self._float32(output), x_t, jnp.zeros(()), self.process)

    def init_prefix(self, capacity: int, *, block_size: int, cached: bool = True) -> Any:
        """An empty prefix of clean blocks for one example, for up to ``capacity``
        positions (:meth:`ddiff.AbstractBlockCausalNetwork.init_prefix`; its arrays in
        the compute dtype)."""
        return self._block_network().init_prefix(capacity, block_size=block_size, cached=cached)

    def extend_prefix(self, prefix: Any, block: Tokens, *, label: Label | None = None) -> Any:
        """``prefix`` with the clean block ``block`` appended (one network call for a
        cache, none for a :class:`ddiff.BlockPrefix`)."""
        return self._block_network().extend_prefix(prefix, block, label=label)
