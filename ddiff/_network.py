"""The Network protocol: a denoiser mapping noisy tokens and time to output channels; and
its block-causal refinement (block diffusion)."""

import abc
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from equinox import AbstractVar
from jaxtyping import Array, Int

from ddiff._capabilities import (
    BLOCK_CAUSAL,
    CLASS_CONDITIONAL,
    TIME_CONDITIONED,
    TIME_INDEPENDENT,
    Capable,
)
from ddiff._errors import DdiffError
from ddiff._typing import AbstractCheckedModule, Key, Label, NetworkOutput, Time, Tokens

SUPPLIED_NETWORK_ARGUMENTS = ("num_states", "num_outputs", "seq_len", "num_classes", "key")
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


class BlockPrefix(eqx.Module):
    """The uncached prefix of a block-causal network: the clean tokens of the earlier
    blocks, recomputed through :meth:`AbstractBlockCausalNetwork.block_causal_output` on
    every call (:meth:`AbstractBlockCausalNetwork.init_prefix` with ``cached=False``).

    A window of ``capacity`` positions, a multiple of ``block_size``: when it is full,
    appending a block drops the oldest one, so a block sees at most the ``capacity``
    positions before it (its positions counted from the window's start).

    Attributes:
        tokens: the window's clean tokens, valid in ``[0, length)``.
        length: how many positions of the window hold clean tokens.
        block_size: the block length L'.
    """

    tokens: Int[Array, " capacity"]
    length: Int[Array, ""]
    block_size: int = eqx.field(static=True)

    @staticmethod
    def empty(capacity: int, block_size: int) -> "BlockPrefix":
        """A window of ``capacity`` positions (a multiple of ``block_size``) holding none."""
        if block_size < 1 or capacity < 0 or capacity % block_size:
            raise DdiffError(
                f"a block prefix needs a capacity that is a multiple of the block size "
                f"{block_size}, got {capacity}"
            )
        return BlockPrefix(
            tokens=jnp.zeros((capacity,), jnp.int32), length=jnp.zeros((), jnp.int32), block_size=block_size
        )

    def extend(self, block: Int[Array, " block"]) -> "BlockPrefix":
        """The window with ``block`` appended (the oldest block dropped when full)."""
        tokens, length = append_to_window(self.tokens, self.length, block.astype(self.tokens.dtype))
        return BlockPrefix(tokens=tokens, length=length, block_size=self.block_size)


def append_to_window(buffer: Array, length: Int[Array, ""], block: Array) -> tuple[Array, Int[Array, ""]]:
    """Append ``block`` (leading axis L) to the first ``length`` entries of ``buffer``
    (leading axis C, a multiple of L): written at ``length`` while it fits, else the
    buffer is shifted by L first, dropping its oldest L entries. Returns the buffer and
    its new length (at most C). The sliding window of a block-causal prefix (the clean
    positions a block may see) and of a cache of their keys and values."""
    capacity, size = buffer.shape[0], block.shape[0]
    if capacity == 0:
        return buffer, length
    shift = jnp.maximum(length + size - capacity, 0)
    buffer = jnp.roll(buffer, -shift, axis=0)
    start = (length - shift,) + (0,) * (buffer.ndim - 1)
    return jax.lax.dynamic_update_slice(buffer, block, start), length + size - shift


class AbstractBlockCausalNetwork(AbstractNetwork):
    """A network that can condition noisy blocks on clean earlier blocks (block diffusion,
    Arriola et al. 2025): the sequence is split into blocks of L' positions, and the
    output at a noisy position of block b depends on the noisy tokens of block b and the
    clean tokens of blocks 0..b-1 only (capability ``block_causal``).

    Two ways to read it: the vectorised pass (:meth:`block_causal_output`: every block at
    once, for training), and block by block with a prefix of the clean blocks so far
    (:meth:`init_prefix`, :meth:`extend_prefix`, :meth:`prefix_output`), which is either
    the network's own cache (:meth:`init_cache`: e.g. the attention keys and values of the
    clean blocks) or a :class:`BlockPrefix` of their tokens, recomputed every call. Both
    give the output of the vectorised pass. Neither takes a time: the capability is
    provided only by a network that ignores t (``time_conditioned: false``).
    """

    @abc.abstractmethod
    def block_causal_output(
        self,
        x_t: Tokens,
        x0: Tokens,
        *,
        block_size: int,
        label: Label | None = None,
        key: Key | None = None,
    ) -> NetworkOutput:
        """Output channels at every noisy position, all blocks in one pass: position n of
        block b = n // ``block_size`` reads ``x_t`` in block b and ``x0`` in blocks < b.

        Arguments:
            x_t: noisy tokens, shape (seq,), seq a multiple of ``block_size``.
            x0: clean tokens, shape (seq,).
            block_size: the block length L'.
            label: class label, or None (the null class).
            key: dropout key; None for deterministic inference.
        """

    @abc.abstractmethod
    def init_cache(self, capacity: int, *, block_size: int) -> Any:
        """An empty cache for up to ``capacity`` clean positions (a multiple of
        ``block_size``): a pytree of arrays, for one example."""

    @abc.abstractmethod
    def extend_cache(self, cache: Any, block: Tokens, *, label: Label | None = None) -> Any:
        """``cache`` with the clean block ``block`` (shape (block,)) appended after the
        positions it holds (the oldest block dropped when it is full; to read a window
        that has slid exactly, build a new cache of the window's blocks)."""

    @abc.abstractmethod
    def cached_output(self, x_t: Tokens, cache: Any, *, label: Label | None = None) -> NetworkOutput:
        """Output channels of the noisy block ``x_t`` (shape (block,)) that follows the
        clean positions held in ``cache``."""

    def init_prefix(self, capacity: int, *, block_size: int, cached: bool = True) -> Any:
        """An empty prefix of clean blocks for one example: the network's cache
        (:meth:`init_cache`), or with ``cached=False`` a :class:`BlockPrefix` of tokens."""
        if cached:
            return self.init_cache(capacity, block_size=block_size)
        return BlockPrefix.empty(capacity, block_size)

    def extend_prefix(self, prefix: Any, block: Tokens, *, label: Label | None = None) -> Any:
        """``prefix`` with the clean block ``block`` appended."""
        if isinstance(prefix, BlockPrefix):
            return prefix.extend(block)
        return self.extend_cache(prefix, block, label=label)

    def prefix_output(self, x_t: Tokens, prefix: Any, *, label: Label | None = None) -> NetworkOutput:
        """Output channels of the noisy block ``x_t`` after the clean blocks of
        ``prefix``; for a :class:`BlockPrefix`, the vectorised pass over the window
        followed by ``x_t``, read at ``x_t``'s positions."""
        if not isinstance(prefix, BlockPrefix):
            return self.cached_output(x_t, prefix, label=label)
        size = x_t.shape[0]
        window = jnp.concatenate([prefix.tokens, jnp.zeros((size,), prefix.tokens.dtype)])
        noisy = jax.lax.dynamic_update_slice(window, x_t.astype(window.dtype), (prefix.length,))
        output = self.block_causal_output(noisy, window, block_size=prefix.block_size, label=label)
        return jax.lax.dynamic_slice_in_dim(output, prefix.length, size)

    def capabilities(self) -> frozenset[str]:
        caps = set(AbstractNetwork.capabilities(self))
        if not self.time_conditioned:
            caps.add(BLOCK_CAUSAL)
        return frozenset(caps)
