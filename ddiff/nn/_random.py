"""Dropout and the keys that drive it."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Shaped

from ddiff._typing import Key


def dropout(x: Shaped[Array, "*shape"], rate: float, key: Key | None) -> Shaped[Array, "*shape"]:
    """Inverted dropout: each entry kept with probability 1 - ``rate`` and then divided by
    1 - ``rate`` (so the expectation is ``x``), else 0; the identity without a key
    (inference) or at rate 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def dropout_keys(key: Key | None, count: int) -> tuple[Key | None, ...]:
    """``count`` keys split from ``key``, or ``count`` Nones without a key (inference: no
    dropout anywhere below)."""
    return (None,) * count if key is None else tuple(jax.random.split(key, count))


def stacked_dropout_keys(key: Key | None, count: int) -> Key | None:
    """``count`` keys split from ``key`` as one stacked array (the ``xs`` of a
    :class:`ddiff.nn.LayerStack`, one key per layer), or None without a key."""
    return None if key is None else jax.random.split(key, count)
