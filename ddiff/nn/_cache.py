"""The key-value cache of block-by-block attention (block diffusion)."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ddiff._errors import DdiffError
from ddiff._network import append_to_window


class PastKeys(eqx.Module):
    """Keys (rotated, where the network rotates them) and values of earlier positions that
    one attention layer's queries may also attend to, where ``valid``: one layer's slice of
    a :class:`KVCache`.

    Attributes:
        keys, values: shape (positions, heads, head_dim).
        valid: which positions hold entries, shape (positions,).
    """

    keys: Float[Array, "positions heads head_dim"]
    values: Float[Array, "positions heads head_dim"]
    valid: Bool[Array, " positions"]

    def prepend(
        self,
        keys: Float[Array, "seq heads head_dim"],
        values: Float[Array, "seq heads head_dim"],
        mask: Bool[Array, "seq seq"] | None,
    ) -> tuple[
        Float[Array, "keys heads head_dim"],
        Float[Array, "keys heads head_dim"],
        Bool[Array, "seq keys"],
    ]:
        """The keys and values that queries at ``seq`` new positions attend to: these past
        ones (cast to the new ones' dtype) followed by the new positions' own, and the
        mask over both (the valid past positions, then ``mask`` over the new ones; None:
        every new position)."""
        seq = keys.shape[0]
        all_keys = jnp.concatenate([self.keys.astype(keys.dtype), keys])
        all_values = jnp.concatenate([self.values.astype(values.dtype), values])
        own = jnp.ones((seq, seq), bool) if mask is None else mask
        mask = jnp.concatenate(
            [jnp.broadcast_to(self.valid, (seq, self.valid.shape[0])), own], axis=1
        )
        return all_keys, all_values, mask


class KVCache(eqx.Module):
    """The clean blocks a stack of attention layers has read, for block-by-block sampling
    (:class:`ddiff.AbstractBlockCausalNetwork`): every layer's (rotated) keys and values of
    the last ``length`` clean positions (a sliding window of ``capacity``), and the
    absolute position of the next block. When the window is full the oldest block's
    entries are dropped as they are, not recomputed without it, which differs from a
    :class:`ddiff.BlockPrefix` of the same tokens beyond one layer; the bd3lm sampler
    rebuilds the cache from the window instead.

    Attributes:
        keys, values: shape (depth, capacity, heads, head_dim), in the compute dtype.
        length: positions held.
        position: absolute position of the next block (its rotary angles).
        block_size: the block length L'.
    """

    keys: Float[Array, "depth capacity heads head_dim"]
    values: Float[Array, "depth capacity heads head_dim"]
    length: Int[Array, ""]
    position: Int[Array, ""]
    block_size: int = eqx.field(static=True)

    @staticmethod
    def empty(
        depth: int, capacity: int, heads: int, head_dim: int, *, block_size: int, dtype: jnp.dtype
    ) -> "KVCache":
        """A cache of ``depth`` layers for up to ``capacity`` clean positions (a multiple of
        ``block_size``) holding none, its arrays in ``dtype``."""
        if block_size < 1 or capacity < 0 or capacity % block_size:
            raise DdiffError(
                f"a cache of clean blocks needs a capacity that is a multiple of the block "
                f"size {block_size}, got {capacity}"
            )
        zeros = jnp.zeros((depth, capacity, heads, head_dim), dtype)
        start = jnp.zeros((), jnp.int32)
        return KVCache(
            keys=zeros, values=zeros, length=start, position=start, block_size=block_size
        )

    @property
    def valid(self) -> Bool[Array, " capacity"]:
        """Which positions of the window hold entries."""
        return jnp.arange(self.keys.shape[1]) < self.length

    def extend(
        self,
        keys: Float[Array, "depth block heads head_dim"],
        values: Float[Array, "depth block heads head_dim"],
    ) -> "KVCache":
        """The cache with every layer's keys and values of the next block appended after
        the positions it holds (:func:`ddiff.append_to_window`: the oldest block dropped
        when it is full), and the next block's position advanced past it."""

        def append(buffer: Array, new: Array) -> Array:
            return jax.vmap(lambda b, n: append_to_window(b, self.length, n.astype(b.dtype))[0])(
                buffer, new
            )

        _, length = append_to_window(self.keys[0], self.length, keys[0])
        return KVCache(
            keys=append(self.keys, keys),
            values=append(self.values, values),
            length=length,
            position=self.position + keys.shape[1],
            block_size=self.block_size,
        )
