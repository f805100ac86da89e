"""What the sources of token windows share: the ``length`` key, and for character-level
text the alphabet, its decoding and the unit of bits per character."""

import abc

import equinox as eqx
import numpy as np

import ddiff


class AbstractWindowSource(ddiff.AbstractDataSource):
    """Examples that are windows of D = ``length`` tokens (a recipe key of every final
    subclass, at least 1) of a longer stream."""

    length: eqx.AbstractVar[int]

    def __check_init__(self) -> None:
        ddiff.check_at_least("length", self.length)

    @property
    def seq_len(self) -> int:
        return self.length


class AbstractCharacterSource(AbstractWindowSource):
    """Character-level text: token i is the i-th character of ``characters``, so V is its
    length; scored in bits per character, and decoded back to text with ``_`` for a token
    outside the alphabet (such as the mask)."""

    @property
    @abc.abstractmethod
    def characters(self) -> str:
        """The alphabet, in token order."""

    @property
    def vocab_size(self) -> int:
        return len(self.characters)

    @property
    def metric(self) -> str:
        return "bits_per_char"

    def decode(self, tokens: np.ndarray) -> str:
        alphabet = self.characters
        return "".join(alphabet[int(t)] if t < len(alphabet) else "_" for t in tokens)
