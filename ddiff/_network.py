"""The Network protocol: a denoiser mapping noisy tokens and time to output channels."""

import abc

from equinox import AbstractVar

from ddiff._capabilities import CLASS_CONDITIONAL, TIME_CONDITIONED, TIME_INDEPENDENT, Capable
from ddiff._typing import AbstractCheckedModule, Key, Label, NetworkOutput, Time, Tokens

NETWORK_CONTEXT = ("num_states", "num_outputs", "seq_len", "num_classes", "key")
"""Constructor arguments that ddiff supplies to a network (never set in a recipe)."""


class AbstractNetwork(AbstractCheckedModule, Capable):
    """A network on one example. Its constructor takes keyword arguments ``num_states``
    (input vocabulary), ``num_outputs`` (channels per position), ``seq_len``,
    ``num_classes`` (0 for unconditional; label ``num_classes`` is the null class) and
    ``key``, supplied by ddiff, plus its own hyper-parameters from the recipe.
    """

    time_conditioned: AbstractVar[bool]
    num_classes: AbstractVar[int]

    @abc.abstractmethod
    def __call__(
        self,
        x_t: Tokens,
        t: Time,
        *,
        label: Label | None = None,
        key: Key | None = None,
    ) -> NetworkOutput:
        """Output channels per position.

        Arguments:
            x_t: noisy tokens, shape (seq,).
            t: time; ignored when the network is not time conditioned.
            label: class label, or None (the null class).
            key: dropout key; None for deterministic inference.
        """

    def flops_per_token(self, seq_len: int) -> float | None:
        """Model FLOPs of one forward pass per position of a sequence of ``seq_len``
        positions (2 per multiply-add of the matrix products and convolutions, by a
        formula the network's docstring states), or None (the default) when the network
        does not say. A train step counts three times this (the backward pass costs two
        forward passes); the trainer and ``ddiff bench`` report model FLOPs utilisation
        (MFU) from it.

        Arguments:
            seq_len: positions per sequence.
        """
        del seq_len
        return None

    def capabilities(self) -> frozenset[str]:
        caps = {TIME_CONDITIONED if self.time_conditioned else TIME_INDEPENDENT}
        if self.num_classes > 0:
            caps.add(CLASS_CONDITIONAL)
        return frozenset(caps)
